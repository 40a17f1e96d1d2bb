//! Network traffic as Linux guests would exchange it through their DMA
//! layers, several guests driven from one thread: each keeps receive
//! buffers posted (each mapped by its [`GuestDma`] policy when posted and
//! unmapped when the device returns it), sends test frames
//! ([`crate::net_frame`]) at a given rate in bursts (each mapped before the
//! device sees it, unmapped when it is done), and checks every frame it
//! receives.
//!
//! ```no_run
//! use viommu_frontend::net_load::{Flow, NetVm, NetVmOptions, TrafficOptions, run};
//!
//! // Two guests on two ports of one switch, no IOMMU.
//! let port = |p: &str| NetVmOptions { net_socket: p.into(), ..NetVmOptions::default() };
//! let mut vms = vec![NetVm::start(&port("/tmp/a.sock"))?, NetVm::start(&port("/tmp/b.sock"))?];
//! let (a, b) = (vms[0].mac(), vms[1].mac());
//! let flows = [
//!     Flow { count: Some(10_000), ..Flow::new(0, b) },
//!     Flow { count: Some(10_000), frame_len: 1514, ..Flow::new(1, a) },
//! ];
//! let reports = run(&mut vms, &flows, &TrafficOptions::default())?;
//! assert_eq!(reports[0].tx_completed, 10_000);
//! // At full rate a switch drops frames that find no receive buffer.
//! assert!(reports[1].rx_by_source.get(&0).is_some_and(|&n| n <= 10_000));
//! assert_eq!(reports[0].rx_corrupt + reports[1].rx_corrupt, 0);
//! # Ok::<(), viommu_frontend::net_load::NetLoadError>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::blk::Guest;
use crate::blk_queue::{Buf, QueueError, RawDesc};
use crate::driver::Driver;
use crate::guest_dma::{DmaError, DmaStats, GuestDma, Policy};
use crate::memory::GuestRam;
use crate::net::{NET_HDR_LEN, NetDevice, NetError, NetOptions, RX_QUEUE, TX_QUEUE, wait_many};
use crate::net_frame::{
    BROADCAST, FrameCheck, MAX_FRAME_LEN, MIN_FRAME_LEN, RxAssembler, RxEvent, build_frame,
    check_frame,
};

/// No completion and nothing received for this long, with frames in
/// flight: the device is stuck.
const STALL: Duration = Duration::from_secs(10);
/// Longest single wait for a call.
const WAIT: Duration = Duration::from_millis(100);
/// The tag [`NetVm::post_raw_tx`] posts with; [`run`] ignores its
/// completions.
pub const RAW_TAG: usize = usize::MAX;

/// Why a VM could not start or traffic failed.
#[derive(Debug, thiserror::Error)]
pub enum NetLoadError {
    /// The device.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The DMA layer.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// A queue.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// The device completed and delivered nothing for too long.
    #[error("VM {vm}: no completion for {waited:?} with {in_flight} frames in flight")]
    Stalled {
        /// The VM (index in the slice given to [`run`]).
        vm: usize,
        /// How long nothing happened.
        waited: Duration,
        /// Its transmit frames in flight.
        in_flight: usize,
    },
}

/// Where a [`NetVm`] connects and how.
#[derive(Clone, Debug)]
pub struct NetVmOptions {
    /// The vhost-user-net backend's socket (a switch port).
    pub net_socket: PathBuf,
    /// The vhost-user-iommu daemon's socket (not used with `off`).
    pub iommu_socket: Option<PathBuf>,
    /// DMA policy.
    pub policy: Policy,
    /// The device's endpoint ID.
    pub endpoint: u32,
    /// Domain for strict, lazy and static.
    pub domain: u32,
    /// Guest RAM; IOVAs are allocated in its upper half.
    pub ram_size: u64,
    /// The VM's MAC address; `None`: the config space's (with
    /// VIRTIO_NET_F_MAC), else a locally administered one made up here.
    pub mac: Option<[u8; 6]>,
    /// The device's options (`iommu_platform` follows the policy).
    pub net: NetOptions,
    /// Send what Linux sends at boot with CTRL_RX
    /// ([`NetDevice::boot_commands`], promiscuous off).
    pub boot_commands: bool,
}

