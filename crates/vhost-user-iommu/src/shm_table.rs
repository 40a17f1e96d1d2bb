//! The shared table as the daemon's publisher: every change of the device
//! model is mirrored into an `iotlb_shm::TableWriter` that co-located
//! backends read.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use iotlb_shm::{
    EndpointTarget, Geometry, Perms, StallPolicy, TableWriter, WriterConfig, WriterError,
};
use viommu_core::{Change, Device, DeviceConfig, EndpointState};
use virtio_iommu_proto::MapFlags;

use crate::backend_ledger::Ledger;
use crate::iotlb_msg::{AckWait, Invalidation, Subscribers};
use crate::publish::{GraceWait, Publish, PublishError, Publishing, TablePublisher};
use crate::settings::TableSettings;

/// The table, shared by the request path and the backend socket.
pub type SharedWriter = Arc<Mutex<TableWriter>>;

/// Locks the writer; a panic elsewhere cannot leave the table half-written
/// (each writer call is all-or-nothing), so a poisoned lock is taken over.
pub fn lock(writer: &SharedWriter) -> MutexGuard<'_, TableWriter> {
    writer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Most endpoint words the table will hold (8 bytes each).
pub const MAX_TABLE_ENDPOINTS: u64 = 1 << 24;

/// Creates the table for a device configuration; `handover`: it outlives
/// the daemon ([`iotlb_shm::WriterConfig::handover`]).
pub fn create(
    device: &DeviceConfig,
    t: &TableSettings,
    handover: bool,
) -> Result<TableWriter, String> {
    let first = device.endpoints.iter().map(|r| r.first).min().unwrap_or(0);
    let last = device.endpoints.iter().map(|r| r.last).max().unwrap_or(0);
    let count = u64::from(last) - u64::from(first) + 1;
    if count > MAX_TABLE_ENDPOINTS {
        return Err(format!(
            "endpoint IDs {first:#x}-{last:#x} span {count} words; the table holds at most {MAX_TABLE_ENDPOINTS}"
        ));
    }
    let input_end = device.input_range.map_or(u64::MAX, |r| r.end);
    let input_bits = (64 - input_end.leading_zeros()).max(12);
    let segment_nodes = 512u32; // 2 MiB per segment
    let geometry = Geometry {
        endpoint_base: first,
        endpoint_count: count as u32,
        input_bits,
        segment_nodes,
        max_segments: (t.max_mib / 2).max(1),
    };
    let config = WriterConfig {
        geometry,
        stall: StallPolicy {
            warn_after: t.stall_warn,
            kill_after: t.stall_kill,
        },
        reserved_roots: device
            .limits
            .max_domains
            .min((geometry.max_nodes() / 2) as u32),
        handover,
    };
    TableWriter::new(&config).map_err(|e| vhost_user_process::report_line(&e))
}

/// Mirrors the device model into the shared table, and tells message-mode
/// backends what each revocation took away.
pub struct ShmPublisher {
    writer: SharedWriter,
    subscribers: Option<Subscribers>,
    invalidations: Vec<Invalidation>,
    /// Where grace periods are timed, if anywhere.
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// The backends of a previous daemon, waited for after grace periods.
    ledger: Option<Arc<Ledger>>,
}

impl ShmPublisher {
    /// Publishes into `writer`; invalidations go to `subscribers`.
    pub fn new(writer: SharedWriter, subscribers: Option<Subscribers>) -> Self {
        Self {
            writer,
            subscribers,
            invalidations: Vec::new(),
            telemetry: None,
            ledger: None,
        }
    }

