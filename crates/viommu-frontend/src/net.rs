//! A VMM plus Linux virtio-net driver stand-in for a vhost-user-net
//! backend (virtio 1.2 §5.1): one queue pair (receiveq 0, transmitq 1) and
//! the control queue (2) when VIRTIO_NET_F_CTRL_VQ is negotiated; feature
//! negotiation, memory table and rings exactly as [`crate::blk`] does them
//! (rings mapped as `dma_alloc_coherent` memory, ring addresses handed over
//! as QEMU hands them, ACCESS_PLATFORM left out of SET_FEATURES).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserVirtioFeatures;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::blk::{ACCESS_PLATFORM, Guest};
use crate::blk_queue::{BlkQueue, Buf, Completion, QueueError};
use crate::connection::{Connection, ConnectionError, VringAddrs};
use crate::guest_dma::{DmaError, GuestDma};
use crate::memory::Mem;

/// `VIRTIO_NET_F_MTU`: the config space's `mtu` is valid.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// `VIRTIO_NET_F_MAC`: the config space's `mac` is valid.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// `VIRTIO_NET_F_MRG_RXBUF`: a received packet may span several buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// `VIRTIO_NET_F_STATUS`: the config space's `status` is valid.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// `VIRTIO_NET_F_CTRL_VQ`: there is a control queue.
pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
/// `VIRTIO_NET_F_CTRL_RX`: the RX mode commands (promiscuous, MAC table).
pub const VIRTIO_NET_F_CTRL_RX: u32 = 18;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
const INDIRECT_DESC: u32 = 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u32 = 29;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Config space `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The control queue's index (with CTRL_VQ).
pub const CTRL_QUEUE: usize = 2;
/// Bytes of `struct virtio_net_hdr` (with `num_buffers`: VERSION_1).
pub const NET_HDR_LEN: usize = 12;

/// Control class: RX mode.
pub const VIRTIO_NET_CTRL_RX: u8 = 0;
/// RX command: promiscuous mode on (1) or off (0).
pub const VIRTIO_NET_CTRL_RX_PROMISC: u8 = 0;
/// RX command: all-multicast on (1) or off (0).
pub const VIRTIO_NET_CTRL_RX_ALLMULTI: u8 = 1;
/// Control class: MAC filtering.
pub const VIRTIO_NET_CTRL_MAC: u8 = 1;
/// MAC command: set the unicast and multicast filter tables.
pub const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = 0;
/// Control ack: done.
pub const VIRTIO_NET_OK: u8 = 0;
/// Control ack: failed.
pub const VIRTIO_NET_ERR: u8 = 1;

/// Config space bytes read: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: u32 = 12;
/// Control page layout: class and command at 0, the ack at 64, data from 128.
const CTRL_ACK: u64 = 64;
const CTRL_DATA: u64 = 128;
const CTRL_PAGE: u64 = 4096;

/// How to bring the device up.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Entries per queue (a power of two).
    pub queue_size: u16,
    /// Negotiate EVENT_IDX if offered.
    pub event_idx: bool,
    /// The device sits behind the IOMMU (`iommu_platform=on`): it must
    /// offer ACCESS_PLATFORM, which is then left out of the features sent,
    /// as QEMU does.
    pub iommu_platform: bool,
    /// Negotiate MRG_RXBUF if offered.
    pub mrg_rxbuf: bool,
    /// Negotiate CTRL_VQ and CTRL_RX if offered.
    pub ctrl: bool,
    /// Longest [`NetDevice::ctrl`] waits for the device's answer.
    pub ctrl_timeout: Duration,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            queue_size: 256,
            event_idx: true,
            iommu_platform: false,
            mrg_rxbuf: true,
            ctrl: true,
            ctrl_timeout: Duration::from_secs(5),
        }
    }
}

/// What went wrong bringing up or driving the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A vhost-user message.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// A ring.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The DMA layer.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// An eventfd.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The device lacks a feature the set-up needs.
    #[error("the device does not offer {0}")]
    Missing(&'static str),
    /// A control command on a device without a control queue.
    #[error("no control queue (VIRTIO_NET_F_CTRL_VQ not negotiated)")]
    NoCtrlQueue,
    /// Control command data longer than the control page holds.
    #[error("control command data of {0} bytes is too long")]
    CtrlTooLong(usize),
    /// The device did not answer a control command in time.
    #[error("no answer to control command {class}/{cmd} within {waited:?}")]
    CtrlTimeout {
        /// Class.
        class: u8,
        /// Command.
        cmd: u8,
        /// How long it was waited for.
        waited: Duration,
    },
    /// A control command is still unanswered from an earlier call.
    #[error("an earlier control command is still unanswered")]
    CtrlBusy,
}

/// The config space fields the driver uses (each valid only with its
/// feature: MAC, STATUS, MQ, MTU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_*` bits.
    pub status: u16,
    /// Queue pairs the device has (MQ).
    pub max_virtqueue_pairs: u16,
    /// Largest MTU the driver should use (MTU).
    pub mtu: u16,
}