impl Default for NetVmOptions {
    fn default() -> Self {
        NetVmOptions {
            net_socket: PathBuf::new(),
            iommu_socket: None,
            policy: Policy::Off,
            endpoint: 8,
            domain: 1,
            ram_size: 256 << 20,
            mac: None,
            net: NetOptions::default(),
            boot_commands: true,
        }
    }
}

/// A VM with one virtio-net device behind (or without) the IOMMU.
pub struct NetVm {
    /// RAM and the IOMMU.
    pub guest: Guest,
    /// The guest's DMA layer for the device.
    pub dma: GuestDma,
    /// The device.
    pub dev: NetDevice,
    mac: [u8; 6],
    boot_acks: Vec<u8>,
    /// Buffers of the traffic engine; they outlive a [`run`] since posted
    /// receive buffers cannot be taken back.
    traffic: Option<Traffic>,
}

/// A made-up locally administered MAC: 02:76:69, the process ID's low 16
/// bits, a counter.
fn made_up_mac() -> [u8; 6] {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let pid = std::process::id().to_be_bytes();
    [
        0x02,
        0x76,
        0x69,
        pid[2],
        pid[3],
        NEXT.fetch_add(1, Ordering::Relaxed),
    ]
}

impl NetVm {
    /// Connects everything, brings the device up and (with
    /// `boot_commands`) sends the boot-time control commands.
    pub fn start(opts: &NetVmOptions) -> Result<NetVm, NetLoadError> {
        let window = (opts.ram_size / 2, opts.ram_size);
        let mut dma = GuestDma::new(opts.policy, opts.endpoint, opts.domain, window);
        let mut net = opts.net.clone();
        net.iommu_platform = opts.policy != Policy::Off;
        let mut guest = match opts.policy {
            Policy::Off => Guest::Plain(GuestRam::new(opts.ram_size)?),
            _ => {
                let socket = opts.iommu_socket.as_deref().ok_or_else(|| {
                    NetLoadError::Options(format!("policy {} needs the IOMMU socket", opts.policy))
                })?;
                let driver = Driver::connect(
                    socket,
                    crate::driver::DriverOptions {
                        ram_size: opts.ram_size,
                        ..crate::driver::DriverOptions::default()
                    },
                )
                .map_err(|e| NetLoadError::Dma(DmaError::Iommu(e)))?;
                Guest::WithIommu(Box::new(driver))
            }
        };
        dma.attach(guest.iommu())?;
        let dev = NetDevice::connect(&opts.net_socket, &mut guest, &net, &mut dma)?;
        let mac = opts
            .mac
            .or_else(|| dev.config_mac())
            .unwrap_or_else(made_up_mac);
        let mut vm = NetVm {
            guest,
            dma,
            dev,
            mac,
            boot_acks: Vec::new(),
            traffic: None,
        };
        if opts.boot_commands {
            vm.boot_acks = vm.boot_commands(false)?;
        }
        Ok(vm)
    }

    /// The VM's MAC address (its frames' source, what it accepts).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The acks of the boot-time control commands (empty if none were sent).
    pub fn boot_acks(&self) -> &[u8] {
        &self.boot_acks
    }

    /// One control command ([`NetDevice::ctrl`]).
    pub fn ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<u8, NetLoadError> {
        Ok(self
            .dev
            .ctrl(&mut self.guest, &mut self.dma, class, cmd, data)?)
    }

    /// The boot-time control commands ([`NetDevice::boot_commands`]).
    pub fn boot_commands(&mut self, promisc: bool) -> Result<Vec<u8>, NetLoadError> {
        Ok(self
            .dev
            .boot_commands(&mut self.guest, &mut self.dma, promisc)?)
    }

