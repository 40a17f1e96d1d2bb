//! Daemon settings: command-line options and an optional TOML file, merged
//! (the command line wins) and validated into a [`DeviceConfig`].

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use vhost_user_process::listen::Listen;
pub use vhost_user_process::logging::{LogFormat, LogSettings};
use viommu_core::config::X86_MSI_WINDOW;
use viommu_core::{ConfigError, DeviceConfig, EndpointRange, Limits};
use virtio_iommu_proto::config::{DomainRange, InputRange};
use virtio_iommu_proto::probe::{ResvMem, ResvSubtype};

/// `--poll-us` when not given: the longest polling window. Its shortest,
/// a tenth, is about what one sleep and wake-up cost the request thread
/// (measured in docs/performance.md).
pub const DEFAULT_POLL_US: u64 = 50;

/// Default maximum virtqueue size offered to the VMM.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// virtio-iommu device (virtio ID 23) as a vhost-user backend.
///
/// Start it with a socket path, then point a VMM's vhost-user device at
/// that socket (QEMU: `-chardev socket,id=viommu,path=PATH -device
/// vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40`).
/// Every option has a default that works for x86 Linux guests; a TOML file
/// (`--config`) takes the same settings, and options given on the command
/// line override it.
#[derive(Parser, Debug, Default, Clone)]
#[command(name = "vhost-user-iommu", version)]
pub struct Cli {
    /// Listen for the VMM on this Unix socket. A stale socket there is
    /// replaced; a live one, or anything that is not a socket, is refused.
    /// Removed at exit if it is still this process's.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Listen on an inherited, already listening Unix socket file descriptor
    /// (a systemd socket unit's is 3). With neither this nor --socket-path,
    /// a socket systemd passed (LISTEN_FDS, LISTEN_PID) is served.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,

    /// Mode of the --socket-path file, in octal (e.g. 0660: the daemon's
    /// user and group may connect). Default: what the umask gives.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,

    /// Group of the --socket-path file (a name or a number), so that a VMM
    /// running as another user of that group can connect. Default: the
    /// daemon's group.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Print the backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// TOML file with device settings (same names as these options, with
    /// `_` for `-`, plus `[[endpoint]]` tables for per-range reserved regions).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Endpoint IDs that exist, as a list of IDs and inclusive ranges
    /// (PCI requester IDs: bus<<8 | dev<<3 | fn). Default: 0-0xffff.
    #[arg(long, value_name = "LIST")]
    pub endpoints: Option<String>,

    /// Reserved IOVA region of every endpoint, `msi:START-END` or
    /// `reserved:START-END`; repeat for several. Replaces the default, the
    /// x86 MSI window msi:0xfee00000-0xfeefffff. `none` for no region.
    #[arg(long = "reserved-region", value_name = "KIND:START-END")]
    pub reserved_regions: Vec<String>,

    /// Page sizes the device supports; the lowest set bit is the MAP
    /// granule. Default: 0xfffffffffffff000 (4 KiB and up).
    #[arg(long, value_name = "MASK")]
    pub page_size_mask: Option<String>,

    /// IOVA window `START-END` (inclusive), or `none` to not offer
    /// F_INPUT_RANGE. Default: 0-0xffffffffffff (48 bits).
    #[arg(long, value_name = "START-END")]
    pub input_range: Option<String>,

    /// Domain ID window `START-END` (inclusive), or `none` to not offer
    /// F_DOMAIN_RANGE. Default: 0-0xffff.
    #[arg(long, value_name = "START-END")]
    pub domain_range: Option<String>,

    /// PROBE properties size in bytes; 0 does not offer F_PROBE. Default: 512.
    #[arg(long, value_name = "BYTES")]
    pub probe_size: Option<u32>,

    /// Initial `bypass` config byte: unattached endpoints reach guest
    /// memory untranslated. Default: on, so firmware can DMA before the
    /// guest driver attaches devices; `off` blocks them until attached.
    #[arg(long, value_name = "on|off")]
    pub bypass: Option<OnOff>,

    /// Offer the legacy F_BYPASS feature instead of F_BYPASS_CONFIG.
    #[arg(long)]
    pub legacy_bypass: bool,

