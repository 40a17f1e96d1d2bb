//! Replaying a request trace through a [`Driver`]: `batch` requests per
//! kick, timing every batch's round trip (queue, kick, all used).

use crate::driver::{Driver, DriverError};
use std::time::{Duration, Instant};
use virtio_iommu_proto::{Request, Status};

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A batch size of zero.
    #[error("batch size must be at least 1")]
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
        writeln!(f, "throughput: {:.0} requests/s", self.requests_per_sec())?;
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

/// Sends `requests` through `driver`, `batch` per kick.
pub fn replay(
    driver: &mut Driver,
    requests: &[Request],
    batch: usize,
) -> Result<ReplayReport, ReplayError> {
    if batch == 0 {
        return Err(ReplayError::ZeroBatch);
    }
    let mut samples = Vec::with_capacity(requests.len().div_ceil(batch));
    let mut statuses = [0u64; 10];
    let mut first_failure = None;
    let start = Instant::now();
    for (b, chunk) in requests.chunks(batch).enumerate() {
        let first = b * batch;
        let t0 = Instant::now();
        let outcomes = driver
            .send(chunk)
            .map_err(|source| ReplayError::Batch { first, source })?;
        samples.push(t0.elapsed());
        for (i, o) in outcomes.iter().enumerate() {
            let byte = o.status_byte();
            let slot = match byte {
                Some(s) if s <= 8 => usize::from(s),
                _ => 9,
            };
            statuses[slot] += 1;
            if slot != 0 && first_failure.is_none() {
                first_failure = Some((first + i, byte));
            }
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
