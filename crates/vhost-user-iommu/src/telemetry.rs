//! What the daemon counts, for its metrics and admin socket.
//!
//! The request thread's counters cost it no lock, no system call and no
//! locked instruction: each is a [`Tally`], written by one thread at a time
//! (the request ring's owner, under the ring's mutex) with a relaxed load
//! and store, and read by the control plane whenever it is scraped. The
//! latency histogram takes two clock reads per pass of the request queue,
//! not per request. Counters written from several threads (grace periods,
//! lost kicks) are rare events and use ordinary atomic additions.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use virtio_iommu_proto::{FaultRecord, Status};

use crate::eventq::FaultStats;

/// A counter with one writer at a time (whoever holds the lock that
/// serialises the writers); readers may read it at any time.
#[derive(Debug, Default)]
pub struct Tally(AtomicU64);

impl Tally {
    /// Adds `n`. Only the one current writer may call this: it is a plain
    /// load and store, not an atomic read-modify-write.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// The value now.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Request types by wire value (1..=5), as metric labels.
pub const REQUEST_KINDS: [&str; 5] = ["attach", "detach", "map", "unmap", "probe"];
/// Statuses by wire value (0..=8), as metric labels.
pub const STATUSES: [&str; 9] = [
    "ok", "ioerr", "unsupp", "deverr", "inval", "range", "noent", "fault", "nomem",
];

/// Histogram buckets: bucket `i` counts durations up to `2^(10+i)` ns
/// (1.024 µs … 1.07 s); the last one counts everything longer.
pub const BUCKETS: usize = 22;

/// The upper bound of bucket `i`, in seconds (`None`: +Inf).
pub(crate) fn bucket_bound(i: usize) -> Option<f64> {
    (i + 1 < BUCKETS).then(|| (1u64 << (10 + i)) as f64 / 1e9)
}

fn bucket_of(ns: u64) -> usize {
    if ns <= 1024 {
        return 0;
    }
    let bits = 64 - (ns - 1).leading_zeros() as usize;
    (bits - 10).min(BUCKETS - 1)
}

/// A duration histogram with power-of-two buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A histogram's values at one moment.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistogramSnapshot {
    /// Count per bucket (not cumulative).
    pub buckets: Vec<u64>,
    /// Sum of the observations, in nanoseconds.
    pub sum_ns: u64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Records `n` observations of `ns` each, from the one current writer
    /// (see [`Tally`]).
    #[inline]
    pub(crate) fn observe_owned(&self, ns: u64, n: u64) {
        let add = |a: &AtomicU64, v: u64| a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
        add(&self.buckets[bucket_of(ns)], n);
        add(&self.sum_ns, ns.saturating_mul(n));
        add(&self.count, n);
    }

    /// Records one observation from any thread.
    pub(crate) fn observe_shared(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// The values now.
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_ns: self.sum_ns.load(Relaxed),
            count: self.count.load(Relaxed),
        }
    }
}

/// The request queue's counters.
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// Requests answered with a status, by `[type - 1][status]`.
    answered: [[Tally; STATUSES.len()]; REQUEST_KINDS.len()],
    /// Chains returned with used length 0 because the request could not be
    /// parsed (unknown type, too short) — a guest mistake.
    pub unparsed: Tally,
    /// Chains refused for their shape (readable after writable, outside
    /// guest memory, a reply that cannot be written) — a guest mistake.
    pub malformed: Tally,
    /// Requests a previous daemon applied but had not completed, completed
    /// now without applying them again (also counted as answered OK).
    pub already_applied: Tally,
    /// Time from the request thread finding a pass's requests (woken for
    /// them, or polling) to their completion, grace period included; one
    /// observation per request (every request of a pass gets the pass's
    /// time).
    pub latency: Histogram,
}

impl RequestCounters {
    /// Counts one answered request of wire type `kind` with `status`.
    #[inline]
    pub(crate) fn answered(&self, kind: u8, status: Status) {
        if let Some(row) = usize::from(kind)
            .checked_sub(1)
            .and_then(|k| self.answered.get(k))
        {
            row[status as usize].add(1);
        }
    }

    /// Answered requests of type index `kind` (0 = ATTACH) with status
    /// index `status` (0 = OK).
    pub(crate) fn count(&self, kind: usize, status: usize) -> u64 {
        self.answered
            .get(kind)
            .and_then(|r| r.get(status))
            .map_or(0, Tally::get)
    }

    /// Every answered request.
    pub(crate) fn total(&self) -> u64 {
        self.answered.iter().flatten().map(Tally::get).sum()
    }

    /// Answered requests whose status is not OK (guest mistakes or
    /// refusals such as NOMEM).
    pub(crate) fn failed(&self) -> u64 {
        self.answered
            .iter()
            .flat_map(|r| r[1..].iter())
            .map(Tally::get)
            .sum()
    }
}

/// Fault records kept for `viommu-ctl faults`.
pub const RECENT_FAULTS: usize = 64;

/// One fault record reported to the guest, as remembered.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FaultEntry {
    /// When it was reported (seconds since the Unix epoch).
    pub unix_time: u64,
    /// Endpoint ID.
    pub endpoint: u32,
    /// `domain` or `mapping` (the reason the guest sees).
    pub reason: String,
    /// Access flags: `r`, `w`, `rw` or empty.
    pub access: String,
    /// The faulting address, if known.
    pub address: Option<u64>,
}

/// Event-queue totals across VMM connections, and the latest faults.
#[derive(Debug, Default)]
struct FaultLog {
    earlier: FaultStats,
    recent: VecDeque<FaultEntry>,
    reported: u64,
}

