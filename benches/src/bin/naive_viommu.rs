//! `naive-viommu`: a BASELINE ONLY, not a device to deploy.
//!
//! The virtio-iommu device a competent engineer would write with rust-vmm in
//! an afternoon, so the request-path figures of `vhost-user-iommu` can be
//! shown beside it (`benches/request-path.sh`): vhost-user-backend's epoll
//! loop, virtio-queue's chain iterator, every descriptor copied in and out
//! with vm-memory's `read_slice`/`write_slice`, requests parsed by
//! `virtio-iommu-proto`, and state in plain `BTreeMap`s (domains → IOVA →
//! mapping, endpoints → domain). No shared table, no io_uring, no grace
//! periods, no limits, no reserved regions (PROBE answers no property).
//!
//! It answers ATTACH, DETACH, MAP and UNMAP with the spec's statuses for
//! the cases a Linux guest reaches, serves one VMM connection, and exits
//! when the VMM disconnects (status 0) or on SIGTERM/SIGINT.
//!
//! Usage: `naive-viommu --socket-path PATH`

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_iommu_proto::config::{BYPASS_OFFSET, CONFIG_LEN};
use virtio_iommu_proto::features::{
    VIRTIO_F_VERSION_1, VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_DOMAIN_RANGE,
    VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_PROBE,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_iommu_proto::request::{
    ATTACH_FLAGS_KNOWN, MAX_READABLE_LEN, TAIL_LEN, VIRTIO_IOMMU_ATTACH_F_BYPASS, encode_tail,
};
use virtio_iommu_proto::{
    Attach, ConfigSpace, Detach, DomainRange, InputRange, Map, MapFlags, NUM_QUEUES, ParseError,
    Request, RequestType, Status, Unmap, parse_request,
};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

const QUEUE_SIZE: usize = 1024;
const PROBE_SIZE: u32 = 512;
const LAST_ENDPOINT: u32 = 0xffff;
const CONFIG: ConfigSpace = ConfigSpace {
    page_size_mask: !0xfff,
    input_range: InputRange {
        start: 0,
        end: (1 << 48) - 1,
    },
    domain_range: DomainRange {
        start: 0,
        end: 0xffff,
    },
    probe_size: PROBE_SIZE,
    bypass: 1,
};

/// A domain: bypass or translated, with its mappings by first IOVA.
#[derive(Default)]
struct Domain {
    bypass: bool,
    /// virt_start → (virt_end, phys_start, flags).
    mappings: BTreeMap<u64, (u64, u64, u32)>,
}

/// The whole device.
struct NaiveIommu {
    mem: Option<Mem>,
    event_idx: bool,
    bypass: u8,
    endpoints: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, Domain>,
}

impl NaiveIommu {
    /// Drops `domain` when no endpoint is attached to it any more.
    fn drop_if_unused(&mut self, domain: u32) {
        if !self.endpoints.values().any(|&d| d == domain) {
            self.domains.remove(&domain);
        }
    }

    fn attach(&mut self, a: &Attach) -> Status {
        if a.reserved != [0; 4] || a.flags & !ATTACH_FLAGS_KNOWN != 0 {
            return Status::Inval;
        }
        if !CONFIG.domain_range.contains(a.domain) {
            return Status::Range;
        }
        if a.endpoint > LAST_ENDPOINT {
            return Status::NoEnt;
        }
        let bypass = a.flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        let dom = self.domains.entry(a.domain).or_insert_with(|| Domain {
            bypass,
            ..Domain::default()
        });
        if dom.bypass != bypass {
            return Status::Inval;
        }
        if let Some(old) = self.endpoints.insert(a.endpoint, a.domain) {
            if old != a.domain {
                self.drop_if_unused(old);
            }
        }
        Status::Ok
    }

    fn detach(&mut self, d: &Detach) -> Status {
        if d.endpoint > LAST_ENDPOINT {
            return Status::NoEnt;
        }
        if self.endpoints.get(&d.endpoint) != Some(&d.domain) {
            return Status::Inval;
        }
        self.endpoints.remove(&d.endpoint);
        self.drop_if_unused(d.domain);
        Status::Ok
    }

    fn map(&mut self, m: &Map) -> Status {
        let Some(dom) = self.domains.get_mut(&m.domain) else {
            return Status::NoEnt;
        };
        let bad_flags = m.flags.unknown_bits() != 0 || m.flags.contains(MapFlags::MMIO);
        if dom.bypass || bad_flags || m.virt_end < m.virt_start {
            return Status::Inval;
        }
        if (m.virt_start | m.phys_start | m.virt_end.wrapping_add(1)) & 0xfff != 0
            || !CONFIG.input_range.contains(m.virt_start, m.virt_end)
        {
            return Status::Range;
        }
        // Overlap: the last mapping starting at or before virt_end must end
        // before virt_start.
        if let Some((_, &(end, _, _))) = dom.mappings.range(..=m.virt_end).next_back() {
            if end >= m.virt_start {
                return Status::Inval;
            }
        }
        dom.mappings
            .insert(m.virt_start, (m.virt_end, m.phys_start, m.flags.0));
        Status::Ok
    }

    fn unmap(&mut self, u: &Unmap) -> Status {
        let Some(dom) = self.domains.get_mut(&u.domain) else {
            return Status::NoEnt;
        };
        if dom.bypass || u.virt_end < u.virt_start {
            return Status::Inval;
        }
        // A mapping cut in two by either end of the range: RANGE.
        let split_front = u.virt_start > 0
            && dom
                .mappings
                .range(..u.virt_start)
                .next_back()
                .is_some_and(|(_, &(end, _, _))| end >= u.virt_start);
        let split_back = dom
            .mappings
            .range(u.virt_start..=u.virt_end)
            .next_back()
            .is_some_and(|(_, &(end, _, _))| end > u.virt_end);
        if split_front || split_back {
            return Status::Range;
        }
        let keys: Vec<u64> = dom
            .mappings
            .range(u.virt_start..=u.virt_end)
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            dom.mappings.remove(&k);
        }
        Status::Ok
    }

    /// Serves one chain; returns the used length (0: returned untouched).
    fn process_chain(&mut self, chain: &Chain) -> u32 {
        let mem = chain.memory();
        let mut readable = Vec::new();
        let mut writable: Vec<(GuestAddress, usize)> = Vec::new();
        for desc in chain.clone() {
            if desc.is_write_only() {
                writable.push((desc.addr(), desc.len() as usize));
            } else if readable.len() < MAX_READABLE_LEN {
                let mut buf =
                    vec![0u8; (desc.len() as usize).min(MAX_READABLE_LEN - readable.len())];
                if mem.read_slice(&mut buf, desc.addr()).is_err() {
                    return 0;
                }
                readable.extend_from_slice(&buf);
            }
        }
        let writable_len: usize = writable.iter().map(|&(_, len)| len).sum();
        if writable_len < TAIL_LEN {
            return 0;
        }
        let parsed = parse_request(&readable);
        let mut reply = Vec::new();
        let probe_area = PROBE_SIZE as usize;
        if matches!(
            parsed,
            Ok(Request::Probe(_))
                | Err(ParseError::TooShort {
                    req_type: RequestType::Probe,
                    ..
                })
        ) {
            // No property: a zeroed area (a NONE head ends the list).
            reply.resize((writable_len - TAIL_LEN).min(probe_area), 0);
        }
        let status = match parsed {
            Err(e) => match e.status() {
                Some(status) => status,
                None => return 0,
            },
            Ok(Request::Attach(a)) => self.attach(&a),
            Ok(Request::Detach(d)) => self.detach(&d),
            Ok(Request::Map(m)) => self.map(&m),
            Ok(Request::Unmap(u)) => self.unmap(&u),
            Ok(Request::Probe(_)) if writable_len < probe_area + TAIL_LEN => Status::Inval,
            Ok(Request::Probe(p)) if p.endpoint > LAST_ENDPOINT => Status::NoEnt,
            Ok(Request::Probe(_)) => Status::Ok,
        };
        reply.extend_from_slice(&encode_tail(status));
        // Scatter the reply over the writable descriptors.
        let mut done = 0;
        for (addr, len) in writable {
            let n = len.min(reply.len() - done);
            if n == 0 {
                break;
            }
            if mem.write_slice(&reply[done..done + n], addr).is_err() {
                return 0;
            }
            done += n;
        }
        done as u32
    }

    /// Serves the request queue until it is empty (with EVENT_IDX, until no
    /// request arrived while notifications were off).
    fn process_queue(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self
            .mem
            .clone()
            .ok_or_else(|| io::Error::other("kick before SET_MEM_TABLE"))?;
        loop {
            if self.event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains: Vec<Chain> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.memory())
                .map_err(io::Error::other)?
                .collect();
            for chain in &chains {
                let used_len = self.process_chain(chain);
                vring
                    .add_used(chain.head_index(), used_len)
                    .map_err(io::Error::other)?;
            }
            if !chains.is_empty() && vring.needs_notification().map_err(io::Error::other)? {
                vring.signal_used_queue()?;
            }
            if !self.event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackendMut for NaiveIommu {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_IOMMU_F_INPUT_RANGE,
            VIRTIO_IOMMU_F_DOMAIN_RANGE,
            VIRTIO_IOMMU_F_MAP_UNMAP,
            VIRTIO_IOMMU_F_BYPASS_CONFIG,
            VIRTIO_IOMMU_F_PROBE,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ]
        .iter()
        .fold(
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            |f, &b| f | (1 << b),
        )
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&mut self) {
        self.endpoints.clear();
        self.domains.clear();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = ConfigSpace {
            bypass: self.bypass,
            ..CONFIG
        }
        .to_bytes();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        let mut out = bytes[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match buf {
            [v @ (0 | 1)] if offset as usize == BYPASS_OFFSET => self.bypass = *v,
            _ => {} // Read-only fields: ignored.
        }
        Ok(())
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match (device_event, vrings.first()) {
            (0, Some(requestq)) => self.process_queue(requestq),
            _ => Ok(()), // The event queue: this device never reports faults.
        }
    }
}

/// Blocks SIGTERM and SIGINT in every thread and waits for them on one of
/// its own: the socket file is removed and the process exits with 0.
fn exit_on_signal(socket: PathBuf) -> io::Result<()> {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which
    // initialises it; the pointers are to this live local.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t; the calls only write it (and the
    // calling thread's mask, before any other thread exists).
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is initialised and `sig` is a live c_int.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = std::fs::remove_file(&socket);
                std::process::exit(0);
            }
        })?;
    Ok(())
}

fn run(socket: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    exit_on_signal(socket.clone())?;
    let backend = Arc::new(RwLock::new(NaiveIommu {
        mem: None,
        event_idx: false,
        bypass: CONFIG.bypass,
        endpoints: BTreeMap::new(),
        domains: BTreeMap::new(),
    }));
    let mut daemon = VhostUserDaemon::new(
        "naive-viommu".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| e.to_string())?;
    // One connection; the VMM's disconnect is its normal end.
    daemon.serve(&socket).map_err(|e| e.to_string())?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let socket = match args.as_slice() {
        [flag, path] if flag == "--socket-path" => PathBuf::from(path),
        _ => {
            eprintln!("usage: naive-viommu --socket-path PATH");
            return ExitCode::from(2);
        }
    };
    match run(socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("naive-viommu: {e}");
            ExitCode::FAILURE
        }
    }
}
