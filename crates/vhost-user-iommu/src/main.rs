//! `vhost-user-iommu`: a virtio-iommu device as a vhost-user backend.

use std::process::ExitCode;
use tracing::{error, info};
use vhost_user_iommu::settings::{Cli, Settings, SettingsError};
use vhost_user_iommu::{logging, serve, signals};

use vhost_user_process::report;

fn capabilities() -> String {
    serde_json::json!({ "type": "iommu" }).to_string()
}

fn main() -> ExitCode {
    let mut cli = match Cli::load(std::env::args_os()) {
        Ok(cli) => cli,
        // Usage errors, --help and --version, as clap prints them.
        Err(SettingsError::CommandLine(e)) => e.exit(),
        Err(e) => {
            eprintln!("vhost-user-iommu: {}", report(&e));
            return ExitCode::from(2);
        }
    };
    // SAFETY: the process has one thread until logging and signals start.
    let activation = unsafe { vhost_user_process::activation::Activation::take_from_env() };
    // A socket unit's socket serves when the command line names none (and
    // wins over a socket_path in the settings file).
    if !cli.names_a_socket() {
        cli.fd = activation.vmm_socket();
    }
    if cli.print_capabilities {
        println!("{}", capabilities());
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::from_cli(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vhost-user-iommu: {}", report(&e));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init(&settings.log) {
        eprintln!("vhost-user-iommu: {}", report(&e));
        return ExitCode::from(2);
    }
    let Some(listen) = settings.listen.clone() else {
        error!("no socket to listen on");
        return ExitCode::from(2);
    };
    if let Err(e) = signals::exit_on_termination() {
        error!(error = %e, "cannot set up signal handling");
        return ExitCode::FAILURE;
    }
    let d = &settings.device;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        endpoints = d.endpoints.iter().map(|r| r.len()).sum::<u64>(),
        page_size_mask = format_args!("{:#x}", d.page_size_mask),
        probe_size = d.probe_size.unwrap_or(0),
        bypass = d.initial_bypass,
        queue_size = settings.queue_size,
        poll_us = settings.poll.as_micros() as u64,
        "starting"
    );
    // SAFETY: systemd passed these descriptors to this process, and
    // nothing else has taken them (the VMM socket is named otherwise).
    let stored = unsafe { vhost_user_iommu::fd_store::take_passed(&activation.fds) };
    let carried = vhost_user_iommu::fd_store::carried_backends(stored);
    let result = serve::run_carrying(&settings, &listen, carried);
    vhost_user_process::socket_file::remove_owned();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", report(&e));
            ExitCode::FAILURE
        }
    }
}
