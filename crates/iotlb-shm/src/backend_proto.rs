//! The backend socket protocol, v1 (`docs/backend-protocol.md`): how a
//! co-located backend obtains the table from the daemon and reports faults.
//!
//! Every message is a 16-byte header (`magic`, `version`, `type`, total
//! length, all little-endian u32) and a body. Descriptors travel as
//! `SCM_RIGHTS` ancillary data attached to WELCOME (daemon → backend) and
//! to REGISTER_RING / REGISTER_SOCKET (backend → daemon).
//!
//! Framing is kept whenever it can be: a message whose header has the right
//! magic and version and a length within bounds is read whole, whatever its
//! type, so that a message of an unknown type or with a bad field is
//! answered with ERROR and the connection goes on ([`recv_frame`] and
//! [`Message::decode`] are separate steps). Only a header that cannot be
//! trusted loses the framing ([`FrameError::Framing`]).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use thiserror::Error;

use crate::access::{Access, Fault, FaultKind};

/// `VIOB` in little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VIOB");
/// Protocol version.
pub const VERSION: u32 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 16;
/// Longest message (an ERROR with its reason).
pub const MAX_LEN: usize = HEADER_LEN + 16 + MAX_REASON;
/// Longest REFUSED or ERROR reason, in bytes.
pub const MAX_REASON: usize = 240;
/// Descriptors sent with WELCOME: table, arena, slots.
pub const WELCOME_FDS: usize = 3;
/// Most slot files one PREVIOUS_TABLE may carry.
pub const MAX_PREVIOUS_FILES: usize = 8;

const HELLO: u32 = 1;
const WELCOME: u32 = 2;
const REFUSED: u32 = 3;
const FAULT: u32 = 4;
const REGISTER_RING: u32 = 5;
const REGISTER_SOCKET: u32 = 6;
const ACK: u32 = 7;
const ERROR: u32 = 8;
const IOTLB_SUBSCRIBE: u32 = 9;
const IOTLB_MISS: u32 = 10;
const IOTLB_UPDATE: u32 = 11;
const IOTLB_FAULT: u32 = 12;
const IOTLB_INVALIDATE: u32 = 13;
const DRIVER_RESTARTED: u32 = 14;
const PREVIOUS_TABLE: u32 = 15;

