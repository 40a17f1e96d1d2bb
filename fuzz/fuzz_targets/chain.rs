//! Arbitrary descriptor lists on a small guest RAM with a hole and two
//! adjacent regions: `ChainParts` of the daemon splits them into readable
//! and writable segments, gathers and scatters exactly as a byte-by-byte
//! model of guest RAM says (whole segments inside one region, nothing
//! written when any touched segment is outside), and never reads or
//! writes outside the chain.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost_user_iommu::chain::{ChainError, ChainParts};
use viommu_backend::RamAccess;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// `(start, length)` of each RAM region: a hole below 0x1000 and between
/// 0x2000 and 0x3000; 0x3000 and 0x3800 are adjacent but separate regions.
const REGIONS: [(u64, usize); 3] = [(0x1000, 0x1000), (0x3000, 0x800), (0x3800, 0x800)];

fn ram() -> &'static RamAccess {
    static RAM: OnceLock<RamAccess> = OnceLock::new();
    RAM.get_or_init(|| {
        let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        match GuestMemoryMmap::from_ranges(&ranges) {
            Ok(m) => RamAccess::new(Arc::new(m)),
            Err(e) => panic!("cannot map the test RAM: {e}"),
        }
    })
}

/// Guest RAM as plain bytes, one vector per region.
struct Model(Vec<Vec<u8>>);

impl Model {
    /// The region and offset of `[addr, addr + len)`, if it lies inside one
    /// region (an empty range may sit at a region's end).
    fn locate(&self, addr: u64, len: u64) -> Option<(usize, usize)> {
        REGIONS.iter().enumerate().find_map(|(i, &(start, size))| {
            let off = addr.checked_sub(start)?;
            let end = off.checked_add(len)?;
            (end <= size as u64 && (off < size as u64 || len == 0)).then_some((i, off as usize))
        })
    }
}

/// Fills RAM with a pattern and returns the same bytes as a model.
fn reset_ram(ram: &RamAccess, seed: u8) -> Model {
    let mut model = Vec::new();
    for &(start, size) in &REGIONS {
        let bytes: Vec<u8> = (0..size)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        if let Err(e) = ram.write(start, &bytes) {
            panic!("cannot fill the test RAM: {e}");
        }
        model.push(bytes);
    }
    Model(model)
}

fn read_ram(ram: &RamAccess) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(start, size)| {
            let mut buf = vec![0u8; size];
            if let Err(e) = ram.read(start, &mut buf) {
                panic!("cannot read the test RAM: {e}");
            }
            buf
        })
        .collect()
}

/// A descriptor: mostly near guest RAM, sometimes anywhere.
#[derive(Arbitrary, Debug)]
struct Desc {
    addr: u16,
    len: u16,
    wild: Option<(u64, u32)>,
    writable: bool,
}

impl Desc {
    fn get(&self) -> (u64, u32, bool) {
        match self.wild {
            Some((a, l)) => (a, l, self.writable),
            None => (
                u64::from(self.addr),
                u32::from(self.len % 0x1800),
                self.writable,
            ),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    seed: u8,
    descs: Vec<Desc>,
    gather_len: u16,
    data: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let ram = ram();
    let mut model = reset_ram(ram, input.seed);
    let descs: Vec<(u64, u32, bool)> = input.descs.iter().take(16).map(Desc::get).collect();

    let mut chain = ChainParts::default();
    let split = chain.fill(descs.iter().copied());
    let first_writable = descs.iter().position(|d| d.2);
    let misplaced =
        first_writable.and_then(|w| descs[w..].iter().position(|d| !d.2).map(|i| w + i));
    match misplaced {
        Some(index) => {
            assert_eq!(split, Err(ChainError::ReadableAfterWritable { index }));
            return;
        }
        None => assert_eq!(split, Ok(())),
    }
    let w = first_writable.unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(w);
    let total = |s: &[(u64, u32, bool)]| s.iter().map(|d| u64::from(d.1)).sum::<u64>();
    assert_eq!(chain.readable_len(), total(readable));
    assert_eq!(chain.writable_len(), total(writable));
    let outside = |&(addr, len, _): &(u64, u32, bool)| ChainError::OutsideMemory { addr, len };

    // Gather: every readable segment must be in RAM as a whole; the bytes
    // are the segments' bytes in order, as many as fit.
    let mut buf = vec![0xa5u8; usize::from(input.gather_len % 0x2000)];
    let got = chain.gather(ram, &mut buf);
    let mut want_bytes = Vec::new();
    let mut want = Ok(());
    for d in readable {
        match model.locate(d.0, u64::from(d.1)) {
            Some((r, off)) => want_bytes.extend_from_slice(&model.0[r][off..off + d.1 as usize]),
            None => {
                want = Err(outside(d));
                break;
            }
        }
    }
    match want {
        Ok(()) => {
            let n = want_bytes.len().min(buf.len());
            assert_eq!(got, Ok(n));
            assert_eq!(&buf[..n], &want_bytes[..n]);
            assert!(
                buf[n..].iter().all(|&b| b == 0xa5),
                "gather wrote past what it returned"
            );
        }
        Err(e) => assert_eq!(got, Err(e)),
    }
    assert!(read_ram(ram) == model.0, "gather changed guest RAM");

    // check_writable: every writable segment in RAM as a whole.
    let want = writable
        .iter()
        .find(|d| model.locate(d.0, u64::from(d.1)).is_none())
        .map_or(Ok(()), |d| Err(outside(d)));
    assert_eq!(chain.check_writable(ram), want);

    // Scatter: the touched prefix of each segment must be in RAM; then the
    // data lands in order and nothing else changes; else nothing changes.
    let data = &input.data[..input.data.len().min(chain.writable_len() as usize)];
    let got = chain.scatter(ram, data);
    let mut plan = Vec::new();
    let mut left = data;
    let mut want = Ok(());
    for d in writable {
        if left.is_empty() {
            break;
        }
        let take = left.len().min(d.1 as usize);
        match model.locate(d.0, take as u64) {
            Some(at) => plan.push((at, &left[..take])),
            None => {
                want = Err(outside(d));
                break;
            }
        }
        left = &left[take..];
    }
    if want.is_ok() {
        for ((r, off), bytes) in plan {
            model.0[r][off..off + bytes.len()].copy_from_slice(bytes);
        }
    }
    assert_eq!(got, want);
    assert!(
        read_ram(ram) == model.0,
        "scatter wrote other bytes than the chain's"
    );

    // Round trip: a chain reading the segments just written gives the data
    // back (when no two of them overlap).
    let mut left = data.len();
    let segs: Vec<(u64, u32, bool)> = writable
        .iter()
        .map_while(|d| {
            (left > 0).then(|| {
                let take = left.min(d.1 as usize);
                left -= take;
                (d.0, take as u32, false)
            })
        })
        .collect();
    let mut spans: Vec<(u64, u64)> = segs
        .iter()
        .map(|s| (s.0, s.0.saturating_add(u64::from(s.1))))
        .collect();
    spans.sort_unstable();
    let disjoint = spans.windows(2).all(|w| w[0].1 <= w[1].0);
    if want.is_ok() && !data.is_empty() && disjoint {
        let mut back = ChainParts::default();
        assert_eq!(back.fill(segs), Ok(()));
        let mut out = vec![0u8; data.len()];
        assert_eq!(back.gather(ram, &mut out), Ok(data.len()));
        assert_eq!(out, data);
    }
});
