//! A VMM plus Linux virtio-blk driver stand-in for a vhost-user-blk
//! backend: feature negotiation (with `iommu_platform=on` as QEMU does it),
//! the memory table shared with the IOMMU daemon, one queue per requested
//! queue with its rings mapped as `dma_alloc_coherent` memory, and the ring
//! addresses handed over the way QEMU hands them: as its host address of
//! "guest-physical = IOVA".

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::VhostUserVirtioFeatures;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::blk_queue::{BlkQueue, QueueError};
use crate::connection::{Connection, ConnectionError, VringAddrs};
use crate::driver::Driver;
use crate::guest_dma::{DmaError, GuestDma};
use crate::memory::{GuestRam, Mem};

/// `VIRTIO_BLK_T_IN`: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Status: done.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Feature bits a Linux virtio-blk driver accepts.
const LINUX_BLK_FEATURES: [u32; 13] = [
    1,  // SIZE_MAX
    2,  // SEG_MAX
    5,  // RO
    6,  // BLK_SIZE
    9,  // FLUSH
    10, // TOPOLOGY
    11, // CONFIG_WCE
    12, // MQ
    13, // DISCARD
    14, // WRITE_ZEROES
    28, // RING_INDIRECT_DESC
    32, // VERSION_1
    4,  // GEOMETRY
];
/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u32 = 29;
/// `VIRTIO_F_ACCESS_PLATFORM`.
pub const ACCESS_PLATFORM: u32 = 33;
/// `VIRTIO_BLK_F_MQ`.
const MQ: u32 = 12;
/// Config space bytes read.
const CONFIG_LEN: u32 = 60;

/// How to bring the device up.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Queues wanted (capped by the device's `num_queues`).
    pub queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Negotiate EVENT_IDX if offered.
    pub event_idx: bool,
    /// The device sits behind the IOMMU (`iommu_platform=on`): it must
    /// offer ACCESS_PLATFORM, which is then left out of the features sent,
    /// as QEMU does.
    pub iommu_platform: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            queues: 1,
            queue_size: 256,
            event_idx: true,
            iommu_platform: false,
        }
    }
}

/// What went wrong bringing up or driving the device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// A vhost-user message.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// A ring.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The DMA layer (mapping the rings).
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// An eventfd.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The device lacks a feature the set-up needs.
    #[error("the device does not offer {0}")]
    Missing(&'static str),
}

/// The config space fields the driver uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Most data segments per request (SEG_MAX).
    pub seg_max: u32,
    /// Logical block size (BLK_SIZE).
    pub blk_size: u32,
    /// Queues (MQ).
    pub num_queues: u16,
    /// Write cache enabled.
    pub writeback: u8,
}

impl BlkConfig {
    /// Decodes the fields from the config bytes.
    pub fn from_bytes(b: &[u8]) -> BlkConfig {
        let u = |o: usize, n: usize| -> u64 {
            b.get(o..o + n)
                .map(|s| s.iter().rev().fold(0u64, |a, &x| a << 8 | u64::from(x)))
                .unwrap_or(0)
        };
        BlkConfig {
            capacity: u(0, 8),
            seg_max: u(12, 4) as u32,
            blk_size: u(20, 4) as u32,
            writeback: u(32, 1) as u8,
            num_queues: u(34, 2) as u16,
        }
    }
}

/// The guest side of a VM: its RAM, owned by the IOMMU's driver when the
/// VM has an IOMMU (one memfd for the daemon and the device, as in QEMU).
pub enum Guest {
    /// RAM and the IOMMU daemon's driver.
    WithIommu(Box<Driver>),
    /// RAM alone (no IOMMU).
    Plain(GuestRam),
}

impl Guest {
    /// Guest RAM.
    pub fn ram(&mut self) -> &mut GuestRam {
        match self {
            Guest::WithIommu(d) => d.ram(),
            Guest::Plain(r) => r,
        }
    }

    /// The IOMMU, if there is one.
    pub fn iommu(&mut self) -> Option<&mut Driver> {
        match self {
            Guest::WithIommu(d) => Some(d),
            Guest::Plain(_) => None,
        }
    }
}

/// One queue's notifiers.
struct Notifiers {
    kick: EventFd,
    call: EventFd,
}

/// A virtio-blk device driven over vhost-user.
pub struct BlkDevice {
    conn: Connection,
    mem: Mem,
    config: BlkConfig,
    offered: u64,
    acked: u64,
    queues: Vec<BlkQueue>,
    notifiers: Vec<Notifiers>,
}

