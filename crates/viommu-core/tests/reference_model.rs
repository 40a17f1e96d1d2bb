//! Property test: random request sequences against a brute-force reference
//! model written straight from the spec rules (linear scans, no trees). Both
//! must give identical statuses, and identical translations at probed
//! addresses. A third party, a mirror rebuilt only from the device's change
//! stream, must translate identically too: that is what the shared table
//! relies on.
#![allow(clippy::unwrap_used)]

mod common;

use common::{MSI, MSI_ARM, RESERVED};
use proptest::prelude::*;
use std::collections::HashMap;
use viommu_core::{
    Access, Change, ChangeLog, Device, DeviceConfig, EndpointRange, EndpointState, Limits,
    TranslateError, Translation,
};
use virtio_iommu_proto::config::{BYPASS_OFFSET, DomainRange, InputRange};
use virtio_iommu_proto::probe::{ResvMem, ResvSubtype};
use virtio_iommu_proto::{
    Attach, Detach, FaultReason, FaultRecord, Map, MapFlags, Request, Status, Unmap,
};

const INPUT: InputRange = InputRange {
    start: 0x1000,
    end: 0xffff_ffff_ffff,
};
const DOMAINS: DomainRange = DomainRange { start: 0, end: 15 };
const LIMITS: Limits = Limits {
    max_domains: 4,
    max_mappings_per_domain: 6,
    max_mappings: 10,
};

fn resv_of(ep: u32) -> &'static [ResvMem] {
    match ep {
        0..=3 => &[MSI],
        8 | 9 => &[RESERVED, MSI_ARM],
        _ => &[],
    }
}

fn endpoint_exists(ep: u32) -> bool {
    matches!(ep, 0..=3 | 8 | 9 | 100)
}

fn config(page_size_mask: u64) -> DeviceConfig {
    let range = |first, last| EndpointRange {
        first,
        last,
        resv: resv_of(first).to_vec(),
    };
    DeviceConfig {
        endpoints: vec![range(0, 3), range(8, 9), range(100, 100)],
        page_size_mask,
        input_range: Some(INPUT),
        domain_range: Some(DOMAINS),
        probe_size: Some(64),
        mmio: false,
        bypass_config: true,
        legacy_bypass: false,
        initial_bypass: false,
        limits: LIMITS,
    }
}

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

/// The reference: everything by linear scan, rules in spec order.
#[derive(Clone, Debug)]
struct Reference {
    granule: u64,
    bypass: u8,
    domains: HashMap<u32, RefDomain>,
}

impl Reference {
    fn attached_to(&self, ep: u32) -> Option<u32> {
        self.domains
            .iter()
            .find(|(_, d)| d.eps.contains(&ep))
            .map(|(&id, _)| id)
    }

