//! IOVA→GPA lookup through the shared translation table, beside the ways
//! it is done without one, in the same run.
//!
//! Layout (all cases): N live 4 KiB mappings at consecutive IOVAs from
//! 4 GiB, each to a scattered guest-physical frame (an odd-multiplier
//! permutation), so the table holds only 4 KiB leaves and no structure can
//! merge neighbours. One domain, one endpoint, default geometry (48-bit
//! IOVAs, 4 levels).
//!
//! Candidates, all translating one IOVA for reading and XOR-ing the GPAs:
//! - `RwLock<BTreeMap>`: read lock, `range(..=iova).next_back()`, end
//!   check (the tuned form of cloud-hypervisor's structure);
//! - vm-memory `Iotlb` behind its `RwLock`, `Iotlb::lookup(guard, iova, 1,
//!   Read)` and the first `MappedRange`, as `IommuMemory` does;
//! - a flat `Vec<u64>` indexed by IOVA page (the floor, unsynchronized);
//! - iotlb-shm `Session::translate_one`, one session per burst of 32
//!   lookups (the intended use) and one session per lookup (worst case:
//!   enter, SeqCst fence, translate, exit for every lookup);
//! - iotlb-shm `Session::translate_burst`, the 32 lookups of a burst in
//!   one call, one session per burst.
//!
//! Every operation timed is a burst of 32 lookups; the figures below are
//! per lookup. Random cases walk one precomputed IOVA sequence (2^20
//! entries, same for every candidate, each from its start), so the RNG is
//! not measured. Scaling runs 1 and 2 readers as threads (shm and BTreeMap)
//! and as forked processes (shm only: a BTreeMap cannot be shared across
//! processes) on a 2-core machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use iotlb_shm::{Access, Fault, Piece, ReaderSlot, SlotFile, TableReader};
use viommu_benches::lookup_baselines::{
    BTreeLookup, FlatTable, IotlbLookup, baselines, consecutive_iova, random_iovas, scattered_gpa,
};
use viommu_benches::ratio::{Figure, SideBySide};
use viommu_benches::scaling;
use viommu_benches::shm_rig::{EP, RegisteredReader, ShmRig};

const BURST: usize = 32;
const SEQ_LEN: usize = 1 << 20;
const K64: u64 = 64 * 1024;
const M1: u64 = 1024 * 1024;

struct Setup {
    live: u64,
    bt: BTreeLookup,
    tlb: IotlbLookup,
    flat: FlatTable,
    rig: ShmRig,
    reader: RegisteredReader,
    seq: Vec<u64>,
}

fn setup(live: u64) -> Setup {
    let (bt, tlb, flat) = baselines(live);
    let mut rig = ShmRig::new().expect("table");
    let mapped = rig
        .map_pages((0..live).map(|i| (consecutive_iova(i), scattered_gpa(i))))
        .expect("map");
    assert_eq!(mapped, live);
    let reader = rig.add_local_reader(64, 1024).expect("reader");
    let seq = random_iovas(live, SEQ_LEN, 0x5eed_1234);
    let s = Setup {
        live,
        bt,
        tlb,
        flat,
        rig,
        reader,
        seq,
    };
    s.check();
    s
}

impl Setup {
    fn slot(&self) -> ReaderSlot {
        self.reader.slots.claim_slot().expect("slot")
    }

    /// Every candidate gives the same answer before anything is timed.
    fn check(&self) {
        let mut slot = self.slot();
        let session = slot.enter(&self.rig.table);
        for &iova in self.seq.iter().take(4096).chain([hot_iova()].iter()) {
            let want = scattered_gpa((iova - consecutive_iova(0)) >> 12) | (iova & 0xfff);
            assert_eq!(self.bt.translate(iova), Some(want));
            assert_eq!(self.tlb.translate(iova), Some(want));
            assert_eq!(self.flat.translate(iova), Some(want));
            let p = session.translate_one(EP, iova, Access::READ).expect("maps");
            assert_eq!(p.gpa, want);
        }
        let mut out = [Ok(Piece {
            gpa: 0,
            len: 0,
            mmio: false,
        }); BURST];
        for w in self.seq.chunks(BURST).take(128) {
            session.translate_burst(EP, w, Access::READ, &mut out);
            for (&iova, r) in w.iter().zip(&out) {
                assert_eq!(*r, session.translate_one(EP, iova, Access::READ));
            }
        }
        assert_eq!(
            self.rig.writer.stats().nodes_in_use,
            expected_nodes(self.live)
        );
    }
}

