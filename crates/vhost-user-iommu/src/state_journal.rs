//! The device's state kept across daemon restarts (`--state-dir`).
//!
//! `DIR/device-state` holds a [`viommu_core::state`] journal: a snapshot of
//! the device when the journal started, then one record per change,
//! written through a shared mapping of the file before the request that
//! made the change completes. The kernel's page cache keeps every byte the
//! process wrote however the process ends (`SIGKILL` included), so a daemon
//! started again on the same directory carries on with the guest's
//! endpoints, domains and mappings.
//!
//! A fresh snapshot replaces the file (written beside it, then renamed over
//! it, so the file is always whole) when a VMM connects with a fresh
//! device, and when the journal has grown to several times the snapshot's
//! size. If the journal cannot be written, the file is removed and
//! persistence stops (logged): a restart then begins with a fresh device,
//! never with a state that misses a change — an UNMAP forgotten by the
//! journal would come back as a live mapping.

use memmap2::{Advice, MmapMut, MmapOptions};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use tracing::{error, info};
use viommu_core::state::{
    self, Applied, MAX_RECORD_LEN, Record, Restored, StateError, encode_record, fingerprint,
};
use viommu_core::{Device, DeviceConfig};

/// The journal's file name inside the state directory.
pub const FILE_NAME: &str = "device-state";
/// The file grows by this much at a time.
const GROW: u64 = 1 << 20;
/// Address space mapped for the file at once (never touched beyond the
/// file's end), so growing it needs no new mapping.
const RESERVE: u64 = 4 << 30;
/// A journal smaller than this is never rewritten for its size.
const COMPACT_MIN: usize = 64 << 20;
/// A journal is rewritten when it is this many times its last snapshot.
const COMPACT_FACTOR: usize = 4;

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateStoreError {
    /// The directory cannot be created.
    #[error("cannot create the state directory {0}")]
    CreateDir(PathBuf, #[source] io::Error),
    /// The saved state cannot be read.
    #[error("cannot read the saved device state {0}")]
    Read(PathBuf, #[source] io::Error),
    /// The saved state is not one this device can load.
    #[error(
        "refusing the saved device state {path}: move it away to start with a fresh device \
         (the guest then loses its IOMMU mappings)"
    )]
    Refused {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: StateError,
    },
    /// The journal cannot be written.
    #[error("cannot write the device state {0}")]
    Write(PathBuf, #[source] io::Error),
    /// Another daemon keeps its state in the same directory.
    #[error(
        "the state directory {0} is in use by another vhost-user-iommu daemon (one directory \
         per daemon)"
    )]
    InUse(PathBuf),
    /// The directory's lock cannot be taken.
    #[error("cannot lock the state directory {0}")]
    Lock(PathBuf, #[source] io::Error),
}

/// The state directory, held for as long as the value lives: a second
/// daemon pointed at the same directory is refused instead of writing the
/// same journal.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes `dir` (creating it) for this process alone.
pub(crate) fn lock(dir: &Path) -> Result<DirLock, StateStoreError> {
    use std::os::fd::AsRawFd;
    fs::create_dir_all(dir).map_err(|e| StateStoreError::CreateDir(dir.to_path_buf(), e))?;
    let path = dir.join("lock");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StateStoreError::Lock(path.clone(), e))?;
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::WouldBlock {
            StateStoreError::InUse(dir.to_path_buf())
        } else {
            StateStoreError::Lock(path, e)
        });
    }
    Ok(DirLock { _file: f })
}

/// Reads the state saved in `dir`, if any, and rebuilds the device from it.
/// `Ok(None)`: nothing saved (no file, or an empty one).
pub(crate) fn load(dir: &Path, cfg: &DeviceConfig) -> Result<Option<Restored>, StateStoreError> {
    let path = dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateStoreError::Read(path, e)),
    };
    if bytes.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    state::restore(cfg.clone(), &bytes)
        .map(Some)
        .map_err(|source| StateStoreError::Refused { path, source })
}

