//! The device: request semantics, feature negotiation, config writes, reset
//! and translation queries.

mod inspect;
pub use inspect::DomainInfo;

use crate::change::{Change, ChangeSink, EndpointState};
use crate::config::{ConfigError, DeviceConfig};
use crate::endpoints::{EndpointSet, RangeIndex};
use crate::mappings::{Mapping, MappingTable};
use crate::reply::Reply;
use crate::translate::{Access, TranslateError, Translation};
use std::collections::BTreeMap;
use virtio_iommu_proto::config::{BYPASS_OFFSET, DomainRange, InputRange};
use virtio_iommu_proto::features::*;
use virtio_iommu_proto::probe::{PropertyWriter, ResvMem, ResvSubtype};
use virtio_iommu_proto::request::{ATTACH_FLAGS_KNOWN, TAIL_LEN, VIRTIO_IOMMU_ATTACH_F_BYPASS};
use virtio_iommu_proto::{
    Attach, ConfigSpace, Detach, FaultReason, FaultRecord, Features, Map, MapFlags, ParseError,
    Request, RequestType, Status, Unmap, parse_request,
};

/// The driver acked feature bits the device did not offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("driver acked feature bits {unoffered:#x} that the device does not offer")]
pub struct FeatureError {
    /// The bits acked but not offered.
    pub unoffered: u64,
}

/// A driver write to the config space that the device refuses; the config
/// space and the device state are left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWriteError {
    /// Only the one `bypass` byte at offset 0x24 is writable (DRV-CFG-1).
    #[error(
        "config write of {len} bytes at offset {offset:#x}: only the bypass byte at 0x24 is writable"
    )]
    ReadOnly {
        /// Offset of the write.
        offset: usize,
        /// Length of the write.
        len: usize,
    },
    /// `bypass` is writable only with `F_BYPASS_CONFIG` negotiated (DRV-CFG-1).
    #[error("bypass written but F_BYPASS_CONFIG is not negotiated")]
    NotNegotiated,
    /// `bypass` only takes 0 or 1 (DRV-CFG-2, DEV-CFG-6).
    #[error("bypass written with {0}; only 0 and 1 are valid")]
    InvalidBypass(u8),
}

/// Whether a domain translates or bypasses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DomainKind {
    Translated,
    Bypass,
}

/// A domain and what its endpoints constrain.
#[derive(Debug)]
struct Domain {
    kind: DomainKind,
    /// Endpoints attached.
    endpoints: u32,
    /// Endpoint ranges of the attached endpoints, counted: their reserved
    /// regions must stay unmapped in this domain.
    ranges: BTreeMap<RangeIndex, u32>,
    /// The reserved regions of those ranges, flattened for MAP's check.
    resv: Vec<ResvMem>,
    mappings: MappingTable,
}

impl Domain {
    fn new(kind: DomainKind) -> Self {
        Domain {
            kind,
            endpoints: 0,
            ranges: BTreeMap::new(),
            resv: Vec::new(),
            mappings: MappingTable::default(),
        }
    }

    fn add_endpoint(&mut self, range: RangeIndex, endpoints: &EndpointSet) {
        self.endpoints += 1;
        let count = self.ranges.entry(range).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.rebuild_resv(endpoints);
        }
    }

    /// Removes one endpoint; true when the domain is now empty.
    fn remove_endpoint(&mut self, range: RangeIndex, endpoints: &EndpointSet) -> bool {
        self.endpoints = self.endpoints.saturating_sub(1);
        if let Some(n) = self.ranges.get_mut(&range) {
            *n -= 1;
            if *n == 0 {
                self.ranges.remove(&range);
                self.rebuild_resv(endpoints);
            }
        }
        self.endpoints == 0
    }

    fn rebuild_resv(&mut self, endpoints: &EndpointSet) {
        self.resv.clear();
        for &r in self.ranges.keys() {
            self.resv.extend_from_slice(endpoints.resv(r));
        }
    }

    fn state(&self, id: u32) -> EndpointState {
        match self.kind {
            DomainKind::Translated => EndpointState::Domain(id),
            DomainKind::Bypass => EndpointState::Bypass,
        }
    }
}

