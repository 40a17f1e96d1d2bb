//! A descriptor chain as the device sees it: its device-readable segments
//! followed by its device-writable segments. Bytes are gathered from and
//! scattered to those segments only, never beyond them.

use viommu_backend::RamAccess;
use viommu_backend::guest::copy_from_guest;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Why a chain cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A device-readable buffer follows a device-writable one, which the
    /// driver must never do.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Position of the offending descriptor in the chain.
        index: usize,
    },
    /// A segment is not inside guest memory (or spans two RAM regions).
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// The readable and writable segments of one chain; reused across chains
/// so the request path does not allocate.
#[derive(Debug, Default)]
pub struct ChainParts {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
}

impl ChainParts {
    /// Forgets the previous chain.
    pub fn clear(&mut self) {
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
    }

    /// Adds the next descriptor of the chain.
    pub fn push(&mut self, addr: u64, len: u32, device_writable: bool) -> Result<(), ChainError> {
        let seg = Segment { addr, len };
        if device_writable {
            self.writable.push(seg);
            self.writable_len += u64::from(len);
        } else if !self.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable {
                index: self.readable.len() + self.writable.len(),
            });
        } else {
            self.readable.push(seg);
            self.readable_len += u64::from(len);
        }
        Ok(())
    }

    /// Forgets the previous chain and takes `segments` in: the descriptors
    /// of one chain as `(addr, len, device_writable)`.
    pub fn fill(
        &mut self,
        segments: impl IntoIterator<Item = (u64, u32, bool)>,
    ) -> Result<(), ChainError> {
        self.clear();
        for (addr, len, writable) in segments {
            self.push(addr, len, writable)?;
        }
        Ok(())
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Copies the first readable bytes into `buf` (as many as fit) and
    /// returns how many were copied. Every readable segment must lie in
    /// guest memory as a whole, even beyond the bytes copied.
    pub fn gather(&self, mem: &RamAccess, buf: &mut [u8]) -> Result<usize, ChainError> {
        let mut done = 0usize;
        for seg in &self.readable {
            let src = mem
                .host(seg.addr, u64::from(seg.len))
                .map_err(|_| outside(seg))?;
            let take = (buf.len() - done).min(seg.len as usize);
            // SAFETY: `src` starts `seg.len` bytes of mapped guest RAM
            // (checked by `host`, kept mapped by `mem`) and `take <=
            // seg.len`.
            unsafe { copy_from_guest(src, &mut buf[done..done + take]) };
            done += take;
        }
        Ok(done)
    }

    /// Checks that every writable segment lies in guest memory, so that a
    /// request is applied only when its reply can be written.
    pub fn check_writable(&self, mem: &RamAccess) -> Result<(), ChainError> {
        for seg in &self.writable {
            mem.host(seg.addr, u64::from(seg.len))
                .map_err(|_| outside(seg))?;
        }
        Ok(())
    }

    /// Writes `data` at the start of the writable part. The caller keeps
    /// `data` no longer than the writable part; every segment it touches is
    /// checked before anything is written, so a bad address writes nothing.
    pub fn scatter(&self, mem: &RamAccess, data: &[u8]) -> Result<(), ChainError> {
        let mut left = data.len();
        for seg in &self.writable {
            if left == 0 {
                break;
            }
            let take = left.min(seg.len as usize);
            mem.host(seg.addr, take as u64).map_err(|_| outside(seg))?;
            left -= take;
        }
        let mut done = 0usize;
        for seg in &self.writable {
            if done == data.len() {
                break;
            }
            let take = (data.len() - done).min(seg.len as usize);
            mem.write(seg.addr, &data[done..done + take])
                .map_err(|_| outside(seg))?;
            done += take;
        }
        Ok(())
    }
}

fn outside(seg: &Segment) -> ChainError {
    ChainError::OutsideMemory {
        addr: seg.addr,
        len: seg.len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn mem() -> RamAccess {
        RamAccess::new(Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap(),
        ))
    }

    #[test]
    fn gather_and_scatter_cross_segments_in_order() {
        let m = mem();
        m.write(0x1000, &[1, 2, 3]).unwrap();
        m.ram()
            .write_slice(&[4, 5, 6, 7], GuestAddress(0x2000))
            .unwrap();
        let mut c = ChainParts::default();
        c.push(0x1000, 3, false).unwrap();
        c.push(0x2000, 4, false).unwrap();
        c.push(0x3000, 2, true).unwrap();
        c.push(0x3800, 8, true).unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (7, 10));
        let mut buf = [0u8; 5];
        assert_eq!(c.gather(&m, &mut buf).unwrap(), 5);
        assert_eq!(buf, [1, 2, 3, 4, 5]);
        let mut big = [0u8; 72];
        assert_eq!(c.gather(&m, &mut big).unwrap(), 7);
        c.scatter(&m, &[9, 8, 7, 6]).unwrap();
        let mut out = [0u8; 2];
        m.read(0x3000, &mut out).unwrap();
        assert_eq!(out, [9, 8]);
        m.read(0x3800, &mut out).unwrap();
        assert_eq!(out, [7, 6]);
    }

    #[test]
    fn readable_after_writable_is_refused() {
        let mut c = ChainParts::default();
        c.push(0x1000, 4, true).unwrap();
        assert_eq!(
            c.push(0x1000, 4, false),
            Err(ChainError::ReadableAfterWritable { index: 1 })
        );
    }

    #[test]
    fn nothing_is_written_when_a_later_segment_is_outside_memory() {
        let m = mem();
        let mut c = ChainParts::default();
        c.push(0x1000, 2, true).unwrap();
        c.push(0x9000_0000, 2, true).unwrap();
        assert!(c.scatter(&m, &[0xee; 4]).is_err());
        let mut out = [0u8; 2];
        m.read(0x1000, &mut out).unwrap();
        assert_eq!(out, [0, 0]);
        let mut r = ChainParts::default();
        r.push(0x9000_0000, 4, false).unwrap();
        assert!(r.gather(&m, &mut [0u8; 4]).is_err());
    }
}