/// The journal being written.
pub struct StateJournal {
    dir: PathBuf,
    file: File,
    /// The file, mapped with room to grow ([`RESERVE`]).
    map: MmapMut,
    /// The file's size: the end of what may be written.
    size: usize,
    /// Bytes written (header and records).
    len: usize,
    /// The next record's index.
    index: u64,
    fingerprint: u64,
    /// Rewrite the journal once it is longer than this.
    compact_at: usize,
}

impl std::fmt::Debug for StateJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateJournal")
            .field("dir", &self.dir)
            .field("len", &self.len)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StateStoreError + '_ {
    move |e| StateStoreError::Write(path.to_path_buf(), e)
}

impl StateJournal {
    /// Starts a journal in `dir` from `device`'s state, replacing what was
    /// saved there.
    pub(crate) fn start(dir: &Path, device: &Device) -> Result<Self, StateStoreError> {
        fs::create_dir_all(dir).map_err(|e| StateStoreError::CreateDir(dir.to_path_buf(), e))?;
        // Undelivered faults are not journaled: a report, not state the guest
        // relies on (they travel with a migration's snapshot).
        let (snapshot, records) = state::journal_start(device);
        let path = dir.join(FILE_NAME);
        let fresh = dir.join(format!("{FILE_NAME}.new"));
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&fresh)
            .map_err(io_error(&fresh))?;
        f.write_all(&snapshot).map_err(io_error(&fresh))?;
        fs::rename(&fresh, &path).map_err(io_error(&path))?;
        Self::open(dir, f, snapshot.len(), records, device.config())
    }

    /// Goes on writing the journal in `dir` that `restored` was read from.
    pub(crate) fn resume(
        dir: &Path,
        restored: &Restored,
        cfg: &DeviceConfig,
    ) -> Result<Self, StateStoreError> {
        let path = dir.join(FILE_NAME);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        let mut journal = Self::open(dir, f, restored.valid_len, restored.records, cfg)?;
        // A torn last record is overwritten by the next one; zero it so the
        // file never holds a bad record followed by good ones.
        let end = journal.size;
        journal.map[restored.valid_len..end].fill(0);
        Ok(journal)
    }

    fn open(
        dir: &Path,
        file: File,
        len: usize,
        index: u64,
        cfg: &DeviceConfig,
    ) -> Result<Self, StateStoreError> {
        let path = dir.join(FILE_NAME);
        let size = file.metadata().map_err(io_error(&path))?.len();
        let want = (len as u64 + MAX_RECORD_LEN as u64).next_multiple_of(GROW);
        let size = size.max(want);
        file.set_len(size).map_err(io_error(&path))?;
        let map = map_reserved(&file, size).map_err(io_error(&path))?;
        populate(&map, 0, size as usize);
        Ok(StateJournal {
            dir: dir.to_path_buf(),
            file,
            map,
            size: size as usize,
            len,
            index,
            fingerprint: fingerprint(cfg),
            compact_at: COMPACT_MIN.max(COMPACT_FACTOR * len),
        })
    }

    /// Starts the journal anew from `device` (a device replaced as a
    /// whole). None if that failed: persistence stops (logged).
    pub(crate) fn restart(mut self, device: &Device) -> Option<Self> {
        match Self::start(&self.dir, device) {
            Ok(j) => Some(j),
            Err(e) => {
                self.abandon(&e);
                None
            }
        }
    }

    /// Bytes of state written.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    /// Appends `record`, a change `device` has just made. Returns false
    /// when the journal failed: it is gone from the directory and must be
    /// dropped (persistence stops).
    #[must_use]
    pub(crate) fn append(&mut self, record: &Record<'_>, device: &Device) -> bool {
        match self.try_append(record, device) {
            Ok(()) => true,
            Err(e) => {
                self.abandon(&e);
                false
            }
        }
    }

    fn try_append(&mut self, record: &Record<'_>, device: &Device) -> Result<(), StateStoreError> {
        if self.len + MAX_RECORD_LEN > self.size {
            self.grow()?;
        }
        let n = encode_record(
            self.index,
            self.fingerprint,
            record,
            &mut self.map[self.len..self.size],
        );
        self.len += n;
        self.index += 1;
        if self.len > self.compact_at {
            let before = self.len;
            *self = Self::start(&self.dir, device)?;
            info!(
                before,
                after = self.len,
                "device state journal rewritten as a snapshot"
            );
        }
        Ok(())
    }

    /// Makes the file longer by [`GROW`], its new pages allocated now
    /// rather than at a page fault per page on the request path.
    fn grow(&mut self) -> Result<(), StateStoreError> {
        let path = self.dir.join(FILE_NAME);
        let size = self.size as u64 + GROW;
        self.file.set_len(size).map_err(io_error(&path))?;
        if size > self.map.len() as u64 {
            self.map = map_reserved(&self.file, size).map_err(io_error(&path))?;
        }
        populate(&self.map, self.size, GROW as usize);
        self.size = size as usize;
        Ok(())
    }

    /// Stops persisting after a failure: removes the file so that no
    /// restart loads a state that misses a change.
    fn abandon(&mut self, e: &StateStoreError) {
        let path = self.dir.join(FILE_NAME);
        let removed = fs::remove_file(&path);
        error!(
            error = %vhost_user_process::report(e),
            file = %path.display(),
            removed = removed.is_ok(),
            "the device state can no longer be saved: removed, so a restart starts with a \
             fresh device; the running guest is not affected"
        );
    }
}

