//! The table in one process: the writer's changes as a reader sees them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iotlb_shm::{
    Access, EndpointTarget, FaultKind, Geometry, Perms, Piece, SlotFile, TableReader, TableWriter,
    WriterConfig, WriterError,
};

const RW: Perms = Perms {
    read: true,
    write: true,
    mmio: false,
};
const RO: Perms = Perms {
    read: true,
    write: false,
    mmio: false,
};
const KIB4: u64 = 0x1000;
const MIB2: u64 = 0x20_0000;
const GIB1: u64 = 0x4000_0000;

struct Rig {
    w: TableWriter,
    r: TableReader,
    slots: Arc<SlotFile>,
    _slot_fd: OwnedFd,
}

fn rig_with(geometry: Geometry) -> Rig {
    let mut w = TableWriter::new(&WriterConfig {
        geometry,
        ..WriterConfig::default()
    })
    .unwrap();
    let slot_fd = iotlb_shm::slots::create(8, 16).unwrap();
    w.register_reader(slot_fd.as_fd(), std::process::id() as i32)
        .unwrap();
    let r = TableReader::open(w.table_fd(), w.arena_fd()).unwrap();
    let slots = SlotFile::open(slot_fd.as_fd()).unwrap();
    Rig {
        w,
        r,
        slots,
        _slot_fd: slot_fd,
    }
}

fn rig() -> Rig {
    rig_with(Geometry::default())
}

impl Rig {
    fn one(&self, ep: u32, iova: u64, access: Access) -> Result<Piece, FaultKind> {
        let mut slot = self.slots.claim_slot().unwrap();
        let s = slot.enter(&self.r);
        s.translate_one(ep, iova, access).map_err(|f| f.kind)
    }

    fn pieces(&self, ep: u32, iova: u64, len: u64) -> Vec<Result<(u64, u64), FaultKind>> {
        let mut slot = self.slots.claim_slot().unwrap();
        let s = slot.enter(&self.r);
        s.translate(ep, iova, len, Access::READ)
            .map(|p| p.map(|p| (p.gpa, p.len)).map_err(|f| f.kind))
            .collect()
    }
}

#[test]
fn a_map_is_visible_on_return_with_offsets_and_permissions() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(8, EndpointTarget::Domain(1)).unwrap();
    assert_eq!(t.one(8, 0x1000, Access::READ), Err(FaultKind::Mapping));
    t.w.map(1, 0x1000, 0x1fff, 0xabc000, RO).unwrap();
    let p = t.one(8, 0x1234, Access::READ).unwrap();
    assert_eq!((p.gpa, p.len, p.mmio), (0xabc234, 0xdcc, false));
    assert_eq!(t.one(8, 0x1234, Access::WRITE), Err(FaultKind::Permission));
    assert_eq!(t.one(8, 0x2000, Access::READ), Err(FaultKind::Mapping));
    assert_eq!(t.one(8, 0xfff, Access::READ), Err(FaultKind::Mapping));
    t.w.map(1, 0x2000, 0x2fff, 0xfee0_0000, Perms { mmio: true, ..RW })
        .unwrap();
    assert!(t.one(8, 0x2000, Access::READ_WRITE).unwrap().mmio);
}

#[test]
fn blocked_unknown_and_bypass_endpoints() {
    let mut t = rig();
    assert_eq!(
        t.one(3, 0x1000, Access::READ),
        Err(FaultKind::Domain),
        "endpoints start blocked"
    );
    assert_eq!(
        t.one(0x1_0000, 0x1000, Access::READ),
        Err(FaultKind::Domain),
        "no word: unknown endpoint"
    );
    t.w.set_endpoint(3, EndpointTarget::Bypass).unwrap();
    let p = t.one(3, 0x1234_5678, Access::WRITE).unwrap();
    assert_eq!((p.gpa, p.len), (0x1234_5678, u64::MAX - 0x1234_5678 + 1));
    assert_eq!(
        t.one(3, 0, Access::READ).unwrap().len,
        u64::MAX,
        "length saturates"
    );
    assert!(matches!(
        t.w.set_endpoint(0x1_0000, EndpointTarget::Bypass),
        Err(WriterError::UnknownEndpoint(_))
    ));
    assert!(matches!(
        t.w.set_endpoint(3, EndpointTarget::Domain(9)),
        Err(WriterError::UnknownDomain(9))
    ));
    t.w.set_endpoint(3, EndpointTarget::Blocked).unwrap();
    assert!(t.w.needs_grace(), "leaving bypass narrows");
    assert_eq!(t.one(3, 0x1000, Access::READ), Err(FaultKind::Domain));
}

