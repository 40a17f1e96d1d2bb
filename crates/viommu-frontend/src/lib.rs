//! A VMM and guest-driver stand-in for `vhost-user-iommu`, for tests and
//! load: it talks vhost-user over a real socket, keeps guest RAM in a real
//! memfd, and drives split virtqueues the way the Linux virtio-iommu
//! driver does.
//!
//! - [`memory`]: memfd guest RAM and a bump allocator.
//! - [`connection`]: the vhost-user frontend (negotiation, memory table,
//!   vrings, config space, reset).
//! - [`split_ring`]: the driver side of a split virtqueue, with selectable
//!   descriptor layouts and raw (hostile) chains.
//! - [`driver`]: device bring-up, batched requests, event buffers.
//! - [`trace`]: the guest request trace format.
//! - [`replay`]: trace replay with throughput and latency figures.
//! - [`guest_dma`]: the guest's DMA layer for a device behind the IOMMU
//!   (IOVA allocation; off, passthrough, strict and lazy policies).
//! - [`blk_queue`], [`blk`]: a virtio-blk device driven over vhost-user
//!   the way QEMU plus Linux drive it, rings and buffers at IOVAs.
//! - [`blk_load`]: a block workload with IOPS, latency and data checks.
//! - [`net`]: a virtio-net device (one queue pair, control queue) driven
//!   over vhost-user the way QEMU plus Linux drive it, on [`blk_queue`]'s
//!   rings.
//! - [`net_frame`]: test frames, the `virtio_net_hdr`, and the reassembly
//!   of packets spanning several receive buffers.
//! - [`net_load`]: traffic between several guests from one thread, every
//!   buffer through the DMA policy, every received frame checked.
//!
//! ```no_run
//! use viommu_frontend::driver::{Driver, DriverOptions};
//! use virtio_iommu_proto::{Attach, Request};
//!
//! let mut d = Driver::connect(std::path::Path::new("/tmp/viommu.sock"), DriverOptions::default())?;
//! let attach = Request::Attach(Attach { domain: 1, endpoint: 8, flags: 0, reserved: [0; 4] });
//! let out = d.send_one(&attach)?;
//! println!("{:?} (used length {})", out.status(), out.used_len);
//! # Ok::<(), viommu_frontend::driver::DriverError>(())
//! ```

pub mod blk;
pub mod blk_load;
pub mod blk_queue;
pub mod connection;
pub mod device_cpu;
pub mod driver;
pub mod guest_dma;
pub mod memory;
pub mod net;
pub mod net_frame;
pub mod net_load;
pub mod replay;
pub mod split_ring;
pub mod trace;

pub use driver::{Driver, DriverError, DriverOptions, Outcome};
pub use split_ring::Layout;
