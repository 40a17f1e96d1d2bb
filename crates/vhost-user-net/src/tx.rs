//! Taking a frame off a guest's transmit queue: the chain's buffers, in
//! any layout (VERSION_1 implies ANY_LAYOUT: the header may be split over
//! descriptors or share one with the frame), gathered into one buffer and
//! checked. Nothing from a chain that fails a check is forwarded.

use viommu_backend::{Batch, Chain, DmaError};

use crate::header::{self, HDR_LEN, HeaderError, MIN_FRAME};

/// Why a transmitted chain is dropped.
#[derive(Debug, thiserror::Error)]
pub enum TxDrop {
    /// The chain cannot be walked (a loop, a bad index, a bad indirect
    /// table).
    #[error("malformed chain: {0}")]
    Malformed(#[from] viommu_backend::RingError),
    /// A device-writable buffer in a transmit chain.
    #[error("device-writable buffer in a transmit chain")]
    DeviceWritable,
    /// Fewer bytes than a header and an Ethernet header.
    #[error("{0} bytes: shorter than a header and an Ethernet header")]
    Runt(u64),
    /// More than the MTU allows.
    #[error("{0}-byte frame exceeds the largest frame")]
    Oversize(u64),
    /// The header asks for an offload not negotiated.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// A buffer that does not translate or lies outside guest RAM.
    #[error("buffer not accessible")]
    Dma(#[from] DmaError),
}

/// Gathers the header and frame of `chain` into `out` (header first),
/// refusing frames over `max_frame` bytes (Ethernet header included).
pub fn gather(
    batch: &Batch<'_>,
    chain: &Chain,
    max_frame: usize,
    out: &mut Vec<u8>,
) -> Result<(), TxDrop> {
    if let Some(e) = &chain.malformed {
        return Err(TxDrop::Malformed(e.clone()));
    }
    let mut total = 0u64;
    for s in &chain.segments {
        if s.writable {
            return Err(TxDrop::DeviceWritable);
        }
        total += u64::from(s.len);
    }
    if total < (HDR_LEN + MIN_FRAME) as u64 {
        return Err(TxDrop::Runt(total));
    }
    if total > (HDR_LEN + max_frame) as u64 {
        return Err(TxDrop::Oversize(total - HDR_LEN as u64));
    }
    out.resize(total as usize, 0);
    let mut at = 0usize;
    for s in &chain.segments {
        let len = s.len as usize;
        batch.read(s.addr, &mut out[at..at + len])?;
        at += len;
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr.copy_from_slice(&out[..HDR_LEN]);
    header::check_tx(&hdr)?;
    Ok(())
}