#[test]
fn huge_leaves_are_used_when_both_sides_are_aligned() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    let before = t.w.stats().nodes_in_use;
    // 1 GiB identity mapping: one leaf at level 2, so root + one level-2 node.
    t.w.map(1, GIB1, 2 * GIB1 - 1, GIB1, RW).unwrap();
    assert_eq!(t.w.stats().nodes_in_use - before, 1);
    let p = t.one(1, GIB1 + 0x12_3456, Access::READ).unwrap();
    assert_eq!((p.gpa, p.len), (GIB1 + 0x12_3456, GIB1 - 0x12_3456));
    // 2 MiB aligned in IOVA but not in GPA: falls back to 4 KiB leaves.
    t.w.map(1, 4 * GIB1, 4 * GIB1 + MIB2 - 1, 0x1000, RW)
        .unwrap();
    assert_eq!(t.one(1, 4 * GIB1 + 0x1000, Access::READ).unwrap().len, KIB4);
    // Both aligned: one 2 MiB leaf.
    t.w.map(1, 5 * GIB1, 5 * GIB1 + MIB2 - 1, MIB2, RW).unwrap();
    assert_eq!(t.one(1, 5 * GIB1, Access::READ).unwrap().len, MIB2);
    // Unmapping part of a huge leaf would split it: refused, nothing removed.
    assert!(matches!(
        t.w.unmap(1, GIB1, GIB1 + KIB4 - 1),
        Err(WriterError::SplitsLeaf(_))
    ));
    assert!(matches!(
        t.w.unmap(1, GIB1 - KIB4, GIB1 + KIB4 - 1),
        Err(WriterError::SplitsLeaf(_))
    ));
    assert!(t.one(1, GIB1, Access::READ).is_ok());
}

#[test]
fn ranges_translate_in_pieces_and_stop_at_the_first_hole() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.map(1, 0x10000, 0x11fff, 0x50000, RW).unwrap(); // contiguous pair
    t.w.map(1, 0x12000, 0x12fff, 0x90000, RW).unwrap(); // discontiguous
    assert_eq!(
        t.pieces(1, 0x10800, 0x1800),
        vec![Ok((0x50800, 0x1800))],
        "contiguous leaves merge"
    );
    assert_eq!(
        t.pieces(1, 0x10800, 0x2000 + 0x100),
        vec![Ok((0x50800, 0x1800)), Ok((0x90000, 0x900))]
    );
    assert_eq!(
        t.pieces(1, 0x12000, 0x1001),
        vec![Ok((0x90000, 0x1000)), Err(FaultKind::Mapping)],
        "the hole after the last page"
    );
    assert_eq!(t.pieces(1, 0x12000, 0), vec![], "empty range");
}

#[test]
fn unmap_clears_and_recycles_nodes_only_after_a_grace_period() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    let base = t.w.stats().nodes_in_use;
    for i in 0..64u64 {
        t.w.map(1, i * GIB1, i * GIB1 + KIB4 - 1, i * KIB4, RW)
            .unwrap();
    }
    let full = t.w.stats().nodes_in_use;
    assert!(
        full >= base + 64 * 2,
        "each page needs its own level-1 and level-0 node"
    );
    for i in 0..64u64 {
        t.w.unmap(1, i * GIB1, i * GIB1 + KIB4 - 1).unwrap();
        assert_eq!(t.one(1, i * GIB1, Access::READ), Err(FaultKind::Mapping));
    }
    assert_eq!(
        t.w.stats().nodes_in_use,
        full,
        "detached nodes wait for the grace period"
    );
    assert!(t.w.needs_grace());
    t.w.synchronize();
    assert_eq!(
        t.w.stats().nodes_in_use,
        base,
        "emptied nodes are pruned up to the root"
    );
    assert!(!t.w.needs_grace());
    // Reuse: mapping again does not grow the arena.
    let segments = t.w.stats().segments;
    for i in 0..64u64 {
        t.w.map(1, i * GIB1, i * GIB1 + KIB4 - 1, 0x7000_0000 + i * KIB4, RW)
            .unwrap();
        assert_eq!(
            t.one(1, i * GIB1 + 8, Access::READ).unwrap().gpa,
            0x7000_0008 + i * KIB4
        );
    }
    assert_eq!(t.w.stats().segments, segments);
}

