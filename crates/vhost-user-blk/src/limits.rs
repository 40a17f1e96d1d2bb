//! How much one DISCARD or WRITE_ZEROES request may ask for. The config
//! space advertises these (§5.2.4) and [`check_segments`] enforces them.
//!
//! [`check_segments`]: crate::segments::check_segments

/// Sectors in one DISCARD segment (2 GiB; a multiple of every block size).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Segments in one DISCARD request (Linux caps its own at 256; 4 KiB of
/// segment descriptors).
pub const MAX_DISCARD_SEG: u32 = 256;
/// Sectors in one WRITE_ZEROES segment (2 GiB).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
/// Segments in one WRITE_ZEROES request.
pub const MAX_WRITE_ZEROES_SEG: u32 = 256;
