//! Where the device model's changes go: the published translation table.
//!
//! The daemon feeds every [`Change`] to a [`TablePublisher`] as the model
//! makes it, and before completing a request whose changes narrowed access
//! it asks the publisher for a grace period, once per drained batch.

use viommu_core::{Change, ChangeSink};

/// A published copy of the translation state that other processes read.
pub trait TablePublisher: Send {
    /// Mirrors one change; a new translation is visible to readers when
    /// this returns.
    fn publish(&mut self, change: &Change);

    /// Returns once no reader can still use a translation taken away by the
    /// changes published so far.
    fn synchronize(&mut self);

    /// Short name for logs.
    fn name(&self) -> &'static str;
}

/// No shared table: translations live only in the device model. Used until
/// a backend table is configured; grace periods are then immediate.
#[derive(Debug, Default)]
pub struct NoTable;

impl TablePublisher for NoTable {
    fn publish(&mut self, _change: &Change) {}
    fn synchronize(&mut self) {}
    fn name(&self) -> &'static str {
        "none"
    }
}

/// A change sink that publishes each change and remembers whether any of
/// them needs a grace period.
pub struct Publishing<'a> {
    publisher: &'a mut dyn TablePublisher,
    /// Whether a published change took access away.
    pub needs_grace: bool,
}

impl<'a> Publishing<'a> {
    /// Starts publishing through `publisher`.
    pub fn new(publisher: &'a mut dyn TablePublisher) -> Self {
        Publishing {
            publisher,
            needs_grace: false,
        }
    }
}

impl ChangeSink for Publishing<'_> {
    fn change(&mut self, change: Change) {
        self.needs_grace |= change.requires_grace_period();
        self.publisher.publish(&change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu_core::EndpointState;

    #[derive(Default)]
    struct Recorder(Vec<Change>, usize);

    impl TablePublisher for Recorder {
        fn publish(&mut self, change: &Change) {
            self.0.push(*change);
        }
        fn synchronize(&mut self) {
            self.1 += 1;
        }
        fn name(&self) -> &'static str {
            "recorder"
        }
    }

    #[test]
    fn publishing_forwards_changes_and_tracks_narrowing() {
        let mut rec = Recorder::default();
        let mut sink = Publishing::new(&mut rec);
        sink.change(Change::DomainCreated { domain: 1 });
        assert!(!sink.needs_grace);
        sink.change(Change::Endpoint {
            endpoint: 0,
            from: EndpointState::Domain(1),
            to: EndpointState::Blocked,
        });
        assert!(sink.needs_grace);
        assert_eq!(rec.0.len(), 2);
    }
}
