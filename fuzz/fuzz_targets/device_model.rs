//! An arbitrary operation sequence drives viommu-core's device, the
//! brute-force reference model and a mirror built from the change stream
//! (`viommu_core::reference`, also used by the property test): statuses,
//! counts and translations must agree after every step.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu_core::reference::{Op, check};
use virtio_iommu_proto::{Attach, Detach, Map, MapFlags, Probe, Request, Unmap};

/// Page size masks of the property test: 4 KiB, 1 byte, mixed sizes.
const MASKS: [u64; 3] = [0x1000, 1, 0x4020_1000];

/// Addresses near where the fixture's rules change (pages, reserved
/// regions, the input range's ends), or any address.
#[derive(Arbitrary, Debug)]
enum Addr {
    Page(u8),
    PageEnd(u8),
    Near(u16),
    Any(u64),
}

impl Addr {
    fn get(&self) -> u64 {
        match *self {
            Addr::Page(p) => u64::from(p % 64) * 0x1000,
            Addr::PageEnd(p) => u64::from(p % 64) * 0x1000 + 0xfff,
            Addr::Near(v) => u64::from(v),
            Addr::Any(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum FuzzOp {
    Attach {
        domain: u8,
        endpoint: u8,
        flags: u8,
        reserved: [u8; 4],
    },
    Detach {
        domain: u8,
        endpoint: u8,
    },
    Map {
        domain: u8,
        start: Addr,
        pages: Option<u8>,
        end: Addr,
        phys: Addr,
        flags: u8,
    },
    Unmap {
        domain: u8,
        start: Addr,
        pages: Option<u8>,
        end: Addr,
        reserved: [u8; 4],
    },
    Probe {
        endpoint: u8,
    },
    Bypass(u8),
    Reset,
}

/// Mostly the fixture's domains (0–15) and endpoints, sometimes others.
fn domain(d: u8) -> u32 {
    match d {
        0..=239 => u32::from(d % 17),
        240..=247 => u32::MAX,
        _ => u32::from(d) << 8,
    }
}

fn endpoint(e: u8) -> u32 {
    const EPS: [u32; 10] = [0, 1, 2, 3, 8, 9, 100, 4, 5000, u32::MAX];
    EPS[usize::from(e) % EPS.len()]
}

/// A range of whole pages from `start`, or between two addresses.
fn range(start: &Addr, pages: Option<u8>, end: &Addr) -> (u64, u64) {
    let s = start.get();
    match pages {
        Some(n) => (s, s.wrapping_add(u64::from(n % 8 + 1) * 0x1000 - 1)),
        None => (s, end.get()),
    }
}

impl FuzzOp {
    fn op(&self) -> Op {
        Op::Req(match self {
            FuzzOp::Attach {
                domain: d,
                endpoint: e,
                flags,
                reserved,
            } => Request::Attach(Attach {
                domain: domain(*d),
                endpoint: endpoint(*e),
                flags: u32::from(*flags % 4),
                reserved: *reserved,
            }),
            FuzzOp::Detach {
                domain: d,
                endpoint: e,
            } => Request::Detach(Detach {
                domain: domain(*d),
                endpoint: endpoint(*e),
            }),
            FuzzOp::Map {
                domain: d,
                start,
                pages,
                end,
                phys,
                flags,
            } => {
                let (virt_start, virt_end) = range(start, *pages, end);
                Request::Map(Map {
                    domain: domain(*d),
                    virt_start,
                    virt_end,
                    phys_start: phys.get(),
                    flags: MapFlags(u32::from(*flags).rotate_left(u32::from(*flags >> 5) * 4)),
                })
            }
            FuzzOp::Unmap {
                domain: d,
                start,
                pages,
                end,
                reserved,
            } => {
                let (virt_start, virt_end) = range(start, *pages, end);
                Request::Unmap(Unmap {
                    domain: domain(*d),
                    virt_start,
                    virt_end,
                    reserved: *reserved,
                })
            }
            FuzzOp::Probe { endpoint: e } => Request::Probe(Probe {
                endpoint: endpoint(*e),
            }),
            FuzzOp::Bypass(v) => return Op::Bypass(*v % 4),
            FuzzOp::Reset => return Op::Reset,
        })
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    mask: u8,
    ops: Vec<FuzzOp>,
}

fuzz_target!(|input: Input| {
    let mask = MASKS[usize::from(input.mask) % MASKS.len()];
    let ops: Vec<Op> = input.ops.iter().take(32).map(FuzzOp::op).collect();
    if let Err(mismatch) = check(mask, &ops) {
        panic!("device and reference disagree: {mismatch}");
    }
});
