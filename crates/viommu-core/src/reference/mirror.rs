//! A translation table rebuilt from nothing but the device's change stream,
//! as the shared table is: it must translate as the device does.

use std::collections::HashMap;

use super::fixture::resv_of;
use crate::{Access, Change, EndpointState, Mapping, TranslateError, Translation};
use virtio_iommu_proto::MapFlags;

/// A change that does not fit what the stream said before.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// A domain was created while it existed.
    #[error("domain {0} created twice")]
    CreatedTwice(u32),
    /// An endpoint change names a state the endpoint was not in.
    #[error("endpoint {endpoint} said to move from {from:?}, but it was {was:?}")]
    StaleFrom {
        /// The endpoint.
        endpoint: u32,
        /// The state the change names.
        from: EndpointState,
        /// The state the mirror has.
        was: EndpointState,
    },
    /// An endpoint change that changes nothing.
    #[error("endpoint {0} changed to the state it was in")]
    NoOp(u32),
    /// A change names a domain that does not exist.
    #[error("domain {0} does not exist")]
    MissingDomain(u32),
    /// A mapping was removed that the domain did not have.
    #[error("domain {0} lost a mapping it did not have")]
    MissingMapping(u32),
    /// A domain was destroyed while an endpoint still used it.
    #[error("domain {0} destroyed while an endpoint uses it")]
    DomainInUse(u32),
}

/// Endpoint states and domain mappings, as announced.
#[derive(Debug, Default)]
pub struct Mirror {
    endpoints: HashMap<u32, EndpointState>,
    domains: HashMap<u32, Vec<Mapping>>,
}

impl Mirror {
    fn state(&self, ep: u32) -> EndpointState {
        self.endpoints
            .get(&ep)
            .copied()
            .unwrap_or(EndpointState::Blocked)
    }

    /// Applies one change, or says why it does not follow from the previous.
    pub fn apply(&mut self, c: Change) -> Result<(), MirrorError> {
        match c {
            Change::DomainCreated { domain } => {
                if self.domains.insert(domain, vec![]).is_some() {
                    return Err(MirrorError::CreatedTwice(domain));
                }
            }
            Change::Endpoint { endpoint, from, to } => {
                let was = self.state(endpoint);
                if was != from {
                    return Err(MirrorError::StaleFrom {
                        endpoint,
                        from,
                        was,
                    });
                }
                if from == to {
                    return Err(MirrorError::NoOp(endpoint));
                }
                if let EndpointState::Domain(d) = to {
                    if !self.domains.contains_key(&d) {
                        return Err(MirrorError::MissingDomain(d));
                    }
                }
                self.endpoints.insert(endpoint, to);
            }
            Change::MappingAdded { domain, mapping } => self
                .domains
                .get_mut(&domain)
                .ok_or(MirrorError::MissingDomain(domain))?
                .push(mapping),
            Change::MappingRemoved { domain, mapping } => {
                let maps = self
                    .domains
                    .get_mut(&domain)
                    .ok_or(MirrorError::MissingDomain(domain))?;
                let before = maps.len();
                maps.retain(|m| *m != mapping);
                if maps.len() + 1 != before {
                    return Err(MirrorError::MissingMapping(domain));
                }
            }
            Change::DomainDestroyed { domain } => {
                if self.domains.remove(&domain).is_none() {
                    return Err(MirrorError::MissingDomain(domain));
                }
                if self
                    .endpoints
                    .values()
                    .any(|s| *s == EndpointState::Domain(domain))
                {
                    return Err(MirrorError::DomainInUse(domain));
                }
            }
        }
        Ok(())
    }

    /// Whether the mirror gives an access the same guest-physical address
    /// (or refusal) as the device. MSI windows are interrupts, not DMA, and
    /// the mirror does not model them.
    pub fn agrees(
        &self,
        ep: u32,
        iova: u64,
        access: Access,
        device: &Result<Translation, TranslateError>,
    ) -> bool {
        if resv_of(ep).iter().any(|r| r.contains(iova)) {
            return true;
        }
        let got = match self.state(ep) {
            EndpointState::Blocked => None,
            EndpointState::Bypass => Some(iova),
            EndpointState::Domain(d) => self.domains.get(&d).and_then(|maps| {
                maps.iter()
                    .find(|m| m.virt_start <= iova && iova <= m.virt_end)
                    .filter(|m| {
                        (!access.reads() || m.flags.contains(MapFlags::READ))
                            && (!access.writes() || m.flags.contains(MapFlags::WRITE))
                    })
                    .map(|m| m.phys_of(iova))
            }),
        };
        got == device.as_ref().ok().map(|t| t.gpa)
    }
}