    /// Posts descriptors exactly as given on the transmit queue (hostile
    /// chains: [`crate::blk_queue::BlkQueue::post_raw`]) and publishes
    /// them; [`run`] takes and ignores their completion.
    pub fn post_raw_tx(&mut self, raw: &[RawDesc]) -> Result<u16, NetLoadError> {
        let mem = self.dev.mem().clone();
        let head = self.dev.tx_queue().post_raw(&mem, raw, RAW_TAG)?;
        self.dev.publish(TX_QUEUE)?;
        Ok(head)
    }

    /// Sends one frame outside [`run`]: writes a zero header and `frame`
    /// to newly allocated guest RAM (never given back), maps it (one buffer, or the header and the frame as
    /// two with `split_header`) and posts and publishes it with `tag`
    /// (never [`RAW_TAG`]: [`run`] would ignore it). Returns the device
    /// addresses and lengths mapped, for the caller to unmap when the
    /// device is done.
    pub fn send_frame(
        &mut self,
        frame: &[u8],
        split_header: bool,
        tag: usize,
    ) -> Result<Vec<(u64, u64)>, NetLoadError> {
        let len = NET_HDR_LEN + frame.len();
        let gpa = self.guest.ram().alloc(len as u64, 64)?.0;
        let mapped = write_and_map(&mut self.guest, &mut self.dma, gpa, frame, split_header)?;
        let bufs = bufs_of(&mapped, gpa);
        self.dev.post_tx(&bufs, tag)?;
        self.dev.publish(TX_QUEUE)?;
        Ok(mapped)
    }
}

/// Writes a zero `virtio_net_hdr` and `frame` at `gpa` and maps them as
/// one buffer or two.
fn write_and_map(
    guest: &mut Guest,
    dma: &mut GuestDma,
    gpa: u64,
    frame: &[u8],
    split_header: bool,
) -> Result<Vec<(u64, u64)>, NetLoadError> {
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes.extend_from_slice(frame);
    guest
        .ram()
        .mem()
        .write_slice(&bytes, GuestAddress(gpa))
        .map_err(|_| QueueError::Access(gpa))?;
    let pieces: Vec<(u64, u64)> = if split_header {
        vec![
            (gpa, NET_HDR_LEN as u64),
            (gpa + NET_HDR_LEN as u64, frame.len() as u64),
        ]
    } else {
        vec![(gpa, bytes.len() as u64)]
    };
    let mut mapped = Vec::with_capacity(pieces.len());
    for (g, l) in pieces {
        match dma.map(guest.iommu(), g, l, false) {
            Ok(dev) => mapped.push((dev, l)),
            Err(e) => {
                for (d, l) in mapped {
                    dma.unmap(guest.iommu(), d, l)?;
                }
                return Err(e.into());
            }
        }
    }
    Ok(mapped)
}

/// The buffers of mapped pieces laid out back to back from `gpa`.
fn bufs_of(mapped: &[(u64, u64)], gpa: u64) -> Vec<Buf> {
    let mut at = gpa;
    mapped
        .iter()
        .map(|&(dev, len)| {
            let b = Buf {
                dev,
                gpa: at,
                len: len as u32,
            };
            at += len;
            b
        })
        .collect()
}

/// One stream of frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The sending VM (index in the slice given to [`run`]).
    pub from: usize,
    /// The number every frame carries as its source
    /// ([`NetReport::rx_by_source`] counts by it; the sequence order is
    /// checked per source).
    pub source: u32,
    /// Destination MAC ([`BROADCAST`] for broadcast).
    pub to_mac: [u8; 6],
    /// Ethernet frame length without the `virtio_net_hdr` (60 to 65535).
    pub frame_len: usize,
    /// Frames per second; 0: as fast as the ring takes them.
    pub rate: u64,
    /// Stop after this many frames (`None`: until the run's duration).
    pub count: Option<u64>,
}

impl Flow {
    /// 64-byte frames from VM `from` (source number `from`) to `to_mac`,
    /// unlimited rate, until the run's duration.
    pub fn new(from: usize, to_mac: [u8; 6]) -> Flow {
        Flow {
            from,
            source: from as u32,
            to_mac,
            frame_len: 64,
            rate: 0,
            count: None,
        }
    }
}