impl BlkDevice {
    /// Connects to the backend at `socket` and brings the device up in
    /// `ram` (the same memfd the IOMMU daemon has): features, memory table,
    /// rings (mapped through `dma`; `iommu` is the IOMMU for the strict and
    /// lazy policies).
    pub fn connect(
        socket: &Path,
        guest: &mut Guest,
        opts: &BlkOptions,
        dma: &mut GuestDma,
    ) -> Result<BlkDevice, BlkError> {
        let mut conn = Connection::connect_device(socket, u64::from(opts.queues.max(1)))?;
        let config = BlkConfig::from_bytes(&conn.read_config(0, CONFIG_LEN)?);
        let offered = conn.offered_features();
        let mut want: u64 = LINUX_BLK_FEATURES.iter().fold(0, |a, &b| a | 1 << b);
        if opts.event_idx {
            want |= 1 << EVENT_IDX;
        }
        want |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if opts.iommu_platform && offered & (1 << ACCESS_PLATFORM) == 0 {
            return Err(BlkError::Missing(
                "VIRTIO_F_ACCESS_PLATFORM (iommu_platform=on)",
            ));
        }
        // With iommu_platform=on QEMU negotiates ACCESS_PLATFORM with the
        // guest but leaves it out of SET_FEATURES.
        let acked = offered & want;
        let event_idx = acked & (1 << EVENT_IDX) != 0;
        let count = if acked & (1 << MQ) != 0 {
            opts.queues.clamp(1, config.num_queues.max(1))
        } else {
            1
        };
        conn.set_features(acked)?;
        conn.set_mem_table(guest.ram())?;
        let mut queues = Vec::new();
        let mut notifiers = Vec::new();
        for index in 0..usize::from(count) {
            let mut q = BlkQueue::new(guest.ram(), opts.queue_size, event_idx)?;
            let g = q.gpa_addrs();
            let n = u64::from(g.size);
            let mut map = |gpa: vm_memory::GuestAddress, len| {
                dma.map_coherent(guest.iommu(), gpa.0, len)
                    .map(vm_memory::GuestAddress)
            };
            let dev = VringAddrs {
                size: g.size,
                desc: map(g.desc, 16 * n)?,
                avail: map(g.avail, 6 + 2 * n)?,
                used: map(g.used, 6 + 8 * n)?,
            };
            q.set_device_addrs(dev);
            let n = Notifiers {
                kick: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(BlkError::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(BlkError::EventFd)?,
            };
            // QEMU's rule: the ring addresses sent are its host addresses of
            // guest-physical = device address.
            conn.setup_vring(index, guest.ram(), &dev, &n.kick, &n.call)?;
            conn.enable_vring(index, true)?;
            queues.push(q);
            notifiers.push(n);
        }
        Ok(BlkDevice {
            conn,
            mem: guest.ram().mem().clone(),
            config,
            offered,
            acked,
            queues,
            notifiers,
        })
    }

    /// Pauses and resumes the device with the messages QEMU 11 sends for
    /// `stop` and `cont` (tests/guest/recorded/): every queue disabled and
    /// stopped with GET_VRING_BASE, then features, memory table and each
    /// queue set up again at the same rings, resuming at the base the
    /// backend returned. Requests must not be in flight.
    pub fn pause_and_resume(&mut self, ram: &GuestRam) -> Result<(), BlkError> {
        let count = self.queues.len();
        for index in 0..count {
            self.conn.enable_vring(index, false)?;
        }
        let mut bases = Vec::with_capacity(count);
        for index in 0..count {
            bases.push(self.conn.get_vring_base(index)?);
        }
        self.conn.set_features(self.acked)?;
        self.conn.set_mem_table(ram)?;
        for (index, base) in bases.into_iter().enumerate() {
            let dev = self.queues[index].device_addrs();
            let n = &self.notifiers[index];
            self.conn.set_vring_num(index, dev.size)?;
            self.conn.set_vring_base(index, base)?;
            self.conn.set_vring_addr(index, ram, &dev)?;
            self.conn.set_vring_kick(index, &n.kick)?;
            self.conn.set_vring_call(index, &n.call)?;
        }
        for index in 0..count {
            self.conn.enable_vring(index, true)?;
        }
        Ok(())
    }

    /// The config space read at connection.
    pub fn config(&self) -> BlkConfig {
        self.config
    }

    /// Features the backend offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Features sent with SET_FEATURES.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The vhost-user connection (config space access and the like).
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Guest memory.
    pub fn mem(&self) -> &Mem {
        &self.mem
    }

    /// Number of queues set up.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Queue `i`.
    pub fn queue(&mut self, i: usize) -> &mut BlkQueue {
        &mut self.queues[i]
    }

    /// Publishes queue `i`'s posted requests and kicks if the device asks.
    pub fn publish(&mut self, i: usize) -> Result<(), BlkError> {
        if self.queues[i].publish(&self.mem)? {
            self.notifiers[i].kick.write(1).map_err(BlkError::EventFd)?;
        }
        Ok(())
    }

    /// Polls the used rings for up to `spin`, then waits up to `timeout`
    /// for a call on any queue (after arming every queue); returns at once
    /// if a used entry is already there.
    pub fn wait(&mut self, spin: Duration, timeout: Duration) -> Result<(), BlkError> {
        if !spin.is_zero() {
            let until = std::time::Instant::now() + spin;
            loop {
                for q in &self.queues {
                    if q.has_used(&self.mem)? {
                        return Ok(());
                    }
                }
                if std::time::Instant::now() >= until {
                    break;
                }
                // Yield: the backend being waited for may need this CPU.
                std::thread::yield_now();
            }
        }
        for q in &mut self.queues {
            q.arm(&self.mem)?;
            if q.has_used(&self.mem)? {
                return Ok(());
            }
        }
        let mut fds: Vec<libc::pollfd> = self
            .notifiers
            .iter()
            .map(|n| libc::pollfd {
                fd: n.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a live array of pollfds for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(BlkError::EventFd(e));
            }
        }
        for n in &self.notifiers {
            let _ = n.call.read();
        }
        Ok(())
    }
}