#[test]
fn overlapping_and_malformed_maps_are_refused_and_leave_the_table_as_it_was() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.map(1, 0x5000, 0x5fff, 0x1000, RW).unwrap();
    // Covers 0x3000..0x6fff: the first two pages go in, then 0x5000 clashes.
    assert!(matches!(
        t.w.map(1, 0x3000, 0x6fff, 0x10000, RW),
        Err(WriterError::Overlap(0x5000))
    ));
    assert_eq!(
        t.one(1, 0x3000, Access::READ),
        Err(FaultKind::Mapping),
        "rolled back"
    );
    assert_eq!(
        t.one(1, 0x4000, Access::READ),
        Err(FaultKind::Mapping),
        "rolled back"
    );
    assert_eq!(
        t.one(1, 0x5000, Access::READ).unwrap().gpa,
        0x1000,
        "the old mapping stays"
    );
    assert_eq!(t.one(1, 0x6000, Access::READ), Err(FaultKind::Mapping));
    for (first, last, gpa) in [
        (0x1001, 0x1fff, 0),
        (0x1000, 0x1ffe, 0),
        (0x1000, 0x1fff, 0x10),
        (0x2000, 0x1fff, 0),
    ] {
        assert!(matches!(
            t.w.map(1, first, last, gpa, RW),
            Err(WriterError::BadRange { .. })
        ));
    }
    let top = 1u64 << 48;
    assert!(
        matches!(
            t.w.map(1, top, top + 0xfff, 0, RW),
            Err(WriterError::BadRange { .. })
        ),
        "past input range"
    );
    assert!(
        matches!(t.w.map(1, 0x1000, 0x1fff, !0xfffu64, RW), Ok(())),
        "last GPA page is fine"
    );
    assert!(matches!(
        t.w.map(1, 0x2000, 0x3fff, !0xfffu64, RW),
        Err(WriterError::BadRange { .. })
    ));
    assert!(matches!(
        t.w.map(2, 0x1000, 0x1fff, 0, RW),
        Err(WriterError::UnknownDomain(2))
    ));
    assert!(matches!(
        t.w.create_domain(1),
        Err(WriterError::DomainExists(1))
    ));
    assert!(matches!(
        t.w.unmap(1, 0x1001, 0x1fff),
        Err(WriterError::BadRange { .. })
    ));
    // The top of the input range maps and unmaps.
    t.w.map(1, top - KIB4, top - 1, 0x3000, RW).unwrap();
    assert_eq!(t.one(1, top - 1, Access::READ).unwrap().gpa, 0x3fff);
    t.w.unmap(1, 0, u64::MAX).unwrap();
    assert_eq!(t.one(1, top - 1, Access::READ), Err(FaultKind::Mapping));
    assert_eq!(t.one(1, 0x5000, Access::READ), Err(FaultKind::Mapping));
    assert_eq!(t.one(1, u64::MAX, Access::READ), Err(FaultKind::Mapping));
}

#[test]
fn a_full_64_bit_input_range_works_at_both_ends() {
    let mut t = rig_with(Geometry {
        input_bits: 64,
        ..Geometry::default()
    });
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.map(1, u64::MAX - 0xfff, u64::MAX, 0x2000, RW).unwrap();
    t.w.map(1, 0, 0xfff, 0x1000, RW).unwrap();
    assert_eq!(
        t.one(1, u64::MAX, Access::READ).unwrap(),
        Piece {
            gpa: 0x2fff,
            len: 1,
            mmio: false
        }
    );
    assert_eq!(t.pieces(1, u64::MAX - 1, 2), vec![Ok((0x2ffe, 2))]);
    t.w.unmap(1, u64::MAX - 0xfff, u64::MAX).unwrap();
    assert_eq!(t.one(1, u64::MAX, Access::READ), Err(FaultKind::Mapping));
    assert_eq!(t.one(1, 0, Access::READ).unwrap().gpa, 0x1000);
}

