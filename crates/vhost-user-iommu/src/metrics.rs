//! The daemon's metrics in the OpenMetrics text format (prometheus-client
//! encodes them). Every scrape reads the live counters once into a
//! [`MetricsSnapshot`] and encodes that: nothing on the request path knows
//! about Prometheus. Names and meanings: `docs/operations.md`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::admin::DaemonView;
use crate::admin_proto::Status;
use crate::telemetry::{HistogramSnapshot, REQUEST_KINDS, STATUSES, bucket_bound};

/// The media type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything one scrape reports.
#[derive(Debug)]
pub struct MetricsSnapshot {
    status: Status,
    /// `[type][status]` answered requests.
    requests: Vec<Vec<u64>>,
    latency: HistogramSnapshot,
    grace: HistogramSnapshot,
    already_applied: u64,
}

impl MetricsSnapshot {
    /// Reads the daemon's counters (may wait for the device and table
    /// locks).
    pub(crate) fn take(view: &DaemonView) -> Self {
        let r = &view.telemetry.requests;
        Self {
            status: view.status(),
            requests: (0..REQUEST_KINDS.len())
                .map(|k| (0..STATUSES.len()).map(|s| r.count(k, s)).collect())
                .collect(),
            latency: r.latency.snapshot(),
            grace: view.telemetry.grace.snapshot(),
            already_applied: r.already_applied.get(),
        }
    }
}

/// Encodes `snapshot` in the OpenMetrics text format.
pub(crate) fn render(snapshot: MetricsSnapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("viommu");
    registry.register_collector(Box::new(Scrape(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

#[derive(Debug)]
struct Scrape(MetricsSnapshot);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    let buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .enumerate()
        .map(|(i, &n)| (bucket_bound(i).unwrap_or(f64::MAX), n))
        .collect();
    m.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, h.count, &buckets, None)
}

fn gauge_of(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0.status;
        let mut m = e.encode_descriptor(
            "requests",
            "Requests answered with a status, by type and status",
            None,
            MetricType::Counter,
        )?;
        for (k, row) in self.0.requests.iter().enumerate() {
            for (st, &n) in row.iter().enumerate() {
                if n == 0 && st != 0 {
                    continue;
                }
                let labels = [("type", REQUEST_KINDS[k]), ("status", STATUSES[st])];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "guest_errors",
            "Request chains the guest got wrong, returned with used length 0: unparsed (unknown type, too short) or malformed (bad shape, outside guest memory)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("unparsed", s.requests.unparsed),
            ("malformed", s.requests.malformed),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
        }
        counter(
            &mut e,
            "requests_already_applied",
            "Requests a previous daemon applied but had not completed, completed after the restart without being applied again (also in requests_total)",
            self.0.already_applied,
        )?;
        histogram(
            &mut e,
            "request_latency",
            "Time from a request-queue pass taking its chains to completing them (grace period included), per request",
            &self.0.latency,
        )?;
        let dev = s.device.clone().unwrap_or_default();
        gauge(
            &mut e,
            "vmm_connected",
            "1 while a VMM is connected",
            i64::from(s.vmm_connected),
        )?;
        counter(
            &mut e,
            "vmm_connections",
            "VMM connections served",
            s.vmm_connections,
        )?;
        gauge(
            &mut e,
            "endpoints",
            "Endpoints the device serves",
            gauge_of(dev.endpoints),
        )?;
        gauge(
            &mut e,
            "endpoints_attached",
            "Endpoints attached to a domain",
            gauge_of(dev.attached),
        )?;
        gauge(&mut e, "domains", "Live domains", gauge_of(dev.domains))?;
        gauge(&mut e, "mappings", "Live mappings", gauge_of(dev.mappings))?;
        let t = s.table.clone().unwrap_or_default();
        gauge(
            &mut e,
            "table_used_bytes",
            "Bytes of the shared table and arena in use",
            gauge_of(t.bytes_used),
        )?;
        gauge(
            &mut e,
            "table_free_bytes",
            "Bytes the shared arena may still grow into",
            gauge_of(t.bytes_free),
        )?;
        counter(
            &mut e,
            "grace_periods",
            "Grace periods the shared table ran",
            t.grace_periods,
        )?;
        histogram(
            &mut e,
            "grace_period_duration",
            "Duration of each grace period",
            &self.0.grace,
        )?;
        gauge(
            &mut e,
            "backends_connected",
            "Backends with an open backend-socket connection",
            gauge_of(s.backends_connected),
        )?;
        gauge(
            &mut e,
            "backends_registered",
            "Backends the table counts (connected, or gone but not released)",
            gauge_of(t.readers),
        )?;
        counter(
            &mut e,
            "backend_stalls",
            "Backends stuck past --stall-warn-ms during a grace period",
            t.stalls,
        )?;
        counter(
            &mut e,
            "backend_kills",
            "Backends killed by --stall-kill-ms",
            t.kills,
        )?;
        counter(
            &mut e,
            "backend_kill_failures",
            "Kills of stuck backends the kernel refused",
            t.kill_failures,
        )?;
        counter(
            &mut e,
            "faults_reported",
            "Fault records queued for the guest",
            s.faults.reported,
        )?;
        counter(
            &mut e,
            "faults_delivered",
            "Fault records written to the guest's event queue",
            s.faults.delivered,
        )?;
        let mut m = e.encode_descriptor(
            "faults_dropped",
            "Fault records dropped: queue_full (too many pending) or bad_buffer (the guest's buffer was too small or bad)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("queue_full", s.faults.dropped_full),
            ("bad_buffer", s.faults.dropped_buffer),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
        }
        counter(
            &mut e,
            "lost_kicks",
            "Requests found waiting a whole watchdog interval without a kick",
            s.lost_kicks,
        )?;
        gauge(
            &mut e,
            "uptime_seconds",
            "Seconds since the daemon started",
            gauge_of(s.uptime_secs),
        )?;
        Ok(())
    }
}
