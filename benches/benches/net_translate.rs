//! What the switch (`vhost-user-net`) pays to translate one frame through
//! a guest's shared table, beside the same work with no IOMMU, in the same
//! run (message mode is measured end to end: `benches/net/switch.sh`).
//!
//! Per frame, what a polling thread does: read a 64-byte frame and its
//! 12-byte header out of a transmit buffer, write them into a receive
//! buffer; each buffer on a page of its own, 4,096 pages mapped (2,048
//! frames' worth, so more live mappings than DPDK's per-queue IOTLB
//! holds). 32 frames per batch (one session, as one burst). `none`: the
//! same addresses are guest-physical.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group};
use viommu_backend::QueueDma;
use viommu_benches::ratio::SideBySide;
use viommu_benches::table_rig::TableRig;

const BURST: u64 = 32;
const FRAMES: u64 = 2048;
const RAM: u64 = 64 << 20;
const LEN: usize = 12 + 64;
/// IOVAs start here; guest-physical addresses at 0.
const IOVA_BASE: u64 = 1 << 32;

/// Frame `i`'s transmit (0) or receive (1) page, as a GPA.
fn gpa(i: u64, rx: u64) -> u64 {
    (rx * FRAMES + i) * 4096
}

fn burst(q: &mut QueueDma, first: u64, base: u64, buf: &mut [u8; LEN]) {
    let b = q.batch().unwrap();
    for k in 0..BURST {
        let i = (first + k) % FRAMES;
        b.read(base + gpa(i, 0), buf).unwrap();
        b.write(base + gpa(i, 1), buf).unwrap();
    }
    std::hint::black_box(&buf);
}

fn bench(_c: &mut Criterion) {
    let rig = TableRig::new(
        "net",
        RAM,
        (0..FRAMES).flat_map(|i| (0..2).map(move |rx| (IOVA_BASE + gpa(i, rx), gpa(i, rx)))),
    );
    let (none, table) = (rig.dma("none", 1), rig.dma("table", 1));
    let (mut qn, mut qt) = (none.queue().unwrap(), table.queue().unwrap());
    let (mut bn, mut bt) = ([0u8; LEN], [0u8; LEN]);
    let figures = SideBySide::new(format!(
        "translate and copy one 64-byte frame out of a transmit buffer and into a receive buffer, {BURST} per burst, {} pages mapped",
        2 * FRAMES
    ))
    .add("none (guest-physical addresses)", |n| {
        burst(&mut qn, n * BURST, 0, &mut bn)
    })
    .add("table (IOVAs through the shared table)", |n| {
        burst(&mut qt, n * BURST, IOVA_BASE, &mut bt)
    })
    .run(2000, 25);
    let per = |i: usize| figures[i].ns_per_op / BURST as f64;
    println!(
        "  per frame: none {:.1} ns, table {:.1} ns; the table adds {:.1} ns per frame (two translations)",
        per(0),
        per(1),
        per(1) - per(0)
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
}
