//! Drives the device, the reference model and the change-stream mirror
//! with one operation sequence and reports the first disagreement.

use super::fixture::config;
use super::mirror::{Mirror, MirrorError};
use super::model::Reference;
use crate::{Access, ChangeLog, ConfigError, Device, FeatureError, TranslateError, Translation};
use virtio_iommu_proto::config::BYPASS_OFFSET;
use virtio_iommu_proto::{Request, Status};

/// One step a driver can take.
#[derive(Clone, Debug)]
pub enum Op {
    /// A request on the request queue.
    Req(Request),
    /// A write of the config-space `bypass` byte.
    Bypass(u8),
    /// A device reset, then FEATURES_OK again.
    Reset,
}

/// The first difference between the device and the reference.
#[derive(Debug, thiserror::Error)]
pub enum Mismatch {
    /// The fixture does not build a device with this page size mask.
    #[error("no device with this page size mask: {0}")]
    Config(#[from] ConfigError),
    /// The device refused its own offered features.
    #[error("offered features refused: {0}")]
    Features(#[from] FeatureError),
    /// A request got another status.
    #[error("op {op} {req:?}: device {got:?}, reference {want:?}")]
    Status {
        /// Position in the sequence.
        op: usize,
        /// The request.
        req: Request,
        /// The device's status (`None`: no tail written).
        got: Option<Status>,
        /// The reference's status.
        want: Status,
    },
    /// A bypass write was accepted by one and refused by the other.
    #[error("op {op}: bypass write {value} accepted by the device: {got}")]
    Bypass {
        /// Position in the sequence.
        op: usize,
        /// The byte written.
        value: u8,
        /// Whether the device accepted it.
        got: bool,
    },
    /// Mapping or domain counts differ.
    #[error("op {op}: device has {got:?} (mappings, domains), reference {want:?}")]
    Counts {
        /// Position in the sequence.
        op: usize,
        /// The device's counts.
        got: (usize, usize),
        /// The reference's counts.
        want: (usize, usize),
    },
    /// An address translates differently.
    #[error("op {op} ep {ep} iova {iova:#x} {access:?}: device {got:?}, reference {want:?}")]
    Translation {
        /// Position in the sequence.
        op: usize,
        /// Endpoint.
        ep: u32,
        /// Address.
        iova: u64,
        /// Access.
        access: Access,
        /// The device's answer.
        got: Result<Translation, TranslateError>,
        /// The reference's answer.
        want: Result<Translation, TranslateError>,
    },
    /// The change stream does not hold together.
    #[error("op {op}: change stream: {error}")]
    Stream {
        /// Position in the sequence.
        op: usize,
        /// What is wrong with it.
        error: MirrorError,
    },
    /// The mirror translates differently from the device.
    #[error("op {op} ep {ep} iova {iova:#x}: the mirror disagrees with the device")]
    MirrorDisagrees {
        /// Position in the sequence.
        op: usize,
        /// Endpoint.
        ep: u32,
        /// Address.
        iova: u64,
    },
}

/// Endpoints whose translations are compared: existing ones with each kind
/// of reserved region, and one that does not exist.
const PROBED_ENDPOINTS: [u32; 6] = [0, 1, 3, 8, 100, 4];

/// Addresses worth probing for `ops`: fixed ones near reserved regions and
/// the limits, and the edges of every range the sequence maps or unmaps.
fn probe_addresses(ops: &[Op]) -> Vec<u64> {
    let mut v = vec![
        0,
        0x1000,
        0xfee0_0000,
        0x1000_0000,
        0x0800_0000,
        u64::MAX,
        0xffff_ffff_ffff,
    ];
    for op in ops {
        match op {
            Op::Req(Request::Map(m)) => v.extend([
                m.virt_start,
                m.virt_end,
                m.virt_start.wrapping_sub(1),
                m.virt_end.wrapping_add(1),
            ]),
            Op::Req(Request::Unmap(u)) => v.extend([u.virt_start, u.virt_end]),
            _ => {}
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Runs `ops` on a fixture device with `page_size_mask` and on the
/// reference; after every step compares statuses, counts, and the
/// translations of every probed endpoint and address, and checks the
/// change stream against a mirror.
pub fn check(page_size_mask: u64, ops: &[Op]) -> Result<(), Mismatch> {
    let mut dev = Device::new(config(page_size_mask))?;
    let mut log = ChangeLog::default();
    dev.set_features(dev.offered_features(), &mut log)?;
    let mut reference = Reference::new(page_size_mask);
    let mut mirror = Mirror::default();
    let addrs = probe_addresses(ops);
    for (op, step) in ops.iter().enumerate() {
        match step {
            Op::Req(req) => {
                let writable = if matches!(req, Request::Probe(_)) {
                    68
                } else {
                    4
                };
                let got = dev.process(&req.encode(), writable, &mut log).status();
                let want = reference.handle(req);
                if got != Some(want) {
                    return Err(Mismatch::Status {
                        op,
                        req: *req,
                        got,
                        want,
                    });
                }
            }
            Op::Bypass(value) => {
                let got = dev.write_config(BYPASS_OFFSET, &[*value], &mut log).is_ok();
                if got != reference.write_bypass(*value) {
                    return Err(Mismatch::Bypass {
                        op,
                        value: *value,
                        got,
                    });
                }
            }
            Op::Reset => {
                dev.reset(&mut log);
                dev.set_features(dev.offered_features(), &mut log)?;
                reference.reset();
            }
        }
        for c in log.take() {
            mirror
                .apply(c)
                .map_err(|error| Mismatch::Stream { op, error })?;
        }
        let got = (dev.mapping_count() as usize, dev.domain_count());
        let want = (reference.mapping_count(), reference.domain_count());
        if got != want {
            return Err(Mismatch::Counts { op, got, want });
        }
        for ep in PROBED_ENDPOINTS {
            for &iova in &addrs {
                for access in [Access::Read, Access::Write] {
                    let got = dev.translate(ep, iova, access);
                    let want = reference.translate(ep, iova, access);
                    if got != want {
                        return Err(Mismatch::Translation {
                            op,
                            ep,
                            iova,
                            access,
                            got,
                            want,
                        });
                    }
                    if !mirror.agrees(ep, iova, access, &got) {
                        return Err(Mismatch::MirrorDisagrees { op, ep, iova });
                    }
                }
            }
        }
    }
    Ok(())
}
