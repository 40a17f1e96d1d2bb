//! The device's configuration: which endpoints exist and what they reserve,
//! the advertised ranges and granule, offered features, and resource limits.

use virtio_iommu_proto::config::{DomainRange, InputRange};
use virtio_iommu_proto::features::*;
use virtio_iommu_proto::probe::{ResvMem, ResvSubtype, resv_mem_bytes};
use virtio_iommu_proto::{ConfigSpace, Features};

/// The x86 MSI doorbell window, advertised by default so Linux guests do not
/// invent a software MSI window at 0x8000000.
pub const X86_MSI_WINDOW: ResvMem = ResvMem {
    subtype: ResvSubtype::Msi,
    start: 0xfee0_0000,
    end: 0xfeef_ffff,
};

/// Largest `probe_size` accepted: PROBE writes are bounded by it.
pub const MAX_PROBE_SIZE: u32 = 64 * 1024;
/// Largest number of endpoints a device may be configured with.
pub const MAX_ENDPOINTS: u64 = 1 << 20;

/// A contiguous, inclusive range of endpoint IDs sharing reserved regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRange {
    /// First endpoint ID.
    pub first: u32,
    /// Last endpoint ID, inclusive.
    pub last: u32,
    /// Reserved IOVA regions of each endpoint of the range (PROBE RESV_MEM).
    pub resv: Vec<ResvMem>,
}

impl EndpointRange {
    /// Number of endpoints in the range.
    pub const fn len(&self) -> u64 {
        self.last as u64 - self.first as u64 + 1
    }

    /// Always false: a range holds at least one endpoint once validated.
    pub const fn is_empty(&self) -> bool {
        self.last < self.first
    }
}

/// Bounds on what a guest can make the device allocate. Exceeding any of
/// them answers NOMEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Domains alive at once (bypass domains included).
    pub max_domains: u32,
    /// Mappings in one domain.
    pub max_mappings_per_domain: u32,
    /// Mappings in all domains together.
    pub max_mappings: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_domains: 4096,
            max_mappings_per_domain: 1 << 20,
            max_mappings: 1 << 21,
        }
    }
}

/// Everything that defines a device instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The endpoints that exist, as disjoint ranges.
    pub endpoints: Vec<EndpointRange>,
    /// Page sizes; the lowest set bit is the MAP granule.
    pub page_size_mask: u64,
    /// IOVA window; `Some` offers `F_INPUT_RANGE`.
    pub input_range: Option<InputRange>,
    /// Domain ID window; `Some` offers `F_DOMAIN_RANGE`.
    pub domain_range: Option<DomainRange>,
    /// Offer `F_PROBE` with this `probe_size`.
    pub probe_size: Option<u32>,
    /// Offer `F_MMIO`.
    pub mmio: bool,
    /// Offer `F_BYPASS_CONFIG`.
    pub bypass_config: bool,
    /// Offer the legacy `F_BYPASS` (only when `bypass_config` is off).
    pub legacy_bypass: bool,
    /// Initial value of the `bypass` config byte (restored on system reset).
    pub initial_bypass: bool,
    /// Resource limits.
    pub limits: Limits,
}

impl Default for DeviceConfig {
    /// A configuration that works out of the box for x86 Linux guests: PCI
    /// requester IDs 0–0xffff, each reserving the MSI window; 4 KiB granule
    /// with every larger power of two as a hint; 48-bit IOVAs; 16-bit domain
    /// IDs; PROBE with 512 bytes; BYPASS_CONFIG with boot bypass on (so
    /// firmware can DMA before the guest driver takes over).
    fn default() -> Self {
        DeviceConfig {
            endpoints: vec![EndpointRange {
                first: 0,
                last: 0xffff,
                resv: vec![X86_MSI_WINDOW],
            }],
            page_size_mask: !0xfff,
            input_range: Some(InputRange {
                start: 0,
                end: (1 << 48) - 1,
            }),
            domain_range: Some(DomainRange {
                start: 0,
                end: 0xffff,
            }),
            probe_size: Some(512),
            mmio: false,
            bypass_config: true,
            legacy_bypass: false,
            initial_bypass: true,
            limits: Limits::default(),
        }
    }
}

