//! The `vhost-user-iommu` daemon as a library: a virtio-iommu device served
//! over vhost-user, built on the [`viommu_core`] device model.
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

pub mod admin;
pub mod admin_proto;
pub mod backend;
pub mod backend_socket;
pub mod chain;
pub mod control;
pub mod device_state;
pub mod eventq;
pub mod frame_ready;
pub mod http;
pub mod iotlb_msg;
pub mod kick_loop;
pub mod metrics;
pub mod poll_window;
pub mod publish;
pub mod request_ring;
pub mod requestq;
pub mod reset_watch;
pub mod seccomp;
pub mod serve;
pub mod settings;
pub mod shm_table;
pub mod state_journal;
pub mod telemetry;

pub use vhost_user_process::{logging, signals};
