//! Shared bytes per live 4 KiB mapping in the shared table, beside the
//! memory the usual structures spend on the same mappings.
//!
//! Three layouts of 64 K mappings, each page its own 4 KiB mapping to a
//! scattered guest frame (so no huge leaf):
//! - dense: consecutive IOVAs from 4 GiB;
//! - Linux IOVA allocator: allocations of 1–32 pages (powers of two, size
//!   aligned, as `alloc_iova(.., size_aligned)` does), top-down from
//!   0xffff_f000, with a hole of 1–4 pages after one allocation in eight
//!   (allocations freed since);
//! - random: 64 K distinct random pages in a 48-bit IOVA space.
//!
//! iotlb-shm: arena nodes in use × 4096 (what readers can reach), and the
//! same plus the table file (header + one word per endpoint; 64 Ki
//! endpoints by default), from `TableWriter::stats()`/`shared_bytes()`.
//! The writer's private heap (its per-node counters and maps) is printed
//! too; it is not shared.
//!
//! Baselines, measured with a counting global allocator (bytes requested
//! from the allocator, after building minus before; malloc's own per-chunk
//! header, 8–16 B, is not counted): cloud-hypervisor's
//! `BTreeMap<u64, {gpa, size}>`, and vm-memory's `Iotlb` (a `RangeMap`).
//! Linux vhost's IOTLB spends one `struct vhost_iotlb_map` per mapping:
//! 96 B (rb_node 24 + list_head 16 + start/last/size/addr 32 + perm/pad 8 +
//! __subtree_last 8 + opaque 8), a constant, not measured here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicIsize, Ordering};

use viommu_benches::lookup_baselines::{IotlbLookup, PAGE, XorShift, scattered_gpa};
use viommu_benches::model_baselines::ChMapping;
use viommu_benches::shm_rig::ShmRig;

/// Bytes currently allocated through the global allocator.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and only adds bookkeeping on an atomic counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: usize = 64 * 1024;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn dense() -> Vec<u64> {
    (0..N as u64).map(|i| 0x1_0000_0000 + i * PAGE).collect()
}

fn linux_allocator() -> Vec<u64> {
    let mut rng = XorShift::new(0x11u64);
    let sizes = [1u64, 1, 1, 1, 2, 2, 4, 8, 16, 32];
    let mut top = 0x1_0000_0000u64; // exclusive; the first page is 0xffff_f000
    let mut out = Vec::with_capacity(N);
    while out.len() < N {
        let pages = sizes[(rng.next_u64() % sizes.len() as u64) as usize];
        let bytes = pages * PAGE;
        let start = (top - bytes) & !(bytes - 1);
        for p in 0..pages {
            if out.len() < N {
                out.push(start + p * PAGE);
            }
        }
        top = start;
        if rng.next_u64() % 8 == 0 {
            top -= (1 + rng.next_u64() % 4) * PAGE;
        }
    }
    out
}

fn random48() -> Vec<u64> {
    let mut rng = XorShift::new(0x4848u64);
    let mut seen = HashSet::with_capacity(N);
    let mut out = Vec::with_capacity(N);
    while out.len() < N {
        let page = rng.next_u64() % (1u64 << 36);
        if seen.insert(page) {
            out.push(page * PAGE);
        }
    }
    out
}

struct Row {
    layout: &'static str,
    span: u64,
    nodes: u64,
    arena: f64,
    with_table: f64,
    small_table: f64,
    writer_heap: f64,
    btree: f64,
    iotlb: f64,
}

fn measure(layout: &'static str, iovas: &[u64]) -> Row {
    let n = iovas.len() as f64;
    let (lo, hi) = iovas
        .iter()
        .fold((u64::MAX, 0), |(l, h), &i| (l.min(i), h.max(i)));
    let before = live();
    let mut rig = ShmRig::new().expect("table");
    rig.map_pages(
        iovas
            .iter()
            .enumerate()
            .map(|(k, &iova)| (iova, scattered_gpa(k as u64))),
    )
    .expect("map");
    let writer_heap = (live() - before) as f64 / n;
    let stats = rig.writer.stats();
    let arena = (stats.nodes_in_use * 4096) as f64 / n;
    let with_table = rig.writer.shared_bytes() as f64 / n;
    let small_table = arena + iotlb_shm::layout::table_file_bytes(256) as f64 / n;
    drop(rig);

    let before = live();
    let mut bt = BTreeMap::new();
    for (k, &iova) in iovas.iter().enumerate() {
        bt.insert(
            iova,
            ChMapping {
                gpa: scattered_gpa(k as u64),
                size: PAGE,
            },
        );
    }
    let btree = (live() - before) as f64 / n;
    assert_eq!(bt.len(), iovas.len());
    drop(bt);

    let before = live();
    let tlb = IotlbLookup::default();
    for (k, &iova) in iovas.iter().enumerate() {
        tlb.insert(iova, PAGE, scattered_gpa(k as u64));
    }
    let iotlb = (live() - before) as f64 / n;
    drop(tlb);

    Row {
        layout,
        span: hi - lo + PAGE,
        nodes: stats.nodes_in_use,
        arena,
        with_table,
        small_table,
        writer_heap,
        btree,
        iotlb,
    }
}

fn span(bytes: u64) -> String {
    if bytes >= 1 << 40 {
        format!("{} TiB", bytes >> 40)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn main() {
    let rows = [
        measure("dense (consecutive from 4 GiB)", &dense()),
        measure("Linux IOVA allocator (top-down, holes)", &linux_allocator()),
        measure("random pages, 48-bit space", &random48()),
    ];
    println!(
        "\n== bytes per live 4 KiB mapping, 64 K mappings (scattered GPAs, 4 KiB leaves only)"
    );
    println!(
        "  {:<40} {:>10} {:>7} {:>11} {:>13} {:>13} {:>12} {:>10} {:>10} {:>11}",
        "layout",
        "IOVA span",
        "nodes",
        "shm arena",
        "shm +table*",
        "+table(256)†",
        "shm writer",
        "BTreeMap",
        "Iotlb",
        "vhost IOTLB"
    );
    for r in &rows {
        println!(
            "  {:<40} {:>10} {:>7} {:>9.1} B {:>11.1} B {:>11.1} B {:>10.2} B {:>8.1} B {:>8.1} B {:>9} B",
            r.layout,
            span(r.span),
            r.nodes,
            r.arena,
            r.with_table,
            r.small_table,
            r.writer_heap,
            r.btree,
            r.iotlb,
            96
        );
    }
    println!(
        "  * arena plus the table file (4 KiB header + 8 B × 64 Ki endpoints of the default \
         geometry = 516 KiB, whatever the mapping count). \"shm writer\" is the writer's private \
         heap (not shared). BTreeMap/Iotlb: heap bytes requested (malloc chunk headers not counted)."
    );
    println!(
        "  † arena plus the table file of a 256-endpoint geometry (computed with \
         layout::table_file_bytes(256), not measured)."
    );
    println!("\n== ratios (shared bytes per mapping; > 1: iotlb-shm is smaller)");
    for r in &rows {
        println!(
            "  {:<40} BTreeMap/shm {:>7.2}x   vhost IOTLB/shm {:>7.2}x   target ≤ 16 B: arena {:.1} B {}, +table {:.1} B {}",
            r.layout,
            r.btree / r.arena,
            96.0 / r.arena,
            r.arena,
            if r.arena <= 16.0 { "MET" } else { "MISSED" },
            r.with_table,
            if r.with_table <= 16.0 {
                "MET"
            } else {
                "MISSED"
            }
        );
    }
}
