//! The device's state as bytes: saved so that a restarted daemon, or the
//! destination of a migration, carries on where the last one stopped.
//!
//! A state is a 32-byte header followed by records. Every record is
//! checked: its own checksum covers its bytes, its place in the file and
//! the configuration it was written for, so a truncated, reordered,
//! corrupted or foreign state is refused as a whole — [`restore`] builds a
//! fresh [`Device`] and hands it out only once every record applied.
//!
//! Two kinds share the format:
//! - a **snapshot** ([`snapshot`]) ends with an `End` record that counts
//!   the records before it; a snapshot without it is truncated.
//! - a **journal** starts as a snapshot without `End`, and grows by one
//!   record per change ([`encode_record`]): the daemon appends to a mapped
//!   file, so a process killed at any instant leaves every record it wrote
//!   whole, and at most the one it was writing torn. A torn last record is
//!   dropped (its request was never completed); anything else is refused.
//!
//! Records replay through the model's own entry points (features, config
//! writes, requests, resets), so a restored device is one the model itself
//! reached, never an assembly of fields.

use crate::change::{ChangeSink, NullSink};
use crate::config::DeviceConfig;
use crate::device::Device;
use crate::reply::Reply;
use virtio_iommu_proto::fault::FAULT_RECORD_LEN;
use virtio_iommu_proto::request::{MAX_READABLE_LEN, TAIL_LEN, VIRTIO_IOMMU_ATTACH_F_BYPASS};
use virtio_iommu_proto::{Attach, FaultRecord, Features, Map, Request, Status};

/// The first eight bytes of every state.
pub const MAGIC: [u8; 8] = *b"VIOMMUST";
/// The format's version; any other is refused.
pub const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 32;
/// Bytes of a record's fixed part (before its payload).
const RECORD_HEAD_LEN: usize = 8;
/// The largest record: head, the longest request, padding, checksum.
pub const MAX_RECORD_LEN: usize = RECORD_HEAD_LEN + MAX_READABLE_LEN.next_multiple_of(8) + 8;

/// What a state file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A complete state ending with `End`.
    Snapshot = 1,
    /// A snapshot's records followed by appended changes, without `End`.
    Journal = 2,
}

/// One step of the device's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// The negotiated features and the `bypass` byte, as they are: the
    /// first record of a snapshot.
    Base {
        /// Feature bits the driver acked.
        negotiated: u64,
        /// The config space's `bypass` byte.
        bypass: u8,
    },
    /// The driver acked these features (SET_FEATURES).
    Features(u64),
    /// The driver wrote the config space.
    Config {
        /// Offset of the write.
        offset: u16,
        /// The byte written.
        value: u8,
    },
    /// A request that changed the state (answered OK), as the driver's
    /// readable bytes. `position` is its place in the request queue's avail
    /// ring, when it came from there.
    Request {
        /// Avail-ring position of the chain (free-running, mod 2^16).
        position: Option<u16>,
        /// The request's readable bytes.
        bytes: &'a [u8],
    },
    /// A device reset.
    Reset,
    /// A system reset.
    SystemReset,
    /// A fault record the driver has not been given yet (the event queue
    /// had no buffer for it), in its wire format.
    Fault(&'a [u8]),
    /// The end of a snapshot: how many records came before it.
    End {
        /// Records before this one.
        records: u64,
    },
}

const KIND_BASE: u8 = 1;
const KIND_FEATURES: u8 = 2;
const KIND_CONFIG: u8 = 3;
const KIND_REQUEST: u8 = 4;
const KIND_RESET: u8 = 5;
const KIND_SYSTEM_RESET: u8 = 6;
const KIND_END: u8 = 7;
const KIND_FAULT: u8 = 8;

