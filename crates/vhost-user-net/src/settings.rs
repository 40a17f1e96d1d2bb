//! The command line and the TOML file (the same names in both), validated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use vhost_user_process::logging::{LogFormat, LogSettings};
use viommu_backend::IommuMode;

use crate::mac::Mac;
use crate::pmd::ForwardMode;

/// Most ports one switch serves.
pub const MAX_PORTS: usize = 64;

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// L2 switch: learn source addresses, flood broadcast, multicast and
    /// unknown unicast.
    Learn,
    /// Port 2k to port 2k+1 and back, unconditionally (for benchmarks).
    Io,
}

/// vhost-user-net: a polling virtual switch whose ports are vhost-user-net
/// devices, each translating its guest's DMA through that guest's
/// vhost-user-iommu shared table (or message IOTLB, or nothing).
#[derive(Debug, Parser)]
#[command(name = "vhost-user-net", version, about)]
pub struct Cli {
    /// A port: socket=PATH (the VMM's vhost-user socket, created here),
    /// mac=MAC (the guest NIC's address, a fixed forwarding entry; default
    /// 02:00:00:00:00:NN, NN the port's number from 1), iommu=MODE (none,
    /// table:SOCKET or iotlb-msg:SOCKET of that guest's vhost-user-iommu
    /// daemon; default none), endpoint=ID (the device's endpoint behind
    /// that IOMMU; required with an iommu mode). Repeatable; ports from
    /// --config come after these. Paths may not contain commas.
    #[arg(
        long = "port",
        value_name = "socket=PATH,mac=MAC,iommu=MODE,endpoint=ID"
    )]
    pub ports: Vec<String>,
    /// A TOML file with the same settings (keys as the option names:
    /// mode, pmd-cpus, idle-us, stats-every-s, mtu, queue-size, socket-mode, socket-group,
    /// log-level, and [[port]] tables with socket, mac, iommu, endpoint).
    /// Options given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How frames are forwarded. Default: learn.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// CPUs of the polling threads, one thread each, pinned (e.g. 2,3 or
    /// 2-5). Ports' transmit queues are shared out round-robin. Default:
    /// one thread, not pinned.
    #[arg(long, value_name = "LIST")]
    pub pmd_cpus: Option<String>,
    /// Idle back-off: a polling thread that found nothing for 64 passes
    /// sleeps this many microseconds between passes (latency up to that
    /// much, a core mostly free). Default: 0, keep polling (a core per
    /// thread, as DPDK's).
    #[arg(long, value_name = "US")]
    pub idle_us: Option<u64>,
    /// Log what each polling thread did every this many seconds (frames/s,
    /// busy share, nanoseconds per frame while busy). Default: 0, never.
    #[arg(long, value_name = "SECS")]
    pub stats_every_s: Option<u64>,
    /// MTU offered to the guests; longer frames are dropped. Default: 1500.
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u16>,
    /// Largest queue a driver may set up (a power of two). Default: 1024.
    #[arg(long, value_name = "N")]
    pub queue_size: Option<u16>,
    /// Mode of the socket files, in octal (e.g. 0660). Default: the umask's.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Group of the socket files (a name or a number).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Print the backend's capabilities as JSON (QEMU's vhost-user.json) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Log filter (tracing's EnvFilter syntax, e.g. info or
    /// vhost_user_net=debug). Default: RUST_LOG, else info.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    mode: Option<Mode>,
    pmd_cpus: Option<String>,
    idle_us: Option<u64>,
    stats_every_s: Option<u64>,
    mtu: Option<u16>,
    queue_size: Option<u16>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    log_level: Option<String>,
    #[serde(default)]
    port: Vec<FilePort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePort {
    socket: PathBuf,
    mac: Option<String>,
    iommu: Option<String>,
    endpoint: Option<u32>,
}

/// One port's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSettings {
    /// The VMM's socket.
    pub socket: PathBuf,
    /// The guest NIC's address.
    pub mac: Mac,
    /// How its DMA is translated.
    pub iommu: IommuMode,
    /// Its endpoint behind the IOMMU.
    pub endpoint: u32,
}

