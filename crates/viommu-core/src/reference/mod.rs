//! A brute-force reference model of the device, for property tests and
//! fuzzing (feature `reference`): a fixed device configuration, the spec's
//! rules written as linear scans, a mirror rebuilt from the change stream,
//! and a checker that drives all three with one operation sequence.

pub mod check;
pub mod fixture;
pub mod mirror;
pub mod model;

pub use check::{Mismatch, Op, check};
pub use mirror::{Mirror, MirrorError};
pub use model::Reference;