/// Why a state was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Shorter than a header.
    #[error("the state is {0} bytes, shorter than its 32-byte header")]
    Truncated(usize),
    /// Not a state.
    #[error("not a vhost-user-iommu device state (bad magic)")]
    Magic,
    /// A version this build does not read.
    #[error("state format version {found}, this daemon reads version {VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// Neither a snapshot nor a journal.
    #[error("unknown state kind {0}")]
    Kind(u32),
    /// The header's checksum does not match.
    #[error("the state's header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// Saved by a device configured differently.
    #[error(
        "the state was saved by a device configured differently (configuration fingerprint \
         {found:#018x}, this device's is {expected:#018x}): endpoints, reserved regions, page \
         sizes, ranges, features and limits must be the same"
    )]
    Foreign {
        /// The state's fingerprint.
        found: u64,
        /// This configuration's.
        expected: u64,
    },
    /// A record that fails its checksum, cannot be decoded, or is cut off,
    /// where that cannot be a torn last append.
    #[error("record {index} at byte {offset} is corrupt: {why}")]
    Corrupt {
        /// The record's index.
        index: u64,
        /// Its byte offset.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// A snapshot without its `End` record.
    #[error("the snapshot ends after {records} records without its end record (truncated)")]
    MissingEnd {
        /// Records read.
        records: u64,
    },
    /// A record the model refuses: the state does not describe anything
    /// this device can reach.
    #[error("record {index} does not apply to the device: {why}")]
    Inapplicable {
        /// The record's index.
        index: u64,
        /// What the model said.
        why: String,
    },
}

/// A 64-bit mix of 8-byte words (not cryptographic: it catches corruption
/// and misplaced records, not a forger).
#[derive(Clone, Copy)]
struct Check(u64);

impl Check {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    fn new(seed: u64) -> Self {
        Check(seed ^ 0x5156_4d4d_4f49_5653)
    }