    /// Offer F_MMIO (MAP with the MMIO flag).
    #[arg(long)]
    pub mmio: bool,

    /// Domains alive at once; more answer NOMEM. Default: 4096.
    #[arg(long, value_name = "N")]
    pub max_domains: Option<u32>,

    /// Mappings in all domains together; more answer NOMEM. Default: 2097152.
    #[arg(long, value_name = "N")]
    pub max_mappings: Option<u32>,

    /// Mappings in one domain; more answer NOMEM. Default: 1048576.
    #[arg(long, value_name = "N")]
    pub max_mappings_per_domain: Option<u32>,

    /// Largest virtqueue size offered to the VMM. Default: 1024.
    #[arg(long, value_name = "N")]
    pub queue_size: Option<u16>,

    /// After the request queue runs dry, the request thread polls it
    /// before it sleeps on the kick, for at most this many microseconds.
    /// The window adapts as KVM's halt-polling does: it doubles when the
    /// guest's next request came within this bound of the thread going to
    /// sleep (polling would have caught it without a wake-up), halves when
    /// it was spent before a longer sleep, and stays between a tenth of the
    /// bound and the bound. The loop yields the CPU between polls, so it
    /// never starves a guest on a shared core. 0 always sleeps at once.
    /// Default: 50.
    #[arg(long, value_name = "US")]
    pub poll_us: Option<u64>,

    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing
    /// filter directive). `RUST_LOG` is used when this is not given.
    /// Default: info.
    /// Given twice, the last one wins.
    #[arg(long, value_name = "FILTER", overrides_with = "log_level")]
    pub log_level: Option<String>,

    /// Log line format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// How request-queue kicks are waited for: `uring` (a dedicated thread
    /// reading the kick eventfd through io_uring; falls back to `epoll`
    /// when io_uring is unavailable) or `epoll` (vhost-user-backend's own
    /// event thread). Default: uring.
    #[arg(long, value_enum, value_name = "LOOP")]
    pub kick_loop: Option<KickLoopKind>,

    /// Pin the request-queue thread to this CPU (with `--kick-loop uring`),
    /// e.g. a core isolated for DPDK-style polling. Default: not pinned.
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<usize>,

    /// Listen for co-located backends (vhost-user-net/-blk processes) on
    /// this Unix socket; each one that connects receives the shared
    /// translation table (see docs/backend-protocol.md). Without it no
    /// table is published. Taken over only from a stale socket, like
    /// --socket-path.
    #[arg(long, value_name = "PATH")]
    pub backend_socket: Option<PathBuf>,

    /// A user ID allowed to connect to the backend socket (repeatable).
    /// The daemon's own user and root are always allowed.
    #[arg(long = "backend-uid", value_name = "UID")]
    pub backend_uids: Vec<u32>,

    /// Most memory the shared table may use, in MiB; a MAP that would need
    /// more answers NOMEM. Default: 1024.
    #[arg(long, value_name = "MIB")]
    pub table_max_mib: Option<u32>,

    /// Log a warning when a backend holds an UNMAP back (inside a session
    /// or holding a pin) this long. Default: 100.
    #[arg(long, value_name = "MS")]
    pub stall_warn_ms: Option<u64>,

    /// Kill (SIGKILL) a backend that holds an UNMAP back this long; 0 never
    /// kills and waits for as long as the backend lives. Default: 0. The
    /// UNMAP still completes only once the backend is gone and the I/O it
    /// registered has drained; a kill the kernel refuses (the daemon needs
    /// CAP_KILL or the backend's uid) is logged and the daemon keeps
    /// waiting.
    #[arg(long, value_name = "MS")]
    pub stall_kill_ms: Option<u64>,

