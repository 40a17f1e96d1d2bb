//! Replaying a request trace through a [`Driver`]: `batch` requests per
//! kick, timing every batch's round trip (queue, kick, all used).

use crate::driver::{Driver, DriverError};
use crate::split_ring::ChainSpec;
use std::time::{Duration, Instant};
use virtio_iommu_proto::{Request, Status};

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A batch size, or batches in flight, of zero.
    #[error("batch size and batches in flight must be at least 1")]
    ZeroBatch,
    /// Driving the device failed (not a request status: those are counted).
    #[error("batch starting at request {first} failed")]
    Batch {
        /// Index of the first request of the batch.
        first: usize,
        /// The driver error.
        #[source]
        source: DriverError,
    },
}

/// Latency percentiles of batch round trips.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
}

impl Percentiles {
    /// Percentiles of `samples` (sorted in place), nearest-rank.
    pub fn of(samples: &mut [Duration]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let rank = |p: usize| {
            let n = samples.len();
            let i = (p * n).div_ceil(100).clamp(1, n) - 1;
            samples[i]
        };
        Percentiles {
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: samples[samples.len() - 1],
        }
    }
}

/// What a replay measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayReport {
    /// Requests sent.
    pub requests: u64,
    /// Batches (kicks) sent.
    pub batches: u64,
    /// Requests per batch asked for.
    pub batch: usize,
    /// Wall time of the whole replay.
    pub elapsed: Duration,
    /// Batch round-trip latency.
    pub latency: Percentiles,
    /// Requests whose status was not OK (including used length not 4).
    pub non_ok: u64,
    /// Count per status byte 0..=8; index 9 counts undefined bytes and
    /// requests returned with a wrong used length.
    pub statuses: [u64; 10],
    /// Index and status byte (None: bad used length) of the first non-OK request.
    pub first_failure: Option<(usize, Option<u8>)>,
    /// Batches posted before the oldest one completed, at most.
    pub in_flight: usize,
    /// CPU time the device process used during the replay (all its
    /// threads), when it could be read.
    pub device_cpu: Option<std::time::Duration>,
}

impl ReplayReport {
    /// Requests per second over the whole replay.
    pub fn requests_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.requests as f64 / s
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "requests: {} in {} batches of up to {} ({:.3} s)",
            self.requests,
            self.batches,
            self.batch,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "throughput: {:.0} requests/s ({} batch(es) in flight)",
            self.requests_per_sec(),
            self.in_flight
        )?;
        if let Some(cpu) = self.device_cpu.filter(|_| self.requests > 0) {
            let ns = cpu.as_nanos() as f64 / self.requests as f64;
            writeln!(
                f,
                "device CPU: {ns:.0} ns per request (all its threads) = {:.2} M requests/s per core",
                if ns > 0.0 { 1e3 / ns } else { 0.0 }
            )?;
        }
        let l = &self.latency;
        writeln!(
            f,
            "batch round trip: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            l.p50, l.p90, l.p99, l.max
        )?;
        write!(f, "non-OK statuses: {}", self.non_ok)?;
        for (byte, &n) in self.statuses.iter().enumerate() {
            if n > 0 && byte != 0 {
                let name = u8::try_from(byte)
                    .ok()
                    .and_then(Status::from_u8)
                    .map_or("bad used length / undefined", Status::name);
                write!(f, "  {name}: {n}")?;
            }
        }
        if let Some((i, s)) = self.first_failure {
            write!(f, "\nfirst failure: request {i} (status byte {s:?})")?;
        }
        Ok(())
    }
}

/// A MAP/UNMAP stream like Linux's strict DMA mode under a steady block
/// workload: endpoint `endpoint` attached to domain 1, then `pairs` one-page
/// MAPs, each UNMAPped `live` MAPs later (the I/Os in flight), IOVAs handed
/// out top-down as Linux's IOVA allocator does, below 4 GiB and clear of
/// the x86 MSI window. `2 * pairs + 1` requests, every one valid for the
/// daemon's default settings.
pub fn map_unmap_stream(endpoint: u32, pairs: usize, live: usize) -> Vec<Request> {
    use virtio_iommu_proto::{Attach, Map, MapFlags, Unmap};
    const PAGE: u64 = 0x1000;
    /// IOVA slots reused round-robin (more than `live`, so none overlaps).
    const SLOTS: u64 = 1 << 14;
    let live = live.clamp(1, (SLOTS / 2) as usize);
    // Below x86's MSI window (0xfee00000-0xfeefffff), which is reserved.
    let iova = |i: usize| 0xefff_f000 - (i as u64 % SLOTS) * PAGE;
    let mut out = Vec::with_capacity(2 * pairs + 1);
    out.push(Request::Attach(Attach {
        domain: 1,
        endpoint,
        flags: 0,
        reserved: [0; 4],
    }));
    let unmap = |i: usize| {
        Request::Unmap(Unmap {
            domain: 1,
            virt_start: iova(i),
            virt_end: iova(i) + PAGE - 1,
            reserved: [0; 4],
        })
    };
    for i in 0..pairs {
        out.push(Request::Map(Map {
            domain: 1,
            virt_start: iova(i),
            virt_end: iova(i) + PAGE - 1,
            phys_start: 0x1000_0000 + (i as u64 % 4096) * PAGE,
            flags: MapFlags(3),
        }));
        if i >= live {
            out.push(unmap(i - live));
        }
    }
    for i in pairs.saturating_sub(live)..pairs {
        out.push(unmap(i));
    }
    out
}

