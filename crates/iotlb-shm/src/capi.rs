//! Being written (feature-gated; not built by default).
