//! A one-file FUSE file system served by a thread of the test: a slow disk
//! whose READs wait until the test answers them. It speaks the kernel's
//! FUSE protocol on `/dev/fuse` directly (root only), with async direct I/O
//! on, so that an `O_DIRECT` read submitted on an io_uring is in flight in
//! the kernel — its pages pinned — until the test lets it complete.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;
const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_ASYNC_DIO: u32 = 1 << 15;
const IN_HEADER: usize = 40;
const ROOT: u64 = 1;
const DISK: u64 = 2;

/// A READ the file system has not answered yet.
#[derive(Debug)]
pub struct HeldRead {
    unique: u64,
    /// Bytes asked for.
    pub size: u32,
    /// Offset in the file.
    pub offset: u64,
}

/// The mounted file system; unmounted when dropped.
pub struct FuseDisk {
    dir: PathBuf,
    dev: Arc<OwnedFd>,
    reads: mpsc::Receiver<HeldRead>,
}

fn reply(dev: &OwnedFd, unique: u64, error: i32, body: &[u8]) {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&error.to_ne_bytes());
    out.extend_from_slice(&unique.to_ne_bytes());
    out.extend_from_slice(body);
    // SAFETY: writes our own buffer to the FUSE device.
    unsafe { libc::write(dev.as_raw_fd(), out.as_ptr().cast(), out.len()) };
}

/// `struct fuse_attr`.
fn attr(ino: u64, size: u64, mode: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(88);
    for v in [ino, size, size.div_ceil(512), 0, 0, 0] {
        a.extend_from_slice(&v.to_ne_bytes());
    }
    for v in [0u32, 0, 0, mode, 1, 0, 0, 0, 4096, 0] {
        a.extend_from_slice(&v.to_ne_bytes());
    }
    a
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_ne_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_ne_bytes(w)
}

impl FuseDisk {
    /// Mounts a file system holding one file, `disk`, of `size` bytes at
    /// `dir` (created). Needs root and `/dev/fuse`.
    pub fn mount(dir: &Path, size: u64) -> Result<FuseDisk, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // SAFETY: open(2) of a constant path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(format!("/dev/fuse: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let dev = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let opts = CString::new(format!(
            "fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other"
        ))
        .map_err(|e| e.to_string())?;
        let target = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: mount(2) with valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"viommu-test".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!("mount fuse: {}", std::io::Error::last_os_error()));
        }
        let (tx, reads) = mpsc::channel();
        let server = Arc::clone(&dev);
        std::thread::spawn(move || serve(&server, size, &tx));
        Ok(FuseDisk {
            dir: dir.to_path_buf(),
            dev,
            reads,
        })
    }

    /// The file's path.
    pub fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// The next READ that reached the file system.
    pub fn next_read(&self, wait: Duration) -> Option<HeldRead> {
        self.reads.recv_timeout(wait).ok()
    }

    /// Completes a READ with `byte` repeated.
    pub fn answer(&self, read: &HeldRead, byte: u8) {
        reply(&self.dev, read.unique, 0, &vec![byte; read.size as usize]);
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: umount2(2) of our own mount point.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn serve(dev: &OwnedFd, size: u64, reads: &mpsc::Sender<HeldRead>) {
    let mut buf = vec![0u8; (1 << 20) + 8192];
    loop {
        // SAFETY: reads one request into our buffer.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR | libc::ENOENT | libc::EAGAIN) => continue,
                _ => return, // ENODEV: unmounted
            }
        }
        let n = n as usize;
        if n < IN_HEADER {
            continue;
        }
        let (op, unique, node) = (u32_at(&buf, 4), u64_at(&buf, 8), u64_at(&buf, 16));
        let body = &buf[IN_HEADER..n];
        match op {
            FUSE_INIT => {
                let flags = u32_at(body, 12) & (FUSE_ASYNC_DIO | FUSE_ASYNC_READ);
                let mut o = Vec::with_capacity(64);
                for v in [7u32, 31, 128 << 10, flags] {
                    o.extend_from_slice(&v.to_ne_bytes());
                }
                o.extend_from_slice(&16u16.to_ne_bytes()); // max_background
                o.extend_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
                o.extend_from_slice(&(1u32 << 20).to_ne_bytes()); // max_write
                o.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
                o.extend_from_slice(&256u16.to_ne_bytes()); // max_pages
                o.resize(64, 0);
                reply(dev, unique, 0, &o);
            }
            FUSE_LOOKUP if body.split(|&b| b == 0).next() == Some(b"disk") => {
                let mut o = Vec::new();
                for v in [DISK, 0, 3600, 3600] {
                    o.extend_from_slice(&v.to_ne_bytes());
                }
                o.extend_from_slice(&[0u8; 8]);
                o.extend_from_slice(&attr(DISK, size, 0o100644));
                reply(dev, unique, 0, &o);
            }
            FUSE_LOOKUP => reply(dev, unique, -libc::ENOENT, &[]),
            FUSE_GETATTR => {
                let mut o = Vec::new();
                o.extend_from_slice(&3600u64.to_ne_bytes());
                o.extend_from_slice(&[0u8; 8]);
                o.extend_from_slice(&if node == ROOT {
                    attr(ROOT, 0, 0o040755)
                } else {
                    attr(DISK, size, 0o100644)
                });
                reply(dev, unique, 0, &o);
            }
            FUSE_OPEN => reply(dev, unique, 0, &[0u8; 16]),
            FUSE_READ => {
                let _ = reads.send(HeldRead {
                    unique,
                    offset: u64_at(body, 8),
                    size: u32_at(body, 16),
                });
            }
            FUSE_RELEASE | FUSE_FLUSH => reply(dev, unique, 0, &[]),
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => {}
            FUSE_DESTROY => return reply(dev, unique, 0, &[]),
            _ => reply(dev, unique, -libc::ENOSYS, &[]),
        }
    }
}
