//! `vhost-user-blk`: a virtio-blk device as a vhost-user backend whose DMA
//! can go through the guest's virtio-iommu.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64};

use clap::Parser;
use tracing::{error, info};
use vhost_user_blk::backend::BlkBackend;
use vhost_user_blk::engine::Shared;
use vhost_user_blk::settings::{Cli, Settings};
use vhost_user_blk::target::Target;
use vhost_user_blk::{id_bytes, serve};
use vhost_user_process::{logging, report, signals};
use viommu_backend::{Dma, DmaOptions};

/// What `--print-capabilities` prints (QEMU's `vhost-user.json`).
fn capabilities() -> String {
    serde_json::json!({ "type": "block", "features": ["read-only", "blk-file"] }).to_string()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_capabilities {
        println!("{}", capabilities());
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::from_cli(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vhost-user-blk: {}", report(&e));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init(&settings.log) {
        eprintln!("vhost-user-blk: {}", report(&e));
        return ExitCode::from(2);
    }
    if let Err(e) = signals::exit_on_termination() {
        error!(error = %e, "cannot set up signal handling");
        return ExitCode::FAILURE;
    }
    let result = run(&settings);
    vhost_user_process::socket_file::remove_owned();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(settings: &Settings) -> Result<(), Box<dyn std::error::Error>> {
    let target = Target::open(&settings.target)?;
    let disk = target.disk;
    let dma = Dma::connect(&DmaOptions {
        mode: settings.iommu.clone(),
        endpoint: settings.endpoint,
        slots: u32::from(settings.queues) + 1,
        pins: settings.pin_records,
    })?;
    let shared = Arc::new(Shared {
        target,
        negotiated: AtomicU64::new(0),
        writeback: AtomicU8::new(u8::from(disk.writeback)),
        id: id_bytes(&settings.serial),
        poll: settings.poll,
    });
    let seg_max = u32::from(settings.queue_size).saturating_sub(2).max(1);
    let backend = BlkBackend::new(
        shared,
        dma,
        settings.queues,
        settings.queue_size,
        seg_max,
        4 << 20,
    )?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        disk = ?settings.target.spec,
        sectors = disk.capacity_sectors,
        read_only = disk.read_only,
        queues = settings.queues,
        queue_size = settings.queue_size,
        iommu = %settings.iommu,
        endpoint = settings.endpoint,
        "starting"
    );
    serve::run(&backend, &settings.listen, settings.socket_perms)?;
    Ok(())
}
