//! `viommu-frontend`: sends virtio-iommu requests to a vhost-user-iommu
//! daemon as a VMM plus a Linux guest driver would, or replays a trace.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vhost_user_process::number::{parse_u32, parse_u64};
use vhost_user_process::report;
use viommu_frontend::driver::{DEFAULT_QUEUE_SIZE, Driver, DriverOptions, Outcome};
use viommu_frontend::{Layout, device_cpu, replay, trace};
use virtio_iommu_proto::probe::{Property, parse_properties};
use virtio_iommu_proto::{Attach, Detach, Map, MapFlags, Probe, Request, Unmap};

/// Test frontend for vhost-user-iommu: connects to the daemon's socket as a
/// VMM, keeps guest RAM in a memfd, brings the device up the way the Linux
/// virtio-iommu driver does, and sends requests on the request queue.
///
/// Every invocation is a new vhost-user connection, which the daemon
/// treats as a new device: domains and mappings do not outlive the command.
/// Exit status: 0 when every request completed with status OK, 1 when
/// some did not, 2 on a usage, connection or trace error.
#[derive(Parser, Debug)]
#[command(name = "viommu-frontend", version)]
struct Cli {
    /// The daemon's vhost-user socket (vhost-user-iommu --socket-path).
    #[arg(
        long,
        value_name = "PATH",
        global = true,
        default_value = "/tmp/vhost-user-iommu.sock"
    )]
    socket: PathBuf,

    /// Guest RAM size (memfd, pages allocated lazily): bytes, or with a
    /// K, M or G suffix. Request buffers and rings live at its start.
    #[arg(long, value_name = "SIZE", global = true, default_value = "1G", value_parser = parse_size)]
    ram_size: u64,

    /// Virtqueue size (descriptors per queue, a power of two).
    #[arg(long, value_name = "N", global = true, default_value_t = DEFAULT_QUEUE_SIZE)]
    queue_size: u16,

    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX (Linux does when offered).
    #[arg(long, global = true)]
    no_event_idx: bool,

    /// How each request is cut into descriptors.
    #[arg(
        long,
        value_enum,
        value_name = "LAYOUT",
        global = true,
        default_value = "two"
    )]
    layout: LayoutArg,

    /// Seconds to wait for the device to complete a batch.
    #[arg(long, value_name = "S", global = true, default_value_t = 10)]
    timeout: u64,

    #[command(subcommand)]
    command: Command,
}

/// Descriptor layouts.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LayoutArg {
    /// One readable and one writable descriptor (what Linux posts).
    Two,
    /// One descriptor per field (head, each field, PROBE properties, tail).
    PerField,
    /// Every request in an indirect table, one descriptor per field.
    Indirect,
    /// One descriptor per byte of the readable part and of the tail.
    Bytes,
}