impl NetConfig {
    /// Decodes the fields from the config bytes (missing bytes read 0).
    pub fn from_bytes(b: &[u8]) -> NetConfig {
        let u16_at = |o: usize| {
            b.get(o..o + 2)
                .map(|s| u16::from_le_bytes([s[0], s[1]]))
                .unwrap_or(0)
        };
        let mut mac = [0u8; 6];
        if let Some(s) = b.get(..6) {
            mac.copy_from_slice(s);
        }
        NetConfig {
            mac,
            status: u16_at(6),
            max_virtqueue_pairs: u16_at(8),
            mtu: u16_at(10),
        }
    }

    /// Whether the status says the link is up.
    pub fn link_up(&self) -> bool {
        self.status & VIRTIO_NET_S_LINK_UP != 0
    }
}

/// The data of MAC TABLE_SET: the unicast table then the multicast table,
/// each a little-endian u32 count followed by that many 6-byte addresses.
pub fn mac_table_set_data(unicast: &[[u8; 6]], multicast: &[[u8; 6]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 6 * (unicast.len() + multicast.len()));
    for table in [unicast, multicast] {
        out.extend_from_slice(&(table.len() as u32).to_le_bytes());
        for mac in table {
            out.extend_from_slice(mac);
        }
    }
    out
}

/// A control command's buffers in the control page at `page` (guest
/// address, length, device-writable), in chain order: class and command,
/// the data (if any), the ack byte.
fn ctrl_pieces(page: u64, data_len: usize) -> Vec<(u64, u32, bool)> {
    let mut pieces = vec![(page, 2u32, false)];
    if data_len > 0 {
        pieces.push((page + CTRL_DATA, data_len as u32, false));
    }
    pieces.push((page + CTRL_ACK, 1, true));
    pieces
}

/// One queue's notifiers.
struct Notifiers {
    kick: EventFd,
    call: EventFd,
}

/// A control command the device has not answered: its tag and the device
/// addresses and lengths mapped for it.
struct CtrlPending {
    tag: usize,
    mapped: Vec<(u64, u64)>,
}

/// A virtio-net device driven over vhost-user.
pub struct NetDevice {
    conn: Connection,
    mem: Mem,
    config: NetConfig,
    offered: u64,
    acked: u64,
    queues: Vec<BlkQueue>,
    notifiers: Vec<Notifiers>,
    /// The control commands' page (guest-physical), with CTRL_VQ.
    ctrl_page: Option<u64>,
    ctrl_pending: Option<CtrlPending>,
    ctrl_tag: usize,
    ctrl_timeout: Duration,
}

