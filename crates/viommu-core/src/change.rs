//! What the model announces to the shared table, and whether each change
//! narrows access (and so must be followed by a grace period before the
//! request that caused it completes).

/// How an endpoint's accesses are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndpointState {
    /// No access at all (unattached, bypass off).
    Blocked,
    /// Identity translation: unattached with bypass on, or in a bypass domain.
    Bypass,
    /// Translated through the mappings of this domain.
    Domain(u32),
}

/// One change to the translation state, in the order the model made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A translated domain now exists (with no mappings). Bypass domains
    /// have no table of their own and are not announced.
    DomainCreated {
        /// Domain ID.
        domain: u32,
    },
    /// An endpoint moved from one state to another.
    Endpoint {
        /// Endpoint ID.
        endpoint: u32,
        /// State before.
        from: EndpointState,
        /// State after.
        to: EndpointState,
    },
    /// A mapping was added to a translated domain.
    MappingAdded {
        /// Domain ID.
        domain: u32,
        /// The mapping.
        mapping: crate::Mapping,
    },
    /// A mapping was removed from a translated domain by UNMAP.
    MappingRemoved {
        /// Domain ID.
        domain: u32,
        /// The mapping that was removed.
        mapping: crate::Mapping,
    },
    /// A translated domain ceased to exist, with every mapping it still had.
    /// No endpoint is in it any more when this is announced.
    DomainDestroyed {
        /// Domain ID.
        domain: u32,
    },
}

impl Change {
    /// Whether the change takes a translation away from a reader that may be
    /// using it, so the request may complete only after a grace period.
    pub const fn requires_grace_period(&self) -> bool {
        match self {
            Change::DomainCreated { .. } | Change::MappingAdded { .. } => false,
            Change::MappingRemoved { .. } | Change::DomainDestroyed { .. } => true,
            Change::Endpoint { from, .. } => !matches!(from, EndpointState::Blocked),
        }
    }
}

/// A sink could not take a mapping in (its table is full): the model
/// keeps nothing of the MAP, which answers NOMEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the published table has no room for the mapping")]
pub struct Refused;

/// Receives the model's changes as they happen.
pub trait ChangeSink {
    /// One change; called in the order the changes are made, before the
    /// request that made them returns its status.
    fn change(&mut self, change: Change);

    /// A mapping about to be added ([`Change::MappingAdded`]), offered
    /// before the model takes it: a sink whose copy has no room refuses it,
    /// and the model then answers NOMEM with nothing changed. By default
    /// the change is taken like any other.
    fn try_add(&mut self, change: Change) -> Result<(), Refused> {
        self.change(change);
        Ok(())
    }
}

/// A sink that drops everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullSink;

impl ChangeSink for NullSink {
    fn change(&mut self, _change: Change) {}
}

/// A sink that records every change, for tests and replays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeLog {
    /// The changes, oldest first.
    pub changes: Vec<Change>,
}

impl ChangeLog {
    /// Whether any recorded change requires a grace period.
    pub fn requires_grace_period(&self) -> bool {
        self.changes.iter().any(Change::requires_grace_period)
    }

    /// Takes the recorded changes, leaving the log empty.
    pub fn take(&mut self) -> Vec<Change> {
        core::mem::take(&mut self.changes)
    }
}

impl ChangeSink for ChangeLog {
    fn change(&mut self, change: Change) {
        self.changes.push(change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_changes_need_a_grace_period() {
        let ep = |from, to| Change::Endpoint {
            endpoint: 1,
            from,
            to,
        };
        assert!(!ep(EndpointState::Blocked, EndpointState::Domain(1)).requires_grace_period());
        assert!(!ep(EndpointState::Blocked, EndpointState::Bypass).requires_grace_period());
        assert!(ep(EndpointState::Bypass, EndpointState::Blocked).requires_grace_period());
        assert!(ep(EndpointState::Bypass, EndpointState::Domain(2)).requires_grace_period());
        assert!(ep(EndpointState::Domain(1), EndpointState::Domain(2)).requires_grace_period());
        assert!(!Change::DomainCreated { domain: 1 }.requires_grace_period());
        assert!(Change::DomainDestroyed { domain: 1 }.requires_grace_period());
    }
}
