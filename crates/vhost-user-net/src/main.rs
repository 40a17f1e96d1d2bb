//! `vhost-user-net`: the switch's binary.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Parser;
use tracing::{error, info};
use vhost_user_net::backend::PortBackend;
use vhost_user_net::config::NetConfig;
use vhost_user_net::fib::Fib;
use vhost_user_net::pmd::{self, PmdOptions, PmdStats, Switch};
use vhost_user_net::port::Port;
use vhost_user_net::serve;
use vhost_user_net::settings::{Cli, Settings};
use vhost_user_process::listen::Listen;
use vhost_user_process::{logging, report, signals};
use viommu_backend::{Dma, DmaOptions};

/// What `--print-capabilities` prints (QEMU's `vhost-user.json`).
fn capabilities() -> String {
    serde_json::json!({ "type": "net" }).to_string()
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
            eprintln!("vhost-user-net: {}", report(&e));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init(&settings.log) {
        eprintln!("vhost-user-net: {}", report(&e));
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
    let mut ports = Vec::new();
    let mut listeners = Vec::new();
    for (id, p) in settings.ports.iter().enumerate() {
        let dma = Dma::connect(&DmaOptions {
            mode: p.iommu.clone(),
            endpoint: p.endpoint,
            // The three queues, and one spare.
            slots: 4,
            // Frames are copied inside their session: nothing is pinned.
            pins: 1,
        })?;
        let name = p.socket.display().to_string();
        let config = NetConfig {
            mac: p.mac,
            mtu: settings.mtu,
        };
        ports.push(Arc::new(Port::new(id, name, config, dma)?));
        listeners.push(Listen::Path(p.socket.clone()).listener(settings.socket_perms)?);
        info!(
            port = id,
            socket = %p.socket.display(),
            mac = %p.mac,
            iommu = %p.iommu,
            endpoint = p.endpoint,
            "port ready"
        );
    }
    let macs: Vec<_> = settings.ports.iter().map(|p| p.mac).collect();
    let switch = Arc::new(Switch {
        ports,
        fib: Fib::new(&macs),
        mode: settings.mode,
        max_frame: usize::from(settings.mtu) + 14 + 4,
    });
    info!(
        version = env!("CARGO_PKG_VERSION"),
        ports = switch.ports.len(),
        mode = ?settings.mode,
        pmd_threads = settings.pmd_cpus.len(),
        idle_us = settings.idle_sleep.as_micros() as u64,
        mtu = settings.mtu,
        "starting"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let threads = settings.pmd_cpus.len();
    let mut stats = Vec::new();
    for (index, cpu) in settings.pmd_cpus.iter().enumerate() {
        let options = PmdOptions {
            index,
            cpu: *cpu,
            ports: (0..switch.ports.len())
                .filter(|p| p % threads == index)
                .collect(),
            idle_sleep: settings.idle_sleep,
            stats: Arc::new(PmdStats::default()),
        };
        stats.push(Arc::clone(&options.stats));
        pmd::spawn(Arc::clone(&switch), options, Arc::clone(&stop))?;
    }
    if !settings.stats_every.is_zero() {
        let every = settings.stats_every;
        std::thread::Builder::new()
            .name("pmd-stats".into())
            .spawn(move || pmd::log_stats(stats, every))?;
    }
    let mut servers = Vec::new();
    for (port, listener) in switch.ports.iter().zip(listeners) {
        let backend = PortBackend::new(Arc::clone(port), settings.queue_size);
        let switch = Arc::clone(&switch);
        servers.push(
            std::thread::Builder::new()
                .name(format!("port-{}", port.id))
                .spawn(move || serve::run(&switch, &backend, listener))?,
        );
    }
    for s in servers {
        match s.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Box::new(e)),
            Err(_) => return Err("a port's thread panicked".into()),
        }
    }
    Ok(())
}