#[test]
fn destroying_a_domain_blocks_its_endpoints_and_frees_its_tree() {
    let mut t = rig();
    let base = t.w.stats().nodes_in_use;
    t.w.create_domain(4).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(4)).unwrap();
    t.w.set_endpoint(2, EndpointTarget::Domain(4)).unwrap();
    for i in 0..10 {
        t.w.map(4, i * MIB2 * 3, i * MIB2 * 3 + KIB4 - 1, 0, RO)
            .unwrap();
    }
    t.w.destroy_domain(4).unwrap();
    assert_eq!(t.one(1, 0, Access::READ), Err(FaultKind::Domain));
    assert_eq!(t.one(2, 0, Access::READ), Err(FaultKind::Domain));
    t.w.synchronize();
    assert_eq!(t.w.stats().nodes_in_use, base);
    assert!(matches!(
        t.w.destroy_domain(4),
        Err(WriterError::UnknownDomain(4))
    ));
}

#[test]
fn the_arena_grows_in_segments_under_an_open_reader() {
    let mut t = rig_with(Geometry {
        segment_nodes: 4,
        max_segments: 64,
        ..Geometry::default()
    });
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    for i in 0..40u64 {
        t.w.map(1, i * GIB1, i * GIB1 + KIB4 - 1, i * KIB4, RW)
            .unwrap();
    }
    assert!(t.w.stats().segments > 10);
    assert_eq!(
        t.r.segments(),
        t.w.stats().segments,
        "the reader sees the announced size"
    );
    for i in 0..40u64 {
        assert_eq!(
            t.one(1, i * GIB1 + 1, Access::READ).unwrap().gpa,
            i * KIB4 + 1
        );
    }
    // The arena is full at 64 × 4 nodes: the next domain of many pages fails
    // with ArenaFull, not a crash.
    let mut err = None;
    for i in 40..200u64 {
        if let Err(e) = t.w.map(1, i * GIB1, i * GIB1 + KIB4 - 1, 0, RW) {
            err = Some(e);
            break;
        }
    }
    assert!(matches!(err, Some(WriterError::ArenaFull(256))), "{err:?}");
}

#[test]
fn a_session_holds_the_grace_period_until_it_ends() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
    let released = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (reader, slots, released2) = (&t.r, &t.slots, released.clone());
        s.spawn(move || {
            let mut slot = slots.claim_slot().unwrap();
            let session = slot.enter(reader);
            let p = session.translate_one(1, 0x1000, Access::READ).unwrap();
            tx.send(p.gpa).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            released2.store(true, Ordering::SeqCst);
            drop(session);
        });
        assert_eq!(rx.recv().unwrap(), 0x9000);
        t.w.unmap(1, 0x1000, 0x1fff).unwrap();
        let report = t.w.synchronize();
        assert!(
            released.load(Ordering::SeqCst),
            "synchronize returned while a session was open"
        );
        assert!(report.waited);
    });
}

#[test]
fn a_pin_holds_only_overlapping_unmaps() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.create_domain(2).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.set_endpoint(2, EndpointTarget::Domain(2)).unwrap();
    for d in [1, 2] {
        t.w.map(d, 0x1000, 0x3fff, 0x9000, RW).unwrap();
    }
    let pin = {
        let mut slot = t.slots.claim_slot().unwrap();
        let s = slot.enter(&t.r);
        s.pin(1, 0x2000, 0x100, Access::WRITE).unwrap()
    };
    // Same IOVA, other domain: not held.
    t.w.unmap(2, 0x1000, 0x3fff).unwrap();
    assert!(!t.w.synchronize().waited);
    // Same domain, disjoint range: not held.
    t.w.unmap(1, 0x1000, 0x1fff).unwrap();
    assert!(!t.w.synchronize().waited);
    // A pin on a range that does not translate is refused and leaves nothing.
    {
        let mut slot = t.slots.claim_slot().unwrap();
        let s = slot.enter(&t.r);
        assert!(s.pin(1, 0x1000, 0x10, Access::READ).is_err());
    }
    // Overlapping: held until the pin is dropped.
    let released = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let released2 = released.clone();
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            released2.store(true, Ordering::SeqCst);
            drop(pin);
        });
        t.w.unmap(1, 0x2000, 0x2fff).unwrap();
        let report = t.w.synchronize();
        assert!(
            released.load(Ordering::SeqCst),
            "UNMAP completed under a pin"
        );
        assert!(report.waited);
    });
}

#[test]
fn a_pin_is_held_across_a_detach_of_its_endpoint() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
    let pin = {
        let mut slot = t.slots.claim_slot().unwrap();
        let s = slot.enter(&t.r);
        s.pin(1, 0x1000, 0x1000, Access::READ).unwrap()
    };
    let released = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let released2 = released.clone();
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            released2.store(true, Ordering::SeqCst);
            drop(pin);
        });
        t.w.set_endpoint(1, EndpointTarget::Blocked).unwrap();
        t.w.synchronize();
        assert!(
            released.load(Ordering::SeqCst),
            "DETACH completed under a pin"
        );
    });
}

