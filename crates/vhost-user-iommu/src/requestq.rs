//! Serving one request-queue chain: split it, gather its readable bytes,
//! let the model answer, scatter the reply into its writable part.

use crate::chain::ChainParts;
use crate::publish::{Publish, Publishing};
use crate::state_journal::{self, StateJournal};
use crate::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Instant;
use tracing::{Level, debug};
use viommu_backend::{Chain, RamAccess};
use viommu_core::state::{Applied, Record};
use viommu_core::{Device, Reply};
use virtio_iommu_proto::request::{MAX_READABLE_LEN, TAIL_LEN, encode_tail, parse_request};
use virtio_iommu_proto::{Request, RequestType, Status};

/// What became of one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// The used length to report.
    pub used_len: u32,
    /// Access taken away by this request or an earlier one of its batch
    /// awaits a grace period: complete it only after one.
    pub needs_grace: bool,
}

/// Reusable buffers for serving chains without allocating.
#[derive(Debug, Default)]
pub struct RequestServer {
    /// The chain being served.
    parts: ChainParts,
    /// Where requests are counted (the daemon's, shared across VMM
    /// connections; this server is its one writer while it serves).
    pub telemetry: Arc<Telemetry>,
    /// Requests the saved state says a previous daemon applied, by
    /// avail-ring position (empty but after a restart).
    pub applied: Vec<Applied>,
}

/// Where a chain came from and where its changes are saved.
pub struct Origin<'a> {
    /// The chain's avail-ring position.
    pub position: u16,
    /// The state journal, if the daemon keeps one.
    pub journal: &'a mut Option<StateJournal>,
}

impl RequestServer {
    /// Serves one chain taken from the request queue: its request is
    /// applied to `device` (its changes published through `publisher`) and
    /// its reply written, or it is returned with used length 0.
    pub(crate) fn serve(
        &mut self,
        chain: &Chain,
        origin: Origin<'_>,
        mem: &RamAccess,
        device: &mut Device,
        publisher: &mut dyn Publish,
    ) -> Served {
        let unused = Served {
            used_len: 0,
            needs_grace: false,
        };
        if let Some(e) = &chain.malformed {
            debug!(error = %e, "descriptor chain cannot be walked, returned with used length 0");
            self.telemetry.requests.malformed.add(1);
            return unused;
        }
        let shape = self
            .parts
            .fill(chain.segments.iter().map(|s| (s.addr, s.len, s.writable)));
        if let Err(e) = shape {
            debug!(error = %e, "malformed request chain, returned with used length 0");
            self.telemetry.requests.malformed.add(1);
            return unused;
        }
        let mut readable = [0u8; MAX_READABLE_LEN];
        let got = match self.parts.gather(mem, &mut readable) {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "request chain unreadable, returned with used length 0");
                self.telemetry.requests.malformed.add(1);
                return unused;
            }
        };
        if let Err(e) = self.parts.check_writable(mem) {
            // Nothing is applied when the reply could not be written: used
            // length 0 means the request had no effect.
            debug!(error = %e, "reply buffer outside guest memory, returned with used length 0");
            self.telemetry.requests.malformed.add(1);
            return unused;
        }
        let writable_len = usize::try_from(self.parts.writable_len()).unwrap_or(usize::MAX);
        if !self.applied.is_empty() {
            if let Some(mut served) = self.complete_applied(origin.position, &readable[..got], mem)
            {
                served.needs_grace =
                    revokes(readable.first().copied().unwrap_or(0)) && publisher.revocations_wait();
                return served;
            }
        }
        // Per-request logs cost a parse and a clock read, only at debug.
        let started = tracing::enabled!(Level::DEBUG).then(Instant::now);
        let reply = device.process(
            &readable[..got],
            writable_len,
            &mut Publishing::new(&mut *publisher),
        );
        let needs_grace = publisher.needs_grace();
        let Reply::Complete {
            status, req_type, ..
        } = reply
        else {
            debug!(
                readable = got,
                writable_len, "request not parsed, returned with used length 0"
            );
            self.telemetry.requests.unparsed.add(1);
            return Served {
                used_len: 0,
                needs_grace,
            };
        };
        let needs_grace = needs_grace || (revokes(req_type as u8) && publisher.revocations_wait());
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
        let used_len = reply.used_len();
        // The change is saved before the request can complete.
        if status == Status::Ok && req_type != RequestType::Probe {
            let record = Record::Request {
                position: Some(origin.position),
                bytes: &readable[..got],
            };
            state_journal::record(origin.journal, &record, device);
        }
        if let Err(e) = self.parts.scatter(mem, bytes) {
            debug!(error = %e, "cannot write the reply, returned with used length 0");
            self.telemetry.requests.malformed.add(1);
            return Served {
                used_len: 0,
                needs_grace,
            };
        }
        // A parsed request's type is its first byte.
        self.telemetry
            .requests
            .answered(readable.first().copied().unwrap_or(0), status);
        if let Some(started) = started {
            log_request(&readable[..got], status, started);
        }
        Served {
            used_len,
            needs_grace,
        }
    }
}