impl NetDevice {
    /// Connects to the backend at `socket` and brings the device up in the
    /// guest's RAM (the same memfd the IOMMU daemon has): features, config
    /// space, memory table, rings (mapped through `dma`). Fails if the
    /// device does not offer VERSION_1.
    pub fn connect(
        socket: &Path,
        guest: &mut Guest,
        opts: &NetOptions,
        dma: &mut GuestDma,
    ) -> Result<NetDevice, NetError> {
        let mut conn = Connection::connect_device(socket, 3)?;
        let offered = conn.offered_features();
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(NetError::Missing("VIRTIO_F_VERSION_1"));
        }
        if opts.iommu_platform && offered & (1 << ACCESS_PLATFORM) == 0 {
            return Err(NetError::Missing(
                "VIRTIO_F_ACCESS_PLATFORM (iommu_platform=on)",
            ));
        }
        let config = NetConfig::from_bytes(&conn.read_config(0, CONFIG_LEN)?);
        let mut want: u64 = [
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            INDIRECT_DESC,
            VIRTIO_F_VERSION_1,
        ]
        .iter()
        .fold(0, |a, &b| a | 1 << b);
        if opts.mrg_rxbuf {
            want |= 1 << VIRTIO_NET_F_MRG_RXBUF;
        }
        // CTRL_RX depends on CTRL_VQ (§5.1.3.1).
        if opts.ctrl && offered & (1 << VIRTIO_NET_F_CTRL_VQ) != 0 {
            want |= 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_CTRL_RX;
        }
        if opts.event_idx {
            want |= 1 << EVENT_IDX;
        }
        want |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // With iommu_platform=on QEMU negotiates ACCESS_PLATFORM with the
        // guest but leaves it out of SET_FEATURES.
        let acked = offered & want;
        let event_idx = acked & (1 << EVENT_IDX) != 0;
        let count = if acked & (1 << VIRTIO_NET_F_CTRL_VQ) != 0 {
            3
        } else {
            2
        };
        conn.set_features(acked)?;
        conn.set_mem_table(guest.ram())?;
        let mut queues = Vec::new();
        let mut notifiers = Vec::new();
        for index in 0..count {
            let mut q = BlkQueue::new(guest.ram(), opts.queue_size, event_idx)?;
            let g = q.gpa_addrs();
            let n = u64::from(g.size);
            let mut map = |gpa: GuestAddress, len| {
                dma.map_coherent(guest.iommu(), gpa.0, len)
                    .map(GuestAddress)
            };
            let dev = VringAddrs {
                size: g.size,
                desc: map(g.desc, 16 * n)?,
                avail: map(g.avail, 6 + 2 * n)?,
                used: map(g.used, 6 + 8 * n)?,
            };
            q.set_device_addrs(dev);
            let n = Notifiers {
                kick: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(NetError::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(NetError::EventFd)?,
            };
            // QEMU's rule: the ring addresses sent are its host addresses of
            // guest-physical = device address.
            conn.setup_vring(index, guest.ram(), &dev, &n.kick, &n.call)?;
            conn.enable_vring(index, true)?;
            queues.push(q);
            notifiers.push(n);
        }
        let ctrl_page = if count == 3 {
            Some(guest.ram().alloc(CTRL_PAGE, CTRL_PAGE)?.0)
        } else {
            None
        };
        Ok(NetDevice {
            conn,
            mem: guest.ram().mem().clone(),
            config,
            offered,
            acked,
            queues,
            notifiers,
            ctrl_page,
            ctrl_pending: None,
            ctrl_tag: 0,
            ctrl_timeout: opts.ctrl_timeout,
        })
    }

    /// The config space read at connection.
    pub fn config(&self) -> NetConfig {
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

    /// Whether feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.acked & (1 << bit) != 0
    }