/// Everything, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The ports, by index.
    pub ports: Vec<PortSettings>,
    /// Forwarding.
    pub mode: ForwardMode,
    /// One polling thread per entry (`None`: not pinned).
    pub pmd_cpus: Vec<Option<usize>>,
    /// Idle back-off.
    pub idle_sleep: Duration,
    /// How often the polling threads' counters are logged (zero: never).
    pub stats_every: Duration,
    /// MTU.
    pub mtu: u16,
    /// Largest queue.
    pub queue_size: u16,
    /// Socket file mode and group.
    pub socket_perms: vhost_user_process::socket_file::Permissions,
    /// Logging.
    pub log: LogSettings,
}

/// Why the settings are refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file cannot be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A bad value.
    #[error("{option} {value:?}: {why}")]
    Bad {
        /// The option or key.
        option: String,
        /// Its value.
        value: String,
        /// Why.
        why: String,
    },
    /// No port.
    #[error("no port: give --port socket=PATH,... (or [[port]] in --config)")]
    NoPort,
}

fn bad(option: &str, value: impl Into<String>, why: impl Into<String>) -> SettingsError {
    SettingsError::Bad {
        option: option.to_string(),
        value: value.into(),
        why: why.into(),
    }
}

/// The default address of port `index`: locally administered.
pub fn default_mac(index: usize) -> Mac {
    Mac([0x02, 0, 0, 0, ((index + 1) >> 8) as u8, (index + 1) as u8])
}

fn port_from_fields(
    index: usize,
    socket: Option<PathBuf>,
    mac: Option<&str>,
    iommu: Option<&str>,
    endpoint: Option<&str>,
    text: &str,
) -> Result<PortSettings, SettingsError> {
    let socket = socket.ok_or_else(|| bad("--port", text, "socket=PATH is required"))?;
    let mac = match mac {
        Some(m) => m
            .parse()
            .map_err(|e: crate::mac::MacError| bad("--port mac", m, e.to_string()))?,
        None => default_mac(index),
    };
    let iommu: IommuMode = match iommu {
        Some(m) => m
            .parse()
            .map_err(|e: viommu_backend::mode::ModeError| bad("--port iommu", m, e.to_string()))?,
        None => IommuMode::None,
    };
    let endpoint = match (endpoint, &iommu) {
        (Some(e), _) => vhost_user_process::number::parse_u32(e)
            .map_err(|err| bad("--port endpoint", e, err.to_string()))?,
        (None, IommuMode::None) => 0,
        (None, _) => {
            return Err(bad(
                "--port",
                text,
                "endpoint=ID is required with an iommu mode",
            ));
        }
    };
    Ok(PortSettings {
        socket,
        mac,
        iommu,
        endpoint,
    })
}

/// Parses one `--port` value.
pub fn parse_port(index: usize, text: &str) -> Result<PortSettings, SettingsError> {
    let (mut socket, mut mac, mut iommu, mut endpoint) = (None, None, None, None);
    for field in text.split(',') {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| bad("--port", text, format!("{field:?} is not key=value")))?;
        let slot = match key {
            "socket" => {
                if socket.replace(PathBuf::from(value)).is_some() {
                    return Err(bad("--port", text, "socket given twice"));
                }
                continue;
            }
            "mac" => &mut mac,
            "iommu" => &mut iommu,
            "endpoint" => &mut endpoint,
            _ => {
                return Err(bad(
                    "--port",
                    text,
                    format!("unknown key {key:?} (expected socket, mac, iommu, endpoint)"),
                ));
            }
        };
        if slot.replace(value).is_some() {
            return Err(bad("--port", text, format!("{key} given twice")));
        }
    }
    port_from_fields(index, socket, mac, iommu, endpoint, text)
}

/// Parses a CPU list: `2`, `2,3`, `2-5`, `0,4-6`.
pub fn parse_cpus(text: &str) -> Result<Vec<usize>, SettingsError> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad("--pmd-cpus", text, format!("{s:?} is not a CPU number")))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a >= 1024 {
                    return Err(bad("--pmd-cpus", text, format!("bad range {part:?}")));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    let mut seen = cpus.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != cpus.len() {
        return Err(bad("--pmd-cpus", text, "a CPU is listed twice"));
    }
    Ok(cpus)
}

