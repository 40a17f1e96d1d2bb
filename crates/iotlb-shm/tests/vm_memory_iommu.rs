//! The vm-memory adapter: guest RAM in a real memfd, wrapped in
//! `IommuMemory` with `SharedTableIommu`; a virtio split queue whose rings
//! and buffers are all at IOVAs, driven by virtio-queue through the
//! translation; bytes checked at their guest-physical addresses in the
//! memfd itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iotlb_shm::vm_memory::{SharedTableIommu, fault_kind};
use iotlb_shm::{
    EndpointTarget, FaultKind, Perms, SlotFile, TableReader, TableWriter, WriterConfig,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, IommuMemory,
    Permissions,
};

type Mem = IommuMemory<GuestMemoryMmap<()>, SharedTableIommu>;

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
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Guest RAM: 4 MiB at this guest-physical address, in a memfd.
const RAM_GPA: u64 = 0x8000_0000;
const RAM_LEN: u64 = 0x40_0000;
const EP: u32 = 8;

/// IOVA layout of the test (all in domain 1, endpoint 8):
const RING_IOVA: u64 = 0x10_0000; // → RAM + 0x3000, RW
const RING_GPA: u64 = RAM_GPA + 0x3000;
const TX_IOVA: u64 = 0x20_0000; // two pages → RAM + 0x5000 and RAM + 0x9000 (not contiguous)
const TX_GPA: [u64; 2] = [RAM_GPA + 0x5000, RAM_GPA + 0x9000];
const RX_IOVA: u64 = 0x40_0000; // one 2 MiB leaf → RAM + 2 MiB
const RX_GPA: u64 = RAM_GPA + 0x20_0000;
const RO_IOVA: u64 = 0x60_0000; // read-only page → RAM + 0xa000
const RO_GPA: u64 = RAM_GPA + 0xa000;
const HOLE_IOVA: u64 = 0x70_0000; // unmapped

struct Rig {
    w: TableWriter,
    mem: Mem,
    /// The guest RAM file, read and written by offset = GPA - RAM_GPA.
    ram: Arc<File>,
    _slot_fd: std::os::fd::OwnedFd,
}

fn rig() -> Rig {
    let mut w = TableWriter::new(&WriterConfig::default()).unwrap();
    w.create_domain(1).unwrap();
    w.set_endpoint(EP, EndpointTarget::Domain(1)).unwrap();
    w.map(1, RING_IOVA, RING_IOVA + 0xfff, RING_GPA, RW)
        .unwrap();
    w.map(1, TX_IOVA, TX_IOVA + 0xfff, TX_GPA[0], RW).unwrap();
    w.map(1, TX_IOVA + 0x1000, TX_IOVA + 0x1fff, TX_GPA[1], RW)
        .unwrap();
    w.map(1, RX_IOVA, RX_IOVA + 0x1f_ffff, RX_GPA, RW).unwrap();
    w.map(1, RO_IOVA, RO_IOVA + 0xfff, RO_GPA, RO).unwrap();

    let slot_fd = iotlb_shm::slots::create(4, 16).unwrap();
    w.register_reader(slot_fd.as_fd(), std::process::id() as i32)
        .unwrap();
    let table = Arc::new(TableReader::open(w.table_fd(), w.arena_fd()).unwrap());
    let slots = SlotFile::open(slot_fd.as_fd()).unwrap();

    let ram = Arc::new(File::from(
        iotlb_shm::memfd::create(c"guest-ram", RAM_LEN).unwrap(),
    ));
    let phys = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(RAM_GPA),
        RAM_LEN as usize,
        Some(FileOffset::from_arc(Arc::clone(&ram), 0)),
    )])
    .unwrap();
    let mem = IommuMemory::new(phys, SharedTableIommu::new(table, slots, EP), true, ());
    Rig {
        w,
        mem,
        ram,
        _slot_fd: slot_fd,
    }
}

