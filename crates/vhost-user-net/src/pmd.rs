//! The forwarding engine: polling threads (DPDK's poll-mode drivers), each
//! owning the transmit queues of a set of ports. A pass takes a burst of
//! up to [`BURST`] frames off a transmit queue inside one translation
//! session of the source guest, completes them there, then hands each
//! destination port its frames inside one session of that guest: one
//! used-index publish and at most one notification per burst per ring.
//! Frames are copied out of the source and into the destination, so no
//! translation outlives its session and no pin is needed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vhost_user_backend::VringT;
use viommu_backend::DmaError;

use crate::fib::{Destination, Fib, PortId};
use crate::header::HDR_LEN;
use crate::mac::Mac;
use crate::port::{self, Port, RXQ, TXQ, lock};
use crate::rx::{self, Delivery, RxScratch};
use crate::stats::{add, bump};
use crate::tx::{self, TxDrop};

/// Most frames taken off a transmit queue per pass.
pub const BURST: usize = 32;
/// Empty passes before an idle thread backs off.
const IDLE_PASSES: u32 = 64;

/// How frames find their destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// An L2 switch: learned source addresses, flooding of broadcast,
    /// multicast and unknown unicast.
    Learn,
    /// Port 2k to port 2k+1 and back, unconditionally (testpmd's io mode,
    /// for benchmarks).
    Io,
}

/// The switch: its ports and forwarding table.
#[derive(Debug)]
pub struct Switch {
    /// The ports, by index.
    pub ports: Vec<Arc<Port>>,
    /// Learned and configured addresses.
    pub fib: Fib,
    /// How frames are forwarded.
    pub mode: ForwardMode,
    /// Largest frame (Ethernet header included, no FCS).
    pub max_frame: usize,
}

/// A polling thread's counters (written by it alone, read for logs).
#[derive(Debug, Default)]
pub struct PmdStats {
    /// Frames taken off transmit queues.
    pub frames: AtomicU64,
    /// Passes over its ports that moved frames.
    pub busy_passes: AtomicU64,
    /// Their time, in nanoseconds: what moving the frames cost the thread
    /// (busy time over frames is its cost per frame at that load).
    pub busy_ns: AtomicU64,
    /// Passes that found nothing.
    pub idle_passes: AtomicU64,
}

impl PmdStats {
    /// The counters now, as `(frames, busy passes, busy ns, idle passes)`.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.frames.load(Ordering::Relaxed),
            self.busy_passes.load(Ordering::Relaxed),
            self.busy_ns.load(Ordering::Relaxed),
            self.idle_passes.load(Ordering::Relaxed),
        )
    }
}

/// One polling thread's set-up.
#[derive(Debug, Clone)]
pub struct PmdOptions {
    /// Its index (for logs and the thread name).
    pub index: usize,
    /// Pin it to this CPU.
    pub cpu: Option<usize>,
    /// Ports whose transmit queues it polls.
    pub ports: Vec<PortId>,
    /// Sleep this long when idle (after [`IDLE_PASSES`] empty passes);
    /// zero: keep polling (yielding the CPU between empty passes).
    pub idle_sleep: Duration,
    /// Its counters.
    pub stats: Arc<PmdStats>,
}

/// A thread's frame buffers and scratch space, reused for every burst.
struct Burst {
    frames: Vec<Vec<u8>>,
    count: usize,
    chain: viommu_backend::Chain,
    dest: [Destination; BURST],
    learn: Vec<Mac>,
    rx: RxScratch,
}

impl Burst {
    fn new(max_frame: usize) -> Burst {
        Burst {
            frames: (0..BURST)
                .map(|_| Vec::with_capacity(HDR_LEN + max_frame))
                .collect(),
            count: 0,
            chain: viommu_backend::Chain::default(),
            dest: [Destination::Drop; BURST],
            learn: Vec::new(),
            rx: RxScratch::default(),
        }
    }
}

/// Starts a polling thread; it runs until `stop` is set.
pub fn spawn(
    switch: Arc<Switch>,
    options: PmdOptions,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("pmd-{}", options.index))
        .spawn(move || {
            if let Some(cpu) = options.cpu {
                match pin_to_cpu(cpu) {
                    Ok(()) => info!(pmd = options.index, cpu, "polling thread pinned"),
                    Err(e) => {
                        warn!(pmd = options.index, cpu, error = %e, "cannot pin the polling thread")
                    }
                }
            }
            info!(pmd = options.index, ports = ?options.ports, "polling thread started");
            run(&switch, &options, &stop);
        })
}