    fn total(&self) -> usize {
        self.domains.values().map(|d| d.maps.len()).sum()
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
            let freed = current.is_some_and(|c| self.domains[&c].eps.len() == 1);
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
        let d = self.domains.get_mut(&domain).unwrap();
        d.eps.retain(|&e| e != ep);
        if d.eps.is_empty() {
            self.domains.remove(&domain);
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
        let total = self.total();
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

    fn handle(&mut self, req: &Request) -> Status {
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

    fn translate(&self, ep: u32, iova: u64, access: Access) -> Result<Translation, TranslateError> {
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
        let Some(d) = self.attached_to(ep).map(|id| &self.domains[&id]) else {
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

/// A table rebuilt from nothing but the change stream.
#[derive(Default)]
struct Mirror {
    endpoints: HashMap<u32, EndpointState>,
    domains: HashMap<u32, Vec<viommu_core::Mapping>>,
}

impl Mirror {
    fn state(&self, ep: u32) -> EndpointState {
        self.endpoints
            .get(&ep)
            .copied()
            .unwrap_or(EndpointState::Blocked)
    }

    fn apply(&mut self, c: Change) {
        match c {
            Change::DomainCreated { domain } => {
                assert!(
                    self.domains.insert(domain, vec![]).is_none(),
                    "domain created twice"
                );
            }
            Change::Endpoint { endpoint, from, to } => {
                assert_eq!(
                    self.state(endpoint),
                    from,
                    "stale `from` for endpoint {endpoint}"
                );
                assert_ne!(from, to, "no-op endpoint change");
                if let EndpointState::Domain(d) = to {
                    assert!(
                        self.domains.contains_key(&d),
                        "endpoint points at a missing domain"
                    );
                }
                self.endpoints.insert(endpoint, to);
            }
            Change::MappingAdded { domain, mapping } => {
                self.domains.get_mut(&domain).unwrap().push(mapping)
            }
            Change::MappingRemoved { domain, mapping } => {
                let maps = self.domains.get_mut(&domain).unwrap();
                let before = maps.len();
                maps.retain(|m| *m != mapping);
                assert_eq!(
                    maps.len() + 1,
                    before,
                    "removed a mapping that was not there"
                );
            }
            Change::DomainDestroyed { domain } => {
                assert!(self.domains.remove(&domain).is_some());
                assert!(
                    !self
                        .endpoints
                        .values()
                        .any(|s| *s == EndpointState::Domain(domain)),
                    "domain destroyed while an endpoint still uses it"
                );
            }
        }
    }

    /// Whether the mirror gives an access the same guest-physical address
    /// (or refusal) as the device. MSI windows are interrupts, not DMA, and
    /// the mirror does not model them.
    fn agrees(
        &self,
        ep: u32,
        iova: u64,
        access: Access,
        device: &Result<Translation, TranslateError>,
    ) -> bool {
        if resv_of(ep).iter().any(|r| r.contains(iova)) {
            return true;
        }
        let got = match self.state(ep) {
            EndpointState::Blocked => None,
            EndpointState::Bypass => Some(iova),
            EndpointState::Domain(d) => self.domains[&d]
                .iter()
                .find(|m| m.virt_start <= iova && iova <= m.virt_end)
                .filter(|m| {
                    (!access.reads() || m.flags.contains(MapFlags::READ))
                        && (!access.writes() || m.flags.contains(MapFlags::WRITE))
                })
                .map(|m| m.phys_of(iova)),
        };
        got == device.as_ref().ok().map(|t| t.gpa)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Req(Request),
    Bypass(u8),
    Reset,
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..48).prop_map(|p| p * 0x1000),
        3 => (0u64..48).prop_map(|p| p * 0x1000 + 0xfff),
        1 => 0u64..0x30000,
        1 => prop::sample::select(vec![
            0, u64::MAX, 0xfff, 0xfee0_0000, 0xfeef_ffff, 0x1000_0000, 0x1000_ffff,
            0x0800_0000, 0xffff_ffff_ffff, 0x1_0000_0000_0000, 0xffff_ffff_ffff_f000,
        ]),
    ]
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        3 => (addr(), 1u64..6).prop_map(|(s, pages)| (s, s.wrapping_add(pages * 0x1000 - 1))),
        1 => (addr(), addr()),
    ]
}

fn domain() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0u32..6, 1 => Just(15u32), 1 => Just(16u32), 1 => Just(u32::MAX)]
}

fn endpoint() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![0u32, 1, 2, 3, 8, 9, 100, 4, 5000, u32::MAX])
}

