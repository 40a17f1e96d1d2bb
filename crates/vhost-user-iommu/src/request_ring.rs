//! The request queue's ring, served in passes.
//!
//! vhost-user-backend keeps the queue's set-up (addresses, size, indices)
//! in its vring, which the VMM's messages change. A pass copies that set-up
//! into a [`SplitQueue`] (kept while it does not change), reads the rings
//! and request buffers through host pointers resolved once per pass
//! ([`RamAccess`], volatile accesses), serves every available chain, writes
//! the used entries and publishes the used index once per run of
//! completions, and writes the indices back into the vring for
//! GET_VRING_BASE.

use crate::poll_window::PollWindow;
use crate::publish::TablePublisher;
use crate::requestq::{Origin, RequestServer, Served};
use crate::state_journal::StateJournal;
use viommu_backend::{Chain, RamAccess, RingAddrs, RingError, RingView, SplitQueue};
use viommu_core::Device;
use virtio_queue::{Queue, QueueT};

/// What the request queue's thread keeps between passes.
#[derive(Debug)]
pub struct RequestRing {
    /// How long to poll before sleeping, learnt from past sleeps.
    pub poll: PollWindow,
    /// Guest RAM, and the memory-table generation it came from.
    ram: Option<(u64, RamAccess)>,
    queue: Option<SplitQueue>,
    /// Chains taken in the current pass (their buffers are reused).
    chains: Vec<Chain>,
    /// `(head, outcome)` of the chains served in the current pass.
    completions: Vec<(u16, Served)>,
    /// Serves one chain; keeps the request counters.
    server: RequestServer,
}

/// The rings of one pass.
type PassView<'a> = RingView<'a, RamAccess>;

impl RequestRing {
    /// Nothing set up yet; polls for at most `max_poll` before sleeping.
    pub(crate) fn new(max_poll: std::time::Duration) -> RequestRing {
        RequestRing {
            poll: PollWindow::new(max_poll),
            ram: None,
            queue: None,
            chains: Vec::new(),
            completions: Vec::new(),
            server: RequestServer::default(),
        }
    }

    /// Counts into `telemetry` from now on.
    pub(crate) fn count_into(&mut self, telemetry: std::sync::Arc<crate::telemetry::Telemetry>) {
        self.server.telemetry = telemetry;
    }

    /// Where this ring's requests are counted.
    pub(crate) fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.server.telemetry
    }

    /// Requests a previous daemon applied and may not have completed (from
    /// the saved state): completed without applying them again if the
    /// driver still has them outstanding.
    pub(crate) fn resume_applied(&mut self, applied: Vec<viommu_core::state::Applied>) {
        self.server.applied = applied;
    }

    /// Takes guest RAM from the latest memory table, if it is newer than
    /// the one in use.
    pub(crate) fn use_memory(&mut self, generation: u64, ram: impl FnOnce() -> Option<RamAccess>) {
        if self.ram.as_ref().is_some_and(|(g, _)| *g == generation) {
            return;
        }
        self.ram = ram().map(|r| (generation, r));
    }

    /// Brings the ring state in line with the vring's set-up (which the
    /// VMM may have changed since the last pass). False when the queue is
    /// not ready, or guest memory is not known yet.
    pub(crate) fn sync(&mut self, q: &Queue) -> Result<bool, RingError> {
        if !q.ready() || self.ram.is_none() {
            return Ok(false);
        }
        let addrs = RingAddrs {
            size: q.size(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
        };
        let event_idx = q.event_idx_enabled();
        let current = self.queue.as_ref().is_some_and(|sq| {
            sq.addrs() == addrs
                && sq.next_avail() == q.next_avail()
                && sq.next_used() == q.next_used()
                && sq.event_idx() == event_idx
        });
        if !current {
            self.queue = Some(SplitQueue::resume(
                addrs,
                q.next_avail(),
                q.next_used(),
                event_idx,
            )?);
        }
        Ok(true)
    }

    /// The rings and guest RAM of a pass, and what is kept for its chains
    /// (after a successful [`Self::sync`]).
    pub(crate) fn parts(&mut self) -> Result<Pass<'_>, RingError> {
        let (Some((_, ram)), Some(queue)) = (&self.ram, &mut self.queue) else {
            return Err(RingError::Setup("request queue not set up"));
        };
        let addrs = queue.addrs();
        let view = queue.view(ram)?;
        Ok(Pass {
            addrs,
            view,
            ram,
            chains: &mut self.chains,
            completions: &mut self.completions,
            completed: 0,
            server: &mut self.server,
            unsignalled: false,
        })
    }
}

/// One pass over the request queue.
pub struct Pass<'a> {
    addrs: RingAddrs,
    view: PassView<'a>,
    ram: &'a RamAccess,
    chains: &'a mut Vec<Chain>,
    /// `(head, outcome)` per chain served.
    completions: &'a mut Vec<(u16, Served)>,
    /// Chains of `completions` already used.
    completed: usize,
    server: &'a mut RequestServer,
    /// Used entries written since the driver was last considered for a
    /// notification.
    unsignalled: bool,
}

