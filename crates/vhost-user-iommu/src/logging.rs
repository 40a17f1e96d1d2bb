//! Logging through `tracing`; records of the rust-vmm crates (`log`) flow
//! into it.

use crate::settings::{LogFormat, LogSettings};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The filter directive does not parse.
    #[error("invalid log filter {0:?}")]
    Filter(String, #[source] tracing_subscriber::filter::ParseError),
    /// A global subscriber was already installed.
    #[error("logging already initialised")]
    Init(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Installs the global subscriber: `--log-level`, else `RUST_LOG`, else
/// `info`; lines go to standard error.
pub fn init(settings: &LogSettings) -> Result<(), LoggingError> {
    let directive = settings
        .filter
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let filter =
        EnvFilter::try_new(&directive).map_err(|e| LoggingError::Filter(directive.clone(), e))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(LoggingError::Init)
}
