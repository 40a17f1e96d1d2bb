//! C ABI for readers written in C (feature `capi`; header
//! `include/iotlb_shm.h`, example `examples/c/translate.c`).
//!
//! Handles are opaque heap objects:
//!
//! | handle | made by | freed by | Rust object |
//! |---|---|---|---|
//! | `struct iotlb_table` | [`iotlb_table_open`] | [`iotlb_table_close`] | [`TableReader`] |
//! | `struct iotlb_slots` | [`iotlb_slots_open`] | [`iotlb_slots_close`] | [`SlotFile`] |
//! | `struct iotlb_slot` | [`iotlb_slot_claim`] | [`iotlb_slot_release`] | [`ReaderSlot`] |
//! | `struct iotlb_session` | [`iotlb_session_enter`] | [`iotlb_session_exit`] | [`Session`] |
//! | `struct iotlb_pin` | [`iotlb_pin`] | [`iotlb_unpin`] | [`Pin`] |
//!
//! Ownership is reference-counted inside: a slot keeps its slot file and
//! the table of its last session alive, a pin keeps its slot file alive, so
//! closing `iotlb_table`/`iotlb_slots` handles while slots or pins are still
//! out is safe. A session lives *inside* its slot (entering allocates
//! nothing); the `struct iotlb_session *` stays a valid pointer until the
//! slot is released, and using it after `iotlb_session_exit` returns
//! `-EINVAL` instead of translating.
//!
//! Return values: `0` on success, a positive `IOTLB_FAULT_*` code when a
//! translation faults, a negative errno value on misuse or system failure.
//! No function unwinds into C: every body runs under `catch_unwind` and a
//! panic becomes `-EIO`.
//!
//! Threads: a slot (and its session) belongs to one thread at a time. Table
//! and slot-file handles may be shared by threads (each claims its own
//! slot). Pins may be released from any thread.

use std::ffi::c_int;
use std::os::fd::BorrowedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::access::{Access, Fault, FaultKind, Piece};
use crate::reader::{OpenError, Pin, PinError, ReaderSlot, Session, TableReader};
use crate::slots::{SlotError, SlotFile};

/// `iotlb_translate` result: the endpoint is blocked or unknown.
pub const IOTLB_FAULT_DOMAIN: c_int = 1;
/// `iotlb_translate` result: no mapping covers the address.
pub const IOTLB_FAULT_MAPPING: c_int = 2;
/// `iotlb_translate` result: a mapping covers it without the permission.
pub const IOTLB_FAULT_PERMISSION: c_int = 3;
/// `iotlb_translate` result: the daemon that wrote the table is gone;
/// nothing translates until the backend connects to a live daemon again.
pub const IOTLB_FAULT_DETACHED: c_int = 4;

/// Access bit: the device reads memory.
pub const IOTLB_ACCESS_READ: u8 = 1;
/// Access bit: the device writes memory.
pub const IOTLB_ACCESS_WRITE: u8 = 2;
/// `IOTLB_ACCESS_READ | IOTLB_ACCESS_WRITE`.
pub const IOTLB_ACCESS_READ_WRITE: u8 = 3;

/// [`IotlbPiece::flags`] bit: the target is MMIO, not RAM.
pub const IOTLB_PIECE_MMIO: u32 = 1;

/// One guest-physical piece of a translation (`struct iotlb_piece`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IotlbPiece {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Bytes in the piece (for `iotlb_translate`: bytes left in the leaf,
    /// saturated at `UINT64_MAX`).
    pub len: u64,
    /// `IOTLB_PIECE_*` bits.
    pub flags: u32,
    /// Zero.
    pub reserved: u32,
}

const _: () = assert!(size_of::<IotlbPiece>() == 24 && align_of::<IotlbPiece>() == 8);

impl From<Piece> for IotlbPiece {
    fn from(p: Piece) -> Self {
        Self {
            gpa: p.gpa,
            len: p.len,
            flags: if p.mmio { IOTLB_PIECE_MMIO } else { 0 },
            reserved: 0,
        }
    }
}

