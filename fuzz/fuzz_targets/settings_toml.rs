//! Arbitrary text as the daemon's TOML settings file: it is parsed and
//! validated, or refused with an error; never a panic. Settings that are
//! accepted build a device.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vhost_user_iommu::settings::Settings;
use viommu_core::Device;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Settings::from_toml(Path::new("fuzz.toml"), text) {
        Ok(settings) => {
            if let Err(e) = Device::new(settings.device.clone()) {
                panic!("accepted settings build no device: {e}\n{settings:?}");
            }
            assert!(settings.queue_size.is_power_of_two());
        }
        Err(e) => {
            // The message renders (errors carry paths and TOML positions).
            let _ = e.to_string();
        }
    }
});