/// Maps `file` (now `size` bytes) with [`RESERVE`] bytes of room, or
/// twice its size if that is more.
fn map_reserved(file: &File, size: u64) -> io::Result<MmapMut> {
    let reserve = usize::try_from(RESERVE.max(size * 2)).unwrap_or(usize::MAX);
    // SAFETY: the file is this process's own journal; nothing else is
    // meant to change its size (the state directory is the daemon's). The
    // mapping reaches past the file's end, but only bytes below `size`
    // (kept at or below the file's length) are ever touched.
    unsafe { MmapOptions::new().len(reserve).map_mut(file) }
}

/// Allocates the pages of `map[offset..offset + len]` now. Best effort: a
/// kernel without `MADV_POPULATE_WRITE` (before 5.14) faults them in later.
fn populate(map: &MmapMut, offset: usize, len: usize) {
    let _ = map.advise_range(Advice::PopulateWrite, offset, len);
}

/// A device to serve, with where its changes are saved and what the saved
/// state says was applied but maybe not completed.
#[derive(Debug)]
pub struct Resumed {
    /// The device.
    pub device: Device,
    /// Its journal, if the daemon keeps one.
    pub journal: Option<StateJournal>,
    /// Requests applied by the previous daemon, by ring position.
    pub applied: Vec<Applied>,
    /// The device was rebuilt from a saved state (not a fresh one).
    pub restored: bool,
}

impl Resumed {
    /// A fresh device, saved nowhere.
    pub(crate) fn fresh(device: Device) -> Self {
        Resumed {
            device,
            journal: None,
            applied: Vec::new(),
            restored: false,
        }
    }
}