    fn word(self, w: u64) -> Self {
        Check((self.0 ^ w).wrapping_mul(Self::K).rotate_left(29))
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self = self.word(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self = self.word(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
        self
    }

    fn finish(self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

/// A fingerprint of everything in `cfg` that a state depends on. Two
/// daemons load each other's states only if their fingerprints match.
pub fn fingerprint(cfg: &DeviceConfig) -> u64 {
    let mut c = Check::new(u64::from(VERSION))
        .word(cfg.offered_features().0)
        .bytes(&cfg.initial_config_space().to_bytes())
        .word(u64::from(cfg.limits.max_domains))
        .word(u64::from(cfg.limits.max_mappings))
        .word(u64::from(cfg.limits.max_mappings_per_domain))
        .word(cfg.endpoints.len() as u64);
    for r in &cfg.endpoints {
        c = c
            .word(u64::from(r.first) | u64::from(r.last) << 32)
            .word(r.resv.len() as u64);
        for m in &r.resv {
            c = c.word(m.start).word(m.end).word(m.subtype as u64);
        }
    }
    c.finish()
}

/// The header of a state of `kind` for a device whose configuration has
/// `fingerprint`.
pub fn header(kind: Kind, fingerprint: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
    h[16..24].copy_from_slice(&fingerprint.to_le_bytes());
    let check = Check::new(fingerprint).bytes(&h[..24]).finish();
    h[24..32].copy_from_slice(&check.to_le_bytes());
    h
}

/// Encodes record number `index` of a state for `fingerprint` into `out`
/// (at least [`MAX_RECORD_LEN`] bytes) and returns its length, a multiple
/// of 8. A request longer than [`MAX_READABLE_LEN`] is cut to it.
pub fn encode_record(index: u64, fingerprint: u64, record: &Record<'_>, out: &mut [u8]) -> usize {
    let mut small = [0u8; 9];
    let (kind, aux, payload): (u8, u32, &[u8]) = match *record {
        Record::Base { negotiated, bypass } => {
            small[..8].copy_from_slice(&negotiated.to_le_bytes());
            small[8] = bypass;
            (KIND_BASE, 0, &small[..9])
        }
        Record::Features(f) => {
            small[..8].copy_from_slice(&f.to_le_bytes());
            (KIND_FEATURES, 0, &small[..8])
        }
        Record::Config { offset, value } => {
            small[0] = value;
            (KIND_CONFIG, u32::from(offset), &small[..1])
        }
        Record::Request { position, bytes } => {
            let aux = position.map_or(0, |p| 0x1_0000 | u32::from(p));
            (
                KIND_REQUEST,
                aux,
                &bytes[..bytes.len().min(MAX_READABLE_LEN)],
            )
        }
        Record::Fault(bytes) => (KIND_FAULT, 0, &bytes[..bytes.len().min(FAULT_RECORD_LEN)]),
        Record::Reset => (KIND_RESET, 0, &small[..0]),
        Record::SystemReset => (KIND_SYSTEM_RESET, 0, &small[..0]),
        Record::End { records } => {
            small[..8].copy_from_slice(&records.to_le_bytes());
            (KIND_END, 0, &small[..8])
        }
    };
    let len = payload.len();
    let body = RECORD_HEAD_LEN + len.next_multiple_of(8);
    let mut head = [0u8; RECORD_HEAD_LEN];
    head[0] = len as u8;
    head[1] = kind;
    head[4..8].copy_from_slice(&aux.to_le_bytes());
    out[..RECORD_HEAD_LEN].copy_from_slice(&head);
    out[RECORD_HEAD_LEN..RECORD_HEAD_LEN + len].copy_from_slice(payload);
    out[RECORD_HEAD_LEN + len..body].fill(0);
    let check = Check::new(fingerprint ^ index.rotate_left(17))
        .bytes(&out[..body])
        .finish();
    out[body..body + 8].copy_from_slice(&check.to_le_bytes());
    body + 8
}

/// One record read back, with where it lies.
struct Decoded<'a> {
    record: Record<'a>,
    len: usize,
}

/// Decodes the record at `bytes` (its index `index`). `Ok(None)`: the
/// bytes are zero here (the end of a journal).
fn decode_record<'a>(
    bytes: &'a [u8],
    index: u64,
    offset: usize,
    fingerprint: u64,
) -> Result<Option<Decoded<'a>>, StateError> {
    let corrupt = |why| StateError::Corrupt { index, offset, why };
    if bytes.len() < RECORD_HEAD_LEN {
        return if bytes.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err(corrupt("cut off inside its head"))
        };
    }
    let (len, kind) = (usize::from(bytes[0]), bytes[1]);
    if kind == 0 && bytes[..RECORD_HEAD_LEN].iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if len > MAX_READABLE_LEN {
        return Err(corrupt("payload longer than any record's"));
    }
    let body = RECORD_HEAD_LEN + len.next_multiple_of(8);
    let Some(stored) = bytes.get(body..body + 8) else {
        return Err(corrupt("cut off before its checksum"));
    };
    let check = Check::new(fingerprint ^ index.rotate_left(17))
        .bytes(&bytes[..body])
        .finish();
    if stored != check.to_le_bytes() {
        return Err(corrupt("checksum mismatch"));
    }
    let mut aux = [0u8; 4];
    aux.copy_from_slice(&bytes[4..8]);
    let aux = u32::from_le_bytes(aux);
    let payload = &bytes[RECORD_HEAD_LEN..RECORD_HEAD_LEN + len];
    let word = |p: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(p.get(..8).ok_or(corrupt("payload too short"))?);
        Ok::<u64, StateError>(u64::from_le_bytes(w))
    };
    let record = match kind {
        KIND_BASE if len == 9 => Record::Base {
            negotiated: word(payload)?,
            bypass: payload[8],
        },
        KIND_FEATURES if len == 8 => Record::Features(word(payload)?),
        KIND_CONFIG if len == 1 => Record::Config {
            offset: u16::try_from(aux).map_err(|_| corrupt("config offset out of range"))?,
            value: payload[0],
        },
        KIND_REQUEST => Record::Request {
            position: (aux & 0x1_0000 != 0).then_some(aux as u16),
            bytes: payload,
        },
        KIND_FAULT if len == FAULT_RECORD_LEN => Record::Fault(payload),
        KIND_RESET if len == 0 => Record::Reset,
        KIND_SYSTEM_RESET if len == 0 => Record::SystemReset,
        KIND_END if len == 8 => Record::End {
            records: word(payload)?,
        },
        _ => return Err(corrupt("unknown kind or wrong length")),
    };
    Ok(Some(Decoded {
        record,
        len: body + 8,
    }))
}

/// The records that rebuild `device`'s state, in order: `Base`, then for
/// every domain the ATTACH of each of its endpoints and the MAP of each of
/// its mappings.
pub fn snapshot_records(device: &Device) -> Vec<RequestBytes> {
    device.snapshot_requests()
}

/// A request's readable bytes, kept without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestBytes {
    bytes: [u8; MAX_READABLE_LEN],
    len: usize,
}

impl RequestBytes {
    fn new(req: &Request) -> Self {
        Self::copy(&req.encode())
    }

    /// Keeps (at most [`MAX_READABLE_LEN`] of) `bytes`.
    pub fn copy(bytes: &[u8]) -> Self {
        let mut out = [0u8; MAX_READABLE_LEN];
        let len = bytes.len().min(MAX_READABLE_LEN);
        out[..len].copy_from_slice(&bytes[..len]);
        RequestBytes { bytes: out, len }
    }

