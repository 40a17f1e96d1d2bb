//! Logging through `tracing`; records of the rust-vmm crates (`log`) flow
//! into it.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Log output format (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging choices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogSettings {
    /// Filter directive, if given (else `RUST_LOG`, else `info`).
    pub filter: Option<String>,
    /// Line format.
    pub format: LogFormat,
}

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
    // A log line that cannot be written (stderr a pipe whose reader is
    // gone, a full disk) is dropped: logging never fails or panics the
    // process. tracing-subscriber would otherwise report the failure with
    // `eprintln!`, which panics on that same broken stderr.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| LossyStderr)
        .log_internal_errors(false);
    match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(LoggingError::Init)
}

/// Standard error, where a failed write counts as written (the line is
/// lost, the process goes on).
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