#[test]
fn the_table_cannot_be_mapped_or_made_writable_by_a_reader() {
    let t = rig();
    for fd in [t.w.table_fd(), t.w.arena_fd()] {
        use std::os::fd::AsRawFd;
        // SAFETY: asking for a fresh shared writable mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_eq!(p, libc::MAP_FAILED, "a writable shared mapping was granted");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EPERM)
        );
    }
    // SAFETY: only changes protections of the reader's own read-only mapping; fails.
    let r = unsafe {
        libc::mprotect(
            t.r.table_ptr() as *mut _,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    assert_eq!(r, -1, "mprotect made the table writable");
    assert!(
        iotlb_shm::memfd::resize(t.w.table_fd(), 0).is_err(),
        "table shrunk"
    );
}

#[test]
fn foreign_files_are_not_opened_as_tables() {
    let t = rig();
    let junk = iotlb_shm::memfd::create(c"junk", 8192).unwrap();
    assert!(
        TableReader::open(junk.as_fd(), t.w.arena_fd()).is_err(),
        "unsealed junk"
    );
    iotlb_shm::memfd::seal(junk.as_fd(), iotlb_shm::memfd::SEALS_FROZEN_READ_ONLY).unwrap();
    assert!(matches!(
        TableReader::open(junk.as_fd(), t.w.arena_fd()),
        Err(iotlb_shm::OpenError::Format { magic: 0, .. })
    ));
    let plain = iotlb_shm::memfd::create(c"plain", 8192).unwrap();
    assert!(
        TableReader::open(t.w.table_fd(), plain.as_fd()).is_err(),
        "unsealed arena"
    );
}

#[test]
fn reset_blocks_every_endpoint_and_frees_every_domain() {
    let mut t = rig();
    let base = t.w.stats().nodes_in_use;
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.set_endpoint(2, EndpointTarget::Bypass).unwrap();
    t.w.map(1, 0, 0xfff, 0, RW).unwrap();
    t.w.reset();
    assert_eq!(t.one(1, 0, Access::READ), Err(FaultKind::Domain));
    assert_eq!(t.one(2, 0, Access::READ), Err(FaultKind::Domain));
    assert_eq!(
        t.w.stats().nodes_in_use,
        base,
        "root pool back to where it started"
    );
    t.w.create_domain(1).unwrap();
}

#[test]
fn a_map_that_cannot_fit_fails_at_once_and_roots_stay_reserved() {
    let geometry = Geometry {
        segment_nodes: 4,
        max_segments: 4,
        ..Geometry::default()
    };
    let mut w = TableWriter::new(&WriterConfig {
        geometry,
        reserved_roots: 3,
        ..WriterConfig::default()
    })
    .unwrap();
    w.create_domain(1).unwrap();
    // 16 nodes, 2 roots still reserved: a 1 TiB map with misaligned GPA
    // needs far more and is refused before anything is written.
    assert!(matches!(
        w.map(1, 0, (1 << 40) - 1, 0x1000, RW),
        Err(WriterError::ArenaFull(16))
    ));
    assert_eq!(w.stats().nodes_in_use, 1);
    // Fill the rest with scattered pages until mappings are refused.
    let mut mapped = 0;
    let mut refused = false;
    for i in 0..100u64 {
        let before = w.stats().nodes_in_use;
        if let Err(e) = w.map(1, i * GIB1, i * GIB1 + KIB4 - 1, 0, RW) {
            assert!(matches!(e, WriterError::ArenaFull(16)), "{e}");
            assert_eq!(
                w.stats().nodes_in_use,
                before,
                "a refused MAP leaves no nodes behind"
            );
            refused = true;
            break;
        }
        mapped += 1;
    }
    assert!(mapped > 2 && refused, "{mapped} mapped");
    assert!(
        w.available_nodes() >= 2,
        "the two reserved roots are still free"
    );
    w.create_domain(2).unwrap();
    w.create_domain(3).unwrap();
}

#[test]
fn a_session_reuses_its_last_leaf_but_a_new_session_sees_the_revocation() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.map(1, 0x20_0000, 0x3f_ffff, 0x40_0000, RO).unwrap(); // one 2 MiB leaf
    let mut slot = t.slots.claim_slot().unwrap();
    {
        let s = slot.enter(&t.r);
        assert_eq!(
            s.translate_one(1, 0x20_1000, Access::READ).unwrap().gpa,
            0x40_1000
        );
        // Revoked meanwhile (no grace period yet): this session may keep
        // using what it already holds, from the same leaf.
        t.w.unmap(1, 0x20_0000, 0x3f_ffff).unwrap();
        let p = s.translate_one(1, 0x3f_fff0, Access::READ).unwrap();
        assert_eq!((p.gpa, p.len), (0x5f_fff0, 0x10));
        assert_eq!(
            s.translate_one(1, 0x3f_fff0, Access::WRITE)
                .map_err(|f| f.kind),
            Err(FaultKind::Permission)
        );
        assert_eq!(
            s.translate_one(2, 0x20_1000, Access::READ)
                .map_err(|f| f.kind),
            Err(FaultKind::Domain)
        );
    }
    t.w.synchronize();
    let s = slot.enter(&t.r);
    assert_eq!(
        s.translate_one(1, 0x20_1000, Access::READ)
            .map_err(|f| f.kind),
        Err(FaultKind::Mapping)
    );
}