/// How to run traffic.
#[derive(Clone, Debug)]
pub struct TrafficOptions {
    /// Stop sending after this long (needed unless every flow has a count).
    pub duration: Option<Duration>,
    /// How long to poll the used rings before sleeping on the call
    /// eventfds (a vCPU's halt polling). Zero: sleep at once.
    pub spin: Duration,
    /// Bytes per receive buffer, header included; `None`: 1536 with
    /// MRG_RXBUF (what Linux posts for a 1500 MTU), 2048 without. Fixed by
    /// a VM's first run.
    pub rx_buffer_len: Option<u32>,
    /// Receive buffers kept posted; `None`: the queue size. Fixed by a
    /// VM's first run.
    pub rx_buffers: Option<usize>,
    /// Frames posted per publish (and kick) on each VM.
    pub tx_burst: usize,
    /// After sending stops, keep receiving this long (less if every frame
    /// sent to a VM of the run has arrived and every send completed).
    pub drain: Duration,
    /// Post the header and the frame as two descriptors instead of one
    /// buffer (Linux's `any_header_sg`).
    pub split_header: bool,
}

impl Default for TrafficOptions {
    fn default() -> Self {
        TrafficOptions {
            duration: None,
            spin: Duration::ZERO,
            rx_buffer_len: None,
            rx_buffers: None,
            tx_burst: 32,
            drain: Duration::from_millis(500),
            split_header: false,
        }
    }
}

/// What one VM did during a run.
#[derive(Clone, Debug, Default)]
pub struct NetReport {
    /// The VM's MAC.
    pub mac: [u8; 6],
    /// Frames posted for sending.
    pub tx_sent: u64,
    /// Frame bytes posted (without headers).
    pub tx_bytes: u64,
    /// Sent frames the device completed.
    pub tx_completed: u64,
    /// Frames received (whatever they held).
    pub rx_frames: u64,
    /// Their bytes (without headers).
    pub rx_bytes: u64,
    /// Intact test frames addressed to this VM or broadcast.
    pub rx_good: u64,
    /// Test frames with a wrong pattern or length.
    pub rx_corrupt: u64,
    /// Frames addressed to another MAC.
    pub rx_foreign: u64,
    /// Frames too short for a test frame or not test frames.
    pub rx_bad_header: u64,
    /// Good frames whose sequence number was not above the last one from
    /// their source.
    pub rx_out_of_order: u64,
    /// Headers with a wrong `num_buffers` (0 with MRG_RXBUF: dropped; not
    /// 1 without: counted only).
    pub rx_bad_num_buffers: u64,
    /// Used buffers shorter than a header or longer than the buffer.
    pub rx_bad_used_len: u64,
    /// Intact frames by source number.
    pub rx_by_source: BTreeMap<u32, u64>,
    /// Wall time of the run, drain included.
    pub elapsed: Duration,
    /// Wall time while sending.
    pub send_elapsed: Duration,
    /// IOMMU requests.
    pub dma: DmaStats,
}

impl NetReport {
    /// Frames sent per second of sending.
    pub fn tx_pps(&self) -> f64 {
        self.tx_sent as f64 / self.send_elapsed.as_secs_f64().max(1e-9)
    }

    /// Frames received per second of sending (those that arrive during
    /// the drain count too: the rate a receiver keeps up with).
    pub fn rx_pps(&self) -> f64 {
        self.rx_frames as f64 / self.send_elapsed.as_secs_f64().max(1e-9)
    }
}

/// A transmit buffer: header and frame at `gpa`, `cap` bytes.
struct TxSlot {
    gpa: u64,
    cap: u64,
    /// Device addresses and lengths mapped while in flight.
    mapped: Vec<(u64, u64)>,
}

/// One VM's engine buffers.
struct Traffic {
    rx_len: u32,
    rx_target: usize,
    rx_slots: Vec<u64>,
    /// Device address of each posted receive buffer.
    rx_flight: Vec<Option<u64>>,
    rx_free: Vec<usize>,
    tx_slots: Vec<TxSlot>,
    tx_free: Vec<usize>,
    tx_in_flight: usize,
    asm: RxAssembler,
}

