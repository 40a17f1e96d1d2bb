//! Tells a guest's device reset from a pause when the VMM sends no
//! `RESET_DEVICE` (pure logic: fed with the events the daemon sees, it
//! answers whether the device state must go).
//!
//! QEMU's generic vhost-user device (`vhost-user-test-device-pci`) does not
//! send `RESET_DEVICE` on a guest reboot. What it sends was recorded
//! (tests/guest/recorded/): every stop — a pause or a reboot — is
//! `SET_VRING_ENABLE 0` and `GET_VRING_BASE` for each queue, and every
//! start is `SET_FEATURES`, `SET_MEM_TABLE` and the ring set-up. A paused
//! guest runs nothing until the start; a rebooted one runs its firmware and
//! a new kernel while the IOMMU stays stopped. So, while the request queue
//! is stopped (from its `GET_VRING_BASE` to the next `SET_FEATURES`), two
//! things can only come from a guest that runs again, and each is a reset:
//!
//! 1. **A backend reports that the guest set one of its endpoint's queues
//!    up anew** (`DRIVER_RESTARTED`: the firmware or the new kernel drives
//!    the disk). This comes first, before that endpoint's first DMA.
//! 2. **The guest reads the IOMMU's config space** (the new kernel's driver
//!    probes; QEMU forwards each read as `GET_CONFIG`).
//!
//! Before the first start, or while the queues run, neither means anything.

/// Why the device state was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The guest read the config space while the queues were stopped: it
    /// is initialising the device again (reboot, driver rebind).
    ConfigReadWhileStopped,
    /// A backend saw the guest set a queue of this endpoint up anew while
    /// the IOMMU's queues were stopped: the guest runs (its firmware or a
    /// new kernel), so it was reset.
    EndpointRestartedWhileStopped {
        /// The endpoint.
        endpoint: u32,
        /// The backend process that said so.
        pid: i32,
    },
}

impl std::fmt::Display for ResetReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetReason::ConfigReadWhileStopped => f.write_str(
                "the guest read the config space while the queues were stopped \
                 (it is initialising the device again: reboot or driver rebind)",
            ),
            ResetReason::EndpointRestartedWhileStopped { endpoint, pid } => write!(
                f,
                "the guest set endpoint {endpoint:#x}'s queues up anew while the IOMMU was \
                 stopped (the guest runs again: reboot), as backend pid {pid} reported"
            ),
        }
    }
}

/// Where the device stands in its start/stop cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Never started on this connection, or reset since: nothing to drop.
    #[default]
    Fresh,
    /// Started (`SET_FEATURES` seen).
    Running,
    /// The request queue was stopped after running.
    Stopped,
}

/// The watcher of one VMM connection.
#[derive(Debug, Default)]
pub struct ResetWatch {
    phase: Phase,
}

impl ResetWatch {
    /// `SET_FEATURES`: the VMM starts the device.
    pub(crate) fn started(&mut self) {
        self.phase = Phase::Running;
    }

    /// `GET_VRING_BASE` of the request queue: the VMM stops the device.
    pub(crate) fn request_queue_stopped(&mut self) {
        if self.phase == Phase::Running {
            self.phase = Phase::Stopped;
        }
    }

    /// The device was rebuilt from the state a previous daemon saved: it
    /// is stopped, as after `GET_VRING_BASE`, until the VMM starts it.
    pub(crate) fn request_queue_stopped_before_restart(&mut self) {
        self.phase = Phase::Stopped;
    }

    /// `GET_CONFIG`: returns the reason to reset, if this read means one.
    pub(crate) fn config_read(&mut self) -> Option<ResetReason> {
        if self.phase == Phase::Stopped {
            self.phase = Phase::Fresh;
            return Some(ResetReason::ConfigReadWhileStopped);
        }
        None
    }

    /// A backend reports that the guest set a queue of `endpoint` up anew:
    /// returns the reason to reset, if the IOMMU is stopped.
    pub(crate) fn endpoint_restarted(&mut self, endpoint: u32, pid: i32) -> Option<ResetReason> {
        if self.phase == Phase::Stopped {
            self.phase = Phase::Fresh;
            return Some(ResetReason::EndpointRestartedWhileStopped { endpoint, pid });
        }
        None
    }

    /// The device was reset another way (`RESET_DEVICE`, a new VMM).
    pub(crate) fn reset(&mut self) {
        self.phase = Phase::Fresh;
    }

    /// Whether the device is stopped after having run.
    #[cfg(test)]
    fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_of_a_fresh_or_running_device_keep_the_state() {
        let mut w = ResetWatch::default();
        assert_eq!(w.config_read(), None, "before the first start");
        w.started();
        assert_eq!(w.config_read(), None, "while running");
    }

    #[test]
    fn pause_and_resume_keep_the_state() {
        let mut w = ResetWatch::default();
        w.started();
        w.request_queue_stopped();
        assert!(w.is_stopped());
        w.started(); // cont: SET_FEATURES, with no config read before it
        assert_eq!(w.config_read(), None);
    }

    #[test]
    fn a_config_read_while_stopped_is_one_reset() {
        let mut w = ResetWatch::default();
        w.started();
        w.request_queue_stopped();
        assert_eq!(w.config_read(), Some(ResetReason::ConfigReadWhileStopped));
        // The driver reads the config several times while probing: one reset.
        assert_eq!(w.config_read(), None);
        w.started();
        assert_eq!(w.config_read(), None);
    }

    #[test]
    fn an_endpoint_restarting_while_the_iommu_is_stopped_is_one_reset() {
        let mut w = ResetWatch::default();
        w.started();
        assert_eq!(
            w.endpoint_restarted(0x20, 7),
            None,
            "a rebind while running"
        );
        w.request_queue_stopped();
        assert_eq!(
            w.endpoint_restarted(0x20, 7),
            Some(ResetReason::EndpointRestartedWhileStopped {
                endpoint: 0x20,
                pid: 7
            })
        );
        assert_eq!(
            w.endpoint_restarted(0x20, 7),
            None,
            "other queues: same reset"
        );
        assert_eq!(w.config_read(), None, "the IOMMU driver's probe after it");
    }

    #[test]
    fn a_stop_before_any_start_is_not_a_reset_signal() {
        let mut w = ResetWatch::default();
        w.request_queue_stopped();
        assert_eq!(w.config_read(), None);
    }

    #[test]
    fn reset_device_clears_a_pending_stop() {
        let mut w = ResetWatch::default();
        w.started();
        w.request_queue_stopped();
        w.reset();
        assert_eq!(w.config_read(), None);
    }
}
