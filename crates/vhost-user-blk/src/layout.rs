//! Splitting a descriptor chain into header, data and status
//! (virtio 1.2 §5.2.6, §2.7.4.2).
//!
//! A chain is its device-readable segments followed by its device-writable
//! ones. Read in order, the readable segments form the *readable stream* and
//! the writable ones the *writable stream*. With `VERSION_1` the driver may
//! cut the request into descriptors anywhere (§2.7.4), so every part is a
//! byte range of a stream, and [`pieces`] maps a range back to segments:
//!
//! * header: the first 16 bytes of the readable stream;
//! * readable data: the rest of the readable stream (OUT, DISCARD,
//!   WRITE_ZEROES);
//! * status: the last byte of the writable stream;
//! * writable data: the writable stream before the status (IN, GET_ID).

use crate::request::HEADER_LEN;

/// Longest chain accepted, in bytes: the used ring's `len` is a `u32`, so
/// every writable stream's length must fit in one.
pub const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

/// One descriptor of a chain, without its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// One of the two byte streams of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The device-readable segments, in order.
    Readable,
    /// The device-writable segments, in order.
    Writable,
}

impl Stream {
    /// Whether `segment` belongs to this stream.
    pub const fn holds(self, segment: &Segment) -> bool {
        match self {
            Stream::Readable => !segment.writable,
            Stream::Writable => segment.writable,
        }
    }
}

/// The half-open byte range `start..end` of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// `start..end`.
    pub const fn new(start: u64, end: u64) -> Self {
        ByteRange { start, end }
    }

    /// Bytes in the range (0 when inverted).
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where each part of a well-formed request lies. The status location
/// always exists: whatever the request turns out to be, the device writes
/// its status there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainLayout {
    /// The header in the readable stream: always `0..16`.
    pub header: ByteRange,
    /// Data in the readable stream: `16..readable length` (maybe empty).
    pub readable_data: ByteRange,
    /// Data in the writable stream: `0..writable length - 1` (maybe empty).
    pub writable_data: ByteRange,
    /// Offset of the status byte in the writable stream (its last byte).
    pub status_at: u64,
}

impl ChainLayout {
    /// The status byte as a range of the writable stream.
    pub const fn status(&self) -> ByteRange {
        ByteRange::new(self.status_at, self.status_at + 1)
    }
}

/// Why a chain is not a block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A device-readable descriptor follows a device-writable one
    /// (§2.7.4.2: the driver MUST place readable descriptors first).
    #[error("descriptor {segment} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Index of the offending segment.
        segment: usize,
    },
    /// The chain holds more than [`MAX_CHAIN_BYTES`].
    #[error("the chain holds at least {at_least} bytes; at most {MAX_CHAIN_BYTES} are accepted")]
    TooLong {
        /// Bytes counted when the limit was passed.
        at_least: u64,
    },
    /// No device-writable byte, so no status byte.
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    /// Fewer than 16 readable bytes for the header.
    #[error("the chain has {readable} device-readable bytes; the header needs {HEADER_LEN}")]
    ShortHeader {
        /// Readable bytes in the chain.
        readable: u64,
    },
}

/// Splits a chain into its request parts.
///
/// Checks, in this order: readable segments come first, the total is at
/// most [`MAX_CHAIN_BYTES`], there is a writable byte, there are 16
/// readable bytes. Zero-length segments count for the order and are
/// otherwise ignored. When this fails, [`status_piece`] tells whether an
/// IOERR can still be written back.
pub fn layout(segments: &[Segment]) -> Result<ChainLayout, Malformed> {
    let mut readable: u64 = 0;
    let mut writable: u64 = 0;
    let mut seen_writable = false;
    for (index, segment) in segments.iter().enumerate() {
        if segment.writable {
            seen_writable = true;
            writable += u64::from(segment.len);
        } else if seen_writable {
            return Err(Malformed::ReadableAfterWritable { segment: index });
        } else {
            readable += u64::from(segment.len);
        }
        // Checked on every segment, so the sums above stay far from
        // overflowing.
        let total = readable + writable;
        if total > MAX_CHAIN_BYTES {
            return Err(Malformed::TooLong { at_least: total });
        }
    }
    if writable == 0 {
        return Err(Malformed::NoStatus);
    }
    let header_len = HEADER_LEN as u64;
    if readable < header_len {
        return Err(Malformed::ShortHeader { readable });
    }
    let status_at = writable - 1;
    Ok(ChainLayout {
        header: ByteRange::new(0, header_len),
        readable_data: ByteRange::new(header_len, readable),
        writable_data: ByteRange::new(0, status_at),
        status_at,
    })
}

