//! Answers to the admin socket's commands ([`crate::admin_proto`]), read
//! from the daemon's live state. Every answer may wait for the device and
//! table locks (a grace period holds them), so the control plane runs
//! these on its blocking pool, never on its event loop.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use viommu_core::EndpointState;
use virtio_iommu_proto::MapFlags;

use crate::admin_proto::{
    AdminReply, AdminRequest, BackendRow, Backends, DEFAULT_PAGE, DeviceStatus, DomainRow, Dump,
    EndpointRow, Endpoints, FaultTotals, Faults, MAX_PAGE, MappingRow, Mappings, RequestTotals,
    Status, TableStatus,
};
use crate::backend::IommuBackend;
use crate::backend_socket::{BackendBook, FaultRoute};
use crate::shm_table::{SharedWriter, lock};
use crate::telemetry::Telemetry;

/// What the control plane can see of the running daemon.
#[derive(Clone)]
pub struct DaemonView {
    /// The daemon's counters.
    pub telemetry: Arc<Telemetry>,
    /// The device of the current VMM connection.
    pub route: FaultRoute,
    /// The shared table, if any.
    pub writer: Option<SharedWriter>,
    /// Backends served, if the backend socket is on.
    pub book: Option<BackendBook>,
}

/// Why a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No VMM is connected, so there is no device to look at.
    #[error("no VMM is connected: there is no device state")]
    NoDevice,
    /// The domain does not exist or has no mappings (bypass).
    #[error("domain {0} does not exist or is a bypass domain")]
    NoSuchDomain(u32),
    /// A lock was poisoned by an earlier panic.
    #[error("device state unavailable: {0}")]
    Device(#[source] std::io::Error),
    /// The log filter was refused.
    #[error(transparent)]
    LogFilter(#[from] vhost_user_process::logging::LoggingError),
    /// A reply could not be encoded.
    #[error("cannot encode the reply: {0}")]
    Encode(#[from] serde_json::Error),
}

fn state_name(s: EndpointState) -> String {
    match s {
        EndpointState::Bypass => "bypass".into(),
        EndpointState::Blocked => "blocked".into(),
        EndpointState::Domain(d) => format!("domain {d}"),
    }
}

fn page(limit: Option<usize>) -> usize {
    limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE)
}

fn flags(f: MapFlags) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (MapFlags::READ, 'r'),
        (MapFlags::WRITE, 'w'),
        (MapFlags::MMIO, 'm'),
    ] {
        if f.contains(bit) {
            s.push(c);
        }
    }
    s
}

impl DaemonView {
    /// Carries out one command; errors become `{"ok": false}` replies.
    pub(crate) fn answer(&self, request: AdminRequest) -> AdminReply {
        match self.carry_out(request) {
            Ok(data) => AdminReply {
                ok: true,
                data: Some(data),
                error: None,
            },
            Err(e) => AdminReply {
                ok: false,
                data: None,
                error: Some(vhost_user_process::report(&e)),
            },
        }
    }

    fn carry_out(&self, request: AdminRequest) -> Result<serde_json::Value, AdminError> {
        Ok(match request {
            AdminRequest::Status => serde_json::to_value(self.status())?,
            AdminRequest::Endpoints { from, limit } => {
                serde_json::to_value(self.endpoints(from, page(limit))?)?
            }
            AdminRequest::Domains => serde_json::to_value(self.domains()?)?,
            AdminRequest::Mappings {
                domain,
                from,
                limit,
            } => serde_json::to_value(self.mappings(domain, from, page(limit))?)?,
            AdminRequest::Backends => serde_json::to_value(self.backends())?,
            AdminRequest::Faults => serde_json::to_value(self.faults())?,
            AdminRequest::LogLevel { filter } => {
                vhost_user_process::logging::set_filter(&filter)?;
                tracing::info!(%filter, "log filter changed through the admin socket");
                serde_json::Value::Null
            }
            AdminRequest::Dump => serde_json::to_value(self.dump())?,
        })
    }

    fn device(&self) -> Result<IommuBackend, AdminError> {
        self.route.device().ok_or(AdminError::NoDevice)
    }

