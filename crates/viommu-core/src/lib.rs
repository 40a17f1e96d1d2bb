//! The virtio-iommu device model: endpoints, domains, mappings, bypass and
//! limits, with the spec semantics of every request. No I/O, no vhost types.
//!
//! A [`Device`] is built from a validated [`DeviceConfig`]. The transport
//! (the vhost-user daemon, or a test) hands it each request's readable bytes
//! and writable length through [`Device::process`] and writes back whatever
//! [`Reply`] says. Every change to what endpoints can reach is announced to a
//! [`ChangeSink`], which the daemon uses to mirror the model into the shared
//! translation table; each [`Change`] says whether the request that caused
//! it may complete only after a grace period.
//!
//! [`state`] saves the device's state as checked bytes and rebuilds a
//! device from them (daemon restarts, migration).
//!
//! Choices on the spec's ambiguities are listed in `docs/conformance.md`.

pub mod change;
pub mod config;
pub mod device;
pub mod endpoints;
pub mod mappings;
#[cfg(feature = "reference")]
pub mod reference;
pub mod reply;
pub mod state;
pub mod translate;

pub use change::{Change, ChangeLog, ChangeSink, EndpointState, NullSink, Refused};
pub use config::{ConfigError, DeviceConfig, EndpointRange, Limits};
pub use device::{ConfigWriteError, Device, DomainInfo, FeatureError};
pub use mappings::Mapping;
pub use reply::Reply;
pub use translate::{Access, TranslateError, Translation};
