//! vm-memory's [`Iommu`] trait over the shared table (feature `vm-memory`),
//! so a backend can wrap its guest memory in
//! [`vm_memory::IommuMemory`] and hand it to virtio-queue unchanged: every
//! access then takes IOVAs of one endpoint and is translated here.
//!
//! ```no_run
//! # fn demo(table: std::sync::Arc<iotlb_shm::TableReader>, slots: std::sync::Arc<iotlb_shm::SlotFile>,
//! #         ram: vm_memory::GuestMemoryMmap<()>) {
//! use vm_memory::{Bytes, GuestAddress, IommuMemory};
//! let iommu = iotlb_shm::vm_memory::SharedTableIommu::new(table, slots, 8);
//! let mem = IommuMemory::new(ram, iommu, true, ());
//! let mut head = [0u8; 16];
//! mem.read_slice(&mut head, GuestAddress(0x1000)).unwrap(); // 0x1000 is an IOVA
//! # }
//! ```
//!
//! # What a translation guarantees, and for how long
//!
//! [`Iommu::translate`] returns an iterator over guest-physical ranges. The
//! trait gives the IOMMU no hook when the *accesses* made with those ranges
//! end — only when the iterator (through its guard) is dropped. So each
//! call does this:
//!
//! 1. claims a session slot from the [`SlotFile`] (a mutex pop) and enters
//!    a session (one store to this process's own slot line);
//! 2. **pins** `[iova, iova + length)` for the endpoint
//!    ([`Session::pin`](crate::Session::pin): a pin record, a mutex pop and
//!    four stores) and translates the range; a fault ends here, and nothing
//!    stays pinned;
//! 3. exits the session and releases the slot at once (sessions stay short,
//!    no slot is held across the caller's code);
//! 4. returns the pieces, with the pin inside the iterator's guard
//!    ([`PinnedTranslation`]).
//!
//! The daemon completes no UNMAP, DETACH or re-ATTACH overlapping the pinned
//! range until the guard is dropped. Hence:
//!
//! * **Covered:** every access vm-memory itself makes while the iterator
//!   lives. `IommuMemory`'s `Bytes` methods (`read`, `write`, `read_obj`,
//!   `write_obj`, `load`, `store`, `read_volatile_from`, ...) copy inside
//!   the iteration, so virtio-queue's ring accesses (available and used
//!   rings, descriptors) and any `Bytes` access by the backend are fully
//!   covered: they never touch a page after the guest's UNMAP of it has
//!   completed.
//! * **Not covered:** a [`vm_memory::VolatileSlice`] kept after the
//!   `get_slices` iterator that produced it is dropped. virtio-queue's
//!   `Reader`/`Writer` (`DescriptorChain::reader/writer`) do exactly that:
//!   they collect the slices of the whole chain, then copy later. Between
//!   the two, an UNMAP may complete and the guest may reuse those pages;
//!   the copy still lands in guest RAM the backend has mapped (host memory
//!   safety is not at stake, and this is the same window vm-memory's own
//!   `Iotlb` has for vhost-user IOTLB invalidations), but it breaks the
//!   "UNMAP completes only once no backend can use the old translation"
//!   contract. A backend that needs the contract for such buffers — and
//!   any asynchronous I/O (io_uring) into guest pages — must pin the
//!   buffers itself with [`Session::pin`](crate::Session::pin) for the life
//!   of the I/O, before building the `Reader`/`Writer`.
//!
//! Holding a translation (a live `get_slices` iterator) holds the daemon's
//! grace periods for overlapping revocations: keep them short, as with a
//! session. Each live translation uses one pin record of the slot file;
//! when all are in use, translating fails (`CannotResolve`, "no pin
//! record").
//!
//! Cost per translation: four short mutex operations (slot and pin record,
//! claimed and released), a pin, two table walks and an [`Iotlb`] built on
//! the heap; this adapter is for compatibility. Hot paths should use the
//! reader API directly (one session per burst, no pins for synchronous
//! copies).
//!
//! Faults become [`Error::CannotResolve`] whose `iova_range` starts at the
//! first IOVA that does not translate and runs to the end of the request;
//! [`fault_kind`] recovers the virtio-iommu fault reason from it (for the
//! fault record a backend reports).

use std::ops::Deref;
use std::sync::Arc;

use vm_memory::iommu::{Error, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iommu, Iotlb, Permissions};

use crate::access::{Access, Fault, FaultKind};
use crate::reader::{Pin, PinError, TableReader};
use crate::slots::SlotFile;

/// The translation of one endpoint's IOVAs through the shared table, as a
/// vm-memory [`Iommu`]. See the [module documentation](self) for exactly
/// what a returned translation guarantees.
#[derive(Debug, Clone)]
pub struct SharedTableIommu {
    table: Arc<TableReader>,
    slots: Arc<SlotFile>,
    endpoint: u32,
}

impl SharedTableIommu {
    /// Translates `endpoint`'s IOVAs through `table`, using session slots
    /// and pin records of `slots` (this process's slot file, registered
    /// with the daemon).
    pub fn new(table: Arc<TableReader>, slots: Arc<SlotFile>, endpoint: u32) -> Self {
        Self {
            table,
            slots,
            endpoint,
        }
    }