    /// Keep the device's state (features, endpoints, domains, mappings) in
    /// DIR/device-state, written before each request completes, so that a
    /// daemon restarted on the same directory (after an upgrade, a crash,
    /// SIGKILL) carries on with the guest's mappings when the VMM
    /// reconnects. A state that does not load (corrupt, truncated, another
    /// format version, a differently configured device) is refused and the
    /// daemon exits; move it away to start fresh. One directory per daemon,
    /// ideally on tmpfs (e.g. /run/vhost-user-iommu/VM.state). Default: no
    /// state is kept; a restarted daemon is a fresh device.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    // --- operations: admin socket and metrics (docs/operations.md) ---
    /// Serve the admin socket (`viommu-ctl`) on this Unix socket, mode 0600
    /// (the daemon's user only). Default: off.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// Serve Prometheus/OpenMetrics metrics over HTTP at
    /// http://ADDR/metrics (e.g. 127.0.0.1:9464). Default: off.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// The system-call filter, installed on every thread once the sockets
    /// are bound: a call the daemon never makes kills it with SIGSYS.
    /// `off` only to debug (docs/operations.md). Default: on.
    #[arg(long, value_name = "on|off")]
    pub seccomp: Option<OnOff>,
}

/// A switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// Where request-queue kicks are handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KickLoopKind {
    /// A dedicated thread on io_uring.
    #[default]
    Uring,
    /// vhost-user-backend's epoll thread.
    Epoll,
}

/// The TOML file: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    socket_path: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    endpoints: Option<String>,
    /// `--reserved-region` (the plural is the name used before 0.1.1).
    #[serde(alias = "reserved_regions")]
    reserved_region: Option<Vec<String>>,
    #[serde(default, rename = "endpoint")]
    endpoint_ranges: Vec<FileEndpointRange>,
    page_size_mask: Option<String>,
    input_range: Option<String>,
    domain_range: Option<String>,
    probe_size: Option<u32>,
    bypass: Option<OnOff>,
    legacy_bypass: Option<bool>,
    mmio: Option<bool>,
    max_domains: Option<u32>,
    max_mappings: Option<u32>,
    max_mappings_per_domain: Option<u32>,
    queue_size: Option<u16>,
    poll_us: Option<u64>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    kick_loop: Option<KickLoopKind>,
    cpu: Option<usize>,
    backend_socket: Option<PathBuf>,
    /// `--backend-uid` (the plural is the name used before 0.1.1).
    #[serde(default, alias = "backend_uids")]
    backend_uid: Vec<u32>,
    table_max_mib: Option<u32>,
    stall_warn_ms: Option<u64>,
    stall_kill_ms: Option<u64>,
    state_dir: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    metrics_addr: Option<std::net::SocketAddr>,
    seccomp: Option<OnOff>,
}

/// `[[endpoint]]`: a range of endpoints with its own reserved regions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpointRange {
    ids: String,
    #[serde(default, alias = "reserved_regions")]
    reserved_region: Vec<String>,
}

/// Everything the daemon needs, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The device model's configuration.
    pub device: DeviceConfig,
    /// Where to listen (absent only with `--print-capabilities`).
    pub listen: Option<Listen>,
    /// Mode and group of the VMM socket file.
    pub socket_perms: vhost_user_process::socket_file::Permissions,
    /// Largest virtqueue size.
    pub queue_size: u16,
    /// Busy-poll window after the request queue runs dry.
    pub poll: Duration,
    /// Logging.
    pub log: LogSettings,
    /// The shared table and its backend socket, if enabled.
    pub table: Option<TableSettings>,
    /// Where request-queue kicks are handled.
    pub kick_loop: KickLoopKind,
    /// CPU to pin the request-queue thread to.
    pub cpu: Option<usize>,
    /// Where the device's state is kept across restarts.
    pub state_dir: Option<PathBuf>,
    /// Where the admin socket listens, if anywhere.
    pub admin_socket: Option<PathBuf>,
    /// Where metrics are served, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Whether the system-call filter is installed.
    pub seccomp: bool,
}

/// Default size bound of the shared table, in MiB.
pub const DEFAULT_TABLE_MAX_MIB: u32 = 1024;

/// The shared table and the backend socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSettings {
    /// Where backends connect.
    pub socket: PathBuf,
    /// Extra user IDs allowed to connect (besides the daemon's and root).
    pub allowed_uids: Vec<u32>,
    /// Size bound of the table, in MiB.
    pub max_mib: u32,
    /// Warn when a backend holds a grace period this long.
    pub stall_warn: Duration,
    /// Kill a backend that holds a grace period this long.
    pub stall_kill: Option<Duration>,
}