/// Nodes of a 4-level tree holding `live` consecutive 4 KiB leaves from
/// 4 GiB (no huge leaves): root + one level-2 node + level-1 and level-0
/// nodes.
fn expected_nodes(live: u64) -> u64 {
    1 + 1 + live.div_ceil(512 * 512) + live.div_ceil(512)
}

fn hot_iova() -> u64 {
    consecutive_iova(1234) + 0x88
}

#[inline]
fn burst_bt(t: &BTreeLookup, w: &[u64]) -> u64 {
    w.iter().fold(0, |acc, &i| {
        acc ^ t.translate(black_box(i)).unwrap_or(u64::MAX)
    })
}

#[inline]
fn burst_tlb(t: &IotlbLookup, w: &[u64]) -> u64 {
    w.iter().fold(0, |acc, &i| {
        acc ^ t.translate(black_box(i)).unwrap_or(u64::MAX)
    })
}

#[inline]
fn burst_flat(t: &FlatTable, w: &[u64]) -> u64 {
    w.iter().fold(0, |acc, &i| {
        acc ^ t.translate(black_box(i)).unwrap_or(u64::MAX)
    })
}

/// One session, 32 lookups.
#[inline]
fn burst_shm(table: &TableReader, slot: &mut ReaderSlot, w: &[u64]) -> u64 {
    let session = slot.enter(table);
    w.iter().fold(0, |acc, &i| {
        acc ^ session
            .translate_one(EP, black_box(i), Access::READ)
            .map_or(u64::MAX, |p| p.gpa)
    })
}

/// Where `translate_burst` puts its results: allocated once per candidate
/// (a backend keeps its burst arrays), not per burst.
type Out = [Result<Piece, Fault>; BURST];

fn new_out() -> Out {
    [Err(Fault {
        kind: iotlb_shm::FaultKind::Mapping,
        endpoint: EP,
        iova: 0,
        access: Access::READ,
    }); BURST]
}

/// One session, the 32 lookups in one `translate_burst` call.
#[inline]
fn bulk_shm(table: &TableReader, slot: &mut ReaderSlot, w: &[u64], out: &mut Out) -> u64 {
    let session = slot.enter(table);
    session.translate_burst(EP, black_box(w), Access::READ, out);
    out.iter()
        .fold(0, |acc, r| acc ^ r.as_ref().map_or(u64::MAX, |p| p.gpa))
}

/// One session per lookup.
#[inline]
fn each_shm(table: &TableReader, slot: &mut ReaderSlot, w: &[u64]) -> u64 {
    w.iter().fold(0, |acc, &i| {
        let session = slot.enter(table);
        acc ^ session
            .translate_one(EP, black_box(i), Access::READ)
            .map_or(u64::MAX, |p| p.gpa)
    })
}

/// A walker over the shared sequence, one per candidate.
struct Cursor<'a> {
    seq: &'a [u64],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(seq: &'a [u64]) -> Self {
        Self { seq, pos: 0 }
    }

    #[inline]
    fn next(&mut self) -> &'a [u64] {
        let w = &self.seq[self.pos..self.pos + BURST];
        self.pos = (self.pos + BURST) % self.seq.len();
        w
    }
}

const NAMES: [&str; 6] = [
    "RwLock<BTreeMap> range lookup",
    "vm-memory Iotlb (RwLock, Iotlb::lookup)",
    "flat Vec<u64> by IOVA page (floor)",
    "iotlb-shm, session per 32 lookups",
    "iotlb-shm, session per lookup",
    "iotlb-shm, translate_burst of 32",
];