/// Why a configuration cannot make a device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `page_size_mask` must have at least one bit set (DEV-CFG-1).
    #[error("page_size_mask is 0; at least one page size must be set")]
    EmptyPageSizeMask,
    /// The input range is inverted.
    #[error("input range {start:#x}..={end:#x} is empty (start > end)")]
    EmptyInputRange {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// The domain range is inverted.
    #[error("domain range {start}..={end} is empty (start > end)")]
    EmptyDomainRange {
        /// Start.
        start: u32,
        /// End.
        end: u32,
    },
    /// No endpoint is configured.
    #[error("no endpoints configured")]
    NoEndpoints,
    /// An endpoint range is inverted.
    #[error("endpoint range {first:#x}..={last:#x} is empty (first > last)")]
    EmptyEndpointRange {
        /// First.
        first: u32,
        /// Last.
        last: u32,
    },
    /// Two endpoint ranges share an ID.
    #[error("endpoint ranges overlap at endpoint {endpoint:#x}")]
    OverlappingEndpoints {
        /// An ID in both ranges.
        endpoint: u32,
    },
    /// More endpoints than the device supports.
    #[error("{count} endpoints configured; at most {MAX_ENDPOINTS} are supported")]
    TooManyEndpoints {
        /// Endpoints configured.
        count: u64,
    },
    /// A reserved region is inverted.
    #[error("reserved region {start:#x}..={end:#x} of endpoint {endpoint:#x} is empty")]
    EmptyResvRegion {
        /// First endpoint of the range that has it.
        endpoint: u32,
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// Two reserved regions of one endpoint overlap (DEV-RESV-3).
    #[error("reserved regions of endpoint {endpoint:#x} overlap at {address:#x}")]
    OverlappingResvRegions {
        /// First endpoint of the range that has them.
        endpoint: u32,
        /// An address in both.
        address: u64,
    },
    /// More than one MSI region for one endpoint (DEV-RESV-2).
    #[error("endpoint {endpoint:#x} has more than one MSI region")]
    SeveralMsiRegions {
        /// First endpoint of the range that has them.
        endpoint: u32,
    },
    /// `probe_size` cannot hold an endpoint's properties.
    #[error(
        "probe_size {probe_size} is too small for the {need} bytes of properties of endpoint {endpoint:#x}"
    )]
    ProbeSizeTooSmall {
        /// The configured size.
        probe_size: u32,
        /// Bytes needed.
        need: usize,
        /// First endpoint of the range that needs them.
        endpoint: u32,
    },
    /// `probe_size` is larger than the device accepts.
    #[error("probe_size {0} is larger than the maximum {MAX_PROBE_SIZE}")]
    ProbeSizeTooLarge(u32),
    /// Legacy bypass and BYPASS_CONFIG must not be offered together (DEV-FEAT-3).
    #[error("legacy F_BYPASS and F_BYPASS_CONFIG cannot both be offered")]
    BypassFeaturesConflict,
    /// A limit is zero.
    #[error("limit {0} must be at least 1")]
    ZeroLimit(&'static str),
}

impl DeviceConfig {
    /// Checks the configuration; the device refuses to start on any error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.page_size_mask == 0 {
            return Err(ConfigError::EmptyPageSizeMask);
        }
        if let Some(r) = self.input_range
            && r.start > r.end
        {
            return Err(ConfigError::EmptyInputRange {
                start: r.start,
                end: r.end,
            });
        }
        if let Some(r) = self.domain_range
            && r.start > r.end
        {
            return Err(ConfigError::EmptyDomainRange {
                start: r.start,
                end: r.end,
            });
        }
        if self.legacy_bypass && self.bypass_config {
            return Err(ConfigError::BypassFeaturesConflict);
        }
        let limits = [
            ("max_domains", self.limits.max_domains),
            (
                "max_mappings_per_domain",
                self.limits.max_mappings_per_domain,
            ),
            ("max_mappings", self.limits.max_mappings),
        ];
        if let Some((name, _)) = limits.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::ZeroLimit(name));
        }
        if let Some(size) = self.probe_size
            && size > MAX_PROBE_SIZE
        {
            return Err(ConfigError::ProbeSizeTooLarge(size));
        }
        self.validate_endpoints()
    }

    fn validate_endpoints(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        let mut count = 0u64;
        for r in &self.endpoints {
            if r.is_empty() {
                return Err(ConfigError::EmptyEndpointRange {
                    first: r.first,
                    last: r.last,
                });
            }
            count += r.len();
            validate_resv(r)?;
            if let Some(probe_size) = self.probe_size {
                let need = resv_mem_bytes(r.resv.len());
                if need > probe_size as usize {
                    return Err(ConfigError::ProbeSizeTooSmall {
                        probe_size,
                        need,
                        endpoint: r.first,
                    });
                }
            }
        }
        if count > MAX_ENDPOINTS {
            return Err(ConfigError::TooManyEndpoints { count });
        }
        let mut sorted: Vec<_> = self.endpoints.iter().map(|r| (r.first, r.last)).collect();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if w[1].0 <= w[0].1 {
                return Err(ConfigError::OverlappingEndpoints { endpoint: w[1].0 });
            }
        }
        Ok(())
    }

    /// The feature bits the device offers (the transport adds its own ring
    /// features).
    pub fn offered_features(&self) -> Features {
        let mut f = Features::from_bits(&[VIRTIO_F_VERSION_1, VIRTIO_IOMMU_F_MAP_UNMAP]);
        f = f.with(VIRTIO_IOMMU_F_INPUT_RANGE, self.input_range.is_some());
        f = f.with(VIRTIO_IOMMU_F_DOMAIN_RANGE, self.domain_range.is_some());
        f = f.with(VIRTIO_IOMMU_F_PROBE, self.probe_size.is_some());
        f = f.with(VIRTIO_IOMMU_F_MMIO, self.mmio);
        f = f.with(VIRTIO_IOMMU_F_BYPASS_CONFIG, self.bypass_config);
        f.with(VIRTIO_IOMMU_F_BYPASS, self.legacy_bypass)
    }

    /// The MAP granule: the lowest set bit of `page_size_mask` (≥ 1).
    pub const fn granule(&self) -> u64 {
        1u64 << (self.page_size_mask.trailing_zeros() % 64)
    }

    /// The config space as read before any driver write.
    pub fn initial_config_space(&self) -> ConfigSpace {
        ConfigSpace {
            page_size_mask: self.page_size_mask,
            input_range: self.input_range.unwrap_or(InputRange::FULL),
            domain_range: self.domain_range.unwrap_or(DomainRange::FULL),
            probe_size: self.probe_size.unwrap_or(0),
            bypass: u8::from(self.bypass_config && self.initial_bypass),
        }
    }
}

