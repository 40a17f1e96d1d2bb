//! The VMM side of the vhost-user socket: feature and protocol negotiation,
//! memory table, vring setup, config space and device reset, with the
//! `vhost` crate's [`Frontend`].

use crate::memory::GuestRam;
use std::path::Path;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserHeaderFlag,
};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use virtio_iommu_proto::config::{BYPASS_OFFSET, CONFIG_LEN};
use virtio_iommu_proto::features::{
    VIRTIO_F_VERSION_1, VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_DOMAIN_RANGE,
    VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_MMIO,
    VIRTIO_IOMMU_F_PROBE, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_iommu_proto::{ConfigSpace, NUM_QUEUES};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// The protocol features this frontend uses when the backend offers them.
pub const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::RESET_DEVICE)
    .union(VhostUserProtocolFeatures::DEVICE_STATE);

/// Which vhost-user step failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Connecting to the socket failed.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket path.
        path: String,
        /// The vhost error.
        #[source]
        source: vhost::Error,
    },
    /// A vhost-user message failed (sent, answered, or refused by the
    /// backend with a non-zero REPLY_ACK).
    #[error("vhost-user {step} failed")]
    Message {
        /// The message, e.g. `SET_FEATURES`.
        step: &'static str,
        /// The vhost error.
        #[source]
        source: vhost::Error,
    },
    /// The backend does not offer something this frontend needs.
    #[error("the backend does not offer {0}")]
    Missing(&'static str),
    /// The backend answered GET_CONFIG with the wrong size.
    #[error("GET_CONFIG returned {got} bytes, expected {want}")]
    ConfigSize {
        /// Bytes expected.
        want: usize,
        /// Bytes received.
        got: usize,
    },
    /// Guest RAM could not be described.
    #[error("cannot describe guest RAM for SET_MEM_TABLE")]
    Memory(#[from] crate::memory::MemoryError),
    /// The device-state pipe failed.
    #[error("device state transfer: {0}")]
    StatePipe(#[source] std::io::Error),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> ConnectionError {
    move |source| ConnectionError::Message { step, source }
}

/// Where a vring lives in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringAddrs {
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Descriptor table.
    pub desc: GuestAddress,
    /// Available (driver) ring.
    pub avail: GuestAddress,
    /// Used (device) ring.
    pub used: GuestAddress,
}

/// The device features a Linux guest driver accepts out of `offered`:
/// VERSION_1, MAP_UNMAP, INPUT_RANGE, DOMAIN_RANGE, PROBE, MMIO,
/// BYPASS_CONFIG, INDIRECT_DESC, and EVENT_IDX if `event_idx`; the
/// vhost-user PROTOCOL_FEATURES bit (30) is kept when offered.
pub fn linux_driver_features(offered: u64, event_idx: bool) -> u64 {
    let mut want = [
        VIRTIO_F_VERSION_1,
        VIRTIO_IOMMU_F_MAP_UNMAP,
        VIRTIO_IOMMU_F_INPUT_RANGE,
        VIRTIO_IOMMU_F_DOMAIN_RANGE,
        VIRTIO_IOMMU_F_PROBE,
        VIRTIO_IOMMU_F_MMIO,
        VIRTIO_IOMMU_F_BYPASS_CONFIG,
        VIRTIO_RING_F_INDIRECT_DESC,
    ]
    .iter()
    .fold(0u64, |acc, &bit| acc | (1u64 << bit));
    if event_idx {
        want |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    want |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    offered & want
}

/// One vhost-user connection to the daemon.
pub struct Connection {
    frontend: Frontend,
    offered: u64,
    protocol: VhostUserProtocolFeatures,
    acked: Option<u64>,
}

impl Connection {
    /// Connects, becomes the owner, reads the offered features and
    /// negotiates the protocol features (CONFIG, MQ, REPLY_ACK,
    /// RESET_DEVICE, whichever are offered). With REPLY_ACK, every later
    /// message asks for an acknowledgement, so a refusal is an error here.
    pub fn connect(path: &Path) -> Result<Connection, ConnectionError> {
        Connection::connect_device(path, NUM_QUEUES as u64)
    }

    /// [`Connection::connect`] for a device of another type with at most
    /// `queues` queues.
    pub fn connect_device(path: &Path, queues: u64) -> Result<Connection, ConnectionError> {
        let frontend =
            Frontend::connect(path, queues).map_err(|source| ConnectionError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let mut conn = Connection {
            frontend,
            offered,
            protocol: VhostUserProtocolFeatures::empty(),
            acked: None,
        };
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered_proto = conn
                .frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            let proto = offered_proto & WANTED_PROTOCOL_FEATURES;
            conn.frontend
                .set_protocol_features(proto)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            conn.protocol = proto;
            if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                conn.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(conn)
    }

    /// The process at the other end of the socket (SO_PEERCRED), if the
    /// kernel tells.
    pub fn peer_pid(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, which
        // lives across the call; the descriptor is the connection's own.
        let rc = unsafe {
            libc::getsockopt(
                self.frontend.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        (rc == 0 && cred.pid > 0).then_some(cred.pid)
    }

    /// Features the backend offered (GET_FEATURES).
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Protocol features negotiated.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Features acked by the last SET_FEATURES, if any.
    pub fn acked_features(&self) -> Option<u64> {
        self.acked
    }

    /// The underlying frontend, for messages this type does not wrap.
    pub fn frontend_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// GET_QUEUE_NUM (needs MQ).
    pub fn queue_num(&mut self) -> Result<u64, ConnectionError> {
        self.require(VhostUserProtocolFeatures::MQ, "the MQ protocol feature")?;
        self.frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))
    }

    fn require(
        &self,
        feature: VhostUserProtocolFeatures,
        name: &'static str,
    ) -> Result<(), ConnectionError> {
        if self.protocol.contains(feature) {
            Ok(())
        } else {
            Err(ConnectionError::Missing(name))
        }
    }

    /// GET_CONFIG of `len` bytes at `offset`.
    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, ConnectionError> {
        self.require(
            VhostUserProtocolFeatures::CONFIG,
            "the CONFIG protocol feature",
        )?;
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
            .map_err(step("GET_CONFIG"))?;
        if payload.len() != len as usize {
            return Err(ConnectionError::ConfigSize {
                want: len as usize,
                got: payload.len(),
            });
        }
        Ok(payload)
    }

    /// The whole 40-byte config space, raw.
    pub fn config_bytes(&mut self) -> Result<[u8; CONFIG_LEN], ConnectionError> {
        let v = self.read_config(0, CONFIG_LEN as u32)?;
        let mut out = [0u8; CONFIG_LEN];
        if v.len() != CONFIG_LEN {
            return Err(ConnectionError::ConfigSize {
                want: CONFIG_LEN,
                got: v.len(),
            });
        }
        out.copy_from_slice(&v);
        Ok(out)
    }

    /// The config space, decoded.
    pub fn config(&mut self) -> Result<ConfigSpace, ConnectionError> {
        Ok(ConfigSpace::from_bytes(&self.config_bytes()?))
    }

    /// SET_CONFIG of raw bytes at `offset` (the backend may refuse).
    pub fn write_config(&mut self, offset: u32, bytes: &[u8]) -> Result<(), ConnectionError> {
        self.require(
            VhostUserProtocolFeatures::CONFIG,
            "the CONFIG protocol feature",
        )?;
        self.frontend
            .set_config(offset, VhostUserConfigFlags::empty(), bytes)
            .map_err(step("SET_CONFIG"))
    }

    /// Writes the `bypass` config byte (0 or 1, as a driver does).
    pub fn set_bypass(&mut self, on: bool) -> Result<(), ConnectionError> {
        self.write_config(BYPASS_OFFSET as u32, &[u8::from(on)])
    }

    /// SET_FEATURES (the driver's FEATURES_OK).
    pub fn set_features(&mut self, features: u64) -> Result<(), ConnectionError> {
        self.frontend
            .set_features(features)
            .map_err(step("SET_FEATURES"))?;
        self.acked = Some(features);
        Ok(())
    }

    /// SET_MEM_TABLE with the one memfd region of guest RAM.
    pub fn set_mem_table(&mut self, ram: &GuestRam) -> Result<(), ConnectionError> {
        let region = ram.region_info()?;
        self.frontend
            .set_mem_table(&[region])
            .map_err(step("SET_MEM_TABLE"))?;
        Ok(())
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK for one queue (base 0, fresh
    /// rings). The ring is not enabled yet.
    pub fn setup_vring(
        &mut self,
        index: usize,
        ram: &GuestRam,
        ring: &VringAddrs,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), ConnectionError> {
        self.setup_vring_at(index, ram, ring, 0, kick, call)
    }

    /// As [`Self::setup_vring`], with the device starting at avail index
    /// `base` (a ring in use, handed to a new backend).
    pub fn setup_vring_at(
        &mut self,
        index: usize,
        ram: &GuestRam,
        ring: &VringAddrs,
        base: u16,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), ConnectionError> {
        self.set_vring_num(index, ring.size)?;
        self.set_vring_addr(index, ram, ring)?;
        self.set_vring_base(index, base)?;
        self.set_vring_call(index, call)?;
        self.set_vring_kick(index, kick)
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(&mut self, index: usize, size: u16) -> Result<(), ConnectionError> {
        self.frontend
            .set_vring_num(index, size)
            .map_err(step("SET_VRING_NUM"))
    }

    /// SET_VRING_ADDR with the host addresses of `ring` in `ram`.
    pub fn set_vring_addr(
        &mut self,
        index: usize,
        ram: &GuestRam,
        ring: &VringAddrs,
    ) -> Result<(), ConnectionError> {
        let config = VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: ram.host_address(ring.desc)?,
            used_ring_addr: ram.host_address(ring.used)?,
            avail_ring_addr: ram.host_address(ring.avail)?,
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(index, &config)
            .map_err(step("SET_VRING_ADDR"))
    }

    /// SET_VRING_BASE: where the device resumes taking entries.
    pub fn set_vring_base(&mut self, index: usize, base: u16) -> Result<(), ConnectionError> {
        self.frontend
            .set_vring_base(index, base)
            .map_err(step("SET_VRING_BASE"))
    }

    /// GET_VRING_BASE: stops the queue; returns where the device stopped.
    pub fn get_vring_base(&mut self, index: usize) -> Result<u16, ConnectionError> {
        self.frontend
            .get_vring_base(index)
            .map(|b| b as u16)
            .map_err(step("GET_VRING_BASE"))
    }

    /// SET_VRING_CALL.
    pub fn set_vring_call(&mut self, index: usize, call: &EventFd) -> Result<(), ConnectionError> {
        self.frontend
            .set_vring_call(index, call)
            .map_err(step("SET_VRING_CALL"))
    }

    /// SET_VRING_KICK.
    pub fn set_vring_kick(&mut self, index: usize, kick: &EventFd) -> Result<(), ConnectionError> {
        self.frontend
            .set_vring_kick(index, kick)
            .map_err(step("SET_VRING_KICK"))
    }

    /// SET_VRING_ENABLE (when PROTOCOL_FEATURES was acked; without it the
    /// backend enables rings itself at SET_FEATURES).
    pub fn enable_vring(&mut self, index: usize, enable: bool) -> Result<(), ConnectionError> {
        let acked = self.acked.unwrap_or(0);
        if acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Ok(());
        }
        self.frontend
            .set_vring_enable(index, enable)
            .map_err(step("SET_VRING_ENABLE"))
    }

    /// Migration, source side: SET_DEVICE_STATE_FD (save) with a pipe,
    /// reads the state to its end, then CHECK_DEVICE_STATE.
    pub fn save_device_state(&mut self) -> Result<Vec<u8>, ConnectionError> {
        use std::io::Read;
        self.require(VhostUserProtocolFeatures::DEVICE_STATE, "DEVICE_STATE")?;
        let (mut read, write) = pipe().map_err(ConnectionError::StatePipe)?;
        self.frontend
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                write.into(),
            )
            .map_err(step("SET_DEVICE_STATE_FD"))?;
        let mut bytes = Vec::new();
        read.read_to_end(&mut bytes)
            .map_err(ConnectionError::StatePipe)?;
        self.frontend
            .check_device_state()
            .map_err(step("CHECK_DEVICE_STATE"))?;
        Ok(bytes)
    }

    /// Migration, destination side: SET_DEVICE_STATE_FD (load) with a
    /// pipe, writes `state` into it and closes it, then
    /// CHECK_DEVICE_STATE (which fails if the backend refused the state).
    pub fn load_device_state(&mut self, state: &[u8]) -> Result<(), ConnectionError> {
        use std::io::Write;
        self.require(VhostUserProtocolFeatures::DEVICE_STATE, "DEVICE_STATE")?;
        let (read, mut write) = pipe().map_err(ConnectionError::StatePipe)?;
        self.frontend
            .set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                read.into(),
            )
            .map_err(step("SET_DEVICE_STATE_FD"))?;
        write.write_all(state).map_err(ConnectionError::StatePipe)?;
        drop(write);
        self.frontend
            .check_device_state()
            .map_err(step("CHECK_DEVICE_STATE"))
    }

    /// RESET_DEVICE (needs the RESET_DEVICE protocol feature).
    pub fn reset_device(&mut self) -> Result<(), ConnectionError> {
        self.require(
            VhostUserProtocolFeatures::RESET_DEVICE,
            "the RESET_DEVICE protocol feature",
        )?;
        self.frontend.reset_device().map_err(step("RESET_DEVICE"))?;
        self.acked = None;
        Ok(())
    }
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody
    // else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_feature_choice_keeps_protocol_bit_and_drops_legacy_bypass() {
        let offered = (1u64 << 32) | (1 << 30) | 0x7f | (1 << 28) | (1 << 29);
        let acked = linux_driver_features(offered, false);
        assert_eq!(acked & (1 << 3), 0, "never F_BYPASS");
        assert_ne!(acked & (1 << 30), 0, "protocol features kept");
        assert_eq!(acked & (1 << 29), 0, "no EVENT_IDX unless asked");
        assert_ne!(linux_driver_features(offered, true) & (1 << 29), 0);
        assert_eq!(acked & !offered, 0);
        assert_eq!(linux_driver_features(0, true), 0);
    }
}