    /// `status`.
    pub(crate) fn status(&self) -> Status {
        let t = &self.telemetry;
        let device = self.route.device();
        let current_faults = device.as_ref().map(|d| d.fault_stats()).unwrap_or_default();
        let faults = t.fault_totals(current_faults);
        let r = &t.requests;
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: t.started.elapsed().as_secs(),
            vmm_connected: device.is_some(),
            vmm_connections: t.vmm_connections.load(Relaxed),
            device: device.and_then(|d| {
                d.inspect(|dev| DeviceStatus {
                    features: dev.negotiated_features().0,
                    endpoints: dev.endpoint_count(),
                    attached: dev.endpoints_attached(),
                    unattached: state_name(dev.unattached()),
                    domains: dev.domain_count(),
                    mappings: u64::from(dev.mapping_count()),
                })
                .ok()
            }),
            table: self.writer.as_ref().map(|w| {
                let w = lock(w);
                let st = w.stats();
                let node = iotlb_shm::layout::NODE_BYTES;
                TableStatus {
                    bytes_used: w.shared_bytes(),
                    bytes_free: w.geometry().max_nodes().saturating_sub(st.nodes_in_use) * node,
                    grace_periods: st.grace_periods,
                    stalls: st.stalls,
                    kills: st.kills,
                    kill_failures: st.kill_failures,
                    readers: w.readers().len(),
                }
            }),
            backends_connected: self.book.as_ref().map_or(0, BackendBook::connected),
            requests: RequestTotals {
                answered: r.total(),
                failed: r.failed(),
                unparsed: r.unparsed.get(),
                malformed: r.malformed.get(),
            },
            faults: FaultTotals {
                reported: t.recent_faults().0,
                delivered: faults.delivered,
                dropped_full: faults.dropped_full,
                dropped_buffer: faults.dropped_buffer,
            },
            lost_kicks: t.lost_kicks.load(Relaxed),
            log_filter: vhost_user_process::logging::current_filter(),
        }
    }

    fn endpoints(&self, from: u32, limit: usize) -> Result<Endpoints, AdminError> {
        self.device()?
            .inspect(|d| {
                let mut attached: Vec<EndpointRow> = d
                    .attached_endpoints(from)
                    .take(limit + 1)
                    .map(|(endpoint, domain)| EndpointRow { endpoint, domain })
                    .collect();
                let next = (attached.len() > limit).then(|| attached[limit].endpoint);
                attached.truncate(limit);
                Endpoints {
                    total: d.endpoint_count(),
                    unattached: state_name(d.unattached()),
                    attached,
                    next,
                }
            })
            .map_err(AdminError::Device)
    }

    fn domains(&self) -> Result<Vec<DomainRow>, AdminError> {
        self.device()?
            .inspect(|d| {
                d.domains()
                    .map(|i| DomainRow {
                        domain: i.id,
                        bypass: i.bypass,
                        endpoints: i.endpoints,
                        mappings: i.mappings,
                    })
                    .collect()
            })
            .map_err(AdminError::Device)
    }

    fn mappings(&self, domain: u32, from: u64, limit: usize) -> Result<Mappings, AdminError> {
        let rows = self
            .device()?
            .inspect(|d| {
                d.mappings_from(domain, from).map(|it| {
                    it.take(limit + 1)
                        .map(|m| MappingRow {
                            iova_start: m.virt_start,
                            iova_end: m.virt_end,
                            gpa: m.phys_start,
                            flags: flags(m.flags),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .map_err(AdminError::Device)?;
        let mut mappings = rows.ok_or(AdminError::NoSuchDomain(domain))?;
        let next = (mappings.len() > limit).then(|| mappings[limit].iova_start);
        mappings.truncate(limit);
        Ok(Mappings {
            domain,
            mappings,
            next,
        })
    }

    fn backends(&self) -> Backends {
        let entries = self
            .book
            .as_ref()
            .map(BackendBook::entries)
            .unwrap_or_default();
        let Some(writer) = &self.writer else {
            return Backends::default();
        };
        let w = lock(writer);
        let readers = w.readers();
        let backends = entries
            .into_iter()
            .map(|(id, e)| {
                let reader = readers
                    .position(iotlb_shm::ReaderId(id))
                    .and_then(|i| readers.get(i));
                BackendRow {
                    reader: id,
                    pid: e.pid,
                    uid: e.uid,
                    slots: e.slots,
                    slots_in_use: reader.map_or(0, |r| r.slots.slots_in_use()),
                    pins: e.pins,
                    pins_in_use: reader.map_or(0, |r| r.slots.pins_in_use()),
                    connected: e.connected,
                    state: reader.map_or("released".into(), |r| {
                        format!("{:?}", r.state()).to_lowercase()
                    }),
                    kill: reader.map_or("none".into(), |r| {
                        format!("{:?}", r.kill_state()).to_lowercase()
                    }),
                }
            })
            .collect();
        Backends {
            stalls: w.stats().stalls,
            backends,
        }
    }

    fn faults(&self) -> Faults {
        let status = self.status();
        Faults {
            totals: status.faults,
            recent: self.telemetry.recent_faults().1,
        }
    }

    fn dump(&self) -> Dump {
        let endpoints = self.endpoints(0, usize::MAX - 1).unwrap_or_default();
        let domains = self.domains().unwrap_or_default();
        let mappings = domains
            .iter()
            .filter(|d| !d.bypass)
            .filter_map(|d| self.mappings(d.domain, 0, usize::MAX - 1).ok())
            .collect();
        Dump {
            status: self.status(),
            endpoints,
            domains,
            mappings,
            backends: self.backends(),
            faults: self.faults(),
            request_latency: self.telemetry.requests.latency.snapshot(),
            grace_duration: self.telemetry.grace.snapshot(),
        }
    }
}