impl From<LayoutArg> for Layout {
    fn from(l: LayoutArg) -> Layout {
        match l {
            LayoutArg::Two => Layout::Two,
            LayoutArg::PerField => Layout::PerField,
            LayoutArg::Indirect => Layout::Indirect,
            LayoutArg::Bytes => Layout::Chunks(1),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// ATTACH an endpoint to a domain (created if absent).
    Attach {
        /// Domain ID.
        #[arg(long, value_parser = parse_u32)]
        domain: u32,
        /// Endpoint ID (PCI requester ID: bus<<8 | dev<<3 | fn).
        #[arg(long, value_parser = parse_u32)]
        endpoint: u32,
        /// Set VIRTIO_IOMMU_ATTACH_F_BYPASS: make it a bypass domain.
        #[arg(long)]
        bypass: bool,
    },
    /// DETACH an endpoint from a domain (attaches it first with --attach).
    Detach {
        /// Domain ID.
        #[arg(long, value_parser = parse_u32)]
        domain: u32,
        /// Endpoint ID.
        #[arg(long, value_parser = parse_u32)]
        endpoint: u32,
        /// ATTACH the endpoint to the domain first, in the same connection.
        #[arg(long)]
        attach: bool,
    },
    /// MAP an inclusive IOVA range to guest-physical memory.
    Map {
        #[command(flatten)]
        range: RangeArgs,
        /// Guest-physical address of the first IOVA.
        #[arg(long, value_parser = parse_u64)]
        phys_start: u64,
        /// MAP flags: 1 READ, 2 WRITE, 4 MMIO (OR them).
        #[arg(long, value_parser = parse_u32, default_value = "3")]
        flags: u32,
    },
    /// UNMAP every mapping inside an inclusive IOVA range.
    Unmap {
        #[command(flatten)]
        range: RangeArgs,
    },
    /// PROBE an endpoint and print its properties.
    Probe {
        /// Endpoint ID.
        #[arg(long, value_parser = parse_u32)]
        endpoint: u32,
    },
    /// Replay a request trace (gzip or text; see shared/traces/README.md)
    /// and print requests/s, batch latency percentiles and non-OK counts.
    Replay {
        /// The trace file.
        #[arg(long, value_name = "FILE", required_unless_present = "map_unmap")]
        trace: Option<PathBuf>,
        /// Instead of a trace: ATTACH endpoint 8, then N one-page MAPs each
        /// UNMAPped 32 MAPs later (Linux's strict mode under a steady block
        /// workload): 2N + 1 requests.
        #[arg(long, value_name = "N", conflicts_with = "trace")]
        map_unmap: Option<usize>,
        /// Requests queued per kick.
        #[arg(long, value_name = "N", default_value_t = 1)]
        batch: usize,
        /// Batches posted before the oldest one completed. 1 (the default)
        /// waits for each batch before the next, as Linux's driver waits
        /// for its synchronous requests; more keeps the device busy, so
        /// that its own rate shows rather than the round trip's.
        #[arg(long, value_name = "N", default_value_t = 1)]
        in_flight: usize,
    },
    /// Drive a vhost-user-blk backend as QEMU plus a Linux guest would, its
    /// DMA mapped through the daemon at --socket by the chosen policy, and
    /// print IOPS, latency percentiles and the IOMMU requests it took.
    Blk(BlkArgs),
    /// Drive vhost-user-net switch ports as QEMU plus Linux guests would,
    /// one guest per --port, all from one thread: each keeps receive
    /// buffers posted and sends test frames, every buffer mapped through
    /// its port's IOMMU daemon by the chosen policy; print frames/s, the
    /// received frames' checks and the IOMMU requests per port. Exit status
    /// 1 if any received frame was corrupt.
    Net(NetArgs),
}

/// The `blk` workload.
#[derive(Args, Debug)]
struct BlkArgs {
    /// The vhost-user-blk backend's socket.
    #[arg(long, value_name = "PATH")]
    blk_socket: PathBuf,
    /// DMA policy: off (no IOMMU: --socket is not used), passthrough
    /// (bypass domain), strict (MAP/UNMAP around each request), lazy
    /// (UNMAPs batched every 256 or 10 ms), static (all guest RAM mapped
    /// once, as a DPDK or SPDK guest driver through VFIO does).
    #[arg(long, default_value = "strict")]
    policy: viommu_frontend::guest_dma::Policy,
    /// The device's endpoint ID (as given to vhost-user-blk --endpoint).
    #[arg(long, value_parser = parse_u32, default_value = "8")]
    endpoint: u32,
    /// Queues (capped by the device's).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Percentage of reads; the rest are writes.
    #[arg(long, default_value_t = 100)]
    read_percent: u8,
    /// Bytes per request (a multiple of 512).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    block: u64,
    /// Stop after this many requests.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds (default 5 when no --count).
    #[arg(long)]
    seconds: Option<f64>,
    /// Use only the first N blocks of the disk.
    #[arg(long)]
    span_blocks: Option<u64>,
    /// Check every read against the pattern last written there.
    #[arg(long)]
    verify: bool,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Poll the used rings this many µs before sleeping on the call
    /// eventfds, as a hypervisor's halt polling does for an idle vCPU
    /// (KVM: up to 200 µs by default). 0 sleeps at once.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
}

/// The `net` traffic.
#[derive(Args, Debug)]
struct NetArgs {
    /// One guest per --port (repeat it), comma-separated keys:
    /// socket=PATH (the switch's vhost-user socket, required),
    /// iommu=PATH (a vhost-user-iommu daemon's socket for this guest),
    /// policy=off|passthrough|strict|lazy|static (default: off without
    /// iommu=, lazy with it), endpoint=N (default 8), domain=N (default 1),
    /// mac=MAC (default: the device's config MAC, else a made-up local
    /// one), to=MAC|broadcast|none (where its frames go; default: the next
    /// port's MAC, the last port's to the first; a single port broadcasts;
    /// none only receives).
    #[arg(long = "port", value_name = "SPEC", required = true, value_parser = parse_port)]
    ports: Vec<PortSpec>,
    /// Ethernet frame length in bytes, without the 12-byte virtio-net
    /// header (60 to 65535).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    frame_size: usize,
    /// Frames per second per sending port; 0 sends as fast as the ring
    /// takes them.
    #[arg(long, value_name = "FPS", default_value_t = 0)]
    rate: u64,
    /// Seconds of sending (default 5 without --count).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Frames each sending port sends.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Frames posted per kick.
    #[arg(long, value_name = "N", default_value_t = 32)]
    burst: usize,
    /// Bytes per receive buffer, header included (default 1536 with
    /// VIRTIO_NET_F_MRG_RXBUF, 2048 without).
    #[arg(long, value_name = "BYTES")]
    rx_buffer_len: Option<u32>,
    /// Receive buffers kept posted (default: the queue size).
    #[arg(long, value_name = "N")]
    rx_buffers: Option<usize>,
    /// Poll the used rings this many µs before sleeping on the call
    /// eventfds (a hypervisor's halt polling). 0 sleeps at once.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// Post the virtio-net header and the frame as two descriptors (the
    /// default is one buffer, as Linux posts with any_header_sg).
    #[arg(long)]
    split_header: bool,
    /// Do not negotiate VIRTIO_NET_F_MRG_RXBUF.
    #[arg(long)]
    no_mrg_rxbuf: bool,
    /// Do not negotiate the control queue (and so send no boot commands).
    #[arg(long)]
    no_ctrl: bool,
    /// Print one JSON object per port instead of key=value lines.
    #[arg(long)]
    json: bool,
    /// Live mappings each guest under strict or lazy makes before the
    /// traffic and keeps (pages of its RAM, each at an IOVA of its own,
    /// never used): the IOMMU holds that many more entries, as a busy
    /// guest's would (DPDK's per-queue IOTLB holds 2,048).
    #[arg(long, value_name = "N", default_value_t = 0)]
    extra_maps: u64,
}

/// Where a `net` port's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Dest {
    /// The next port's MAC.
    Next,
    /// Nowhere: receive only.
    Nothing,
    /// This MAC (broadcast too).
    Mac([u8; 6]),
}

/// One `--port`.
#[derive(Clone, Debug)]
struct PortSpec {
    socket: PathBuf,
    iommu: Option<PathBuf>,
    policy: Option<viommu_frontend::guest_dma::Policy>,
    endpoint: u32,
    domain: u32,
    mac: Option<[u8; 6]>,
    to: Dest,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("MAC {s:?}: expected six hex bytes joined by ':'"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m =
            u8::from_str_radix(p, 16).map_err(|_| format!("MAC {s:?}: {p:?} is not a hex byte"))?;
    }
    Ok(mac)
}

fn parse_port(s: &str) -> Result<PortSpec, String> {
    let mut p = PortSpec {
        socket: PathBuf::new(),
        iommu: None,
        policy: None,
        endpoint: 8,
        domain: 1,
        mac: None,
        to: Dest::Next,
    };
    for kv in s.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{kv:?}: expected KEY=VALUE"))?;
        match k {
            "socket" => p.socket = PathBuf::from(v),
            "iommu" => p.iommu = Some(PathBuf::from(v)),
            "policy" => p.policy = Some(v.parse()?),
            "endpoint" => p.endpoint = parse_u32(v).map_err(|e| e.to_string())?,
            "domain" => p.domain = parse_u32(v).map_err(|e| e.to_string())?,
            "mac" => p.mac = Some(parse_mac(v)?),
            "to" => {
                p.to = match v {
                    "broadcast" => Dest::Mac([0xff; 6]),
                    "none" => Dest::Nothing,
                    _ => Dest::Mac(parse_mac(v)?),
                }
            }
            _ => {
                return Err(format!(
                    "unknown key {k:?} (socket, iommu, policy, endpoint, domain, mac, to)"
                ));
            }
        }
    }
    if p.socket.as_os_str().is_empty() {
        return Err("socket=PATH is required".into());
    }
    Ok(p)
}