    /// The endpoint whose IOVAs this translates.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// Claims a slot, enters a session, pins and translates
    /// `[iova, iova + length)`, fills an [`Iotlb`] with the pieces.
    fn pin_and_translate(
        &self,
        iova: u64,
        length: u64,
        access: Access,
    ) -> Result<PinnedTranslation, Error> {
        let mut slot = self.slots.claim_slot().map_err(|e| Error::CannotResolve {
            iova_range: range(iova, length),
            reason: format!("no session slot: {e}"),
        })?;
        let session = slot.enter(&self.table);
        let pin = session
            .pin(self.endpoint, iova, length, access)
            .map_err(|e| match e {
                PinError::Fault(f) => fault_error(&f, iova, length),
                PinError::Slots(e) => Error::CannotResolve {
                    iova_range: range(iova, length),
                    reason: format!("no pin record: {e}"),
                },
            })?;
        let mut iotlb = Iotlb::new();
        let perms = permissions(access);
        let mut at = iova;
        for piece in session.translate(self.endpoint, iova, length, access) {
            // The range is pinned and was just checked: a fault here is
            // impossible, but report it rather than trust that.
            let piece = piece.map_err(|f| fault_error(&f, iova, length))?;
            let len =
                usize::try_from(piece.len).map_err(|_| misconfigured("piece longer than usize"))?;
            iotlb.set_mapping(GuestAddress(at), GuestAddress(piece.gpa), len, perms)?;
            at = at.wrapping_add(piece.len);
        }
        drop(session);
        drop(slot);
        Ok(PinnedTranslation {
            iotlb,
            _pin: Some(pin),
        })
    }
}

/// The guard of a translation: the pieces, and the pin that keeps them
/// valid until this is dropped (see the [module documentation](self)).
#[derive(Debug)]
pub struct PinnedTranslation {
    iotlb: Iotlb,
    _pin: Option<Pin>,
}

impl Deref for PinnedTranslation {
    type Target = Iotlb;

    fn deref(&self) -> &Iotlb {
        &self.iotlb
    }
}

impl Iommu for SharedTableIommu {
    type IotlbGuard<'a> = PinnedTranslation;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<PinnedTranslation>, Error> {
        let len = length as u64;
        // `Iotlb` works on half-open u64 ranges: the end must fit.
        if iova.0.checked_add(len).is_none() {
            return Err(Error::CannotResolve {
                iova_range: IovaRange { base: iova, length },
                reason: "range wraps past the end of the IOVA space".into(),
            });
        }
        let guard = if length == 0 {
            PinnedTranslation {
                iotlb: Iotlb::new(),
                _pin: None,
            }
        } else {
            match access {
                Permissions::Read => self.pin_and_translate(iova.0, len, Access::READ)?,
                Permissions::Write => self.pin_and_translate(iova.0, len, Access::WRITE)?,
                Permissions::ReadWrite => {
                    self.pin_and_translate(iova.0, len, Access::READ_WRITE)?
                }
                // "No access" needs a mapping but no permission; the table
                // has no such query, so accept either.
                Permissions::No => match self.pin_and_translate(iova.0, len, Access::READ) {
                    Err(e) if fault_kind(&e) == Some(FaultKind::Permission) => {
                        self.pin_and_translate(iova.0, len, Access::WRITE)?
                    }
                    other => other?,
                },
            }
        };
        Iotlb::lookup(guard, iova, length, access).map_err(|fails| {
            let first = fails
                .misses
                .into_iter()
                .chain(fails.access_fails)
                .min_by_key(|r| r.base.0);
            Error::CannotResolve {
                iova_range: first.unwrap_or(IovaRange { base: iova, length }),
                reason: "translated pieces do not cover the range (internal error)".into(),
            }
        })
    }
}

fn range(iova: u64, length: u64) -> IovaRange {
    IovaRange {
        base: GuestAddress(iova),
        length: usize::try_from(length).unwrap_or(usize::MAX),
    }
}

fn misconfigured(reason: &str) -> Error {
    Error::IommuMisconfigured {
        reason: reason.into(),
    }
}

fn permissions(access: Access) -> Permissions {
    match access.bits() {
        1 => Permissions::Read,
        2 => Permissions::Write,
        _ => Permissions::ReadWrite,
    }
}

/// Prefix of the `reason` of a fault error, per kind (see [`fault_kind`]).
const REASONS: [(FaultKind, &str); 4] = [
    (FaultKind::Domain, "iotlb-shm DOMAIN fault"),
    (FaultKind::Mapping, "iotlb-shm MAPPING fault"),
    (FaultKind::Permission, "iotlb-shm PERMISSION fault"),
    (
        FaultKind::Detached,
        "iotlb-shm: the daemon is gone (detached table)",
    ),
];

fn fault_error(f: &Fault, iova: u64, length: u64) -> Error {
    let end = iova.wrapping_add(length);
    let prefix = REASONS
        .iter()
        .find(|(k, _)| *k == f.kind)
        .map_or("iotlb-shm fault", |(_, p)| p);
    Error::CannotResolve {
        iova_range: range(f.iova, end.wrapping_sub(f.iova)),
        reason: format!("{prefix}: {f}"),
    }
}

/// The virtio-iommu fault reason of an error returned by
/// [`SharedTableIommu`] (directly, or inside vm-memory's
/// `GuestMemoryError::IommuError`); `None` for other errors.
pub fn fault_kind(err: &Error) -> Option<FaultKind> {
    match err {
        Error::CannotResolve { reason, .. } => REASONS
            .iter()
            .find(|(_, p)| reason.starts_with(p))
            .map(|(k, _)| *k),
        _ => None,
    }
}
