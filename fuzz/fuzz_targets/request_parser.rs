//! Arbitrary bytes as a request's readable part: parsing never panics, and
//! every request it returns re-encodes to the bytes it was read from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_iommu_proto::{ParseError, Request, parse_request};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => check_round_trip(&req, data),
        Err(e) => check_error(e, data),
    }
});

/// The encoding is the readable bytes the request was parsed from, with the
/// bytes the parser ignores by rule (head reserved, DETACH and PROBE reserved)
/// written as a driver writes them: zero. Bytes past the type's fields are
/// not part of the request.
fn check_round_trip(req: &Request, data: &[u8]) {
    let len = req.req_type().readable_len();
    assert!(
        data.len() >= len,
        "parsed {req:?} from {} bytes",
        data.len()
    );
    let mut want = data[..len].to_vec();
    want[1..4].fill(0);
    match req {
        Request::Detach(_) => want[12..20].fill(0),
        Request::Probe(_) => want[8..72].fill(0),
        _ => {}
    }
    let got = req.encode();
    assert_eq!(got, want, "{req:?} does not re-encode to its bytes");
    assert_eq!(parse_request(&got), Ok(*req), "encode then parse differs");
}

/// A refusal names what is wrong with exactly these bytes.
fn check_error(e: ParseError, data: &[u8]) {
    match e {
        ParseError::NoHead { len } => assert!(len == data.len() && len < 4),
        ParseError::UnknownType(t) => assert!(t == data[0] && !(1..=5).contains(&t)),
        ParseError::TooShort {
            req_type,
            need,
            got,
        } => {
            assert_eq!(req_type as u8, data[0]);
            assert_eq!((need, got), (req_type.readable_len(), data.len()));
            assert!(got < need);
        }
    }
}
