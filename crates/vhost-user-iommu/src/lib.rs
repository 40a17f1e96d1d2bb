//! The `vhost-user-iommu` daemon as a library: a virtio-iommu device served
//! over vhost-user, built on the [`viommu_core`] device model.
//!
//! Public are the modules the binaries, tests, benchmarks and fuzz targets
//! use (`settings`, `serve`, `chain`, `publish`, `shm_table`,
//! `backend_socket`, `iotlb_msg`, `admin_proto`); the rest is the daemon's
//! own, so the compiler sees what nothing uses.
//!
//! - [`settings`]: command line and TOML configuration, turned into a
//!   validated [`viommu_core::DeviceConfig`] plus daemon options.
//! - [`chain`]: splitting a descriptor chain into its readable and writable
//!   parts, gathering and scattering bytes inside them only.
//! - [`requestq`]: serving one request-queue chain.
//! - [`request_ring`]: the request queue in passes: the ring read and
//!   written through guest RAM pointers, in-order completion, one grace
//!   period per drained batch, kicks off while serving.
//! - [`poll_window`]: how long the request thread polls before it sleeps.
//! - [`publish`]: where the model's changes go (the shared table).
//! - [`eventq`]: fault records waiting for event-queue buffers.
//! - [`backend`]: the `VhostUserBackend` implementation (features, config
//!   space, reset, queue events).
//! - [`kick_loop`]: the request queue's kick path on io_uring.
//! - [`reset_watch`]: telling a guest's device reset from a pause when
//!   the VMM sends no `RESET_DEVICE`.
//! - [`serve`]: the listening loop, one fresh device per connection.
//! - [`seccomp`]: the system-call filter every thread runs under.
//! - [`shm_table`]: the shared translation table as the model's publisher.
//! - [`state_journal`]: the device's state saved in `--state-dir`, so a
//!   restarted daemon keeps the guest's domains and mappings.
//! - [`device_state`]: vhost-user's device-state transfer (migration),
//!   in the same format.
//! - [`backend_socket`]: where co-located backends get the table.
//! - [`iotlb_msg`]: message mode (IOTLB misses and invalidations), the
//!   baseline.
//! - [`logging`], [`signals`]: process plumbing (from `vhost-user-process`).

mod admin;
pub mod admin_proto;
mod backend;
pub mod backend_ledger;
pub mod backend_socket;
pub mod chain;
mod control;
mod device_state;
mod eventq;
pub mod fd_store;
mod frame_ready;
mod http;
pub mod iotlb_msg;
mod kick_loop;
mod metrics;
mod poll_window;
pub mod publish;
mod request_ring;
mod requestq;
mod reset_watch;
mod seccomp;
pub mod serve;
pub mod settings;
pub mod shm_table;
mod state_journal;
mod telemetry;

pub use vhost_user_process::{logging, signals};
