//! The in-process request-path baseline: a trace's requests, encoded as the
//! bytes a Linux driver places in the request queue, handed straight to
//! [`viommu_core::Device::process`] in batches, with every change mirrored
//! into `RwLock<BTreeMap>`s (the structure of [`crate::model_baselines`]).
//!
//! No virtqueue, no socket, no daemon: the difference between this and the
//! daemon's figures is the cost of the queue and the process boundary.

use crate::model_baselines::ChMapping;
use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};
use viommu_core::{Change, ChangeSink, Device, DeviceConfig, EndpointState};
use virtio_iommu_proto::request::TAIL_LEN;
use virtio_iommu_proto::{Features, Request, RequestType};

/// The translation state as cloud-hypervisor keeps it: locked `BTreeMap`s.
#[derive(Debug, Default)]
pub struct LockedTables {
    /// Endpoint → what its accesses reach.
    pub endpoints: RwLock<BTreeMap<u32, EndpointState>>,
    /// Domain → IOVA → mapping.
    pub domains: RwLock<BTreeMap<u32, BTreeMap<u64, ChMapping>>>,
}

impl LockedTables {
    /// Mappings in all domains.
    pub fn mapping_count(&self) -> usize {
        self.domains
            .read()
            .map(|d| d.values().map(BTreeMap::len).sum())
            .unwrap_or(0)
    }
}

/// Applies each change to [`LockedTables`], one write lock per change.
#[derive(Debug)]
pub struct LockedSink<'a>(pub &'a LockedTables);

impl ChangeSink for LockedSink<'_> {
    fn change(&mut self, change: Change) {
        match change {
            Change::Endpoint { endpoint, to, .. } => {
                if let Ok(mut e) = self.0.endpoints.write() {
                    e.insert(endpoint, to);
                }
            }
            Change::DomainCreated { domain } => {
                if let Ok(mut d) = self.0.domains.write() {
                    d.entry(domain).or_default();
                }
            }
            Change::DomainDestroyed { domain } => {
                if let Ok(mut d) = self.0.domains.write() {
                    d.remove(&domain);
                }
            }
            Change::MappingAdded { domain, mapping } => {
                if let Ok(mut d) = self.0.domains.write() {
                    d.entry(domain).or_default().insert(
                        mapping.virt_start,
                        ChMapping {
                            gpa: mapping.phys_start,
                            size: mapping.virt_end - mapping.virt_start + 1,
                        },
                    );
                }
            }
            Change::MappingRemoved { domain, mapping } => {
                if let Ok(mut d) = self.0.domains.write() {
                    if let Some(m) = d.get_mut(&domain) {
                        m.remove(&mapping.virt_start);
                    }
                }
            }
        }
    }
}

/// One request as the driver posts it.
#[derive(Clone, Debug)]
pub struct Posted {
    /// The device-readable bytes.
    pub readable: Vec<u8>,
    /// The writable buffer (4 bytes; PROBE: `probe_size` + 4).
    pub writable: Vec<u8>,
}

/// Encodes `requests` the way the Linux driver posts them.
pub fn encode(requests: &[Request], probe_size: u32) -> Vec<Posted> {
    requests
        .iter()
        .map(|r| {
            let wlen = match r.req_type() {
                RequestType::Probe => probe_size as usize + TAIL_LEN,
                _ => TAIL_LEN,
            };
            Posted {
                readable: r.encode(),
                writable: vec![0; wlen],
            }
        })
        .collect()
}

/// What an in-process replay measured.
#[derive(Clone, Debug, PartialEq)]
pub struct InProcessReport {
    /// Requests processed.
    pub requests: u64,
    /// Requests per batch.
    pub batch: usize,
    /// Wall time of the whole replay.
    pub elapsed: Duration,
    /// Median batch time.
    pub p50: Duration,
    /// Requests whose status was not OK (or whose used length was wrong).
    pub non_ok: u64,
    /// Mappings left in the locked tables at the end.
    pub mappings_left: usize,
}

impl InProcessReport {
    /// Requests per second.
    pub fn requests_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.requests as f64 / s
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for InProcessReport {
    /// The lines of `viommu-frontend replay` that `request-path.sh` reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "requests: {} in batches of up to {} ({:.3} s)",
            self.requests,
            self.batch,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "throughput: {:.0} requests/s", self.requests_per_sec())?;
        writeln!(f, "batch round trip: p50 {:?}", self.p50)?;
        writeln!(f, "mappings left: {}", self.mappings_left)?;
        write!(f, "non-OK statuses: {}", self.non_ok)
    }
}

/// A device with the daemon's default configuration and the features a
/// Linux driver acks.
pub fn linux_device() -> Result<Device, Box<dyn std::error::Error>> {
    let mut dev = Device::new(DeviceConfig::default())?;
    let offered = dev.offered_features();
    let acked = viommu_frontend::connection::linux_driver_features(offered.0, true);
    dev.set_features(
        Features(acked).intersect(offered),
        &mut viommu_core::NullSink,
    )?;
    Ok(dev)
}

/// Replays `posted` through `dev`, `batch` requests at a time, each reply
/// written into its writable buffer and read back after the batch as the
/// driver would.
pub fn replay(
    dev: &mut Device,
    posted: &mut [Posted],
    batch: usize,
    tables: &LockedTables,
) -> InProcessReport {
    let mut sink = LockedSink(tables);
    let mut report = replay_batches(dev, posted, batch, &mut |dev, chunk| {
        serve_chunk(dev, chunk, &mut sink)
    });
    report.mappings_left = tables.mapping_count();
    report
}

/// Serves one batch, every change going to `sink`: the reply written into
/// each request's writable buffer; returns the used lengths.
pub fn serve_chunk(dev: &mut Device, chunk: &mut [Posted], sink: &mut impl ChangeSink) -> Vec<u32> {
    let mut used = Vec::with_capacity(chunk.len());
    for p in chunk.iter_mut() {
        let reply = dev.process(&p.readable, p.writable.len(), sink);
        used.push(reply.used_len());
        if let Some((at, tail)) = reply.tail() {
            if let viommu_core::Reply::Complete { area, .. } = reply {
                p.writable[..at].copy_from_slice(area);
            }
            p.writable[at..at + TAIL_LEN].copy_from_slice(&tail);
        }
    }
    used
}

/// Replays `posted` through `dev`, `batch` requests at a time, `serve`
/// serving each batch (returning the used lengths); checks every reply.
pub fn replay_batches(
    dev: &mut Device,
    posted: &mut [Posted],
    batch: usize,
    serve: &mut dyn FnMut(&mut Device, &mut [Posted]) -> Vec<u32>,
) -> InProcessReport {
    let batch = batch.max(1);
    let mut samples = Vec::with_capacity(posted.len().div_ceil(batch));
    let mut non_ok = 0u64;
    let start = Instant::now();
    for chunk in posted.chunks_mut(batch) {
        let t0 = Instant::now();
        let used = serve(dev, chunk);
        samples.push(t0.elapsed());
        for (p, &used_len) in chunk.iter().zip(used.iter()) {
            let ok = used_len as usize == p.writable.len()
                && p.writable.len() >= TAIL_LEN
                && p.writable[p.writable.len() - TAIL_LEN] == 0;
            non_ok += u64::from(!ok);
        }
    }
    let elapsed = start.elapsed();
    samples.sort_unstable();
    let p50 = samples
        .get(samples.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default();
    InProcessReport {
        requests: posted.len() as u64,
        batch,
        elapsed,
        p50,
        non_ok,
        mappings_left: dev.mapping_count() as usize,
    }
}