    /// Makes revocations wait, after their grace period, for the backends
    /// of a previous daemon that `ledger` knows of
    /// ([`crate::backend_ledger`]).
    pub fn waiting_for_previous(mut self, ledger: Arc<Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Times every grace period into `telemetry` (two clock reads per
    /// grace period).
    pub fn timed(mut self, telemetry: Arc<crate::telemetry::Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    fn send_invalidations(&mut self) -> Option<AckWait> {
        // Cleared, not taken: the list keeps its capacity for the next batch.
        let subs = self.subscribers.as_ref()?;
        let wait = (!self.invalidations.is_empty() && !subs.is_empty())
            .then(|| subs.invalidate(&self.invalidations));
        self.invalidations.clear();
        wait
    }
}

fn target(state: EndpointState) -> EndpointTarget {
    match state {
        EndpointState::Blocked => EndpointTarget::Blocked,
        EndpointState::Bypass => EndpointTarget::Bypass,
        EndpointState::Domain(d) => EndpointTarget::Domain(d),
    }
}

/// What a narrowing change takes away, for message-mode backends (only
/// recorded when there may be some).
fn record_invalidation(list: &mut Vec<Invalidation>, subscribed: bool, change: &Change) {
    if !subscribed || !change.requires_grace_period() {
        return;
    }
    let inv = match *change {
        Change::MappingRemoved { mapping, .. } => Invalidation {
            first: mapping.virt_start,
            last: mapping.virt_end,
            ..Invalidation::ALL
        },
        Change::Endpoint { endpoint, .. } => Invalidation {
            endpoint,
            ..Invalidation::ALL
        },
        _ => Invalidation::ALL,
    };
    list.push(inv);
}

/// Mirrors one change into the locked table.
fn apply(w: &mut TableWriter, change: &Change) -> Result<(), PublishError> {
    let result: Result<(), WriterError> = match *change {
        Change::DomainCreated { domain } => w.create_domain(domain),
        Change::Endpoint { endpoint, to, .. } => w.set_endpoint(endpoint, target(to)),
        Change::MappingAdded { domain, mapping } => w.map(
            domain,
            mapping.virt_start,
            mapping.virt_end,
            mapping.phys_start,
            Perms {
                read: mapping.flags.contains(MapFlags::READ),
                write: mapping.flags.contains(MapFlags::WRITE),
                mmio: mapping.flags.contains(MapFlags::MMIO),
            },
        ),
        Change::MappingRemoved { domain, mapping } => {
            w.unmap(domain, mapping.virt_start, mapping.virt_end)
        }
        Change::DomainDestroyed { domain } => w.destroy_domain(domain),
    };
    if let (Err(_), Change::Endpoint { endpoint, .. }) = (&result, change) {
        // Fail closed: an endpoint the table cannot point at its domain
        // must not keep its previous (possibly wider) access.
        let _ = w.set_endpoint(*endpoint, EndpointTarget::Blocked);
    }
    result.map_err(|e| PublishError {
        change: *change,
        source: Box::new(e),
    })
}

/// The table locked for one batch of changes.
struct Locked<'a> {
    writer: &'a mut TableWriter,
    ledger: Option<&'a Ledger>,
    invalidations: &'a mut Vec<Invalidation>,
    subscribed: bool,
}

impl Publish for Locked<'_> {
    fn publish(&mut self, change: &Change) -> Result<(), PublishError> {
        record_invalidation(self.invalidations, self.subscribed, change);
        apply(self.writer, change)
    }
    fn needs_grace(&self) -> bool {
        self.writer.needs_grace() || !self.invalidations.is_empty()
    }
    fn revocations_wait(&self) -> bool {
        self.ledger.is_some_and(|l| l.pending_with(self.writer))
    }
}

impl Publish for ShmPublisher {
    fn publish(&mut self, change: &Change) -> Result<(), PublishError> {
        record_invalidation(&mut self.invalidations, self.subscribers.is_some(), change);
        apply(&mut lock(&self.writer), change)
    }
    fn needs_grace(&self) -> bool {
        lock(&self.writer).needs_grace() || !self.invalidations.is_empty()
    }
    fn revocations_wait(&self) -> bool {
        self.ledger
            .as_ref()
            .is_some_and(|l| l.pending(&self.writer))
    }
}

impl TablePublisher for ShmPublisher {
    fn batch(&mut self, f: &mut dyn FnMut(&mut dyn Publish)) {
        let mut writer = lock(&self.writer);
        f(&mut Locked {
            writer: &mut writer,
            ledger: self.ledger.as_deref(),
            invalidations: &mut self.invalidations,
            subscribed: self.subscribers.is_some(),
        });
    }

