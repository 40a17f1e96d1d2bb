//! Where the disk's bytes live (`--blk-file`): a raw image file, a block
//! device, or `null:SIZE`, which completes every request without touching
//! storage (to measure the backend's own cost, as SPDK's null bdev does).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::disk::DiskInfo;
use crate::request::SECTOR_SIZE;

/// `BLKGETSIZE64`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKSSZGET`: logical block size.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `BLKPBSZGET`: physical block size.
const BLKPBSZGET: libc::c_ulong = 0x127b;
/// `TMPFS_MAGIC` (`statfs`): tmpfs cannot zero a range in place.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// What `--blk-file` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A file or block device.
    Path(PathBuf),
    /// `null:SIZE`: no storage, `SIZE` bytes.
    Null(u64),
}

/// A `--blk-file` value or target that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The value does not parse.
    #[error("--blk-file {0:?}: expected a path or null:SIZE (SIZE in bytes, or with K, M, G or T)")]
    Spec(String),
    /// The size is not a positive multiple of 512.
    #[error("disk size {0} is not a positive multiple of 512 bytes")]
    Size(u64),
    /// Opening or probing the file failed.
    #[error("{step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file or block device.
    #[error("{0} is neither a regular file nor a block device")]
    Kind(String),
}

impl std::str::FromStr for TargetSpec {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, TargetError> {
        let Some(size) = s.strip_prefix("null:") else {
            if s.is_empty() {
                return Err(TargetError::Spec(s.into()));
            }
            return Ok(TargetSpec::Path(PathBuf::from(s)));
        };
        let (digits, unit) = match size.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            Some((i, _)) => size.split_at(i),
            None => (size, ""),
        };
        let shift = match unit {
            "" => 0,
            "K" | "k" => 10,
            "M" | "m" => 20,
            "G" | "g" => 30,
            "T" | "t" => 40,
            _ => return Err(TargetError::Spec(s.into())),
        };
        let n: u64 = digits.parse().map_err(|_| TargetError::Spec(s.into()))?;
        let bytes = n
            .checked_mul(1 << shift)
            .ok_or_else(|| TargetError::Spec(s.into()))?;
        if bytes == 0 || bytes % u64::from(SECTOR_SIZE) != 0 {
            return Err(TargetError::Size(bytes));
        }
        Ok(TargetSpec::Null(bytes))
    }
}

/// How zeroes are written: in place, or by deallocating (tmpfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// `FALLOC_FL_ZERO_RANGE`.
    ZeroRange,
    /// `FALLOC_FL_PUNCH_HOLE` (reads back as zeroes).
    PunchHole,
}

/// The storage behind the device.
#[derive(Debug)]
pub enum Backing {
    /// A file or block device: buffered descriptor, and an `O_DIRECT` one
    /// with `--direct` (used for requests whose buffers are aligned).
    File {
        /// Opened without `O_DIRECT`.
        buffered: File,
        /// Opened with `O_DIRECT`, if asked for.
        direct: Option<File>,
        /// How WRITE_ZEROES is done.
        zeroes: ZeroMode,
    },
    /// No storage.
    Null,
}

/// An opened target and what the device makes of it.
#[derive(Debug)]
pub struct Target {
    /// The storage.
    pub backing: Backing,
    /// Size, block sizes, abilities.
    pub disk: DiskInfo,
}

/// How to open the target.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// What to open.
    pub spec: TargetSpec,
    /// Open read-only and refuse writes.
    pub read_only: bool,
    /// Also open with `O_DIRECT`.
    pub direct: bool,
    /// Initial write cache (`--writeback`).
    pub writeback: bool,
}

fn ioctl_u64(f: &File, request: libc::c_ulong) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the request writes one u64 into `v`.
    if unsafe { libc::ioctl(f.as_raw_fd(), request, &mut v as *mut u64) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_u32(f: &File, request: libc::c_ulong) -> std::io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int into `v`.
    if unsafe { libc::ioctl(f.as_raw_fd(), request, &mut v as *mut libc::c_int) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v as u32)
}

fn on_tmpfs(f: &File) -> bool {
    // SAFETY: an all-zero statfs is valid plain data for fstatfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable for the call.
    unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC }
}