/// An opened table (`struct iotlb_table`).
#[derive(Debug)]
pub struct IotlbTable {
    reader: Arc<TableReader>,
}

/// An opened slot file (`struct iotlb_slots`).
#[derive(Debug)]
pub struct IotlbSlots {
    file: Arc<SlotFile>,
}

/// A session inside its slot (`struct iotlb_session`).
#[derive(Debug)]
pub struct IotlbSession {
    /// The open session. Its `'static` is a lie told to the borrow checker:
    /// it really borrows `*IotlbSlot::reader` (a separate heap object that
    /// is only freed after this is cleared) and the table in
    /// `IotlbSlot::table` (kept alive by that `Arc` while this is `Some`).
    inner: Option<Session<'static>>,
}

/// A claimed session slot (`struct iotlb_slot`).
#[derive(Debug)]
pub struct IotlbSlot {
    /// From `Box::into_raw`; freed in [`iotlb_slot_release`] after the
    /// session that borrows it is gone.
    reader: *mut ReaderSlot,
    /// The table of the current (or last) session.
    table: Option<Arc<TableReader>>,
    session: IotlbSession,
}

/// A pinned range (`struct iotlb_pin`).
#[derive(Debug)]
pub struct IotlbPin {
    _pin: Pin,
}

fn ffi(f: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(-libc::EIO)
}

fn fault_code(f: &Fault) -> c_int {
    match f.kind {
        FaultKind::Domain => IOTLB_FAULT_DOMAIN,
        FaultKind::Mapping => IOTLB_FAULT_MAPPING,
        FaultKind::Permission => IOTLB_FAULT_PERMISSION,
        FaultKind::Detached => IOTLB_FAULT_DETACHED,
    }
}

fn os_error(e: &std::io::Error) -> c_int {
    -e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO)
}

fn open_error(e: &OpenError) -> c_int {
    match e {
        OpenError::Io { source, .. } => os_error(source),
        OpenError::Format { .. } | OpenError::Geometry(_) => -libc::EPROTO,
        OpenError::Seals { .. } => -libc::EACCES,
    }
}

fn slot_error(e: &SlotError) -> c_int {
    match e {
        SlotError::Io { source, .. } => os_error(source),
        SlotError::Counts { .. } | SlotError::Format { .. } => -libc::EPROTO,
        SlotError::NotSealed(_) => -libc::EACCES,
        SlotError::Closed => -libc::EBADF,
        SlotError::NoFreeSlot(_) | SlotError::NoFreePin(_) => -libc::ENOSPC,
    }
}

/// Writes a new boxed handle to `*out`.
///
/// # Safety
/// `out` is non-null and valid for a pointer write.
unsafe fn put<T>(out: *mut *mut T, value: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { out.write(Box::into_raw(Box::new(value))) };
}

/// Opens the translation table from its two descriptors (the daemon's
/// table and arena memfds). The descriptors stay owned by the caller and
/// may be closed once this returns.
///
/// Returns 0 and stores a handle in `*out`, or a negative errno value:
/// `-EINVAL` (null `out`), `-EBADF` (negative fd), `-EPROTO` (not a v2
/// table), `-EACCES` (not sealed read-only), or the OS error.
///
/// # Safety
/// `out` is null or valid for a pointer write; the fds are open or negative.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_table_open(
    table_fd: c_int,
    arena_fd: c_int,
    out: *mut *mut IotlbTable,
) -> c_int {
    ffi(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        if table_fd < 0 || arena_fd < 0 {
            return -libc::EBADF;
        }
        // SAFETY: the caller guarantees both descriptors are open for the
        // duration of this call; they are only used within it.
        let (table, arena) = unsafe {
            (
                BorrowedFd::borrow_raw(table_fd),
                BorrowedFd::borrow_raw(arena_fd),
            )
        };
        match TableReader::open(table, arena) {
            Ok(reader) => {
                // SAFETY: `out` is non-null (checked) and writable (caller).
                unsafe {
                    put(
                        out,
                        IotlbTable {
                            reader: Arc::new(reader),
                        },
                    )
                };
                0
            }
            Err(e) => open_error(&e),
        }
    })
}