/// [`Message::IotlbInvalidate`]'s endpoint meaning "every endpoint".
pub const ALL_ENDPOINTS: u32 = u32::MAX;

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Backend → daemon, first message: the slot file it wants (0 = the
    /// daemon's default for either count).
    Hello {
        /// Session slots (threads that translate).
        slots: u32,
        /// Pin records (I/Os in flight).
        pins: u32,
    },
    /// Daemon → backend: accepted; the table, arena and slot descriptors
    /// come with it.
    Welcome {
        /// The daemon's ID for this reader (for logs).
        reader_id: u64,
    },
    /// Daemon → backend: refused; the connection closes after it.
    Refused {
        /// An errno-style reason code (e.g. `EACCES`).
        code: u32,
        /// Human-readable reason.
        reason: String,
    },
    /// Backend → daemon: a DMA that did not translate, for the guest's
    /// event queue.
    Fault(Fault),
    /// Backend → daemon: track this io_uring (one descriptor attached: the
    /// read end of the ring's sentinel pipe, see [`crate::drain`]). Answered
    /// with ACK or ERROR carrying the same cookie.
    RegisterRing {
        /// Chosen by the backend, echoed in the answer.
        cookie: u64,
    },
    /// Backend → daemon: track this TCP socket's zero-copy sends (one
    /// descriptor attached: the socket). Answered with ACK or ERROR.
    RegisterSocket {
        /// Chosen by the backend, echoed in the answer.
        cookie: u64,
    },
    /// Daemon → backend: the registration (or subscription) with this
    /// cookie is done. Backend → daemon: the invalidation with this cookie
    /// is done (no cached translation of it is used any more).
    Ack {
        /// The cookie.
        cookie: u64,
    },
    /// Backend → daemon: this backend keeps a private IOTLB (message mode,
    /// the baseline): send it an invalidation for every revocation and wait
    /// for its ACK before completing the request. Answered with ACK.
    IotlbSubscribe {
        /// Echoed in the ACK.
        cookie: u64,
    },
    /// Backend → daemon: translate `iova` of `endpoint` for `access`.
    /// Answered with IOTLB_UPDATE or IOTLB_FAULT carrying the cookie.
    IotlbMiss {
        /// Echoed in the answer.
        cookie: u64,
        /// Endpoint ID.
        endpoint: u32,
        /// Access bits (1 read, 2 write).
        access: u8,
        /// The IOVA.
        iova: u64,
    },
    /// Daemon → backend: `[iova, iova + size)` of `endpoint` translates to
    /// `gpa` with `perm` (1 read, 2 write, 3 both).
    IotlbUpdate {
        /// The miss's cookie.
        cookie: u64,
        /// Endpoint ID.
        endpoint: u32,
        /// Permission bits.
        perm: u8,
        /// First IOVA of the translation.
        iova: u64,
        /// Bytes.
        size: u64,
        /// Guest-physical address of `iova`.
        gpa: u64,
    },
    /// Daemon → backend: the missed IOVA does not translate.
    IotlbFault {
        /// The miss's cookie.
        cookie: u64,
        /// The fault.
        fault: Fault,
    },
    /// Daemon → backend: forget every translation of `endpoint` (or of all
    /// endpoints, [`ALL_ENDPOINTS`]) inside `[first, last]`, then ACK.
    IotlbInvalidate {
        /// Echoed in the ACK.
        cookie: u64,
        /// Endpoint ID or [`ALL_ENDPOINTS`].
        endpoint: u32,
        /// First IOVA.
        first: u64,
        /// Last IOVA (inclusive).
        last: u64,
    },
    /// Backend → daemon: the guest set a queue of `endpoint`'s device up
    /// anew (new ring addresses, or its index back to 0): the guest's
    /// driver or firmware is starting over, so the guest is running. If the
    /// IOMMU is stopped at that moment, the guest was reset without the VMM
    /// saying so, and the daemon resets the IOMMU's state before it answers
    /// ACK (docs/design.md, "Device reset"). Sent before the queue's first
    /// DMA, outside any session.
    DriverRestarted {
        /// Echoed in the ACK.
        cookie: u64,
        /// The device's endpoint ID.
        endpoint: u32,
    },
    /// Backend → daemon, at most once per connection, after WELCOME: this
    /// connection replaces the connections `replaced` (reader IDs that
    /// previous daemons — ones that died or were restarted — gave it), and
    /// holds what is attached of their tables: each descriptor (at most
    /// [`MAX_PREVIOUS_FILES`]) is a slot file such a daemon gave it,
    /// retired (no session starts in it any more), that the daemon waits
    /// for, before completing any revocation, until the sessions and pins
    /// left in it are over. Answered with ACK or ERROR.
    PreviousTable {
        /// Echoed in the answer.
        cookie: u64,
        /// Reader IDs of the connections replaced (at most
        /// [`MAX_PREVIOUS_FILES`]).
        replaced: Vec<u64>,
    },
    /// Daemon → backend: a message was refused; the connection and the
    /// backend's registration go on.
    Error {
        /// The cookie of the refused registration, 0 for other messages.
        cookie: u64,
        /// errno-style code (`EPROTO` malformed or unexpected message,
        /// `EINVAL` unsuitable descriptor, `ENOSPC` too many tracked).
        code: u32,
        /// Human-readable reason.
        reason: String,
    },
}

/// A message that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its header or its type's body.
    #[error("message of {0} bytes is truncated")]
    Truncated(usize),
    /// Wrong magic or version.
    #[error("not a v1 backend-protocol message (magic {magic:#x}, version {version})")]
    Foreign {
        /// Magic found.
        magic: u32,
        /// Version found.
        version: u32,
    },
    /// The length does not fit the type (or is out of bounds).
    #[error("message of type {kind} with length {len}")]
    Length {
        /// Type found.
        kind: u32,
        /// Length found.
        len: usize,
    },
    /// Unknown type, or a field out of range.
    #[error("bad message type {0} or field")]
    Bad(u32),
}