impl Traffic {
    fn new(
        vm: &mut NetVm,
        opts: &TrafficOptions,
        queue_size: usize,
    ) -> Result<Traffic, NetLoadError> {
        let mrg = vm.dev.mrg_rxbuf();
        let rx_len = opts.rx_buffer_len.unwrap_or(if mrg { 1536 } else { 2048 });
        if (rx_len as usize) < NET_HDR_LEN + usize::from(!mrg) * MIN_FRAME_LEN {
            return Err(NetLoadError::Options(format!(
                "receive buffers of {rx_len} bytes cannot hold a header and a frame"
            )));
        }
        let rx_target = opts.rx_buffers.unwrap_or(queue_size).clamp(1, queue_size);
        let mut rx_slots = Vec::with_capacity(rx_target);
        for _ in 0..rx_target {
            rx_slots.push(vm.guest.ram().alloc(u64::from(rx_len), 64)?.0);
        }
        Ok(Traffic {
            rx_len,
            rx_target,
            rx_flight: vec![None; rx_target],
            rx_free: (0..rx_target).rev().collect(),
            rx_slots,
            tx_slots: Vec::new(),
            tx_free: Vec::new(),
            tx_in_flight: 0,
            asm: RxAssembler::new(mrg),
        })
    }
}

/// A flow's progress in a run.
#[derive(Clone, Copy, Default)]
struct FlowState {
    sent: u64,
}

/// Checks options and flows.
fn validate(vms: &[NetVm], flows: &[Flow], opts: &TrafficOptions) -> Result<(), NetLoadError> {
    let bad = |m: String| Err(NetLoadError::Options(m));
    if opts.tx_burst == 0 {
        return bad("the transmit burst must be at least 1".into());
    }
    for (i, f) in flows.iter().enumerate() {
        if f.from >= vms.len() {
            return bad(format!("flow {i} is from VM {}, of {}", f.from, vms.len()));
        }
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&f.frame_len) {
            return bad(format!(
                "flow {i}: frames of {} bytes (from {MIN_FRAME_LEN} to {MAX_FRAME_LEN})",
                f.frame_len
            ));
        }
        if f.count.is_none() && opts.duration.is_none() {
            return bad(format!("flow {i} has no count and the run no duration"));
        }
    }
    if flows.is_empty() && opts.duration.is_none() {
        return bad("give a duration or flows".into());
    }
    Ok(())
}

