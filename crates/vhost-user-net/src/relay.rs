//! A relay between a VMM and the vhost-user framework of one port, for the
//! one message order the framework refuses: stock QEMU's virtio-net sends
//! `SET_VRING_ENABLE` for its queues before `SET_FEATURES` (at every
//! device reset), and the `vhost` crate ends the connection on an enable
//! that comes before the features acked `VHOST_USER_F_PROTOCOL_FEATURES`.
//!
//! The relay passes every message through, descriptors included, except
//! an enable that arrives before `SET_FEATURES` (since the connection
//! began or the last `RESET_DEVICE`): it is acknowledged to the VMM if the
//! VMM asked for a reply, held, and handed to the framework right after
//! the next `SET_FEATURES`, without a reply request. The framework's
//! replies go back to the VMM unchanged. The backend's own channel
//! (`SET_BACKEND_REQ_FD`) is a descriptor passed through, so it does not
//! go through the relay.

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};

use iotlb_shm::backend_proto::{recv_some, send_with_fds};
use tracing::debug;

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_PROTOCOL_FEATURES`.
const SET_PROTOCOL_FEATURES: u32 = 16;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_RESET_DEVICE`.
const RESET_DEVICE: u32 = 34;
/// Header flag: a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants an acknowledgement (with REPLY_ACK).
const FLAG_NEED_REPLY: u32 = 0x8;
/// Header version bits.
const VERSION_1: u32 = 0x1;
/// `VHOST_USER_PROTOCOL_F_REPLY_ACK`.
const PROTOCOL_REPLY_ACK: u64 = 1 << 3;
/// Header bytes: request, flags, payload size.
const HEADER: usize = 12;
/// Largest payload relayed (the protocol's messages are far smaller).
const MAX_PAYLOAD: usize = 64 * 1024;

/// One vhost-user message.
struct Message {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.payload.len());
        b.extend_from_slice(&self.request.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.payload);
        b
    }
}

/// Reads one message; `None` at the end of the stream.
fn recv(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut fds = Vec::new();
    let mut have = 0;
    while have < HEADER {
        let mut truncated = false;
        let n = recv_some(sock.as_fd(), &mut header[have..], &mut fds, &mut truncated)?;
        if n == 0 {
            return if have == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many descriptors with one message",
            ));
        }
        have += n;
    }
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let size = word(8) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{size}-byte payload"),
        ));
    }
    let mut payload = vec![0u8; size];
    (&*sock).read_exact(&mut payload)?;
    Ok(Some(Message {
        request: word(0),
        flags: word(4),
        payload,
        fds,
    }))
}

fn send(sock: &Mutex<UnixStream>, msg: &Message) -> io::Result<()> {
    let sock = sock.lock().unwrap_or_else(PoisonError::into_inner);
    let fds: Vec<_> = msg.fds.iter().map(AsFd::as_fd).collect();
    send_with_fds(sock.as_fd(), &msg.bytes(), &fds)
}

/// What the VMM-to-framework direction remembers.
#[derive(Default)]
struct Order {
    features_set: bool,
    reply_ack: bool,
    held: Vec<Message>,
}