/// A virtio-iommu device instance.
#[derive(Debug)]
pub struct Device {
    cfg: DeviceConfig,
    endpoints: EndpointSet,
    granule_mask: u64,
    input_range: InputRange,
    domain_range: DomainRange,
    offered: Features,
    negotiated: Features,
    bypass: u8,
    /// Endpoint → domain, for attached endpoints only.
    attached: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, Domain>,
    total_mappings: u32,
    /// The PROBE properties area, `probe_size` bytes.
    scratch: Vec<u8>,
}

impl Device {
    /// Builds a device in its initial (system reset) state.
    pub fn new(cfg: DeviceConfig) -> Result<Device, ConfigError> {
        cfg.validate()?;
        let initial = cfg.initial_config_space();
        Ok(Device {
            endpoints: EndpointSet::new(&cfg.endpoints),
            granule_mask: cfg.granule() - 1,
            input_range: initial.input_range,
            domain_range: initial.domain_range,
            offered: cfg.offered_features(),
            negotiated: Features::EMPTY,
            bypass: initial.bypass,
            attached: BTreeMap::new(),
            domains: BTreeMap::new(),
            total_mappings: 0,
            scratch: vec![0; initial.probe_size as usize],
            cfg,
        })
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// Feature bits the device offers.
    pub fn offered_features(&self) -> Features {
        self.offered
    }

    /// Feature bits the driver acked (empty until [`Device::set_features`]).
    pub fn negotiated_features(&self) -> Features {
        self.negotiated
    }

    /// Records the driver's acked features. Acking a bit that was not
    /// offered is refused (the transport then fails FEATURES_OK).
    pub fn set_features(
        &mut self,
        acked: Features,
        sink: &mut impl ChangeSink,
    ) -> Result<(), FeatureError> {
        if !acked.is_subset_of(self.offered) {
            return Err(FeatureError {
                unoffered: acked.0 & !self.offered.0,
            });
        }
        let before = self.unattached_state();
        self.negotiated = acked;
        self.announce_unattached(before, sink);
        Ok(())
    }

    fn negotiated(&self, bit: u32) -> bool {
        self.negotiated.has(bit)
    }

    /// The config space as the driver reads it now.
    pub fn config_space(&self) -> ConfigSpace {
        ConfigSpace {
            bypass: self.bypass,
            ..self.cfg.initial_config_space()
        }
    }

    /// Applies a driver write to the config space. Only a one-byte write of
    /// 0 or 1 to `bypass`, with `F_BYPASS_CONFIG` negotiated, is accepted;
    /// it changes unattached endpoints at once (DEV-OPS-10).
    pub fn write_config(
        &mut self,
        offset: usize,
        data: &[u8],
        sink: &mut impl ChangeSink,
    ) -> Result<(), ConfigWriteError> {
        let [value] = data else {
            return Err(ConfigWriteError::ReadOnly {
                offset,
                len: data.len(),
            });
        };
        if offset != BYPASS_OFFSET {
            return Err(ConfigWriteError::ReadOnly { offset, len: 1 });
        }
        if !self.negotiated(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            return Err(ConfigWriteError::NotNegotiated);
        }
        if *value > 1 {
            return Err(ConfigWriteError::InvalidBypass(*value));
        }
        let before = self.unattached_state();
        self.bypass = *value;
        self.announce_unattached(before, sink);
        Ok(())
    }

    /// Device reset: every endpoint is detached, every domain and mapping
    /// dropped, features forgotten; `bypass` keeps its value (DEV-CFG-4).
    pub fn reset(&mut self, sink: &mut impl ChangeSink) {
        self.reset_to(self.bypass, sink);
    }

    /// System reset: a device reset that also restores `bypass` to its
    /// configured initial value (DEV-CFG-5).
    pub fn system_reset(&mut self, sink: &mut impl ChangeSink) {
        self.reset_to(self.cfg.initial_config_space().bypass, sink);
    }

    fn reset_to(&mut self, bypass: u8, sink: &mut impl ChangeSink) {
        let old_unattached = self.unattached_state();
        let attached = core::mem::take(&mut self.attached);
        let domains = core::mem::take(&mut self.domains);
        self.negotiated = Features::EMPTY;
        self.total_mappings = 0;
        self.bypass = bypass;
        let now = self.unattached_state();
        let old_state = |ep: u32| match attached.get(&ep).and_then(|d| Some((d, domains.get(d)?))) {
            Some((&id, dom)) => dom.state(id),
            None => old_unattached,
        };
        let mut emit = |ep: u32| {
            let from = old_state(ep);
            if from != now {
                sink.change(Change::Endpoint {
                    endpoint: ep,
                    from,
                    to: now,
                });
            }
        };
        if old_unattached == now {
            attached.keys().for_each(|&ep| emit(ep));
        } else {
            self.endpoints.ids().for_each(emit);
        }
        for (id, dom) in domains {
            if dom.kind == DomainKind::Translated {
                sink.change(Change::DomainDestroyed { domain: id });
            }
        }
    }

    /// Announces the whole current state to a sink that starts from an empty
    /// table where every endpoint is blocked (e.g. a table created late).
    pub fn publish_state(&self, sink: &mut impl ChangeSink) {
        for (&id, dom) in &self.domains {
            if dom.kind == DomainKind::Translated {
                sink.change(Change::DomainCreated { domain: id });
                for mapping in dom.mappings.iter() {
                    sink.change(Change::MappingAdded {
                        domain: id,
                        mapping,
                    });
                }
            }
        }
        let mut emit = |ep: u32, to: EndpointState| {
            if to != EndpointState::Blocked {
                sink.change(Change::Endpoint {
                    endpoint: ep,
                    from: EndpointState::Blocked,
                    to,
                });
            }
        };
        if self.unattached_state() == EndpointState::Blocked {
            for (&ep, &d) in &self.attached {
                if let Some(dom) = self.domains.get(&d) {
                    emit(ep, dom.state(d));
                }
            }
        } else {
            for ep in self.endpoints.ids() {
                emit(ep, self.state_of(ep));
            }
        }
    }

    /// Endpoints attached to a domain now.
    pub(crate) fn attached_count(&self) -> usize {
        self.attached.len()
    }

    /// Calls `f(domain, bypasses, endpoints, mappings)` for every domain,
    /// in domain order (for [`crate::state`]).
    pub(crate) fn for_each_domain(&self, mut f: impl FnMut(u32, bool, Vec<u32>, Vec<Mapping>)) {
        let mut members: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (&ep, &d) in &self.attached {
            members.entry(d).or_default().push(ep);
        }
        for (&id, dom) in &self.domains {
            let eps = members.remove(&id).unwrap_or_default();
            f(
                id,
                dom.kind == DomainKind::Bypass,
                eps,
                dom.mappings.iter().collect(),
            );
        }
    }

    /// Sets the negotiated features and `bypass` of a device that has no
    /// domain yet, as a saved state says (for [`crate::state`]).
    pub(crate) fn restore_base(&mut self, negotiated: Features, bypass: u8) -> Result<(), String> {
        if !self.domains.is_empty() || !self.attached.is_empty() {
            return Err("the base record must come before any domain".into());
        }
        if !negotiated.is_subset_of(self.offered) {
            return Err(format!(
                "negotiated features {:#x} were not offered",
                negotiated.0
            ));
        }
        if bypass > 1 {
            return Err(format!("bypass byte {bypass}; only 0 and 1 are valid"));
        }
        self.negotiated = negotiated;
        self.bypass = bypass;
        Ok(())
    }

    /// What unattached endpoints do now (spec 5.13.6, bypass rules).
    fn unattached_state(&self) -> EndpointState {
        let by_config = self.offered.has(VIRTIO_IOMMU_F_BYPASS_CONFIG) && self.bypass == 1;
        if by_config || self.negotiated(VIRTIO_IOMMU_F_BYPASS) {
            EndpointState::Bypass
        } else {
            EndpointState::Blocked
        }
    }

    /// Emits a change for every unattached endpoint if their shared state
    /// moved away from `before`.
    fn announce_unattached(&self, before: EndpointState, sink: &mut impl ChangeSink) {
        let now = self.unattached_state();
        if now == before {
            return;
        }
        for ep in self.endpoints.ids() {
            if !self.attached.contains_key(&ep) {
                sink.change(Change::Endpoint {
                    endpoint: ep,
                    from: before,
                    to: now,
                });
            }
        }
    }

    fn state_of(&self, ep: u32) -> EndpointState {
        match self.attached.get(&ep) {
            Some(&d) => self
                .domains
                .get(&d)
                .map_or(EndpointState::Blocked, |dom| dom.state(d)),
            None => self.unattached_state(),
        }
    }

    /// How an endpoint's accesses are handled now, or `None` if it doesn't exist.
    pub fn endpoint_state(&self, endpoint: u32) -> Option<EndpointState> {
        self.endpoints
            .contains(endpoint)
            .then(|| self.state_of(endpoint))
    }

    /// Number of live domains (bypass domains included).
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Number of live mappings in all domains.
    pub fn mapping_count(&self) -> u32 {
        self.total_mappings
    }

    /// The mappings of a translated domain, if it exists.
    pub fn mappings(&self, domain: u32) -> Option<impl Iterator<Item = Mapping> + '_> {
        self.domains
            .get(&domain)
            .filter(|d| d.kind == DomainKind::Translated)
            .map(|d| d.mappings.iter())
    }