/// Runs `flows` between `vms` (and whatever else is on the switch) from
/// this thread, and returns one report per VM, in order. Every receive
/// buffer and every transmitted frame goes through the VM's DMA policy.
pub fn run(
    vms: &mut [NetVm],
    flows: &[Flow],
    opts: &TrafficOptions,
) -> Result<Vec<NetReport>, NetLoadError> {
    validate(vms, flows, opts)?;
    for vm in vms.iter_mut() {
        if vm.traffic.is_none() {
            let qs = usize::from(vm.dev.rx_queue().device_addrs().size);
            vm.traffic = Some(Traffic::new(vm, opts, qs)?);
        }
    }
    // Each source's frame length, when all its flows agree.
    let mut lens: HashMap<u32, Option<usize>> = HashMap::new();
    for f in flows {
        lens.entry(f.source)
            .and_modify(|l| {
                if *l != Some(f.frame_len) {
                    *l = None
                }
            })
            .or_insert(Some(f.frame_len));
    }
    let expected_len = |s: u32| lens.get(&s).copied().flatten();
    let mut reports: Vec<NetReport> = vms
        .iter()
        .map(|vm| NetReport {
            mac: vm.mac,
            ..NetReport::default()
        })
        .collect();
    let before: Vec<DmaStats> = vms.iter().map(|vm| vm.dma.stats()).collect();
    let mut last_seq: Vec<HashMap<u32, u64>> = vec![HashMap::new(); vms.len()];
    let mut state = vec![FlowState::default(); flows.len()];
    let start = Instant::now();
    let mut send_end: Option<Instant> = None;
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        let elapsed = now - start;
        let sending = send_end.is_none()
            && opts.duration.is_none_or(|d| elapsed < d)
            && flows
                .iter()
                .zip(&state)
                .any(|(f, s)| f.count.is_none_or(|c| s.sent < c));
        if !sending && send_end.is_none() {
            send_end = Some(now);
        }
        let mut progress = false;
        // Every guest's receive buffers first: a frame sent to a guest
        // whose buffers are not posted yet is dropped.
        for vm in vms.iter_mut() {
            progress |= refill_rx(vm)?;
        }
        for (i, vm) in vms.iter_mut().enumerate() {
            let r = &mut reports[i];
            if sending {
                progress |= send(vm, i, flows, &mut state, elapsed, opts, r)?;
            }
            progress |= reap_tx(vm, r)?;
            progress |= reap_rx(vm, r, &mut last_seq[i], &expected_len)?;
            vm.dma.flush(vm.guest.iommu(), false)?;
        }
        // The drain ends on time even if frames keep coming.
        if send_end.is_some_and(|end| now >= end + opts.drain) {
            break;
        }
        if progress {
            last_progress = Instant::now();
            continue;
        }
        let in_flight: Vec<usize> = vms
            .iter()
            .map(|vm| vm.traffic.as_ref().map_or(0, |t| t.tx_in_flight))
            .collect();
        if let Some(end) = send_end {
            let done = in_flight.iter().all(|&n| n == 0)
                && vms
                    .iter()
                    .all(|vm| vm.traffic.as_ref().is_none_or(|t| !t.asm.in_progress()))
                && all_arrived(vms, flows, &state, &reports);
            if done || Instant::now() >= end + opts.drain {
                break;
            }
        }
        if let Some((vm, &n)) = in_flight.iter().enumerate().find(|(_, n)| **n > 0) {
            if last_progress.elapsed() > STALL {
                return Err(NetLoadError::Stalled {
                    vm,
                    waited: last_progress.elapsed(),
                    in_flight: n,
                });
            }
        }
        let mut timeout = WAIT;
        if sending {
            if let Some(d) = opts.duration {
                timeout = timeout.min(d.saturating_sub(elapsed));
            }
            for (f, s) in flows.iter().zip(&state) {
                if f.rate > 0 {
                    let due = Duration::from_secs_f64(s.sent as f64 / f.rate as f64);
                    timeout = timeout.min(due.saturating_sub(elapsed));
                }
            }
        } else if let Some(end) = send_end {
            timeout = timeout.min((end + opts.drain).saturating_duration_since(now));
        }
        let mut devs: Vec<&mut NetDevice> = vms.iter_mut().map(|vm| &mut vm.dev).collect();
        wait_many(&mut devs, opts.spin, timeout)?;
    }
    let end = Instant::now();
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.dma.flush(vm.guest.iommu(), true)?;
        let after = vm.dma.stats();
        let r = &mut reports[i];
        r.elapsed = end - start;
        r.send_elapsed = send_end.unwrap_or(end) - start;
        r.dma = DmaStats {
            maps: after.maps - before[i].maps,
            unmaps: after.unmaps - before[i].unmaps,
            batches: after.batches - before[i].batches,
        };
    }
    Ok(reports)
}

/// Whether every frame sent to a VM of the run has arrived intact there.
fn all_arrived(vms: &[NetVm], flows: &[Flow], state: &[FlowState], reports: &[NetReport]) -> bool {
    let mut want: HashMap<(usize, u32), u64> = HashMap::new();
    for (f, s) in flows.iter().zip(state) {
        for (j, vm) in vms.iter().enumerate() {
            if j != f.from && (f.to_mac == vm.mac || f.to_mac == BROADCAST) {
                *want.entry((j, f.source)).or_default() += s.sent;
            }
        }
    }
    want.iter()
        .all(|(&(j, src), &n)| reports[j].rx_by_source.get(&src).copied().unwrap_or(0) >= n)
}

