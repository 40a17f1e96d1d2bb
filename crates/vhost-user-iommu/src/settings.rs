//! Daemon settings: one definition of every option ([`Cli`]) serves the
//! command line, the TOML file and `--help`. The file's values become the
//! options' defaults ([`file`]), so the command line wins, then the file,
//! then the built-in default; [`Settings::from_cli`] validates the result
//! into a [`DeviceConfig`].

use clap::{Parser, ValueEnum};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use vhost_user_process::listen::Listen;
pub use vhost_user_process::logging::{LogFormat, LogSettings};
use viommu_core::config::X86_MSI_WINDOW;
use viommu_core::{ConfigError, DeviceConfig, EndpointRange, Limits};
use virtio_iommu_proto::config::{DomainRange, InputRange};
use virtio_iommu_proto::probe::{ResvMem, ResvSubtype};

mod file;
pub use file::EndpointRangeText;

/// `--poll-us` when not given: the longest polling window. Its shortest,
/// a tenth, is about what one sleep and wake-up cost the request thread
/// (measured in docs/performance.md).
pub const DEFAULT_POLL_US: u64 = 50;

/// Default maximum virtqueue size offered to the VMM.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// Default size bound of the shared table, in MiB.
pub const DEFAULT_TABLE_MAX_MIB: u32 = 1024;

/// `--stall-warn-ms` when not given.
pub const DEFAULT_STALL_WARN_MS: u64 = 100;

/// `--stall-kill-ms` when not given: never kill.
pub const DEFAULT_STALL_KILL_MS: u64 = 0;

/// Options that only the command line takes; every other option is also a
/// key of the settings file.
pub const COMMAND_LINE_ONLY: [&str; 5] = ["config", "fd", "print-capabilities", "help", "version"];

/// The built-in defaults of the device options, as option text, taken from
/// [`DeviceConfig::default`] so that `--help` shows what the device gets.
mod default_text {
    use super::*;

    pub fn endpoints() -> String {
        DeviceConfig::default()
            .endpoints
            .iter()
            .map(|r| format!("{}-{:#x}", r.first, r.last))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn reserved_regions() -> Vec<String> {
        [X86_MSI_WINDOW].iter().map(region).collect()
    }

    pub fn region(r: &ResvMem) -> String {
        let kind = match r.subtype {
            ResvSubtype::Msi => "msi",
            _ => "reserved",
        };
        format!("{kind}:{:#x}-{:#x}", r.start, r.end)
    }

    pub fn page_size_mask() -> String {
        format!("{:#x}", DeviceConfig::default().page_size_mask)
    }

    pub fn input_range() -> String {
        match DeviceConfig::default().input_range {
            Some(r) => format!("{}-{:#x}", r.start, r.end),
            None => "none".into(),
        }
    }

    pub fn domain_range() -> String {
        match DeviceConfig::default().domain_range {
            Some(r) => format!("{}-{:#x}", r.start, r.end),
            None => "none".into(),
        }
    }

    pub fn probe_size() -> u32 {
        DeviceConfig::default().probe_size.unwrap_or(0)
    }

    pub fn bypass() -> OnOff {
        if DeviceConfig::default().initial_bypass {
            OnOff::On
        } else {
            OnOff::Off
        }
    }
}

/// virtio-iommu device (virtio ID 23) as a vhost-user backend.
///
/// Start it with a socket path, then point a VMM's vhost-user device at
/// that socket (QEMU: `-chardev socket,id=viommu,path=PATH -device
/// vhost-user-test-device-pci,chardev=viommu,virtio-id=23,num_vqs=2,config_size=40`).
/// Every option has a default that works for x86 Linux guests. A TOML file
/// (`--config`) takes the same settings under the same names (with `_` for
/// `-`): its values replace the defaults shown here, and options given on
/// the command line override it.
#[derive(Parser, Debug, Clone)]
#[command(name = "vhost-user-iommu", version)]
pub struct Cli {
    /// Listen for the VMM on this Unix socket. A stale socket there is
    /// replaced; a live one, or anything that is not a socket, is refused.
    /// Removed at exit if it is still this process's.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Listen on an inherited, already listening Unix socket file descriptor
    /// (a systemd socket unit's is 3). With neither this nor --socket-path,
    /// a socket systemd passed (LISTEN_FDS, LISTEN_PID) is served. Wins over
    /// a socket_path from the settings file.
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
    /// `_` for `-`, plus `[[endpoint]]` tables for per-range reserved
    /// regions). Its values replace the defaults; the command line wins.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Endpoint IDs that exist, as a list of IDs and inclusive ranges
    /// (PCI requester IDs: bus<<8 | dev<<3 | fn).
    #[arg(long, value_name = "LIST", default_value_t = default_text::endpoints())]
    pub endpoints: String,

