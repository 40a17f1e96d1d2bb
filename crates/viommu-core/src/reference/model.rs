//! The reference model: every rule written straight from the spec, in the
//! spec's order, with linear scans and no trees.

use std::collections::HashMap;

use super::fixture::{DOMAINS, INPUT, LIMITS, endpoint_exists, resv_of};
use crate::{Access, TranslateError, Translation};
use virtio_iommu_proto::probe::ResvSubtype;
use virtio_iommu_proto::{Attach, Detach, FaultReason, FaultRecord, Map, Request, Status, Unmap};

#[derive(Clone, Copy, Debug)]
struct RefMapping {
    s: u64,
    e: u64,
    p: u64,
    flags: u32,
}

#[derive(Clone, Debug, Default)]
struct RefDomain {
    bypass: bool,
    eps: Vec<u32>,
    maps: Vec<RefMapping>,
}

/// The fixture device (see [`super::fixture`]) as the spec describes it.
#[derive(Clone, Debug)]
pub struct Reference {
    granule: u64,
    bypass: u8,
    domains: HashMap<u32, RefDomain>,
}

impl Reference {
    /// A device just reset, with the smallest page of `page_size_mask`.
    pub fn new(page_size_mask: u64) -> Reference {
        Reference {
            granule: page_size_mask & page_size_mask.wrapping_neg(),
            bypass: 0,
            domains: HashMap::new(),
        }
    }

    /// The config-space `bypass` byte was written with `value` (accepted
    /// only as 0 or 1).
    pub fn write_bypass(&mut self, value: u8) -> bool {
        let accepted = value <= 1;
        if accepted {
            self.bypass = value;
        }
        accepted
    }

    /// Device reset: domains go, the bypass byte stays as written.
    pub fn reset(&mut self) {
        self.domains.clear();
    }

    /// Mappings in all domains.
    pub fn mapping_count(&self) -> usize {
        self.domains.values().map(|d| d.maps.len()).sum()
    }

