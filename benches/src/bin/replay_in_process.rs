//! `replay-in-process`: a BASELINE for `viommu-frontend replay`. The same
//! trace, encoded as the bytes the driver would place in the request
//! queue, handed straight to `viommu_core::Device::process` in batches,
//! changes mirrored into `RwLock<BTreeMap>`s; no virtqueue, no daemon
//! (see `viommu_benches::in_process`). Prints the replay's figures in the
//! frontend's format; exit status 1 if any request was not OK.
//!
//! Usage: `replay-in-process (--trace FILE | --map-unmap N) [--batch N]
//! [--sink btree|table|none]` (default batch 1; `--map-unmap` is the
//! frontend's MAP/UNMAP-only stream). The sink is where the model's changes
//! go: `btree` (default) `RwLock<BTreeMap>`s as cloud-hypervisor keeps
//! them; `table` the daemon's own shared table (its publisher, one lock per
//! batch, a grace period after each batch that took access away, no
//! reader); `none` nowhere (the model alone).

use std::path::PathBuf;
use std::process::ExitCode;
use vhost_user_iommu::publish::{Publish, Publishing, TablePublisher};
use vhost_user_iommu::shm_table::{ShmPublisher, create};
use viommu_benches::in_process::{
    LockedTables, encode, linux_device, replay, replay_batches, serve_chunk,
};

/// Where the requests come from.
enum Source {
    Trace(PathBuf),
    MapUnmap(usize),
}

/// Where the model's changes go.
#[derive(Clone, Copy)]
enum Sink {
    Btree,
    Table,
    None,
}

fn run(source: Source, batch: usize, sink: Sink) -> Result<bool, Box<dyn std::error::Error>> {
    let requests = match source {
        Source::Trace(path) => viommu_frontend::trace::load(&path)?,
        Source::MapUnmap(pairs) => viommu_frontend::replay::map_unmap_stream(8, pairs, 32),
    };
    let mut dev = linux_device()?;
    let mut posted = encode(&requests, dev.config_space().probe_size);
    let report = match sink {
        Sink::Btree => {
            let tables = LockedTables::default();
            replay(&mut dev, &mut posted, batch, &tables)
        }
        Sink::None => replay_batches(&mut dev, &mut posted, batch, &mut |dev, chunk| {
            serve_chunk(dev, chunk, &mut viommu_core::NullSink)
        }),
        Sink::Table => {
            let settings = vhost_user_iommu::settings::TableSettings {
                socket: PathBuf::new(),
                allowed_uids: Vec::new(),
                max_mib: 1024,
                stall_warn: std::time::Duration::from_millis(100),
                stall_kill: None,
            };
            let writer = create(&viommu_core::DeviceConfig::default(), &settings, false)?;
            let mut publisher =
                ShmPublisher::new(std::sync::Arc::new(std::sync::Mutex::new(writer)), None);
            publisher.start(&dev);
            replay_batches(&mut dev, &mut posted, batch, &mut |dev, chunk| {
                let mut used = Vec::new();
                publisher.batch(&mut |table| {
                    used = serve_chunk(dev, chunk, &mut Publishing::new(table));
                });
                if publisher.needs_grace() {
                    publisher.synchronize().wait();
                }
                used
            })
        }
    };
    println!("{report}");
    Ok(report.non_ok == 0)
}

fn main() -> ExitCode {
    let mut trace = None;
    let mut batch = 1usize;
    let mut sink = Sink::Btree;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--trace", Some(v)) => trace = Some(Source::Trace(PathBuf::from(v))),
            ("--map-unmap", Some(v)) => {
                trace = v.parse().ok().map(Source::MapUnmap);
            }
            ("--sink", Some(v)) => match v.as_str() {
                "btree" => sink = Sink::Btree,
                "table" => sink = Sink::Table,
                "none" => sink = Sink::None,
                _ => trace = None,
            },
            ("--batch", Some(v)) => match v.parse() {
                Ok(n) if n > 0 => batch = n,
                _ => trace = None,
            },
            _ => trace = None,
        }
        if trace.is_none() {
            break;
        }
    }
    let Some(trace) = trace else {
        eprintln!(
            "usage: replay-in-process (--trace FILE | --map-unmap N) [--batch N] [--sink btree|table|none]"
        );
        return ExitCode::from(2);
    };
    match run(trace, batch, sink) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("replay-in-process: {e}");
            ExitCode::from(2)
        }
    }
}