    /// The request's readable bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Device {
    /// See [`snapshot_records`].
    fn snapshot_requests(&self) -> Vec<RequestBytes> {
        let mut out = Vec::with_capacity(self.attached_count() + self.mapping_count() as usize);
        self.for_each_domain(|id, bypass, endpoints, mappings| {
            for ep in endpoints {
                out.push(RequestBytes::new(&Request::Attach(Attach {
                    domain: id,
                    endpoint: ep,
                    flags: if bypass {
                        VIRTIO_IOMMU_ATTACH_F_BYPASS
                    } else {
                        0
                    },
                    reserved: [0; 4],
                })));
            }
            for m in mappings {
                out.push(RequestBytes::new(&Request::Map(Map {
                    domain: id,
                    virt_start: m.virt_start,
                    virt_end: m.virt_end,
                    phys_start: m.phys_start,
                    flags: m.flags,
                })));
            }
        });
        out
    }
}

/// Writes `device`'s whole state as a snapshot of `kind` (a journal's
/// starting point is a snapshot without `End`), with the fault records the
/// driver has not been given yet.
pub fn snapshot(device: &Device, faults: &[FaultRecord], kind: Kind) -> Vec<u8> {
    encode_snapshot(device, faults, kind).0
}

/// The start of a journal for `device` (a snapshot without `End` and
/// without fault records), and how many records it holds: the index of
/// the journal's next record.
pub fn journal_start(device: &Device) -> (Vec<u8>, u64) {
    encode_snapshot(device, &[], Kind::Journal)
}

/// [`snapshot`], with the number of records before any `End`.
fn encode_snapshot(device: &Device, faults: &[FaultRecord], kind: Kind) -> (Vec<u8>, u64) {
    let fp = fingerprint(device.config());
    let requests = snapshot_records(device);
    let mut out = Vec::with_capacity(HEADER_LEN + (requests.len() + 2) * 56);
    out.extend_from_slice(&header(kind, fp));
    let mut buf = [0u8; MAX_RECORD_LEN];
    let mut index = 0u64;
    let mut push = |r: &Record<'_>, out: &mut Vec<u8>| {
        let n = encode_record(index, fp, r, &mut buf);
        out.extend_from_slice(&buf[..n]);
        index += 1;
    };
    push(
        &Record::Base {
            negotiated: device.negotiated_features().0,
            bypass: device.config_space().bypass,
        },
        &mut out,
    );
    for r in &requests {
        push(
            &Record::Request {
                position: None,
                bytes: r.bytes(),
            },
            &mut out,
        );
    }
    for f in faults {
        push(&Record::Fault(&f.to_bytes()), &mut out);
    }
    let records = 1 + requests.len() as u64 + faults.len() as u64;
    if kind == Kind::Snapshot {
        push(&Record::End { records }, &mut out);
    }
    (out, records)
}

/// A device rebuilt from a state.
#[derive(Debug)]
pub struct Restored {
    /// The device, as the state left it.
    pub device: Device,
    /// Records applied.
    pub records: u64,
    /// Bytes of valid records (with the header): where a journal's next
    /// record goes.
    pub valid_len: usize,
    /// A journal's torn last record was dropped.
    pub torn_tail: bool,
    /// The last requests applied since the last reset that came from the
    /// request queue, oldest first: a restarted daemon completes these
    /// chains (with OK, the only status journaled) instead of applying
    /// them again if the driver still has them outstanding.
    pub applied: Vec<Applied>,
    /// Fault records the driver had not been given yet, oldest first.
    pub faults: Vec<FaultRecord>,
}

/// A request the journal says was applied, and where it was in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Its avail-ring position.
    pub position: u16,
    /// Its readable bytes.
    pub request: RequestBytes,
}

/// How many trailing request positions [`Restored::applied`]
/// keeps: the largest virtqueue.
const POSITIONS_KEPT: usize = 32768;