impl Rig {
    fn ram_read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.ram.read_exact_at(&mut buf, gpa - RAM_GPA).unwrap();
        buf
    }

    fn ram_write(&self, gpa: u64, bytes: &[u8]) {
        self.ram.write_all_at(bytes, gpa - RAM_GPA).unwrap();
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn iommu_fault(e: &GuestMemoryError) -> Option<FaultKind> {
    match e {
        GuestMemoryError::IommuError(e) => fault_kind(e),
        _ => None,
    }
}

#[test]
fn a_descriptor_chain_at_iovas_is_popped_read_and_written_through_the_table() {
    let t = rig();
    // The driver (virtio-queue's mock) lays the queue out at RING_IOVA,
    // through the IOMMU too.
    let driver = MockSplitQueue::create(&t.mem, GuestAddress(RING_IOVA), 16);
    // TX: 0x1800 bytes from the middle of the first page into the second
    // (two guest-physical pieces); RX: 0x100 bytes inside the huge leaf.
    let tx_iova = TX_IOVA + 0x800;
    let rx_iova = RX_IOVA + 0x1_2340;
    driver
        .add_desc_chains(
            &[
                desc(tx_iova, 0x1800, VRING_DESC_F_NEXT, 1),
                desc(rx_iova, 0x100, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();

    // The descriptor table really is at the ring's guest-physical address.
    let raw = t.ram_read(RING_GPA, 16);
    assert_eq!(
        u64::from_le_bytes(raw[..8].try_into().unwrap()),
        tx_iova,
        "descriptor 0's address, at RING_GPA"
    );
    assert_eq!(u32::from_le_bytes(raw[8..12].try_into().unwrap()), 0x1800);

    // What the guest placed in the TX buffer, at its two GPAs.
    let tx = pattern(7, 0x1800);
    t.ram_write(TX_GPA[0] + 0x800, &tx[..0x800]);
    t.ram_write(TX_GPA[1], &tx[0x800..]);

    let mut q: Queue = driver.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(&t.mem).expect("one chain available");
    let head = chain.head_index();
    let descs: Vec<_> = chain.clone().collect();
    assert_eq!(descs.len(), 2);
    assert_eq!(
        (descs[0].addr().0, descs[0].len(), descs[0].is_write_only()),
        (tx_iova, 0x1800, false)
    );
    assert_eq!(
        (descs[1].addr().0, descs[1].len(), descs[1].is_write_only()),
        (rx_iova, 0x100, true)
    );

    // Device reads the TX buffer by IOVA: both pieces, in order.
    let mut got = vec![0; 0x1800];
    t.mem.read_slice(&mut got, descs[0].addr()).unwrap();
    assert_eq!(got, tx);
    // virtio-queue's own Reader over the chain (slices of two pieces).
    let mut reader = chain.clone().reader(&t.mem).unwrap();
    assert_eq!(reader.available_bytes(), 0x1800);
    let mut via_reader = vec![0; 0x1800];
    std::io::Read::read_exact(&mut reader, &mut via_reader).unwrap();
    assert_eq!(via_reader, tx);

    // Device writes the RX buffer by IOVA: it lands in the huge leaf.
    let rx = pattern(99, 0x100);
    let mut writer = chain.writer(&t.mem).unwrap();
    assert_eq!(writer.available_bytes(), 0x100);
    std::io::Write::write_all(&mut writer, &rx).unwrap();
    assert_eq!(t.ram_read(RX_GPA + 0x1_2340, 0x100), rx);
    t.mem.write_obj(0xdead_beef_u32, descs[1].addr()).unwrap();
    assert_eq!(
        t.ram_read(RX_GPA + 0x1_2340, 4),
        0xdead_beef_u32.to_le_bytes()
    );

    // Completion goes to the used ring, at its IOVA, hence at its GPA.
    q.add_used(&t.mem, head, 0x100).unwrap();
    let used_off = driver.used_addr().0 - RING_IOVA;
    let used = t.ram_read(RING_GPA + used_off, 12);
    assert_eq!(u16::from_le_bytes([used[2], used[3]]), 1, "used idx");
    assert_eq!(
        u32::from_le_bytes(used[4..8].try_into().unwrap()),
        u32::from(head)
    );
    assert_eq!(u32::from_le_bytes(used[8..12].try_into().unwrap()), 0x100);
    // Nothing else in RAM was touched by the traffic: the byte before TX.
    assert_eq!(t.ram_read(TX_GPA[0] + 0x7ff, 1), [0]);
}

#[test]
fn unmapped_and_read_only_buffers_fault_with_the_right_reason() {
    let mut t = rig();
    let driver = MockSplitQueue::create(&t.mem, GuestAddress(RING_IOVA), 16);
    driver
        .add_desc_chains(
            &[
                desc(HOLE_IOVA, 0x200, VRING_DESC_F_NEXT, 1),
                desc(RO_IOVA, 0x200, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
                // Starts mapped (last 0x10 bytes of the RO page), runs into the hole.
                desc(TX_IOVA + 0x1ff0, 0x20, 0, 0),
            ],
            0,
        )
        .unwrap();
    t.ram_write(RO_GPA, &[0x5a; 0x200]);
    let mut q: Queue = driver.create_queue().unwrap();
    let chain = q
        .pop_descriptor_chain(&t.mem)
        .expect("the rings themselves are mapped");
    let descs: Vec<_> = chain.clone().collect();
    assert_eq!(descs.len(), 3);

    // Unmapped IOVA: reads and writes fail, with reason MAPPING.
    let mut buf = [0u8; 0x200];
    let e = t.mem.read_slice(&mut buf, descs[0].addr()).unwrap_err();
    assert_eq!(iommu_fault(&e), Some(FaultKind::Mapping), "{e}");
    assert!(!t.mem.check_range(descs[0].addr(), 0x200, Permissions::Read));
    assert!(
        chain.clone().reader(&t.mem).is_err(),
        "virtio-queue's Reader refuses the chain"
    );

    // Read-only mapping: the device may read it, not write it.
    t.mem.read_slice(&mut buf, descs[1].addr()).unwrap();
    assert_eq!(buf, [0x5a; 0x200]);
    let e = t
        .mem
        .write_slice(&[0xff; 0x200], descs[1].addr())
        .unwrap_err();
    assert_eq!(iommu_fault(&e), Some(FaultKind::Permission), "{e}");
    let e = t.mem.write_obj(1u8, descs[1].addr()).unwrap_err();
    assert_eq!(iommu_fault(&e), Some(FaultKind::Permission), "{e}");
    assert!(
        chain.clone().writer(&t.mem).is_err(),
        "virtio-queue's Writer refuses the chain"
    );
    assert_eq!(
        t.ram_read(RO_GPA, 0x200),
        vec![0x5a; 0x200],
        "nothing was written"
    );

    // A range that runs off its mapping fails as a whole, and the error
    // names the first IOVA that does not translate.
    let e = t
        .mem
        .read_slice(&mut [0u8; 0x20], descs[2].addr())
        .unwrap_err();
    assert_eq!(iommu_fault(&e), Some(FaultKind::Mapping), "{e}");
    match e {
        GuestMemoryError::IommuError(vm_memory::iommu::Error::CannotResolve {
            iova_range, ..
        }) => {
            assert_eq!(
                (iova_range.base.0, iova_range.length),
                (TX_IOVA + 0x2000, 0x10)
            );
        }
        other => panic!("{other}"),
    }

    // A blocked endpoint faults with reason DOMAIN.
    t.w.set_endpoint(EP, EndpointTarget::Blocked).unwrap();
    t.w.synchronize();
    let e = t
        .mem
        .read_slice(&mut buf, GuestAddress(RO_IOVA))
        .unwrap_err();
    assert_eq!(iommu_fault(&e), Some(FaultKind::Domain), "{e}");
}

#[test]
fn an_unmap_waits_for_a_translation_in_use_and_then_takes_effect() {
    let mut t = rig();
    t.ram_write(TX_GPA[0], &[3; 16]);
    let mem = &t.mem;
    // A get_slices iterator holds its translation (and the pin) until dropped.
    let mut slices = mem
        .get_slices(GuestAddress(TX_IOVA), 16, Permissions::Read)
        .unwrap();
    let done = AtomicBool::new(false);
    let w = &mut t.w;
    std::thread::scope(|s| {
        let sync = s.spawn(|| {
            w.unmap(1, TX_IOVA, TX_IOVA + 0xfff).unwrap();
            let r = w.synchronize();
            done.store(true, Ordering::SeqCst);
            r
        });
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            !done.load(Ordering::SeqCst),
            "UNMAP completed while a translation of the page was in use"
        );
        let slice = slices.next().unwrap().unwrap();
        let mut b = [0u8; 16];
        slice.copy_to(&mut b[..]);
        assert_eq!(
            b, [3; 16],
            "still the old page: the UNMAP has not completed"
        );
        drop(slices);
        assert!(sync.join().unwrap().waited);
    });
    let e = t
        .mem
        .read_slice(&mut [0u8; 16], GuestAddress(TX_IOVA))
        .unwrap_err();
    assert_eq!(iommu_fault(&e), Some(FaultKind::Mapping), "{e}");
    // The rest of the table is untouched.
    assert!(t.mem.check_range(
        GuestAddress(TX_IOVA + 0x1000),
        0x1000,
        Permissions::ReadWrite
    ));
    assert!(
        t.mem.check_range(GuestAddress(0), 0, Permissions::Read),
        "empty ranges are fine"
    );
}
