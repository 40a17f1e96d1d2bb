//! Starting the real daemon binary for integration tests.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod backends;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The daemon binary built by cargo for these tests.
pub fn daemon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vhost-user-iommu"))
}

/// A fresh directory for one test's sockets, removed when the test
/// process exits.
pub fn scratch_dir(name: &str) -> PathBuf {
    viommu_test_support::scratch::dir("viommu-it", name)
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `socket` with extra arguments and waits until
    /// the socket exists. Its log goes to `daemon.log` beside the socket (a
    /// pipe nobody reads would block the daemon once full).
    pub fn spawn(socket: &Path, extra: &[&str]) -> Daemon {
        let log =
            std::fs::File::create(socket.with_file_name("daemon.log")).expect("create daemon.log");
        let child = Command::new(daemon_bin())
            .arg("--socket-path")
            .arg(socket)
            .args(["--log-level", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        let mut d = Daemon {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(d.running(), "daemon exited early: {}", d.log());
            assert!(
                Instant::now() < deadline,
                "daemon did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        d
    }

    /// Starts the daemon in a fresh scratch directory named after `name`.
    pub fn start(name: &str, extra: &[&str]) -> Daemon {
        Daemon::spawn(&scratch_dir(name).join("viommu.sock"), extra)
    }

    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.socket.with_file_name("daemon.log")).unwrap_or_default()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill() on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// Waits up to `limit` for the daemon to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