/// Domain and IOVA range of MAP and UNMAP.
#[derive(Args, Debug)]
struct RangeArgs {
    /// Domain ID.
    #[arg(long, value_parser = parse_u32)]
    domain: u32,
    /// First IOVA.
    #[arg(long, value_parser = parse_u64)]
    virt_start: u64,
    /// Last IOVA, inclusive.
    #[arg(long, value_parser = parse_u64)]
    virt_end: u64,
    /// ATTACH this endpoint to the domain first, in the same connection
    /// (a new connection is a new device with no domains).
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_u32)]
    attach: Option<u32>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = parse_u64(num).map_err(|e| e.to_string())?;
    v.checked_mul(1u64 << shift)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("`{s}` is zero or too large"))
}

fn attach_req(domain: u32, endpoint: u32, flags: u32) -> Request {
    Request::Attach(Attach {
        domain,
        endpoint,
        flags,
        reserved: [0; 4],
    })
}

fn print_outcome(name: &str, o: &Outcome) -> bool {
    match o.status() {
        Some(s) => println!("{name}: {s} (used length {})", o.used_len),
        None => println!(
            "{name}: no status (used length {}, tail {:02x?})",
            o.used_len,
            o.tail()
        ),
    }
    o.status() == Some(virtio_iommu_proto::Status::Ok)
}