fn validate_resv(r: &EndpointRange) -> Result<(), ConfigError> {
    let mut msi = 0;
    for (i, a) in r.resv.iter().enumerate() {
        if a.start > a.end {
            return Err(ConfigError::EmptyResvRegion {
                endpoint: r.first,
                start: a.start,
                end: a.end,
            });
        }
        if a.subtype == ResvSubtype::Msi {
            msi += 1;
        }
        if let Some(b) = r.resv[..i].iter().find(|b| b.overlaps(a.start, a.end)) {
            return Err(ConfigError::OverlappingResvRegions {
                endpoint: r.first,
                address: a.start.max(b.start),
            });
        }
    }
    if msi > 1 {
        return Err(ConfigError::SeveralMsiRegions { endpoint: r.first });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_offers_the_linux_set() {
        let cfg = DeviceConfig::default();
        cfg.validate().unwrap();
        let f = cfg.offered_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_IOMMU_F_MAP_UNMAP,
            VIRTIO_IOMMU_F_INPUT_RANGE,
            VIRTIO_IOMMU_F_DOMAIN_RANGE,
            VIRTIO_IOMMU_F_PROBE,
            VIRTIO_IOMMU_F_BYPASS_CONFIG,
        ] {
            assert!(f.has(bit), "bit {bit}");
        }
        assert!(!f.has(VIRTIO_IOMMU_F_BYPASS));
        assert!(!f.has(VIRTIO_IOMMU_F_MMIO));
        assert_eq!(cfg.granule(), 4096);
    }

    #[test]
    fn invalid_configs_are_refused_with_the_reason() {
        let base = DeviceConfig::default();
        let check = |f: &dyn Fn(&mut DeviceConfig), want: ConfigError| {
            let mut c = base.clone();
            f(&mut c);
            assert_eq!(c.validate(), Err(want));
        };
        check(&|c| c.page_size_mask = 0, ConfigError::EmptyPageSizeMask);
        check(
            &|c| c.input_range = Some(InputRange { start: 2, end: 1 }),
            ConfigError::EmptyInputRange { start: 2, end: 1 },
        );
        check(
            &|c| c.domain_range = Some(DomainRange { start: 2, end: 1 }),
            ConfigError::EmptyDomainRange { start: 2, end: 1 },
        );
        check(&|c| c.endpoints.clear(), ConfigError::NoEndpoints);
        check(
            &|c| c.legacy_bypass = true,
            ConfigError::BypassFeaturesConflict,
        );
        check(
            &|c| {
                c.endpoints.push(EndpointRange {
                    first: 0xffff,
                    last: 0x10000,
                    resv: vec![],
                })
            },
            ConfigError::OverlappingEndpoints { endpoint: 0xffff },
        );
        check(
            &|c| c.endpoints[0].resv.push(X86_MSI_WINDOW),
            ConfigError::OverlappingResvRegions {
                endpoint: 0,
                address: 0xfee0_0000,
            },
        );
        check(
            &|c| {
                c.endpoints[0].resv.push(ResvMem {
                    subtype: ResvSubtype::Msi,
                    start: 0,
                    end: 0xfff,
                })
            },
            ConfigError::SeveralMsiRegions { endpoint: 0 },
        );
        check(
            &|c| c.probe_size = Some(16),
            ConfigError::ProbeSizeTooSmall {
                probe_size: 16,
                need: 24,
                endpoint: 0,
            },
        );
        check(
            &|c| c.endpoints[0].last = u32::MAX,
            ConfigError::TooManyEndpoints { count: 1 << 32 },
        );
        check(
            &|c| c.limits.max_domains = 0,
            ConfigError::ZeroLimit("max_domains"),
        );
    }
}
