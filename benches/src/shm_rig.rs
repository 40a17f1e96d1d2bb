//! A shared translation table set up for benchmarking: the writer, a
//! reader's view of it, and reader slot files registered the way the daemon
//! registers a backend process.

use std::error::Error;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use iotlb_shm::{
    EndpointTarget, Perms, ReaderId, SlotFile, TableReader, TableWriter, WriterConfig,
};

/// The domain every bench maps into.
pub const DOMAIN: u32 = 1;
/// The endpoint attached to [`DOMAIN`].
pub const EP: u32 = 8;
/// Read-write, RAM.
pub const RW: Perms = Perms {
    read: true,
    write: true,
    mmio: false,
};

/// A boxed error for setup code.
pub type SetupError = Box<dyn Error + Send + Sync>;

/// One registered reader: its slot file and the writer's ID for it.
#[derive(Debug)]
pub struct RegisteredReader {
    /// The slot file, opened writable as the reader process opens it.
    pub slots: Arc<SlotFile>,
    /// The writer's handle.
    pub id: ReaderId,
    /// Keeps the memfd open.
    pub fd: OwnedFd,
}

/// Writer, reader view and registered readers of one table.
#[derive(Debug)]
pub struct ShmRig {
    /// The daemon side.
    pub writer: TableWriter,
    /// A reader's read-only view (opened from the writer's fds).
    pub table: TableReader,
}

impl ShmRig {
    /// A table with the default geometry (48-bit IOVAs, 4 levels, 64 Ki
    /// endpoints), [`DOMAIN`] created and [`EP`] attached to it.
    pub fn new() -> Result<Self, SetupError> {
        let mut writer = TableWriter::new(&WriterConfig::default())?;
        writer.create_domain(DOMAIN)?;
        writer.set_endpoint(EP, EndpointTarget::Domain(DOMAIN))?;
        let table = TableReader::open(writer.table_fd(), writer.arena_fd())?;
        Ok(Self { writer, table })
    }

    /// Maps every `(iova, gpa)` as its own 4 KiB read-write mapping.
    pub fn map_pages(
        &mut self,
        pages: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<u64, SetupError> {
        let mut n = 0;
        for (iova, gpa) in pages {
            self.writer.map(DOMAIN, iova, iova + 0xfff, gpa, RW)?;
            n += 1;
        }
        Ok(n)
    }

    /// Creates a slot file with `slots` session slots and `pins` pin
    /// records, registers it for process `pid` and opens it.
    pub fn add_reader(
        &mut self,
        slots: usize,
        pins: usize,
        pid: i32,
    ) -> Result<RegisteredReader, SetupError> {
        let fd = iotlb_shm::slots::create(slots, pins)?;
        let id = self.writer.register_reader(fd.as_fd(), pid)?;
        let slots = SlotFile::open(fd.as_fd())?;
        Ok(RegisteredReader { slots, id, fd })
    }

    /// [`Self::add_reader`] for this process.
    pub fn add_local_reader(
        &mut self,
        slots: usize,
        pins: usize,
    ) -> Result<RegisteredReader, SetupError> {
        self.add_reader(slots, pins, std::process::id() as i32)
    }
}
