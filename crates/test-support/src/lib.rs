//! Fixtures shared by the workspace's integration tests. Only tests use
//! this crate (as a dev-dependency).

pub mod cases;
pub mod fuse;
pub mod processes;
pub mod scratch;