/// Logs every `every` what each polling thread did since the last line
/// (frames/s, busy share, cost per frame while busy), for as long as the
/// process runs.
pub fn log_stats(threads: Vec<Arc<PmdStats>>, every: Duration) {
    let mut last: Vec<_> = threads.iter().map(|t| t.snapshot()).collect();
    let mut at = Instant::now();
    loop {
        std::thread::sleep(every);
        let secs = at.elapsed().as_secs_f64().max(1e-9);
        at = Instant::now();
        for (i, t) in threads.iter().enumerate() {
            let now = t.snapshot();
            let (frames, busy, ns, idle) = (
                now.0 - last[i].0,
                now.1 - last[i].1,
                now.2 - last[i].2,
                now.3 - last[i].3,
            );
            info!(
                pmd = i,
                frames_per_s = (frames as f64 / secs) as u64,
                busy_percent = format_args!("{:.1}", ns as f64 / 1e7 / secs),
                ns_per_frame_busy = ns.checked_div(frames).unwrap_or(0),
                frames_per_busy_pass = format_args!("{:.1}", frames as f64 / busy.max(1) as f64),
                idle_passes = idle,
                total_frames = now.0,
                total_busy_ns = now.2,
                "polling thread"
            );
            last[i] = now;
        }
    }
}

fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data, zeroed then filled by CPU_SET with a
    // CPU index bounds-checked against its size.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn run(switch: &Switch, options: &PmdOptions, stop: &AtomicBool) {
    let mut burst = Burst::new(switch.max_frame);
    let mut idle = 0u32;
    let stats = &options.stats;
    while !stop.load(Ordering::Relaxed) {
        let mut work = 0usize;
        let pass = Instant::now();
        for &src in &options.ports {
            let Some(port) = switch.ports.get(src) else {
                continue;
            };
            receive_burst(switch, port, &mut burst);
            if burst.count > 0 {
                work += burst.count;
                forward(switch, src, &mut burst);
            }
        }
        if work > 0 {
            idle = 0;
            let ns = u64::try_from(pass.elapsed().as_nanos()).unwrap_or(u64::MAX);
            stats.busy_ns.fetch_add(ns, Ordering::Relaxed);
            stats.busy_passes.fetch_add(1, Ordering::Relaxed);
            stats.frames.fetch_add(work as u64, Ordering::Relaxed);
            continue;
        }
        stats.idle_passes.fetch_add(1, Ordering::Relaxed);
        if options.idle_sleep.is_zero() {
            std::thread::yield_now();
        } else {
            idle = idle.saturating_add(1);
            if idle > IDLE_PASSES {
                std::thread::sleep(options.idle_sleep);
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Counts a dropped transmit chain by reason; a fault goes to the source
/// guest's IOMMU.
fn count_tx_drop(port: &Port, drop: &TxDrop) {
    let s = &port.stats;
    match drop {
        TxDrop::Malformed(_) | TxDrop::DeviceWritable => bump(&s.tx_malformed),
        TxDrop::Runt(_) => bump(&s.tx_runt),
        TxDrop::Oversize(_) => bump(&s.tx_oversize),
        TxDrop::Header(_) => bump(&s.tx_bad_header),
        TxDrop::Dma(e) => {
            bump(&s.tx_faults);
            if let Some(f) = e.fault() {
                port.dma.report_fault(f);
            }
        }
    }
    debug!(port = %port.name, reason = %drop, "transmit chain dropped");
}

/// Takes up to [`BURST`] frames off `port`'s transmit queue into `burst`,
/// completing their chains.
fn receive_burst(switch: &Switch, port: &Port, burst: &mut Burst) {
    burst.count = 0;
    let mut guard = lock(&port.queues[TXQ]);
    let state = &mut *guard;
    let Some(live) = state.live.as_mut() else {
        return;
    };
    if live.failed || !live.vring.get_ref().is_enabled() {
        return;
    }
    let batch = match state.dma.batch() {
        Ok(b) => b,
        Err(DmaError::NoMemory) => return,
        Err(e) => {
            debug!(port = %port.name, error = %e, "no batch");
            return;
        }
    };
    let mut view = match live.ring.view(&batch) {
        Ok(v) => v,
        Err(e) => {
            let why = port.ring_unreachable(&e);
            drop(batch);
            return state.fail(&port.name, TXQ, &why);
        }
    };
    if !live.quiet {
        view.disable_notification();
        live.quiet = true;
    }
    let mut completed = 0usize;
    let mut failure = None;
    while burst.count < BURST {
        match view.pop(&mut burst.chain) {
            Ok(true) => {
                let head = burst.chain.head;
                let frame = &mut burst.frames[burst.count];
                match tx::gather(&batch, &burst.chain, switch.max_frame, frame) {
                    Ok(()) => {
                        add(&port.stats.tx_bytes, (frame.len() - HDR_LEN) as u64);
                        burst.count += 1;
                    }
                    Err(d) => count_tx_drop(port, &d),
                }
                view.push_used(head, 0);
                completed += 1;
            }
            Ok(false) => break,
            Err(e) => {
                failure = Some(vhost_user_process::report_line(&e));
                break;
            }
        }
    }
    add(&port.stats.tx_frames, burst.count as u64);
    if completed > 0 {
        view.publish_used();
        if view.needs_notification() {
            port::notify(&port.name, &live.vring);
        }
    }
    drop(batch);
    if let Some(why) = failure {
        state.fail(&port.name, TXQ, &why);
    }
}

/// Decides each frame's destination and delivers the burst.
fn forward(switch: &Switch, src: PortId, burst: &mut Burst) {
    let n = burst.count;
    match switch.mode {
        ForwardMode::Io => {
            let peer = src ^ 1;
            let d = if peer < switch.ports.len() {
                Destination::Port(peer)
            } else {
                Destination::Drop
            };
            burst.dest[..n].fill(d);
        }
        ForwardMode::Learn => {
            burst.learn.clear();
            let view = switch.fib.view();
            for i in 0..n {
                let frame = &burst.frames[i][HDR_LEN..];
                let (Some(dst), Some(from)) = (Mac::destination_of(frame), Mac::source_of(frame))
                else {
                    burst.dest[i] = Destination::Drop;
                    continue;
                };
                burst.dest[i] = view.destination(dst, src);
                if !from.is_group() && !view.knows(from, src) && !burst.learn.contains(&from) {
                    burst.learn.push(from);
                }
            }
            // Learning takes the write lock: the burst's read view goes first.
            drop(view);
            for &mac in &burst.learn {
                if switch.fib.learn(mac, src) {
                    debug!(port = src, %mac, "address learned");
                }
            }
        }
    }
    if let Some(port) = switch.ports.get(src) {
        let hairpin = burst.dest[..n]
            .iter()
            .filter(|d| **d == Destination::Drop)
            .count();
        add(&port.stats.tx_hairpin, hairpin as u64);
    }
    for (dst, port) in switch.ports.iter().enumerate() {
        if dst == src {
            continue;
        }
        let mut mask = 0u32;
        for (i, d) in burst.dest[..n].iter().enumerate() {
            match d {
                Destination::Port(p) if *p == dst => mask |= 1 << i,
                Destination::Flood => mask |= 1 << i,
                _ => {}
            }
        }
        if mask != 0 {
            deliver_to(port, burst, mask);
        }
    }
}

/// Writes the frames of `mask` into `port`'s receive queue.
fn deliver_to(port: &Port, burst: &mut Burst, mask: u32) {
    let mut guard = lock(&port.queues[RXQ]);
    let state = &mut *guard;
    let live = match state.live.as_mut() {
        Some(l) if !l.failed && l.vring.get_ref().is_enabled() => l,
        _ => {
            add(&port.stats.rx_down, u64::from(mask.count_ones()));
            return;
        }
    };
    let batch = match state.dma.batch() {
        Ok(b) => b,
        Err(_) => {
            add(&port.stats.rx_down, u64::from(mask.count_ones()));
            return;
        }
    };
    let mut view = match live.ring.view(&batch) {
        Ok(v) => v,
        Err(e) => {
            let why = port.ring_unreachable(&e);
            drop(batch);
            return state.fail(&port.name, RXQ, &why);
        }
    };
    if !live.quiet {
        view.disable_notification();
        live.quiet = true;
    }
    let mrg = port.mrg_rxbuf();
    let s = &port.stats;
    let mut pushed = false;
    let mut failure = None;
    let mut remaining = mask;
    while remaining != 0 {
        let i = remaining.trailing_zeros() as usize;
        remaining &= remaining - 1;
        let frame = &mut burst.frames[i];
        match rx::deliver(&batch, &mut view, frame, mrg, &mut burst.rx) {
            Ok((outcome, bad)) => {
                add(&s.rx_bad_chains, bad as u64);
                pushed |= bad > 0;
                match outcome {
                    Delivery::Delivered(_) => {
                        bump(&s.rx_frames);
                        add(&s.rx_bytes, (frame.len() - HDR_LEN) as u64);
                        pushed = true;
                    }
                    Delivery::NoBuffers => {
                        // The ring is empty: the rest of the burst too.
                        add(&s.rx_no_buffers, 1 + u64::from(remaining.count_ones()));
                        break;
                    }
                    Delivery::TooBig => bump(&s.rx_too_big),
                    Delivery::Fault(e) => {
                        bump(&s.rx_faults);
                        pushed = true;
                        if let Some(f) = e.fault() {
                            port.dma.report_fault(f);
                        }
                    }
                }
            }
            Err(e) => {
                failure = Some(vhost_user_process::report_line(&e));
                break;
            }
        }
    }
    if pushed {
        view.publish_used();
        if view.needs_notification() {
            port::notify(&port.name, &live.vring);
        }
    }
    drop(batch);
    if let Some(why) = failure {
        state.fail(&port.name, RXQ, &why);
    }
}
