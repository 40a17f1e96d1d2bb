//! The table across real processes: `iotlb-reader` children inherit the
//! table, arena and their own slot file; the writer runs here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use iotlb_shm::memfd::{self, SharedMapping};
use iotlb_shm::{EndpointTarget, Geometry, Perms, StallPolicy, TableWriter, WriterConfig};

const RW: Perms = Perms {
    read: true,
    write: true,
    mmio: false,
};
const EP: u32 = 1;

struct Reader {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Reader {
    /// Spawns `iotlb-reader` with the table at fds 3/4, a fresh slot file at
    /// 5 (registered with the writer) and `log` at 6.
    fn spawn(w: &mut TableWriter, log: Option<BorrowedFd<'_>>, args: &[String]) -> Reader {
        let slots = iotlb_shm::slots::create(4, 8).unwrap();
        let fds = [
            w.table_fd().as_raw_fd(),
            w.arena_fd().as_raw_fd(),
            slots.as_raw_fd(),
            log.map_or(-1, |l| l.as_raw_fd()),
        ];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_iotlb-reader"));
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
        // SAFETY: only fcntl and dup2, which are async-signal-safe, run in
        // the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Move every source out of the 3..7 range first (close-on-exec
                // copies), then dup2 onto the fixed numbers, which clears
                // close-on-exec on the targets.
                let mut high = [-1; 4];
                for (i, &fd) in fds.iter().enumerate() {
                    if fd >= 0 {
                        high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                        if high[i] < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                for (i, &fd) in high.iter().enumerate() {
                    if fd >= 0 && libc::dup2(fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        w.register_reader(slots.as_fd(), child.id() as i32).unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Reader { child, out }
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.read_line(&mut s).unwrap();
        s.trim().to_string()
    }

    fn kill9(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn writer(stall: StallPolicy, geometry: Geometry) -> TableWriter {
    let mut w = TableWriter::new(&WriterConfig {
        geometry,
        stall,
        reserved_roots: 0,
        handover: false,
    })
    .unwrap();
    w.create_domain(1).unwrap();
    w.set_endpoint(EP, EndpointTarget::Domain(1)).unwrap();
    w.map(1, 0x1000, 0x1fff, 0x8000, RW).unwrap();
    w
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Runs `synchronize` on another thread; returns a receiver for its end.
fn sync_in_background<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    w: &'s mut TableWriter,
) -> mpsc::Receiver<iotlb_shm::GraceReport> {
    let (tx, rx) = mpsc::channel();
    s.spawn(move || {
        let _ = tx.send(w.synchronize());
    });
    rx
}

#[test]
fn a_reader_process_translates_what_the_writer_publishes_and_cannot_write_it() {
    let mut w = writer(StallPolicy::default(), Geometry::default());
    let mut r = Reader::spawn(&mut w, None, &args(&["translate", "1", "0x1abc"]));
    assert_eq!(r.line(), "gpa=0x8abc len=0x544");
    assert!(r.child.wait().unwrap().success());
    let mut r = Reader::spawn(&mut w, None, &args(&["write-table"]));
    assert_eq!(r.line(), "writing");
    let status = r.child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSEGV),
        "a reader wrote the table: {status:?}"
    );
}

/// A child forked by a reader process does not inherit the table: the
/// mappings are MADV_DONTFORK, so it can never translate through a slot
/// file whose owner the writer watches.
#[test]
fn a_forked_child_of_a_reader_has_no_table() {
    let mut w = writer(StallPolicy::default(), Geometry::default());
    let mut r = Reader::spawn(&mut w, None, &args(&["fork-touch", "1", "0x1abc"]));
    assert_eq!(r.line(), "parent gpa=0x8abc");
    assert_eq!(
        r.line(),
        format!("child signal={}", libc::SIGSEGV),
        "a forked child could read the table"
    );
    assert!(r.child.wait().unwrap().success());
}

#[test]
fn a_reader_killed_inside_a_session_does_not_block_the_unmap() {
    let mut w = writer(StallPolicy::default(), Geometry::default());
    let mut r = Reader::spawn(&mut w, None, &args(&["hold-session", "1", "0x1000"]));
    assert_eq!(r.line(), "ready gpa=0x8000 len=0x1000");
    w.unmap(1, 0x1000, 0x1fff).unwrap();
    std::thread::scope(|s| {
        let done = sync_in_background(s, &mut w);
        assert!(
            done.recv_timeout(Duration::from_millis(300)).is_err(),
            "UNMAP completed inside a live session"
        );
        r.kill9();
        let report = done
            .recv_timeout(Duration::from_secs(10))
            .expect("grace period stuck on a dead reader");
        assert!(report.waited);
        assert_eq!(report.reaped, 1);
    });
    assert!(
        w.readers().is_empty(),
        "the dead reader's slots were released"
    );
    assert_eq!(w.stats().reaped, 1);
}

#[test]
fn a_reader_killed_holding_a_pin_does_not_block_the_unmap() {
    let mut w = writer(StallPolicy::default(), Geometry::default());
    let mut r = Reader::spawn(&mut w, None, &args(&["hold-pin", "1", "0x1000", "0x1000"]));
    assert_eq!(r.line(), "ready");
    w.unmap(1, 0x1000, 0x1fff).unwrap();
    std::thread::scope(|s| {
        let done = sync_in_background(s, &mut w);
        assert!(
            done.recv_timeout(Duration::from_millis(300)).is_err(),
            "UNMAP completed under a pin"
        );
        r.kill9();
        done.recv_timeout(Duration::from_secs(10))
            .expect("grace period stuck on a dead reader's pin");
    });
    assert!(w.readers().is_empty());
}

#[test]
fn a_pin_released_by_a_live_reader_lets_the_unmap_complete() {
    let mut w = writer(StallPolicy::default(), Geometry::default());
    let mut r = Reader::spawn(&mut w, None, &args(&["hold-pin", "1", "0x1000", "0x10"]));
    assert_eq!(r.line(), "ready");
    w.unmap(1, 0x1000, 0x1fff).unwrap();
    std::thread::scope(|s| {
        let done = sync_in_background(s, &mut w);
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "UNMAP completed under a pin"
        );
        r.child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        assert_eq!(r.line(), "released");
        done.recv_timeout(Duration::from_secs(10))
            .expect("unmap not completed after the pin was released");
    });
    assert!(r.child.wait().unwrap().success());
}

#[test]
fn a_stuck_reader_is_warned_about_then_killed_under_the_kill_policy() {
    let stall = StallPolicy {
        warn_after: Duration::from_millis(20),
        kill_after: Some(Duration::from_millis(150)),
    };
    let mut w = writer(stall, Geometry::default());
    let mut r = Reader::spawn(&mut w, None, &args(&["hold-session", "1", "0x1000"]));
    assert!(r.line().starts_with("ready"));
    w.unmap(1, 0x1000, 0x1fff).unwrap();
    let report = w.synchronize();
    assert_eq!(report.reaped, 1);
    let status = r.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let stats = w.stats();
    assert_eq!((stats.stalls, stats.kills), (1, 1));
    assert!(w.readers().is_empty());
}

#[test]
fn a_stuck_reader_under_the_default_policy_is_counted_and_waited_for() {
    let stall = StallPolicy {
        warn_after: Duration::from_millis(20),
        kill_after: None,
    };
    let mut w = writer(stall, Geometry::default());
    let mut r = Reader::spawn(&mut w, None, &args(&["hold-pin", "1", "0x1000", "0x10"]));
    assert_eq!(r.line(), "ready");
    w.unmap(1, 0x1000, 0x1fff).unwrap();
    std::thread::scope(|s| {
        let done = sync_in_background(s, &mut w);
        std::thread::sleep(Duration::from_millis(250));
        r.child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        done.recv_timeout(Duration::from_secs(10))
            .expect("unmap not completed");
    });
    let stats = w.stats();
    assert_eq!((stats.stalls, stats.kills), (1, 0));
    assert!(
        r.child.wait().unwrap().success(),
        "the default policy never kills"
    );
}

fn stress_iova(i: u64) -> u64 {
    (i % 16) * (1 << 30) + (i / 16) * 4096
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writer side of the stress run: maps and unmaps random pages, each
/// mapping with a new version encoded in its guest-physical address, and
/// logs the version of every UNMAP once it completed. Readers check that no
/// translation they obtain is of a version whose UNMAP completed before
/// their session began, and that no UNMAP completes under their pins.
fn stress(readers: usize, millis: u64) {
    const PAGES: u64 = 512;
    let geometry = Geometry {
        segment_nodes: 8,
        ..Geometry::default()
    };
    let mut w = TableWriter::new(&WriterConfig {
        geometry,
        ..WriterConfig::default()
    })
    .unwrap();
    w.create_domain(1).unwrap();
    w.set_endpoint(EP, EndpointTarget::Domain(1)).unwrap();
    let log_fd: OwnedFd = memfd::create(c"stress-log", PAGES * 8).unwrap();
    let log = SharedMapping::map(log_fd.as_fd(), 4096, true).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut version = vec![0u64; PAGES as usize];
    let mut mapped = vec![false; PAGES as usize];
    let mut next_version = 1u64;
    // Half the pages mapped before the readers start.
    for i in (0..PAGES).step_by(2) {
        w.map(
            1,
            stress_iova(i),
            stress_iova(i) + 0xfff,
            (next_version << 32) | (i << 12),
            RW,
        )
        .unwrap();
        version[i as usize] = next_version;
        mapped[i as usize] = true;
        next_version += 1;
    }
    let mut kids: Vec<Reader> = (0..readers)
        .map(|k| {
            let a = args(&[
                "stress",
                "1",
                &PAGES.to_string(),
                &millis.to_string(),
                &(k as u64 * 7919 + 1).to_string(),
            ]);
            Reader::spawn(&mut w, Some(log_fd.as_fd()), &a)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_millis(millis);
    let (mut maps, mut unmaps, mut batches) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        let batch = 1 + rng.next() % 8;
        let mut revoked = Vec::new();
        for _ in 0..batch {
            let i = rng.next() % PAGES;
            let iova = stress_iova(i);
            if mapped[i as usize] {
                w.unmap(1, iova, iova + 0xfff).unwrap();
                mapped[i as usize] = false;
                revoked.push(i);
                unmaps += 1;
            } else if !revoked.contains(&i) {
                w.map(1, iova, iova + 0xfff, (next_version << 32) | (i << 12), RW)
                    .unwrap();
                version[i as usize] = next_version;
                mapped[i as usize] = true;
                next_version += 1;
                maps += 1;
            }
        }
        w.synchronize();
        batches += 1;
        for i in revoked {
            log.word(i as usize * 8)
                .store(version[i as usize], Ordering::Release);
        }
    }
    let segments = w.stats().segments;
    let mut total_hits = 0;
    for k in &mut kids {
        let summary = k.line();
        let extra = k.line();
        let status = k.child.wait().unwrap();
        assert!(
            status.success(),
            "reader failed: {summary} {extra} ({status:?})"
        );
        let field = |name: &str| -> u64 {
            summary
                .split(' ')
                .find_map(|kv| kv.strip_prefix(name))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        assert_eq!(field("violations="), 0, "{summary}");
        assert!(field("lookups=") > 1000, "{summary}");
        assert!(field("pins=") > 0, "{summary}");
        total_hits += field("hits=");
    }
    assert!(total_hits > 0);
    assert!(
        unmaps > 100 && maps > 100 && batches > 10,
        "writer did too little: {maps} maps {unmaps} unmaps"
    );
    assert!(segments > 1, "the arena grew while readers ran");
    eprintln!(
        "stress: {readers} readers, {maps} maps, {unmaps} unmaps in {batches} grace periods, {segments} segments"
    );
}

#[test]
fn stress_no_use_after_unmap_across_reader_processes() {
    stress(2, 2500);
}

/// The long run: `cargo test -p iotlb-shm --release --test processes -- --ignored`.
#[test]
#[ignore = "long run (60 s); the 2.5 s version runs by default"]
fn stress_long_run() {
    stress(4, 60_000);
}

/// The operator's side of the tool: `--help` explains `lookup`; a socket
/// nobody serves is an error that names it.
#[test]
fn reader_tool_help_and_a_missing_daemon() {
    let out = Command::new(env!("CARGO_BIN_EXE_iotlb-reader"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("lookup SOCKET EP IOVA"), "{help}");
    let out = Command::new(env!("CARGO_BIN_EXE_iotlb-reader"))
        .args(["lookup", "/nonexistent/backends.sock", "8", "0x1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to /nonexistent/backends.sock"),
        "{err}"
    );
}