/// FAULT's body: endpoint, access, kind, reserved 0, iova. A fault from a
/// dead daemon's table is never the guest's business; should one be sent,
/// it reads as DOMAIN.
fn encode_fault(body: &mut Vec<u8>, f: &Fault) {
    let kind = match f.kind {
        FaultKind::Domain | FaultKind::Detached => 1u32,
        FaultKind::Mapping => 2,
        FaultKind::Permission => 3,
    };
    body.extend_from_slice(&f.endpoint.to_le_bytes());
    body.extend_from_slice(&u32::from(f.access.bits()).to_le_bytes());
    body.extend_from_slice(&kind.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&f.iova.to_le_bytes());
}

fn decode_fault(endpoint: u32, access: u32, kind: u32, iova: u64) -> Option<Fault> {
    let access = u8::try_from(access).ok().and_then(Access::from_bits)?;
    let kind = match kind {
        1 => FaultKind::Domain,
        2 => FaultKind::Mapping,
        3 => FaultKind::Permission,
        _ => return None,
    };
    Some(Fault {
        kind,
        endpoint,
        iova,
        access,
    })
}

fn reason_bytes(reason: &str) -> &[u8] {
    let mut cut = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    &reason.as_bytes()[..cut]
}

/// A reason's text as read: invalid UTF-8 is replaced (it is for people,
/// not programs), and the result is cut to [`MAX_REASON`] bytes as the
/// encoder cuts it, since each replacement character takes three bytes.
fn decode_reason(text: &[u8]) -> String {
    let lossy = String::from_utf8_lossy(text);
    String::from_utf8_lossy(reason_bytes(&lossy)).into_owned()
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32
}

impl Message {
    /// Whether `len` is a valid total length for a message of type `kind`
    /// (unknown types: `None`).
    fn len_fits(kind: u32, len: usize) -> Option<bool> {
        Some(match kind {
            HELLO | WELCOME | REGISTER_RING | REGISTER_SOCKET | ACK | IOTLB_SUBSCRIBE => {
                len == HEADER_LEN + 8
            }
            PREVIOUS_TABLE => {
                (HEADER_LEN + 16..=HEADER_LEN + 16 + 8 * MAX_PREVIOUS_FILES).contains(&len)
                    && (len - HEADER_LEN) % 8 == 0
            }
            IOTLB_MISS => len == HEADER_LEN + 24,
            IOTLB_UPDATE => len == HEADER_LEN + 40,
            IOTLB_FAULT | IOTLB_INVALIDATE => len == HEADER_LEN + 32,
            FAULT => len == HEADER_LEN + 24,
            DRIVER_RESTARTED => len == HEADER_LEN + 16,
            REFUSED => (HEADER_LEN + 8..=HEADER_LEN + 8 + MAX_REASON).contains(&len),
            ERROR => (HEADER_LEN + 16..=MAX_LEN).contains(&len),
            _ => return None,
        })
    }

