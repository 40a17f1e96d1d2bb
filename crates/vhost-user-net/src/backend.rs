//! The vhost-user side of one port: negotiation, config space, memory
//! table, and the queues handed to the polling threads as the guest starts
//! them. The control queue is served here, on the port's own thread, as
//! its kicks come (it carries a few commands at boot, never traffic).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use vhost_user_process::vring::TolerantVring;
use viommu_backend::{Access, Batch, Chain, DmaError};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::ctrl::{self, RxFilter};
use crate::features::offered_features;
use crate::port::{self, CTRLQ, Port, QUEUES, lock};
use crate::stats::bump;

pub use vhost_user_process::vring::GuestMem;

/// A port's vhost-user backend; cheap to clone.
#[derive(Clone)]
pub struct PortBackend {
    port: Arc<Port>,
    queue_size: u16,
    filter: Arc<Mutex<RxFilter>>,
    chain: Arc<Mutex<Chain>>,
}

impl PortBackend {
    /// The backend of `port`, offering queues of up to `queue_size` entries.
    pub fn new(port: Arc<Port>, queue_size: u16) -> PortBackend {
        PortBackend {
            port,
            queue_size,
            filter: Arc::new(Mutex::new(RxFilter::default())),
            chain: Arc::new(Mutex::new(Chain::default())),
        }
    }

    /// The port.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// Serves the control queue until it is empty.
    fn serve_ctrl(&self) {
        let port = &self.port;
        let mut guard = lock(&port.queues[CTRLQ]);
        let state = &mut *guard;
        let Some(live) = state.live.as_mut() else {
            return;
        };
        if live.failed {
            return;
        }
        let batch = match state.dma.batch() {
            Ok(b) => b,
            Err(e) => return debug!(port = %port.name, error = %e, "control queue: no batch"),
        };
        let event_idx = live.ring.event_idx();
        let mut view = match live.ring.view(&batch) {
            Ok(v) => v,
            Err(e) => {
                let why = port.ring_unreachable(&e);
                drop(batch);
                return state.fail(&port.name, CTRLQ, &why);
            }
        };
        let mut chain = self.chain.lock().unwrap_or_else(PoisonError::into_inner);
        let mut filter = self.filter.lock().unwrap_or_else(PoisonError::into_inner);
        let mut failure = None;
        let mut pushed = false;
        loop {
            match view.pop(&mut chain) {
                Ok(true) => {
                    let used = match command(&batch, &chain, &mut filter) {
                        Ok(ack) => {
                            if ack == ctrl::VIRTIO_NET_OK {
                                bump(&port.stats.ctrl_ok);
                            } else {
                                bump(&port.stats.ctrl_err);
                            }
                            1
                        }
                        Err(e) => {
                            bump(&port.stats.ctrl_err);
                            if let Some(f) = e.fault() {
                                port.dma.report_fault(f);
                            }
                            debug!(port = %port.name, error = %e, "control command dropped");
                            0
                        }
                    };
                    view.push_used(chain.head, used);
                    pushed = true;
                }
                Ok(false) => {
                    if event_idx && view.enable_notification() {
                        continue;
                    }
                    break;
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
            debug!(port = %port.name, filter = ?*filter, "control queue served");
        }
        drop(batch);
        if let Some(why) = failure {
            state.fail(&port.name, CTRLQ, &why);
        }
    }
}

/// Why a control chain gets no ack.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("malformed chain: {0}")]
    Malformed(viommu_backend::RingError),
    #[error("no device-writable ack byte after the command")]
    Layout,
    #[error("command of {0} bytes")]
    Size(u64),
    #[error("buffer not accessible")]
    Dma(#[from] DmaError),
}

impl CommandError {
    fn fault(&self) -> Option<&viommu_backend::Fault> {
        match self {
            CommandError::Dma(e) => e.fault(),
            _ => None,
        }
    }
}

/// Runs one control command: device-readable command bytes, then a
/// device-writable ack byte (the first byte of the first writable buffer).
fn command(batch: &Batch<'_>, chain: &Chain, filter: &mut RxFilter) -> Result<u8, CommandError> {
    if let Some(e) = &chain.malformed {
        return Err(CommandError::Malformed(e.clone()));
    }
    let split = chain
        .segments
        .iter()
        .position(|s| s.writable)
        .ok_or(CommandError::Layout)?;
    let (readable, writable) = chain.segments.split_at(split);
    if writable.iter().any(|s| !s.writable) || writable[0].len == 0 {
        return Err(CommandError::Layout);
    }
    let total: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    if total > ctrl::MAX_COMMAND as u64 {
        return Err(CommandError::Size(total));
    }
    let mut bytes = vec![0u8; total as usize];
    let mut at = 0usize;
    for s in readable {
        batch.read(s.addr, &mut bytes[at..at + s.len as usize])?;
        at += s.len as usize;
    }
    // The ack's buffer must be writable before anything changes.
    batch.for_each_piece(writable[0].addr, 1, Access::WRITE, |_, _| {})?;
    let ack = ctrl::execute(&bytes, filter);
    batch.write(writable[0].addr, &[ack])?;
    Ok(ack)
}

impl VhostUserBackend for PortBackend {
    type Bitmap = ();
    type Vring = TolerantVring;

    fn num_queues(&self) -> usize {
        QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        offered_features(self.port.dma.translates())
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.port.negotiated.store(features, Ordering::Relaxed);
        info!(
            port = %self.port.name,
            features = format_args!("{features:#x}"),
            "driver acked features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ and REPLY_ACK: QEMU wants both for iommu_platform=on.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.port.detach_all();
        info!(port = %self.port.name, "device reset");
    }

    fn set_event_idx(&self, enabled: bool) {
        self.port.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.port.config.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Every field is read-only; a write is the guest's mistake and must
        // not end the connection.
        warn!(port = %self.port.name, offset, len = buf.len(), "config write ignored (read-only fields)");
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.port.dma.set_memory(mem.memory().into_inner());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << QUEUES) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.port.detach(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[TolerantVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            return Ok(());
        };
        self.port.attach(index, vring.rwlock());
        if index == CTRLQ {
            self.serve_ctrl();
        }
        Ok(())
    }
}
