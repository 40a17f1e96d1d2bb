//! What a block backend pays to translate one request through the shared
//! table, beside the same work with no IOMMU, in the same run: the work of
//! `vhost-user-blk`'s engine per request, through `viommu-backend`.
//!
//! Per request (a Linux virtio-blk request: header, one 4 KiB data page,
//! status, each on its own page): read the 16-byte header, hold the data
//! page for the I/O (a pin in table mode) and turn it into an iovec, write
//! the status byte; the holds are dropped after the batch, as completions
//! do. 32 requests per batch (one session). `none`: the same addresses are
//! guest-physical.
//!
//! The table is the daemon's: its backend socket runs in this process, the
//! backend connects to it as `vhost-user-blk` does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group};
use iotlb_shm::Access;
use viommu_backend::QueueDma;
use viommu_benches::ratio::SideBySide;
use viommu_benches::table_rig::TableRig;

const BATCH: u64 = 32;
const REQUESTS: u64 = 1024;
const RAM: u64 = 64 << 20;
/// IOVAs start here; guest-physical addresses at 0.
const IOVA_BASE: u64 = 1 << 32;

/// Request `i`'s pages: header (+0), data (+1), status (+2), as GPAs.
fn gpa(i: u64, page: u64) -> u64 {
    (i * 3 + page) * 4096
}

fn run_batch(q: &mut QueueDma, first: u64, base: u64) {
    let b = q.batch().unwrap();
    let mut holds = Vec::with_capacity(BATCH as usize);
    let mut iov: Vec<(usize, u64)> = Vec::with_capacity(BATCH as usize);
    for k in 0..BATCH {
        let i = (first + k) % REQUESTS;
        let mut header = [0u8; 16];
        b.read(base + gpa(i, 0), &mut header).unwrap();
        let data = base + gpa(i, 1);
        holds.push(
            b.hold(&[(data, 4096)], Access::WRITE, |h, l| {
                iov.push((h as usize, l))
            })
            .unwrap(),
        );
        b.write(base + gpa(i, 2), &[0]).unwrap();
    }
    std::hint::black_box(&iov);
    drop(b);
    drop(holds);
}

fn bench(_c: &mut Criterion) {
    let rig = TableRig::new(
        "blk",
        RAM,
        (0..REQUESTS).flat_map(|i| (0..3).map(move |p| (IOVA_BASE + gpa(i, p), gpa(i, p)))),
    );
    let none = rig.dma("none", 256);
    let table = rig.dma("table", 256);
    let (mut qn, mut qt) = (none.queue().unwrap(), table.queue().unwrap());
    let figures = SideBySide::new(format!(
        "translate one virtio-blk request (header, 4 KiB data held for I/O, status), {BATCH} per batch"
    ))
    .add("none (guest-physical addresses)", |n| {
        run_batch(&mut qn, n * BATCH, 0)
    })
    .add("table (IOVAs through the shared table)", |n| {
        run_batch(&mut qt, n * BATCH, IOVA_BASE)
    })
    .run(2000, 25);
    let per = |i: usize| figures[i].ns_per_op / BATCH as f64;
    println!(
        "  per request: none {:.1} ns, table {:.1} ns; translation through the table adds {:.1} ns per request",
        per(0),
        per(1),
        per(1) - per(0)
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
}