/// Closes a table handle. Slots whose last session used this table keep
/// the mapping alive until they are released. Null is ignored.
///
/// # Safety
/// `table` is null or a handle from `iotlb_table_open` not yet closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_table_close(table: *mut IotlbTable) {
    ffi(|| {
        if !table.is_null() {
            // SAFETY: a live handle made by `put` (caller), freed only here.
            drop(unsafe { Box::from_raw(table) });
        }
        0
    });
}

/// The table's current global epoch (diagnostics), or 0 for null.
///
/// # Safety
/// `table` is null or a live table handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_table_epoch(table: *const IotlbTable) -> u64 {
    // SAFETY: null or live (caller).
    match unsafe { table.as_ref() } {
        Some(t) => catch_unwind(AssertUnwindSafe(|| t.reader.epoch())).unwrap_or(0),
        None => 0,
    }
}

/// Opens this process's slot file (given by the daemon), writable. The
/// descriptor stays owned by the caller.
///
/// Returns 0 and stores a handle in `*out`, or `-EINVAL`, `-EBADF`,
/// `-EPROTO` (not a v2 slot file), `-EACCES` (not sealed), `-EBADF` (already
/// closed by this process), or the OS error.
///
/// # Safety
/// `out` is null or valid for a pointer write; the fd is open or negative.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_slots_open(slots_fd: c_int, out: *mut *mut IotlbSlots) -> c_int {
    ffi(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        if slots_fd < 0 {
            return -libc::EBADF;
        }
        // SAFETY: the caller guarantees the descriptor is open during the call.
        let fd = unsafe { BorrowedFd::borrow_raw(slots_fd) };
        match SlotFile::open(fd) {
            Ok(file) => {
                // SAFETY: `out` is non-null (checked) and writable (caller).
                unsafe { put(out, IotlbSlots { file }) };
                0
            }
            Err(e) => slot_error(&e),
        }
    })
}

/// Retires the slot file: sessions entered with it from now on fault
/// `IOTLB_FAULT_DETACHED`; sessions already open and pins already held are
/// unaffected. Call it once connected to a restarted daemon, just before
/// handing it this file (`PREVIOUS_TABLE`, docs/backend-protocol.md).
///
/// Returns 0, or `-EINVAL` for a null handle.
///
/// # Safety
/// `slots` is null or a live handle from `iotlb_slots_open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_slots_retire(slots: *const IotlbSlots) -> c_int {
    ffi(|| {
        // SAFETY: null or a live handle (caller).
        match unsafe { slots.as_ref() } {
            Some(s) => {
                s.file.retire();
                0
            }
            None => -libc::EINVAL,
        }
    })
}

/// Closes a slot-file handle; claimed slots and held pins keep the file
/// mapped until they are released. Null is ignored.
///
/// # Safety
/// `slots` is null or a handle from `iotlb_slots_open` not yet closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_slots_close(slots: *mut IotlbSlots) {
    ffi(|| {
        if !slots.is_null() {
            // SAFETY: a live handle made by `put` (caller), freed only here.
            drop(unsafe { Box::from_raw(slots) });
        }
        0
    });
}

/// Claims a session slot for the calling thread.
///
/// Returns 0 and stores a handle in `*out`, `-ENOSPC` if every slot is
/// claimed, or `-EINVAL` for null arguments.
///
/// # Safety
/// `slots` is null or a live slot-file handle; `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_slot_claim(
    slots: *const IotlbSlots,
    out: *mut *mut IotlbSlot,
) -> c_int {
    ffi(|| {
        // SAFETY: null or live (caller).
        let Some(slots) = (unsafe { slots.as_ref() }) else {
            return -libc::EINVAL;
        };
        if out.is_null() {
            return -libc::EINVAL;
        }
        match slots.file.claim_slot() {
            Ok(reader) => {
                let reader = Box::into_raw(Box::new(reader));
                // SAFETY: `out` is non-null (checked) and writable (caller).
                unsafe {
                    put(
                        out,
                        IotlbSlot {
                            reader,
                            table: None,
                            session: IotlbSession { inner: None },
                        },
                    )
                };
                0
            }
            Err(e) => slot_error(&e),
        }
    })
}