/// Why settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config file {path}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The TOML error, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A number could not be parsed.
    #[error("{what}: {value:?} is not a number (decimal, or hex with 0x)")]
    Number {
        /// Which setting.
        what: &'static str,
        /// The text.
        value: String,
    },
    /// A range is malformed.
    #[error("{what}: {value:?} is not a range START-END (inclusive) or a single value")]
    Range {
        /// Which setting.
        what: &'static str,
        /// The text.
        value: String,
    },
    /// A range's start lies above its end.
    #[error("{what}: {value:?} starts above its end ({start:#x} > {end:#x})")]
    RangeOrder {
        /// Which setting.
        what: &'static str,
        /// The text.
        value: String,
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// A reserved region is malformed.
    #[error("reserved region {0:?} is not msi:START-END, reserved:START-END or none")]
    Region(String),
    /// The MAP granule is below the host's page.
    #[error(
        "page_size_mask {0:#x}: its smallest page (the MAP granule) is below 4 KiB, the host's page and the table's"
    )]
    Granule(u64),
    /// Neither a socket path nor a descriptor was given.
    #[error("no socket: give --socket-path PATH or --fd N")]
    NoSocket,
    /// The queue size is not a power of two in 2..=32768.
    #[error("queue size {0} must be a power of two between 2 and 32768")]
    QueueSize(u16),
    /// The device configuration is invalid.
    #[error("invalid device configuration")]
    Device(#[from] ConfigError),
    /// A socket file's mode or group is not usable.
    #[error("{what}: {reason}")]
    SocketAccess {
        /// Which setting.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The shared table cannot represent this device.
    #[error("shared table (--backend-socket): {0}")]
    Table(String),
}

/// Parses `123` or `0x7b` ([`vhost_user_process::number`]).
pub fn parse_u64(what: &'static str, s: &str) -> Result<u64, SettingsError> {
    vhost_user_process::number::parse_u64(s).map_err(|_| SettingsError::Number {
        what,
        value: s.to_string(),
    })
}

fn parse_u32(what: &'static str, s: &str) -> Result<u32, SettingsError> {
    let v = parse_u64(what, s)?;
    u32::try_from(v).map_err(|_| SettingsError::Number {
        what,
        value: s.to_string(),
    })
}

/// Parses `START-END` (inclusive) or a single value.
pub fn parse_range(what: &'static str, s: &str) -> Result<(u64, u64), SettingsError> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (parse_u64(what, a)?, parse_u64(what, b)?),
        None => {
            let v = parse_u64(what, s)?;
            (v, v)
        }
    };
    if a > b {
        return Err(SettingsError::RangeOrder {
            what,
            value: s.to_string(),
            start: a,
            end: b,
        });
    }
    Ok((a, b))
}

fn parse_optional_range(what: &'static str, s: &str) -> Result<Option<(u64, u64)>, SettingsError> {
    if s.trim() == "none" {
        return Ok(None);
    }
    parse_range(what, s).map(Some)
}

/// Parses an endpoint list such as `0-0xff,0x100,0x200-0x2ff`.
pub fn parse_endpoint_list(s: &str) -> Result<Vec<(u32, u32)>, SettingsError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (a, b) = parse_range("endpoints", p)?;
            let a = u32::try_from(a).map_err(|_| SettingsError::Range {
                what: "endpoints",
                value: p.to_string(),
            })?;
            let b = u32::try_from(b).map_err(|_| SettingsError::Range {
                what: "endpoints",
                value: p.to_string(),
            })?;
            Ok((a, b))
        })
        .collect()
}

