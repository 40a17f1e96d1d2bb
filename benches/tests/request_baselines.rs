//! The request-path baselines answer the Linux trace as the daemon does:
//! every request OK, through the naive device over its socket and through
//! the in-process replay; the naive device survives bad chains.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use viommu_benches::in_process::{LockedTables, encode, linux_device, replay};
use viommu_frontend::replay::replay as replay_socket;
use viommu_frontend::split_ring::ChainSpec;
use viommu_frontend::{Driver, DriverOptions, trace};
use virtio_iommu_proto::{Attach, Map, MapFlags, Probe, Request, Status};

fn trace_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/viommu-frontend/traces/linux612-virtio-blk-lazy-mixed.trace.gz")
}

/// The naive device on a fresh socket; killed when dropped.
struct Naive {
    child: Child,
    socket: PathBuf,
}

impl Naive {
    fn start(name: &str) -> Naive {
        let socket = viommu_test_support::scratch::dir("naive-viommu", name).join("n.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_naive-viommu"))
            .arg("--socket-path")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn naive-viommu");
        let mut n = Naive { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !n.socket.exists() {
            assert!(n.child.try_wait().unwrap().is_none(), "naive-viommu exited");
            assert!(Instant::now() < deadline, "naive-viommu did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    }

    fn connect(&self) -> Driver {
        let opts = DriverOptions {
            queue_size: 1024,
            ..DriverOptions::default()
        };
        Driver::connect(Path::new(&self.socket), opts).expect("connect")
    }

    /// After the frontend disconnected: the device exits with status 0.
    fn exits_cleanly(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "naive-viommu: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "naive-viommu did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Naive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn naive_device_replays_the_linux_trace_all_ok() {
    let requests = trace::load(&trace_path()).unwrap();
    let mut naive = Naive::start("trace");
    let mut driver = naive.connect();
    let report = replay_socket(&mut driver, &requests, 32).unwrap();
    assert_eq!(report.requests, requests.len() as u64);
    assert_eq!(report.non_ok, 0, "{report}");
    drop(driver);
    naive.exits_cleanly();
}

#[test]
fn in_process_replay_of_the_linux_trace_is_all_ok() {
    let requests = trace::load(&trace_path()).unwrap();
    let mut dev = linux_device().unwrap();
    let mut posted = encode(&requests, dev.config_space().probe_size);
    let tables = LockedTables::default();
    let report = replay(&mut dev, &mut posted, 32, &tables);
    assert_eq!(report.requests, requests.len() as u64);
    assert_eq!(report.non_ok, 0, "{report}");
    // The mirror holds what the model holds.
    assert_eq!(report.mappings_left, dev.mapping_count() as usize);
}

#[test]
fn naive_device_returns_bad_chains_untouched_and_keeps_serving() {
    let naive = Naive::start("bad-chains");
    let mut driver = naive.connect();
    let attach = Request::Attach(Attach {
        domain: 1,
        endpoint: 8,
        flags: 0,
        reserved: [0; 4],
    });
    let map = Request::Map(Map {
        domain: 1,
        virt_start: 0x1000,
        virt_end: 0x1fff,
        phys_start: 0x10_0000,
        flags: MapFlags(3),
    });
    let probe = Request::Probe(Probe { endpoint: 8 });
    let chain = |readable: Vec<u8>, writable_len| ChainSpec {
        readable,
        writable_len,
        readable_cuts: Vec::new(),
        writable_cuts: Vec::new(),
        indirect: false,
        prefill: 0xee,
    };
    let out = driver
        .send_chains(&[
            chain(attach.encode(), 0),                // no room for a tail
            chain(vec![9, 0, 0, 0, 0, 0], 4),         // unknown type
            chain(vec![1, 0], 4),                     // no head
            chain(map.encode()[..12].to_vec(), 4),    // MAP cut short
            chain(probe.encode()[..6].to_vec(), 516), // PROBE cut short
        ])
        .unwrap();
    let used: Vec<u32> = out.iter().map(|o| o.used_len).collect();
    assert_eq!(used, [0, 0, 0, 4, 516]);
    assert_eq!(out[3].status(), Some(Status::Inval));
    assert_eq!(out[4].status(), Some(Status::Inval));
    assert!(out[4].properties().iter().all(|&b| b == 0));
    for (req, want) in [
        (attach, Status::Ok),
        (map, Status::Ok),
        (map, Status::Inval),
        (probe, Status::Ok),
    ] {
        assert_eq!(driver.send_one(&req).unwrap().status(), Some(want));
    }
}

/// Every sink of the in-process replay (the daemon's shared table, the
/// model alone) answers both workloads all OK.
#[test]
fn in_process_replay_into_each_sink_is_all_ok() {
    let trace = trace_path();
    let trace = trace.to_str().unwrap();
    for sink in ["table", "none", "btree"] {
        for source in [["--trace", trace], ["--map-unmap", "20000"]] {
            let out = Command::new(env!("CARGO_BIN_EXE_replay-in-process"))
                .args(source)
                .args(["--batch", "32", "--sink", sink])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{sink} {source:?}: {text}");
            assert!(
                text.contains("non-OK statuses: 0"),
                "{sink} {source:?}: {text}"
            );
        }
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_replay-in-process"))
        .args(["--map-unmap", "10", "--sink", "nowhere"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown sink is a usage error"
    );
}