/// Keeps the receive buffers posted; true if any was posted.
fn refill_rx(vm: &mut NetVm) -> Result<bool, NetLoadError> {
    let Some(t) = vm.traffic.as_mut() else {
        return Ok(false);
    };
    let mut posted = false;
    while let Some(&s) = t.rx_free.last() {
        if vm.dev.rx_queue().free_descriptors() == 0 {
            break;
        }
        let gpa = t.rx_slots[s];
        let len = u64::from(t.rx_len);
        let dev = vm.dma.map(vm.guest.iommu(), gpa, len, true)?;
        let buf = Buf {
            dev,
            gpa,
            len: t.rx_len,
        };
        if let Err(e) = vm.dev.post_rx(buf, s) {
            vm.dma.unmap(vm.guest.iommu(), dev, len)?;
            return Err(e.into());
        }
        t.rx_free.pop();
        t.rx_flight[s] = Some(dev);
        posted = true;
    }
    debug_assert!(t.rx_free.len() <= t.rx_target);
    if posted {
        vm.dev.publish(RX_QUEUE)?;
    }
    Ok(posted)
}

/// Posts the frames due on VM `i`'s flows, up to a burst; true if any.
fn send(
    vm: &mut NetVm,
    i: usize,
    flows: &[Flow],
    state: &mut [FlowState],
    elapsed: Duration,
    opts: &TrafficOptions,
    r: &mut NetReport,
) -> Result<bool, NetLoadError> {
    let Some(t) = vm.traffic.as_mut() else {
        return Ok(false);
    };
    let per_frame = if opts.split_header { 2 } else { 1 };
    let mut posted = 0usize;
    'burst: while posted < opts.tx_burst {
        let mut any = false;
        for (f, s) in flows.iter().zip(state.iter_mut()) {
            if f.from != i || f.count.is_some_and(|c| s.sent >= c) {
                continue;
            }
            if f.rate > 0 && s.sent as f64 > elapsed.as_secs_f64() * f.rate as f64 {
                continue;
            }
            if vm.dev.tx_queue().free_descriptors() < per_frame {
                break 'burst;
            }
            let need = (NET_HDR_LEN + f.frame_len) as u64;
            let slot = match t.tx_free.pop() {
                Some(s) => s,
                None if t.tx_slots.len() < usize::from(vm.dev.tx_queue().device_addrs().size) => {
                    t.tx_slots.push(TxSlot {
                        gpa: 0,
                        cap: 0,
                        mapped: Vec::new(),
                    });
                    t.tx_slots.len() - 1
                }
                None => break 'burst,
            };
            if t.tx_slots[slot].cap < need {
                // Grown buffers are not given back: the bump allocator
                // keeps what it gave.
                let cap = need.next_multiple_of(64);
                t.tx_slots[slot].gpa = vm.guest.ram().alloc(cap, 64)?.0;
                t.tx_slots[slot].cap = cap;
            }
            let gpa = t.tx_slots[slot].gpa;
            let frame = build_frame(f.to_mac, vm.mac, f.source, s.sent, f.frame_len);
            let mapped =
                match write_and_map(&mut vm.guest, &mut vm.dma, gpa, &frame, opts.split_header) {
                    Ok(m) => m,
                    Err(e) => {
                        t.tx_free.push(slot);
                        return Err(e);
                    }
                };
            vm.dev.post_tx(&bufs_of(&mapped, gpa), slot)?;
            t.tx_slots[slot].mapped = mapped;
            t.tx_in_flight += 1;
            s.sent += 1;
            r.tx_sent += 1;
            r.tx_bytes += f.frame_len as u64;
            posted += 1;
            any = true;
            if posted >= opts.tx_burst {
                break 'burst;
            }
        }
        if !any {
            break;
        }
    }
    if posted > 0 {
        vm.dev.publish(TX_QUEUE)?;
    }
    Ok(posted > 0)
}

