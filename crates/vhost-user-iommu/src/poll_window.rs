//! How long the request thread polls the queue before it sleeps, adapted
//! as KVM adapts its halt-polling window: a sleep that a request ended
//! within the longest window would have been better spent polling (the
//! window doubles); a window that expired before a long sleep was spent for
//! nothing (it halves). The window stays between a tenth of the longest
//! and the longest, so a guest that sends request after request never pays
//! a wake-up, and an idle guest costs at most one short window per burst.

use std::time::{Duration, Instant};

/// The polling window and what it learns from each sleep.
#[derive(Clone, Copy, Debug)]
pub struct PollWindow {
    /// The longest window (`--poll-us`); zero never polls.
    max: Duration,
    /// The window used now.
    now: Duration,
    /// When the thread last went to sleep on the kick.
    slept_at: Option<Instant>,
}

impl PollWindow {
    /// A window of at most `max`, starting at its shortest.
    pub(crate) fn new(max: Duration) -> PollWindow {
        PollWindow {
            max,
            now: Self::floor_of(max),
            slept_at: None,
        }
    }

    fn floor_of(max: Duration) -> Duration {
        max / 10
    }

    /// How long to poll now.
    pub(crate) fn window(&self) -> Duration {
        self.now
    }

    /// The thread goes to sleep on the kick.
    pub(crate) fn sleeping(&mut self, at: Instant) {
        self.slept_at = Some(at);
    }

    /// The thread was woken (a kick, a pass asked for) at `at`: a sleep no
    /// longer than the longest window means polling would have caught the
    /// request; a longer one means the last window was wasted.
    pub(crate) fn woken(&mut self, at: Instant) {
        let Some(slept) = self.slept_at.take() else {
            return;
        };
        let floor = Self::floor_of(self.max);
        self.now = if at.saturating_duration_since(slept) <= self.max {
            (self.now * 2).clamp(floor, self.max)
        } else {
            (self.now / 2).max(floor)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn short_sleeps_grow_the_window_long_ones_shrink_it_within_bounds() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(50 * US);
        assert_eq!(w.window(), 5 * US, "starts at a tenth");
        // Woken without having slept (a watchdog pass): nothing learnt.
        w.woken(t0);
        assert_eq!(w.window(), 5 * US);
        // Requests that came 20 µs after each sleep: the window grows to
        // the longest and stays there.
        for (i, want) in [10, 20, 40, 50, 50].into_iter().enumerate() {
            let at = t0 + Duration::from_millis(i as u64);
            w.sleeping(at);
            w.woken(at + 20 * US);
            assert_eq!(w.window(), want * US, "short sleep {i}");
        }
        // An idle guest: long sleeps halve it down to the tenth.
        for want in [25, 12, 6, 5, 5] {
            w.sleeping(t0);
            w.woken(t0 + Duration::from_millis(10));
            assert_eq!(w.window().as_micros(), want, "long sleep");
        }
    }

    #[test]
    fn a_zero_window_never_polls() {
        let t0 = Instant::now();
        let mut w = PollWindow::new(Duration::ZERO);
        w.sleeping(t0);
        w.woken(t0);
        assert_eq!(w.window(), Duration::ZERO);
    }
}
