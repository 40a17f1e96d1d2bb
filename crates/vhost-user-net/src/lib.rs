//! `vhost-user-net`: a DPDK-style polling virtual switch. Each port is a
//! vhost-user-net device of one VM; polling threads move frames between
//! the ports' transmit and receive queues, translating each guest's device
//! addresses through that guest's `vhost-user-iommu` shared table (or a
//! message IOTLB, or nothing: [`viommu_backend::IommuMode`], the layer the
//! block backend uses too).
//!
//! - [`mac`], [`fib`]: addresses and the forwarding table (learning,
//!   flooding, fixed entries per port);
//! - [`header`], [`features`], [`config`], [`ctrl`]: virtio-net as the
//!   guest sees it (virtio 1.2 §5.1);
//! - [`tx`], [`rx`]: a frame out of a transmit chain, into receive buffers;
//! - [`port`], [`backend`], [`serve`], [`relay`]: one VM's device, its
//!   vhost-user connection (through a relay that accepts QEMU's message
//!   order) and control queue;
//! - [`pmd`]: the polling threads;
//! - [`stats`]: counters per port;
//! - [`settings`]: the command line and the TOML file.

pub mod backend;
pub mod config;
pub mod ctrl;
pub mod features;
pub mod fib;
pub mod header;
pub mod mac;
pub mod pmd;
pub mod port;
pub mod relay;
pub mod rx;
pub mod serve;
pub mod settings;
pub mod stats;
pub mod tx;
