//! Serving one request-queue chain: split it, gather its readable bytes,
//! let the model answer, scatter the reply into its writable part.

use crate::chain::{ChainError, ChainParts};
use crate::publish::{Publishing, TablePublisher};
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::debug;
use viommu_core::{Device, Reply};
use virtio_iommu_proto::request::MAX_READABLE_LEN;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// What became of one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// The used length to report.
    pub used_len: u32,
    /// The request narrowed access: complete it only after a grace period.
    pub needs_grace: bool,
}

/// Counters for the request queue.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Requests answered with a status.
    pub completed: AtomicU64,
    /// Chains returned with used length 0 (unparseable, unknown type).
    pub unparsed: AtomicU64,
    /// Chains refused for their shape (readable after writable, outside
    /// guest memory).
    pub malformed: AtomicU64,
    /// Requests answered with a status other than OK.
    pub failed: AtomicU64,
}

/// Reusable buffers for serving chains without allocating.
#[derive(Debug, Default)]
pub struct RequestServer {
    /// The chain being served.
    pub parts: ChainParts,
    /// Counters.
    pub stats: RequestStats,
}

impl RequestServer {
    /// Serves the chain whose descriptors were pushed into `self.parts`
    /// (`shape` is the result of pushing them).
    pub fn serve<M: GuestMemory + Bytes<GuestAddress>>(
        &mut self,
        shape: Result<(), ChainError>,
        mem: &M,
        device: &mut Device,
        publisher: &mut dyn TablePublisher,
    ) -> Served {
        let unused = Served {
            used_len: 0,
            needs_grace: false,
        };
        if let Err(e) = shape {
            debug!(error = %e, "malformed request chain, returned with used length 0");
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return unused;
        }
        let mut readable = [0u8; MAX_READABLE_LEN];
        let got = match self.parts.gather(mem, &mut readable) {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "request chain unreadable, returned with used length 0");
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return unused;
            }
        };
        let writable_len = usize::try_from(self.parts.writable_len()).unwrap_or(usize::MAX);
        let mut sink = Publishing::new(publisher);
        let reply = device.process(&readable[..got], writable_len, &mut sink);
        let needs_grace = sink.needs_grace;
        let Reply::Complete {
            req_type, status, ..
        } = reply
        else {
            debug!(
                readable = got,
                writable_len, "request not parsed, returned with used length 0"
            );
            self.stats.unparsed.fetch_add(1, Ordering::Relaxed);
            return Served {
                used_len: 0,
                needs_grace,
            };
        };
        // MAP/UNMAP and friends write only the 4-byte tail: no allocation.
        let (tail_only, whole);
        let bytes: &[u8] = match reply.tail() {
            Some((0, tail)) => {
                tail_only = tail;
                &tail_only
            }
            _ => {
                whole = reply.to_bytes();
                &whole
            }
        };
        if let Err(e) = self.parts.scatter(mem, bytes) {
            debug!(error = %e, "cannot write the reply, returned with used length 0");
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return Served {
                used_len: 0,
                needs_grace,
            };
        }
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        if status != virtio_iommu_proto::Status::Ok {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            debug!(request = req_type.name(), %status, "request failed");
        }
        Served {
            used_len: reply.used_len(),
            needs_grace,
        }
    }
}