/// Appends to `journal`, dropping it if that fails.
pub(crate) fn record(journal: &mut Option<StateJournal>, record: &Record<'_>, device: &Device) {
    if let Some(j) = journal {
        if !j.append(record, device) {
            *journal = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu_core::NullSink;
    use virtio_iommu_proto::{Attach, Features, Map, MapFlags, Request};

    fn dir(name: &str) -> PathBuf {
        viommu_test_support::scratch::dir("viommu-state", name)
    }

    fn attached(d: &mut Device) -> Vec<Vec<u8>> {
        let f = d.offered_features();
        d.set_features(f, &mut NullSink).expect("offered");
        let reqs = [
            Request::Attach(Attach {
                domain: 1,
                endpoint: 8,
                flags: 0,
                reserved: [0; 4],
            }),
            Request::Map(Map {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0x8000,
                flags: MapFlags::READ,
            }),
        ];
        reqs.iter()
            .map(|r| {
                assert_eq!(d.handle(r, &mut NullSink), virtio_iommu_proto::Status::Ok);
                r.encode()
            })
            .collect()
    }

    #[test]
    fn appended_changes_are_there_for_the_next_daemon() {
        let dir = dir("appended");
        let cfg = DeviceConfig::default();
        assert!(load(&dir, &cfg).expect("nothing saved").is_none());
        let mut d = Device::new(cfg.clone()).expect("valid");
        let mut j = StateJournal::start(&dir, &d).expect("starts");
        let f = d.offered_features();
        let bytes = attached(&mut d);
        assert!(j.append(&Record::Features(f.0), &d));
        for (i, b) in bytes.iter().enumerate() {
            assert!(j.append(
                &Record::Request {
                    position: Some(i as u16),
                    bytes: b
                },
                &d
            ));
        }
        // The process "dies" here: nothing is flushed or closed on purpose.
        std::mem::forget(j);
        let r = load(&dir, &cfg).expect("loads").expect("saved");
        assert_eq!(r.device.mapping_count(), 1);
        assert_eq!(r.device.negotiated_features(), Features(f.0));
        assert_eq!(r.applied.len(), 2);

        // The next daemon goes on appending after what it read.
        let mut j = StateJournal::resume(&dir, &r, &cfg).expect("resumes");
        let mut d = r.device;
        d.reset(&mut NullSink);
        assert!(j.append(&Record::Reset, &d));
        drop(j);
        let r = load(&dir, &cfg).expect("loads").expect("saved");
        assert_eq!(r.device.mapping_count(), 0);
        assert_eq!(r.device.negotiated_features(), Features(0));
    }

    #[test]
    fn the_journal_grows_past_its_first_megabyte() {
        let dir = dir("grows");
        let cfg = DeviceConfig::default();
        let mut d = Device::new(cfg.clone()).expect("valid");
        let mut j = StateJournal::start(&dir, &d).expect("starts");
        let f = d.offered_features();
        d.set_features(f, &mut NullSink).expect("offered");
        assert!(j.append(&Record::Features(f.0), &d));
        let attach = Request::Attach(Attach {
            domain: 1,
            endpoint: 8,
            flags: 0,
            reserved: [0; 4],
        });
        assert_eq!(
            d.handle(&attach, &mut NullSink),
            virtio_iommu_proto::Status::Ok
        );
        assert!(j.append(
            &Record::Request {
                position: None,
                bytes: &attach.encode()
            },
            &d
        ));
        for i in 0..40_000u64 {
            let m = Request::Map(Map {
                domain: 1,
                virt_start: i << 12,
                virt_end: (i << 12) | 0xfff,
                phys_start: 0x10_0000,
                flags: MapFlags::READ,
            });
            if (i << 12) >= 0xfee0_0000 {
                break;
            }
            assert_eq!(d.handle(&m, &mut NullSink), virtio_iommu_proto::Status::Ok);
            assert!(j.append(
                &Record::Request {
                    position: None,
                    bytes: &m.encode()
                },
                &d
            ));
        }
        assert!(j.len() > 2 << 20);
        drop(j);
        let r = load(&dir, &cfg).expect("loads").expect("saved");
        assert_eq!(r.device.mapping_count(), 40_000);
    }

    #[test]
    fn a_corrupt_state_is_refused_with_its_path() {
        let dir = dir("corrupt");
        let cfg = DeviceConfig::default();
        let mut d = Device::new(cfg.clone()).expect("valid");
        let mut j = StateJournal::start(&dir, &d).expect("starts");
        let bytes = attached(&mut d);
        assert!(j.append(&Record::Features(d.negotiated_features().0), &d));
        for b in &bytes {
            assert!(j.append(
                &Record::Request {
                    position: None,
                    bytes: b
                },
                &d
            ));
        }
        drop(j);
        let path = &dir.join(FILE_NAME);
        let mut raw = fs::read(path).expect("written");
        raw[40] ^= 0xff;
        fs::write(path, &raw).expect("writable");
        let e = load(&dir, &cfg).expect_err("corrupt");
        let text = vhost_user_process::report(&e);
        assert!(text.contains("device-state"), "{text}");
        assert!(text.contains("corrupt"), "{text}");
        // A state of another configuration is refused too.
        raw[40] ^= 0xff;
        fs::write(path, &raw).expect("writable");
        let mut other = cfg;
        other.limits.max_domains = 7;
        assert!(matches!(
            load(&dir, &other),
            Err(StateStoreError::Refused {
                source: StateError::Foreign { .. },
                ..
            })
        ));
    }
}