/// Releases a slot. A session still open in it is exited first (its
/// `struct iotlb_session *` becomes invalid). Null is ignored.
///
/// # Safety
/// `slot` is null or a handle from `iotlb_slot_claim` not yet released,
/// not in use by another thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_slot_release(slot: *mut IotlbSlot) {
    ffi(|| {
        if slot.is_null() {
            return 0;
        }
        // SAFETY: a live handle made by `put` (caller), freed only here.
        let mut slot = unsafe { Box::from_raw(slot) };
        // The session borrows `*slot.reader` and `slot.table`: end it first.
        slot.session.inner = None;
        // SAFETY: made by `Box::into_raw` in `iotlb_slot_claim`; nothing
        // borrows it any more (the session is gone).
        drop(unsafe { Box::from_raw(slot.reader) });
        drop(slot);
        0
    });
}

/// Enters a session on `table` in `slot`: translations obtained in it stay
/// valid (the daemon completes no UNMAP that affects them) until
/// [`iotlb_session_exit`]. Keep sessions short; pin ranges whose I/O
/// outlives the session.
///
/// Returns 0 and stores the session in `*out` (a pointer into the slot: no
/// allocation), `-EBUSY` if the slot already has a session open, or
/// `-EINVAL` for null arguments.
///
/// # Safety
/// `slot` is null or a live slot handle used by this thread only; `table`
/// is null or a live table handle; `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_session_enter(
    slot: *mut IotlbSlot,
    table: *const IotlbTable,
    out: *mut *mut IotlbSession,
) -> c_int {
    ffi(|| {
        // SAFETY: null or live, and not used concurrently (caller).
        let Some(slot) = (unsafe { slot.as_mut() }) else {
            return -libc::EINVAL;
        };
        // SAFETY: null or live (caller).
        let Some(table) = (unsafe { table.as_ref() }) else {
            return -libc::EINVAL;
        };
        if out.is_null() {
            return -libc::EINVAL;
        }
        if slot.session.inner.is_some() {
            return -libc::EBUSY;
        }
        // Keep the table alive for as long as the session may borrow it; a
        // pointer comparison, so re-entering on the same table is free.
        if !slot
            .table
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, &table.reader))
        {
            slot.table = Some(Arc::clone(&table.reader));
        }
        // SAFETY: the pointee is also held by the `Arc` in `slot.table`,
        // which is neither replaced (only done with no session open, above)
        // nor dropped (only after clearing the session, in
        // `iotlb_slot_release`) while the session exists.
        let reader: &'static TableReader = unsafe { &*Arc::as_ptr(&table.reader) };
        // SAFETY: `slot.reader` is the live heap `ReaderSlot` of this slot;
        // no other reference to it exists while no session is open (checked
        // above), and it is freed only after the session is cleared.
        let rs: &'static mut ReaderSlot = unsafe { &mut *slot.reader };
        slot.session.inner = Some(rs.enter(reader));
        // SAFETY: `out` is non-null (checked) and writable (caller).
        unsafe { out.write(&raw mut slot.session) };
        0
    })
}

/// Ends a session. Null or an already exited session is ignored.
///
/// # Safety
/// `session` is null or was returned by `iotlb_session_enter` for a slot
/// that is still claimed, and is used by that slot's thread only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_session_exit(session: *mut IotlbSession) {
    ffi(|| {
        // SAFETY: null or points into a live slot (caller).
        if let Some(s) = unsafe { session.as_mut() } {
            s.inner = None;
        }
        0
    });
}

