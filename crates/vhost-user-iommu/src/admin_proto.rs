//! The admin socket's protocol: one JSON object per line each way
//! (`docs/operations.md`). A request names its command in `cmd`; a reply
//! is `{"ok": true, "data": …}` or `{"ok": false, "error": "…"}`. Shared by
//! the daemon and `viommu-ctl`.

use serde::{Deserialize, Serialize};

use crate::telemetry::{FaultEntry, HistogramSnapshot};

/// Longest request line the daemon reads; a longer one is refused and the
/// connection closed.
pub const MAX_REQUEST_LEN: usize = 4096;
/// Rows a paged command returns when it is not told how many.
pub const DEFAULT_PAGE: usize = 256;
/// Most rows a paged command returns.
pub const MAX_PAGE: usize = 65536;

/// A command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminRequest {
    /// The daemon at a glance.
    Status,
    /// Attached endpoints, paged by endpoint ID.
    Endpoints {
        /// First endpoint ID to list.
        #[serde(default)]
        from: u32,
        /// Most rows ([`DEFAULT_PAGE`] if absent).
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Live domains.
    Domains,
    /// One domain's mappings, paged by IOVA.
    Mappings {
        /// The domain.
        domain: u32,
        /// List mappings that end at or after this IOVA.
        #[serde(default)]
        from: u64,
        /// Most rows ([`DEFAULT_PAGE`] if absent).
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Backends holding the shared table.
    Backends,
    /// Fault counters and the latest fault records.
    Faults,
    /// Replaces the log filter (a `RUST_LOG`-style directive).
    LogLevel {
        /// The new filter.
        filter: String,
    },
    /// Everything above (every mapping of every domain) in one object.
    Dump,
}

/// A reply line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminReply {
    /// Whether the command was carried out.
    pub ok: bool,
    /// What it returned (`null` for `log-level`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Daemon version.
    pub version: String,
    /// Daemon process ID.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Whether a VMM is connected now.
    pub vmm_connected: bool,
    /// VMM connections served since the start.
    pub vmm_connections: u64,
    /// The device, while a VMM is connected.
    pub device: Option<DeviceStatus>,
    /// The shared table, if `--backend-socket` is set.
    pub table: Option<TableStatus>,
    /// Backends whose connection is open.
    pub backends_connected: usize,
    /// Request counters.
    pub requests: RequestTotals,
    /// Fault counters.
    pub faults: FaultTotals,
    /// Requests the watchdog found waiting without a kick.
    pub lost_kicks: u64,
    /// The log filter in force.
    pub log_filter: Option<String>,
}

/// The device model's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Negotiated feature bits.
    pub features: u64,
    /// Endpoints served.
    pub endpoints: u64,
    /// Endpoints attached to a domain.
    pub attached: usize,
    /// What unattached endpoints get: `bypass` or `blocked`.
    pub unattached: String,
    /// Live domains.
    pub domains: usize,
    /// Live mappings.
    pub mappings: u64,
}

/// The shared table's use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStatus {
    /// Bytes of the table and arena in use.
    pub bytes_used: u64,
    /// Bytes the arena may still grow into (`--table-max-mib`).
    pub bytes_free: u64,
    /// Grace periods run.
    pub grace_periods: u64,
    /// Stalls past `--stall-warn-ms`.
    pub stalls: u64,
    /// Backends killed by `--stall-kill-ms`.
    pub kills: u64,
    /// Kills the kernel refused.
    pub kill_failures: u64,
    /// Backends registered (connected or not yet released).
    pub readers: usize,
}

/// Request counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestTotals {
    /// Requests answered with a status.
    pub answered: u64,
    /// Of those, answered with a status other than OK.
    pub failed: u64,
    /// Chains returned unparsed (unknown type, too short).
    pub unparsed: u64,
    /// Chains refused for their shape.
    pub malformed: u64,
}

/// Fault counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultTotals {
    /// Fault records queued for the guest.
    pub reported: u64,
    /// Records written into the guest's event buffers.
    pub delivered: u64,
    /// Records dropped: too many pending.
    pub dropped_full: u64,
    /// Records dropped: the guest's buffer was bad.
    pub dropped_buffer: u64,
}