impl Target {
    /// Opens the target and probes it.
    pub fn open(opts: &TargetOptions) -> Result<Target, TargetError> {
        let path = match &opts.spec {
            TargetSpec::Null(bytes) => {
                return Ok(Target {
                    backing: Backing::Null,
                    disk: DiskInfo {
                        read_only: opts.read_only,
                        discard: true,
                        write_zeroes: true,
                        writeback: opts.writeback,
                        ..DiskInfo::new(bytes / u64::from(SECTOR_SIZE))
                    },
                });
            }
            TargetSpec::Path(p) => p,
        };
        let name = path.display().to_string();
        let io = |step| {
            let name = name.clone();
            move |source| TargetError::Io {
                step,
                path: name,
                source,
            }
        };
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let buffered = open(0).map_err(io("open"))?;
        let direct = if opts.direct {
            Some(open(libc::O_DIRECT).map_err(io("open with O_DIRECT"))?)
        } else {
            None
        };
        let meta = buffered.metadata().map_err(io("stat"))?;
        let kind = meta.file_type();
        let (bytes, logical, physical, zeroes) = if kind.is_block_device() {
            (
                ioctl_u64(&buffered, BLKGETSIZE64).map_err(io("BLKGETSIZE64"))?,
                ioctl_u32(&buffered, BLKSSZGET).map_err(io("BLKSSZGET"))?,
                ioctl_u32(&buffered, BLKPBSZGET).map_err(io("BLKPBSZGET"))?,
                ZeroMode::ZeroRange,
            )
        } else if kind.is_file() {
            let zeroes = if on_tmpfs(&buffered) {
                ZeroMode::PunchHole
            } else {
                ZeroMode::ZeroRange
            };
            (meta.len(), SECTOR_SIZE, SECTOR_SIZE, zeroes)
        } else {
            return Err(TargetError::Kind(name));
        };
        let logical = logical.max(SECTOR_SIZE);
        Ok(Target {
            backing: Backing::File {
                buffered,
                direct,
                zeroes,
            },
            disk: DiskInfo {
                capacity_sectors: bytes / u64::from(SECTOR_SIZE),
                read_only: opts.read_only,
                logical_block_size: logical,
                physical_block_size: physical.max(logical),
                discard: true,
                write_zeroes: true,
                writeback: opts.writeback,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_sizes_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(
            "null:1G".parse::<TargetSpec>().unwrap(),
            TargetSpec::Null(1 << 30)
        );
        assert_eq!(
            "null:4096".parse::<TargetSpec>().unwrap(),
            TargetSpec::Null(4096)
        );
        assert_eq!(
            "null:2m".parse::<TargetSpec>().unwrap(),
            TargetSpec::Null(2 << 20)
        );
        assert_eq!(
            "/dev/vdb".parse::<TargetSpec>().unwrap(),
            TargetSpec::Path("/dev/vdb".into())
        );
        for bad in [
            "null:",
            "null:1X",
            "null:0",
            "null:100",
            "",
            "null:99999999999999999999T",
        ] {
            assert!(bad.parse::<TargetSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_file_target_has_its_size_and_a_null_target_the_asked_one() {
        let dir = std::env::temp_dir().join(format!("vublk-target-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, vec![0u8; 8192 + 100]).unwrap();
        let t = Target::open(&TargetOptions {
            spec: TargetSpec::Path(img.clone()),
            read_only: true,
            direct: false,
            writeback: true,
        })
        .unwrap();
        assert_eq!(
            t.disk.capacity_sectors, 16,
            "a partial sector is not exposed"
        );
        assert!(t.disk.read_only);
        let n = Target::open(&TargetOptions {
            spec: TargetSpec::Null(1 << 20),
            read_only: false,
            direct: false,
            writeback: false,
        })
        .unwrap();
        assert_eq!(n.disk.capacity_sectors, 2048);
        assert!(matches!(n.backing, Backing::Null));
        assert!(
            Target::open(&TargetOptions {
                spec: TargetSpec::Path(dir.join("missing")),
                read_only: false,
                direct: false,
                writeback: true,
            })
            .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