impl Settings {
    /// Checks the command line (and the file it names).
    pub fn from_cli(cli: &Cli) -> Result<Settings, SettingsError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => File::default(),
        };
        let mut ports = Vec::new();
        for text in &cli.ports {
            ports.push(parse_port(ports.len(), text)?);
        }
        for p in &file.port {
            let endpoint = p.endpoint.map(|e| e.to_string());
            let text = format!("[[port]] socket = {:?}", p.socket);
            ports.push(port_from_fields(
                ports.len(),
                Some(p.socket.clone()),
                p.mac.as_deref(),
                p.iommu.as_deref(),
                endpoint.as_deref(),
                &text,
            )?);
        }
        if ports.is_empty() {
            return Err(SettingsError::NoPort);
        }
        if ports.len() > MAX_PORTS {
            return Err(bad(
                "--port",
                ports.len().to_string(),
                format!("at most {MAX_PORTS} ports"),
            ));
        }
        for (i, p) in ports.iter().enumerate() {
            if ports[..i].iter().any(|q| q.socket == p.socket) {
                return Err(bad(
                    "--port socket",
                    p.socket.display().to_string(),
                    "used by two ports",
                ));
            }
            if ports[..i].iter().any(|q| q.mac == p.mac) {
                return Err(bad("--port mac", p.mac.to_string(), "used by two ports"));
            }
            if p.mac.is_group() {
                return Err(bad(
                    "--port mac",
                    p.mac.to_string(),
                    "a group (multicast) address",
                ));
            }
        }
        let mode = match cli.mode.or(file.mode).unwrap_or(Mode::Learn) {
            Mode::Learn => ForwardMode::Learn,
            Mode::Io => ForwardMode::Io,
        };
        if mode == ForwardMode::Io && ports.len() % 2 != 0 {
            return Err(bad(
                "--mode",
                "io",
                "needs an even number of ports (2k is paired with 2k+1)",
            ));
        }
        let pmd_cpus = match cli.pmd_cpus.as_deref().or(file.pmd_cpus.as_deref()) {
            Some(list) => parse_cpus(list)?.into_iter().map(Some).collect(),
            None => vec![None],
        };
        let mtu = cli.mtu.or(file.mtu).unwrap_or(1500);
        if !(68..=9000).contains(&mtu) {
            return Err(bad("--mtu", mtu.to_string(), "must be 68..=9000"));
        }
        let queue_size = cli.queue_size.or(file.queue_size).unwrap_or(1024);
        if !queue_size.is_power_of_two() || !(64..=32768).contains(&queue_size) {
            return Err(bad(
                "--queue-size",
                queue_size.to_string(),
                "must be a power of two in 64..=32768",
            ));
        }
        let socket_perms = vhost_user_process::socket_file::Permissions::parse(
            cli.socket_mode.as_deref().or(file.socket_mode.as_deref()),
            cli.socket_group.as_deref().or(file.socket_group.as_deref()),
        )
        .map_err(|(which, reason)| bad(&format!("--socket-{which}"), "", reason))?;
        Ok(Settings {
            ports,
            mode,
            pmd_cpus,
            idle_sleep: Duration::from_micros(cli.idle_us.or(file.idle_us).unwrap_or(0)),
            stats_every: Duration::from_secs(cli.stats_every_s.or(file.stats_every_s).unwrap_or(0)),
            mtu,
            queue_size,
            socket_perms,
            log: LogSettings {
                filter: cli.log_level.clone().or(file.log_level),
                format: cli.log_format,
            },
        })
    }
}

