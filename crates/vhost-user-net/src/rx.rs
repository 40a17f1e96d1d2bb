//! Writing a frame into a guest's receive buffers: one chain per frame, or
//! with MRG_RXBUF as many chains as the frame needs, its header's
//! `num_buffers` naming how many (their used entries are consecutive).
//!
//! Chains the driver should not have posted (malformed, device-readable
//! buffers, or under MRG_RXBUF smaller than a header) are returned with
//! used length 0 before the frame's own entries. When the ring holds too
//! few buffers the chains taken are put back and the frame is dropped: a
//! switch never waits for a guest.

use viommu_backend::{Batch, Chain, DmaError, RingError, RingView};

use crate::header::{self, HDR_LEN};

/// What became of one frame.
#[derive(Debug)]
pub enum Delivery {
    /// Written into this many buffers.
    Delivered(u16),
    /// Too few receive buffers posted: dropped, nothing taken.
    NoBuffers,
    /// Without MRG_RXBUF the next buffer is too small for the frame:
    /// dropped, nothing taken.
    TooBig,
    /// A receive buffer does not translate or lies outside RAM: the
    /// frame's buffers are returned with used length 0.
    Fault(DmaError),
}

/// Reusable chains for [`deliver`].
#[derive(Debug, Default)]
pub struct RxScratch {
    chains: Vec<Chain>,
    lens: Vec<u32>,
    bad: Vec<u16>,
}

fn capacity(chain: &Chain) -> Option<u64> {
    if chain.malformed.is_some() || chain.segments.iter().any(|s| !s.writable) {
        return None;
    }
    Some(chain.segments.iter().map(|s| u64::from(s.len)).sum())
}

/// Writes `frame` (a virtio-net header, then the Ethernet frame) into the
/// receive queue; `frame`'s `num_buffers` is set here. Returns the
/// outcome and how many chains returned unused ([`RxScratch`]); only a
/// ring that cannot be read is an error (the queue stops).
pub fn deliver(
    batch: &Batch<'_>,
    view: &mut RingView<'_, Batch<'_>>,
    frame: &mut [u8],
    mrg_rxbuf: bool,
    scratch: &mut RxScratch,
) -> Result<(Delivery, usize), RingError> {
    let need = frame.len() as u64;
    let RxScratch { chains, lens, bad } = scratch;
    bad.clear();
    let mut good = 0usize;
    let mut taken = 0u16;
    let mut have = 0u64;
    while have < need && (mrg_rxbuf || good == 0) {
        if chains.len() == good {
            chains.push(Chain::default());
        }
        if !view.pop(&mut chains[good])? {
            view.rewind(taken);
            return Ok((Delivery::NoBuffers, 0));
        }
        taken = taken.wrapping_add(1);
        match capacity(&chains[good]) {
            Some(c) if !(mrg_rxbuf && c < HDR_LEN as u64) => {
                have += c;
                good += 1;
            }
            _ => bad.push(chains[good].head),
        }
    }
    if have < need {
        view.rewind(taken);
        return Ok((Delivery::TooBig, 0));
    }
    for &head in bad.iter() {
        view.push_used(head, 0);
    }
    header::set_num_buffers(frame, if mrg_rxbuf { good as u16 } else { 1 });
    lens.clear();
    let mut at = 0usize;
    let mut failed = None;
    'chains: for chain in &chains[..good] {
        let mut written = 0u32;
        for s in &chain.segments {
            if at == frame.len() {
                break;
            }
            let take = (s.len as usize).min(frame.len() - at);
            if let Err(e) = batch.write(s.addr, &frame[at..at + take]) {
                failed = Some(e);
                break 'chains;
            }
            at += take;
            written += take as u32;
        }
        lens.push(written);
    }
    let outcome = match failed {
        Some(e) => {
            for chain in &chains[..good] {
                view.push_used(chain.head, 0);
            }
            Delivery::Fault(e)
        }
        None => {
            for (chain, &len) in chains[..good].iter().zip(lens.iter()) {
                view.push_used(chain.head, len);
            }
            Delivery::Delivered(good as u16)
        }
    };
    Ok((outcome, bad.len()))
}
