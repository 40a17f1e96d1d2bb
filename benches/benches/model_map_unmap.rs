//! MAP+UNMAP apply cost in the device model at 64 K live 4 KiB mappings,
//! beside cloud-hypervisor's structure (faithful and tuned) in the same run.
//!
//! Each operation maps one 4 KiB page into a gap between live mappings and
//! unmaps it again, walking the gaps so every position is used.

// A benchmark that cannot set up has nothing to measure.
#![allow(clippy::expect_used)]

use criterion::{Criterion, criterion_group};
use std::hint::black_box;
use viommu_benches::model_baselines::{ChModel, TunedBTreeModel};
use viommu_benches::ratio::SideBySide;
use viommu_core::{Device, DeviceConfig, EndpointRange, NullSink};
use virtio_iommu_proto::{Attach, Map, MapFlags, Request, Status, Unmap};

const LIVE: u64 = 64 * 1024;
const PAGE: u64 = 0x1000;
const DOMAIN: u32 = 1;
const RW: MapFlags = MapFlags(3);

/// Live mappings sit on even pages; the benchmark maps odd pages.
fn live_iova(i: u64) -> u64 {
    i * 2 * PAGE
}

fn gap_iova(n: u64) -> u64 {
    live_iova(n % LIVE) + PAGE
}

fn model() -> Device {
    let cfg = DeviceConfig {
        endpoints: vec![EndpointRange {
            first: 0,
            last: 255,
            resv: vec![viommu_core::config::X86_MSI_WINDOW],
        }],
        page_size_mask: 0x1000,
        limits: viommu_core::Limits {
            max_mappings_per_domain: 1 << 20,
            max_mappings: 1 << 20,
            max_domains: 16,
        },
        ..DeviceConfig::default()
    };
    let mut dev = Device::new(cfg).expect("valid config");
    let mut sink = NullSink;
    dev.set_features(dev.offered_features(), &mut sink)
        .expect("offered features");
    let attach = Request::Attach(Attach {
        domain: DOMAIN,
        endpoint: 0,
        flags: 0,
        reserved: [0; 4],
    });
    assert_eq!(dev.handle(&attach, &mut sink), Status::Ok);
    for i in 0..LIVE {
        let s = live_iova(i);
        assert_eq!(dev.handle(&map_req(s), &mut sink), Status::Ok);
    }
    assert_eq!(dev.mapping_count() as u64, LIVE);
    dev
}

fn map_req(iova: u64) -> Request {
    Request::Map(Map {
        domain: DOMAIN,
        virt_start: iova,
        virt_end: iova + PAGE - 1,
        phys_start: iova + 0x1_0000_0000,
        flags: RW,
    })
}

fn unmap_req(iova: u64) -> Request {
    Request::Unmap(Unmap {
        domain: DOMAIN,
        virt_start: iova,
        virt_end: iova + PAGE - 1,
        reserved: [0; 4],
    })
}

fn ch() -> ChModel {
    let m = ChModel::default();
    m.attach(DOMAIN, 0);
    for i in 0..LIVE {
        let s = live_iova(i);
        m.map(DOMAIN, s, s + PAGE - 1, s);
    }
    m
}

fn tuned() -> TunedBTreeModel {
    let m = TunedBTreeModel::default();
    m.create(DOMAIN);
    for i in 0..LIVE {
        let s = live_iova(i);
        m.map(DOMAIN, s, s + PAGE - 1, s);
    }
    m
}

fn model_pair(dev: &mut Device, n: u64) {
    let iova = gap_iova(n);
    let mut sink = NullSink;
    let a = dev.handle(&map_req(iova), &mut sink);
    let b = dev.handle(&unmap_req(iova), &mut sink);
    debug_assert_eq!((a, b), (Status::Ok, Status::Ok));
    black_box((a, b));
}

fn model_pair_wire(dev: &mut Device, map: &[u8], unmap: &[u8]) {
    let mut sink = NullSink;
    black_box(dev.process(map, 4, &mut sink).used_len());
    black_box(dev.process(unmap, 4, &mut sink).used_len());
}

fn bench(c: &mut Criterion) {
    let mut dev = model();
    let chm = ch();
    let tm = tuned();
    let mut g = c.benchmark_group("map_unmap_pair_64k_live");
    let mut n = 0u64;
    g.bench_function("viommu-core Device::handle", |b| {
        b.iter(|| {
            n += 1;
            model_pair(&mut dev, n)
        })
    });
    let (map_wire, unmap_wire) = (
        map_req(gap_iova(7)).encode(),
        unmap_req(gap_iova(7)).encode(),
    );
    g.bench_function("viommu-core Device::process (wire bytes)", |b| {
        b.iter(|| model_pair_wire(&mut dev, &map_wire, &unmap_wire))
    });
    g.bench_function("tuned RwLock<BTreeMap> (range unmap)", |b| {
        b.iter(|| {
            n += 1;
            let s = gap_iova(n);
            black_box(tm.map(DOMAIN, s, s + PAGE - 1, s) && tm.unmap(DOMAIN, s, s + PAGE - 1))
        })
    });
    g.sample_size(10);
    g.bench_function("cloud-hypervisor RwLock<BTreeMap> (retain unmap)", |b| {
        b.iter(|| {
            n += 1;
            let s = gap_iova(n);
            black_box(chm.map(DOMAIN, s, s + PAGE - 1, s) && chm.unmap(DOMAIN, s, s + PAGE - 1))
        })
    });
    g.finish();
}

fn ratios() {
    let mut dev = model();
    let chm = ch();
    let tm = tuned();
    SideBySide::new("MAP+UNMAP pair, 64 K live 4 KiB mappings: cloud-hypervisor's algorithm")
        .add("cloud-hypervisor RwLock<BTreeMap> (retain)", |n| {
            let s = gap_iova(n);
            black_box(chm.map(DOMAIN, s, s + PAGE - 1, s) && chm.unmap(DOMAIN, s, s + PAGE - 1));
        })
        .add("viommu-core Device::handle", |n| model_pair(&mut dev, n))
        .run(200, 9);
    let mut dev = model();
    SideBySide::new("MAP+UNMAP pair, 64 K live 4 KiB mappings: same structure, tuned")
        .add("tuned RwLock<BTreeMap> (range unmap, no checks)", |n| {
            let s = gap_iova(n);
            black_box(tm.map(DOMAIN, s, s + PAGE - 1, s) && tm.unmap(DOMAIN, s, s + PAGE - 1));
        })
        .add("viommu-core Device::handle (all spec checks)", |n| {
            model_pair(&mut dev, n)
        })
        .run(200_000, 9);
}

criterion_group!(benches, bench);

fn main() {
    benches();
    ratios();
    Criterion::default().configure_from_args().final_summary();
}
