//! The settings file: its keys are the options' names (with `_` for `-`),
//! and each value becomes its option's default before the command line is
//! parsed, so that the command line wins and no option is listed twice.

use super::{COMMAND_LINE_ONLY, Cli, SettingsError};
use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

/// Keys accepted under their name from before 0.1.1, and the option each
/// stands for.
const OLD_NAMES: [(&str, &str); 2] = [
    ("reserved_regions", "reserved-region"),
    ("backend_uids", "backend-uid"),
];

/// Repeatable options whose file values are added to the command line's
/// rather than replaced by them.
const ADDED_TO_THE_COMMAND_LINE: [&str; 1] = ["backend-uid"];

/// `[[endpoint]]`: a range of endpoints with its own reserved regions.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRangeText {
    /// Endpoint IDs, as `--endpoints` takes them.
    pub ids: String,
    /// Their reserved regions, as `--reserved-region` takes them.
    #[serde(default, alias = "reserved_regions")]
    pub reserved_region: Vec<String>,
}

/// Parses the command line `args` (the program's name first) over the
/// settings file `text`, read from `path` (named in errors).
pub(super) fn with_file(
    mut args: Vec<OsString>,
    path: &Path,
    text: &str,
) -> Result<Cli, SettingsError> {
    let parse_error = |source| SettingsError::ParseFile {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
    let value_error = |key: &str, reason: String| SettingsError::FileValue {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let mut command = Cli::command();
    let mut endpoint_ranges = Vec::new();
    let mut added: Vec<OsString> = Vec::new();
    // Each option once, whichever of its names the file uses.
    let mut given: BTreeMap<String, (&str, String)> = BTreeMap::new();
    for (key, value) in &table {
        if key == "endpoint" {
            endpoint_ranges = value.clone().try_into().map_err(parse_error)?;
            continue;
        }
        let Some((id, long, repeatable)) = option_of(&command, key) else {
            return Err(SettingsError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
            });
        };
        if let Some((other, _)) = given.insert(id.clone(), (key.as_str(), long.clone())) {
            return Err(value_error(key, format!("given twice (also as {other})")));
        }
        let texts = match (value, repeatable) {
            (toml::Value::Array(items), true) => items
                .iter()
                .map(scalar_text)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| value_error(key, "expected a list of strings or numbers".into()))?,
            (toml::Value::Array(_), false) => {
                return Err(value_error(key, "expected one value, not a list".into()));
            }
            (_, true) => return Err(value_error(key, "expected a list".into())),
            (v, false) => {
                vec![scalar_text(v).ok_or_else(|| {
                    value_error(key, "expected a string, number or boolean".into())
                })?]
            }
        };
        if ADDED_TO_THE_COMMAND_LINE.contains(&long.as_str()) {
            // One `--long=VALUE` word: a value starting with `-` stays a value.
            added.extend(texts.iter().map(|t| format!("--{long}={t}").into()));
        } else {
            command = command.mut_arg(id, |a| a.default_values(texts));
        }
    }
    // The file's additions go before the command line's own arguments.
    let rest = args.split_off(args.len().min(1));
    args.extend(added);
    args.extend(rest);
    // The command line alone parsed (`Cli::load`), so what fails now is a
    // value from the file.
    let file_value_error = |e: clap::Error| {
        let rendered = e.render().to_string();
        let reason = rendered
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_string();
        // clap names the option (`--probe-size <BYTES>`); name its key.
        let option = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(s)) => s.trim_start_matches('-').split([' ', '=']).next(),
            _ => None,
        };
        let named = |long: &String| option.is_none_or(|o| o == long);
        let keys: Vec<&str> = match given.values().any(|(_, long)| named(long)) {
            true => given
                .values()
                .filter(|(_, l)| named(l))
                .map(|(k, _)| *k)
                .collect(),
            false => given.values().map(|(k, _)| *k).collect(),
        };
        value_error(&keys.join(", "), reason)
    };
    let matches = command
        .try_get_matches_from(args)
        .map_err(file_value_error)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(file_value_error)?;
    cli.endpoint_ranges = endpoint_ranges;
    cli.socket_path_from_file =
        matches.value_source("socket_path") == Some(ValueSource::DefaultValue);
    Ok(cli)
}

/// The option a file key names: its id, long name and whether it repeats.
fn option_of(command: &clap::Command, key: &str) -> Option<(String, String, bool)> {
    let old = OLD_NAMES
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, long)| *long);
    command.get_arguments().find_map(|a| {
        let long = a.get_long()?;
        let named = old.map_or(long.replace('-', "_") == key, |o| o == long);
        (named && !COMMAND_LINE_ONLY.contains(&long)).then(|| {
            (
                a.get_id().to_string(),
                long.to_string(),
                matches!(a.get_action(), ArgAction::Append),
            )
        })
    })
}

/// A TOML string, integer or boolean as option text.
fn scalar_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}
