//! `viommu-ctl`: asks a running `vhost-user-iommu` daemon over its admin
//! socket (`--admin-socket`) what it holds. Tables for people, `--json`
//! for scripts. The protocol: `docs/operations.md`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vhost_user_process::number;

use clap::{Parser, Subcommand};
use serde::de::DeserializeOwned;
use vhost_user_iommu::admin_proto::{
    AdminReply, AdminRequest, Backends, DomainRow, Dump, Endpoints, Faults, Mappings, Status,
};

/// Ask a running vhost-user-iommu daemon about its state.
#[derive(Parser, Debug)]
#[command(name = "viommu-ctl", version)]
struct Cli {
    /// The daemon's admin socket (its --admin-socket).
    #[arg(long, short = 's', env = "VIOMMU_ADMIN_SOCKET", value_name = "PATH")]
    admin_socket: PathBuf,
    /// Print the daemon's JSON reply instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The daemon at a glance.
    Status,
    /// Attached endpoints (paged).
    Endpoints {
        /// First endpoint ID.
        #[arg(long, default_value = "0", value_parser = number::parse_u32)]
        from: u32,
        /// Most rows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Live domains.
    Domains,
    /// A domain's mappings (paged: `--from` the `next` of the last page).
    Mappings {
        /// The domain.
        #[arg(long, value_parser = number::parse_u32)]
        domain: u32,
        /// List mappings that end at or after this IOVA.
        #[arg(long, default_value = "0", value_parser = number::parse_u64)]
        from: u64,
        /// Most rows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Backends holding the shared table.
    Backends,
    /// Fault counters and the latest fault records.
    Faults,
    /// Replace the daemon's log filter (e.g. `debug`, `info,vhost_user_iommu=trace`).
    LogLevel {
        /// The new filter.
        filter: String,
    },
    /// Everything, as JSON.
    Dump,
}

/// Why a command could not be carried out.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("cannot reach the daemon at {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("admin socket")]
    Io(#[from] std::io::Error),
    #[error("the daemon closed the connection without replying")]
    NoReply,
    #[error("unreadable reply")]
    Reply(#[from] serde_json::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
}

fn ask(socket: &PathBuf, request: &AdminRequest) -> Result<serde_json::Value, CtlError> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| CtlError::Connect(socket.display().to_string(), e))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reply = String::new();
    if BufReader::new(&stream).read_line(&mut reply)? == 0 {
        return Err(CtlError::NoReply);
    }
    let reply: AdminReply = serde_json::from_str(&reply)?;
    if !reply.ok {
        return Err(CtlError::Refused(reply.error.unwrap_or_default()));
    }
    Ok(reply.data.unwrap_or(serde_json::Value::Null))
}

fn decode<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, CtlError> {
    Ok(serde_json::from_value(v)?)
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_status(s: &Status) {
    let kv = |k: &str, v: String| println!("{k:<20} {v}");
    kv("version", s.version.clone());
    kv("pid", s.pid.to_string());
    kv("uptime", format!("{} s", s.uptime_secs));
    kv(
        "vmm",
        format!(
            "{} ({} connections served)",
            if s.vmm_connected {
                "connected"
            } else {
                "not connected"
            },
            s.vmm_connections
        ),
    );
    if let Some(d) = &s.device {
        kv("features", format!("{:#x}", d.features));
        kv(
            "endpoints",
            format!(
                "{} ({} attached, others {})",
                d.endpoints, d.attached, d.unattached
            ),
        );
        kv("domains", d.domains.to_string());
        kv("mappings", d.mappings.to_string());
    }
    match &s.table {
        Some(t) => {
            kv(
                "table",
                format!(
                    "{} KiB used, {} MiB free",
                    t.bytes_used / 1024,
                    t.bytes_free >> 20
                ),
            );
            kv("grace periods", t.grace_periods.to_string());
            kv(
                "backends",
                format!(
                    "{} connected, {} registered, {} stalls, {} kills",
                    s.backends_connected, t.readers, t.stalls, t.kills
                ),
            );
        }
        None => kv("table", "off (no --backend-socket)".into()),
    }
    let r = &s.requests;
    kv(
        "requests",
        format!(
            "{} answered, {} failed, {} unparsed, {} malformed",
            r.answered, r.failed, r.unparsed, r.malformed
        ),
    );
    let f = &s.faults;
    kv(
        "faults",
        format!(
            "{} reported, {} delivered, {} dropped",
            f.reported,
            f.delivered,
            f.dropped_full + f.dropped_buffer
        ),
    );
    kv("lost kicks", s.lost_kicks.to_string());
    kv(
        "log filter",
        s.log_filter.clone().unwrap_or_else(|| "-".into()),
    );
}

fn show(command: &Command, data: serde_json::Value) -> Result<(), CtlError> {
    match command {
        Command::Status => print_status(&decode(data)?),
        Command::Endpoints { .. } => {
            let e: Endpoints = decode(data)?;
            println!("{} endpoints; unattached ones: {}", e.total, e.unattached);
            let rows: Vec<Vec<String>> = e
                .attached
                .iter()
                .map(|r| vec![format!("{:#x}", r.endpoint), r.domain.to_string()])
                .collect();
            table(&["ENDPOINT", "DOMAIN"], &rows);
            if let Some(n) = e.next {
                println!("more: --from {n:#x}");
            }
        }
        Command::Domains => {
            let d: Vec<DomainRow> = decode(data)?;
            let rows: Vec<Vec<String>> = d
                .iter()
                .map(|r| {
                    vec![
                        r.domain.to_string(),
                        if r.bypass { "bypass" } else { "translated" }.into(),
                        r.endpoints.to_string(),
                        r.mappings.to_string(),
                    ]
                })
                .collect();
            table(&["DOMAIN", "KIND", "ENDPOINTS", "MAPPINGS"], &rows);
        }
        Command::Mappings { .. } => {
            let m: Mappings = decode(data)?;
            let rows: Vec<Vec<String>> = m
                .mappings
                .iter()
                .map(|r| {
                    vec![
                        format!("{:#x}-{:#x}", r.iova_start, r.iova_end),
                        format!("{:#x}", r.gpa),
                        r.flags.clone(),
                    ]
                })
                .collect();
            table(&["IOVA", "GPA", "FLAGS"], &rows);
            if let Some(n) = m.next {
                println!("more: --from {n:#x}");
            }
        }
        Command::Backends => {
            let b: Backends = decode(data)?;
            let rows: Vec<Vec<String>> = b
                .backends
                .iter()
                .map(|r| {
                    vec![
                        r.reader.to_string(),
                        r.pid.to_string(),
                        r.uid.to_string(),
                        format!("{}/{}", r.slots_in_use, r.slots),
                        format!("{}/{}", r.pins_in_use, r.pins),
                        if r.connected { "yes" } else { "no" }.into(),
                        r.state.clone(),
                        r.kill.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "READER",
                    "PID",
                    "UID",
                    "SLOTS",
                    "PINS",
                    "CONNECTED",
                    "STATE",
                    "KILL",
                ],
                &rows,
            );
            println!("stalls (all backends): {}", b.stalls);
        }
        Command::Faults => {
            let f: Faults = decode(data)?;
            println!(
                "{} reported, {} delivered, {} dropped (queue full), {} dropped (bad buffer)",
                f.totals.reported,
                f.totals.delivered,
                f.totals.dropped_full,
                f.totals.dropped_buffer
            );
            let rows: Vec<Vec<String>> = f
                .recent
                .iter()
                .map(|r| {
                    vec![
                        r.unix_time.to_string(),
                        format!("{:#x}", r.endpoint),
                        r.reason.clone(),
                        r.access.clone(),
                        r.address.map_or("-".into(), |a| format!("{a:#x}")),
                    ]
                })
                .collect();
            table(&["TIME", "ENDPOINT", "REASON", "ACCESS", "ADDRESS"], &rows);
        }
        Command::LogLevel { filter } => println!("log filter now {filter:?}"),
        Command::Dump => {
            let d: Dump = decode(data)?;
            println!("{}", serde_json::to_string_pretty(&d)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match &cli.command {
        Command::Status => AdminRequest::Status,
        Command::Endpoints { from, limit } => AdminRequest::Endpoints {
            from: *from,
            limit: *limit,
        },
        Command::Domains => AdminRequest::Domains,
        Command::Mappings {
            domain,
            from,
            limit,
        } => AdminRequest::Mappings {
            domain: *domain,
            from: *from,
            limit: *limit,
        },
        Command::Backends => AdminRequest::Backends,
        Command::Faults => AdminRequest::Faults,
        Command::LogLevel { filter } => AdminRequest::LogLevel {
            filter: filter.clone(),
        },
        Command::Dump => AdminRequest::Dump,
    };
    let result = ask(&cli.admin_socket, &request).and_then(|data| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&data)?);
            Ok(())
        } else {
            show(&cli.command, data)
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("viommu-ctl: {}", vhost_user_process::report(&e));
            ExitCode::FAILURE
        }
    }
}