#[test]
fn the_writer_scans_only_claimed_slots_and_a_reader_cannot_push_it_past_the_file() {
    let t = rig();
    let writer_view = iotlb_shm::slots::SlotMap::open(t._slot_fd.as_fd(), false).unwrap();
    assert_eq!(
        (writer_view.slots_in_use(), writer_view.pins_in_use()),
        (0, 0)
    );
    let a = t.slots.claim_slot().unwrap();
    let b = t.slots.claim_slot().unwrap();
    assert_eq!(writer_view.slots_in_use(), 2);
    drop((a, b));
    assert_eq!(
        writer_view.slots_in_use(),
        2,
        "a high-water mark never goes down"
    );
    // A hostile reader writes a huge mark: the writer clamps it.
    // SAFETY: writes one aligned word of the reader's own writable mapping.
    unsafe { (t.slots.map().as_ptr().cast_mut().add(32) as *mut u64).write_volatile(u64::MAX) };
    assert_eq!(writer_view.slots_in_use(), 8);
}

#[test]
fn a_full_arena_recycles_retired_nodes_through_a_grace_period() {
    // 8 nodes: root + 7. Each scattered page needs a level-2..0 chain.
    let mut t = rig_with(Geometry {
        segment_nodes: 4,
        max_segments: 2,
        ..Geometry::default()
    });
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    let far = |i: u64| i << 39; // a different level-3 entry each: 3 new nodes per page
    t.w.map(1, far(0), far(0) + 0xfff, 0x1000, RW).unwrap();
    t.w.map(1, far(1), far(1) + 0xfff, 0x2000, RW).unwrap();
    assert!(matches!(
        t.w.map(1, far(2), far(2) + 0xfff, 0x3000, RW),
        Err(WriterError::ArenaFull(8))
    ));
    // Unmapping retires 3 nodes (not yet reusable: no grace period ran).
    t.w.unmap(1, far(0), far(0) + 0xfff).unwrap();
    assert_eq!(t.w.stats().segments, 2);
    // The next map needs them: the writer runs the grace period itself.
    t.w.map(1, far(2), far(2) + 0xfff, 0x3000, RW).unwrap();
    assert_eq!(t.one(1, far(2) + 5, Access::READ).unwrap().gpa, 0x3005);
    assert_eq!(t.one(1, far(1) + 5, Access::READ).unwrap().gpa, 0x2005);
    assert_eq!(t.one(1, far(0), Access::READ), Err(FaultKind::Mapping));
    assert!(t.w.stats().grace_periods >= 1);
}

#[test]
fn unmapping_above_the_input_range_never_aliases_lower_addresses() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    t.w.map(1, 0, 0xfff, 0x5000, RW).unwrap();
    // 2^48 has the same radix indices as 0 in a 48-bit table.
    t.w.unmap(1, 1 << 48, (1 << 48) + 0xfff).unwrap();
    t.w.unmap(1, 1 << 60, u64::MAX).unwrap();
    assert_eq!(t.one(1, 0x10, Access::READ).unwrap().gpa, 0x5010);
    t.w.unmap(1, 0, u64::MAX).unwrap();
    assert_eq!(t.one(1, 0x10, Access::READ), Err(FaultKind::Mapping));
}

