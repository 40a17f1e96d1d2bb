//! The admin socket (through the real `viommu-ctl`) and the metrics
//! endpoint (over HTTP) of a real daemon process driven by the frontend
//! stand-in.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::Value;
use viommu_frontend::replay::{map_unmap_stream, replay_pipelined};
use viommu_frontend::{Driver, DriverOptions};
use virtio_iommu_proto::{Attach, Map, MapFlags, Request, Status, Unmap};

fn ctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_viommu-ctl"))
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

struct Ops {
    daemon: Daemon,
    admin: PathBuf,
    metrics: String,
}

fn start(name: &str, extra: &[&str]) -> Ops {
    let dir = common::scratch_dir(name);
    let admin = dir.join("admin.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--admin-socket",
        admin.to_str().unwrap(),
        "--metrics-addr",
        &metrics,
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn(&dir.join("viommu.sock"), &args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin.exists() {
        assert!(
            Instant::now() < deadline,
            "no admin socket: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ops {
        daemon,
        admin,
        metrics,
    }
}

/// Runs `viommu-ctl --json ARGS` and parses its output.
fn ctl_json(admin: &Path, args: &[&str]) -> Value {
    let out = Command::new(ctl_bin())
        .arg("--admin-socket")
        .arg(admin)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "viommu-ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `viommu-ctl ARGS` (tables); returns (success, stdout, stderr).
fn ctl_text(admin: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ctl_bin())
        .arg("--admin-socket")
        .arg(admin)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// GETs `path` over a fresh connection; returns (status line, body).
fn http_get(addr: &str, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `name` (with its labels, as printed).
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn map(domain: u32, iova: u64) -> Request {
    Request::Map(Map {
        domain,
        virt_start: iova,
        virt_end: iova + 0xfff,
        phys_start: 0x2000_0000 + iova,
        flags: MapFlags::READ,
    })
}

fn unmap(domain: u32, iova: u64) -> Request {
    Request::Unmap(Unmap {
        domain,
        virt_start: iova,
        virt_end: iova + 0xfff,
        reserved: [0; 4],
    })
}

fn attach(endpoint: u32, domain: u32) -> Request {
    Request::Attach(Attach {
        domain,
        endpoint,
        flags: 0,
        reserved: [0; 4],
    })
}

#[test]
fn metrics_count_a_replay_by_type_and_status() {
    let ops = start("metrics-replay", &[]);
    let requests = map_unmap_stream(8, 3000, 32);
    let count = |f: fn(&Request) -> bool| requests.iter().filter(|r| f(r)).count() as f64;
    let maps = count(|r| matches!(r, Request::Map(_)));
    let unmaps = count(|r| matches!(r, Request::Unmap(_)));
    let mut drv = Driver::connect(&ops.daemon.socket, DriverOptions::default()).unwrap();
    let report = replay_pipelined(&mut drv, &requests, 32, 4).unwrap();
    assert_eq!(report.non_ok, 0, "{report}");
    // Guest mistakes: a MAP into a domain that does not exist, an UNMAP of
    // it, an ATTACH of an endpoint that does not exist.
    let st = |r: &Request, drv: &mut Driver| drv.send_one(r).unwrap().status();
    assert_eq!(st(&map(77, 0x1000), &mut drv), Some(Status::NoEnt));
    assert_eq!(st(&unmap(77, 0x1000), &mut drv), Some(Status::NoEnt));
    assert_eq!(st(&attach(0x1_0000, 2), &mut drv), Some(Status::NoEnt));

    let (status, body) = http_get(&ops.metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let get = |name: &str| sample(&body, name).unwrap_or_else(|| panic!("no {name} in\n{body}"));
    assert_eq!(
        get(r#"viommu_requests_total{type="attach",status="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"viommu_requests_total{type="map",status="ok"}"#),
        maps
    );
    assert_eq!(
        get(r#"viommu_requests_total{type="unmap",status="ok"}"#),
        unmaps
    );
    assert_eq!(
        get(r#"viommu_requests_total{type="map",status="noent"}"#),
        1.0
    );
    assert_eq!(
        get(r#"viommu_requests_total{type="unmap",status="noent"}"#),
        1.0
    );
    assert_eq!(
        get(r#"viommu_requests_total{type="attach",status="noent"}"#),
        1.0
    );
    assert_eq!(get("viommu_mappings"), maps - unmaps);
    assert_eq!(get("viommu_domains"), 1.0);
    assert_eq!(get("viommu_endpoints_attached"), 1.0);
    assert_eq!(get("viommu_vmm_connected"), 1.0);
    assert_eq!(get(r#"viommu_guest_errors_total{reason="malformed"}"#), 0.0);
    let answered = 1.0 + maps + unmaps + 3.0;
    assert_eq!(get("viommu_request_latency_seconds_count"), answered);
    assert_eq!(
        get(r#"viommu_request_latency_seconds_bucket{le="+Inf"}"#),
        answered
    );
    assert!(get("viommu_request_latency_seconds_sum") > 0.0);
    assert_eq!(get("viommu_lost_kicks_total"), 0.0);

    // Only /metrics, only GET and HEAD, and bad requests are refused.
    let (status, _) = http_get(&ops.metrics, "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http_get(&ops.metrics, "DELETE /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, _) = http_get(&ops.metrics, "garbage\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let (status, body) = http_get(&ops.metrics, "HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
}

#[test]
fn metrics_show_the_shared_table_and_grace_periods() {
    let dir = common::scratch_dir("metrics-table");
    let backends = dir.join("backends.sock");
    let ops = start(
        "metrics-table-daemon",
        &["--backend-socket", backends.to_str().unwrap()],
    );
    let mut drv = Driver::connect(&ops.daemon.socket, DriverOptions::default()).unwrap();
    let requests = map_unmap_stream(8, 100, 4);
    let report = replay_pipelined(&mut drv, &requests, 8, 1).unwrap();
    assert_eq!(report.non_ok, 0, "{report}");
    let (_, body) = http_get(&ops.metrics, "GET /metrics HTTP/1.1\r\n\r\n");
    let get = |name: &str| sample(&body, name).unwrap_or_else(|| panic!("no {name} in\n{body}"));
    assert!(get("viommu_table_used_bytes") > 0.0);
    assert!(get("viommu_table_free_bytes") > 0.0);
    let graces = get("viommu_grace_periods_total");
    assert!(graces >= 1.0, "UNMAPs ran grace periods");
    assert_eq!(get("viommu_grace_period_duration_seconds_count"), graces);
    assert_eq!(get("viommu_backends_connected"), 0.0);
    let status = ctl_json(&ops.admin, &["status"]);
    assert_eq!(status["table"]["grace_periods"].as_f64(), Some(graces));
    assert_eq!(
        ctl_json(&ops.admin, &["backends"])["backends"],
        serde_json::json!([])
    );
}

#[test]
fn viommu_ctl_reports_what_the_driver_did() {
    let ops = start("ctl", &[]);
    // Before any VMM: status answers, the device views say why not.
    let status = ctl_json(&ops.admin, &["status"]);
    assert_eq!(status["vmm_connected"], false);
    assert_eq!(status["device"], Value::Null);
    let (ok, _, err) = ctl_text(&ops.admin, &["domains"]);
    assert!(!ok && err.contains("no VMM is connected"), "{err}");

    let mut drv = Driver::connect(&ops.daemon.socket, DriverOptions::default()).unwrap();
    let ok_ = |drv: &mut Driver, r: Request| {
        assert_eq!(
            drv.send_one(&r).unwrap().status(),
            Some(Status::Ok),
            "{r:?}"
        )
    };
    ok_(&mut drv, attach(3, 1));
    ok_(&mut drv, attach(5, 1));
    ok_(&mut drv, attach(9, 2));
    for i in 0..10u64 {
        ok_(&mut drv, map(1, 0x10_0000 + i * 0x1000));
    }
    ok_(&mut drv, map(2, 0x4000));
    assert_eq!(
        drv.send_one(&unmap(2, 0x9000)).unwrap().status(),
        Some(Status::Ok),
        "an UNMAP of nothing is OK"
    );

    let status = ctl_json(&ops.admin, &["status"]);
    assert_eq!(status["vmm_connected"], true);
    assert_eq!(status["vmm_connections"], 1);
    assert_eq!(status["device"]["domains"], 2);
    assert_eq!(status["device"]["mappings"], 11);
    assert_eq!(status["device"]["attached"], 3);
    assert_eq!(status["requests"]["answered"], 3 + 11 + 1);
    assert_eq!(status["requests"]["failed"], 0);
    assert_eq!(status["table"], Value::Null, "no --backend-socket");

    let eps = ctl_json(&ops.admin, &["endpoints"]);
    assert_eq!(
        eps["attached"],
        serde_json::json!([
            {"endpoint": 3, "domain": 1},
            {"endpoint": 5, "domain": 1},
            {"endpoint": 9, "domain": 2}
        ])
    );
    let page = ctl_json(&ops.admin, &["endpoints", "--from", "4", "--limit", "1"]);
    assert_eq!(
        page["attached"],
        serde_json::json!([{"endpoint": 5, "domain": 1}])
    );
    assert_eq!(page["next"], 9);

    let doms = ctl_json(&ops.admin, &["domains"]);
    assert_eq!(
        doms,
        serde_json::json!([
            {"domain": 1, "bypass": false, "endpoints": 2, "mappings": 10},
            {"domain": 2, "bypass": false, "endpoints": 1, "mappings": 1}
        ])
    );

    // Paged: 4 + 4 + 2, each page starting where the last one said.
    let mut from = "0".to_string();
    let mut seen = Vec::new();
    loop {
        let page = ctl_json(
            &ops.admin,
            &["mappings", "--domain", "1", "--limit", "4", "--from", &from],
        );
        for m in page["mappings"].as_array().unwrap() {
            seen.push(m["iova_start"].as_u64().unwrap());
            assert_eq!(
                m["gpa"].as_u64().unwrap(),
                0x2000_0000 + m["iova_start"].as_u64().unwrap()
            );
            assert_eq!(m["flags"], "r");
        }
        match page["next"].as_u64() {
            Some(n) => from = format!("{n:#x}"),
            None => break,
        }
    }
    let want: Vec<u64> = (0..10).map(|i| 0x10_0000 + i * 0x1000).collect();
    assert_eq!(seen, want);
    let (ok, _, err) = ctl_text(&ops.admin, &["mappings", "--domain", "42"]);
    assert!(!ok && err.contains("domain 42 does not exist"), "{err}");

    assert_eq!(
        ctl_json(&ops.admin, &["backends"])["backends"],
        serde_json::json!([])
    );
    let faults = ctl_json(&ops.admin, &["faults"]);
    assert_eq!(faults["totals"]["reported"], 0);
    assert_eq!(faults["recent"], serde_json::json!([]));

    let dump = ctl_json(&ops.admin, &["dump"]);
    assert_eq!(dump["status"]["device"]["mappings"], 11);
    assert_eq!(dump["domains"], doms);
    assert_eq!(dump["mappings"].as_array().unwrap().len(), 2);
    assert_eq!(
        dump["mappings"][0]["mappings"].as_array().unwrap().len(),
        10
    );
    assert_eq!(dump["request_latency"]["count"], 15);

    // The tables for people name what the JSON holds.
    let (ok, text, _) = ctl_text(&ops.admin, &["status"]);
    assert!(ok);
    assert!(text.contains("mappings") && text.contains("11"), "{text}");
    let (ok, text, _) = ctl_text(&ops.admin, &["mappings", "--domain", "2"]);
    assert!(ok && text.contains("0x4000-0x4fff"), "{text}");
}

/// Sends raw lines to the admin socket; returns one reply line per line.
fn raw_admin(admin: &Path, lines: &[&[u8]]) -> Vec<Value> {
    let s = UnixStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut out = Vec::new();
    for l in lines {
        // The daemon may have closed the connection already.
        if (&s).write_all(l).is_err() {
            break;
        }
        let mut reply = String::new();
        if r.read_line(&mut reply).unwrap_or(0) == 0 {
            break;
        }
        out.push(serde_json::from_str(&reply).unwrap());
    }
    out
}

#[test]
fn malformed_admin_requests_get_an_error_and_change_nothing() {
    let ops = start("ctl-bad", &[]);
    let replies = raw_admin(
        &ops.admin,
        &[
            b"not json\n",
            b"{\"cmd\":\"reboot\"}\n",
            b"{\"cmd\":\"mappings\"}\n",
            b"{\"cmd\":\"mappings\",\"domain\":-1}\n",
            b"{\"cmd\":\"log-level\",\"filter\":\"[[[\"}\n",
            b"\xff\xfe\n",
            b"{\"cmd\":\"status\"}\n",
        ],
    );
    assert_eq!(replies.len(), 7);
    for r in &replies[..6] {
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    }
    assert_eq!(replies[6]["ok"], true, "the connection still answers");
    // A line past the bound is refused and the connection closed.
    let long = vec![b'x'; 10_000];
    let replies = raw_admin(&ops.admin, &[&long, b"{\"cmd\":\"status\"}\n"]);
    assert_eq!(replies.len(), 1, "closed after the refusal");
    assert!(
        replies[0]["error"]
            .as_str()
            .unwrap()
            .contains("longer than")
    );
    // A client that goes away mid-line harms nothing.
    {
        let s = UnixStream::connect(&ops.admin).unwrap();
        (&s).write_all(b"{\"cmd\":\"sta").unwrap();
    }
    // The daemon still serves its VMM and its admin socket.
    let mut drv = Driver::connect(&ops.daemon.socket, DriverOptions::default()).unwrap();
    assert_eq!(
        drv.send_one(&attach(1, 1)).unwrap().status(),
        Some(Status::Ok)
    );
    assert_eq!(ctl_json(&ops.admin, &["status"])["device"]["attached"], 1);
    let mut d = ops.daemon;
    assert!(d.running());
}

#[test]
fn log_level_changes_the_filter_while_running() {
    let ops = start("ctl-log", &[]);
    let mut drv = Driver::connect(&ops.daemon.socket, DriverOptions::default()).unwrap();
    assert_eq!(
        drv.send_one(&attach(1, 1)).unwrap().status(),
        Some(Status::Ok)
    );
    assert!(
        !ops.daemon.log().contains("request=\"ATTACH\""),
        "debug is off at warn"
    );
    assert_eq!(ctl_json(&ops.admin, &["status"])["log_filter"], "warn");

    let (ok, text, _) = ctl_text(&ops.admin, &["log-level", "debug"]);
    assert!(ok, "{text}");
    assert_eq!(ctl_json(&ops.admin, &["status"])["log_filter"], "debug");
    assert_eq!(
        drv.send_one(&attach(2, 1)).unwrap().status(),
        Some(Status::Ok)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ops.daemon.log().contains("endpoint=2") {
        assert!(
            Instant::now() < deadline,
            "no debug line: {}",
            ops.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A filter that does not parse is refused; the old one stays.
    let (ok, _, err) = ctl_text(&ops.admin, &["log-level", "a=b=c"]);
    assert!(!ok && err.contains("invalid log filter"), "{err}");
    assert_eq!(ctl_json(&ops.admin, &["status"])["log_filter"], "debug");
    let (ok, _, _) = ctl_text(&ops.admin, &["log-level", "warn"]);
    assert!(ok);
    assert_eq!(
        drv.send_one(&attach(3, 1)).unwrap().status(),
        Some(Status::Ok)
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(!ops.daemon.log().contains("endpoint=3"), "back at warn");
}

#[test]
fn viommu_ctl_without_a_daemon_fails_cleanly() {
    let dir = common::scratch_dir("ctl-none");
    let (ok, _, err) = ctl_text(&dir.join("nothing.sock"), &["status"]);
    assert!(!ok && err.contains("cannot reach the daemon"), "{err}");
}

#[test]
fn a_backend_sending_half_a_message_stalls_only_itself() {
    use iotlb_shm::backend_proto::{self, MAX_LEN, Message};
    use std::os::fd::AsFd;
    let dir = common::scratch_dir("half-hello");
    let backends = dir.join("backends.sock");
    let ops = start(
        "half-hello-daemon",
        &["--backend-socket", backends.to_str().unwrap()],
    );
    let hello = Message::Hello { slots: 2, pins: 2 }.encode();
    // Half a HELLO, never finished (until the HELLO timeout).
    let stuck = UnixStream::connect(&backends).unwrap();
    (&stuck).write_all(&hello[..5]).unwrap();
    // Another backend is served meanwhile, and so is the admin socket.
    let good = UnixStream::connect(&backends).unwrap();
    good.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&good).write_all(&hello[..7]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    (&good).write_all(&hello[7..]).unwrap();
    let mut buf = [0u8; MAX_LEN];
    let (msg, fds) = backend_proto::recv_message(good.as_fd(), &mut buf)
        .unwrap()
        .unwrap();
    assert!(matches!(msg, Message::Welcome { .. }), "{msg:?}");
    assert_eq!(fds.len(), 3, "table, arena and slot files");
    let listed = ctl_json(&ops.admin, &["backends"]);
    let rows = listed["backends"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{listed}");
    assert_eq!(rows[0]["pid"], std::process::id());
    assert_eq!(rows[0]["slots"], 2);
    assert_eq!(rows[0]["connected"], true);
    let (_, body) = http_get(&ops.metrics, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(sample(&body, "viommu_backends_connected"), Some(1.0));
    drop(stuck);
}
