//! Read-only views of a device's state for operators (the daemon's admin
//! socket and metrics): domains, attached endpoints, mappings in pages.
//! Nothing here changes the device.

use super::{Device, DomainKind};
use crate::change::EndpointState;
use crate::mappings::Mapping;

/// One live domain, as an operator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    /// Domain ID.
    pub id: u32,
    /// A bypass domain (ATTACH with the BYPASS flag): no mappings, its
    /// endpoints' accesses go untranslated.
    pub bypass: bool,
    /// Endpoints attached to it.
    pub endpoints: u32,
    /// Mappings in it.
    pub mappings: usize,
}

impl Device {
    /// Every live domain, in ID order.
    pub fn domains(&self) -> impl Iterator<Item = DomainInfo> + '_ {
        self.domains.iter().map(|(&id, d)| DomainInfo {
            id,
            bypass: d.kind == DomainKind::Bypass,
            endpoints: d.endpoints,
            mappings: d.mappings.len(),
        })
    }

    /// Attached endpoints with their domain, in endpoint order, from the
    /// first endpoint at or after `from`.
    pub fn attached_endpoints(&self, from: u32) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.attached.range(from..).map(|(&ep, &d)| (ep, d))
    }

    /// Number of endpoints attached to a domain.
    pub fn endpoints_attached(&self) -> usize {
        self.attached.len()
    }

    /// Number of endpoints the device serves (its configured ranges).
    pub fn endpoint_count(&self) -> u64 {
        self.cfg.endpoints.iter().map(|r| r.len()).sum()
    }

    /// What an endpoint attached to no domain gets: blocked or bypass.
    pub fn unattached(&self) -> EndpointState {
        self.unattached_state()
    }

    /// The mappings of a translated domain that end at or after `from`,
    /// in IOVA order (for paging: pass the last one's `virt_end + 1`).
    /// `None` if no such translated domain exists.
    pub fn mappings_from(
        &self,
        domain: u32,
        from: u64,
    ) -> Option<impl Iterator<Item = Mapping> + '_> {
        let all = self.mappings(domain)?;
        Some(all.skip_while(move |m| m.virt_end < from))
    }
}

#[cfg(test)]
mod tests {
    use crate::{ChangeLog, Device, DeviceConfig};
    use virtio_iommu_proto::Status;
    use virtio_iommu_proto::request::{Attach, Map, MapFlags, Request};

    fn device() -> Device {
        let mut d = Device::new(DeviceConfig::default()).unwrap();
        d.set_features(d.offered_features(), &mut ChangeLog::default())
            .unwrap();
        d
    }

    #[test]
    fn views_follow_attach_and_map() {
        let mut d = device();
        let mut log = ChangeLog::default();
        assert_eq!(d.domains().count(), 0);
        assert!(d.mappings_from(1, 0).is_none(), "no such domain");
        let attach = |ep, dom| {
            Request::Attach(Attach {
                domain: dom,
                endpoint: ep,
                flags: 0,
                reserved: [0; 4],
            })
        };
        assert_eq!(d.handle(&attach(3, 1), &mut log), Status::Ok);
        assert_eq!(d.handle(&attach(5, 1), &mut log), Status::Ok);
        for i in 0..4u64 {
            let map = Request::Map(Map {
                domain: 1,
                virt_start: i * 0x1000,
                virt_end: i * 0x1000 + 0xfff,
                phys_start: 0x10_0000 + i * 0x1000,
                flags: MapFlags::READ,
            });
            assert_eq!(d.handle(&map, &mut log), Status::Ok);
        }
        let doms: Vec<_> = d.domains().collect();
        assert_eq!(doms.len(), 1);
        assert_eq!(
            (
                doms[0].id,
                doms[0].endpoints,
                doms[0].mappings,
                doms[0].bypass
            ),
            (1, 2, 4, false)
        );
        assert_eq!(
            d.attached_endpoints(0).collect::<Vec<_>>(),
            [(3, 1), (5, 1)]
        );
        assert_eq!(d.attached_endpoints(4).collect::<Vec<_>>(), [(5, 1)]);
        assert_eq!(d.endpoints_attached(), 2);
        let page: Vec<_> = d
            .mappings_from(1, 0x1800)
            .unwrap()
            .map(|m| m.virt_start)
            .collect();
        assert_eq!(
            page,
            [0x1000, 0x2000, 0x3000],
            "a page starts at the mapping holding `from`"
        );
        assert_eq!(d.mappings_from(1, 0x4000).unwrap().count(), 0);
        assert!(d.endpoint_count() > 0);
        assert_eq!(
            Some(d.unattached()),
            d.endpoint_state(4),
            "endpoint 4 is not attached"
        );
    }
}
