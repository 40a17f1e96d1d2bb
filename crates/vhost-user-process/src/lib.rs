//! Process plumbing shared by the project's vhost-user binaries (the
//! IOMMU daemon and the backends): where to listen for the VMM, logging to
//! standard error through `tracing`, systemd socket activation, a prompt and clean exit on
//! SIGTERM/SIGINT, a vring whose kick read survives an empty eventfd
//! ([`vring`]), and the workspace's one number parser ([`number`]) and
//! one error-chain printer ([`report`], [`report_line`]).

pub mod activation;
pub mod listen;
pub mod logging;
pub mod number;
pub mod signals;
pub mod socket_file;
pub mod vring;

/// An error and its causes, one per line, for logs and standard error.
pub fn report(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(&format!("\n  caused by: {c}"));
        cause = c.source();
    }
    text
}

/// An error and its causes on one line (`error: cause: cause`), for a log
/// field.
pub fn report_line(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