/// Borrows the open session behind `session`, if any.
///
/// # Safety
/// `session` is null or points into a live slot (see `iotlb_session_exit`).
unsafe fn open_session<'a>(session: *const IotlbSession) -> Option<&'a Session<'static>> {
    // SAFETY: guaranteed by the caller.
    unsafe { session.as_ref() }.and_then(|s| s.inner.as_ref())
}

/// Translates the page or leaf holding `iova` for `endpoint`: the
/// guest-physical address and the bytes that follow it in the same leaf.
///
/// Returns 0 and fills `*out`, a positive `IOTLB_FAULT_*` code (and leaves
/// `*out` untouched), or `-EINVAL` (null pointer, session exited, `access`
/// not 1, 2 or 3).
///
/// # Safety
/// `session` as for `iotlb_session_exit`; `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_translate(
    session: *const IotlbSession,
    endpoint: u32,
    iova: u64,
    access: u8,
    out: *mut IotlbPiece,
) -> c_int {
    ffi(|| {
        // SAFETY: forwarded from this function's contract.
        let Some(s) = (unsafe { open_session(session) }) else {
            return -libc::EINVAL;
        };
        let Some(access) = Access::from_bits(access) else {
            return -libc::EINVAL;
        };
        if out.is_null() {
            return -libc::EINVAL;
        }
        match s.translate_one(endpoint, iova, access) {
            Ok(p) => {
                // SAFETY: non-null (checked) and writable (caller).
                unsafe { out.write(p.into()) };
                0
            }
            Err(f) => fault_code(&f),
        }
    })
}

/// Translates `n` IOVAs of `endpoint` at once (see
/// [`Session::translate_burst`]): for each `i < n`, `results[i]` is 0 and
/// `pieces[i]` holds what `iotlb_translate` would give for `iovas[i]`, or
/// `results[i]` is the positive `IOTLB_FAULT_*` code (`pieces[i]`
/// untouched).
///
/// Returns the number of IOVAs that faulted (0: all translated; saturated
/// at `INT_MAX`), or `-EINVAL` (null pointer with `n` > 0, session exited,
/// bad `access`; nothing written).
///
/// # Safety
/// `session` as for `iotlb_session_exit`; `iovas` is valid for `n` reads
/// and `pieces` and `results` for `n` writes (any of them may be null if
/// `n` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_translate_burst(
    session: *const IotlbSession,
    endpoint: u32,
    iovas: *const u64,
    n: usize,
    access: u8,
    pieces: *mut IotlbPiece,
    results: *mut c_int,
) -> c_int {
    /// Translations per call of the Rust API (a stack buffer).
    const CHUNK: usize = 32;
    ffi(|| {
        // SAFETY: forwarded from this function's contract.
        let Some(s) = (unsafe { open_session(session) }) else {
            return -libc::EINVAL;
        };
        let Some(access) = Access::from_bits(access) else {
            return -libc::EINVAL;
        };
        if n == 0 {
            return 0;
        }
        if iovas.is_null() || pieces.is_null() || results.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: non-null (checked), valid for `n` reads (caller), and not
        // written while this slice lives (the output arrays are others).
        let iovas = unsafe { std::slice::from_raw_parts(iovas, n) };
        let unset = Err(Fault {
            kind: FaultKind::Detached,
            endpoint,
            iova: 0,
            access,
        });
        let mut buf = [unset; CHUNK];
        let mut faults: c_int = 0;
        for (c, chunk) in iovas.chunks(CHUNK).enumerate() {
            let done = s.translate_burst(endpoint, chunk, access, &mut buf);
            for (k, r) in buf.iter().take(done).enumerate() {
                let i = c * CHUNK + k;
                let rc = match r {
                    Ok(p) => {
                        // SAFETY: i < n and `pieces` is valid for n writes
                        // (caller).
                        unsafe { pieces.add(i).write((*p).into()) };
                        0
                    }
                    Err(f) => {
                        faults = faults.saturating_add(1);
                        fault_code(f)
                    }
                };
                // SAFETY: i < n and `results` is valid for n writes (caller).
                unsafe { results.add(i).write(rc) };
            }
        }
        faults
    })
}