/// Takes transmit completions and unmaps their frames; true if any.
fn reap_tx(vm: &mut NetVm, r: &mut NetReport) -> Result<bool, NetLoadError> {
    let Some(t) = vm.traffic.as_mut() else {
        return Ok(false);
    };
    let mem = vm.dev.mem().clone();
    let mut any = false;
    while let Some(c) = vm.dev.tx_queue().pop(&mem)? {
        any = true;
        let Some(slot) = t.tx_slots.get_mut(c.tag) else {
            continue;
        };
        if slot.mapped.is_empty() {
            continue;
        }
        for (dev, len) in std::mem::take(&mut slot.mapped) {
            vm.dma.unmap(vm.guest.iommu(), dev, len)?;
        }
        t.tx_free.push(c.tag);
        t.tx_in_flight -= 1;
        r.tx_completed += 1;
    }
    Ok(any)
}

/// Takes received buffers: unmaps them, reassembles and checks the
/// frames; true if any.
fn reap_rx(
    vm: &mut NetVm,
    r: &mut NetReport,
    last_seq: &mut HashMap<u32, u64>,
    expected_len: &impl Fn(u32) -> Option<usize>,
) -> Result<bool, NetLoadError> {
    let Some(t) = vm.traffic.as_mut() else {
        return Ok(false);
    };
    let mem = vm.dev.mem().clone();
    let mut any = false;
    while let Some(c) = vm.dev.rx_queue().pop(&mem)? {
        any = true;
        let Some(dev) = t.rx_flight.get_mut(c.tag).and_then(Option::take) else {
            continue;
        };
        vm.dma.unmap(vm.guest.iommu(), dev, u64::from(t.rx_len))?;
        t.rx_free.push(c.tag);
        if c.used_len > t.rx_len {
            r.rx_bad_used_len += 1;
        }
        let n = c.used_len.min(t.rx_len) as usize;
        let mut bytes = vec![0u8; n];
        let gpa = t.rx_slots[c.tag];
        mem.read_slice(&mut bytes, GuestAddress(gpa))
            .map_err(|_| QueueError::Access(gpa))?;
        let frame = match t.asm.push(&bytes) {
            RxEvent::Partial => continue,
            RxEvent::Packet(f) => f,
            RxEvent::ShortBuffer => {
                r.rx_bad_used_len += 1;
                continue;
            }
            RxEvent::BadNumBuffers { frame, .. } => {
                r.rx_bad_num_buffers += 1;
                match frame {
                    Some(f) => f,
                    None => continue,
                }
            }
        };
        r.rx_frames += 1;
        r.rx_bytes += frame.len() as u64;
        match check_frame(&frame, vm.mac, expected_len) {
            FrameCheck::Good { source, seq } => {
                r.rx_good += 1;
                *r.rx_by_source.entry(source).or_default() += 1;
                if last_seq.get(&source).is_some_and(|&l| seq <= l) {
                    r.rx_out_of_order += 1;
                } else {
                    last_seq.insert(source, seq);
                }
            }
            FrameCheck::Foreign => r.rx_foreign += 1,
            FrameCheck::BadHeader => r.rx_bad_header += 1,
            FrameCheck::Corrupt { .. } => r.rx_corrupt += 1,
        }
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_pieces_are_laid_out_back_to_back() {
        let b = bufs_of(&[(0x10_0000, 12), (0x20_000c, 64)], 0x1000);
        assert_eq!(
            b,
            vec![
                Buf {
                    dev: 0x10_0000,
                    gpa: 0x1000,
                    len: 12
                },
                Buf {
                    dev: 0x20_000c,
                    gpa: 0x100c,
                    len: 64
                },
            ]
        );
    }

    #[test]
    fn made_up_macs_are_local_unicast_and_distinct() {
        let (a, b) = (made_up_mac(), made_up_mac());
        assert_eq!(a[0] & 3, 2, "locally administered, unicast");
        assert_ne!(a, b);
    }

    #[test]
    fn a_flow_by_default_sends_small_frames_at_full_rate() {
        let f = Flow::new(1, BROADCAST);
        assert_eq!((f.source, f.frame_len, f.rate, f.count), (1, 64, 0, None));
    }
}