/// Everything the daemon counts, shared by its threads for its lifetime.
#[derive(Debug)]
pub struct Telemetry {
    /// The request queue.
    pub requests: RequestCounters,
    /// Duration of every grace period the shared table ran.
    pub grace: Histogram,
    /// Request-queue passes started by the watchdog that found requests
    /// (their kick was lost).
    pub lost_kicks: AtomicU64,
    /// VMM connections served.
    pub vmm_connections: AtomicU64,
    faults: Mutex<FaultLog>,
    /// When the daemon started.
    pub started: Instant,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            requests: RequestCounters::default(),
            grace: Histogram::default(),
            lost_kicks: AtomicU64::new(0),
            vmm_connections: AtomicU64::new(0),
            faults: Mutex::new(FaultLog::default()),
            started: Instant::now(),
        }
    }
}

impl Telemetry {
    fn fault_log(&self) -> std::sync::MutexGuard<'_, FaultLog> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers a fault record queued for the guest.
    pub(crate) fn fault_reported(&self, record: &FaultRecord) {
        let flags = record.access.0;
        let access = match (flags & 1 != 0, flags & 2 != 0) {
            (true, true) => "rw",
            (true, false) => "r",
            (false, true) => "w",
            (false, false) => "",
        };
        let entry = FaultEntry {
            unix_time: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            endpoint: record.endpoint,
            reason: format!("{:?}", record.reason).to_lowercase(),
            access: access.into(),
            address: record.address,
        };
        let mut log = self.fault_log();
        log.reported += 1;
        if log.recent.len() == RECENT_FAULTS {
            log.recent.pop_front();
        }
        log.recent.push_back(entry);
    }

    /// Adds the event-queue counters of a VMM connection that ended.
    pub(crate) fn connection_ended(&self, stats: FaultStats) {
        let mut log = self.fault_log();
        log.earlier.delivered += stats.delivered;
        log.earlier.dropped_full += stats.dropped_full;
        log.earlier.dropped_buffer += stats.dropped_buffer;
    }

    /// Event-queue totals: the ended connections' plus `current`.
    pub(crate) fn fault_totals(&self, current: FaultStats) -> FaultStats {
        let log = self.fault_log();
        FaultStats {
            delivered: log.earlier.delivered + current.delivered,
            dropped_full: log.earlier.dropped_full + current.dropped_full,
            dropped_buffer: log.earlier.dropped_buffer + current.dropped_buffer,
        }
    }

    /// Faults reported to the guest since the start, and the latest ones
    /// (oldest first).
    pub(crate) fn recent_faults(&self) -> (u64, Vec<FaultEntry>) {
        let log = self.fault_log();
        (log.reported, log.recent.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_iommu_proto::{FaultFlags, FaultReason};

    #[test]
    fn buckets_are_powers_of_two_from_one_microsecond() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1024), 0);
        assert_eq!(bucket_of(1025), 1);
        assert_eq!(bucket_of(2048), 1);
        assert_eq!(bucket_of(2049), 2);
        assert_eq!(bucket_of(1 << 30), 20);
        assert_eq!(bucket_of((1 << 30) + 1), 21);
        assert_eq!(bucket_of(u64::MAX), 21);
        assert_eq!(bucket_bound(0), Some(1.024e-6));
        assert_eq!(bucket_bound(BUCKETS - 1), None);
    }

    #[test]
    fn histograms_count_and_sum() {
        let h = Histogram::default();
        h.observe_owned(1500, 32);
        h.observe_shared(5_000_000_000);
        let s = h.snapshot();
        assert_eq!(s.count, 33);
        assert_eq!(s.sum_ns, 1500 * 32 + 5_000_000_000);
        assert_eq!(s.buckets[1], 32);
        assert_eq!(s.buckets[BUCKETS - 1], 1);
    }

    #[test]
    fn requests_are_counted_by_type_and_status_and_bad_types_are_ignored() {
        let c = RequestCounters::default();
        c.answered(3, Status::Ok);
        c.answered(3, Status::Ok);
        c.answered(4, Status::NoEnt);
        c.answered(0, Status::Ok);
        c.answered(6, Status::Ok);
        c.answered(255, Status::Ok);
        assert_eq!(c.count(2, 0), 2);
        assert_eq!(c.count(3, 6), 1);
        assert_eq!(c.count(9, 9), 0);
        assert_eq!(c.total(), 3);
        assert_eq!(c.failed(), 1);
    }

    #[test]
    fn faults_keep_the_latest_and_totals_span_connections() {
        let t = Telemetry::default();
        for ep in 0..(RECENT_FAULTS as u32 + 3) {
            t.fault_reported(&FaultRecord {
                reason: FaultReason::Mapping,
                access: FaultFlags::WRITE,
                endpoint: ep,
                address: Some(0x1000),
            });
        }
        let (n, recent) = t.recent_faults();
        assert_eq!(n, RECENT_FAULTS as u64 + 3);
        assert_eq!(recent.len(), RECENT_FAULTS);
        assert_eq!(recent[0].endpoint, 3);
        assert_eq!(
            (recent[0].reason.as_str(), recent[0].access.as_str()),
            ("mapping", "w")
        );
        t.connection_ended(FaultStats {
            delivered: 2,
            dropped_full: 1,
            dropped_buffer: 0,
        });
        let all = t.fault_totals(FaultStats {
            delivered: 1,
            dropped_full: 0,
            dropped_buffer: 4,
        });
        assert_eq!(
            (all.delivered, all.dropped_full, all.dropped_buffer),
            (3, 1, 4)
        );
    }
}