fn criterion_group_for(c: &mut Criterion, s: &Setup, case: &str, hot: bool) {
    let hot_w = [hot_iova(); BURST];
    let mut g = c.benchmark_group(format!("lookup_{case}"));
    g.throughput(Throughput::Elements(BURST as u64));
    let src: &[u64] = if hot { &hot_w } else { &s.seq };
    let mut cur = Cursor::new(src);
    // Each candidate restarts the sequence: same addresses, same order.
    g.bench_function(BenchmarkId::from_parameter(NAMES[0]), |b| {
        b.iter(|| burst_bt(&s.bt, cur.next()))
    });
    let mut cur = Cursor::new(src);
    g.bench_function(BenchmarkId::from_parameter(NAMES[1]), |b| {
        b.iter(|| burst_tlb(&s.tlb, cur.next()))
    });
    let mut cur = Cursor::new(src);
    g.bench_function(BenchmarkId::from_parameter(NAMES[2]), |b| {
        b.iter(|| burst_flat(&s.flat, cur.next()))
    });
    let mut slot = s.slot();
    let mut cur = Cursor::new(src);
    g.bench_function(BenchmarkId::from_parameter(NAMES[3]), |b| {
        b.iter(|| burst_shm(&s.rig.table, &mut slot, cur.next()))
    });
    let mut cur = Cursor::new(src);
    g.bench_function(BenchmarkId::from_parameter(NAMES[4]), |b| {
        b.iter(|| each_shm(&s.rig.table, &mut slot, cur.next()))
    });
    let mut cur = Cursor::new(src);
    let mut out = new_out();
    g.bench_function(BenchmarkId::from_parameter(NAMES[5]), |b| {
        b.iter(|| bulk_shm(&s.rig.table, &mut slot, cur.next(), &mut out))
    });
    g.finish();
}

/// Side-by-side rounds; returns the figures (ns per burst of 32).
fn side_by_side(s: &Setup, title: &str, hot: bool, bursts: u64, rounds: usize) -> Vec<Figure> {
    let hot_w = [hot_iova(); BURST];
    let src: &[u64] = if hot { &hot_w } else { &s.seq };
    let (mut w0, mut w1, mut w2, mut w3, mut w4, mut w5) = (
        Cursor::new(src),
        Cursor::new(src),
        Cursor::new(src),
        Cursor::new(src),
        Cursor::new(src),
        Cursor::new(src),
    );
    let (mut slot3, mut slot4, mut slot5) = (s.slot(), s.slot(), s.slot());
    let mut out5 = new_out();
    SideBySide::new(format!("{title} — per burst of {BURST} lookups"))
        .add(NAMES[0], |_| {
            black_box(burst_bt(&s.bt, w0.next()));
        })
        .add(NAMES[1], |_| {
            black_box(burst_tlb(&s.tlb, w1.next()));
        })
        .add(NAMES[2], |_| {
            black_box(burst_flat(&s.flat, w2.next()));
        })
        .add(NAMES[3], |_| {
            black_box(burst_shm(&s.rig.table, &mut slot3, w3.next()));
        })
        .add(NAMES[4], |_| {
            black_box(each_shm(&s.rig.table, &mut slot4, w4.next()));
        })
        .add(NAMES[5], |_| {
            black_box(bulk_shm(&s.rig.table, &mut slot5, w5.next(), &mut out5));
        })
        .run(bursts, rounds)
}

/// Aggregate random lookups/s of `n` reader threads.
fn shm_threads(s: &Setup, n: usize, run_for: Duration) -> f64 {
    scaling::threads(n, run_for, |gate| {
        let mut slot = s.slot();
        let mut cur = Cursor::new(&s.seq);
        cur.pos = gate.index() * (SEQ_LEN / 2);
        gate.run(|| {
            black_box(burst_shm(&s.rig.table, &mut slot, cur.next()));
            BURST as u64
        });
    })
    .expect("threads")
}

fn bt_threads(s: &Setup, n: usize, run_for: Duration) -> f64 {
    scaling::threads(n, run_for, |gate| {
        let mut cur = Cursor::new(&s.seq);
        cur.pos = gate.index() * (SEQ_LEN / 2);
        gate.run(|| {
            black_box(burst_bt(&s.bt, cur.next()));
            BURST as u64
        });
    })
    .expect("threads")
}

/// Control: a register-only loop with nothing shared, to show how much
/// of a second core the machine gives at that moment.
fn alu_threads(n: usize, run_for: Duration) -> f64 {
    scaling::threads(n, run_for, |gate| {
        let mut x = 0x1234_5678u64 + gate.index() as u64;
        gate.run(|| {
            for _ in 0..BURST {
                x = black_box(x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17));
            }
            BURST as u64
        });
    })
    .expect("threads")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Aggregate random lookups/s of `n` forked reader processes, each opening