/// Relays between `vmm` and `framework` until either end closes, then
/// shuts both down (so the framework sees the VMM leave).
pub fn run(vmm: UnixStream, framework: UnixStream, port: &str) -> io::Result<()> {
    let to_vmm = Arc::new(Mutex::new(vmm.try_clone()?));
    let to_framework = Mutex::new(framework.try_clone()?);
    let replies = {
        let (framework, to_vmm) = (framework.try_clone()?, Arc::clone(&to_vmm));
        std::thread::Builder::new()
            .name("vmm-replies".into())
            .spawn(move || -> io::Result<()> {
                let pump = || -> io::Result<()> {
                    while let Some(m) = recv(&framework)? {
                        send(&to_vmm, &m)?;
                    }
                    Ok(())
                };
                let result = pump();
                // The framework is done with the connection: so is the VMM.
                let vmm = to_vmm.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = vmm.shutdown(std::net::Shutdown::Both);
                result
            })?
    };
    let mut order = Order::default();
    let result = (|| -> io::Result<()> {
        while let Some(mut m) = recv(&vmm)? {
            match m.request {
                SET_VRING_ENABLE if !order.features_set => {
                    debug!(
                        port,
                        "SET_VRING_ENABLE before SET_FEATURES: held until then"
                    );
                    if m.flags & FLAG_NEED_REPLY != 0 && order.reply_ack {
                        send(
                            &to_vmm,
                            &Message {
                                request: SET_VRING_ENABLE,
                                flags: VERSION_1 | FLAG_REPLY,
                                payload: 0u64.to_le_bytes().to_vec(),
                                fds: Vec::new(),
                            },
                        )?;
                    }
                    m.flags &= !FLAG_NEED_REPLY;
                    order.held.push(m);
                    continue;
                }
                SET_FEATURES => order.features_set = true,
                RESET_DEVICE => order.features_set = false,
                SET_PROTOCOL_FEATURES => {
                    if let Some(b) = m.payload.get(..8) {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(b);
                        order.reply_ack = u64::from_le_bytes(w) & PROTOCOL_REPLY_ACK != 0;
                    }
                }
                _ => {}
            }
            let features = m.request == SET_FEATURES;
            send(&to_framework, &m)?;
            if features {
                for held in order.held.drain(..) {
                    send(&to_framework, &held)?;
                }
            }
        }
        Ok(())
    })();
    let _ = vmm.shutdown(std::net::Shutdown::Both);
    let _ = framework.shutdown(std::net::Shutdown::Both);
    let replies = replies.join().unwrap_or(Ok(()));
    result.and(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        Message {
            request,
            flags,
            payload: payload.to_vec(),
            fds: Vec::new(),
        }
        .bytes()
    }

    #[test]
    fn an_enable_before_the_features_is_acked_held_and_sent_after_them() {
        let (vmm, vmm_relay) = UnixStream::pair().unwrap();
        let (framework_relay, framework) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || run(vmm_relay, framework_relay, "test"));
        let mut vmm = vmm;
        let write = |s: &mut UnixStream, b: &[u8]| std::io::Write::write_all(s, b).unwrap();
        // REPLY_ACK negotiated, then an enable that asks for a reply.
        write(
            &mut vmm,
            &msg(
                SET_PROTOCOL_FEATURES,
                VERSION_1,
                &(PROTOCOL_REPLY_ACK).to_le_bytes(),
            ),
        );
        write(
            &mut vmm,
            &msg(
                SET_VRING_ENABLE,
                VERSION_1 | FLAG_NEED_REPLY,
                &[0, 0, 0, 0, 1, 0, 0, 0],
            ),
        );
        let ack = recv(&vmm).unwrap().unwrap();
        assert_eq!(
            (ack.request, ack.flags, ack.payload),
            (SET_VRING_ENABLE, VERSION_1 | FLAG_REPLY, vec![0; 8])
        );
        let first = recv(&framework).unwrap().unwrap();
        assert_eq!(first.request, SET_PROTOCOL_FEATURES, "the enable is held");
        write(
            &mut vmm,
            &msg(SET_FEATURES, VERSION_1, &(1u64 << 30).to_le_bytes()),
        );
        let features = recv(&framework).unwrap().unwrap();
        assert_eq!(features.request, SET_FEATURES);
        let enable = recv(&framework).unwrap().unwrap();
        assert_eq!(
            (enable.request, enable.flags),
            (SET_VRING_ENABLE, VERSION_1),
            "no reply asked"
        );
        assert_eq!(enable.payload, vec![0, 0, 0, 0, 1, 0, 0, 0]);
        // After the features, an enable passes at once; a reset holds again.
        write(
            &mut vmm,
            &msg(SET_VRING_ENABLE, VERSION_1, &[1, 0, 0, 0, 1, 0, 0, 0]),
        );
        assert_eq!(recv(&framework).unwrap().unwrap().request, SET_VRING_ENABLE);
        write(&mut vmm, &msg(RESET_DEVICE, VERSION_1, &[]));
        assert_eq!(recv(&framework).unwrap().unwrap().request, RESET_DEVICE);
        write(
            &mut vmm,
            &msg(SET_VRING_ENABLE, VERSION_1, &[0, 0, 0, 0, 1, 0, 0, 0]),
        );
        write(
            &mut vmm,
            &msg(SET_FEATURES, VERSION_1, &(1u64 << 30).to_le_bytes()),
        );
        assert_eq!(recv(&framework).unwrap().unwrap().request, SET_FEATURES);
        assert_eq!(recv(&framework).unwrap().unwrap().request, SET_VRING_ENABLE);
        // Replies flow back; a VMM that leaves ends the relay and closes
        // the framework's end.
        let mut fw = framework.try_clone().unwrap();
        write(
            &mut fw,
            &msg(1, VERSION_1 | FLAG_REPLY, &7u64.to_le_bytes()),
        );
        let reply = recv(&vmm).unwrap().unwrap();
        assert_eq!(
            (reply.request, reply.payload),
            (1, 7u64.to_le_bytes().to_vec())
        );
        drop(vmm);
        assert!(recv(&framework).unwrap().is_none());
        relay.join().unwrap().unwrap();
    }

    #[test]
    fn an_oversized_or_cut_message_ends_the_relay() {
        let (mut vmm, vmm_relay) = UnixStream::pair().unwrap();
        let (framework_relay, framework) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || run(vmm_relay, framework_relay, "test"));
        let mut huge = msg(3, VERSION_1, &[]);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        std::io::Write::write_all(&mut vmm, &huge).unwrap();
        assert!(relay.join().unwrap().is_err());
        assert!(recv(&framework).unwrap().is_none());
    }
}
