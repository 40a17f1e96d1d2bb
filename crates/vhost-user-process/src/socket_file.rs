//! Socket files a process owns: created only where nothing live is, removed
//! at exit only if they are still the ones this process created.
//!
//! Before binding a path: a path longer than `sun_path` holds, or in a
//! directory that does not exist, is an error that says so; a socket file
//! that accepts a connection belongs to a live process and is left alone
//! (error); a socket file that refuses connections is stale and replaced;
//! anything else at the path (a regular file, a directory, a link) is never
//! touched (error). At exit, the file is removed only if its device and
//! inode are still the ones recorded at bind time, so stopping an old
//! process never deletes the socket of a newer one at the same path. The
//! process holds an `O_PATH` descriptor of its file until it exits, so the
//! inode cannot be freed and its number reused by a newer file.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Longest socket path: `sun_path` is 108 bytes with its terminating NUL.
pub const MAX_PATH_LEN: usize = 107;

/// Why a socket path cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketFileError {
    /// The path does not fit in a Unix socket address.
    #[error(
        "socket path {path} is {len} bytes long; a Unix socket path holds at most {MAX_PATH_LEN} bytes"
    )]
    TooLong {
        /// The path.
        path: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The directory the socket would go in does not exist.
    #[error("cannot create socket {path}: directory {dir} does not exist")]
    MissingDirectory {
        /// The path.
        path: String,
        /// Its directory.
        dir: String,
    },
    /// A live process serves the path.
    #[error(
        "{0} is in use: another live process accepts connections on it (stop it, or choose another path)"
    )]
    InUse(String),
    /// Something other than a socket is at the path.
    #[error(
        "{path} exists and is {kind}, not a socket; it is left alone (remove it or choose another path)"
    )]
    NotASocket {
        /// The path.
        path: String,
        /// What is there.
        kind: &'static str,
    },
    /// The path could not be examined.
    #[error("cannot examine {0}")]
    Inspect(String, #[source] io::Error),
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale socket {0}")]
    RemoveStale(String, #[source] io::Error),
    /// bind(2), listen(2) or a permission change failed.
    #[error("cannot listen on {0}")]
    Bind(String, #[source] io::Error),
}

/// Who may connect to a socket file, beyond what the umask gives: its mode
/// and its group, set before the path appears.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions {
    /// File mode bits (e.g. `0o660`).
    pub mode: Option<u32>,
    /// Group ID of the file.
    pub group: Option<u32>,
}

impl Permissions {
    /// From the text of a mode option (octal) and a group option (name or
    /// number); on error, which of the two (`"mode"` or `"group"`) and why.
    pub fn parse(
        mode: Option<&str>,
        group: Option<&str>,
    ) -> Result<Permissions, (&'static str, String)> {
        Ok(Permissions {
            mode: mode.map(parse_mode).transpose().map_err(|e| ("mode", e))?,
            group: group
                .map(parse_group)
                .transpose()
                .map_err(|e| ("group", e))?,
        })
    }
}

/// Parses a file mode given in octal (`0660`, `660`, `0o660`), at most 0o777.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "{s:?} is not a file mode in octal (e.g. 0660), at most 0777"
        )),
    }
}

/// Parses a group given by name or number.
pub fn parse_group(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if let Ok(gid) = t.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(t).map_err(|_| format!("{s:?} is not a group name"))?;
    let mut group: libc::group = unsafe_zeroed_group();
    let mut found: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: every pointer is to a live local of the right type; `buf` is
    // large enough for a group entry (ERANGE is reported otherwise).
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no group named {t:?} on this host"));
    }
    Ok(group.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: `libc::group` is plain data (integers and pointers); all
    // zeroes is a valid value that getgrnam_r overwrites.
    unsafe { std::mem::zeroed() }
}

/// A socket file this process created: its path and identity.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// Keeps the inode (and so its number) for the life of the process.
    _hold: std::os::fd::OwnedFd,
}

/// Socket files to remove when the process exits.
static OWNED: Mutex<Vec<SocketFile>> = Mutex::new(Vec::new());

impl SocketFile {
    /// Opens `path` with `O_PATH` (no follow) and records its identity.
    fn hold(path: &Path) -> io::Result<SocketFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(path)?;
        let meta = file.metadata()?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            _hold: file.into(),
        })
    }

    /// Removes the file if it is still the one this process created.
    /// Returns whether it did.
    pub fn remove(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                std::fs::remove_file(&self.path).is_ok()
            }
            _ => false,
        }
    }
}

/// Removes every socket file this process created and still owns (at exit).
pub fn remove_owned() {
    let owned = match OWNED.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    for f in owned.iter() {
        if !f.remove() {
            tracing::info!(
                path = %f.path.display(),
                "socket path left in place: it is no longer the file this process created"
            );
        }
    }
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_block_device() || t.is_char_device() {
        "a device node"
    } else {
        "not a socket"
    }
}

