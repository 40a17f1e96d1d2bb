//! The grace-period driver: publish a new epoch, wait for every reader
//! session that predates it and every pin overlapping what was revoked,
//! release readers that are gone (`crate::registry`), and apply the
//! stall/kill policy ([`StallPolicy`](super::StallPolicy)) to readers that
//! take too long. All of "the grace-period policy" lives here.

use std::time::{Duration, Instant};

use super::{GraceReport, Pending, TableWriter};
use crate::grace;
use crate::layout::header;
use crate::registry::{KillState, Reader, ReaderState};
use crate::sync::Ordering;

/// Polls of a shared word spent spinning (`spin_loop`) before the waiter
/// starts yielding and checking the reader's state.
const SPIN_POLLS: u32 = 2048;
/// Polls after which the waiter sleeps ([`SLEEP`]) instead of yielding.
const YIELD_POLLS: u32 = 4096;
/// How long the waiter sleeps between polls once past [`YIELD_POLLS`].
const SLEEP: Duration = Duration::from_micros(50);
/// Least time between two checks of whether the reader can be released
/// (they make system calls).
const RELEASE_CHECK_EVERY: Duration = Duration::from_millis(1);

/// How long a grace period waits before it repeats its stall warning.
const STALL_REMINDER: Duration = Duration::from_secs(10);

impl TableWriter {
    /// Runs one grace period if anything needs it: publishes a new epoch,
    /// waits until no reader session predates it and no pin overlaps what
    /// was revoked, then makes detached nodes reusable. Dead readers are
    /// reclaimed on the way; stuck ones are handled by the
    /// [`StallPolicy`](super::StallPolicy).
    pub fn synchronize(&mut self) -> GraceReport {
        if !self.needs_grace() {
            return GraceReport {
                epoch: self.table.word(header::EPOCH).load(Ordering::Relaxed),
                ..GraceReport::default()
            };
        }
        let epoch = grace::advance(self.table.word(header::EPOCH));
        let mut report = GraceReport {
            epoch,
            ..GraceReport::default()
        };
        let started = Instant::now();
        let mut warned = false;
        self.stall_counted = false;
        let mut r = 0;
        while r < self.readers.len() {
            let mut end = WaitEnd::Done;
            // A previous writer's slot file: its epochs are not this
            // table's; the caller waits for it after the grace period.
            let slots = self
                .readers
                .get(r)
                .filter(|x| !x.previous())
                .map_or(0, |x| x.slots.slots_in_use());
            for s in 0..slots {
                let quiet = |reader: &Reader| grace::quiescent_since(reader.slots.slot(s), epoch);
                if self.readers.get(r).is_some_and(|x| !quiet(x)) {
                    report.waited = true;
                    end = self.wait_for(r, started, &mut warned, "in a session", quiet);
                    if end != WaitEnd::Done {
                        break;
                    }
                }
            }
            if self.settle(r, end, warned) {
                report.reaped += 1;
            } else {
                r += 1;
            }
        }
        if !self.pending.ranges.is_empty() || !self.pending.endpoints.is_empty() {
            report.reaped += self.wait_for_pins(started, &mut warned, &mut report.waited);
        }
        self.pending = Pending::default();
        self.free.append(&mut self.retired);
        self.stats.grace_periods += 1;
        self.stats.grace_waits += u64::from(report.waited);
        report
    }

    fn pin_matters(&self, endpoint: u64, first: u64, last: u64) -> bool {
        let Ok(endpoint) = u32::try_from(endpoint) else {
            return false;
        };
        if self.pending.endpoints.contains(&endpoint) {
            return true;
        }
        let Some(d) = self.endpoint_domain.get(&endpoint) else {
            return false;
        };
        self.pending
            .ranges
            .iter()
            .any(|(rd, f, l)| rd == d && first <= *l && *f <= last)
    }