    /// Whether received packets may span several buffers (MRG_RXBUF).
    pub fn mrg_rxbuf(&self) -> bool {
        self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// The MAC address the config space gives, if MAC was negotiated.
    pub fn config_mac(&self) -> Option<[u8; 6]> {
        self.has_feature(VIRTIO_NET_F_MAC)
            .then_some(self.config.mac)
    }

    /// Whether the link is up (always, without STATUS, as the spec says).
    pub fn link_up(&self) -> bool {
        !self.has_feature(VIRTIO_NET_F_STATUS) || self.config.link_up()
    }

    /// The vhost-user connection (config space access and the like).
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Guest memory.
    pub fn mem(&self) -> &Mem {
        &self.mem
    }

    /// Number of queues set up (2, or 3 with the control queue).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Queue `i` ([`RX_QUEUE`], [`TX_QUEUE`], [`CTRL_QUEUE`]).
    pub fn queue(&mut self, i: usize) -> &mut BlkQueue {
        &mut self.queues[i]
    }

    /// The receive queue.
    pub fn rx_queue(&mut self) -> &mut BlkQueue {
        &mut self.queues[RX_QUEUE]
    }

    /// The transmit queue.
    pub fn tx_queue(&mut self) -> &mut BlkQueue {
        &mut self.queues[TX_QUEUE]
    }

    /// The control queue, with CTRL_VQ.
    pub fn ctrl_queue(&mut self) -> Option<&mut BlkQueue> {
        self.queues.get_mut(CTRL_QUEUE)
    }

    /// Queues one device-writable receive buffer (not yet visible:
    /// [`Self::publish`]).
    pub fn post_rx(&mut self, buf: Buf, tag: usize) -> Result<u16, NetError> {
        Ok(self.queues[RX_QUEUE].post_chain(&self.mem, &[(buf, true)], tag)?)
    }

    /// Queues one packet to send as device-readable buffers in this order
    /// (header and frame in one buffer, or the header, then the frame).
    pub fn post_tx(&mut self, bufs: &[Buf], tag: usize) -> Result<u16, NetError> {
        let chain: Vec<(Buf, bool)> = bufs.iter().map(|b| (*b, false)).collect();
        Ok(self.queues[TX_QUEUE].post_chain(&self.mem, &chain, tag)?)
    }

    /// Publishes queue `i`'s posted buffers and kicks if the device asks.
    pub fn publish(&mut self, i: usize) -> Result<(), NetError> {
        if self.queues[i].publish(&self.mem)? {
            self.notifiers[i].kick.write(1).map_err(NetError::EventFd)?;
        }
        Ok(())
    }

    /// Takes queue `i`'s next used entry.
    pub fn pop(&mut self, i: usize) -> Result<Option<Completion>, NetError> {
        Ok(self.queues[i].pop(&self.mem)?)
    }

    /// Whether any queue has used entries not taken yet.
    pub fn has_used(&self) -> Result<bool, NetError> {
        for q in &self.queues {
            if q.has_used(&self.mem)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Polls the used rings for up to `spin`, then waits up to `timeout`
    /// for a call on any queue (after arming every queue); returns at once
    /// if a used entry is already there.
    pub fn wait(&mut self, spin: Duration, timeout: Duration) -> Result<(), NetError> {
        wait_many(&mut [self], spin, timeout)
    }

    /// Sends a control command and waits for its answer: the chain is the
    /// class and command (2 bytes), the data (if any), each device-readable
    /// and mapped on its own as Linux's `virtnet_send_command` maps them,
    /// then the device-writable ack byte (written 0xff first, so an ack the
    /// device never wrote reads 0xff). Returns the ack
    /// ([`VIRTIO_NET_OK`], [`VIRTIO_NET_ERR`], or whatever the device wrote).
    pub fn ctrl(
        &mut self,
        guest: &mut Guest,
        dma: &mut GuestDma,
        class: u8,
        cmd: u8,
        data: &[u8],
    ) -> Result<u8, NetError> {
        let page = self.ctrl_page.ok_or(NetError::NoCtrlQueue)?;
        if data.len() as u64 > CTRL_PAGE - CTRL_DATA {
            return Err(NetError::CtrlTooLong(data.len()));
        }
        self.reap_ctrl(guest, dma)?;
        if self.ctrl_pending.is_some() {
            return Err(NetError::CtrlBusy);
        }
        let access = |_| QueueError::Access(page);
        self.mem
            .write_slice(&[class, cmd], GuestAddress(page))
            .map_err(access)?;
        self.mem
            .write_slice(data, GuestAddress(page + CTRL_DATA))
            .map_err(access)?;
        self.mem
            .write_slice(&[0xff], GuestAddress(page + CTRL_ACK))
            .map_err(access)?;
        let pieces = ctrl_pieces(page, data.len());
        let mut chain = Vec::with_capacity(pieces.len());
        let mut mapped = Vec::with_capacity(pieces.len());
        for (gpa, len, writes) in pieces {
            let dev = dma.map(guest.iommu(), gpa, u64::from(len), writes)?;
            mapped.push((dev, u64::from(len)));
            chain.push((Buf { dev, gpa, len }, writes));
        }
        self.ctrl_tag = self.ctrl_tag.wrapping_add(1);
        let tag = self.ctrl_tag;
        self.queues[CTRL_QUEUE].post_chain(&self.mem, &chain, tag)?;
        self.ctrl_pending = Some(CtrlPending { tag, mapped });
        self.publish(CTRL_QUEUE)?;
        let start = Instant::now();
        loop {
            self.reap_ctrl(guest, dma)?;
            if self.ctrl_pending.is_none() {
                break;
            }
            let left = self.ctrl_timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(NetError::CtrlTimeout {
                    class,
                    cmd,
                    waited: start.elapsed(),
                });
            }
            self.queues[CTRL_QUEUE].arm(&self.mem)?;
            if !self.queues[CTRL_QUEUE].has_used(&self.mem)? {
                poll_calls(&[self.notifiers[CTRL_QUEUE].call.as_raw_fd()], left)?;
                let _ = self.notifiers[CTRL_QUEUE].call.read();
            }
        }
        dma.flush(guest.iommu(), false)?;
        let mut ack = [0u8; 1];
        self.mem
            .read_slice(&mut ack, GuestAddress(page + CTRL_ACK))
            .map_err(access)?;
        Ok(ack[0])
    }

    /// Takes the control queue's completions and unmaps the command they
    /// answer.
    fn reap_ctrl(&mut self, guest: &mut Guest, dma: &mut GuestDma) -> Result<(), NetError> {
        while let Some(c) = self.queues[CTRL_QUEUE].pop(&self.mem)? {
            if self.ctrl_pending.as_ref().is_some_and(|p| p.tag == c.tag) {
                if let Some(p) = self.ctrl_pending.take() {
                    for (dev, len) in p.mapped {
                        dma.unmap(guest.iommu(), dev, len)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// What Linux sends when the interface comes up with CTRL_RX
    /// (`virtnet_set_rx_mode`): RX PROMISC (`promisc`), RX ALLMULTI off,
    /// MAC TABLE_SET with empty unicast and multicast tables. Returns the
    /// three acks in that order; nothing is sent without CTRL_RX.
    pub fn boot_commands(
        &mut self,
        guest: &mut Guest,
        dma: &mut GuestDma,
        promisc: bool,
    ) -> Result<Vec<u8>, NetError> {
        if !self.has_feature(VIRTIO_NET_F_CTRL_RX) {
            return Ok(Vec::new());
        }
        Ok(vec![
            self.ctrl(
                guest,
                dma,
                VIRTIO_NET_CTRL_RX,
                VIRTIO_NET_CTRL_RX_PROMISC,
                &[u8::from(promisc)],
            )?,
            self.ctrl(
                guest,
                dma,
                VIRTIO_NET_CTRL_RX,
                VIRTIO_NET_CTRL_RX_ALLMULTI,
                &[0],
            )?,
            self.ctrl(
                guest,
                dma,
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_TABLE_SET,
                &mac_table_set_data(&[], &[]),
            )?,
        ])
    }

    fn call_fds(&self) -> impl Iterator<Item = i32> + '_ {
        self.notifiers.iter().map(|n| n.call.as_raw_fd())
    }

    fn drain_calls(&self) {
        for n in &self.notifiers {
            let _ = n.call.read();
        }
    }
}

/// [`NetDevice::wait`] over several devices (one thread driving several
/// guests): polls every used ring for up to `spin`, then arms every queue
/// and waits up to `timeout` for a call from any of them.
pub fn wait_many(
    devs: &mut [&mut NetDevice],
    spin: Duration,
    timeout: Duration,
) -> Result<(), NetError> {
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        loop {
            for d in devs.iter() {
                if d.has_used()? {
                    return Ok(());
                }
            }
            if Instant::now() >= until {
                break;
            }
            // Yield: the backend being waited for may need this CPU.
            std::thread::yield_now();
        }
    }
    for d in devs.iter_mut() {
        let d = &mut **d;
        for q in &mut d.queues {
            q.arm(&d.mem)?;
            if q.has_used(&d.mem)? {
                return Ok(());
            }
        }
    }
    let fds: Vec<i32> = devs.iter().flat_map(|d| d.call_fds()).collect();
    poll_calls(&fds, timeout)?;
    for d in devs.iter() {
        d.drain_calls();
    }
    Ok(())
}

/// Waits up to `timeout` for any of `fds` to become readable.
fn poll_calls(fds: &[i32], timeout: Duration) -> Result<(), NetError> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a live array of pollfds for the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(NetError::EventFd(e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_decodes_little_endian_fields_and_tolerates_short_bytes() {
        let b = [
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // mac
            0x01, 0x00, // status: LINK_UP
            0x01, 0x00, // max_virtqueue_pairs
            0xdc, 0x05, // mtu 1500
        ];
        let c = NetConfig::from_bytes(&b);
        assert_eq!(c.mac, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(c.status, 1);
        assert!(c.link_up());
        assert_eq!(c.max_virtqueue_pairs, 1);
        assert_eq!(c.mtu, 1500);
        let short = NetConfig::from_bytes(&b[..7]);
        assert_eq!(short.mac, c.mac);
        assert_eq!((short.status, short.mtu), (0, 0), "missing bytes read 0");
        assert_eq!(NetConfig::from_bytes(&[]), NetConfig::default());
    }

    #[test]
    fn a_control_command_is_header_data_then_the_ack() {
        assert_eq!(
            ctrl_pieces(0x1000, 1),
            vec![(0x1000, 2, false), (0x1080, 1, false), (0x1040, 1, true)]
        );
        assert_eq!(
            ctrl_pieces(0x1000, 0),
            vec![(0x1000, 2, false), (0x1040, 1, true)],
            "no empty data descriptor"
        );
    }

    #[test]
    fn mac_table_set_is_two_counted_tables() {
        assert_eq!(mac_table_set_data(&[], &[]), vec![0; 8]);
        let uni = [[0x52, 0x54, 0, 0, 0, 1]];
        let multi = [[0x33, 0x33, 0, 0, 0, 1], [0x01, 0x00, 0x5e, 0, 0, 1]];
        let d = mac_table_set_data(&uni, &multi);
        assert_eq!(d.len(), 4 + 6 + 4 + 12);
        assert_eq!(&d[..4], &1u32.to_le_bytes());
        assert_eq!(&d[4..10], &uni[0]);
        assert_eq!(&d[10..14], &2u32.to_le_bytes());
        assert_eq!(&d[14..20], &multi[0]);
        assert_eq!(&d[20..26], &multi[1]);
    }
}