    fn as_publish(&mut self) -> &mut dyn Publish {
        self
    }

    fn synchronize(&mut self) -> GraceWait {
        let acks = self.send_invalidations();
        let report = {
            let mut w = lock(&self.writer);
            match &self.telemetry {
                Some(t) if w.needs_grace() => {
                    let started = std::time::Instant::now();
                    let report = w.synchronize();
                    let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    t.grace.observe_shared(ns);
                    report
                }
                _ => w.synchronize(),
            }
        };
        if report.reaped > 0 {
            tracing::warn!(
                released = report.reaped,
                "a grace period released backends that were gone (exited with their I/O drained)"
            );
        }
        let previous = self
            .ledger
            .as_ref()
            .filter(|l| l.pending(&self.writer))
            .map(|l| (Arc::clone(l), self.writer.clone()));
        GraceWait { acks, previous }
    }

    /// Empties the table and publishes the state of a fresh `device`.
    /// Returns once no backend can use the previous device's state.
    fn start(&mut self, device: &Device) {
        lock(&self.writer).reset();
        self.invalidations = vec![Invalidation::ALL];
        // No device lock is held yet: wait right here.
        // Not the previous daemon's backends: a fresh device takes nothing
        // away that the guest could have seen completed.
        GraceWait {
            acks: self.send_invalidations(),
            previous: None,
        }
        .wait();
        let mut sink = Publishing::new(self);
        device.publish_state(&mut sink);
        if sink.refused > 0 {
            tracing::error!(
                refused = sink.refused,
                "the shared table cannot hold the device's initial state"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotlb_shm::{Access, FaultKind, SlotFile, TableReader};
    use std::os::fd::AsFd;

    #[test]
    fn an_endpoint_the_table_cannot_attach_is_blocked_not_left_in_bypass() {
        let geometry = Geometry {
            segment_nodes: 1,
            max_segments: 1,
            ..Geometry::default()
        };
        let w = TableWriter::new(&WriterConfig {
            geometry,
            ..WriterConfig::default()
        })
        .unwrap();
        let writer: SharedWriter = Arc::new(Mutex::new(w));
        let mut p = ShmPublisher::new(writer.clone(), None);
        let bypass = Change::Endpoint {
            endpoint: 5,
            from: EndpointState::Blocked,
            to: EndpointState::Bypass,
        };
        p.publish(&bypass).unwrap();
        p.publish(&Change::DomainCreated { domain: 1 }).unwrap(); // takes the only node
        assert!(
            p.publish(&Change::DomainCreated { domain: 2 }).is_err(),
            "table full"
        );
        let attach = Change::Endpoint {
            endpoint: 5,
            from: EndpointState::Bypass,
            to: EndpointState::Domain(2),
        };
        assert!(p.publish(&attach).is_err());
        let slot_fd = iotlb_shm::slots::create(1, 1).unwrap();
        let (table, arena) = {
            let mut w = lock(&writer);
            w.register_reader(slot_fd.as_fd(), std::process::id() as i32)
                .unwrap();
            (
                w.table_fd().try_clone_to_owned().unwrap(),
                w.arena_fd().try_clone_to_owned().unwrap(),
            )
        };
        let reader = TableReader::open(table.as_fd(), arena.as_fd()).unwrap();
        let mut slot = SlotFile::open(slot_fd.as_fd())
            .unwrap()
            .claim_slot()
            .unwrap();
        let s = slot.enter(&reader);
        assert_eq!(
            s.translate_one(5, 0x1000, Access::READ).map_err(|f| f.kind),
            Err(FaultKind::Domain)
        );
    }
}