    fn wait_for_pins(&mut self, started: Instant, warned: &mut bool, waited: &mut bool) -> usize {
        let mut reaped = 0;
        let mut r = 0;
        while r < self.readers.len() {
            let mut end = WaitEnd::Done;
            let pins = self
                .readers
                .get(r)
                .filter(|x| !x.previous())
                .map_or(0, |x| x.slots.pins_in_use());
            for j in 0..pins {
                let Some(snap) = self.readers.get(r).and_then(|x| {
                    let (state, fields) = x.slots.pin(j);
                    grace::read_pin(state, fields)
                }) else {
                    continue;
                };
                if !self.pin_matters(snap.endpoint, snap.first, snap.last) {
                    continue;
                }
                *waited = true;
                let released = |reader: &Reader| {
                    let (state, _) = reader.slots.pin(j);
                    !grace::pin_still_held(state, &snap)
                };
                end = self.wait_for(r, started, warned, "holding a pin", released);
                if end != WaitEnd::Done {
                    break;
                }
            }
            if self.settle(r, end, *warned) {
                reaped += 1;
            } else {
                r += 1;
            }
        }
        reaped
    }

    /// Books the end of a wait on reader `r`; true if it was removed.
    fn settle(&mut self, r: usize, end: WaitEnd, warned: bool) -> bool {
        if warned && !self.stall_counted {
            self.stall_counted = true;
            self.stats.stalls += 1;
        }
        let Some(reader) = self.readers.get(r) else {
            return false;
        };
        let (id, pid) = (reader.id, reader.pid);
        match end {
            WaitEnd::Done => false,
            WaitEnd::Released(state) => {
                tracing::warn!(
                    pid,
                    reader = id.0,
                    "backend {}: released while a grace period waited for it",
                    state.describe()
                );
                self.stats.reaped += 1;
                self.readers.remove(id)
            }
        }
    }

    /// Spins, then yields, then sleeps until `done(reader r)`, or until the
    /// reader can be released ([`crate::registry`]); applies the stall
    /// policy to it meanwhile.
    fn wait_for(
        &mut self,
        r: usize,
        started: Instant,
        warned: &mut bool,
        what: &str,
        done: impl Fn(&Reader) -> bool,
    ) -> WaitEnd {
        let mut spins = 0u32;
        let mut next_check = Instant::now();
        let mut next_reminder = None;
        loop {
            let Some(reader) = self.readers.get(r) else {
                return WaitEnd::Done;
            };
            if done(reader) {
                return WaitEnd::Done;
            }
            spins = spins.saturating_add(1);
            if spins < SPIN_POLLS {
                crate::sync::relax();
                continue;
            }
            let now = Instant::now();
            if now < next_check {
                backoff(spins);
                continue;
            }
            // The release check makes system calls: at most once a ms.
            next_check = now + RELEASE_CHECK_EVERY;
            let state = self.readers.state_of(r);
            if let ReaderState::Released(_) = state {
                return WaitEnd::Released(state);
            }
            let elapsed = started.elapsed();
            let (pid, kill) = (reader.pid, reader.kill_state());
            if (!*warned && elapsed >= self.stall.warn_after)
                || next_reminder.is_some_and(|t| now >= t)
            {
                *warned = true;
                next_reminder = Some(now + STALL_REMINDER);
                tracing::warn!(
                    pid,
                    waited_ms = elapsed.as_millis() as u64,
                    backend = state.describe(),
                    "a backend {what} is holding a grace period back (UNMAP/DETACH waits for it)"
                );
            }
            if kill == KillState::None
                && matches!(state, ReaderState::Active | ReaderState::Lingering)
                && self.stall.kill_after.is_some_and(|k| elapsed >= k)
            {
                match reader.kill() {
                    Ok(()) => {
                        self.stats.kills += 1;
                        tracing::error!(
                            pid,
                            "killed a backend stuck past --stall-kill-ms; waiting for it to exit and for its I/O to drain"
                        );
                    }
                    Err(e) => {
                        self.stats.kill_failures += 1;
                        tracing::error!(
                            pid,
                            error = %e,
                            "could not kill a stuck backend (the daemon needs CAP_KILL or the backend's uid); waiting for it instead"
                        );
                    }
                }
            }
            backoff(spins);
        }
    }
}

fn backoff(spins: u32) {
    if spins < YIELD_POLLS {
        std::thread::yield_now();
    } else {
        std::thread::sleep(SLEEP);
    }
}

/// How a wait on one reader ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitEnd {
    /// The slot or pin was released.
    Done,
    /// The reader may be released ([`crate::registry`]): gone and drained,
    /// or closed.
    Released(ReaderState),
}