/// the table from the inherited fds with its own registered slot file.
fn shm_processes(s: &mut Setup, n: usize, run_for: Duration) -> f64 {
    let table_fd: OwnedFd = s.rig.writer.table_fd().try_clone_to_owned().expect("dup");
    let arena_fd: OwnedFd = s.rig.writer.arena_fd().try_clone_to_owned().expect("dup");
    let slot_fds: Vec<OwnedFd> = (0..n)
        .map(|_| iotlb_shm::slots::create(64, 1024).expect("slot file"))
        .collect();
    let seq = &s.seq;
    let writer = &mut s.rig.writer;
    let rate = scaling::processes(
        n,
        run_for,
        |gate| {
            let table = TableReader::open(table_fd.as_fd(), arena_fd.as_fd()).expect("open");
            let file = SlotFile::open(slot_fds[gate.index()].as_fd()).expect("slots");
            let mut slot = file.claim_slot().expect("slot");
            let mut cur = Cursor::new(seq);
            cur.pos = gate.index() * (SEQ_LEN / 2);
            gate.run(|| {
                black_box(burst_shm(&table, &mut slot, cur.next()));
                BURST as u64
            });
        },
        |i, pid| {
            writer.register_reader(slot_fds[i].as_fd(), pid)?;
            Ok(())
        },
    )
    .expect("processes");
    writer.release_finished_readers();
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Check {
    what: &'static str,
    got: f64,
    target: f64,
    higher_is_better: bool,
}

fn main() {
    let quick = std::env::var_os("SHM_BENCH_QUICK").is_some();
    let (rounds, run_for, scale_rounds) = if quick {
        (5, Duration::from_millis(300), 3)
    } else {
        (11, Duration::from_secs(1), 5)
    };
    println!(
        "layout: N live 4 KiB mappings, consecutive IOVAs from 0x1_0000_0000, scattered GPAs \
         (no huge leaves), 1 domain, default geometry (48-bit, 4 levels); random sequence of \
         2^20 IOVAs, same for every candidate; 1 op = burst of {BURST} lookups"
    );
    let mut crit = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let mut s64 = setup(K64);
    criterion_group_for(&mut crit, &s64, "hot_64k", true);
    criterion_group_for(&mut crit, &s64, "random_64k", false);
    let hot = side_by_side(
        &s64,
        "hot lookup (same IOVA), 64 K live, 1 reader",
        true,
        20_000,
        rounds,
    );
    let r64 = side_by_side(
        &s64,
        "random lookup, 64 K live, 1 reader",
        false,
        20_000,
        rounds,
    );

    // Scaling: random lookups at 64 K live, rounds alternating candidates.
    let (mut st1, mut st2, mut bt1, mut bt2, mut sp1, mut sp2) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut al1, mut al2) = (vec![], vec![]);
    let load_before = loadavg();
    for _ in 0..scale_rounds {
        al1.push(alu_threads(1, run_for));
        al2.push(alu_threads(2, run_for));
        st1.push(shm_threads(&s64, 1, run_for));
        st2.push(shm_threads(&s64, 2, run_for));
        bt1.push(bt_threads(&s64, 1, run_for));
        bt2.push(bt_threads(&s64, 2, run_for));
    }
    // Processes last: fork needs this process to have one thread.
    for _ in 0..scale_rounds {
        sp1.push(shm_processes(&mut s64, 1, run_for));
        sp2.push(shm_processes(&mut s64, 2, run_for));
    }
    let (st1, st2, bt1, bt2, sp1, sp2) = (
        median(st1),
        median(st2),
        median(bt1),
        median(bt2),
        median(sp1),
        median(sp2),
    );
    let (al1, al2) = (median(al1), median(al2));
    let load_after = loadavg();
    drop(s64);

    let s1m = setup(M1);
    criterion_group_for(&mut crit, &s1m, "random_1m", false);
    let r1m = side_by_side(
        &s1m,
        "random lookup, 1 M live, 1 reader",
        false,
        20_000,
        rounds,
    );
    drop(s1m);

    let per = |f: &Figure| f.ns_per_op / BURST as f64;
    println!("\n== per-lookup figures (ns), median of {rounds} side-by-side rounds");
    println!(
        "  {:<44} {:>10} {:>12} {:>12}",
        "candidate", "hot 64K", "random 64K", "random 1M"
    );
    for i in 0..NAMES.len() {
        println!(
            "  {:<44} {:>10.2} {:>12.2} {:>12.2}",
            NAMES[i],
            per(&hot[i]),
            per(&r64[i]),
            per(&r1m[i])
        );
    }
    println!(
        "\n== scaling: aggregate random lookups/s at 64 K live (session per 32), median of \
         {scale_rounds} runs of {:?}; 2-core machine, shared with other work",
        run_for
    );
    let m = |x: f64| x / 1e6;
    println!(
        "  iotlb-shm, threads:    1 → {:>8.1} M/s   2 → {:>8.1} M/s   ratio {:.2}x",
        m(st1),
        m(st2),
        st2 / st1
    );
    println!(
        "  iotlb-shm, processes:  1 → {:>8.1} M/s   2 → {:>8.1} M/s   ratio {:.2}x",
        m(sp1),
        m(sp2),
        sp2 / sp1
    );
    println!(
        "  RwLock<BTreeMap>, threads: 1 → {:>5.1} M/s   2 → {:>8.1} M/s   ratio {:.2}x",
        m(bt1),
        m(bt2),
        bt2 / bt1
    );
    println!(
        "  control (ALU loop, nothing shared), threads: ratio 2/1 = {:.2}x  \
         (load average before/after: {load_before} / {load_after})",
        al2 / al1
    );
    println!(
        "  2 readers: iotlb-shm (threads) / BTreeMap (threads) = {:.1}x",
        st2 / bt2
    );

    // Targets (architecture.md, "Performance anchors").
    let (bt, tlb, flat, burst, each, bulk) = (0, 1, 2, 3, 4, 5);
    let sp = |v: &[Figure], a: usize, b: usize| v[a].ns_per_op / v[b].ns_per_op;
    let checks = [
        Check {
            what: "hot: shm (burst) vs BTreeMap, ≥",
            got: sp(&hot, bt, burst),
            target: 10.0,
            higher_is_better: true,
        },
        Check {
            what: "hot: shm (session/lookup) vs BTreeMap, ≥",
            got: sp(&hot, bt, each),
            target: 10.0,
            higher_is_better: true,
        },
        Check {
            what: "hot: shm (burst) vs Iotlb, ≥",
            got: sp(&hot, tlb, burst),
            target: 10.0,
            higher_is_better: true,
        },
        Check {
            what: "hot: shm (session/lookup) vs Iotlb, ≥",
            got: sp(&hot, tlb, each),
            target: 10.0,
            higher_is_better: true,
        },
        Check {
            what: "random 64K: shm (burst) vs BTreeMap, ≥",
            got: sp(&r64, bt, burst),
            target: 20.0,
            higher_is_better: true,
        },
        Check {
            what: "random 64K: shm (session/lookup) vs BTreeMap, ≥",
            got: sp(&r64, bt, each),
            target: 20.0,
            higher_is_better: true,
        },
        Check {
            what: "hot: shm (burst) / floor, ≤",
            got: sp(&hot, burst, flat),
            target: 1.5,
            higher_is_better: false,
        },
        Check {
            what: "hot: shm (session/lookup) / floor, ≤",
            got: sp(&hot, each, flat),
            target: 1.5,
            higher_is_better: false,
        },
        Check {
            what: "random 64K: shm (burst) / floor, ≤",
            got: sp(&r64, burst, flat),
            target: 1.5,
            higher_is_better: false,
        },
        Check {
            what: "random 1M: shm (burst) / floor, ≤",
            got: sp(&r1m, burst, flat),
            target: 2.5,
            higher_is_better: false,
        },
        Check {
            what: "hot: shm (translate_burst) vs BTreeMap, ≥",
            got: sp(&hot, bt, bulk),
            target: 10.0,
            higher_is_better: true,
        },
        Check {
            what: "random 64K: shm (translate_burst) vs BTreeMap, ≥",
            got: sp(&r64, bt, bulk),
            target: 20.0,
            higher_is_better: true,
        },
        Check {
            what: "hot: shm (translate_burst) / floor, ≤",
            got: sp(&hot, bulk, flat),
            target: 1.5,
            higher_is_better: false,
        },
        Check {
            what: "random 1M: shm (translate_burst) / floor, ≤",
            got: sp(&r1m, bulk, flat),
            target: 2.5,
            higher_is_better: false,
        },
        Check {
            what: "2 reader threads / 1, shm, ≥",
            got: st2 / st1,
            target: 1.8,
            higher_is_better: true,
        },
        Check {
            what: "2 reader processes / 1, shm, ≥",
            got: sp2 / sp1,
            target: 1.8,
            higher_is_better: true,
        },
    ];
    println!("\n== targets");
    for c in &checks {
        let met = if c.higher_is_better {
            c.got >= c.target
        } else {
            c.got <= c.target
        };
        println!(
            "  {:<52} {:>6.1}  got {:>8.2}x  {}",
            c.what,
            c.target,
            c.got,
            if met { "MET" } else { "MISSED" }
        );
    }
    crit.final_summary();
}