/// `translate_burst` gives, address by address, what `translate_one` gives:
/// mapped (4 KiB, 2 MiB and 1 GiB leaves), unmapped, read-only, above the
/// input range, the same leaf twice in a row, and whole bursts for a
/// bypassed, a blocked and an unknown endpoint — across lane groups and
/// with a cached leaf of another endpoint in the session.
#[test]
fn a_burst_translates_exactly_as_one_at_a_time() {
    let mut t = rig_with(Geometry {
        input_bits: 39,
        ..Geometry::default()
    });
    t.w.create_domain(1).unwrap();
    t.w.create_domain(2).unwrap();
    t.w.set_endpoint(8, EndpointTarget::Domain(1)).unwrap();
    t.w.set_endpoint(9, EndpointTarget::Domain(2)).unwrap();
    t.w.set_endpoint(10, EndpointTarget::Bypass).unwrap();
    for i in 0..40u64 {
        let iova = 0x10_0000 + i * 3 * KIB4;
        let perms = if i % 5 == 0 { RO } else { RW };
        t.w.map(1, iova, iova + KIB4 - 1, 0x7700_0000 - i * 2 * KIB4, perms)
            .unwrap();
    }
    t.w.map(1, 4 * MIB2, 5 * MIB2 - 1, 0x2_0000_0000, RW)
        .unwrap();
    t.w.map(1, 3 * GIB1, 4 * GIB1 - 1, 0x40_0000_0000, RW)
        .unwrap();
    t.w.map(2, 0x10_0000, 0x10_0fff, 0x9000, RW).unwrap();

    let mut iovas = vec![];
    for i in 0..130u64 {
        // Mapped, holes between them, neighbours in the same page.
        iovas.push(0x10_0000 + i * KIB4 + (i * 0x38) % 0x1000);
        if i % 7 == 0 {
            iovas.push(0x10_0000 + i * KIB4 + 0x10);
        }
    }
    iovas.extend([
        4 * MIB2 + 0x1234,
        4 * MIB2 + 0x1f_f000,
        3 * GIB1 + 0x1234_5678,
        3 * GIB1,
        1 << 39,
        u64::MAX,
        0,
        0x10_0000,
    ]);
    let access_kinds = [Access::READ, Access::WRITE, Access::READ_WRITE];
    for ep in [8u32, 9, 10, 11, 0xffff_ffff] {
        for access in access_kinds {
            for len in [0usize, 1, 3, 8, 9, 17, iovas.len()] {
                let mut slot = t.slots.claim_slot().unwrap();
                let s = slot.enter(&t.r);
                // A cached leaf of another endpoint must not be used.
                let _ = s.translate_one(9, 0x10_0000, Access::READ);
                let want: Vec<_> = iovas[..len]
                    .iter()
                    .map(|&i| s.translate_one(ep, i, access))
                    .collect();
                drop(s);
                let s = slot.enter(&t.r);
                let _ = s.translate_one(9, 0x10_0000, Access::READ);
                let mut got = vec![
                    Err(iotlb_shm::Fault {
                        kind: FaultKind::Detached,
                        endpoint: 0,
                        iova: 0,
                        access,
                    });
                    len + 2
                ];
                assert_eq!(s.translate_burst(ep, &iovas[..len], access, &mut got), len);
                assert_eq!(
                    &got[..len],
                    &want[..],
                    "endpoint {ep} access {access} len {len}"
                );
                // A second burst in the same session (cached leaf in use).
                assert_eq!(
                    s.translate_burst(ep, &iovas[..len], access, &mut got[..len]),
                    len
                );
                assert_eq!(&got[..len], &want[..]);
                // Output shorter than the input: translates that many.
                if len > 1 {
                    assert_eq!(
                        s.translate_burst(ep, &iovas[..len], access, &mut got[..1]),
                        1
                    );
                    assert_eq!(got[0], want[0]);
                }
            }
        }
    }
    // Spot checks of the reference itself.
    assert!(t.one(8, 0x10_0000 + 0x10, Access::WRITE).is_err());
    assert_eq!(
        t.one(8, 3 * GIB1 + 0x1234_5678, Access::READ)
            .map(|p| p.gpa),
        Ok(0x40_1234_5678)
    );
    assert_eq!(t.one(10, 0x5000, Access::READ).map(|p| p.gpa), Ok(0x5000));
    assert_eq!(t.one(11, 0x5000, Access::READ), Err(FaultKind::Domain));
}