/// Translates `[iova, iova + len)` into guest-physical pieces (physically
/// contiguous leaves merged), writing at most `max_pieces` to `pieces` and
/// their number to `*n_pieces`.
///
/// Returns 0 if the pieces cover the whole range; a positive
/// `IOTLB_FAULT_*` code if the range faults at the byte right after the
/// pieces written (IOVA `iova + sum of their lengths`); `-ENOSPC` if the
/// range needs more than `max_pieces` pieces (those written cover a
/// prefix); `-EINVAL` for null pointers, an exited session or a bad
/// `access`.
///
/// # Safety
/// `session` as for `iotlb_session_exit`; `pieces` is valid for
/// `max_pieces` writes (may be null if `max_pieces` is 0); `n_pieces` is
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_translate_range(
    session: *const IotlbSession,
    endpoint: u32,
    iova: u64,
    len: u64,
    access: u8,
    pieces: *mut IotlbPiece,
    max_pieces: usize,
    n_pieces: *mut usize,
) -> c_int {
    ffi(|| {
        // SAFETY: forwarded from this function's contract.
        let Some(s) = (unsafe { open_session(session) }) else {
            return -libc::EINVAL;
        };
        let Some(access) = Access::from_bits(access) else {
            return -libc::EINVAL;
        };
        if n_pieces.is_null() || (pieces.is_null() && max_pieces != 0) {
            return -libc::EINVAL;
        }
        let mut n = 0usize;
        let mut rc = 0;
        for piece in s.translate(endpoint, iova, len, access) {
            match piece {
                Ok(p) if n < max_pieces => {
                    // SAFETY: `n < max_pieces` and `pieces` is valid for
                    // that many writes (caller).
                    unsafe { pieces.add(n).write(p.into()) };
                    n += 1;
                }
                Ok(_) => {
                    rc = -libc::ENOSPC;
                    break;
                }
                Err(f) => {
                    rc = fault_code(&f);
                    break;
                }
            }
        }
        // SAFETY: non-null (checked) and writable (caller).
        unsafe { n_pieces.write(n) };
        rc
    })
}

/// Pins `[iova, iova + len)` of `endpoint` (`len` 0 pins one byte): it
/// stays translatable after the session ends, until [`iotlb_unpin`];
/// UNMAPs overlapping it wait. The whole range must translate now with
/// `access`.
///
/// Returns 0 and stores the pin in `*out`, a positive `IOTLB_FAULT_*` code
/// (nothing pinned), `-ENOSPC` if every pin record is in use, or `-EINVAL`.
///
/// # Safety
/// `session` as for `iotlb_session_exit`; `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_pin(
    session: *const IotlbSession,
    endpoint: u32,
    iova: u64,
    len: u64,
    access: u8,
    out: *mut *mut IotlbPin,
) -> c_int {
    ffi(|| {
        // SAFETY: forwarded from this function's contract.
        let Some(s) = (unsafe { open_session(session) }) else {
            return -libc::EINVAL;
        };
        let Some(access) = Access::from_bits(access) else {
            return -libc::EINVAL;
        };
        if out.is_null() {
            return -libc::EINVAL;
        }
        match s.pin(endpoint, iova, len, access) {
            Ok(pin) => {
                // SAFETY: non-null (checked) and writable (caller).
                unsafe { put(out, IotlbPin { _pin: pin }) };
                0
            }
            Err(PinError::Fault(f)) => fault_code(&f),
            Err(PinError::Slots(e)) => slot_error(&e),
        }
    })
}

/// Releases a pin (from any thread, in or out of a session). Null is
/// ignored.
///
/// # Safety
/// `pin` is null or a handle from `iotlb_pin` not yet released.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iotlb_unpin(pin: *mut IotlbPin) {
    ffi(|| {
        if !pin.is_null() {
            // SAFETY: a live handle made by `put` (caller), freed only here.
            drop(unsafe { Box::from_raw(pin) });
        }
        0
    });
}