/// Whether a request of type `t` (its first byte) may take access away:
/// anything but MAP and PROBE.
fn revokes(t: u8) -> bool {
    t != RequestType::Map as u8 && t != RequestType::Probe as u8
}

impl RequestServer {
    /// Completes with OK, without applying it again, a request that a
    /// previous daemon applied (the saved state says so) but had not
    /// completed when it ended. None: not such a request.
    fn complete_applied(
        &mut self,
        position: u16,
        readable: &[u8],
        mem: &RamAccess,
    ) -> Option<Served> {
        let i = self
            .applied
            .iter()
            .position(|a| a.position == position && a.request.bytes() == readable)?;
        self.applied.remove(i);
        let used_len = match self.parts.scatter(mem, &encode_tail(Status::Ok)) {
            Ok(()) => TAIL_LEN as u32,
            Err(_) => 0,
        };
        let requests = &self.telemetry.requests;
        requests.already_applied.add(1);
        requests.answered(readable.first().copied().unwrap_or(0), Status::Ok);
        debug!(
            position,
            "request applied by the previous daemon completed without applying it again"
        );
        Some(Served {
            used_len,
            needs_grace: false,
        })
    }

    /// Keeps, of the saved requests, only those the driver can still have
    /// outstanding when its ring resumes at `next_avail`: the run at the
    /// end of the journal whose positions lie within a queue's worth from
    /// `next_avail`. Walking back from the newest, the first one before
    /// `next_avail` ends the run; older ones, even with a position that
    /// wraps into the window (2^16 requests ago), were completed.
    pub(crate) fn keep_applied_from(&mut self, next_avail: u16, size: u16) {
        let outstanding = self
            .applied
            .iter()
            .rev()
            .take_while(|a| a.position.wrapping_sub(next_avail) < size)
            .count();
        let older = self.applied.len() - outstanding;
        self.applied.drain(..older);
    }
}

/// One debug line per served request: what it asked, how it ended, how long
/// the model and the table took (the grace period, if any, comes after).
fn log_request(readable: &[u8], status: Status, started: Instant) {
    let latency_ns = started.elapsed().as_nanos() as u64;
    match parse_request(readable) {
        Ok(Request::Attach(a)) => debug!(
            request = "ATTACH", endpoint = a.endpoint, domain = a.domain,
            flags = format_args!("{:#x}", a.flags), %status, latency_ns, "request"
        ),
        Ok(Request::Detach(d)) => debug!(
            request = "DETACH", endpoint = d.endpoint, domain = d.domain,
            %status, latency_ns, "request"
        ),
        Ok(Request::Map(m)) => debug!(
            request = "MAP", domain = m.domain,
            iova = format_args!("{:#x}-{:#x}", m.virt_start, m.virt_end),
            phys = format_args!("{:#x}", m.phys_start),
            flags = format_args!("{:#x}", m.flags.0), %status, latency_ns, "request"
        ),
        Ok(Request::Unmap(u)) => debug!(
            request = "UNMAP", domain = u.domain,
            iova = format_args!("{:#x}-{:#x}", u.virt_start, u.virt_end),
            %status, latency_ns, "request"
        ),
        Ok(Request::Probe(p)) => debug!(
            request = "PROBE", endpoint = p.endpoint, %status, latency_ns, "request"
        ),
        Err(e) => debug!(error = %e, %status, latency_ns, "request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu_core::state::{Applied, RequestBytes};

    fn at(position: u16) -> Applied {
        Applied {
            position,
            request: RequestBytes::copy(&[position as u8]),
        }
    }

    fn kept(applied: &[u16], next_avail: u16, size: u16) -> Vec<u16> {
        let mut s = RequestServer {
            applied: applied.iter().map(|&p| at(p)).collect(),
            ..RequestServer::default()
        };
        s.keep_applied_from(next_avail, size);
        s.applied.iter().map(|a| a.position).collect()
    }

    #[test]
    fn only_the_journals_tail_from_the_resumed_ring_position_is_kept() {
        // Completed before the kill: nothing to skip.
        assert_eq!(kept(&[7, 8, 9], 10, 256), Vec::<u16>::new());
        // Two outstanding (positions 10 and 12; 11 changed nothing).
        assert_eq!(kept(&[8, 9, 10, 12], 10, 256), vec![10, 12]);
        // Positions wrap with the ring's free-running index.
        assert_eq!(kept(&[65534, 65535, 0, 1], 65535, 256), vec![65535, 0, 1]);
        // An old request whose position wraps into the window is older than
        // a completed one: it ends the run.
        assert_eq!(kept(&[12, 9, 10, 11], 10, 256), vec![10, 11]);
        assert_eq!(kept(&[12, 9], 10, 256), Vec::<u16>::new());
    }
}