/// Once the writer is gone a burst faults `Detached`, like `translate_one`.
#[test]
fn a_burst_faults_detached_once_the_writer_is_gone() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(8, EndpointTarget::Domain(1)).unwrap();
    t.w.map(1, 0x1000, 0x1fff, 0x5000, RW).unwrap();
    let Rig {
        w,
        r,
        slots,
        _slot_fd,
    } = t;
    drop(w);
    let mut slot = slots.claim_slot().unwrap();
    let s = slot.enter(&r);
    let mut out = [Ok(Piece {
        gpa: 0,
        len: 0,
        mmio: false,
    }); 3];
    s.translate_burst(8, &[0x1000, 0x1008, 0x9000], Access::READ, &mut out);
    for (o, iova) in out.iter().zip([0x1000, 0x1008, 0x9000]) {
        assert_eq!(o.map_err(|f| f.kind), Err(FaultKind::Detached));
        assert_eq!(*o, s.translate_one(8, iova, Access::READ));
    }
}

/// A mapping of many pages is published in runs (one walk per node): every
/// page still translates on its own, across node boundaries, with huge
/// leaves in the middle when both sides allow; UNMAPs of slices in the
/// middle of a run and of the rest clear exactly their pages and give every
/// node back.
#[test]
fn page_runs_across_nodes_translate_and_unmap_page_by_page() {
    let mut t = rig();
    t.w.create_domain(1).unwrap();
    t.w.set_endpoint(1, EndpointTarget::Domain(1)).unwrap();
    let baseline = t.w.stats().nodes_in_use;
    // GPA off by one page from 2 MiB alignment: 4 KiB leaves only.
    let (first, last, gpa) = (MIB2 - 3 * KIB4, 3 * MIB2 + 5 * KIB4 - 1, 0x4000_0000 + KIB4);
    t.w.map(1, first, last, gpa, RW).unwrap();
    // Aligned on both sides: 4 KiB run, one 2 MiB leaf, 4 KiB run.
    let (afirst, alast, agpa) = (
        8 * MIB2 - 2 * KIB4,
        9 * MIB2 + 3 * KIB4 - 1,
        0x8000_0000 - 2 * KIB4,
    );
    t.w.map(1, afirst, alast, agpa, RO).unwrap();
    let check = |t: &Rig, lo: u64, hi: u64, base: u64, gone: &dyn Fn(u64) -> bool| {
        let mut iova = lo;
        while iova <= hi {
            let got = t.one(1, iova + 8, Access::READ).map(|p| p.gpa);
            if gone(iova) {
                assert_eq!(got, Err(FaultKind::Mapping), "{iova:#x} unmapped");
            } else {
                assert_eq!(got, Ok(base + (iova - lo) + 8), "{iova:#x}");
            }
            iova += KIB4;
        }
    };
    check(&t, first, last, gpa, &|_| false);
    check(&t, afirst, alast, agpa, &|_| false);
    assert_eq!(
        t.one(1, first - KIB4, Access::READ),
        Err(FaultKind::Mapping)
    );
    assert_eq!(t.one(1, last + 1, Access::READ), Err(FaultKind::Mapping));
    assert_eq!(t.one(1, alast + 1, Access::READ), Err(FaultKind::Mapping));
    // A slice in the middle of the first mapping, across a node boundary.
    let (cut_lo, cut_hi) = (2 * MIB2 - 7 * KIB4, 2 * MIB2 + 9 * KIB4 - 1);
    t.w.unmap(1, cut_lo, cut_hi).unwrap();
    check(&t, first, last, gpa, &|i| (cut_lo..=cut_hi).contains(&i));
    // The 2 MiB leaf cannot be split; the runs around it can go.
    assert!(matches!(
        t.w.unmap(1, 8 * MIB2, 8 * MIB2 + KIB4 - 1),
        Err(WriterError::SplitsLeaf(_))
    ));
    t.w.unmap(1, afirst, alast).unwrap();
    t.w.unmap(1, first, cut_lo - 1).unwrap();
    t.w.unmap(1, cut_hi + 1, last).unwrap();
    check(&t, first, last, gpa, &|_| true);
    check(&t, afirst, alast, agpa, &|_| true);
    t.w.synchronize();
    assert_eq!(t.w.stats().nodes_in_use, baseline, "every node given back");
}
