//! Guest RAM: one memfd mapped shared (the daemon maps the same file after
//! SET_MEM_TABLE), starting at guest-physical address 0, plus a bump
//! allocator for rings and request buffers.

use std::fs::File;
use std::os::fd::FromRawFd;
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

/// Guest memory as this crate maps it.
pub type Mem = GuestMemoryMmap<()>;

/// Why guest RAM could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or does not fit the address space.
    #[error("guest RAM size {0:#x} is zero or too large")]
    BadSize(u64),
    /// `memfd_create` failed.
    #[error("memfd_create failed")]
    MemfdCreate(#[source] std::io::Error),
    /// `ftruncate` of the memfd failed.
    #[error("cannot size the memfd to {size:#x} bytes")]
    Truncate {
        /// Requested size.
        size: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("cannot map the memfd")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// The bump allocator ran past the end of RAM.
    #[error("out of guest RAM: {want:#x} bytes wanted at {at:#x}, RAM ends at {end:#x}")]
    OutOfRam {
        /// Bytes requested.
        want: u64,
        /// Where the allocation would start.
        at: u64,
        /// Size of RAM.
        end: u64,
    },
    /// An alignment that is not a power of two.
    #[error("alignment {0} is not a power of two")]
    BadAlign(u64),
    /// The region has no host mapping (cannot happen for a memfd region).
    #[error("guest RAM region has no host address or file")]
    NoHostMapping,
    /// A guest address outside RAM.
    #[error("guest address {0:#x} is outside RAM")]
    Outside(u64),
}

/// Guest RAM backed by a memfd, with a bump allocator.
pub struct GuestRam {
    mem: Mem,
    size: u64,
    next: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM at guest-physical 0. Pages are
    /// allocated lazily by the kernel, so a large size is cheap.
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        if size == 0 || libc::off_t::try_from(size).is_err() {
            return Err(MemoryError::BadSize(size));
        }
        let name = c"viommu-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; the call has no
        // other memory effects.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::MemfdCreate(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else
        // owns it; the File takes sole ownership and closes it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(MemoryError::Map)?;
        Ok(GuestRam { mem, size, next: 0 })
    }

    /// The mapped memory, for reads and writes by guest-physical address.
    pub fn mem(&self) -> &Mem {
        &self.mem
    }

    /// Size of RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The region as SET_MEM_TABLE describes it (the memfd and our
    /// mapping's address as the "userspace address").
    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo, MemoryError> {
        let region = self
            .mem
            .find_region(GuestAddress(0))
            .ok_or(MemoryError::NoHostMapping)?;
        VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| MemoryError::NoHostMapping)
    }

    /// The address of `gpa` in this process (what vhost-user calls the
    /// front-end's virtual address, used by SET_VRING_ADDR).
    pub fn host_address(&self, gpa: GuestAddress) -> Result<u64, MemoryError> {
        let region = self
            .mem
            .find_region(gpa)
            .ok_or(MemoryError::Outside(gpa.0))?;
        let offset = gpa
            .checked_offset_from(region.start_addr())
            .ok_or(MemoryError::Outside(gpa.0))?;
        let base = region.as_ptr() as u64;
        Ok(base + offset)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two), zeroed.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestAddress, MemoryError> {
        if !align.is_power_of_two() {
            return Err(MemoryError::BadAlign(align));
        }
        let at = self
            .next
            .checked_add(align - 1)
            .map(|v| v & !(align - 1))
            .ok_or(MemoryError::OutOfRam {
                want: len,
                at: self.next,
                end: self.size,
            })?;
        let end = at
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or(MemoryError::OutOfRam {
                want: len,
                at,
                end: self.size,
            })?;
        self.next = end;
        self.zero(GuestAddress(at), len)?;
        Ok(GuestAddress(at))
    }

    /// First free byte of the allocator (to [`GuestRam::release_to`] later).
    pub fn mark(&self) -> u64 {
        self.next
    }

    /// Frees everything allocated since `mark`.
    pub fn release_to(&mut self, mark: u64) {
        self.next = self.next.min(mark);
    }

    /// Writes zeros over `[addr, addr + len)`.
    pub fn zero(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
        const CHUNK: [u8; 4096] = [0; 4096];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK.len() as u64);
            let at = addr.checked_add(done).ok_or(MemoryError::Outside(addr.0))?;
            self.mem
                .write_slice(&CHUNK[..n as usize], at)
                .map_err(|_| MemoryError::Outside(at.0))?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_ram_is_shared_mapped_and_allocates_aligned() {
        let mut ram = GuestRam::new(1 << 20).unwrap();
        let a = ram.alloc(10, 1).unwrap();
        let b = ram.alloc(16, 16).unwrap();
        assert_eq!(a.0, 0);
        assert_eq!(b.0, 16);
        ram.mem().write_slice(&[1, 2, 3], b).unwrap();
        let info = ram.region_info().unwrap();
        assert_eq!(info.guest_phys_addr, 0);
        assert_eq!(info.memory_size, 1 << 20);
        assert!(info.mmap_handle >= 0);
        assert_eq!(ram.host_address(b).unwrap(), info.userspace_addr + 16);
        let mark = ram.mark();
        ram.alloc(100, 8).unwrap();
        ram.release_to(mark);
        assert_eq!(ram.mark(), mark);
        assert!(matches!(
            ram.alloc(2 << 20, 8),
            Err(MemoryError::OutOfRam { .. })
        ));
        assert!(matches!(ram.alloc(1, 3), Err(MemoryError::BadAlign(3))));
        assert!(GuestRam::new(0).is_err());
    }

    #[test]
    fn the_memfd_really_backs_the_mapping() {
        let ram = GuestRam::new(1 << 16).unwrap();
        ram.mem()
            .write_slice(&[0xab; 4], GuestAddress(0x100))
            .unwrap();
        let info = ram.region_info().unwrap();
        let mut buf = [0u8; 4];
        // SAFETY: pread into a live 4-byte buffer from the memfd we own.
        let n = unsafe { libc::pread(info.mmap_handle, buf.as_mut_ptr().cast(), 4, 0x100) };
        assert_eq!(n, 4);
        assert_eq!(buf, [0xab; 4]);
    }
}
