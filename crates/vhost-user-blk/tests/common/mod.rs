//! The real processes of the block tests: the `vhost-user-blk` binary, the
//! `vhost-user-iommu` daemon (a sibling binary of the workspace), and disk
//! images in a scratch directory that is removed when the test is done.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vublk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A sparse image of `bytes`.
    pub fn image(&self, name: &str, bytes: u64) -> PathBuf {
        let p = self.path(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(bytes).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
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
pub struct Iommu {
    pub proc: Proc,
    pub vmm: PathBuf,
    pub backends: PathBuf,
}

impl Iommu {
    pub fn start(dir: &Scratch, extra: &[&str]) -> Iommu {
        let (vmm, backends) = (dir.path("iommu.sock"), dir.path("backends.sock"));
        let bin = sibling_binary("vhost-user-iommu", "vhost-user-iommu");
        let mut args = vec![
            "--socket-path",
            vmm.to_str().unwrap(),
            "--backend-socket",
            backends.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn(&bin, &args, dir.path("iommu.log"), &[&vmm, &backends]);
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
    #[allow(dead_code)]
    pub fn msg_mode(&self) -> String {
        format!("iotlb-msg:{}", self.backends.display())
    }
}

/// The block backend.
pub struct Blk {
    pub proc: Proc,
    pub socket: PathBuf,
}

impl Blk {
    /// Starts `vhost-user-blk` with `args` (its socket is added).
    pub fn start(dir: &Scratch, args: &[&str]) -> Blk {
        let socket = dir.path("blk.sock");
        let mut all = vec!["--socket-path", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        let proc = Proc::spawn(
            Path::new(env!("CARGO_BIN_EXE_vhost-user-blk")),
            &all,
            dir.path("blk.log"),
            &[&socket],
        );
        Blk { proc, socket }
    }
}