/// Sends `requests` through `driver`, `batch` per kick, waiting for each
/// batch before the next one (as Linux waits for its synchronous requests).
pub fn replay(
    driver: &mut Driver,
    requests: &[Request],
    batch: usize,
) -> Result<ReplayReport, ReplayError> {
    replay_pipelined(driver, requests, batch, 1)
}

/// Sends `requests` through `driver`, `batch` per kick, with up to
/// `in_flight` batches posted before the oldest one completed: the device
/// then always finds work queued, and its own rate shows. Batch latency is
/// from the start of a batch's posting to the completion of its last
/// request.
pub fn replay_pipelined(
    driver: &mut Driver,
    requests: &[Request],
    batch: usize,
    in_flight: usize,
) -> Result<ReplayReport, ReplayError> {
    if batch == 0 || in_flight == 0 {
        return Err(ReplayError::ZeroBatch);
    }
    let batches = requests.len().div_ceil(batch);
    // Encoded before the clock starts: what the guest spends building its
    // requests is not the device's cost.
    let chains: Vec<ChainSpec> = requests.iter().map(|r| driver.chain_spec(r)).collect();
    // Descriptors the chains before each index take, so that the room a
    // batch needs is one subtraction.
    let mut before = Vec::with_capacity(chains.len() + 1);
    before.push(0usize);
    for c in &chains {
        let last = before.last().copied().unwrap_or(0);
        before.push(last + Driver::descriptors_needed(std::slice::from_ref(c)));
    }
    let mut samples = Vec::with_capacity(batches);
    let mut posted_at: std::collections::VecDeque<(usize, Instant)> =
        std::collections::VecDeque::with_capacity(in_flight);
    let mut statuses = [0u64; 10];
    let mut first_failure: Option<(usize, Option<u8>)> = None;
    let mut completed = 0usize;
    let start = Instant::now();
    let mut next = 0usize;
    let mut record = |i: usize, o: crate::driver::Outcome| {
        let byte = o.status_byte();
        let slot = match byte {
            Some(s) if s <= 8 => usize::from(s),
            _ => 9,
        };
        statuses[slot] += 1;
        if slot != 0 && first_failure.is_none_or(|(f, _)| i < f) {
            first_failure = Some((i, byte));
        }
    };
    while completed < requests.len() {
        // Post while fewer than `in_flight` batches are out and the ring
        // has room.
        while next < requests.len() && posted_at.len() < in_flight {
            // Batches keep their boundaries even when one is posted in parts.
            let end = ((next / batch + 1) * batch).min(requests.len());
            let part = &chains[next..end];
            if !posted_at.is_empty() && before[end] - before[next] > driver.free_descriptors() {
                break; // Wait for room.
            }
            let t0 = Instant::now();
            // Only a batch larger than the whole ring goes in parts (each
            // kicked, as Linux does on -ENOSPC).
            let posted = driver
                .post_batch(part, next)
                .map_err(|source| ReplayError::Batch {
                    first: next,
                    source,
                })?;
            next += posted;
            posted_at.push_back((next, t0));
        }
        // Wait for the oldest batch to complete.
        let Some(&(end, _)) = posted_at.front() else {
            break;
        };
        let first = completed;
        let need = end - completed;
        let mut got = 0usize;
        driver
            .collect(need, |i, o| {
                got += 1;
                record(i, o);
            })
            .map_err(|source| ReplayError::Batch { first, source })?;
        if got == 0 {
            // Nothing in flight any more, yet the batch is not complete.
            return Err(ReplayError::Batch {
                first,
                source: crate::driver::DriverError::Timeout {
                    waited: Duration::ZERO,
                    in_flight: driver.in_flight(),
                },
            });
        }
        completed += got;
        while let Some(&(end, t0b)) = posted_at.front() {
            if end > completed {
                break;
            }
            samples.push(t0b.elapsed());
            posted_at.pop_front();
        }
    }
    let elapsed = start.elapsed();
    Ok(ReplayReport {
        requests: requests.len() as u64,
        batches: samples.len() as u64,
        batch,
        elapsed,
        latency: Percentiles::of(&mut samples),
        non_ok: statuses[1..].iter().sum(),
        statuses,
        first_failure,
        in_flight,
        device_cpu: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_unmap_stream_pairs_every_map_with_one_unmap() {
        let reqs = map_unmap_stream(8, 1000, 32);
        assert_eq!(reqs.len(), 2001);
        assert!(matches!(reqs[0], Request::Attach(a) if a.endpoint == 8 && a.domain == 1));
        let mut live = std::collections::BTreeSet::new();
        let mut most = 0;
        for r in &reqs[1..] {
            match r {
                Request::Map(m) => {
                    assert!(live.insert(m.virt_start), "no MAP over a live one");
                    assert_eq!(m.virt_end - m.virt_start, 0xfff);
                }
                Request::Unmap(u) => assert!(live.remove(&u.virt_start), "UNMAP of a live MAP"),
                other => panic!("unexpected {other:?}"),
            }
            most = most.max(live.len());
        }
        assert!(live.is_empty(), "all unmapped at the end");
        assert_eq!(most, 33, "32 in flight, plus the one just mapped");
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let p = Percentiles::of(&mut s);
        assert_eq!(p.p50, Duration::from_micros(50));
        assert_eq!(p.p90, Duration::from_micros(90));
        assert_eq!(p.p99, Duration::from_micros(99));
        assert_eq!(p.max, Duration::from_micros(100));
        let mut one = [Duration::from_millis(3)];
        assert_eq!(Percentiles::of(&mut one).p50, Duration::from_millis(3));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