/// Rebuilds a device configured by `cfg` from `bytes`, a snapshot or a
/// journal. Nothing is returned unless every record applied.
pub fn restore(cfg: DeviceConfig, bytes: &[u8]) -> Result<Restored, StateError> {
    if bytes.len() < HEADER_LEN {
        return Err(StateError::Truncated(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(StateError::Magic);
    }
    let u32_at = |o: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&bytes[o..o + 4]);
        u32::from_le_bytes(w)
    };
    let u64_at = |o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(w)
    };
    let version = u32_at(8);
    if version != VERSION {
        return Err(StateError::Version { found: version });
    }
    let kind = match u32_at(12) {
        1 => Kind::Snapshot,
        2 => Kind::Journal,
        k => return Err(StateError::Kind(k)),
    };
    let found = u64_at(16);
    if Check::new(found).bytes(&bytes[..24]).finish() != u64_at(24) {
        return Err(StateError::HeaderChecksum);
    }
    let expected = fingerprint(&cfg);
    if found != expected {
        return Err(StateError::Foreign { found, expected });
    }
    let mut device = Device::new(cfg).map_err(|e| StateError::Inapplicable {
        index: 0,
        why: e.to_string(),
    })?;
    let mut offset = HEADER_LEN;
    let mut index = 0u64;
    let mut positions: std::collections::VecDeque<Applied> = Default::default();
    let mut ended = false;
    let mut torn_tail = false;
    let mut faults = Vec::new();
    while offset < bytes.len() {
        let decoded = match decode_record(&bytes[offset..], index, offset, found) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => {
                // A journal's append interrupted by the process's death
                // leaves one bad record and zeros after it.
                let rest_zero = bytes[offset..]
                    .get(MAX_RECORD_LEN..)
                    .is_none_or(|r| r.iter().all(|&b| b == 0));
                if kind == Kind::Journal && rest_zero {
                    torn_tail = true;
                    break;
                }
                return Err(e);
            }
        };
        let inapplicable = |why: String| StateError::Inapplicable { index, why };
        match decoded.record {
            Record::End { records } => {
                if kind != Kind::Snapshot || records != index {
                    return Err(StateError::Corrupt {
                        index,
                        offset,
                        why: "misplaced end record",
                    });
                }
                ended = true;
                offset += decoded.len;
                break;
            }
            Record::Base { negotiated, bypass } => {
                if index != 0 {
                    return Err(inapplicable("a base record after the first".into()));
                }
                device
                    .restore_base(Features(negotiated), bypass)
                    .map_err(inapplicable)?;
            }
            Record::Features(f) => device
                .set_features(Features(f), &mut NullSink)
                .map_err(|e| inapplicable(e.to_string()))?,
            Record::Config { offset, value } => device
                .write_config(usize::from(offset), &[value], &mut NullSink)
                .map_err(|e| inapplicable(e.to_string()))?,
            Record::Request { position, bytes } => {
                apply_request(&mut device, bytes).map_err(inapplicable)?;
                if let Some(p) = position {
                    if positions.len() == POSITIONS_KEPT {
                        positions.pop_front();
                    }
                    positions.push_back(Applied {
                        position: p,
                        request: RequestBytes::copy(bytes),
                    });
                }
            }
            Record::Fault(bytes) => {
                let mut wire = [0u8; FAULT_RECORD_LEN];
                wire.copy_from_slice(bytes);
                let fault = FaultRecord::from_bytes(&wire)
                    .ok_or_else(|| inapplicable("not a fault record".into()))?;
                faults.push(fault);
            }
            Record::Reset => {
                device.reset(&mut NullSink);
                positions.clear();
                faults.clear();
            }
            Record::SystemReset => {
                device.system_reset(&mut NullSink);
                positions.clear();
                faults.clear();
            }
        }
        offset += decoded.len;
        index += 1;
    }
    if kind == Kind::Snapshot && !ended {
        return Err(StateError::MissingEnd { records: index });
    }
    if kind == Kind::Snapshot && bytes[offset..].iter().any(|&b| b != 0) {
        return Err(StateError::Corrupt {
            index,
            offset,
            why: "bytes after the end record",
        });
    }
    Ok(Restored {
        device,
        records: index,
        valid_len: offset,
        torn_tail,
        applied: positions.into(),
        faults,
    })
}

/// Applies a journaled request, which answered OK when it was served and
/// must again.
fn apply_request(device: &mut Device, bytes: &[u8]) -> Result<(), String> {
    apply_with(device, bytes, &mut NullSink)
}

fn apply_with(device: &mut Device, bytes: &[u8], sink: &mut impl ChangeSink) -> Result<(), String> {
    match device.process(bytes, TAIL_LEN, sink) {
        Reply::Complete {
            status: Status::Ok, ..
        } => Ok(()),
        Reply::Complete { status, .. } => Err(format!("a saved request now answers {status}")),
        Reply::Unparsed => Err("a saved request does not parse".into()),
    }
}

#[cfg(test)]
mod tests;