    /// Handles one descriptor chain: `readable` is its device-readable bytes
    /// (gathered in order; at most 72 are needed), `writable_len` the total
    /// size of its device-writable part. The reply says what to write.
    pub fn process(
        &mut self,
        readable: &[u8],
        writable_len: usize,
        sink: &mut impl ChangeSink,
    ) -> Reply<'_> {
        if writable_len < TAIL_LEN {
            return Reply::Unparsed;
        }
        let parsed = parse_request(readable);
        let req_type = match parsed {
            Ok(req) => req.req_type(),
            Err(ParseError::TooShort { req_type, .. }) => req_type,
            Err(ParseError::NoHead { .. } | ParseError::UnknownType(_)) => return Reply::Unparsed,
        };
        if req_type == RequestType::Probe {
            return self.process_probe(parsed, writable_len);
        }
        let status = match parsed {
            Ok(req) => self.handle(&req, sink),
            Err(_) => Status::Inval,
        };
        Reply::Complete {
            req_type,
            status,
            area: &[],
        }
    }

    fn process_probe(
        &mut self,
        parsed: Result<Request, ParseError>,
        writable_len: usize,
    ) -> Reply<'_> {
        let Some(probe_size) = self.cfg.probe_size else {
            return Reply::Unparsed;
        };
        let probe_size = probe_size as usize;
        let area_len = writable_len - TAIL_LEN;
        let status = if area_len < probe_size {
            // AMB-3: no property, INVAL in the last 4 bytes, zeros before it.
            self.scratch[..area_len].fill(0);
            return Reply::Complete {
                req_type: RequestType::Probe,
                status: Status::Inval,
                area: &self.scratch[..area_len],
            };
        } else if let Ok(Request::Probe(p)) = parsed {
            fill_probe(&self.endpoints, p.endpoint, &mut self.scratch)
        } else {
            self.scratch.fill(0);
            Status::Inval
        };
        Reply::Complete {
            req_type: RequestType::Probe,
            status,
            area: &self.scratch[..probe_size],
        }
    }

    /// Applies one parsed request and returns its status. PROBE is answered
    /// here without its properties; [`Device::process`] writes them.
    pub fn handle(&mut self, req: &Request, sink: &mut impl ChangeSink) -> Status {
        match req {
            Request::Attach(a) => self.attach(a, sink),
            Request::Detach(d) => self.detach(d, sink),
            Request::Map(m) => self.map(m, sink),
            Request::Unmap(u) => self.unmap(u, sink),
            Request::Probe(p) => {
                if self.endpoints.contains(p.endpoint) {
                    Status::Ok
                } else {
                    Status::NoEnt
                }
            }
        }
    }

    /// Fills `area` with an endpoint's PROBE properties (zero-padded).
    pub fn probe(&self, endpoint: u32, area: &mut [u8]) -> Status {
        fill_probe(&self.endpoints, endpoint, area)
    }

    fn attach(&mut self, a: &Attach, sink: &mut impl ChangeSink) -> Status {
        if a.reserved != [0; 4] || a.flags & !ATTACH_FLAGS_KNOWN != 0 {
            return Status::Inval;
        }
        let bypass = a.flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        if bypass && !self.negotiated(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            return Status::Inval;
        }
        if !self.domain_range.contains(a.domain) {
            return Status::Range;
        }
        let Some(range) = self.endpoints.lookup(a.endpoint) else {
            return Status::NoEnt;
        };
        let current = self.attached.get(&a.endpoint).copied();
        let kind = if bypass {
            DomainKind::Bypass
        } else {
            DomainKind::Translated
        };
        match self.domains.get(&a.domain) {
            Some(dom) if dom.kind != kind => return Status::Inval,
            Some(_) if current == Some(a.domain) => return Status::Ok,
            Some(dom) => {
                let clash = self
                    .endpoints
                    .resv(range)
                    .iter()
                    .any(|r| dom.mappings.overlaps(r.start, r.end));
                if clash {
                    return Status::Unsupp;
                }
            }
            None => {
                let frees_one = current
                    .and_then(|c| self.domains.get(&c))
                    .is_some_and(|d| d.endpoints == 1);
                let live = self.domains.len() - usize::from(frees_one);
                if live >= self.cfg.limits.max_domains as usize {
                    return Status::NoMem;
                }
            }
        }

        let from = self.state_of(a.endpoint);
        let dom = self.domains.entry(a.domain).or_insert_with(|| {
            if kind == DomainKind::Translated {
                sink.change(Change::DomainCreated { domain: a.domain });
            }
            Domain::new(kind)
        });
        dom.add_endpoint(range, &self.endpoints);
        let to = dom.state(a.domain);
        self.attached.insert(a.endpoint, a.domain);
        if from != to {
            sink.change(Change::Endpoint {
                endpoint: a.endpoint,
                from,
                to,
            });
        }
        if let Some(old) = current {
            self.leave_domain(old, range, sink);
        }
        Status::Ok
    }

    /// Takes one endpoint of `range` out of `domain`, destroying the domain
    /// with its mappings if it was the last one.
    fn leave_domain(&mut self, domain: u32, range: RangeIndex, sink: &mut impl ChangeSink) {
        let Some(dom) = self.domains.get_mut(&domain) else {
            return;
        };
        if !dom.remove_endpoint(range, &self.endpoints) {
            return;
        }
        if let Some(dom) = self.domains.remove(&domain) {
            self.total_mappings = self
                .total_mappings
                .saturating_sub(dom.mappings.len() as u32);
            if dom.kind == DomainKind::Translated {
                sink.change(Change::DomainDestroyed { domain });
            }
        }
    }

    fn detach(&mut self, d: &Detach, sink: &mut impl ChangeSink) -> Status {
        let Some(range) = self.endpoints.lookup(d.endpoint) else {
            return Status::NoEnt;
        };
        if self.attached.get(&d.endpoint) != Some(&d.domain) {
            return Status::Inval;
        }
        let from = self.state_of(d.endpoint);
        self.attached.remove(&d.endpoint);
        let to = self.unattached_state();
        if from != to {
            sink.change(Change::Endpoint {
                endpoint: d.endpoint,
                from,
                to,
            });
        }
        self.leave_domain(d.domain, range, sink);
        Status::Ok
    }

    fn map(&mut self, m: &Map, sink: &mut impl ChangeSink) -> Status {
        if !self.negotiated(VIRTIO_IOMMU_F_MAP_UNMAP) {
            return Status::Unsupp;
        }
        let mmio_refused =
            m.flags.contains(MapFlags::MMIO) && !self.negotiated(VIRTIO_IOMMU_F_MMIO);
        if m.flags.unknown_bits() != 0 || mmio_refused {
            return Status::Inval;
        }
        let Some(dom) = self.domains.get_mut(&m.domain) else {
            return Status::NoEnt;
        };
        if dom.kind == DomainKind::Bypass || m.virt_end < m.virt_start {
            return Status::Inval;
        }
        let misaligned =
            (m.virt_start | m.phys_start | m.virt_end.wrapping_add(1)) & self.granule_mask != 0;
        if misaligned || !self.input_range.contains(m.virt_start, m.virt_end) {
            return Status::Range;
        }
        if m.phys_start
            .checked_add(m.virt_end - m.virt_start)
            .is_none()
        {
            return Status::Range;
        }
        if dom
            .resv
            .iter()
            .any(|r| r.overlaps(m.virt_start, m.virt_end))
            || dom.mappings.overlaps(m.virt_start, m.virt_end)
        {
            return Status::Inval;
        }
        if dom.mappings.len() >= self.cfg.limits.max_mappings_per_domain as usize
            || self.total_mappings >= self.cfg.limits.max_mappings
        {
            return Status::NoMem;
        }
        let mapping = Mapping {
            virt_start: m.virt_start,
            virt_end: m.virt_end,
            phys_start: m.phys_start,
            flags: m.flags,
        };
        let added = Change::MappingAdded {
            domain: m.domain,
            mapping,
        };
        if sink.try_add(added).is_err() {
            return Status::NoMem;
        }
        dom.mappings.insert(mapping);
        self.total_mappings += 1;
        Status::Ok
    }

    fn unmap(&mut self, u: &Unmap, sink: &mut impl ChangeSink) -> Status {
        if !self.negotiated(VIRTIO_IOMMU_F_MAP_UNMAP) {
            return Status::Unsupp;
        }
        let Some(dom) = self.domains.get_mut(&u.domain) else {
            return Status::NoEnt;
        };
        if dom.kind == DomainKind::Bypass || u.virt_end < u.virt_start {
            return Status::Inval;
        }
        let mut removed = 0u32;
        let result = dom.mappings.unmap(u.virt_start, u.virt_end, |mapping| {
            removed += 1;
            sink.change(Change::MappingRemoved {
                domain: u.domain,
                mapping,
            });
        });
        self.total_mappings = self.total_mappings.saturating_sub(removed);
        match result {
            Ok(()) => Status::Ok,
            Err(_) => Status::Range,
        }
    }

    /// What an access by `endpoint` to `iova` reaches now.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        let range = self
            .endpoints
            .lookup(endpoint)
            .ok_or(TranslateError::UnknownEndpoint(endpoint))?;
        let fault = |reason| {
            TranslateError::Fault(FaultRecord {
                reason,
                access: access.fault_flags(),
                endpoint,
                address: Some(iova),
            })
        };
        let identity = Translation {
            gpa: iova,
            iova_last: u64::MAX,
            mmio: false,
        };
        let dom = match self.state_of(endpoint) {
            EndpointState::Blocked => return Err(fault(FaultReason::Domain)),
            EndpointState::Bypass => return Ok(identity),
            EndpointState::Domain(d) => self.domains.get(&d).ok_or(fault(FaultReason::Domain))?,
        };
        if let Some(r) = self.endpoints.resv(range).iter().find(|r| r.contains(iova)) {
            return match r.subtype {
                ResvSubtype::Msi => Ok(Translation {
                    gpa: iova,
                    iova_last: r.end,
                    mmio: true,
                }),
                ResvSubtype::Reserved => Err(fault(FaultReason::Mapping)),
            };
        }
        let m = dom.mappings.find(iova).ok_or(fault(FaultReason::Mapping))?;
        if (access.reads() && !m.flags.contains(MapFlags::READ))
            || (access.writes() && !m.flags.contains(MapFlags::WRITE))
        {
            return Err(fault(FaultReason::Mapping));
        }
        Ok(Translation {
            gpa: m.phys_of(iova),
            iova_last: m.virt_end,
            mmio: m.flags.contains(MapFlags::MMIO),
        })
    }
}

/// Writes an endpoint's properties into `area`, zero-filling the rest.
fn fill_probe(endpoints: &EndpointSet, endpoint: u32, area: &mut [u8]) -> Status {
    let Some(range) = endpoints.lookup(endpoint) else {
        area.fill(0);
        return Status::NoEnt;
    };
    let mut writer = PropertyWriter::new(area);
    for region in endpoints.resv(range) {
        if writer.push_resv_mem(region).is_err() {
            // Config validation sizes probe_size for every endpoint, so this
            // only happens if the caller passed a short area.
            return Status::DevErr;
        }
    }
    Status::Ok
}
