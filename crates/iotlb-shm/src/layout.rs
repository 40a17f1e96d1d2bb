//! Layout v2 of the shared memory files: every offset and constant a reader
//! in any language needs. `docs/shm-layout.md` is the prose version of this
//! module; both must change together (bump [`VERSION`]).
//!
//! All multi-byte fields are little-endian `u64` words at 8-byte aligned
//! offsets, read and written only with single-word atomic operations.

/// First word of the table file: the bytes `VIOTLBv1` (the format's name,
/// unchanged across layout versions; see [`VERSION`]).
pub const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"VIOTLBv1");
/// First word of a reader-slot file: the bytes `VIOSLOT1`.
pub const SLOTS_MAGIC: u64 = u64::from_le_bytes(*b"VIOSLOT1");
/// Layout version; readers refuse any other value. Version 2 added the
/// writer's liveness word ([`header::LIVENESS`]), which readers must check,
/// and the slot file's `closed` word ([`slots::CLOSED`]).
pub const VERSION: u64 = 2;

/// Page size of every file and of the smallest leaf.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes per radix node (one page).
pub const NODE_BYTES: u64 = 4096;
/// Entries per radix node.
pub const ENTRIES_PER_NODE: u64 = 512;
/// Bits of IOVA consumed per radix level.
pub const BITS_PER_LEVEL: u32 = 9;
/// Bits of IOVA below the lowest level (the 4 KiB page offset).
pub const PAGE_SHIFT: u32 = 12;
/// Highest level that may hold a leaf: 0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB.
pub const MAX_LEAF_LEVEL: u32 = 2;
/// Most levels a table can have (64-bit input range).
pub const MAX_LEVELS: u32 = 6;

/// The value of [`header::HANDOVER`] when the handover is on.
pub const HANDOVER_VALUE: u64 = 1;

/// Byte offsets of the table file's header words.
pub mod header {
    /// [`super::TABLE_MAGIC`].
    pub const MAGIC: usize = 0;
    /// [`super::VERSION`].
    pub const VERSION: usize = 8;
    /// Lowest endpoint ID that has a word.
    pub const ENDPOINT_BASE: usize = 16;
    /// Number of endpoint words.
    pub const ENDPOINT_COUNT: usize = 24;
    /// Radix levels of every domain's table (1..=6).
    pub const LEVELS: usize = 32;
    /// IOVAs at or above `1 << INPUT_BITS` are never mapped (64 = all).
    pub const INPUT_BITS: usize = 40;
    /// Nodes per arena segment.
    pub const SEGMENT_NODES: usize = 48;
    /// Most segments the arena may grow to.
    pub const MAX_SEGMENTS: usize = 56;
    /// The global epoch, on its own cache line (64..128) with
    /// [`LIVENESS`].
    pub const EPOCH: usize = 64;
    /// The writer's liveness word, on the epoch's cache line so that a
    /// session reads it for free: see [`super::liveness`].
    pub const LIVENESS: usize = 72;
    /// Segments currently in the arena file, alone on its cache line.
    pub const SEGMENTS: usize = 128;
    /// Process ID of the writer (informational).
    pub const WRITER_PID: usize = 192;
    /// [`super::HANDOVER_VALUE`] if the writer keeps a list of its readers
    /// that outlives it (the daemon's `--state-dir`), so that the next
    /// writer waits for them: readers may then go on translating through
    /// the frozen table of a dead writer until they hand it over (`0`:
    /// every session of a dead writer's table faults).
    pub const HANDOVER: usize = 200;
    /// Size of the header; the endpoint words start here.
    pub const BYTES: usize = 4096;
}

/// Byte offset of endpoint word `i` (endpoint `ENDPOINT_BASE + i`).
pub const fn endpoint_offset(i: u64) -> usize {
    header::BYTES + (i as usize) * 8
}