    /// The cookie of a registration or its answer (0 for other messages).
    pub fn cookie(&self) -> u64 {
        match self {
            Message::RegisterRing { cookie }
            | Message::RegisterSocket { cookie }
            | Message::Ack { cookie }
            | Message::Error { cookie, .. }
            | Message::IotlbSubscribe { cookie }
            | Message::PreviousTable { cookie, .. }
            | Message::DriverRestarted { cookie, .. }
            | Message::IotlbMiss { cookie, .. }
            | Message::IotlbUpdate { cookie, .. }
            | Message::IotlbFault { cookie, .. }
            | Message::IotlbInvalidate { cookie, .. } => *cookie,
            _ => 0,
        }
    }

    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(32);
        let kind = match self {
            Message::Hello { slots, pins } => {
                body.extend_from_slice(&slots.to_le_bytes());
                body.extend_from_slice(&pins.to_le_bytes());
                HELLO
            }
            Message::Welcome { reader_id } => {
                body.extend_from_slice(&reader_id.to_le_bytes());
                WELCOME
            }
            Message::Refused { code, reason } => {
                let r = reason_bytes(reason);
                body.extend_from_slice(&code.to_le_bytes());
                body.extend_from_slice(&(r.len() as u32).to_le_bytes());
                body.extend_from_slice(r);
                REFUSED
            }
            Message::RegisterRing { cookie } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                REGISTER_RING
            }
            Message::RegisterSocket { cookie } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                REGISTER_SOCKET
            }
            Message::Ack { cookie } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                ACK
            }
            Message::Error {
                cookie,
                code,
                reason,
            } => {
                let r = reason_bytes(reason);
                body.extend_from_slice(&cookie.to_le_bytes());
                body.extend_from_slice(&code.to_le_bytes());
                body.extend_from_slice(&(r.len() as u32).to_le_bytes());
                body.extend_from_slice(r);
                ERROR
            }
            Message::Fault(f) => {
                encode_fault(&mut body, f);
                FAULT
            }
            Message::IotlbSubscribe { cookie } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                IOTLB_SUBSCRIBE
            }
            Message::PreviousTable { cookie, replaced } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                body.extend_from_slice(&(replaced.len() as u32).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                for id in replaced {
                    body.extend_from_slice(&id.to_le_bytes());
                }
                PREVIOUS_TABLE
            }
            Message::DriverRestarted { cookie, endpoint } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                body.extend_from_slice(&endpoint.to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                DRIVER_RESTARTED
            }
            Message::IotlbMiss {
                cookie,
                endpoint,
                access,
                iova,
            } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                body.extend_from_slice(&endpoint.to_le_bytes());
                body.extend_from_slice(&u32::from(*access).to_le_bytes());
                body.extend_from_slice(&iova.to_le_bytes());
                IOTLB_MISS
            }
            Message::IotlbUpdate {
                cookie,
                endpoint,
                perm,
                iova,
                size,
                gpa,
            } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                body.extend_from_slice(&endpoint.to_le_bytes());
                body.extend_from_slice(&u32::from(*perm).to_le_bytes());
                body.extend_from_slice(&iova.to_le_bytes());
                body.extend_from_slice(&size.to_le_bytes());
                body.extend_from_slice(&gpa.to_le_bytes());
                IOTLB_UPDATE
            }
            Message::IotlbFault { cookie, fault } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                encode_fault(&mut body, fault);
                IOTLB_FAULT
            }
            Message::IotlbInvalidate {
                cookie,
                endpoint,
                first,
                last,
            } => {
                body.extend_from_slice(&cookie.to_le_bytes());
                body.extend_from_slice(&endpoint.to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                body.extend_from_slice(&first.to_le_bytes());
                body.extend_from_slice(&last.to_le_bytes());
                IOTLB_INVALIDATE
            }
        };
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Length of the whole message whose header is `header`: any length
    /// from a header to [`MAX_LEN`] keeps the framing, whatever the type
    /// (whether it fits the type is [`Self::decode`]'s business).
    pub fn total_len(header: &[u8; HEADER_LEN]) -> Result<usize, DecodeError> {
        let (magic, version) = (u32_at(header, 0), u32_at(header, 4));
        if magic != MAGIC || version != VERSION {
            return Err(DecodeError::Foreign { magic, version });
        }
        let (kind, len) = (u32_at(header, 8), u32_at(header, 12) as usize);
        if (HEADER_LEN..=MAX_LEN).contains(&len) {
            Ok(len)
        } else {
            Err(DecodeError::Length { kind, len })
        }
    }

    /// Decodes one whole message.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let header: &[u8; HEADER_LEN] = b
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(DecodeError::Truncated(b.len()))?;
        let len = Self::total_len(header)?;
        if b.len() < len {
            return Err(DecodeError::Truncated(b.len()));
        }
        let body = &b[HEADER_LEN..len];
        let kind = u32_at(b, 8);
        match Self::len_fits(kind, len) {
            None => return Err(DecodeError::Bad(kind)),
            Some(false) => return Err(DecodeError::Length { kind, len }),
            Some(true) => {}
        }
        match kind {
            HELLO => Ok(Message::Hello {
                slots: u32_at(body, 0),
                pins: u32_at(body, 4),
            }),
            WELCOME => Ok(Message::Welcome {
                reader_id: u64_at(body, 0),
            }),
            REFUSED => {
                let n = u32_at(body, 4) as usize;
                let text = body.get(8..8 + n).ok_or(DecodeError::Bad(kind))?;
                Ok(Message::Refused {
                    code: u32_at(body, 0),
                    reason: decode_reason(text),
                })
            }
            FAULT => {
                if u32_at(body, 12) != 0 {
                    return Err(DecodeError::Bad(FAULT));
                }
                let fault = decode_fault(
                    u32_at(body, 0),
                    u32_at(body, 4),
                    u32_at(body, 8),
                    u64_at(body, 16),
                )
                .ok_or(DecodeError::Bad(FAULT))?;
                Ok(Message::Fault(fault))
            }
            IOTLB_SUBSCRIBE => Ok(Message::IotlbSubscribe {
                cookie: u64_at(body, 0),
            }),
            PREVIOUS_TABLE => {
                let n = u32_at(body, 8) as usize;
                if u32_at(body, 12) != 0 || body.len() != 16 + 8 * n {
                    return Err(DecodeError::Bad(kind));
                }
                Ok(Message::PreviousTable {
                    cookie: u64_at(body, 0),
                    replaced: (0..n).map(|i| u64_at(body, 16 + 8 * i)).collect(),
                })
            }
            DRIVER_RESTARTED => Ok(Message::DriverRestarted {
                cookie: u64_at(body, 0),
                endpoint: u32_at(body, 8),
            }),
            IOTLB_MISS => Ok(Message::IotlbMiss {
                cookie: u64_at(body, 0),
                endpoint: u32_at(body, 8),
                access: u8::try_from(u32_at(body, 12))
                    .ok()
                    .filter(|a| (1..=3).contains(a))
                    .ok_or(DecodeError::Bad(kind))?,
                iova: u64_at(body, 16),
            }),
            IOTLB_UPDATE => Ok(Message::IotlbUpdate {
                cookie: u64_at(body, 0),
                endpoint: u32_at(body, 8),
                perm: u8::try_from(u32_at(body, 12))
                    .ok()
                    .filter(|p| (1..=3).contains(p))
                    .ok_or(DecodeError::Bad(kind))?,
                iova: u64_at(body, 16),
                size: u64_at(body, 24),
                gpa: u64_at(body, 32),
            }),
            IOTLB_FAULT => Ok(Message::IotlbFault {
                cookie: u64_at(body, 0),
                fault: decode_fault(
                    u32_at(body, 8),
                    u32_at(body, 12),
                    u32_at(body, 16),
                    u64_at(body, 24),
                )
                .ok_or(DecodeError::Bad(kind))?,
            }),
            IOTLB_INVALIDATE => Ok(Message::IotlbInvalidate {
                cookie: u64_at(body, 0),
                endpoint: u32_at(body, 8),
                first: u64_at(body, 16),
                last: u64_at(body, 24),
            }),
            REGISTER_RING => Ok(Message::RegisterRing {
                cookie: u64_at(body, 0),
            }),
            REGISTER_SOCKET => Ok(Message::RegisterSocket {
                cookie: u64_at(body, 0),
            }),
            ACK => Ok(Message::Ack {
                cookie: u64_at(body, 0),
            }),
            ERROR => {
                let n = u32_at(body, 12) as usize;
                let text = body.get(16..16 + n).ok_or(DecodeError::Bad(kind))?;
                Ok(Message::Error {
                    cookie: u64_at(body, 0),
                    code: u32_at(body, 8),
                    reason: decode_reason(text),
                })
            }
            other => Err(DecodeError::Bad(other)),
        }
    }
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS), waiting for room.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send(sock, bytes, fds, 0)
}

