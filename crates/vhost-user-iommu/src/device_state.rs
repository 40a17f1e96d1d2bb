//! vhost-user's device-state transfer (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`):
//! the VMM migrates the IOMMU's state with the guest.
//!
//! At `SET_DEVICE_STATE_FD` the VMM hands over one end of a pipe; the
//! bytes are the [`viommu_core::state`] snapshot format, the same as the
//! `--state-dir` journal's. Saving writes the snapshot taken at that moment;
//! loading reads until end of file. The transfer runs on a thread of its
//! own (the message must not block), and `CHECK_DEVICE_STATE` waits for it:
//! it fails when the write failed, or when the state read does not load —
//! the device is then left exactly as it was.

use std::fs::File;
use std::io::{self, Read, Write};
use std::thread::JoinHandle;

/// The largest state accepted from a VMM (a full table of 2^21 mappings
/// takes about 100 MiB).
pub const MAX_STATE_BYTES: u64 = 1 << 30;

/// A transfer under way.
#[derive(Debug)]
pub enum Transfer {
    /// Writing a snapshot to the VMM.
    Saving(JoinHandle<io::Result<()>>),
    /// Reading a state from the VMM.
    Loading(JoinHandle<io::Result<Vec<u8>>>),
}

/// What a finished transfer gave.
#[derive(Debug)]
pub enum Finished {
    /// The snapshot was written whole.
    Saved,
    /// These bytes were read (to be loaded).
    Loaded(Vec<u8>),
}

/// Starts writing `snapshot` to `file`, closing it at the end.
pub(crate) fn save(snapshot: Vec<u8>, mut file: File) -> io::Result<Transfer> {
    std::thread::Builder::new()
        .name("viommu-state-save".into())
        .spawn(move || file.write_all(&snapshot))
        .map(Transfer::Saving)
}

/// Starts reading a state from `file` until its end.
pub(crate) fn load(file: File) -> io::Result<Transfer> {
    std::thread::Builder::new()
        .name("viommu-state-load".into())
        .spawn(move || {
            let mut bytes = Vec::new();
            file.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
            if bytes.len() as u64 > MAX_STATE_BYTES {
                return Err(io::Error::other(format!(
                    "the VMM sent more than {MAX_STATE_BYTES} bytes of device state"
                )));
            }
            Ok(bytes)
        })
        .map(Transfer::Loading)
}

impl Transfer {
    /// Waits for the transfer to end.
    pub(crate) fn finish(self) -> io::Result<Finished> {
        let panicked = |_| io::Error::other("the state transfer thread panicked");
        match self {
            Transfer::Saving(t) => t.join().map_err(panicked)?.map(|()| Finished::Saved),
            Transfer::Loading(t) => t.join().map_err(panicked)?.map(Finished::Loaded),
        }
    }
}
