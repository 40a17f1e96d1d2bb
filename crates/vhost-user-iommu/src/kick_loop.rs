//! The request queue's kick path on io_uring.
//!
//! vhost-user-backend keeps the control plane (the VMM's socket messages)
//! and the event queue on its epoll thread. The request queue's kick eventfd
//! is taken out of that epoll set and read by this thread through io_uring:
//! one `READ` of the kick eventfd and one of a control eventfd in flight,
//! one `io_uring_enter` per wake-up. After each drain the thread can
//! busy-poll the avail ring (`--poll-us`) before it sleeps, and it can be
//! pinned to a CPU (`--cpu`).
//!
//! Hand-over: the framework calls the backend's `handle_event` for the
//! request queue when the queue is enabled (and whenever it has registered
//! a new kick eventfd); the backend then removes that eventfd from the
//! framework's epoll set and gives a duplicate to this thread. A kick the
//! framework consumed before the hand-over is not lost: the hand-over
//! always asks for a processing pass. The other way round, an event for
//! the eventfd that the epoll thread had already collected when it was
//! taken out may find the count gone (this thread read it): the
//! framework's read of it must not fail then ([`vhost_user_process::vring`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, types};
use tracing::{debug, info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EventFd};

/// What the thread runs on a kick: serves the queue, returns how many
/// requests it completed.
pub type Serve = Box<dyn Fn(&VringRwLock) -> usize + Send>;

/// Whether requests wait in the queue (looked at, not served).
pub type Pending = Box<dyn Fn(&VringRwLock) -> bool + Send>;

#[derive(Default)]
struct Command {
    new_kick: Option<(OwnedFd, VringRwLock)>,
    pass: bool,
    exit: bool,
}

struct Control {
    wake: EventFd,
    cmd: Mutex<Command>,
}

