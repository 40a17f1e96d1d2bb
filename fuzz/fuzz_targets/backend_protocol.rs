//! Arbitrary bytes as a backend-protocol frame: decoding never panics, a
//! decoded message keeps the frame's declared length, and it re-encodes to
//! a frame that decodes to the same message and equals the original frame
//! but for the bytes the decoder ignores by rule.
#![no_main]

use iotlb_shm::backend_proto::{DecodeError, HEADER_LEN, MAX_LEN, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let header: Option<&[u8; HEADER_LEN]> = data.get(..HEADER_LEN).and_then(|h| h.try_into().ok());
    let framed = header.map(Message::total_len);
    match Message::decode(data) {
        Ok(msg) => {
            let Some(Ok(len)) = framed else {
                panic!("{msg:?} decoded from a frame without a valid header");
            };
            assert!((HEADER_LEN..=MAX_LEN).contains(&len) && len <= data.len());
            let bytes = msg.encode();
            assert_eq!(
                Message::decode(&bytes),
                Ok(msg.clone()),
                "encode then decode differs"
            );
            assert_eq!(
                bytes,
                canonical(&data[..len], &msg),
                "{msg:?} re-encodes differently"
            );
        }
        Err(DecodeError::Truncated(n)) => {
            assert_eq!(n, data.len());
            if let Some(Ok(len)) = framed {
                assert!(data.len() < len);
            }
        }
        Err(DecodeError::Foreign { .. }) => assert!(matches!(framed, Some(Err(_)))),
        Err(DecodeError::Length { .. } | DecodeError::Bad(_)) => {}
    }
});

/// The frame as the encoder writes it: reserved fields zero, a string cut
/// to its declared length (and invalid UTF-8 replaced, as decoding does),
/// the frame's length that of its body.
fn canonical(frame: &[u8], msg: &Message) -> Vec<u8> {
    let mut out = frame.to_vec();
    let kind = u32::from_le_bytes([frame[8], frame[9], frame[10], frame[11]]);
    let body = HEADER_LEN;
    match kind {
        // DRIVER_RESTARTED and IOTLB_INVALIDATE: reserved u32 after the endpoint.
        14 | 13 => out[body + 12..body + 16].fill(0),
        // IOTLB_FAULT: the fault's reserved u32.
        12 => out[body + 20..body + 24].fill(0),
        _ => {}
    }
    let text_at = match msg {
        Message::Refused { reason, .. } => Some((body + 8, reason)),
        Message::Error { reason, .. } => Some((body + 16, reason)),
        _ => None,
    };
    if let Some((at, reason)) = text_at {
        out.truncate(at);
        out.extend_from_slice(reason.as_bytes());
        out[at - 4..at].copy_from_slice(&(reason.len() as u32).to_le_bytes());
        let total = out.len() as u32;
        out[12..16].copy_from_slice(&total.to_le_bytes());
    }
    out
}
