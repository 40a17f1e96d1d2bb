//! The command line (QEMU's vhost-user backend conventions), validated.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
pub use vhost_user_process::listen::Listen;
use vhost_user_process::logging::{LogFormat, LogSettings};
use viommu_backend::IommuMode;

use crate::target::{TargetOptions, TargetSpec};

/// Most queues (one thread each).
pub const MAX_QUEUES: u16 = 64;

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// vhost-user-blk: a virtio-blk device as a vhost-user backend whose DMA
/// can go through the guest's virtio-iommu (the vhost-user-iommu daemon's
/// shared table).
#[derive(Debug, Parser)]
#[command(name = "vhost-user-blk", version, about)]
pub struct Cli {
    /// Listen for the VMM on this Unix socket path. A stale socket there is
    /// replaced; a live one, or anything that is not a socket, is refused.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Serve an already listening Unix socket inherited as this descriptor.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Mode of the --socket-path file, in octal (e.g. 0660). Default: what
    /// the umask gives.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Group of the --socket-path file (a name or a number), so that a VMM
    /// running as another user of that group can connect.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Print the backend's capabilities as JSON (QEMU's vhost-user.json) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// The disk: a raw image file or block device, or null:SIZE (no storage:
    /// every request completes at once; SIZE in bytes or with K, M, G, T).
    #[arg(long, value_name = "PATH|null:SIZE")]
    pub blk_file: Option<String>,
    /// Refuse writes (offers VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub read_only: bool,
    /// Queues, one thread each. Default: 1.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,
    /// Entries per queue (a power of two up to 32768). Default: 256.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// The device's serial (GET_ID, at most 20 bytes). Default: vhost-user-blk.
    #[arg(long, value_name = "STR", default_value = "vhost-user-blk")]
    pub serial: String,
    /// Also open the disk with O_DIRECT and use it for requests whose
    /// buffers are aligned to the logical block size.
    #[arg(long)]
    pub direct: bool,
    /// Write cache at start: on (writes may be volatile until FLUSH) or off
    /// (every write is durable when it completes). The driver may change it
    /// (CONFIG_WCE). Default: on.
    #[arg(long, value_enum, default_value = "on")]
    pub writeback: Switch,
    /// How descriptor addresses are translated: none (guest-physical),
    /// table:SOCKET (IOVAs through the vhost-user-iommu daemon's shared
    /// table at its backend socket), iotlb-msg:SOCKET (IOVAs through a
    /// private IOTLB filled by messages: the baseline). Default: none.
    #[arg(long, value_name = "MODE", default_value = "none")]
    pub iommu: IommuMode,
    /// The device's endpoint ID behind the IOMMU (its PCI requester ID in
    /// the guest, e.g. 0x8 for 00:01.0). Required with an IOMMU mode.
    #[arg(long, value_name = "ID", value_parser = vhost_user_process::number::parse_u32)]
    pub endpoint: Option<u32>,
    /// Keep polling the rings (new requests, I/O completions) this many µs
    /// after the queue last did something, before sleeping; the loop
    /// yields the CPU between polls. Default: 0.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub poll_us: u64,
    /// Pin records asked of the IOMMU daemon (table mode): how many guest
    /// ranges in-flight I/O may hold at once. A request that finds none
    /// free waits for a completion. Default: 8 per queue entry (2048 for
    /// one queue of 256), at least 64, at most 65536; 0: the daemon's default.
    #[arg(long, value_name = "N")]
    pub pin_records: Option<u32>,
    /// Log filter (e.g. info, debug, vhost_user_blk=debug). Default: RUST_LOG, else info.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A required option is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// The socket file's mode or group is not usable.
    #[error("{option}: {reason}")]
    SocketAccess {
        /// The option.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// An option's value is out of range.
    #[error("{option} {value}: {why}")]
    Bad {
        /// The option.
        option: &'static str,
        /// Its value.
        value: String,
        /// Why.
        why: &'static str,
    },
    /// The disk option does not parse.
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
}

/// Everything the backend needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the VMM connects.
    pub listen: Listen,
    /// Mode and group of the socket file.
    pub socket_perms: vhost_user_process::socket_file::Permissions,
    /// The disk.
    pub target: TargetOptions,
    /// Queues.
    pub queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// GET_ID answer.
    pub serial: String,
    /// Translation mode.
    pub iommu: IommuMode,
    /// Endpoint ID (0 without an IOMMU).
    pub endpoint: u32,
    /// Busy-poll window.
    pub poll: Duration,
    /// Pin records for in-flight I/O (table mode).
    pub pin_records: u32,
    /// Logging.
    pub log: LogSettings,
}

