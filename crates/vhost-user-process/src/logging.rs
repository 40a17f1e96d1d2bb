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
    /// The filter cannot be changed: logging was not started by [`init`],
    /// or its subscriber is gone.
    #[error("the log filter cannot be changed: {0}")]
    Reload(String),
}

/// Swaps the installed subscriber's filter.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The running subscriber's filter: how to change it, and its directive.
static FILTER: std::sync::OnceLock<(Reload, std::sync::Mutex<String>)> = std::sync::OnceLock::new();

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
    // The filter can be swapped at run time (`set_filter`); the handle's
    // type depends on the format, so it is kept as a closure.
    let (reload, result): (Reload, _) = match settings.format {
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let h = b.reload_handle();
            (
                Box::new(move |f| h.reload(f).map_err(|e| e.to_string())),
                b.try_init(),
            )
        }
        LogFormat::Json => {
            let b = builder.json().with_filter_reloading();
            let h = b.reload_handle();
            (
                Box::new(move |f| h.reload(f).map_err(|e| e.to_string())),
                b.try_init(),
            )
        }
    };
    result.map_err(LoggingError::Init)?;
    let _ = FILTER.set((reload, std::sync::Mutex::new(directive)));
    Ok(())
}

/// Replaces the log filter of the subscriber [`init`] installed, while the
/// process runs. A directive that does not parse changes nothing.
pub fn set_filter(directive: &str) -> Result<(), LoggingError> {
    let filter = EnvFilter::try_new(directive)
        .map_err(|e| LoggingError::Filter(directive.to_string(), e))?;
    let Some((reload, current)) = FILTER.get() else {
        return Err(LoggingError::Reload("logging was not initialised".into()));
    };
    reload(filter).map_err(LoggingError::Reload)?;
    *current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = directive.to_string();
    Ok(())
}

/// The filter directive in force, if [`init`] installed the subscriber.
pub fn current_filter() -> Option<String> {
    let (_, current) = FILTER.get()?;
    Some(
        current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
    )
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