/// Sends `bytes` without waiting for room in the socket: a peer that does
/// not read its replies gets `WouldBlock` instead of stalling the sender.
pub fn try_send(sock: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    send(sock, bytes, &[], libc::MSG_DONTWAIT)
}

fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>], flags: i32) -> io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` zeroed, 8-aligned bytes, so
        // the first header fits and CMSG_DATA stays inside the buffer.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(c).cast::<i32>(),
                raw.len(),
            );
        }
    }
    let mut sent = 0;
    let mut flags = flags;
    while sent < bytes.len() {
        let mut iov = libc::iovec {
            iov_base: bytes[sent..].as_ptr() as *mut _,
            iov_len: bytes.len() - sent,
        };
        msg.msg_iov = &mut iov;
        // SAFETY: msg describes live buffers; MSG_NOSIGNAL avoids SIGPIPE.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags | libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
        // The descriptors went with the first chunk; the rest of a message
        // that was begun is finished whatever it takes.
        msg.msg_control = std::ptr::null_mut();
        msg.msg_controllen = 0;
        flags = 0;
    }
    Ok(())
}

/// A whole message read off the socket, not decoded yet.
#[derive(Debug)]
pub struct Frame {
    /// Its length: the message is `buf[..len]`.
    pub len: usize,
    /// The descriptors that came with it.
    pub fds: Vec<OwnedFd>,
    /// More descriptors were attached than fit; the kernel closed the
    /// excess (the message itself is intact).
    pub fds_truncated: bool,
}

/// Why no frame could be read.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The socket failed, or closed in the middle of a message.
    #[error("backend socket")]
    Io(#[from] io::Error),
    /// The header cannot be trusted (wrong magic or version, impossible
    /// length): where the next message starts is unknown.
    #[error("framing lost")]
    Framing(#[source] DecodeError),
}

/// Reads exactly one message into `buf`, with the descriptors attached to
/// it. `Ok(None)` on an orderly end of stream before a message.
pub fn recv_frame(
    sock: BorrowedFd<'_>,
    buf: &mut [u8; MAX_LEN],
) -> Result<Option<Frame>, FrameError> {
    let mut fds = Vec::new();
    let mut fds_truncated = false;
    let mut got = 0;
    let mut want = HEADER_LEN;
    while got < want {
        let n = recv_some(sock, &mut buf[got..want], &mut fds, &mut fds_truncated)?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend socket closed mid-message",
            )));
        }
        got += n;
        if got == HEADER_LEN && want == HEADER_LEN {
            let mut header = [0u8; HEADER_LEN];
            header.copy_from_slice(&buf[..HEADER_LEN]);
            want = Message::total_len(&header).map_err(FrameError::Framing)?;
        }
    }
    Ok(Some(Frame {
        len: want,
        fds,
        fds_truncated,
    }))
}

/// Receives and decodes exactly one message, with any descriptors attached
/// to it. Returns `Ok(None)` on an orderly end of stream before a message;
/// every malformed message is an `InvalidData` error.
pub fn recv_message(
    sock: BorrowedFd<'_>,
    buf: &mut [u8; MAX_LEN],
) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let invalid = |e: DecodeError| io::Error::new(io::ErrorKind::InvalidData, e);
    let frame = match recv_frame(sock, buf) {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(None),
        Err(FrameError::Io(e)) => return Err(e),
        Err(FrameError::Framing(e)) => return Err(invalid(e)),
    };
    if frame.fds_truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors attached",
        ));
    }
    let msg = Message::decode(&buf[..frame.len]).map_err(invalid)?;
    Ok(Some((msg, frame.fds)))
}

/// Reads whatever bytes are waiting (at most `buf.len()`), closing any
/// descriptors that came with them: for a connection whose framing is lost,
/// until its end of stream (`Ok(0)`).
pub fn recv_discard(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let mut fds = Vec::new();
    let mut truncated = false;
    recv_some(sock, buf, &mut fds, &mut truncated)
}

/// Reads what is waiting on a stream socket (at most `buf.len()` bytes;
/// 0 at its end) and appends the descriptors that came with those bytes
/// to `fds` (`truncated`: some did not fit and were closed by the kernel).
/// For relays of another protocol's messages.
pub fn recv_some(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
) -> io::Result<usize> {
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    loop {
        // SAFETY: msg describes live buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: walking the control headers the kernel wrote into
        // `control`, within msg_controllen, with the libc macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<i32>();
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    for i in 0..count {
                        // The kernel installed these descriptors for us.
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            *truncated = true;
        }
        return Ok(n as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            Message::Hello { slots: 4, pins: 0 },
            Message::Welcome {
                reader_id: u64::MAX - 1,
            },
            Message::Refused {
                code: 13,
                reason: "uid 1000 not allowed".into(),
            },
            Message::Fault(Fault {
                kind: FaultKind::Permission,
                endpoint: 8,
                iova: 0xdead_beef_f000,
                access: Access::WRITE,
            }),
            Message::RegisterRing { cookie: 1 },
            Message::RegisterSocket { cookie: u64::MAX },
            Message::Ack { cookie: 9 },
            Message::Error {
                cookie: 0,
                code: 71,
                reason: "unexpected HELLO".into(),
            },
            Message::IotlbSubscribe { cookie: 4 },
            Message::PreviousTable {
                cookie: 7,
                replaced: vec![],
            },
            Message::PreviousTable {
                cookie: 8,
                replaced: vec![3, u64::MAX],
            },
            Message::DriverRestarted {
                cookie: 5,
                endpoint: 0x20,
            },
            Message::IotlbMiss {
                cookie: 5,
                endpoint: 8,
                access: 2,
                iova: 0x1234_5000,
            },
            Message::IotlbUpdate {
                cookie: 5,
                endpoint: 8,
                perm: 3,
                iova: 0x1234_5000,
                size: 0x1000,
                gpa: 0x8000_0000,
            },
            Message::IotlbFault {
                cookie: 6,
                fault: Fault {
                    kind: FaultKind::Mapping,
                    endpoint: 9,
                    iova: 0xfff,
                    access: Access::READ,
                },
            },
            Message::IotlbInvalidate {
                cookie: 7,
                endpoint: ALL_ENDPOINTS,
                first: 0,
                last: u64::MAX,
            },
        ];
        for m in msgs {
            let b = m.encode();
            assert_eq!(Message::decode(&b), Ok(m.clone()));
            assert_eq!(
                Message::decode(&b[..b.len() - 1]),
                Err(DecodeError::Truncated(b.len() - 1))
            );
        }
    }

    /// Found by the fuzz target `backend_protocol`: 240 bytes of invalid
    /// UTF-8 decoded to 720 bytes of replacement characters, which the
    /// encoder cut, so the message did not survive a round trip.
    #[test]
    fn an_invalid_utf8_reason_decodes_within_the_length_bound() {
        let mut frame = Message::Error {
            cookie: 5,
            code: 71,
            reason: "x".repeat(MAX_REASON),
        }
        .encode();
        frame[HEADER_LEN + 16..].fill(0xff);
        let msg = Message::decode(&frame).unwrap();
        let Message::Error { reason, .. } = &msg else {
            panic!("{msg:?}");
        };
        assert!(reason.len() <= MAX_REASON && reason.starts_with('\u{fffd}'));
        assert_eq!(Message::decode(&msg.encode()), Ok(msg.clone()));
    }

    #[test]
    fn foreign_and_malformed_messages_are_refused() {
        let mut b = Message::Hello { slots: 1, pins: 1 }.encode();
        b[0] ^= 1;
        assert!(matches!(
            Message::decode(&b),
            Err(DecodeError::Foreign { .. })
        ));
        let mut b = Message::Hello { slots: 1, pins: 1 }.encode();
        b[12] = 99; // wrong length for HELLO (the framing itself is fine)
        assert!(Message::total_len(&b[..HEADER_LEN].try_into().unwrap()).is_ok());
        b.resize(99, 0);
        assert_eq!(
            Message::decode(&b),
            Err(DecodeError::Length {
                kind: HELLO,
                len: 99
            })
        );
        let mut b = Message::Hello { slots: 1, pins: 1 }.encode();
        b[12..16].copy_from_slice(&100_000u32.to_le_bytes()); // no framing
        assert!(matches!(
            Message::total_len(&b[..HEADER_LEN].try_into().unwrap()),
            Err(DecodeError::Length { .. })
        ));
        let mut b = Message::Hello { slots: 1, pins: 1 }.encode();
        b[8] = 77;
        assert_eq!(Message::decode(&b), Err(DecodeError::Bad(77)));
        let mut f = Message::Fault(Fault {
            kind: FaultKind::Domain,
            endpoint: 1,
            iova: 0,
            access: Access::READ,
        })
        .encode();
        let mut g = f.clone();
        f[HEADER_LEN + 4] = 9; // access 9
        assert_eq!(Message::decode(&f), Err(DecodeError::Bad(FAULT)));
        g[HEADER_LEN + 12] = 1; // reserved field set
        assert_eq!(Message::decode(&g), Err(DecodeError::Bad(FAULT)));
        let long = Message::Refused {
            code: 1,
            reason: "é".repeat(200),
        }
        .encode();
        assert!(long.len() <= MAX_LEN);
        assert!(matches!(
            Message::decode(&long),
            Ok(Message::Refused { .. })
        ));
    }

    #[test]
    fn descriptors_travel_with_the_message() {
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let file = crate::memfd::create(c"t", 4096).unwrap();
        let msg = Message::Welcome { reader_id: 7 }.encode();
        send_with_fds(a.as_fd(), &msg, &[file.as_fd(), file.as_fd(), file.as_fd()]).unwrap();
        let mut buf = [0u8; MAX_LEN];
        let (m, fds) = recv_message(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(m, Message::Welcome { reader_id: 7 });
        assert_eq!(fds.len(), 3);
        assert_eq!(crate::memfd::size(fds[0].as_fd()).unwrap(), 4096);
        drop(a);
        assert!(
            recv_message(b.as_fd(), &mut buf).unwrap().is_none(),
            "clean EOF"
        );
    }

    #[test]
    fn a_message_of_an_unknown_type_or_with_too_many_fds_keeps_the_framing() {
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let mut odd = Message::Ack { cookie: 5 }.encode();
        odd[8] = 200; // unknown type, valid length
        send_with_fds(a.as_fd(), &odd, &[]).unwrap();
        let file = crate::memfd::create(c"t", 4096).unwrap();
        let many: Vec<_> = (0..64).map(|_| file.as_fd()).collect();
        let hello = Message::Hello { slots: 1, pins: 1 }.encode();
        send_with_fds(a.as_fd(), &hello, &many).unwrap();
        send_with_fds(a.as_fd(), &Message::Ack { cookie: 6 }.encode(), &[]).unwrap();
        let mut buf = [0u8; MAX_LEN];
        let f = recv_frame(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(Message::decode(&buf[..f.len]), Err(DecodeError::Bad(200)));
        let f = recv_frame(b.as_fd(), &mut buf).unwrap().unwrap();
        assert!(f.fds_truncated && f.fds.len() < 64, "{f:?}");
        assert_eq!(
            Message::decode(&buf[..f.len]),
            Ok(Message::Hello { slots: 1, pins: 1 })
        );
        let (m, _) = recv_message(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(m, Message::Ack { cookie: 6 }, "the stream is still in step");
        let mut junk = Message::Ack { cookie: 7 }.encode();
        junk[0] = b'X';
        send_with_fds(a.as_fd(), &junk, &[]).unwrap();
        assert!(matches!(
            recv_frame(b.as_fd(), &mut buf),
            Err(FrameError::Framing(DecodeError::Foreign { .. }))
        ));
    }
}