    /// Reserved IOVA region of every endpoint, `msi:START-END` or
    /// `reserved:START-END`; repeat for several. Given on the command line,
    /// these replace the file's list, which replaces the default (the x86
    /// MSI window). `none` for no region.
    #[arg(
        long = "reserved-region",
        value_name = "KIND:START-END",
        default_values_t = default_text::reserved_regions()
    )]
    pub reserved_regions: Vec<String>,

    /// Page sizes the device supports; the lowest set bit is the MAP
    /// granule (4 KiB and up by default).
    #[arg(long, value_name = "MASK", default_value_t = default_text::page_size_mask())]
    pub page_size_mask: String,

    /// IOVA window `START-END` (inclusive), or `none` to not offer
    /// F_INPUT_RANGE (48 bits by default).
    #[arg(long, value_name = "START-END", default_value_t = default_text::input_range())]
    pub input_range: String,

    /// Domain ID window `START-END` (inclusive), or `none` to not offer
    /// F_DOMAIN_RANGE.
    #[arg(long, value_name = "START-END", default_value_t = default_text::domain_range())]
    pub domain_range: String,

    /// PROBE properties size in bytes; 0 does not offer F_PROBE.
    #[arg(long, value_name = "BYTES", default_value_t = default_text::probe_size())]
    pub probe_size: u32,

    /// Initial `bypass` config byte: unattached endpoints reach guest
    /// memory untranslated. On by default, so firmware can DMA before the
    /// guest driver attaches devices; `off` blocks them until attached.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = default_text::bypass())]
    pub bypass: OnOff,

    /// Offer the legacy F_BYPASS feature instead of F_BYPASS_CONFIG.
    #[arg(long)]
    pub legacy_bypass: bool,

    /// Offer F_MMIO (MAP with the MMIO flag).
    #[arg(long)]
    pub mmio: bool,

    /// Domains alive at once; more answer NOMEM.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_domains)]
    pub max_domains: u32,

    /// Mappings in all domains together; more answer NOMEM.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_mappings)]
    pub max_mappings: u32,

    /// Mappings in one domain; more answer NOMEM.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_mappings_per_domain)]
    pub max_mappings_per_domain: u32,

    /// Largest virtqueue size offered to the VMM.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE)]
    pub queue_size: u16,

    /// After the request queue runs dry, the request thread polls it
    /// before it sleeps on the kick, for at most this many microseconds.
    /// The window adapts as KVM's halt-polling does: it doubles when the
    /// guest's next request came within this bound of the thread going to
    /// sleep (polling would have caught it without a wake-up), halves when
    /// it was spent before a longer sleep, and stays between a tenth of the
    /// bound and the bound. The loop yields the CPU between polls, so it
    /// never starves a guest on a shared core. 0 always sleeps at once.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u64,

    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing
    /// filter directive). `RUST_LOG` is used when this is not given, and
    /// `info` without either. Given twice, the last one wins.
    #[arg(long, value_name = "FILTER", overrides_with = "log_level")]
    pub log_level: Option<String>,

    /// Log line format.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::default())]
    pub log_format: LogFormat,

    /// How request-queue kicks are waited for: `uring` (a dedicated thread
    /// reading the kick eventfd through io_uring; falls back to `epoll`
    /// when io_uring is unavailable) or `epoll` (vhost-user-backend's own
    /// event thread).
    #[arg(long, value_enum, value_name = "LOOP", default_value_t = KickLoopKind::default())]
    pub kick_loop: KickLoopKind,

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
    /// Those given on the command line are added to the settings file's.
    /// The daemon's own user and root are always allowed.
    #[arg(long = "backend-uid", value_name = "UID")]
    pub backend_uids: Vec<u32>,

    /// Most memory the shared table may use, in MiB; a MAP that would need
    /// more answers NOMEM.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_TABLE_MAX_MIB)]
    pub table_max_mib: u32,

    /// Log a warning when a backend holds an UNMAP back (inside a session
    /// or holding a pin) this long.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_STALL_WARN_MS)]
    pub stall_warn_ms: u64,

    /// Kill (SIGKILL) a backend that holds an UNMAP back this long; 0 never
    /// kills and waits for as long as the backend lives. The UNMAP still
    /// completes only once the backend is gone and the I/O it registered
    /// has drained; a kill the kernel refuses (the daemon needs CAP_KILL or
    /// the backend's uid) is logged and the daemon keeps waiting.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_STALL_KILL_MS)]
    pub stall_kill_ms: u64,

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
    /// `off` only to debug (docs/operations.md).
    #[arg(long, value_enum, value_name = "on|off", default_value_t = OnOff::On)]
    pub seccomp: OnOff,

    /// The settings file's `[[endpoint]]` tables (file only).
    #[arg(skip)]
    endpoint_ranges: Vec<EndpointRangeText>,

    /// Whether `socket_path` came from the settings file, not the command
    /// line.
    #[arg(skip)]
    socket_path_from_file: bool,
}