/// A run of bytes inside one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Index of the segment in the chain.
    pub segment: usize,
    /// Offset of the first byte inside the segment.
    pub offset: u32,
    /// Bytes (never 0).
    pub len: u32,
}

/// The pieces of `segments` that hold `range` of `stream`, in order. Bytes
/// of the range past the end of the stream have no piece; zero-length
/// segments give none.
pub fn pieces(
    segments: &[Segment],
    stream: Stream,
    range: ByteRange,
) -> impl Iterator<Item = Piece> + '_ {
    let mut segment_start: u64 = 0;
    segments
        .iter()
        .enumerate()
        .filter(move |(_, segment)| stream.holds(segment))
        .filter_map(move |(index, segment)| {
            let start = segment_start;
            let end = start.saturating_add(u64::from(segment.len));
            segment_start = end;
            let first = range.start.max(start);
            let last = range.end.min(end);
            // Both differences are at most `segment.len`, a u32.
            (first < last).then(|| Piece {
                segment: index,
                offset: (first - start) as u32,
                len: (last - first) as u32,
            })
        })
}

/// Where the status byte of any chain goes: the last byte of its last
/// non-empty segment, when that segment is device-writable. For a chain
/// [`layout`] accepts this is its status byte; for one it refuses, it is
/// where the device can still answer IOERR (used length 1).
pub fn status_piece(segments: &[Segment]) -> Option<Piece> {
    let (index, last) = segments
        .iter()
        .enumerate()
        .rev()
        .find(|(_, segment)| segment.len > 0)?;
    last.writable.then(|| Piece {
        segment: index,
        offset: last.len - 1,
        len: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(len: u32) -> Segment {
        Segment {
            len,
            writable: false,
        }
    }

    fn w(len: u32) -> Segment {
        Segment {
            len,
            writable: true,
        }
    }

    fn all(segments: &[Segment], stream: Stream, range: ByteRange) -> Vec<Piece> {
        pieces(segments, stream, range).collect()
    }

    fn piece(segment: usize, offset: u32, len: u32) -> Piece {
        Piece {
            segment,
            offset,
            len,
        }
    }

    #[test]
    fn header_data_and_status_in_their_own_descriptors() {
        let chain = [r(16), w(4096), w(1)];
        let layout = layout(&chain).unwrap();
        assert_eq!(layout.header, ByteRange::new(0, 16));
        assert!(layout.readable_data.is_empty());
        assert_eq!(layout.writable_data, ByteRange::new(0, 4096));
        assert_eq!(layout.status_at, 4096);
        assert_eq!(
            all(&chain, Stream::Readable, layout.header),
            [piece(0, 0, 16)]
        );
        assert_eq!(
            all(&chain, Stream::Writable, layout.writable_data),
            [piece(1, 0, 4096)]
        );
        assert_eq!(
            all(&chain, Stream::Writable, layout.status()),
            [piece(2, 0, 1)]
        );
        assert_eq!(status_piece(&chain), Some(piece(2, 0, 1)));
    }

    #[test]
    fn status_sharing_the_last_data_descriptor() {
        let chain = [r(16), w(512), w(513)];
        let layout = layout(&chain).unwrap();
        assert_eq!(layout.writable_data, ByteRange::new(0, 1024));
        assert_eq!(layout.status_at, 1024);
        assert_eq!(
            all(&chain, Stream::Writable, layout.writable_data),
            [piece(1, 0, 512), piece(2, 0, 512)]
        );
        assert_eq!(
            all(&chain, Stream::Writable, layout.status()),
            [piece(2, 512, 1)]
        );
        assert_eq!(status_piece(&chain), Some(piece(2, 512, 1)));
    }

    #[test]
    fn header_sharing_a_descriptor_with_write_data() {
        let chain = [r(16 + 1024), w(1)];
        let layout = layout(&chain).unwrap();
        assert_eq!(layout.readable_data, ByteRange::new(16, 1040));
        assert!(layout.writable_data.is_empty());
        assert_eq!(layout.status_at, 0);
        assert_eq!(
            all(&chain, Stream::Readable, layout.readable_data),
            [piece(0, 16, 1024)]
        );
    }

    #[test]
    fn header_split_1_and_15() {
        let chain = [r(1), r(15), r(512), w(1)];
        let layout = layout(&chain).unwrap();
        assert_eq!(
            all(&chain, Stream::Readable, layout.header),
            [piece(0, 0, 1), piece(1, 0, 15)]
        );
        assert_eq!(layout.readable_data, ByteRange::new(16, 528));
        assert_eq!(
            all(&chain, Stream::Readable, layout.readable_data),
            [piece(2, 0, 512)]
        );
    }

    #[test]
    fn header_split_8_and_8_with_data_in_the_second() {
        let chain = [r(8), r(8 + 512), w(1)];
        let layout = layout(&chain).unwrap();
        assert_eq!(
            all(&chain, Stream::Readable, layout.header),
            [piece(0, 0, 8), piece(1, 0, 8)]
        );
        assert_eq!(
            all(&chain, Stream::Readable, layout.readable_data),
            [piece(1, 8, 512)]
        );
    }

    #[test]
    fn header_over_16_one_byte_descriptors() {
        let mut chain = vec![r(1); 16];
        chain.push(w(1));
        let layout = layout(&chain).unwrap();
        let header = all(&chain, Stream::Readable, layout.header);
        assert_eq!(header, (0..16).map(|i| piece(i, 0, 1)).collect::<Vec<_>>());
        assert!(layout.readable_data.is_empty());
        assert_eq!(
            all(&chain, Stream::Writable, layout.status()),
            [piece(16, 0, 1)]
        );
    }

    #[test]
    fn zero_length_descriptors_give_no_pieces() {
        let chain = [r(0), r(16), r(0), w(0), w(512), w(0), w(1), w(0)];
        let layout = layout(&chain).unwrap();
        assert_eq!(
            all(&chain, Stream::Readable, layout.header),
            [piece(1, 0, 16)]
        );
        assert_eq!(
            all(&chain, Stream::Writable, layout.writable_data),
            [piece(4, 0, 512)]
        );
        assert_eq!(
            all(&chain, Stream::Writable, layout.status()),
            [piece(6, 0, 1)]
        );
        assert_eq!(status_piece(&chain), Some(piece(6, 0, 1)));
    }

    #[test]
    fn readable_after_writable_is_malformed() {
        assert_eq!(
            layout(&[r(16), w(1), r(512), w(1)]),
            Err(Malformed::ReadableAfterWritable { segment: 2 })
        );
        assert_eq!(
            layout(&[w(1), r(16)]),
            Err(Malformed::ReadableAfterWritable { segment: 1 })
        );
        // Even an empty readable descriptor breaks the order.
        assert_eq!(
            layout(&[r(16), w(1), r(0)]),
            Err(Malformed::ReadableAfterWritable { segment: 2 })
        );
    }

    #[test]
    fn chain_without_a_writable_byte_has_no_status() {
        assert_eq!(layout(&[r(16), r(512)]), Err(Malformed::NoStatus));
        assert_eq!(layout(&[r(16), w(0)]), Err(Malformed::NoStatus));
        assert_eq!(layout(&[]), Err(Malformed::NoStatus));
        assert_eq!(status_piece(&[r(16), r(512)]), None);
        assert_eq!(status_piece(&[r(16), w(0)]), None);
        assert_eq!(status_piece(&[]), None);
    }

    #[test]
    fn fewer_than_16_readable_bytes_is_a_short_header() {
        assert_eq!(
            layout(&[r(15), w(1)]),
            Err(Malformed::ShortHeader { readable: 15 })
        );
        assert_eq!(
            layout(&[r(8), r(7), w(513)]),
            Err(Malformed::ShortHeader { readable: 15 })
        );
        assert_eq!(
            layout(&[w(17)]),
            Err(Malformed::ShortHeader { readable: 0 })
        );
        // The status byte can still carry an IOERR.
        assert_eq!(status_piece(&[r(15), w(4)]), Some(piece(1, 3, 1)));
    }

    #[test]
    fn chain_over_the_byte_limit_is_too_long() {
        assert_eq!(
            layout(&[r(16), w(u32::MAX)]),
            Err(Malformed::TooLong {
                at_least: u64::from(u32::MAX) + 16
            })
        );
        assert_eq!(
            layout(&[r(u32::MAX), r(u32::MAX), w(1)]),
            Err(Malformed::TooLong {
                at_least: 2 * u64::from(u32::MAX)
            })
        );
        let exactly = layout(&[r(16), w(u32::MAX - 16)]).unwrap();
        assert_eq!(exactly.status_at, u64::from(u32::MAX) - 17);
    }

    #[test]
    fn malformed_chain_ending_in_a_writable_byte_still_has_a_status_piece() {
        assert_eq!(status_piece(&[w(4), r(16), w(2)]), Some(piece(2, 1, 1)));
        assert_eq!(status_piece(&[w(4), r(16)]), None);
        assert_eq!(status_piece(&[r(16), w(4), r(0)]), Some(piece(1, 3, 1)));
    }

    #[test]
    fn pieces_of_a_range_past_the_stream_end_are_cut() {
        let chain = [r(16), r(100), w(10)];
        assert_eq!(
            all(&chain, Stream::Readable, ByteRange::new(100, 1000)),
            [piece(1, 84, 16)]
        );
        assert!(all(&chain, Stream::Readable, ByteRange::new(116, 200)).is_empty());
        assert!(all(&chain, Stream::Writable, ByteRange::new(5, 5)).is_empty());
        assert!(all(&chain, Stream::Writable, ByteRange::new(9, 3)).is_empty());
        assert_eq!(
            all(&chain, Stream::Writable, ByteRange::new(3, u64::MAX)),
            [piece(2, 3, 7)]
        );
    }

    #[test]
    fn byte_range_length_never_underflows() {
        assert_eq!(ByteRange::new(3, 10).len(), 7);
        assert_eq!(ByteRange::new(10, 3).len(), 0);
        assert!(ByteRange::new(10, 3).is_empty());
        assert!(ByteRange::new(4, 4).is_empty());
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        fn segment() -> impl Strategy<Value = Segment> {
            let len = prop_oneof![
                4 => 0u32..40,
                1 => Just(u32::MAX),
                1 => any::<u32>(),
            ];
            (len, any::<bool>()).prop_map(|(len, writable)| Segment { len, writable })
        }

        fn stream_len(segments: &[Segment], stream: Stream) -> u64 {
            segments
                .iter()
                .filter(|s| stream.holds(s))
                .map(|s| u64::from(s.len))
                .sum()
        }

        fn covered(segments: &[Segment], stream: Stream, range: ByteRange) -> u64 {
            pieces(segments, stream, range)
                .map(|p| {
                    let segment = segments[p.segment];
                    assert!(stream.holds(&segment));
                    assert!(p.len > 0);
                    assert!(u64::from(p.offset) + u64::from(p.len) <= u64::from(segment.len));
                    u64::from(p.len)
                })
                .sum()
        }

        proptest! {
            #[test]
            fn layout_ranges_stay_inside_their_streams(
                segments in proptest::collection::vec(segment(), 0..12),
            ) {
                let status = status_piece(&segments);
                if let Ok(layout) = layout(&segments) {
                    let readable = stream_len(&segments, Stream::Readable);
                    let writable = stream_len(&segments, Stream::Writable);
                    prop_assert!(readable + writable <= MAX_CHAIN_BYTES);
                    prop_assert_eq!(layout.header, ByteRange::new(0, 16));
                    prop_assert_eq!(layout.readable_data, ByteRange::new(16, readable));
                    prop_assert_eq!(layout.writable_data, ByteRange::new(0, writable - 1));
                    prop_assert_eq!(layout.status_at, writable - 1);
                    for (stream, range) in [
                        (Stream::Readable, layout.header),
                        (Stream::Readable, layout.readable_data),
                        (Stream::Writable, layout.writable_data),
                        (Stream::Writable, layout.status()),
                    ] {
                        prop_assert_eq!(covered(&segments, stream, range), range.len());
                    }
                    let mapped: Vec<Piece> =
                        pieces(&segments, Stream::Writable, layout.status()).collect();
                    prop_assert_eq!(status.into_iter().collect::<Vec<_>>(), mapped);
                }
            }

            #[test]
            fn pieces_never_exceed_the_range_or_the_stream(
                segments in proptest::collection::vec(segment(), 0..12),
                start in 0u64..200,
                len in 0u64..200,
                writable in any::<bool>(),
            ) {
                let stream = if writable { Stream::Writable } else { Stream::Readable };
                let range = ByteRange::new(start, start + len);
                let total = stream_len(&segments, stream);
                let want = range.end.min(total).saturating_sub(range.start.min(total));
                prop_assert_eq!(covered(&segments, stream, range), want);
            }
        }
    }
}
