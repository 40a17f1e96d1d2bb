//! The realistic workload: the whole Linux 6.12 virtio-blk trace from the
//! shared folder replayed through the daemon over vhost-user, one request
//! per kick and 32 per kick; every request must complete with status OK.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Daemon;
use std::path::PathBuf;
use viommu_frontend::replay::replay_pipelined;
use viommu_frontend::{Driver, DriverOptions, trace};

const TRACE: &str = "linux612-virtio-blk-lazy-mixed.trace.gz";
/// Requests in the trace, per its README.
const TRACE_REQUESTS: usize = 219_002;

/// The copy kept in the repository (so CI needs nothing outside it); when
/// the team's shared folder is beside the checkout, the copy must still be
/// byte-identical to it.
fn trace_path() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let ours = root.join("crates/viommu-frontend/traces").join(TRACE);
    if let Ok(shared) = std::fs::read(root.join("../shared/traces").join(TRACE)) {
        let copy = std::fs::read(&ours).unwrap_or_default();
        assert!(
            copy == shared,
            "{} differs from ../shared/traces/{TRACE}",
            ours.display()
        );
    }
    ours
}

fn replay_whole_trace(batch: usize, in_flight: usize) {
    let path = trace_path();
    assert!(
        path.exists(),
        "the shared trace {} is missing: this test needs the team's shared folder next to the repository",
        path.display()
    );
    let requests = trace::load(&path).unwrap();
    assert_eq!(requests.len(), TRACE_REQUESTS, "the whole trace");
    let d = Daemon::start(&format!("replay{batch}x{in_flight}"), &[]);
    // Default options: 1 GiB memfd (the trace's GPAs are inside it), EVENT_IDX.
    let mut drv = Driver::connect(&d.socket, DriverOptions::default()).unwrap();
    let report = replay_pipelined(&mut drv, &requests, batch, in_flight).unwrap();
    eprintln!("batch {batch}, {in_flight} in flight:\n{report}");
    assert_eq!(report.requests, TRACE_REQUESTS as u64);
    assert_eq!(report.non_ok, 0, "{report}");
    assert_eq!(report.statuses[0], TRACE_REQUESTS as u64);
    // Two descriptors per request: a batch larger than the default ring
    // (256) goes in parts, each timed as one.
    if 2 * batch <= 256 {
        assert_eq!(report.batches as usize, TRACE_REQUESTS.div_ceil(batch));
    } else {
        assert!(report.batches as usize > TRACE_REQUESTS.div_ceil(batch));
    }
}

#[test]
fn replay_linux612_trace_one_request_per_kick_all_ok() {
    replay_whole_trace(1, 1);
}

#[test]
fn replay_linux612_trace_32_requests_per_kick_all_ok() {
    replay_whole_trace(32, 1);
}

/// Several batches queued at once (the device finds the next batch while
/// it completes one, the driver is not kicked while the device works):
/// still every request in order, every one OK.
#[test]
fn replay_linux612_trace_8_batches_in_flight_all_ok() {
    replay_whole_trace(32, 8);
}

/// A batch larger than the ring: posted in parts, as Linux does on ENOSPC.
#[test]
fn replay_linux612_trace_batches_larger_than_the_ring_all_ok() {
    replay_whole_trace(300, 1);
}

/// More batches than the ring holds: the driver waits for room.
#[test]
fn replay_linux612_trace_more_in_flight_than_the_ring_holds_all_ok() {
    replay_whole_trace(8, 64);
}

/// The MAP/UNMAP-only stream (Linux's strict mode) is valid for the
/// daemon's defaults: every request OK, pipelined.
#[test]
fn map_unmap_stream_all_ok() {
    let requests = viommu_frontend::replay::map_unmap_stream(8, 20_000, 32);
    let d = Daemon::start("mapunmap", &[]);
    let mut drv = Driver::connect(&d.socket, DriverOptions::default()).unwrap();
    let report = replay_pipelined(&mut drv, &requests, 32, 4).unwrap();
    assert_eq!(report.requests, 40_001);
    assert_eq!(report.non_ok, 0, "{report}");
}