/// Checks `path` and makes room for a new socket there (see the module
/// documentation).
pub fn prepare(path: &Path) -> Result<(), SocketFileError> {
    let shown = path.display().to_string();
    let len = path.as_os_str().len();
    if len > MAX_PATH_LEN {
        return Err(SocketFileError::TooLong { path: shown, len });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(SocketFileError::MissingDirectory {
            path: shown,
            dir: dir.display().to_string(),
        });
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SocketFileError::Inspect(shown, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketFileError::NotASocket {
            path: shown,
            kind: kind_of(meta.file_type()),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketFileError::InUse(shown)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %shown, "replacing a stale socket file (nothing accepts on it)");
            std::fs::remove_file(path).map_err(|e| SocketFileError::RemoveStale(shown, e))
        }
        Err(e) => Err(SocketFileError::Inspect(shown, e)),
    }
}

/// Binds and listens on `path` after [`prepare`], with the file's mode and
/// group set as `perms` asks (the socket is bound under a temporary name,
/// its mode and group set, then renamed, so the path never exists with the
/// wrong ones). The file is removed by [`remove_owned`] at exit.
pub fn bind(path: &Path, perms: Permissions) -> Result<UnixListener, SocketFileError> {
    prepare(path)?;
    let shown = || path.display().to_string();
    let listener = match perms {
        Permissions {
            mode: None,
            group: None,
        } => UnixListener::bind(path).map_err(|e| SocketFileError::Bind(shown(), e))?,
        Permissions { mode, group } => {
            use std::os::unix::fs::PermissionsExt;
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(format!(".{}.tmp", std::process::id()));
            let tmp = PathBuf::from(tmp);
            if tmp.as_os_str().len() > MAX_PATH_LEN {
                return Err(SocketFileError::TooLong {
                    path: tmp.display().to_string(),
                    len: tmp.as_os_str().len(),
                });
            }
            let _ = std::fs::remove_file(&tmp);
            let listener =
                UnixListener::bind(&tmp).map_err(|e| SocketFileError::Bind(shown(), e))?;
            group
                .map_or(Ok(()), |gid| {
                    std::os::unix::fs::chown(&tmp, None, Some(gid))
                })
                .and_then(|()| match mode {
                    Some(m) => std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m)),
                    None => Ok(()),
                })
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    SocketFileError::Bind(shown(), e)
                })?;
            listener
        }
    };
    let file = SocketFile::hold(path).map_err(|e| SocketFileError::Inspect(shown(), e))?;
    match OWNED.lock() {
        Ok(mut g) => g.push(file),
        Err(p) => p.into_inner().push(file),
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private directory, removed with its contents when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "viommu-sf-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    #[test]
    fn a_path_too_long_says_the_limit_and_the_length() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let e = bind(&long, Permissions::default()).unwrap_err();
        assert!(
            matches!(e, SocketFileError::TooLong { len: 125, .. }),
            "{e}"
        );
        assert!(
            e.to_string().contains("125 bytes") && e.to_string().contains("107"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_directory_is_named() {
        let d = dir();
        let p = d.path().join("nope/daemon.sock");
        let e = bind(&p, Permissions::default()).unwrap_err();
        assert!(matches!(e, SocketFileError::MissingDirectory { .. }), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let d = dir();
        let p = d.path().join("daemon.sock");
        std::fs::write(&p, b"keep me").unwrap();
        let e = bind(&p, Permissions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                SocketFileError::NotASocket {
                    kind: "a regular file",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let e = bind(&d.path().join("sub"), Permissions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                SocketFileError::NotASocket {
                    kind: "a directory",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let d = dir();
        let p = d.path().join("daemon.sock");
        let live = bind(&p, Permissions::default()).unwrap();
        let e = bind(&p, Permissions::default()).unwrap_err();
        assert!(matches!(e, SocketFileError::InUse(_)), "{e}");
        drop(live); // the file stays, nothing accepts: stale
        assert!(p.exists());
        let again = bind(
            &p,
            Permissions {
                mode: Some(0o660),
                group: None,
            },
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(again);
    }

    #[test]
    fn mode_and_group_are_set_before_the_path_appears() {
        let d = dir();
        let p = d.path().join("daemon.sock");
        // SAFETY: getegid has no failure mode.
        let gid = unsafe { libc::getegid() };
        let l = bind(
            &p,
            Permissions {
                mode: Some(0o640),
                group: Some(gid),
            },
        )
        .unwrap();
        let m = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o640, gid));
        drop(l);
    }

    #[test]
    fn modes_and_groups_parse_or_say_why_not() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("01777").is_err());
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(
            parse_group("no-such-group-here")
                .unwrap_err()
                .contains("no group named")
        );
    }

    #[test]
    fn removal_spares_a_newer_file_at_the_same_path() {
        let d = dir();
        let p = d.path().join("daemon.sock");
        let old_listener = bind(&p, Permissions::default()).unwrap();
        let old = SocketFile::hold(&p).unwrap();
        drop(old_listener);
        // The operator removes the old socket; a newer process binds the path.
        std::fs::remove_file(&p).unwrap();
        let newer_listener = bind(&p, Permissions::default()).unwrap();
        // The old one's exit must not delete the newer one's socket.
        assert!(!old.remove());
        assert!(p.exists());
        let newer = SocketFile::hold(&p).unwrap();
        assert!(newer.remove());
        assert!(!p.exists());
        drop(newer_listener);
    }
}