fn run(cli: Cli) -> Result<bool, Box<dyn std::error::Error>> {
    let opts = DriverOptions {
        ram_size: cli.ram_size,
        queue_size: cli.queue_size,
        event_idx: !cli.no_event_idx,
        features: None,
        layout: cli.layout.into(),
        timeout: Duration::from_secs(cli.timeout.max(1)),
    };
    if let Command::Blk(b) = &cli.command {
        return run_blk(&cli, b);
    }
    if let Command::Net(n) = &cli.command {
        return run_net(&cli, n);
    }
    if let Command::Replay {
        trace: path,
        map_unmap,
        batch,
        in_flight,
    } = &cli.command
    {
        let requests = match (path, map_unmap) {
            (_, Some(pairs)) => replay::map_unmap_stream(8, *pairs, 32),
            (Some(path), None) => trace::load(path)?,
            (None, None) => return Err("replay needs --trace FILE or --map-unmap N".into()),
        };
        let mut driver = Driver::connect(&cli.socket, opts)?;
        let meter = driver
            .connection()
            .peer_pid()
            .and_then(device_cpu::CpuMeter::start);
        let mut report = replay::replay_pipelined(&mut driver, &requests, *batch, *in_flight)?;
        report.device_cpu = meter.and_then(|m| m.used());
        println!("{report}");
        return Ok(report.non_ok == 0);
    }
    let mut driver = Driver::connect(&cli.socket, opts)?;
    let mut reqs: Vec<(&str, Request)> = Vec::new();
    match &cli.command {
        Command::Attach {
            domain,
            endpoint,
            bypass,
        } => reqs.push(("ATTACH", attach_req(*domain, *endpoint, u32::from(*bypass)))),
        Command::Detach {
            domain,
            endpoint,
            attach,
        } => {
            if *attach {
                reqs.push(("ATTACH", attach_req(*domain, *endpoint, 0)));
            }
            reqs.push((
                "DETACH",
                Request::Detach(Detach {
                    domain: *domain,
                    endpoint: *endpoint,
                }),
            ));
        }
        Command::Map {
            range,
            phys_start,
            flags,
        } => {
            if let Some(ep) = range.attach {
                reqs.push(("ATTACH", attach_req(range.domain, ep, 0)));
            }
            reqs.push((
                "MAP",
                Request::Map(Map {
                    domain: range.domain,
                    virt_start: range.virt_start,
                    virt_end: range.virt_end,
                    phys_start: *phys_start,
                    flags: MapFlags(*flags),
                }),
            ));
        }
        Command::Unmap { range } => {
            if let Some(ep) = range.attach {
                reqs.push(("ATTACH", attach_req(range.domain, ep, 0)));
            }
            reqs.push((
                "UNMAP",
                Request::Unmap(Unmap {
                    domain: range.domain,
                    virt_start: range.virt_start,
                    virt_end: range.virt_end,
                    reserved: [0; 4],
                }),
            ));
        }
        Command::Probe { endpoint } => reqs.push((
            "PROBE",
            Request::Probe(Probe {
                endpoint: *endpoint,
            }),
        )),
        Command::Replay { .. } | Command::Blk(_) | Command::Net(_) => {}
    }
    let mut all_ok = true;
    for (name, req) in reqs {
        // One request per kick, each waited for: later ones depend on earlier ones.
        let o = driver.send_one(&req)?;
        all_ok &= print_outcome(name, &o);
        if matches!(req, Request::Probe(_)) && o.used_len > 0 {
            for p in parse_properties(o.properties()) {
                match p {
                    Property::ResvMem(r) => {
                        println!("  RESV_MEM {:?} {:#x}-{:#x}", r.subtype, r.start, r.end)
                    }
                    Property::Other {
                        raw_type,
                        offset,
                        length,
                    } => println!("  property type {raw_type:#x} at {offset}, {length} bytes"),
                }
            }
        }
    }
    Ok(all_ok)
}

