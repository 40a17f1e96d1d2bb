//! A port's counters: what it forwarded, and every frame it dropped, by
//! reason (a dropped frame is always counted, never silent).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Live counters of one port (relaxed atomics: written by the
        /// polling threads, read for logs).
        #[derive(Debug, Default)]
        pub struct PortStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// The counters at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl PortStats {
            /// The counters now.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl fmt::Display for StatsSnapshot {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut first = true;
                $(
                    if !first {
                        f.write_str(" ")?;
                    }
                    first = false;
                    write!(f, "{}={}", stringify!($name), self.$name)?;
                )*
                let _ = first;
                Ok(())
            }
        }
    };
}

counters! {
    /// Frames taken from the guest's transmit queue and forwarded.
    tx_frames,
    /// Their bytes (without the virtio-net header).
    tx_bytes,
    /// Transmit chains dropped as malformed: a loop, a bad index or
    /// indirect table, a device-writable buffer.
    tx_malformed,
    /// Transmit frames shorter than an Ethernet header (zero length
    /// included) or a header cut short.
    tx_runt,
    /// Transmit frames longer than the MTU allows.
    tx_oversize,
    /// Transmit headers asking for an offload that was not negotiated.
    tx_bad_header,
    /// Transmit buffers that did not translate (a fault reported to the
    /// guest's IOMMU) or lie outside guest RAM.
    tx_faults,
    /// Transmit frames addressed back to their own port.
    tx_hairpin,
    /// Frames written into the guest's receive buffers.
    rx_frames,
    /// Their bytes (without the virtio-net header).
    rx_bytes,
    /// Frames dropped for want of receive buffers.
    rx_no_buffers,
    /// Frames larger than the receive buffer (without merged buffers).
    rx_too_big,
    /// Frames dropped because a receive buffer did not translate (a fault
    /// reported) or lies outside guest RAM.
    rx_faults,
    /// Receive chains returned unused: malformed, device-readable, or
    /// smaller than a header with merged buffers.
    rx_bad_chains,
    /// Frames for this port (flooded ones included) dropped while its
    /// guest had no receive queue running.
    rx_down,
    /// Control queue commands acknowledged.
    ctrl_ok,
    /// Control queue commands refused (VIRTIO_NET_ERR) or malformed.
    ctrl_err,
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_print_every_counter_as_key_value() {
        let s = PortStats::default();
        bump(&s.tx_frames);
        add(&s.rx_bytes, 60);
        let snap = s.snapshot();
        assert_eq!((snap.tx_frames, snap.rx_bytes, snap.rx_frames), (1, 60, 0));
        let text = snap.to_string();
        assert!(text.starts_with("tx_frames=1 tx_bytes=0 "), "{text}");
        assert!(text.contains(" rx_bytes=60 "), "{text}");
        assert!(text.ends_with(" ctrl_err=0"), "{text}");
    }
}
