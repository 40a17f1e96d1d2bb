//! Device-model baselines for MAP/UNMAP.
//!
//! [`ChModel`] keeps mappings the way cloud-hypervisor's virtio-iommu does:
//! `RwLock<BTreeMap<domain, Domain { BTreeMap<iova, {gpa, size}> }>>` plus
//! an endpoint map; MAP inserts without checking for overlap and UNMAP
//! `retain`s over every mapping of the domain. [`TunedBTreeModel`] keeps the
//! same structure but removes by key range, the fastest this structure
//! allows, and also skips every spec check. Both are written here from that
//! description; neither validates anything our model validates.

use std::collections::BTreeMap;
use std::sync::RwLock;

/// A mapping as cloud-hypervisor stores it.
#[derive(Clone, Copy, Debug)]
pub struct ChMapping {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

#[derive(Debug, Default)]
struct ChDomain {
    mappings: BTreeMap<u64, ChMapping>,
    bypass: bool,
}

/// cloud-hypervisor's structure and algorithms.
#[derive(Debug, Default)]
pub struct ChModel {
    endpoints: RwLock<BTreeMap<u32, u32>>,
    domains: RwLock<BTreeMap<u32, ChDomain>>,
}

impl ChModel {
    /// Attaches `endpoint` to `domain`, creating it.
    pub fn attach(&self, domain: u32, endpoint: u32) {
        if let (Ok(mut eps), Ok(mut doms)) = (self.endpoints.write(), self.domains.write()) {
            eps.insert(endpoint, domain);
            doms.entry(domain).or_default();
        }
    }

    /// MAP: insert under the write lock; false if the domain is missing.
    pub fn map(&self, domain: u32, virt_start: u64, virt_end: u64, phys_start: u64) -> bool {
        let Ok(mut doms) = self.domains.write() else {
            return false;
        };
        match doms.get_mut(&domain) {
            Some(d) => {
                d.mappings.insert(
                    virt_start,
                    ChMapping {
                        gpa: phys_start,
                        size: virt_end - virt_start + 1,
                    },
                );
                true
            }
            None => false,
        }
    }

    /// UNMAP: bypass check under the read lock, the endpoint scan, then a
    /// `retain` over all mappings of the domain under the write lock.
    pub fn unmap(&self, domain: u32, virt_start: u64, virt_end: u64) -> bool {
        match self
            .domains
            .read()
            .ok()
            .and_then(|d| d.get(&domain).map(|d| d.bypass))
        {
            Some(false) => {}
            _ => return false,
        }
        let attached = self
            .endpoints
            .write()
            .map(|eps| eps.iter().filter(|&(_, &d)| d == domain).count())
            .unwrap_or(0);
        std::hint::black_box(attached);
        let Ok(mut doms) = self.domains.write() else {
            return false;
        };
        if let Some(d) = doms.get_mut(&domain) {
            d.mappings
                .retain(|&iova, _| iova < virt_start || iova > virt_end);
        }
        true
    }

    /// Number of mappings in `domain`.
    pub fn len(&self, domain: u32) -> usize {
        self.domains
            .read()
            .map(|d| d.get(&domain).map_or(0, |d| d.mappings.len()))
            .unwrap_or(0)
    }

    /// Whether `domain` has no mapping.
    pub fn is_empty(&self, domain: u32) -> bool {
        self.len(domain) == 0
    }
}

/// The same locked BTreeMap, with UNMAP by key range.
#[derive(Debug, Default)]
pub struct TunedBTreeModel {
    domains: RwLock<BTreeMap<u32, BTreeMap<u64, ChMapping>>>,
}

impl TunedBTreeModel {
    /// Creates `domain`.
    pub fn create(&self, domain: u32) {
        if let Ok(mut d) = self.domains.write() {
            d.entry(domain).or_default();
        }
    }

    /// MAP: insert under the write lock.
    pub fn map(&self, domain: u32, virt_start: u64, virt_end: u64, phys_start: u64) -> bool {
        let Ok(mut doms) = self.domains.write() else {
            return false;
        };
        doms.get_mut(&domain)
            .map(|m| {
                m.insert(
                    virt_start,
                    ChMapping {
                        gpa: phys_start,
                        size: virt_end - virt_start + 1,
                    },
                )
            })
            .is_some()
    }

    /// UNMAP: remove the keys in `[virt_start, virt_end]` one by one.
    pub fn unmap(&self, domain: u32, virt_start: u64, virt_end: u64) -> bool {
        let Ok(mut doms) = self.domains.write() else {
            return false;
        };
        let Some(m) = doms.get_mut(&domain) else {
            return false;
        };
        while let Some((&k, _)) = m.range(virt_start..=virt_end).next() {
            m.remove(&k);
        }
        true
    }
}
