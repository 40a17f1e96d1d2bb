//! Whether the device may complete a write before it is durable
//! (virtio 1.2 §5.2.6.2, "volatile" and "stable" writes).

use crate::features::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH, has};

/// How completed writes relate to persistent storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteCache {
    /// A write may complete while still volatile; a later FLUSH makes it
    /// stable.
    WriteBack,
    /// A write must be stable (committed, e.g. `fdatasync`ed or written
    /// with `O_DSYNC`) before it completes.
    WriteThrough,
}

/// The cache mode the device must honour, from the negotiated features and
/// the current `writeback` config byte.
///
/// A completed write is stable by itself when `CONFIG_WCE` was negotiated
/// and `writeback` is 0, or when neither `CONFIG_WCE` nor `FLUSH` was
/// negotiated (we always offer `FLUSH`): the driver then has no way to ask
/// for durability later. Otherwise it becomes stable only after a FLUSH.
pub fn write_cache(negotiated: u64, writeback: u8) -> WriteCache {
    if has(negotiated, VIRTIO_BLK_F_CONFIG_WCE) {
        if writeback == 0 {
            WriteCache::WriteThrough
        } else {
            WriteCache::WriteBack
        }
    } else if has(negotiated, VIRTIO_BLK_F_FLUSH) {
        WriteCache::WriteBack
    } else {
        WriteCache::WriteThrough
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::bit;

    const WCE: u64 = 1 << VIRTIO_BLK_F_CONFIG_WCE;
    const FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;

    #[test]
    fn config_wce_makes_the_writeback_byte_decide() {
        for negotiated in [WCE, WCE | FLUSH] {
            assert_eq!(write_cache(negotiated, 0), WriteCache::WriteThrough);
            assert_eq!(write_cache(negotiated, 1), WriteCache::WriteBack);
        }
    }

    #[test]
    fn flush_without_config_wce_is_write_back_whatever_the_byte() {
        assert_eq!(write_cache(FLUSH, 0), WriteCache::WriteBack);
        assert_eq!(write_cache(FLUSH, 1), WriteCache::WriteBack);
    }

    #[test]
    fn neither_flush_nor_config_wce_is_write_through() {
        assert_eq!(write_cache(0, 1), WriteCache::WriteThrough);
        assert_eq!(write_cache(bit(32), 1), WriteCache::WriteThrough);
    }
}
