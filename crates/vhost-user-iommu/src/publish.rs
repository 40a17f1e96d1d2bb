//! Where the device model's changes go: the published translation table.
//!
//! The daemon feeds every [`Change`] to a [`TablePublisher`] as the model
//! makes it, and before completing a request whose changes narrowed access
//! it asks the publisher for a grace period, once per drained batch.

use viommu_core::{Change, ChangeSink, Refused};

use std::sync::Arc;

use crate::backend_ledger::Ledger;
use crate::iotlb_msg::AckWait;
use crate::shm_table::SharedWriter;

/// What is left after a grace period of the shared table: the
/// acknowledgements of message-mode backends. Wait for them **without the
/// device lock held** (a backend may need a miss answered first), then
/// complete the requests.
///
/// And the backends of a previous daemon (one that died or was restarted)
/// that may still use its table, frozen: the revocation completes only
/// once none can ([`crate::backend_ledger`]).
#[must_use = "wait before completing the requests"]
#[derive(Debug, Default)]
pub struct GraceWait {
    /// Acknowledgements of message-mode backends.
    pub acks: Option<AckWait>,
    /// The previous daemon's backends, when some may still use its table.
    pub previous: Option<(Arc<Ledger>, SharedWriter)>,
}

impl GraceWait {
    /// Waits for whatever is outstanding.
    pub fn wait(self) {
        if let Some(w) = self.acks {
            w.wait();
        }
        if let Some((ledger, writer)) = self.previous {
            ledger.wait_for_previous(&writer);
        }
    }
}

/// A change the table could not mirror (it is full, or out of step with
/// the model).
#[derive(Debug, thiserror::Error)]
#[error("the shared table cannot mirror {change:?}")]
pub struct PublishError {
    /// The change.
    pub change: Change,
    /// Why.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Mirrors changes, one at a time, into a published table.
pub trait Publish {
    /// Mirrors one change; a new translation is visible to readers when
    /// this returns. On error the table is as it was before the change.
    fn publish(&mut self, change: &Change) -> Result<(), PublishError>;

    /// Whether what was published since the last grace period took access
    /// away from a reader that may still be using it: the requests that did
    /// it complete only after [`TablePublisher::synchronize`]. The table's
    /// own bookkeeping answers — the one place that decides, so the request
    /// path and the grace period cannot disagree.
    fn needs_grace(&self) -> bool;

    /// Whether every request that may take access away (anything but MAP
    /// and PROBE) must wait for [`TablePublisher::synchronize`], even one
    /// that changed nothing in the table: backends of a previous daemon may
    /// still translate through its frozen table, which the guest's view
    /// no longer matches.
    fn revocations_wait(&self) -> bool {
        false
    }
}

/// A published copy of the translation state that other processes read.
pub trait TablePublisher: Publish + Send {
    /// Runs `f` with the table ready to take a batch of changes, so that
    /// what a batch costs once (the shared table's lock) is not paid per
    /// change. Changes published through [`Publish::publish`] directly
    /// cost it each time.
    fn batch(&mut self, f: &mut dyn FnMut(&mut dyn Publish)) {
        f(self.as_publish())
    }

    /// This publisher as a [`Publish`].
    fn as_publish(&mut self) -> &mut dyn Publish;

    /// Runs the grace period of the shared table: returns once no table
    /// reader can still use a translation taken away by the changes
    /// published so far; what message-mode backends still have to
    /// acknowledge is returned, to be waited for without the device lock.
    fn synchronize(&mut self) -> GraceWait;

    /// A fresh device starts using this publisher (a new VMM connection):
    /// forget the previous device's state and publish this one's.
    fn start(&mut self, _device: &viommu_core::Device) {}
}

/// No shared table: translations live only in the device model. Used until
/// a backend table is configured; grace periods are then immediate.
#[derive(Debug, Default)]
pub struct NoTable;

impl Publish for NoTable {
    fn publish(&mut self, _change: &Change) -> Result<(), PublishError> {
        Ok(())
    }
    /// Nobody reads a table that does not exist.
    fn needs_grace(&self) -> bool {
        false
    }
}

impl TablePublisher for NoTable {
    fn as_publish(&mut self) -> &mut dyn Publish {
        self
    }
    fn synchronize(&mut self) -> GraceWait {
        GraceWait::default()
    }
}

/// A change sink that publishes each change.
pub struct Publishing<'a> {
    publisher: &'a mut dyn Publish,
    /// Changes the table refused outside [`ChangeSink::try_add`].
    pub refused: usize,
}

impl<'a> Publishing<'a> {
    /// Starts publishing through `publisher`.
    pub fn new(publisher: &'a mut dyn Publish) -> Self {
        Publishing {
            publisher,
            refused: 0,
        }
    }
}

impl ChangeSink for Publishing<'_> {
    fn change(&mut self, change: Change) {
        // Only additions can fail (they come through `try_add`); anything
        // else refused means the table is out of step with the model.
        if let Err(e) = self.publisher.publish(&change) {
            tracing::warn!(error = %e, cause = %e.source, "shared table refused a change");
            self.refused += 1;
        }
    }

    /// A mapping the table has no room for is refused before the model
    /// takes it: the MAP answers NOMEM and both copies stay as they were.
    fn try_add(&mut self, change: Change) -> Result<(), Refused> {
        self.publisher.publish(&change).map_err(|e| {
            tracing::debug!(error = %e, cause = %e.source, "MAP refused: the shared table is full");
            Refused
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu_core::EndpointState;

    #[derive(Default)]
    struct Recorder(Vec<Change>, usize);

    impl Publish for Recorder {
        fn publish(&mut self, change: &Change) -> Result<(), PublishError> {
            self.0.push(*change);
            Ok(())
        }
        fn needs_grace(&self) -> bool {
            self.0.iter().any(Change::requires_grace_period)
        }
    }

    impl TablePublisher for Recorder {
        fn as_publish(&mut self) -> &mut dyn Publish {
            self
        }
        fn synchronize(&mut self) -> GraceWait {
            self.1 += 1;
            GraceWait::default()
        }
    }

    #[test]
    fn publishing_forwards_changes_in_order() {
        let mut rec = Recorder::default();
        let mut sink = Publishing::new(&mut rec);
        sink.change(Change::DomainCreated { domain: 1 });
        let leave = Change::Endpoint {
            endpoint: 0,
            from: EndpointState::Domain(1),
            to: EndpointState::Blocked,
        };
        sink.change(leave);
        assert_eq!(sink.refused, 0);
        assert_eq!(rec.0, vec![Change::DomainCreated { domain: 1 }, leave]);
    }
}