fn run_blk(cli: &Cli, b: &BlkArgs) -> Result<bool, Box<dyn std::error::Error>> {
    use viommu_frontend::blk::BlkOptions;
    use viommu_frontend::blk_load::{BlkVm, LoadOptions, VmOptions};
    let mut vm = BlkVm::start(&VmOptions {
        blk_socket: b.blk_socket.clone(),
        iommu_socket: Some(cli.socket.clone()),
        policy: b.policy,
        endpoint: b.endpoint,
        domain: 1,
        ram_size: cli.ram_size,
        blk: BlkOptions {
            queues: b.queues,
            queue_size: cli.queue_size,
            event_idx: !cli.no_event_idx,
            iommu_platform: false,
        },
    })?;
    let duration = match (b.seconds, b.count) {
        (Some(s), _) => Some(Duration::from_secs_f64(s.max(0.0))),
        (None, None) => Some(Duration::from_secs(5)),
        (None, Some(_)) => None,
    };
    let r = vm.run(&LoadOptions {
        depth: b.depth.max(1),
        read_percent: b.read_percent.min(100),
        block: u32::try_from(b.block)?,
        count: b.count,
        duration,
        span_blocks: b.span_blocks,
        seed: b.seed,
        verify: b.verify,
        spin: Duration::from_micros(b.spin_us),
    })?;
    println!(
        "policy={} queues={} depth={} block={} ios={} reads={} writes={} errors={} mismatches={} \
         seconds={:.3} iops={:.0} p50_us={:.2} p99_us={:.2} maps={} unmaps={} iommu_batches={}",
        b.policy,
        vm.dev.queue_count(),
        b.depth,
        b.block,
        r.ios,
        r.reads,
        r.writes,
        r.errors,
        r.mismatches,
        r.elapsed.as_secs_f64(),
        r.iops(),
        r.percentile(50.0).as_secs_f64() * 1e6,
        r.percentile(99.0).as_secs_f64() * 1e6,
        r.dma.maps,
        r.dma.unmaps,
        r.dma.batches,
    );
    Ok(r.errors == 0 && r.mismatches == 0)
}

