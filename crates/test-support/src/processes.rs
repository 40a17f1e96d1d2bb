//! The workspace's binaries as real processes for integration tests: a
//! sibling binary found (or built) beside the test, a child process killed
//! when dropped with its log in a file, and the `vhost-user-iommu` daemon
//! with its backend socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary of another package, beside this test's own: built by
/// `cargo test --workspace` before any test runs; built here otherwise.
pub fn sibling_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let path = profile_dir.join(bin);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", bin]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "cannot build {bin}");
    }
    path
}

/// A child process killed when dropped, with its log in a file.
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its standard error.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` with `args` (RUST_LOG=info) and waits up to 10 s for
    /// every path of `wait_for` to exist (its sockets).
    pub fn spawn(bin: &Path, args: &[&str], log: PathBuf, wait_for: &[&Path]) -> Proc {
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = Proc { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wait_for.iter().all(|f| f.exists()) {
            assert!(
                p.child.try_wait().unwrap().is_none(),
                "{} exited: {}",
                bin.display(),
                p.log_text()
            );
            assert!(Instant::now() < deadline, "{} did not start", bin.display());
            std::thread::sleep(Duration::from_millis(5));
        }
        p
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log_text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "never logged {text:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill9(&mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The IOMMU daemon with its backend socket.
#[derive(Debug)]
pub struct Iommu {
    /// The process.
    pub proc: Proc,
    /// The VMM socket.
    pub vmm: PathBuf,
    /// The backend socket.
    pub backends: PathBuf,
}

impl Iommu {
    /// Starts `vhost-user-iommu` with its sockets in `dir` (`iommu.sock`,
    /// `iommu-backends.sock`) and `extra` options.
    pub fn start(dir: impl AsRef<Path>, extra: &[&str]) -> Iommu {
        Iommu::start_named(dir.as_ref(), "iommu", extra)
    }

    /// Starts `vhost-user-iommu` with its sockets in `dir`, named with
    /// `name` (several daemons may share a directory), and `extra` options.
    pub fn start_named(dir: &Path, name: &str, extra: &[&str]) -> Iommu {
        let vmm = dir.join(format!("{name}.sock"));
        let backends = dir.join(format!("{name}-backends.sock"));
        let bin = sibling_binary("vhost-user-iommu", "vhost-user-iommu");
        let mut args = vec![
            "--socket-path",
            vmm.to_str().unwrap(),
            "--backend-socket",
            backends.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn(
            &bin,
            &args,
            dir.join(format!("{name}.log")),
            &[&vmm, &backends],
        );
        Iommu {
            proc,
            vmm,
            backends,
        }
    }

    /// `--iommu` value for a backend of this daemon.
    pub fn mode(&self) -> String {
        format!("table:{}", self.backends.display())
    }

    /// `--iommu` value for a message-mode backend of this daemon.
    pub fn msg_mode(&self) -> String {
        format!("iotlb-msg:{}", self.backends.display())
    }
}