fn op() -> impl Strategy<Value = Op> {
    let attach = (
        domain(),
        endpoint(),
        prop_oneof![8 => Just(0u32), 2 => Just(1u32), 1 => Just(2u32)],
        prop_oneof![9 => Just([0u8; 4]), 1 => Just([0, 0, 0, 1])],
    )
        .prop_map(|(domain, endpoint, flags, reserved)| {
            Request::Attach(Attach {
                domain,
                endpoint,
                flags,
                reserved,
            })
        });
    let detach = (domain(), endpoint())
        .prop_map(|(domain, endpoint)| Request::Detach(Detach { domain, endpoint }));
    let map = (domain(), range(), addr(), prop_oneof![6 => Just(3u32), 1 => Just(1u32), 1 => Just(2u32), 1 => Just(0u32), 1 => Just(4u32), 1 => Just(8u32)])
        .prop_map(|(domain, (virt_start, virt_end), phys_start, flags)| Request::Map(Map { domain, virt_start, virt_end, phys_start, flags: MapFlags(flags) }));
    let unmap = (domain(), range(), any::<[u8; 4]>()).prop_map(
        |(domain, (virt_start, virt_end), reserved)| {
            Request::Unmap(Unmap {
                domain,
                virt_start,
                virt_end,
                reserved,
            })
        },
    );
    prop_oneof![
        4 => attach.prop_map(Op::Req),
        2 => detach.prop_map(Op::Req),
        8 => map.prop_map(Op::Req),
        4 => unmap.prop_map(Op::Req),
        1 => prop_oneof![Just(0u8), Just(1u8), Just(2u8)].prop_map(Op::Bypass),
        1 => Just(Op::Reset),
    ]
}

fn probes(ops: &[Op]) -> Vec<u64> {
    let mut v = vec![
        0,
        0x1000,
        0xfee0_0000,
        0x1000_0000,
        0x0800_0000,
        u64::MAX,
        0xffff_ffff_ffff,
    ];
    for op in ops {
        match op {
            Op::Req(Request::Map(m)) => v.extend([
                m.virt_start,
                m.virt_end,
                m.virt_start.wrapping_sub(1),
                m.virt_end.wrapping_add(1),
            ]),
            Op::Req(Request::Unmap(u)) => v.extend([u.virt_start, u.virt_end]),
            _ => {}
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn run(page_size_mask: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut dev = Device::new(config(page_size_mask)).unwrap();
    let mut log = ChangeLog::default();
    dev.set_features(dev.offered_features(), &mut log).unwrap();
    let mut reference = Reference {
        granule: page_size_mask & page_size_mask.wrapping_neg(),
        bypass: 0,
        domains: HashMap::new(),
    };
    let mut mirror = Mirror::default();
    let addrs = probes(&ops);
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Req(req) => {
                let writable = if matches!(req, Request::Probe(_)) {
                    68
                } else {
                    4
                };
                let got = dev.process(&req.encode(), writable, &mut log).status();
                let want = reference.handle(req);
                prop_assert_eq!(got, Some(want), "op {} {:?}", i, req);
            }
            Op::Bypass(v) => {
                let accepted = dev.write_config(BYPASS_OFFSET, &[*v], &mut log).is_ok();
                prop_assert_eq!(accepted, *v <= 1);
                if accepted {
                    reference.bypass = *v;
                }
            }
            Op::Reset => {
                dev.reset(&mut log);
                dev.set_features(dev.offered_features(), &mut log).unwrap();
                reference.domains.clear();
            }
        }
        for c in log.take() {
            mirror.apply(c);
        }
        prop_assert_eq!(dev.mapping_count() as usize, reference.total());
        prop_assert_eq!(dev.domain_count(), reference.domains.len());
        for ep in [0u32, 1, 3, 8, 100, 4] {
            for &iova in &addrs {
                for access in [Access::Read, Access::Write] {
                    let got = dev.translate(ep, iova, access);
                    let want = reference.translate(ep, iova, access);
                    prop_assert_eq!(
                        got,
                        want,
                        "op {} ep {} iova {:#x} {:?}",
                        i,
                        ep,
                        iova,
                        access
                    );
                    prop_assert!(
                        mirror.agrees(ep, iova, access, &got),
                        "mirror disagrees: op {} ep {} iova {:#x}",
                        i,
                        ep,
                        iova
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 10_000,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn model_matches_reference(mask in prop::sample::select(vec![0x1000u64, 1, 0x4020_1000]), ops in prop::collection::vec(op(), 1..40)) {
        run(mask, ops)?;
    }
}
