//! The real processes of the block tests: the `vhost-user-blk` binary, the
//! `vhost-user-iommu` daemon (a sibling binary of the workspace), and disk
//! images in a scratch directory that is removed when the test is done.
#![allow(
    dead_code,
    unused_imports,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::path::{Path, PathBuf};

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

pub use viommu_test_support::processes::{Iommu, Proc};

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
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
