//! Control queue commands (virtio 1.2 §5.1.6.5): what a Linux driver sends
//! at boot — RX mode and the MAC filter table — is acknowledged and
//! recorded; everything else answers VIRTIO_NET_ERR. The switch does not
//! filter on them: a port receives frames addressed to its guest's
//! addresses, broadcasts, multicasts and unknown unicast (flooded), which a
//! driver in any RX mode accepts or drops itself.

use crate::mac::Mac;

/// Class RX: promiscuous and all-multicast modes.
pub const VIRTIO_NET_CTRL_RX: u8 = 0;
/// RX: promiscuous mode on or off.
pub const VIRTIO_NET_CTRL_RX_PROMISC: u8 = 0;
/// RX: all-multicast mode on or off.
pub const VIRTIO_NET_CTRL_RX_ALLMULTI: u8 = 1;
/// Class MAC: the filter table.
pub const VIRTIO_NET_CTRL_MAC: u8 = 1;
/// MAC: set the unicast and multicast tables.
pub const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = 0;
/// Acknowledged.
pub const VIRTIO_NET_OK: u8 = 0;
/// Refused.
pub const VIRTIO_NET_ERR: u8 = 1;
/// Largest command accepted (class, command, data): a MAC table of a few
/// thousand addresses.
pub const MAX_COMMAND: usize = 64 * 1024;
/// Most addresses kept per table (a longer table is acknowledged; the
/// switch does not filter on it).
const MAX_TABLE: usize = 1024;

/// What the driver asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RxFilter {
    /// Promiscuous mode.
    pub promiscuous: bool,
    /// All-multicast mode.
    pub all_multicast: bool,
    /// Unicast addresses of the filter table.
    pub unicast: Vec<Mac>,
    /// Multicast addresses of the filter table.
    pub multicast: Vec<Mac>,
}

/// Runs one command: `command` is the device-readable part of the chain
/// (class, command, data). Returns the ack byte.
pub fn execute(command: &[u8], filter: &mut RxFilter) -> u8 {
    let (class, cmd, data) = match command {
        [class, cmd, data @ ..] => (*class, *cmd, data),
        _ => return VIRTIO_NET_ERR,
    };
    match (class, cmd) {
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI) => {
            let on = match data {
                [0] => false,
                [1] => true,
                _ => return VIRTIO_NET_ERR,
            };
            if cmd == VIRTIO_NET_CTRL_RX_PROMISC {
                filter.promiscuous = on;
            } else {
                filter.all_multicast = on;
            }
            VIRTIO_NET_OK
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => match mac_tables(data) {
            Some((unicast, multicast)) => {
                filter.unicast = unicast;
                filter.multicast = multicast;
                VIRTIO_NET_OK
            }
            None => VIRTIO_NET_ERR,
        },
        _ => VIRTIO_NET_ERR,
    }
}

/// Two `virtio_net_ctrl_mac` tables back to back (a little-endian count,
/// then that many addresses), exactly filling `data`.
fn mac_tables(data: &[u8]) -> Option<(Vec<Mac>, Vec<Mac>)> {
    let (unicast, rest) = mac_table(data)?;
    let (multicast, rest) = mac_table(rest)?;
    rest.is_empty().then_some((unicast, multicast))
}

fn mac_table(data: &[u8]) -> Option<(Vec<Mac>, &[u8])> {
    let count = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let len = count.checked_mul(6)?;
    let entries = data.get(4..4usize.checked_add(len)?)?;
    let macs = entries
        .chunks_exact(6)
        .take(MAX_TABLE)
        .filter_map(|c| c.try_into().ok().map(Mac))
        .collect();
    Some((macs, &data[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(macs: &[[u8; 6]]) -> Vec<u8> {
        let mut b = (macs.len() as u32).to_le_bytes().to_vec();
        for m in macs {
            b.extend_from_slice(m);
        }
        b
    }

    #[test]
    fn linux_boot_commands_are_acknowledged_and_recorded() {
        let mut f = RxFilter::default();
        assert_eq!(execute(&[0, 0, 1], &mut f), VIRTIO_NET_OK);
        assert_eq!(execute(&[0, 1, 1], &mut f), VIRTIO_NET_OK);
        assert!(f.promiscuous && f.all_multicast);
        assert_eq!(execute(&[0, 0, 0], &mut f), VIRTIO_NET_OK);
        assert!(!f.promiscuous);
        let mut cmd = vec![1, 0];
        cmd.extend(table(&[[2, 0, 0, 0, 0, 1]]));
        cmd.extend(table(&[[1, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]]));
        assert_eq!(execute(&cmd, &mut f), VIRTIO_NET_OK);
        assert_eq!(f.unicast, vec![Mac([2, 0, 0, 0, 0, 1])]);
        assert_eq!(f.multicast.len(), 2);
        let mut empty = vec![1, 0];
        empty.extend(table(&[]));
        empty.extend(table(&[]));
        assert_eq!(execute(&empty, &mut f), VIRTIO_NET_OK);
        assert!(f.unicast.is_empty() && f.multicast.is_empty());
    }

    #[test]
    fn malformed_and_unsupported_commands_answer_err_and_change_nothing() {
        let mut f = RxFilter {
            promiscuous: true,
            ..RxFilter::default()
        };
        let before = f.clone();
        let mut cut = vec![1, 0];
        cut.extend(table(&[[2, 0, 0, 0, 0, 1]]));
        let mut long_count = vec![1, 0];
        long_count.extend(u32::MAX.to_le_bytes());
        let mut trailing = vec![1, 0];
        trailing.extend(table(&[]));
        trailing.extend(table(&[]));
        trailing.push(0);
        for cmd in [
            &[][..],
            &[0],
            &[0, 0],
            &[0, 0, 2],
            &[0, 0, 1, 1],
            &[0, 2, 1],                // RX NOUNI/ALLUNI need CTRL_RX_EXTRA
            &[1, 1, 1, 2, 3, 4, 5, 6], // MAC ADDR_SET needs CTRL_MAC_ADDR
            &[2, 0, 0, 0],             // VLAN
            &[4, 0, 1, 0],             // MQ
            &[0xff, 0xff],
            &cut,
            &long_count,
            &trailing,
        ] {
            assert_eq!(execute(cmd, &mut f), VIRTIO_NET_ERR, "{cmd:?}");
            assert_eq!(f, before, "{cmd:?}");
        }
    }
}