fn mac_string(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

fn run_net(cli: &Cli, n: &NetArgs) -> Result<bool, Box<dyn std::error::Error>> {
    use viommu_frontend::guest_dma::Policy;
    use viommu_frontend::net::NetOptions;
    use viommu_frontend::net_load::{Flow, NetVm, NetVmOptions, TrafficOptions};
    let mut vms = Vec::with_capacity(n.ports.len());
    let mut policies = Vec::with_capacity(n.ports.len());
    for p in &n.ports {
        let policy = p.policy.unwrap_or(if p.iommu.is_some() {
            Policy::Lazy
        } else {
            Policy::Off
        });
        policies.push(policy);
        vms.push(NetVm::start(&NetVmOptions {
            net_socket: p.socket.clone(),
            iommu_socket: p.iommu.clone(),
            policy,
            endpoint: p.endpoint,
            domain: p.domain,
            ram_size: cli.ram_size,
            mac: p.mac,
            net: NetOptions {
                queue_size: cli.queue_size,
                event_idx: !cli.no_event_idx,
                mrg_rxbuf: !n.no_mrg_rxbuf,
                ctrl: !n.no_ctrl,
                ..NetOptions::default()
            },
            boot_commands: true,
        })?);
    }
    if n.extra_maps > 0 {
        let pages = (cli.ram_size / 2 / 4096).max(1);
        for vm in &mut vms {
            if !matches!(vm.dma.policy(), Policy::Strict | Policy::Lazy) {
                continue;
            }
            for k in 0..n.extra_maps {
                let gpa = (k % pages) * 4096;
                vm.dma.map(vm.guest.iommu(), gpa, 4096, false)?;
            }
        }
    }
    let count = vms.len();
    let mut flows = Vec::new();
    for (i, p) in n.ports.iter().enumerate() {
        let to = match p.to {
            Dest::Nothing => continue,
            Dest::Mac(m) => m,
            Dest::Next if count == 1 => [0xff; 6],
            Dest::Next => vms[(i + 1) % count].mac(),
        };
        flows.push(Flow {
            frame_len: n.frame_size,
            rate: n.rate,
            count: n.count,
            ..Flow::new(i, to)
        });
    }
    let reports = viommu_frontend::net_load::run(
        &mut vms,
        &flows,
        &TrafficOptions {
            duration: match (n.duration, n.count) {
                (Some(s), _) => Some(Duration::from_secs_f64(s.max(0.0))),
                (None, None) => Some(Duration::from_secs(5)),
                (None, Some(_)) => None,
            },
            spin: Duration::from_micros(n.spin_us),
            rx_buffer_len: n.rx_buffer_len,
            rx_buffers: n.rx_buffers,
            tx_burst: n.burst.max(1),
            split_header: n.split_header,
            ..TrafficOptions::default()
        },
    )?;
    let mut ok = true;
    for (i, r) in reports.iter().enumerate() {
        ok &= r.rx_corrupt == 0;
        let fields = [
            ("port", i.to_string()),
            ("policy", format!("{:?}", policies[i].to_string())),
            ("mac", format!("{:?}", mac_string(r.mac))),
            ("tx_fps", format!("{:.0}", r.tx_pps())),
            ("rx_fps", format!("{:.0}", r.rx_pps())),
            ("tx_sent", r.tx_sent.to_string()),
            ("tx_completed", r.tx_completed.to_string()),
            ("rx_frames", r.rx_frames.to_string()),
            ("rx_corrupt", r.rx_corrupt.to_string()),
            ("rx_foreign", r.rx_foreign.to_string()),
            ("rx_bad_header", r.rx_bad_header.to_string()),
            ("rx_out_of_order", r.rx_out_of_order.to_string()),
            ("rx_bad_num_buffers", r.rx_bad_num_buffers.to_string()),
            ("maps", r.dma.maps.to_string()),
            ("unmaps", r.dma.unmaps.to_string()),
            ("iommu_batches", r.dma.batches.to_string()),
            ("seconds", format!("{:.3}", r.elapsed.as_secs_f64())),
        ];
        if n.json {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            println!("{{{}}}", body.join(","));
        } else {
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k}={}", v.trim_matches('"')))
                .collect();
            println!("{}", body.join(" "));
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("viommu-frontend: {}", report(e.as_ref()));
            ExitCode::from(2)
        }
    }
}