/// One attached endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    /// Endpoint ID.
    pub endpoint: u32,
    /// Its domain.
    pub domain: u32,
}

/// `endpoints`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// Endpoints served.
    pub total: u64,
    /// What unattached endpoints get.
    pub unattached: String,
    /// Attached endpoints of this page.
    pub attached: Vec<EndpointRow>,
    /// Where the next page starts, if there is one.
    pub next: Option<u32>,
}

/// One domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRow {
    /// Domain ID.
    pub domain: u32,
    /// A bypass domain.
    pub bypass: bool,
    /// Endpoints attached.
    pub endpoints: u32,
    /// Mappings.
    pub mappings: usize,
}

/// One mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingRow {
    /// First IOVA.
    pub iova_start: u64,
    /// Last IOVA (inclusive).
    pub iova_end: u64,
    /// Guest-physical address of the first IOVA.
    pub gpa: u64,
    /// `r`, `w`, `m` (MMIO) flags.
    pub flags: String,
}

/// `mappings`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mappings {
    /// The domain.
    pub domain: u32,
    /// Mappings of this page.
    pub mappings: Vec<MappingRow>,
    /// The `from` of the next page, if there is one.
    pub next: Option<u64>,
}

/// One backend holding the table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    /// Reader ID.
    pub reader: u64,
    /// Process ID.
    pub pid: i32,
    /// User ID.
    pub uid: u32,
    /// Session slots given.
    pub slots: u32,
    /// Slots in use now.
    pub slots_in_use: usize,
    /// Pin records given.
    pub pins: u32,
    /// Pins held now.
    pub pins_in_use: usize,
    /// Connection open.
    pub connected: bool,
    /// Where it stands (`active`, `draining`, …).
    pub state: String,
    /// What the stall policy did to it: `none`, `sent`, `failed`.
    pub kill: String,
}

/// `backends`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backends {
    /// Stalls of all backends since the start (the table counts them, not
    /// per backend).
    pub stalls: u64,
    /// Backends listed.
    pub backends: Vec<BackendRow>,
}

/// `faults`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    /// Counters.
    pub totals: FaultTotals,
    /// The latest records, oldest first.
    pub recent: Vec<FaultEntry>,
}

/// `dump`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dump {
    /// `status`.
    pub status: Status,
    /// Every attached endpoint.
    pub endpoints: Endpoints,
    /// Every domain.
    pub domains: Vec<DomainRow>,
    /// Every mapping, per translated domain.
    pub mappings: Vec<Mappings>,
    /// `backends`.
    pub backends: Backends,
    /// `faults`.
    pub faults: Faults,
    /// The request latency histogram.
    pub request_latency: HistogramSnapshot,
    /// The grace-period duration histogram.
    pub grace_duration: HistogramSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_their_documented_lines() {
        let parse = |s: &str| serde_json::from_str::<AdminRequest>(s);
        assert_eq!(parse(r#"{"cmd":"status"}"#).unwrap(), AdminRequest::Status);
        assert_eq!(
            parse(r#"{"cmd":"mappings","domain":3,"from":4096,"limit":10}"#).unwrap(),
            AdminRequest::Mappings {
                domain: 3,
                from: 4096,
                limit: Some(10)
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"mappings","domain":3}"#).unwrap(),
            AdminRequest::Mappings {
                domain: 3,
                from: 0,
                limit: None
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"log-level","filter":"debug"}"#).unwrap(),
            AdminRequest::LogLevel {
                filter: "debug".into()
            }
        );
        assert!(
            parse(r#"{"cmd":"mappings"}"#).is_err(),
            "domain is required"
        );
        assert!(parse(r#"{"cmd":"reboot"}"#).is_err());
        assert!(
            parse(r#"{"cmd":"mappings","domain":1,"x":1}"#).is_err(),
            "unknown fields"
        );
        assert!(parse(r#"{"cmd":"mappings","domain":-1}"#).is_err());
        assert!(parse("status").is_err());
    }
}
