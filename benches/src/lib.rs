//! Baselines for the benchmarks, and a side-by-side ratio reporter.
//!
//! Every benchmark measures our code beside a baseline in the same run: the
//! criterion groups give the detailed numbers, and [`ratio::SideBySide`]
//! prints the ratios the performance targets are stated in.
//!
//! The request path's baselines are programs, run side by side by
//! `benches/request-path.sh`: `naive-viommu` (a rust-vmm device with
//! `BTreeMap`s, over its socket) and `replay-in-process` ([`in_process`]:
//! the device model with no queue and no daemon).

pub mod in_process;
pub mod lookup_baselines;
pub mod model_baselines;
pub mod ratio;
pub mod scaling;
pub mod shm_rig;
pub mod table_rig;