    /// Domains in use.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    fn attached_to(&self, ep: u32) -> Option<u32> {
        self.domains
            .iter()
            .find(|(_, d)| d.eps.contains(&ep))
            .map(|(&id, _)| id)
    }

    fn attach(&mut self, a: &Attach) -> Status {
        if a.reserved != [0; 4] || a.flags > 1 {
            return Status::Inval;
        }
        let bypass = a.flags == 1;
        if !(DOMAINS.start..=DOMAINS.end).contains(&a.domain) {
            return Status::Range;
        }
        if !endpoint_exists(a.endpoint) {
            return Status::NoEnt;
        }
        let current = self.attached_to(a.endpoint);
        if let Some(d) = self.domains.get(&a.domain) {
            if d.bypass != bypass {
                return Status::Inval;
            }
            if current == Some(a.domain) {
                return Status::Ok;
            }
            let clash = resv_of(a.endpoint)
                .iter()
                .any(|r| d.maps.iter().any(|m| m.s <= r.end && r.start <= m.e));
            if clash {
                return Status::Unsupp;
            }
        } else {
            let freed = current
                .and_then(|c| self.domains.get(&c))
                .is_some_and(|d| d.eps.len() == 1);
            if self.domains.len() - usize::from(freed) >= LIMITS.max_domains as usize {
                return Status::NoMem;
            }
        }
        if let Some(c) = current {
            self.remove_ep(c, a.endpoint);
        }
        let d = self.domains.entry(a.domain).or_insert_with(|| RefDomain {
            bypass,
            ..Default::default()
        });
        d.eps.push(a.endpoint);
        Status::Ok
    }

    fn remove_ep(&mut self, domain: u32, ep: u32) {
        if let Some(d) = self.domains.get_mut(&domain) {
            d.eps.retain(|&e| e != ep);
            if d.eps.is_empty() {
                self.domains.remove(&domain);
            }
        }
    }

    fn detach(&mut self, d: &Detach) -> Status {
        if !endpoint_exists(d.endpoint) {
            return Status::NoEnt;
        }
        if self.attached_to(d.endpoint) != Some(d.domain) {
            return Status::Inval;
        }
        self.remove_ep(d.domain, d.endpoint);
        Status::Ok
    }

    fn map(&mut self, m: &Map) -> Status {
        if m.flags.0 & !3 != 0 {
            return Status::Inval; // MMIO is not offered here
        }
        let total = self.mapping_count();
        let g = self.granule;
        let Some(d) = self.domains.get_mut(&m.domain) else {
            return Status::NoEnt;
        };
        if d.bypass || m.virt_end < m.virt_start {
            return Status::Inval;
        }
        if m.virt_start % g != 0 || m.phys_start % g != 0 || m.virt_end.wrapping_add(1) % g != 0 {
            return Status::Range;
        }
        if m.virt_start < INPUT.start || m.virt_end > INPUT.end {
            return Status::Range;
        }
        if u128::from(m.phys_start) + u128::from(m.virt_end - m.virt_start) > u128::from(u64::MAX) {
            return Status::Range;
        }
        let hits = |s: u64, e: u64| s <= m.virt_end && m.virt_start <= e;
        if d.eps
            .iter()
            .any(|&ep| resv_of(ep).iter().any(|r| hits(r.start, r.end)))
        {
            return Status::Inval;
        }
        if d.maps.iter().any(|x| hits(x.s, x.e)) {
            return Status::Inval;
        }
        if d.maps.len() >= LIMITS.max_mappings_per_domain as usize
            || total >= LIMITS.max_mappings as usize
        {
            return Status::NoMem;
        }
        d.maps.push(RefMapping {
            s: m.virt_start,
            e: m.virt_end,
            p: m.phys_start,
            flags: m.flags.0,
        });
        Status::Ok
    }

    fn unmap(&mut self, u: &Unmap) -> Status {
        let Some(d) = self.domains.get_mut(&u.domain) else {
            return Status::NoEnt;
        };
        if d.bypass || u.virt_end < u.virt_start {
            return Status::Inval;
        }
        let overlaps = |m: &RefMapping| m.s <= u.virt_end && u.virt_start <= m.e;
        let inside = |m: &RefMapping| u.virt_start <= m.s && m.e <= u.virt_end;
        if d.maps.iter().any(|m| overlaps(m) && !inside(m)) {
            return Status::Range;
        }
        d.maps.retain(|m| !inside(m));
        Status::Ok
    }

    /// The status the device must answer `req` with, applying it.
    pub fn handle(&mut self, req: &Request) -> Status {
        match req {
            Request::Attach(a) => self.attach(a),
            Request::Detach(d) => self.detach(d),
            Request::Map(m) => self.map(m),
            Request::Unmap(u) => self.unmap(u),
            Request::Probe(p) => {
                if endpoint_exists(p.endpoint) {
                    Status::Ok
                } else {
                    Status::NoEnt
                }
            }
        }
    }

    /// What an access of `ep` at `iova` must translate to.
    pub fn translate(
        &self,
        ep: u32,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        if !endpoint_exists(ep) {
            return Err(TranslateError::UnknownEndpoint(ep));
        }
        let fault = |reason| {
            Err(TranslateError::Fault(FaultRecord {
                reason,
                access: access.fault_flags(),
                endpoint: ep,
                address: Some(iova),
            }))
        };
        let identity = Ok(Translation {
            gpa: iova,
            iova_last: u64::MAX,
            mmio: false,
        });
        let Some(d) = self.attached_to(ep).and_then(|id| self.domains.get(&id)) else {
            return if self.bypass == 1 {
                identity
            } else {
                fault(FaultReason::Domain)
            };
        };
        if d.bypass {
            return identity;
        }
        if let Some(r) = resv_of(ep)
            .iter()
            .find(|r| r.start <= iova && iova <= r.end)
        {
            return match r.subtype {
                ResvSubtype::Msi => Ok(Translation {
                    gpa: iova,
                    iova_last: r.end,
                    mmio: true,
                }),
                ResvSubtype::Reserved => fault(FaultReason::Mapping),
            };
        }
        let Some(m) = d.maps.iter().find(|m| m.s <= iova && iova <= m.e) else {
            return fault(FaultReason::Mapping);
        };
        if (access.reads() && m.flags & 1 == 0) || (access.writes() && m.flags & 2 == 0) {
            return fault(FaultReason::Mapping);
        }
        Ok(Translation {
            gpa: m.p + (iova - m.s),
            iova_last: m.e,
            mmio: false,
        })
    }
}