impl Settings {
    /// Validates the command line.
    pub fn from_cli(cli: &Cli) -> Result<Settings, SettingsError> {
        let listen = match (&cli.socket_path, cli.fd) {
            (Some(p), None) => Listen::Path(p.clone()),
            (None, Some(fd)) => Listen::Fd(fd),
            _ => return Err(SettingsError::Missing("--socket-path or --fd")),
        };
        let spec: TargetSpec = cli
            .blk_file
            .as_deref()
            .ok_or(SettingsError::Missing("--blk-file"))?
            .parse()?;
        let bad = |option, value: String, why| SettingsError::Bad { option, value, why };
        if cli.num_queues == 0 || cli.num_queues > MAX_QUEUES {
            return Err(bad(
                "--num-queues",
                cli.num_queues.to_string(),
                "must be 1..=64",
            ));
        }
        if !cli.queue_size.is_power_of_two() || cli.queue_size < 4 || cli.queue_size > 32768 {
            return Err(bad(
                "--queue-size",
                cli.queue_size.to_string(),
                "must be a power of two in 4..=32768",
            ));
        }
        if cli.serial.len() > 20 {
            return Err(bad(
                "--serial",
                cli.serial.clone(),
                "must be at most 20 bytes",
            ));
        }
        let endpoint = match (&cli.iommu, cli.endpoint) {
            (IommuMode::None, _) => cli.endpoint.unwrap_or(0),
            (_, Some(e)) => e,
            (_, None) => return Err(SettingsError::Missing("--endpoint (with an --iommu mode)")),
        };
        let socket_perms = vhost_user_process::socket_file::Permissions::parse(
            cli.socket_mode.as_deref(),
            cli.socket_group.as_deref(),
        )
        .map_err(|(which, reason)| SettingsError::SocketAccess {
            option: if which == "mode" {
                "--socket-mode"
            } else {
                "--socket-group"
            },
            reason,
        })?;
        Ok(Settings {
            listen,
            socket_perms,
            target: TargetOptions {
                spec,
                read_only: cli.read_only,
                direct: cli.direct,
                writeback: cli.writeback == Switch::On,
            },
            queues: cli.num_queues,
            queue_size: cli.queue_size,
            serial: cli.serial.clone(),
            iommu: cli.iommu.clone(),
            endpoint,
            poll: Duration::from_micros(cli.poll_us),
            pin_records: cli.pin_records.unwrap_or_else(|| {
                (u32::from(cli.num_queues) * u32::from(cli.queue_size) * 8).clamp(64, 65536)
            }),
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

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("vhost-user-blk").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        Settings::from_cli(&cli).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_every_option_map_onto_settings() {
        let s = parse(&["--socket-path", "/tmp/b.sock", "--blk-file", "null:1G"]).unwrap();
        assert_eq!(s.listen, Listen::Path("/tmp/b.sock".into()));
        assert_eq!((s.queues, s.queue_size, s.endpoint), (1, 256, 0));
        assert_eq!(s.iommu, IommuMode::None);
        assert!(s.target.writeback && !s.target.read_only && !s.target.direct);
        let s = parse(&[
            "--fd",
            "3",
            "--blk-file",
            "/img",
            "--read-only",
            "--num-queues",
            "4",
            "--queue-size",
            "1024",
            "--serial",
            "abc",
            "--direct",
            "--writeback",
            "off",
            "--iommu",
            "table:/run/viommu-b.sock",
            "--endpoint",
            "0x8",
            "--poll-us",
            "20",
        ])
        .unwrap();
        assert_eq!(s.listen, Listen::Fd(3));
        assert_eq!((s.queues, s.queue_size, s.endpoint), (4, 1024, 8));
        assert!(s.target.read_only && s.target.direct && !s.target.writeback);
        assert_eq!(s.iommu, IommuMode::Table("/run/viommu-b.sock".into()));
        assert_eq!(s.poll, Duration::from_micros(20));
    }

    #[test]
    fn bad_settings_are_refused_with_the_option_named() {
        for (args, needle) in [
            (vec!["--blk-file", "null:1G"], "--socket-path"),
            (vec!["--socket-path", "/s"], "--blk-file"),
            (
                vec![
                    "--socket-path",
                    "/s",
                    "--blk-file",
                    "null:1G",
                    "--num-queues",
                    "0",
                ],
                "--num-queues",
            ),
            (
                vec![
                    "--socket-path",
                    "/s",
                    "--blk-file",
                    "null:1G",
                    "--queue-size",
                    "100",
                ],
                "--queue-size",
            ),
            (
                vec![
                    "--socket-path",
                    "/s",
                    "--blk-file",
                    "null:1G",
                    "--iommu",
                    "table:/x",
                ],
                "--endpoint",
            ),
            (
                vec![
                    "--socket-path",
                    "/s",
                    "--blk-file",
                    "null:1G",
                    "--iommu",
                    "bogus",
                ],
                "--iommu",
            ),
            (vec!["--socket-path", "/s", "--blk-file", "null:5"], "512"),
            (
                vec![
                    "--socket-path",
                    "/s",
                    "--blk-file",
                    "null:1G",
                    "--serial",
                    "012345678901234567890",
                ],
                "--serial",
            ),
        ] {
            let e = parse(&args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
