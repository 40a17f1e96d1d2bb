//! Lookup baselines for the shared translation table, and the mapping
//! layouts and random sequences every lookup candidate is measured on.
//!
//! - [`BTreeLookup`]: one domain's mappings in an `RwLock<BTreeMap<iova,
//!   {gpa, size}>>`, the structure cloud-hypervisor keeps. The lookup is the
//!   *tuned* one (read lock, `range(..=iova).next_back()`, end check, GPA),
//!   not cloud-hypervisor's own `translate_gva`, which takes two read locks
//!   (endpoints, then domains) and scans `mappings.iter()` linearly; the
//!   tuned lookup is the stronger baseline.
//! - [`IotlbLookup`]: rust-vmm's `vm_memory::Iotlb` behind the `RwLock` an
//!   `Iommu` keeps it in (as vm-memory's own `SimpleIommu` does), looked up
//!   with `Iotlb::lookup(lock.read(), iova, 1, Read)` and the first
//!   `MappedRange` of the iterator, the way `IommuMemory` translates.
//! - [`FlatTable`]: an unsynchronized `Vec<u64>` indexed by IOVA page
//!   number: one load, a flag check and an OR. The floor.

use std::collections::BTreeMap;
use std::sync::RwLock;

use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::model_baselines::ChMapping;

/// Page size of every mapping in these benches.
pub const PAGE: u64 = 0x1000;

/// First IOVA of the consecutive layout (4 GiB).
pub const IOVA_BASE: u64 = 0x1_0000_0000;

/// Guest-physical address of page `i` of a layout: an odd-multiplier
/// permutation of 2^24 page frames above 4 GiB, so neighbouring IOVA pages
/// never land on neighbouring frames and the table can build no 2 MiB or
/// 1 GiB leaf. Distinct for `i < 2^24`.
pub fn scattered_gpa(i: u64) -> u64 {
    0x1_0000_0000 + (i.wrapping_mul(0x9E37_79B1) & 0xFF_FFFF) * PAGE
}

/// IOVA of page `i` of the consecutive layout.
pub fn consecutive_iova(i: u64) -> u64 {
    IOVA_BASE + i * PAGE
}

/// A small xorshift generator (deterministic, seedable).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator seeded with `seed` (any value; zero is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next 64-bit value.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `len` (a power of two) IOVAs drawn uniformly from the first `live`
/// pages of the consecutive layout, each with a random 8-byte aligned
/// offset inside its page. Precomputed so the RNG is not measured; every
/// candidate walks the same sequence from its start.
pub fn random_iovas(live: u64, len: usize, seed: u64) -> Vec<u64> {
    let mut rng = XorShift::new(seed);
    (0..len)
        .map(|_| {
            let r = rng.next_u64();
            consecutive_iova((r >> 16) % live) + (r & 0xff8)
        })
        .collect()
}

/// One domain's mappings in a locked `BTreeMap`, looked up by range.
#[derive(Debug, Default)]
pub struct BTreeLookup {
    map: RwLock<BTreeMap<u64, ChMapping>>,
}

impl BTreeLookup {
    /// Inserts `[iova, iova + size)` → `gpa` under the write lock.
    pub fn insert(&self, iova: u64, size: u64, gpa: u64) {
        if let Ok(mut m) = self.map.write() {
            m.insert(iova, ChMapping { gpa, size });
        }
    }

    /// Translates `iova`: read lock, the last mapping starting at or below
    /// it, end check.
    #[inline]
    pub fn translate(&self, iova: u64) -> Option<u64> {
        let m = self.map.read().ok()?;
        let (&start, mapping) = m.range(..=iova).next_back()?;
        let within = iova - start;
        (within < mapping.size).then_some(mapping.gpa + within)
    }
}

/// vm-memory's IOTLB behind the lock an `Iommu` implementation keeps it in.
#[derive(Debug, Default)]
pub struct IotlbLookup {
    iotlb: RwLock<Iotlb>,
}

impl IotlbLookup {
    /// Inserts `[iova, iova + size)` → `gpa`, read-write.
    pub fn insert(&self, iova: u64, size: u64, gpa: u64) {
        if let Ok(mut t) = self.iotlb.write() {
            let _ = t.set_mapping(
                GuestAddress(iova),
                GuestAddress(gpa),
                size as usize,
                Permissions::ReadWrite,
            );
        }
    }

    /// Translates one byte at `iova` for reading, as `IommuMemory` does:
    /// `Iotlb::lookup` under the read guard, then the first mapped range.
    #[inline]
    pub fn translate(&self, iova: u64) -> Option<u64> {
        let guard = self.iotlb.read().ok()?;
        let mut it = Iotlb::lookup(guard, GuestAddress(iova), 1, Permissions::Read).ok()?;
        it.next().map(|r| r.base.0)
    }
}

/// An unsynchronized flat table: one word per IOVA page from `base`.
#[derive(Debug)]
pub struct FlatTable {
    base: u64,
    entries: Vec<u64>,
}

/// Present and readable, as the flat table's low bits.
const FLAT_READ: u64 = 0b101;

impl FlatTable {
    /// A table of `pages` unmapped pages starting at IOVA `base`.
    pub fn new(base: u64, pages: usize) -> Self {
        Self {
            base,
            entries: vec![0; pages],
        }
    }

    /// Maps the 4 KiB page at `iova` to `gpa` (readable and writable).
    pub fn insert(&mut self, iova: u64, gpa: u64) {
        let i = ((iova - self.base) / PAGE) as usize;
        if let Some(e) = self.entries.get_mut(i) {
            *e = gpa | 0b1101;
        }
    }

    /// Translates `iova` for reading.
    #[inline]
    pub fn translate(&self, iova: u64) -> Option<u64> {
        let i = (iova.wrapping_sub(self.base) / PAGE) as usize;
        let e = *self.entries.get(i)?;
        (e & FLAT_READ == FLAT_READ).then_some((e & !0xfff) | (iova & 0xfff))
    }
}

/// The three baselines, filled with the first `live` pages of the
/// consecutive layout (4 KiB each, scattered GPAs).
pub fn baselines(live: u64) -> (BTreeLookup, IotlbLookup, FlatTable) {
    let bt = BTreeLookup::default();
    let tlb = IotlbLookup::default();
    let mut flat = FlatTable::new(IOVA_BASE, live as usize);
    for i in 0..live {
        let (iova, gpa) = (consecutive_iova(i), scattered_gpa(i));
        bt.insert(iova, PAGE, gpa);
        tlb.insert(iova, PAGE, gpa);
        flat.insert(iova, gpa);
    }
    (bt, tlb, flat)
}