fn read_file(path: &Path) -> Result<File, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("vhost-user-net").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        Settings::from_cli(&cli).map_err(|e| vhost_user_process::report_line(&e))
    }

    #[test]
    fn ports_and_defaults() {
        let s = parse(&[
            "--port",
            "socket=/tmp/a.sock",
            "--port",
            "socket=/tmp/b.sock,mac=52:54:00:00:00:02,iommu=table:/run/i.sock,endpoint=0x10",
        ])
        .unwrap();
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[0].mac, default_mac(0));
        assert_eq!(s.ports[0].iommu, IommuMode::None);
        assert_eq!(s.ports[1].endpoint, 16);
        assert_eq!(s.ports[1].iommu, IommuMode::Table("/run/i.sock".into()));
        assert_eq!(
            (s.mode, s.mtu, s.queue_size),
            (ForwardMode::Learn, 1500, 1024)
        );
        assert_eq!(s.pmd_cpus, vec![None]);
        assert!(s.idle_sleep.is_zero());
        let s = parse(&[
            "--port",
            "socket=/a",
            "--port",
            "socket=/b",
            "--mode",
            "io",
            "--pmd-cpus",
            "1,3-4",
            "--idle-us",
            "50",
        ])
        .unwrap();
        assert_eq!(s.pmd_cpus, vec![Some(1), Some(3), Some(4)]);
        assert_eq!(s.idle_sleep, Duration::from_micros(50));
        assert_eq!(s.mode, ForwardMode::Io);
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        for (args, want) in [
            (&["--mode", "learn"][..], "no port"),
            (
                &["--port", "mac=52:54:00:00:00:01"],
                "socket=PATH is required",
            ),
            (
                &["--port", "socket=/a,iommu=table:/i"],
                "endpoint=ID is required",
            ),
            (&["--port", "socket=/a,mac=52:54"], "--port mac"),
            (&["--port", "socket=/a,mac=01:00:5e:00:00:01"], "group"),
            (&["--port", "socket=/a,colour=red"], "unknown key"),
            (&["--port", "socket=/a,socket=/b"], "given twice"),
            (&["--port", "socket=/a,endpoint"], "not key=value"),
            (&["--port", "socket=/a,iommu=bogus"], "--port iommu"),
            (
                &["--port", "socket=/a", "--port", "socket=/a"],
                "used by two ports",
            ),
            (
                &[
                    "--port",
                    "socket=/a,mac=02:00:00:00:00:09",
                    "--port",
                    "socket=/b,mac=02:00:00:00:00:09",
                ],
                "used by two ports",
            ),
            (&["--port", "socket=/a", "--mode", "io"], "even number"),
            (&["--port", "socket=/a", "--pmd-cpus", "3-1"], "bad range"),
            (&["--port", "socket=/a", "--pmd-cpus", "1,1"], "twice"),
            (&["--port", "socket=/a", "--pmd-cpus", "x"], "not a CPU"),
            (&["--port", "socket=/a", "--mtu", "9001"], "--mtu"),
            (
                &["--port", "socket=/a", "--queue-size", "100"],
                "--queue-size",
            ),
            (
                &["--port", "socket=/a", "--config", "/nonexistent/net.toml"],
                "reading",
            ),
        ] {
            let e = parse(args).expect_err(&format!("{args:?}"));
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn the_file_holds_the_same_settings_and_the_command_line_wins() {
        let dir = std::env::temp_dir().join(format!("vun-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net.toml");
        std::fs::write(
            &path,
            "mode = \"io\"\npmd-cpus = \"2\"\nidle-us = 10\nstats-every-s = 5\nmtu = 9000\nqueue-size = 256\n\
             [[port]]\nsocket = \"/f/a\"\nmac = \"52:54:00:00:00:0a\"\n\
             [[port]]\nsocket = \"/f/b\"\niommu = \"iotlb-msg:/i\"\nendpoint = 8\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let s = parse(&["--config", p, "--mtu", "1400"]).unwrap();
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[1].iommu, IommuMode::IotlbMsg("/i".into()));
        assert_eq!((s.mode, s.mtu, s.queue_size), (ForwardMode::Io, 1400, 256));
        assert_eq!(s.pmd_cpus, vec![Some(2)]);
        assert_eq!(s.stats_every, Duration::from_secs(5));
        std::fs::write(&path, "colour = 1\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err();
        assert!(e.contains("colour"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