impl std::fmt::Display for Pass<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "next_avail={} next_used={}",
            self.view.next_avail(),
            self.view.next_used()
        )
    }
}

impl Pass<'_> {
    /// Takes the available chains (at most a queue's worth) and serves
    /// them in order, recording each outcome in [`Self::completions`]. A
    /// ring that cannot be read sanely is an error, after the chains taken
    /// before it were served.
    pub(crate) fn serve_available(
        &mut self,
        device: &mut Device,
        publisher: &mut dyn TablePublisher,
        journal: &mut Option<StateJournal>,
    ) -> Result<usize, RingError> {
        self.completions.clear();
        let first = self.view.next_avail();
        if !self.server.applied.is_empty() {
            self.server.keep_applied_from(first, self.addrs.size);
        }
        let mut taken = 0;
        let mut result = Ok(());
        // At most a queue's worth per pass: a driver that keeps publishing
        // (a hostile one may republish the same descriptors forever) gets
        // its requests completed between passes, and the used ring never
        // holds more entries than it has slots.
        let most = usize::from(self.addrs.size);
        while taken < most {
            if taken == self.chains.len() {
                self.chains.push(Chain::default());
            }
            match self.view.pop(&mut self.chains[taken]) {
                Ok(true) => {
                    // The driver just wrote these bytes on another core:
                    // start fetching them while the rest is popped.
                    if let Some(seg) = self.chains[taken].segments.first() {
                        if let Ok(p) = self.ram.host(seg.addr, u64::from(seg.len)) {
                            prefetch(p);
                        }
                    }
                    taken += 1;
                }
                Ok(false) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // The table is locked once for the whole batch.
        let (chains, ram, server, completions) = (
            &self.chains[..taken],
            self.ram,
            &mut *self.server,
            &mut *self.completions,
        );
        publisher.batch(&mut |table| {
            for (i, chain) in chains.iter().enumerate() {
                let origin = Origin {
                    position: first.wrapping_add(i as u16),
                    journal: &mut *journal,
                };
                let served = server.serve(chain, origin, ram, device, table);
                completions.push((chain.head, served));
            }
        });
        if !server.applied.is_empty() {
            server.keep_applied_from(self.view.next_avail(), self.addrs.size);
        }
        match result {
            Err(e) if taken == 0 => Err(e),
            _ => Ok(taken),
        }
    }

    /// Completes, in order, the served chains up to the first one that
    /// awaits a grace period, and publishes the used index once. True if
    /// some still await it ([`Self::complete_rest`] after the grace period).
    pub(crate) fn complete_ready(&mut self) -> bool {
        let first_grace = self.completions.iter().position(|(_, s)| s.needs_grace);
        let split = first_grace.unwrap_or(self.completions.len());
        self.complete_until(split);
        first_grace.is_some()
    }

    /// Completes the served chains left by [`Self::complete_ready`].
    pub(crate) fn complete_rest(&mut self) {
        self.complete_until(self.completions.len());
    }

    fn complete_until(&mut self, end: usize) {
        if end <= self.completed {
            return;
        }
        for &(head, s) in &self.completions[self.completed..end] {
            self.view.push_used(head, s.used_len);
        }
        self.completed = end;
        self.view.publish_used();
        self.unsignalled = true;
    }

    /// Whether the driver wants a notification for the chains completed
    /// since this was last asked (EVENT_IDX, or its NO_INTERRUPT flag).
    pub(crate) fn needs_notification(&mut self) -> bool {
        std::mem::take(&mut self.unsignalled) && self.view.needs_notification()
    }

    /// Asks the driver not to kick: this thread is looking at the ring.
    pub(crate) fn kicks_off(&mut self) {
        self.view.disable_notification();
    }

    /// Asks the driver to kick for its next request; true if requests
    /// arrived meanwhile (serve them before sleeping).
    pub(crate) fn kicks_on(&mut self) -> bool {
        self.view.enable_notification()
    }

    /// Whether the driver published requests not taken yet.
    pub(crate) fn has_available(&self) -> bool {
        self.view.has_available()
    }

    /// Whether the vring still describes the queue this pass works on (the
    /// VMM may have stopped or moved it while the pass waited for a grace
    /// period).
    pub(crate) fn in_step(&self, q: &Queue) -> bool {
        q.ready()
            && q.desc_table() == self.addrs.desc
            && q.avail_ring() == self.addrs.avail
            && q.used_ring() == self.addrs.used
            && q.next_avail() == self.view.next_avail()
            && q.next_used() == self.view.next_used()
    }

    /// Writes back the indices the VMM reads at GET_VRING_BASE (and
    /// vhost-user-backend's own checks use).
    pub(crate) fn write_back(&self, q: &mut Queue) {
        q.set_next_avail(self.view.next_avail());
        q.set_next_used(self.view.next_used());
    }
}

/// Guest RAM of a memory table, for the request ring.
pub(crate) fn ram_access(mem: &crate::backend::GuestMem) -> RamAccess {
    use vm_memory::GuestAddressSpace;
    RamAccess::new(mem.memory().into_inner())
}

/// Starts loading the cache line at `p` (a hint: no fault, no effect on
/// what is read later).
#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and changes no memory, whatever the
    // address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