/// Size of the table file for `endpoints` endpoint words, page-rounded.
pub const fn table_file_bytes(endpoints: u64) -> u64 {
    let raw = header::BYTES as u64 + endpoints * 8;
    raw.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Endpoint word: bits 0–1.
pub mod endpoint {
    /// DMA from the endpoint faults (reason DOMAIN).
    pub const KIND_BLOCKED: u64 = 0;
    /// DMA passes untranslated: guest-physical = IOVA.
    pub const KIND_BYPASS: u64 = 1;
    /// DMA is translated by the radix table whose root node is in bits 32–63.
    pub const KIND_DOMAIN: u64 = 2;
    /// Mask of the kind bits.
    pub const KIND_MASK: u64 = 0b11;
    /// Bits 2–31: generation, +1 (mod 2^30) on every change of the word.
    pub const GENERATION_SHIFT: u32 = 2;
    /// Mask of the generation once shifted down.
    pub const GENERATION_MASK: u64 = (1 << 30) - 1;
    /// Bits 32–63: root node index.
    pub const ROOT_SHIFT: u32 = 32;
}

/// The liveness word ([`header::LIVENESS`]) is a robust futex of the
/// writer process: while the writer lives, its low 32 bits hold the thread
/// ID of a writer thread that registered the word in its robust-futex list
/// (`set_robust_list(2)`); when that thread exits — the writer process
/// exiting, crashing or being killed, however it ends — the kernel clears
/// the thread ID and sets [`OWNER_DIED`](liveness::OWNER_DIED) before the
/// process's descriptors close. The writer also sets `OWNER_DIED` itself when
/// it drops the table. Readers treat the table as **detached** (every
/// translation faults) once the thread ID is 0 or `OWNER_DIED` is set.
pub mod liveness {
    /// Set by the kernel (or the writer) when the writer is gone.
    pub const OWNER_DIED: u64 = 0x4000_0000;
    /// The thread-ID bits.
    pub const TID_MASK: u64 = 0x3fff_ffff;
}

/// Page-table entry bits.
pub mod pte {
    /// The entry is valid.
    pub const PRESENT: u64 = 1 << 0;
    /// The entry is a leaf (else it points to a child node).
    pub const LEAF: u64 = 1 << 1;
    /// Leaf: device reads allowed.
    pub const READ: u64 = 1 << 2;
    /// Leaf: device writes allowed.
    pub const WRITE: u64 = 1 << 3;
    /// Leaf: the target is MMIO, not RAM.
    pub const MMIO: u64 = 1 << 4;
    /// Leaf: guest-physical address (aligned to the leaf size).
    /// Table: child node index shifted left by 12.
    pub const ADDR_MASK: u64 = !0xfff;
    /// Shift of the child node index in a table entry.
    pub const CHILD_SHIFT: u32 = 12;
}

/// Byte offsets in a reader-slot file.
pub mod slots {
    /// [`super::SLOTS_MAGIC`].
    pub const MAGIC: usize = 0;
    /// [`super::VERSION`].
    pub const VERSION: usize = 8;
    /// Number of session slots.
    pub const SLOT_COUNT: usize = 16;
    /// Number of pin records.
    pub const PIN_COUNT: usize = 24;
    /// High-water mark of slots ever claimed (written by the reader, never
    /// decreases): the writer only scans slots below it.
    pub const SLOTS_USED: usize = 32;
    /// High-water mark of pin records ever claimed, likewise.
    pub const PINS_USED: usize = 40;
    /// Set to [`CLOSED_VALUE`] by the reader process once it has released
    /// every slot and pin of the file and unmaps it: from then on nothing of
    /// that process can use the file, and the writer may forget it at once.
    pub const CLOSED: usize = 48;
    /// The value of [`CLOSED`] once closed (0 while open).
    pub const CLOSED_VALUE: u64 = 1;
    /// Set to [`RETIRED_VALUE`] by the reader process when it stops
    /// starting sessions with this file (it connected to a restarted
    /// daemon and hands the file over): sessions entered after it fault.
    pub const RETIRED: usize = 56;
    /// The value of [`RETIRED`] once retired (0 before).
    pub const RETIRED_VALUE: u64 = 1;
    /// First slot; slot `i` is the first word of the 64-byte line at
    /// `FIRST_SLOT + 64 * i`.
    pub const FIRST_SLOT: usize = 64;
    /// Bytes per slot (one cache line, so threads never share a line).
    pub const SLOT_STRIDE: usize = 64;
    /// Bytes per pin record: state, endpoint, first IOVA, last IOVA.
    pub const PIN_STRIDE: usize = 32;
    /// Slot state: outside any session.
    pub const QUIESCENT: u64 = 0;
    /// Slot state bit 0: inside a session; bits 1–63 hold its epoch.
    pub const ACTIVE: u64 = 1;
    /// Pin state bit 0: the pin is held; bits 1–63 count its uses.
    pub const PIN_HELD: u64 = 1;

    /// Byte offset of slot `i`.
    pub const fn slot_offset(i: usize) -> usize {
        FIRST_SLOT + i * SLOT_STRIDE
    }

    /// Byte offset of pin record `j` in a file with `slot_count` slots.
    pub const fn pin_offset(slot_count: usize, j: usize) -> usize {
        FIRST_SLOT + slot_count * SLOT_STRIDE + j * PIN_STRIDE
    }

    /// Size of a slot file, page-rounded.
    pub const fn file_bytes(slot_count: usize, pin_count: usize) -> usize {
        pin_offset(slot_count, pin_count).div_ceil(4096) * 4096
    }
}

/// Levels needed to translate `input_bits` bits of IOVA.
pub const fn levels_for(input_bits: u32) -> u32 {
    let bits = if input_bits <= PAGE_SHIFT {
        1
    } else {
        input_bits - PAGE_SHIFT
    };
    bits.div_ceil(BITS_PER_LEVEL)
}

/// Bytes covered by one entry at `level`.
pub const fn entry_span(level: u32) -> u64 {
    1u64 << (PAGE_SHIFT + BITS_PER_LEVEL * level)
}

/// Index into the node at `level` for `iova`.
pub const fn entry_index(iova: u64, level: u32) -> usize {
    ((iova >> (PAGE_SHIFT + BITS_PER_LEVEL * level)) & (ENTRIES_PER_NODE - 1)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_cover_the_input_range() {
        assert_eq!(levels_for(12), 1);
        assert_eq!(levels_for(21), 1);
        assert_eq!(levels_for(22), 2);
        assert_eq!(levels_for(39), 3);
        assert_eq!(levels_for(48), 4);
        assert_eq!(levels_for(64), 6);
        assert_eq!(entry_span(0), 4096);
        assert_eq!(entry_span(1), 2 << 20);
        assert_eq!(entry_span(2), 1 << 30);
        assert_eq!(entry_index(0xffff_f000, 0), 511);
        assert_eq!(entry_index(0xffff_f000, 1), 511);
        assert_eq!(entry_index(0xffff_f000, 2), 3);
    }

    #[test]
    fn files_are_page_rounded_and_the_epoch_has_its_own_line() {
        assert_eq!(table_file_bytes(0), 4096);
        assert_eq!(table_file_bytes(512), 8192);
        assert_eq!(table_file_bytes(513), 12288);
        assert_eq!(header::EPOCH % 64, 0);
        assert_eq!(header::SEGMENTS - header::EPOCH, 64);
        assert_eq!(header::LIVENESS / 64, header::EPOCH / 64);
        const { assert!(slots::CLOSED < slots::FIRST_SLOT) };
        assert_eq!(slots::file_bytes(64, 256), 4096 * 4);
        assert_eq!(&TABLE_MAGIC.to_le_bytes(), b"VIOTLBv1");
    }
}
