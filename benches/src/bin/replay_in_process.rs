//! `replay-in-process`: a BASELINE for `viommu-frontend replay`. The same
//! trace, encoded as the bytes the driver would place in the request
//! queue, handed straight to `viommu_core::Device::process` in batches,
//! changes mirrored into `RwLock<BTreeMap>`s; no virtqueue, no daemon
//! (see `viommu_benches::in_process`). Prints the replay's figures in the
//! frontend's format; exit status 1 if any request was not OK.
//!
//! Usage: `replay-in-process (--trace FILE | --map-unmap N) [--batch N]`
//! (default batch 1; `--map-unmap` is the frontend's MAP/UNMAP-only stream)

use std::path::PathBuf;
use std::process::ExitCode;
use viommu_benches::in_process::{LockedTables, encode, linux_device, replay};

/// Where the requests come from.
enum Source {
    Trace(PathBuf),
    MapUnmap(usize),
}

fn run(source: Source, batch: usize) -> Result<bool, Box<dyn std::error::Error>> {
    let requests = match source {
        Source::Trace(path) => viommu_frontend::trace::load(&path)?,
        Source::MapUnmap(pairs) => viommu_frontend::replay::map_unmap_stream(8, pairs, 32),
    };
    let mut dev = linux_device()?;
    let mut posted = encode(&requests, dev.config_space().probe_size);
    let tables = LockedTables::default();
    let report = replay(&mut dev, &mut posted, batch, &tables);
    println!("{report}");
    Ok(report.non_ok == 0)
}

fn main() -> ExitCode {
    let mut trace = None;
    let mut batch = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--trace", Some(v)) => trace = Some(Source::Trace(PathBuf::from(v))),
            ("--map-unmap", Some(v)) => {
                trace = v.parse().ok().map(Source::MapUnmap);
            }
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
        eprintln!("usage: replay-in-process (--trace FILE | --map-unmap N) [--batch N]");
        return ExitCode::from(2);
    };
    match run(trace, batch) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("replay-in-process: {e}");
            ExitCode::from(2)
        }
    }
}