/// Parses reserved regions; `none` alone means no region.
pub fn parse_regions(list: &[String]) -> Result<Vec<ResvMem>, SettingsError> {
    if list.len() == 1 && list[0].trim() == "none" {
        return Ok(vec![]);
    }
    list.iter()
        .map(|s| {
            let (kind, range) = s
                .split_once(':')
                .ok_or_else(|| SettingsError::Region(s.clone()))?;
            let subtype = match kind.trim() {
                "msi" => ResvSubtype::Msi,
                "reserved" => ResvSubtype::Reserved,
                _ => return Err(SettingsError::Region(s.clone())),
            };
            // A region always names both ends: `msi:0xfee00000` is a
            // mistake, not a one-byte region.
            if !range.contains('-') {
                return Err(SettingsError::Region(s.clone()));
            }
            let (start, end) = parse_range("reserved region", range).map_err(|e| match e {
                SettingsError::RangeOrder { .. } => e,
                _ => SettingsError::Region(s.clone()),
            })?;
            Ok(ResvMem {
                subtype,
                start,
                end,
            })
        })
        .collect()
}

impl Settings {
    /// Merges the command line over the file (if any) over the defaults.
    pub fn from_cli(cli: &Cli) -> Result<Settings, SettingsError> {
        match &cli.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| SettingsError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                Self::from_toml(cli, path, &text)
            }
            None => Self::merge(cli, FileSettings::default()),
        }
    }

    /// Merges the command line over `text`, the TOML file read from `path`
    /// (named in errors), over the defaults.
    pub fn from_toml(cli: &Cli, path: &Path, text: &str) -> Result<Settings, SettingsError> {
        let file =
            toml::from_str::<FileSettings>(text).map_err(|source| SettingsError::ParseFile {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        Self::merge(cli, file)
    }

    fn merge(cli: &Cli, file: FileSettings) -> Result<Settings, SettingsError> {
        let defaults = DeviceConfig::default();
        let regions = if !cli.reserved_regions.is_empty() {
            parse_regions(&cli.reserved_regions)?
        } else if let Some(r) = &file.reserved_region {
            parse_regions(r)?
        } else {
            vec![X86_MSI_WINDOW]
        };
        let mut endpoints = Vec::new();
        for (first, last) in parse_endpoint_list(
            cli.endpoints
                .as_deref()
                .or(file.endpoints.as_deref())
                .unwrap_or("0-0xffff"),
        )? {
            endpoints.push(EndpointRange {
                first,
                last,
                resv: regions.clone(),
            });
        }
        for r in &file.endpoint_ranges {
            let resv = parse_regions(&r.reserved_region)?;
            for (first, last) in parse_endpoint_list(&r.ids)? {
                endpoints.push(EndpointRange {
                    first,
                    last,
                    resv: resv.clone(),
                });
            }
        }
        let page_size_mask = match cli
            .page_size_mask
            .as_deref()
            .or(file.page_size_mask.as_deref())
        {
            Some(s) => parse_u64("page_size_mask", s)?,
            None => defaults.page_size_mask,
        };
        let input_range = match cli.input_range.as_deref().or(file.input_range.as_deref()) {
            Some(s) => parse_optional_range("input_range", s)?
                .map(|(start, end)| InputRange { start, end }),
            None => defaults.input_range,
        };
        let domain_range = match cli.domain_range.as_deref().or(file.domain_range.as_deref()) {
            Some(s) => match parse_optional_range("domain_range", s)? {
                Some((a, b)) => Some(DomainRange {
                    start: parse_u32("domain_range", &a.to_string())?,
                    end: parse_u32("domain_range", &b.to_string())?,
                }),
                None => None,
            },
            None => defaults.domain_range,
        };
        let probe_size = match cli.probe_size.or(file.probe_size) {
            Some(0) => None,
            Some(n) => Some(n),
            None => defaults.probe_size,
        };
        let legacy_bypass = cli.legacy_bypass || file.legacy_bypass.unwrap_or(false);
        let bypass = cli
            .bypass
            .or(file.bypass)
            .map_or(defaults.initial_bypass, |b| b == OnOff::On);
        let limits = Limits {
            max_domains: cli
                .max_domains
                .or(file.max_domains)
                .unwrap_or(defaults.limits.max_domains),
            max_mappings: cli
                .max_mappings
                .or(file.max_mappings)
                .unwrap_or(defaults.limits.max_mappings),
            max_mappings_per_domain: cli
                .max_mappings_per_domain
                .or(file.max_mappings_per_domain)
                .unwrap_or(defaults.limits.max_mappings_per_domain),
        };
        let device = DeviceConfig {
            endpoints,
            page_size_mask,
            input_range,
            domain_range,
            probe_size,
            mmio: cli.mmio || file.mmio.unwrap_or(false),
            bypass_config: !legacy_bypass,
            legacy_bypass,
            initial_bypass: bypass,
            limits,
        };
        device.validate()?;
        // The same with or without --backend-socket: the daemon serves one
        // host, whose pages (and the shared table's) are at least 4 KiB.
        if device.page_size_mask.trailing_zeros() < 12 {
            return Err(SettingsError::Granule(device.page_size_mask));
        }
        let queue_size = cli
            .queue_size
            .or(file.queue_size)
            .unwrap_or(DEFAULT_QUEUE_SIZE);
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(SettingsError::QueueSize(queue_size));
        }
        let listen = match (
            &cli.fd,
            cli.socket_path.as_ref().or(file.socket_path.as_ref()),
        ) {
            (Some(fd), _) => Some(Listen::Fd(*fd)),
            (None, Some(p)) => Some(Listen::Path(p.clone())),
            (None, None) if cli.print_capabilities => None,
            (None, None) => return Err(SettingsError::NoSocket),
        };
        let socket_perms = vhost_user_process::socket_file::Permissions::parse(
            cli.socket_mode.as_deref().or(file.socket_mode.as_deref()),
            cli.socket_group.as_deref().or(file.socket_group.as_deref()),
        )
        .map_err(|(which, reason)| SettingsError::SocketAccess {
            what: if which == "mode" {
                "socket_mode"
            } else {
                "socket_group"
            },
            reason,
        })?;
        let table = match cli.backend_socket.as_ref().or(file.backend_socket.as_ref()) {
            None => None,
            Some(socket) => {
                let max_mib = cli
                    .table_max_mib
                    .or(file.table_max_mib)
                    .unwrap_or(DEFAULT_TABLE_MAX_MIB);
                if !(2..=1 << 20).contains(&max_mib) {
                    return Err(SettingsError::Table(format!(
                        "table_max_mib {max_mib} is not in 2..=1048576"
                    )));
                }
                let mut allowed_uids = file.backend_uid.clone();
                allowed_uids.extend(&cli.backend_uids);
                let kill = cli.stall_kill_ms.or(file.stall_kill_ms).unwrap_or(0);
                Some(TableSettings {
                    socket: socket.clone(),
                    allowed_uids,
                    max_mib,
                    stall_warn: Duration::from_millis(
                        cli.stall_warn_ms.or(file.stall_warn_ms).unwrap_or(100),
                    ),
                    stall_kill: (kill > 0).then(|| Duration::from_millis(kill)),
                })
            }
        };
        Ok(Settings {
            admin_socket: cli.admin_socket.clone().or(file.admin_socket),
            metrics_addr: cli.metrics_addr.or(file.metrics_addr),
            kick_loop: cli.kick_loop.or(file.kick_loop).unwrap_or_default(),
            cpu: cli.cpu.or(file.cpu),
            state_dir: cli.state_dir.clone().or(file.state_dir),
            seccomp: cli.seccomp.or(file.seccomp) != Some(OnOff::Off),
            table,
            device,
            listen,
            socket_perms,
            queue_size,
            poll: Duration::from_micros(cli.poll_us.or(file.poll_us).unwrap_or(DEFAULT_POLL_US)),
            log: LogSettings {
                filter: cli.log_level.clone().or(file.log_level),
                format: cli.log_format.or(file.log_format).unwrap_or_default(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["vhost-user-iommu"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    fn refused(args: &[&str]) -> String {
        let mut all = vec!["--socket-path", "/tmp/x.sock"];
        all.extend_from_slice(args);
        match Settings::from_cli(&cli(&all)) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => vhost_user_process::report_line(&e),
        }
    }

    #[test]
    fn the_example_file_holds_every_option_under_its_option_name_and_loads() {
        use clap::CommandFactory;
        const EXAMPLE: &str = include_str!("../../../deploy/example.toml");
        let cli_only = ["config", "fd", "print-capabilities", "help", "version"];
        let options: std::collections::BTreeSet<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !cli_only.contains(l))
            .map(|l| l.replace('-', "_"))
            .collect();
        // Settings without a default are shown commented out: `# key = …`.
        let text: String = EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| options.contains(k)) =>
                {
                    rest
                }
                _ => l,
            })
            .flat_map(|l| [l, "\n"])
            .collect();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let keys: std::collections::BTreeSet<String> =
            table.keys().filter(|k| *k != "endpoint").cloned().collect();
        assert_eq!(keys, options, "deploy/example.toml vs the options");
        // The file as shipped loads (commented examples stay comments: a
        // group name, say, need not exist on this host).
        let path = std::env::temp_dir().join(format!("viommu-example-{}.toml", std::process::id()));
        std::fs::write(&path, EXAMPLE).unwrap();
        let loaded = Settings::from_cli(&cli(&["-c", path.to_str().unwrap()]));
        let _ = std::fs::remove_file(&path);
        let s = loaded.unwrap();
        assert_eq!(s.socket_perms.mode, Some(0o660));
        assert!(s.table.is_some());
    }

    #[test]
    fn the_shipped_unit_passes_options_the_daemon_knows() {
        const UNIT: &str = include_str!("../../../deploy/vhost-user-iommu@.service");
        let mut exec = String::new();
        let mut lines = UNIT.lines().skip_while(|l| !l.starts_with("ExecStart="));
        for l in lines.by_ref() {
            exec.push_str(l.trim_end_matches('\\'));
            exec.push(' ');
            if !l.ends_with('\\') {
                break;
            }
        }
        let exec = exec.trim_start_matches("ExecStart=").replace("%i", "vm1");
        let args: Vec<&str> = exec.split_whitespace().collect();
        assert!(args[0].ends_with("/vhost-user-iommu"), "{args:?}");
        let cli = Cli::try_parse_from(&args).unwrap();
        // The VMM socket comes from the socket unit (mode and group there).
        assert_eq!(cli.fd, Some(3));
        assert!(cli.backend_socket.is_some(), "the unit publishes the table");
    }

    #[test]
    fn a_range_that_starts_above_its_end_says_so() {
        let e = refused(&["--input-range", "5-1"]);
        assert!(e.contains("starts above its end (0x5 > 0x1)"), "{e}");
        let e = refused(&["--reserved-region", "msi:0x2000-0x1000"]);
        assert!(e.contains("starts above its end"), "{e}");
    }

    #[test]
    fn a_reserved_region_without_an_end_is_refused_not_one_byte() {
        let e = refused(&["--reserved-region", "msi:0xfee00000"]);
        assert!(e.contains("msi:START-END"), "{e}");
    }

    #[test]
    fn a_granule_below_4k_is_refused_with_or_without_the_table() {
        let bare = refused(&["--page-size-mask", "0x3"]);
        let table = refused(&["--page-size-mask", "0x3", "--backend-socket", "/tmp/b.sock"]);
        assert_eq!(bare, table);
        assert!(bare.contains("below 4 KiB"), "{bare}");
    }

    #[test]
    fn defaults_with_only_a_socket_are_the_documented_ones() {
        let s = Settings::from_cli(&cli(&["--socket-path", "/tmp/x.sock"])).unwrap();
        assert_eq!(s.device, DeviceConfig::default());
        assert_eq!(s.listen, Some(Listen::Path("/tmp/x.sock".into())));
        assert_eq!(s.queue_size, 1024);
        assert_eq!(s.poll, Duration::from_micros(50));
    }

    #[test]
    fn options_map_onto_the_device_config() {
        let s = Settings::from_cli(&cli(&[
            "--fd",
            "3",
            "--endpoints",
            "0x20,0x28-0x2f",
            "--reserved-region",
            "reserved:0x1000-0x1fff",
            "--reserved-region",
            "msi:0x8000000-0x80fffff",
            "--page-size-mask",
            "0x40201000",
            "--input-range",
            "none",
            "--domain-range",
            "1-7",
            "--probe-size",
            "0",
            "--bypass",
            "off",
            "--mmio",
            "--max-domains",
            "9",
            "--queue-size",
            "256",
            "--poll-us",
            "50",
        ]))
        .unwrap();
        let d = &s.device;
        assert_eq!(s.listen, Some(Listen::Fd(3)));
        assert_eq!(d.endpoints.len(), 2);
        assert_eq!((d.endpoints[1].first, d.endpoints[1].last), (0x28, 0x2f));
        assert_eq!(d.endpoints[0].resv.len(), 2);
        assert_eq!(d.endpoints[0].resv[0].subtype, ResvSubtype::Reserved);
        assert_eq!(d.page_size_mask, 0x4020_1000);
        assert_eq!(d.input_range, None);
        assert_eq!(d.domain_range, Some(DomainRange { start: 1, end: 7 }));
        assert_eq!(d.probe_size, None);
        assert!(!d.initial_bypass && d.mmio && d.bypass_config);
        assert_eq!(d.limits.max_domains, 9);
        assert_eq!((s.queue_size, s.poll), (256, Duration::from_micros(50)));
    }

    #[test]
    fn the_file_is_read_and_the_command_line_wins() {
        let dir = std::env::temp_dir().join(format!("viommu-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            r#"
socket_path = "/run/viommu.sock"
endpoints = "0-0xf"
probe_size = 256
bypass = "off"
[[endpoint]]
ids = "0x100-0x101"
reserved_regions = ["reserved:0x0-0xfff"]
"#,
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let s = Settings::from_cli(&cli(&["-c", p, "--probe-size", "128"])).unwrap();
        assert_eq!(s.listen, Some(Listen::Path("/run/viommu.sock".into())));
        assert_eq!(s.device.probe_size, Some(128));
        assert!(!s.device.initial_bypass);
        assert_eq!(s.device.endpoints.len(), 2);
        assert_eq!(s.device.endpoints[1].resv[0].end, 0xfff);
        std::fs::write(&path, "probe_sise = 1\n").unwrap();
        let err = Settings::from_cli(&cli(&["-c", p])).unwrap_err();
        assert!(matches!(err, SettingsError::ParseFile { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_example_file_is_valid_and_matches_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/example.toml");
        let s = Settings::from_cli(&cli(&["-c", path])).unwrap();
        let bare = Settings::from_cli(&cli(&["--socket-path", "x"])).unwrap();
        assert_eq!(s.device.page_size_mask, bare.device.page_size_mask);
        assert_eq!(s.device.input_range, bare.device.input_range);
        assert_eq!(s.device.domain_range, bare.device.domain_range);
        assert_eq!(s.device.initial_bypass, bare.device.initial_bypass);
        assert_eq!(s.device.endpoints.len(), 2);
        assert_eq!(s.device.endpoints[1].resv.len(), 2);
    }

    #[test]
    fn the_syscall_filter_is_on_unless_turned_off() {
        let s = Settings::from_cli(&cli(&["--socket-path", "s"])).unwrap();
        assert!(s.seccomp);
        let s = Settings::from_cli(&cli(&["--socket-path", "s", "--seccomp", "off"])).unwrap();
        assert!(!s.seccomp);
        assert!(Cli::try_parse_from(["x", "--seccomp", "maybe"]).is_err());
    }

    #[test]
    fn bad_values_are_refused_with_the_setting_named() {
        let err = |args: &[&str]| Settings::from_cli(&cli(args)).unwrap_err().to_string();
        assert!(err(&["--socket-path", "s", "--endpoints", "0-zz"]).contains("endpoints"));
        assert!(err(&["--socket-path", "s", "--input-range", "9-1"]).contains("input_range"));
        assert!(err(&["--socket-path", "s", "--reserved-region", "io:1-2"]).contains("io:1-2"));
        assert!(err(&["--socket-path", "s", "--queue-size", "100"]).contains("power of two"));
        assert!(err(&["--socket-path", "s", "--page-size-mask", "0"]).contains("invalid device"));
        assert!(err(&[]).contains("--socket-path"));
        assert!(err(&["--socket-path", "s", "--endpoints", "0-0x1ffffffff"]).contains("endpoints"));
        assert!(Cli::try_parse_from(["x", "--socket-path", "s", "--fd", "3"]).is_err());
    }
}
