//! The device-state format of `viommu_core::state`: a device driven by an
//! arbitrary request sequence is saved as a snapshot and as a journal (a
//! fresh device's snapshot plus one record per change); both restore to a
//! device whose own snapshot is the live device's. The saved bytes, then
//! edited arbitrarily, restore or are refused, never a panic; what
//! restores saves and restores again to the same bytes.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viommu_core::reference::fixture::config;
use viommu_core::state::{
    Kind, MAX_RECORD_LEN, Record, encode_record, fingerprint, restore, snapshot, snapshot_records,
};
use viommu_core::{Device, NullSink};
use virtio_iommu_proto::config::BYPASS_OFFSET;
use virtio_iommu_proto::{Attach, Detach, Map, MapFlags, Request, Status, Unmap};

const MASKS: [u64; 3] = [0x1000, 1, 0x4020_1000];
const ENDPOINTS: [u32; 8] = [0, 1, 2, 3, 8, 9, 100, 4];

#[derive(Arbitrary, Debug)]
enum Step {
    Attach {
        domain: u8,
        endpoint: u8,
        bypass: bool,
    },
    Detach {
        domain: u8,
        endpoint: u8,
    },
    Map {
        domain: u8,
        page: u8,
        pages: u8,
        phys: u16,
        flags: u8,
    },
    Unmap {
        domain: u8,
        page: u8,
        pages: u8,
    },
    Bypass(u8),
    Reset,
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Xor { at: u16, value: u8 },
    Cut(u16),
    Zero { at: u16, len: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    mask: u8,
    journal: bool,
    edits: Vec<Edit>,
    steps: Vec<Step>,
}

fn request(step: &Step) -> Option<Request> {
    let ep = |e: &u8| ENDPOINTS[usize::from(*e) % ENDPOINTS.len()];
    let dom = |d: &u8| u32::from(*d % 8);
    let range = |p: &u8, n: &u8| {
        let s = u64::from(p % 48) * 0x1000;
        (s, s + u64::from(n % 6 + 1) * 0x1000 - 1)
    };
    Some(match step {
        Step::Attach {
            domain,
            endpoint,
            bypass,
        } => Request::Attach(Attach {
            domain: dom(domain),
            endpoint: ep(endpoint),
            flags: u32::from(*bypass),
            reserved: [0; 4],
        }),
        Step::Detach { domain, endpoint } => Request::Detach(Detach {
            domain: dom(domain),
            endpoint: ep(endpoint),
        }),
        Step::Map {
            domain,
            page,
            pages,
            phys,
            flags,
        } => {
            let (virt_start, virt_end) = range(page, pages);
            Request::Map(Map {
                domain: dom(domain),
                virt_start,
                virt_end,
                phys_start: u64::from(*phys) * 0x1000,
                flags: MapFlags(u32::from(flags % 4)),
            })
        }
        Step::Unmap {
            domain,
            page,
            pages,
        } => {
            let (virt_start, virt_end) = range(page, pages);
            Request::Unmap(Unmap {
                domain: dom(domain),
                virt_start,
                virt_end,
                reserved: [0; 4],
            })
        }
        Step::Bypass(_) | Step::Reset => return None,
    })
}

/// A journal being written: its bytes and the next record's number.
struct Journal {
    bytes: Vec<u8>,
    index: u64,
    fingerprint: u64,
}

impl Journal {
    fn push(&mut self, record: &Record<'_>) {
        let mut buf = [0u8; MAX_RECORD_LEN];
        let n = encode_record(self.index, self.fingerprint, record, &mut buf);
        self.bytes.extend_from_slice(&buf[..n]);
        self.index += 1;
    }
}

fuzz_target!(|input: Input| {
    let cfg = config(MASKS[usize::from(input.mask) % MASKS.len()]);
    let Ok(mut dev) = Device::new(cfg.clone()) else {
        panic!("the fixture builds no device");
    };
    let features = dev.offered_features();
    let mut journal = Journal {
        bytes: snapshot(&dev, &[], Kind::Journal),
        index: snapshot_records(&dev).len() as u64 + 1,
        fingerprint: fingerprint(&cfg),
    };
    if dev.set_features(features, &mut NullSink).is_err() {
        panic!("offered features refused");
    }
    journal.push(&Record::Features(features.0));
    for (i, step) in input.steps.iter().take(48).enumerate() {
        if let Some(req) = request(step) {
            let bytes = req.encode();
            if dev.process(&bytes, 4, &mut NullSink).status() == Some(Status::Ok) {
                let position = Some(i as u16);
                journal.push(&Record::Request {
                    position,
                    bytes: &bytes,
                });
            }
        } else if let Step::Bypass(v) = step {
            let value = v % 3;
            if dev
                .write_config(BYPASS_OFFSET, &[value], &mut NullSink)
                .is_ok()
            {
                journal.push(&Record::Config {
                    offset: BYPASS_OFFSET as u16,
                    value,
                });
            }
        } else {
            dev.reset(&mut NullSink);
            journal.push(&Record::Reset);
            if dev.set_features(features, &mut NullSink).is_err() {
                panic!("offered features refused after a reset");
            }
            journal.push(&Record::Features(features.0));
        }
    }

    // Both forms restore to the live device.
    let want = snapshot(&dev, &[], Kind::Snapshot);
    for (name, bytes) in [("snapshot", &want), ("journal", &journal.bytes)] {
        match restore(cfg.clone(), bytes) {
            Ok(r) => {
                assert!(!r.torn_tail && r.valid_len == bytes.len(), "{name}: {r:?}");
                assert!(
                    snapshot(&r.device, &r.faults, Kind::Snapshot) == want,
                    "{name} restores another device"
                );
            }
            Err(e) => panic!("a {name} of the live device is refused: {e}"),
        }
    }

    // Edited bytes: refused, or restored to a device that saves and
    // restores to the same bytes again.
    if input.edits.is_empty() {
        return;
    }
    let mut bytes = if input.journal { journal.bytes } else { want };
    for edit in input.edits.iter().take(8) {
        match *edit {
            Edit::Xor { at, value } => {
                if let Some(b) = bytes.get_mut(usize::from(at)) {
                    *b ^= value;
                }
            }
            Edit::Cut(n) => bytes.truncate(usize::from(n)),
            Edit::Zero { at, len } => {
                let at = usize::from(at).min(bytes.len());
                let end = (at + usize::from(len)).min(bytes.len());
                bytes[at..end].fill(0);
            }
        }
    }
    if let Ok(r) = restore(cfg.clone(), &bytes) {
        assert!(r.valid_len <= bytes.len());
        let again = snapshot(&r.device, &r.faults, Kind::Snapshot);
        match restore(cfg, &again) {
            Ok(r2) => assert!(snapshot(&r2.device, &r2.faults, Kind::Snapshot) == again),
            Err(e) => panic!("the snapshot of a restored device is refused: {e}"),
        }
    }
});