/// The running kick thread of one VMM connection.
pub struct KickLoop {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

const WAKE: u64 = 1;
/// The watchdog's interval: a safety net against a lost kick. Requests
/// found waiting at one tick, after an interval without a pass, are served
/// at the next tick if their kick still has not come: between 100 and
/// 200 ms late. Their kick counts as lost (logged, `lost_kicks`) if it
/// does not come within the interval after that either; a kick that does
/// was only late.
const WATCHDOG_NS: u32 = 100_000_000;
/// How often a kick that came before its queue was enabled is retried.
const NOT_ENABLED_RETRY_NS: u32 = 1_000_000;
const CANCEL: u64 = 2;
/// The watchdog's timeout request.
const WATCHDOG: u64 = 3;
/// Kick reads carry `KICK | generation`.
const KICK: u64 = 1 << 32;

impl KickLoop {
    /// Starts the thread (pinned to `cpu` if given). Fails if io_uring is
    /// not available (old kernel, seccomp), so the caller can fall back.
    /// Requests served by the watchdog count as lost kicks in `telemetry`.
    pub(crate) fn start(
        serve: Serve,
        pending: Pending,
        cpu: Option<usize>,
        telemetry: Arc<crate::telemetry::Telemetry>,
    ) -> io::Result<Self> {
        let control = Arc::new(Control {
            wake: EventFd::new(EFD_CLOEXEC)?,
            cmd: Mutex::new(Command::default()),
        });
        let c = Arc::clone(&control);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new().name("requestq".into()).spawn(move || {
            if let Some(cpu) = cpu {
                pin_to(cpu);
            }
            // Created here: a single-issuer ring belongs to the thread that
            // creates it.
            let ring = match new_ring() {
                Ok(r) => {
                    let _ = ready_tx.send(Ok(()));
                    r
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if let Err(e) = run(ring, &c, &serve, &pending, &telemetry) {
                warn!(error = %e, "request-queue io_uring loop failed; the queue is no longer served");
            }
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                control,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other("the request-queue thread died at start")),
        }
    }

    fn send(&self, f: impl FnOnce(&mut Command)) {
        f(&mut self
            .control
            .cmd
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
        if let Err(e) = self.control.wake.write(1) {
            warn!(error = %e, "cannot wake the request-queue thread");
        }
    }

    /// Gives the thread a (new) kick eventfd for `vring` and asks for a pass.
    pub(crate) fn hand_over(&self, kick: OwnedFd, vring: VringRwLock) {
        self.send(|c| {
            c.new_kick = Some((kick, vring));
            c.pass = true;
        });
    }

    /// Asks for one processing pass.
    pub(crate) fn request_pass(&self) {
        self.send(|c| c.pass = true);
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        self.send(|c| c.exit = true);
        if let Some(t) = self.thread.take() {
            // The last reference to the device may be dropped by the loop
            // thread itself (it holds one while serving); it then exits on
            // its own after the exit command and must not join itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for KickLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A small ring: one submitter (this thread), completions run only when it
/// enters the kernel to wait (no interrupting task work). Kernels before 6.1
/// lack those flags; a plain ring is used then.
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
        .or_else(|_| IoUring::new(8))
}

fn pin_to(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set`, for any cpu below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        info!(cpu, "request-queue thread pinned");
    } else {
        warn!(cpu, error = %io::Error::last_os_error(), "cannot pin the request-queue thread");
    }
}

struct Loop {
    ring: IoUring,
    /// Buffers the kernel writes the eventfd counters into; boxed so their
    /// address is stable while a read is in flight.
    wake_buf: Box<[u8; 8]>,
    kick_buf: Box<[u8; 8]>,
    /// The watchdog's interval, read by the kernel when the timeout is
    /// submitted.
    watchdog: Box<types::Timespec>,
    in_flight: Vec<u64>,
    /// Completions of one wake-up, reused.
    done: Vec<(u64, i32)>,
}

impl Loop {
    /// Arms the watchdog: a timeout request that completes after
    /// [`WATCHDOG_NS`] unless cancelled. A standing request rather than a
    /// timeout on every wait, which would arm and cancel a timer on every
    /// kick.
    fn arm_watchdog(&mut self) -> io::Result<()> {
        let sqe = opcode::Timeout::new(&*self.watchdog)
            .build()
            .user_data(WATCHDOG);
        // SAFETY: the timespec is owned by `self` and outlives the request
        // (the kernel reads it when the request is submitted; it is
        // cancelled and reaped before `self` drops, see `drain`).
        unsafe { self.ring.submission().push(&sqe) }.map_err(io::Error::other)?;
        self.in_flight.push(WATCHDOG);
        Ok(())
    }

    fn read(&mut self, fd: i32, user_data: u64) -> io::Result<()> {
        let buf = if user_data == WAKE {
            self.wake_buf.as_mut_ptr()
        } else {
            self.kick_buf.as_mut_ptr()
        };
        let sqe = opcode::Read::new(types::Fd(fd), buf, 8)
            .build()
            .user_data(user_data);
        // SAFETY: the buffer is owned by `self` and outlives the operation:
        // every read in flight is cancelled and reaped before `self` drops
        // (see `drain`).
        unsafe { self.ring.submission().push(&sqe) }.map_err(io::Error::other)?;
        self.in_flight.push(user_data);
        Ok(())
    }

    fn cancel(&mut self, user_data: u64) -> io::Result<()> {
        let sqe = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancel request refers to no memory.
        unsafe { self.ring.submission().push(&sqe) }.map_err(io::Error::other)?;
        Ok(())
    }

    /// Cancels and reaps every read in flight.
    fn drain(&mut self) {
        let pending = self.in_flight.clone();
        for ud in pending {
            let _ = self.cancel(ud);
        }
        while !self.in_flight.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            self.in_flight.retain(|ud| !done.contains(ud));
        }
    }
}

fn run(
    ring: IoUring,
    control: &Control,
    serve: &Serve,
    pending: &Pending,
    telemetry: &crate::telemetry::Telemetry,
) -> io::Result<()> {
    let mut l = Loop {
        ring,
        wake_buf: Box::new([0; 8]),
        kick_buf: Box::new([0; 8]),
        watchdog: Box::new(types::Timespec::new().nsec(WATCHDOG_NS)),
        in_flight: Vec::new(),
        done: Vec::new(),
    };
    let mut kick: Option<(OwnedFd, VringRwLock)> = None;
    let mut generation = 0u64;
    l.read(control.wake.as_raw_fd(), WAKE)?;
    l.arm_watchdog()?;
    debug!("request-queue io_uring loop running");
    // Kernels before 5.11 cannot time out a wait: no quick retry there
    // (the watchdog still serves, after its interval).
    let ext_arg = l.ring.params().is_feature_ext_arg();
    let retry = types::Timespec::new().nsec(NOT_ENABLED_RETRY_NS);
    let retry_args = types::SubmitArgs::new().timespec(&retry);
    // A kick read while the queue was not enabled yet: after a restart the
    // guest may kick before the daemon has processed SET_VRING_ENABLE (QEMU
    // does not wait for it), and the kick eventfd is the same as before the
    // stop. Served as soon as the queue is enabled.
    let mut kick_before_enable = false;
    // A pass ran since the watchdog last fired.
    let mut woken_since_watchdog = false;
    // The watchdog found requests after an interval without a kick: their
    // kick gets one more interval to arrive (the driver publishes, then
    // kicks, and the watchdog may fire in between; under TCG or on a busy
    // host that gap is long) before they are served as requests whose kick
    // went missing.
    let mut suspect = false;
    // Requests the watchdog served whose kick had not come: if it comes
    // within the next interval, it was late (a driver descheduled between
    // publishing and kicking, on a busy host), not lost.
    let mut served_unkicked = 0;
    let result = loop {
        let waited = if kick_before_enable && ext_arg {
            l.ring.submitter().submit_with_args(1, &retry_args)
        } else {
            l.ring.submit_and_wait(1)
        };
        match waited {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                if let Some((_, vring)) = &kick {
                    if vring.get_ref().is_enabled() {
                        let served = serve(vring);
                        // Expected around a restart: not a lost kick.
                        debug!(
                            served,
                            "a kick that came before the queue was enabled, served"
                        );
                        kick_before_enable = false;
                    }
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
        l.done.clear();
        l.done
            .extend(l.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut pass = false;
        let mut exit = false;
        let mut watchdog_fired = false;
        for i in 0..l.done.len() {
            let (ud, res) = l.done[i];
            if ud == CANCEL {
                continue;
            }
            l.in_flight.retain(|x| *x != ud);
            if ud == WATCHDOG {
                if res == -libc::ECANCELED {
                    continue; // Cancelled at exit.
                }
                watchdog_fired = true;
                l.arm_watchdog()?;
            } else if ud == WAKE {
                let cmd = std::mem::take(
                    &mut *control.cmd.lock().unwrap_or_else(PoisonError::into_inner),
                );
                if cmd.exit {
                    exit = true;
                    continue;
                }
                if let Some((fd, vring)) = cmd.new_kick {
                    if kick.is_some() {
                        l.cancel(KICK | generation)?;
                    }
                    generation += 1;
                    l.read(fd.as_raw_fd(), KICK | generation)?;
                    kick = Some((fd, vring));
                }
                pass |= cmd.pass;
                l.read(control.wake.as_raw_fd(), WAKE)?;
            } else if ud == KICK | generation {
                if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                    warn!(error = %io::Error::from_raw_os_error(-res), "reading the kick eventfd failed");
                }
                pass = true;
                if let Some((fd, _)) = &kick {
                    l.read(fd.as_raw_fd(), KICK | generation)?;
                }
            } else if ud & KICK != 0 && res > 0 {
                // A read of the kick eventfd handed over before, which
                // completed before its cancel: it took a kick (the old and
                // the new descriptor may be the same eventfd), so serve.
                pass = true;
            }
            // Anything else: a cancelled read of an older kick eventfd.
        }
        if exit {
            break Ok(());
        }
        if watchdog_fired && !pass {
            if woken_since_watchdog {
                // The queue was active during the interval: nothing to
                // check (a pass follows every kick).
                woken_since_watchdog = false;
            } else if let Some((_, vring)) = &kick {
                // A whole interval without a kick: look at the ring anyway.
                if vring.get_ref().is_enabled() {
                    if kick_before_enable {
                        let served = serve(vring);
                        debug!(
                            served,
                            "a kick that came before the queue was enabled, served"
                        );
                        kick_before_enable = false;
                    } else if served_unkicked > 0 {
                        // No kick for another whole interval: it is lost.
                        telemetry
                            .lost_kicks
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        warn!(
                            served = served_unkicked,
                            "request queue had requests but no kick for a whole watchdog interval; served by the watchdog"
                        );
                        served_unkicked = 0;
                        suspect = pending(vring);
                    } else if suspect {
                        served_unkicked = serve(vring);
                        suspect = false;
                        if served_unkicked > 0 {
                            debug!(
                                served = served_unkicked,
                                "requests waited a watchdog interval for their kick; served (a kick lost, or late)"
                            );
                        }
                    } else {
                        suspect = pending(vring);
                    }
                }
            }
        }
        woken_since_watchdog |= pass;
        if pass {
            suspect = false;
            if served_unkicked > 0 {
                debug!(
                    served = served_unkicked,
                    "the kick of requests the watchdog served came late: not lost"
                );
                served_unkicked = 0;
            }
        }
        if pass {
            if let Some((_, vring)) = &kick {
                if vring.get_ref().is_enabled() {
                    let _ = serve(vring);
                    kick_before_enable = false;
                } else {
                    kick_before_enable = true;
                }
            }
        }
    };
    l.drain();
    debug!("request-queue io_uring loop stopped");
    result
}
