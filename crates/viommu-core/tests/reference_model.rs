//! Property test: random request sequences against a brute-force reference
//! model written straight from the spec rules (linear scans, no trees; it is
//! `viommu_core::reference`, shared with the fuzz target `device_model`).
//! Both must give identical statuses, and identical translations at probed
//! addresses. A third party, a mirror rebuilt only from the device's change
//! stream, must translate identically too: that is what the shared table
//! relies on.

use proptest::prelude::*;
use viommu_core::reference::{Op, check};
use virtio_iommu_proto::{Attach, Detach, Map, MapFlags, Request, Unmap};

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..48).prop_map(|p| p * 0x1000),
        3 => (0u64..48).prop_map(|p| p * 0x1000 + 0xfff),
        1 => 0u64..0x30000,
        1 => prop::sample::select(vec![
            0, u64::MAX, 0xfff, 0xfee0_0000, 0xfeef_ffff, 0x1000_0000, 0x1000_ffff,
            0x0800_0000, 0xffff_ffff_ffff, 0x1_0000_0000_0000, 0xffff_ffff_ffff_f000,
        ]),
    ]
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        3 => (addr(), 1u64..6).prop_map(|(s, pages)| (s, s.wrapping_add(pages * 0x1000 - 1))),
        1 => (addr(), addr()),
    ]
}

fn domain() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0u32..6, 1 => Just(15u32), 1 => Just(16u32), 1 => Just(u32::MAX)]
}

fn endpoint() -> impl Strategy<Value = u32> {
    prop::sample::select(vec![0u32, 1, 2, 3, 8, 9, 100, 4, 5000, u32::MAX])
}

fn op() -> impl Strategy<Value = Op> {
    let attach = (
        domain(),
        endpoint(),
        prop_oneof![8 => Just(0u32), 2 => Just(1u32), 1 => Just(2u32)],
        prop_oneof![9 => Just([0u8; 4]), 1 => Just([0, 0, 0, 1])],
    )
        .prop_map(|(domain, endpoint, flags, reserved)| {
            Request::Attach(Attach {
                domain,
                endpoint,
                flags,
                reserved,
            })
        });
    let detach = (domain(), endpoint())
        .prop_map(|(domain, endpoint)| Request::Detach(Detach { domain, endpoint }));
    let map = (domain(), range(), addr(), prop_oneof![6 => Just(3u32), 1 => Just(1u32), 1 => Just(2u32), 1 => Just(0u32), 1 => Just(4u32), 1 => Just(8u32)])
        .prop_map(|(domain, (virt_start, virt_end), phys_start, flags)| Request::Map(Map { domain, virt_start, virt_end, phys_start, flags: MapFlags(flags) }));
    let unmap = (domain(), range(), any::<[u8; 4]>()).prop_map(
        |(domain, (virt_start, virt_end), reserved)| {
            Request::Unmap(Unmap {
                domain,
                virt_start,
                virt_end,
                reserved,
            })
        },
    );
    prop_oneof![
        4 => attach.prop_map(Op::Req),
        2 => detach.prop_map(Op::Req),
        8 => map.prop_map(Op::Req),
        4 => unmap.prop_map(Op::Req),
        1 => prop_oneof![Just(0u8), Just(1u8), Just(2u8)].prop_map(Op::Bypass),
        1 => Just(Op::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 10_000,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn model_matches_reference(mask in prop::sample::select(vec![0x1000u64, 1, 0x4020_1000]), ops in prop::collection::vec(op(), 1..40)) {
        check(mask, &ops).map_err(|m| TestCaseError::fail(m.to_string()))?;
    }
}