impl Cli {
    /// Parses the command line `args` (the program's name first) over the
    /// settings file `--config` names, if any.
    pub fn load<I, T>(args: I) -> Result<Cli, SettingsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let cli = Cli::try_parse_from(&args).map_err(SettingsError::CommandLine)?;
        let Some(path) = cli.config else {
            return Ok(cli);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| SettingsError::ReadFile {
            path: path.clone(),
            source,
        })?;
        file::with_file(args, &path, &text)
    }

    /// Whether the VMM socket was named on the command line (`--socket-path`
    /// or `--fd`), rather than by the settings file or not at all.
    pub fn names_a_socket(&self) -> bool {
        self.fd.is_some() || (self.socket_path.is_some() && !self.socket_path_from_file)
    }
}

/// A switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// Where request-queue kicks are handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum KickLoopKind {
    /// A dedicated thread on io_uring.
    #[default]
    Uring,
    /// vhost-user-backend's epoll thread.
    Epoll,
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
    /// The command line is not understood (or asks for `--help`,
    /// `--version`: [`clap::Error::exit`] prints those).
    #[error("{0}")]
    CommandLine(#[source] clap::Error),
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
    /// The config file has a key that names no option.
    #[error(
        "config file {path}: unknown key {key:?} (keys are the options' names with `_` for `-`, and [[endpoint]])"
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A config file value is of the wrong kind or refused by its option.
    #[error("config file {path}: {key}: {reason}")]
    FileValue {
        /// The file.
        path: PathBuf,
        /// The key (or keys, when the option's parser could not tell).
        key: String,
        /// Why.
        reason: String,
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
    /// Parses the command line `args` (the program's name first) over the
    /// settings file it names, if any, and validates the result.
    pub fn from_args<I, T>(args: I) -> Result<Settings, SettingsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Self::from_cli(&Cli::load(args)?)
    }

    /// Validates the settings file `text` (read from `path`, named in
    /// errors) with nothing on the command line.
    pub fn from_toml(path: &Path, text: &str) -> Result<Settings, SettingsError> {
        Self::from_cli(&file::with_file(
            vec!["vhost-user-iommu".into()],
            path,
            text,
        )?)
    }

    /// Validates options already merged with their settings file
    /// ([`Cli::load`]).
    pub fn from_cli(cli: &Cli) -> Result<Settings, SettingsError> {
        let regions = parse_regions(&cli.reserved_regions)?;
        let mut endpoints = Vec::new();
        for (first, last) in parse_endpoint_list(&cli.endpoints)? {
            endpoints.push(EndpointRange {
                first,
                last,
                resv: regions.clone(),
            });
        }
        for r in &cli.endpoint_ranges {
            let resv = parse_regions(&r.reserved_region)?;
            for (first, last) in parse_endpoint_list(&r.ids)? {
                endpoints.push(EndpointRange {
                    first,
                    last,
                    resv: resv.clone(),
                });
            }
        }
        let input_range = parse_optional_range("input_range", &cli.input_range)?
            .map(|(start, end)| InputRange { start, end });
        let domain_range = match parse_optional_range("domain_range", &cli.domain_range)? {
            Some((a, b)) => Some(DomainRange {
                start: parse_u32("domain_range", &a.to_string())?,
                end: parse_u32("domain_range", &b.to_string())?,
            }),
            None => None,
        };
        let device = DeviceConfig {
            endpoints,
            page_size_mask: parse_u64("page_size_mask", &cli.page_size_mask)?,
            input_range,
            domain_range,
            probe_size: (cli.probe_size > 0).then_some(cli.probe_size),
            mmio: cli.mmio,
            bypass_config: !cli.legacy_bypass,
            legacy_bypass: cli.legacy_bypass,
            initial_bypass: cli.bypass == OnOff::On,
            limits: Limits {
                max_domains: cli.max_domains,
                max_mappings: cli.max_mappings,
                max_mappings_per_domain: cli.max_mappings_per_domain,
            },
        };
        device.validate()?;
        // The same with or without --backend-socket: the daemon serves one
        // host, whose pages (and the shared table's) are at least 4 KiB.
        if device.page_size_mask.trailing_zeros() < 12 {
            return Err(SettingsError::Granule(device.page_size_mask));
        }
        let queue_size = cli.queue_size;
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(SettingsError::QueueSize(queue_size));
        }
        let listen = match (&cli.fd, &cli.socket_path) {
            (Some(fd), _) => Some(Listen::Fd(*fd)),
            (None, Some(p)) => Some(Listen::Path(p.clone())),
            (None, None) if cli.print_capabilities => None,
            (None, None) => return Err(SettingsError::NoSocket),
        };
        let socket_perms = vhost_user_process::socket_file::Permissions::parse(
            cli.socket_mode.as_deref(),
            cli.socket_group.as_deref(),
        )
        .map_err(|(which, reason)| SettingsError::SocketAccess {
            what: if which == "mode" {
                "socket_mode"
            } else {
                "socket_group"
            },
            reason,
        })?;
        let table = match &cli.backend_socket {
            None => None,
            Some(socket) => {
                let max_mib = cli.table_max_mib;
                if !(2..=1 << 20).contains(&max_mib) {
                    return Err(SettingsError::Table(format!(
                        "table_max_mib {max_mib} is not in 2..=1048576"
                    )));
                }
                let kill = cli.stall_kill_ms;
                Some(TableSettings {
                    socket: socket.clone(),
                    allowed_uids: cli.backend_uids.clone(),
                    max_mib,
                    stall_warn: Duration::from_millis(cli.stall_warn_ms),
                    stall_kill: (kill > 0).then(|| Duration::from_millis(kill)),
                })
            }
        };
        Ok(Settings {
            admin_socket: cli.admin_socket.clone(),
            metrics_addr: cli.metrics_addr,
            kick_loop: cli.kick_loop,
            cpu: cli.cpu,
            state_dir: cli.state_dir.clone(),
            seccomp: cli.seccomp == OnOff::On,
            table,
            device,
            listen,
            socket_perms,
            queue_size,
            poll: Duration::from_micros(cli.poll_us),
            log: LogSettings {
                filter: cli.log_level.clone(),
                format: cli.log_format,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Result<Settings, SettingsError> {
        Settings::from_args(std::iter::once("vhost-user-iommu").chain(args.iter().copied()))
    }

    fn refused(args: &[&str]) -> String {
        let mut all = vec!["--socket-path", "/tmp/x.sock"];
        all.extend_from_slice(args);
        match settings(&all) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => vhost_user_process::report_line(&e),
        }
    }

    #[test]
    fn the_example_file_holds_every_option_under_its_option_name_and_loads() {
        use clap::CommandFactory;
        const EXAMPLE: &str = include_str!("../../../deploy/example.toml");
        let options: std::collections::BTreeSet<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !COMMAND_LINE_ONLY.contains(l))
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
        let loaded = settings(&["-c", path.to_str().unwrap()]);
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
        let s = settings(&["--socket-path", "/tmp/x.sock"]).unwrap();
        assert_eq!(s.device, DeviceConfig::default());
        assert_eq!(s.listen, Some(Listen::Path("/tmp/x.sock".into())));
        assert_eq!(s.queue_size, 1024);
        assert_eq!(s.poll, Duration::from_micros(50));
    }

    #[test]
    fn options_map_onto_the_device_config() {
        let s = settings(&[
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
        ])
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
        let s = settings(&["-c", p, "--probe-size", "128"]).unwrap();
        assert_eq!(s.listen, Some(Listen::Path("/run/viommu.sock".into())));
        assert_eq!(s.device.probe_size, Some(128));
        assert!(!s.device.initial_bypass);
        assert_eq!(s.device.endpoints.len(), 2);
        assert_eq!(s.device.endpoints[1].resv[0].end, 0xfff);
        std::fs::write(&path, "probe_sise = 1\n").unwrap();
        let err = settings(&["-c", p]).unwrap_err();
        assert!(
            matches!(&err, SettingsError::UnknownKey { key, .. } if key == "probe_sise"),
            "{err}"
        );
        assert!(err.to_string().contains("\"probe_sise\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_example_file_is_valid_and_matches_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/example.toml");
        let s = settings(&["-c", path]).unwrap();
        let bare = settings(&["--socket-path", "x"]).unwrap();
        assert_eq!(s.device.page_size_mask, bare.device.page_size_mask);
        assert_eq!(s.device.input_range, bare.device.input_range);
        assert_eq!(s.device.domain_range, bare.device.domain_range);
        assert_eq!(s.device.initial_bypass, bare.device.initial_bypass);
        assert_eq!(s.device.endpoints.len(), 2);
        assert_eq!(s.device.endpoints[1].resv.len(), 2);
    }

    #[test]
    fn the_syscall_filter_is_on_unless_turned_off() {
        let s = settings(&["--socket-path", "s"]).unwrap();
        assert!(s.seccomp);
        let s = settings(&["--socket-path", "s", "--seccomp", "off"]).unwrap();
        assert!(!s.seccomp);
        assert!(Cli::try_parse_from(["x", "--seccomp", "maybe"]).is_err());
    }

    #[test]
    fn bad_values_are_refused_with_the_setting_named() {
        let err = |args: &[&str]| settings(args).unwrap_err().to_string();
        assert!(err(&["--socket-path", "s", "--endpoints", "0-zz"]).contains("endpoints"));
        assert!(err(&["--socket-path", "s", "--input-range", "9-1"]).contains("input_range"));
        assert!(err(&["--socket-path", "s", "--reserved-region", "io:1-2"]).contains("io:1-2"));
        assert!(err(&["--socket-path", "s", "--queue-size", "100"]).contains("power of two"));
        assert!(err(&["--socket-path", "s", "--page-size-mask", "0"]).contains("invalid device"));
        assert!(err(&[]).contains("--socket-path"));
        assert!(err(&["--socket-path", "s", "--endpoints", "0-0x1ffffffff"]).contains("endpoints"));
        assert!(Cli::try_parse_from(["x", "--socket-path", "s", "--fd", "3"]).is_err());
    }

    /// Writes `text` as a settings file and loads it under `args`.
    fn with_file(name: &str, text: &str, args: &[&str]) -> Result<Settings, SettingsError> {
        let path = std::env::temp_dir().join(format!("viommu-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let mut all = vec!["-c", path.to_str().unwrap()];
        all.extend_from_slice(args);
        let loaded = settings(&all);
        std::fs::remove_file(&path).unwrap();
        loaded
    }

    #[test]
    fn a_file_value_beats_the_default_and_the_command_line_beats_it() {
        let file = "socket_path = \"s\"\nprobe_size = 256\nmmio = true\nkick_loop = \"epoll\"\n";
        let bare = settings(&["--socket-path", "s"]).unwrap();
        assert_eq!(bare.device.probe_size, Some(512));
        let s = with_file("over-default", file, &[]).unwrap();
        assert_eq!(s.device.probe_size, Some(256));
        assert!(s.device.mmio);
        assert_eq!(s.kick_loop, KickLoopKind::Epoll);
        let s = with_file(
            "over-file",
            file,
            &["--probe-size", "128", "--kick-loop", "uring"],
        )
        .unwrap();
        assert_eq!(s.device.probe_size, Some(128));
        assert_eq!(s.kick_loop, KickLoopKind::Uring);
        // Not given anywhere: the built-in default.
        assert_eq!(s.queue_size, DEFAULT_QUEUE_SIZE);
    }

    #[test]
    fn an_unknown_or_command_line_only_key_is_refused_by_name() {
        for key in [
            "probe_sise",
            "fd",
            "config",
            "print_capabilities",
            "socket-path",
        ] {
            let err =
                with_file("unknown", &format!("{key} = 1\n"), &["--socket-path", "s"]).unwrap_err();
            assert!(
                matches!(&err, SettingsError::UnknownKey { key: k, .. } if k == key),
                "{key}: {err}"
            );
            assert!(err.to_string().contains(&format!("{key:?}")), "{err}");
        }
    }

    #[test]
    fn a_file_value_of_the_wrong_kind_is_refused_with_its_key() {
        let refused = |text: &str| {
            with_file("kind", text, &["--socket-path", "s"])
                .unwrap_err()
                .to_string()
        };
        let e = refused("probe_size = \"many\"\n");
        assert!(e.contains("probe_size") && e.contains("many"), "{e}");
        let e = refused("bypass = \"maybe\"\nqueue_size = 256\n");
        assert!(e.contains(": bypass:") && e.contains("maybe"), "{e}");
        let e = refused("reserved_region = \"msi:0xfee00000-0xfeefffff\"\n");
        assert!(e.contains("reserved_region: expected a list"), "{e}");
        let e = refused("queue_size = [256]\n");
        assert!(e.contains("queue_size: expected one value"), "{e}");
        let e = refused("poll_us = 1.5\n");
        assert!(e.contains("poll_us: expected a string"), "{e}");
        // A value that looks like an option is still a value.
        for uid in ["-1", "--help", "--socket-path=x"] {
            let e = refused(&format!("backend_uid = [{uid:?}]\n"));
            assert!(
                e.contains("backend_uid: invalid value") && e.contains(uid),
                "{e}"
            );
        }
        let e = refused("backend_uid = [1]\nbackend_uids = [2]\n");
        assert!(e.contains("given twice"), "{e}");
        let e = refused("[[endpoint]]\nids = \"1\"\nregion = []\n");
        assert!(e.contains("invalid config file"), "{e}");
        // A value the option takes but the device does not.
        let e = refused("queue_size = 100\n");
        assert!(e.contains("power of two"), "{e}");
    }

    #[test]
    fn repeatable_options_replace_or_add_to_the_file_as_help_says() {
        let file = "socket_path = \"s\"\nbackend_socket = \"b\"\n\
                    backend_uids = [1000]\nreserved_regions = [\"reserved:0x0-0xfff\"]\n";
        let s = with_file("repeat", file, &[]).unwrap();
        assert_eq!(s.table.as_ref().unwrap().allowed_uids, [1000]);
        assert_eq!(s.device.endpoints[0].resv[0].subtype, ResvSubtype::Reserved);
        let s = with_file(
            "repeat2",
            file,
            &[
                "--backend-uid",
                "1001",
                "--reserved-region",
                "msi:0x8000000-0x80fffff",
            ],
        )
        .unwrap();
        // Added to the file's uids...
        assert_eq!(s.table.unwrap().allowed_uids, [1000, 1001]);
        // ...but the regions replace the file's.
        assert_eq!(s.device.endpoints[0].resv.len(), 1);
        assert_eq!(s.device.endpoints[0].resv[0].start, 0x800_0000);
        let s = with_file("none", "socket_path = \"s\"\nreserved_region = []\n", &[]).unwrap();
        assert!(s.device.endpoints[0].resv.is_empty());
    }

    #[test]
    fn a_command_line_fd_beats_the_files_socket_path_without_a_conflict() {
        let path = std::env::temp_dir().join(format!("viommu-fd-{}.toml", std::process::id()));
        std::fs::write(&path, "socket_path = \"/run/x.sock\"\n").unwrap();
        let p = path.to_str().unwrap();
        let from_file = Cli::load(["vhost-user-iommu", "-c", p]).unwrap();
        let with_fd = Cli::load(["vhost-user-iommu", "-c", p, "--fd", "3"]);
        let own = Cli::load(["vhost-user-iommu", "-c", p, "--socket-path", "/run/y.sock"]);
        std::fs::remove_file(&path).unwrap();
        // A socket unit's descriptor may still take over (main.rs).
        assert!(!from_file.names_a_socket());
        let s = Settings::from_cli(&with_fd.unwrap()).unwrap();
        assert_eq!(s.listen, Some(Listen::Fd(3)));
        let own = own.unwrap();
        assert!(own.names_a_socket());
        assert_eq!(own.socket_path, Some("/run/y.sock".into()));
    }

    #[test]
    fn help_shows_each_default_the_daemon_uses() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        let help = command.render_long_help().to_string();
        let mut shown = Vec::new();
        for arg in command.get_arguments() {
            let defaults: Vec<_> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy())
                .collect();
            // Flags (`false`) print no default.
            if defaults.is_empty() || arg.get_num_args().is_some_and(|n| n.max_values() == 0) {
                continue;
            }
            let text = format!("[default: {}]", defaults.join(", "));
            assert!(
                help.contains(&text),
                "--{:?}: {text} missing",
                arg.get_long()
            );
            shown.push(arg.get_long().unwrap_or_default().to_string());
        }
        for long in [
            "endpoints",
            "reserved-region",
            "page-size-mask",
            "input-range",
            "domain-range",
            "probe-size",
            "bypass",
            "max-domains",
            "max-mappings",
            "max-mappings-per-domain",
            "queue-size",
            "poll-us",
            "log-format",
            "kick-loop",
            "table-max-mib",
            "stall-warn-ms",
            "stall-kill-ms",
            "seccomp",
        ] {
            assert!(shown.iter().any(|s| s == long), "--{long} shows no default");
        }
        assert!(
            help.contains("[default: msi:0xfee00000-0xfeefffff]"),
            "{help}"
        );
        assert!(help.contains("[default: 0xfffffffffffff000]"), "{help}");
    }

    #[test]
    fn the_fuzzed_entry_point_takes_a_file_alone() {
        let s = Settings::from_toml(
            Path::new("f.toml"),
            "socket_path = \"s\"\nprobe_size = 64\n",
        )
        .unwrap();
        assert_eq!(s.device.probe_size, Some(64));
        assert!(matches!(
            Settings::from_toml(Path::new("f.toml"), ""),
            Err(SettingsError::NoSocket)
        ));
        assert!(matches!(
            Settings::from_toml(Path::new("f.toml"), "= ="),
            Err(SettingsError::ParseFile { .. })
        ));
    }
}
