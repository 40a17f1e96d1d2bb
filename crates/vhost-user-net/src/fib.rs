//! The forwarding table: which port a unicast address lives behind.
//!
//! Each port's configured address (`mac=`) is a static entry that learning
//! never moves, so a guest cannot draw another guest's traffic by sending
//! from its address. Other source addresses are learned as frames arrive,
//! at most [`MAX_LEARNED_PER_PORT`] per port (a guest spraying random
//! source addresses fills only its own share; frames to addresses not
//! learned are flooded). A port's learned entries go when its VMM
//! disconnects.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use crate::mac::Mac;

/// Index of a port in the switch.
pub type PortId = usize;
/// Most addresses learned behind one port.
pub const MAX_LEARNED_PER_PORT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    port: PortId,
    fixed: bool,
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To this port.
    Port(PortId),
    /// To every port but the source (broadcast, multicast, unknown).
    Flood,
    /// Nowhere (addressed back to its own port).
    Drop,
}

/// The table.
#[derive(Debug, Default)]
pub struct Fib {
    entries: RwLock<HashMap<Mac, Entry>>,
    learned: RwLock<Vec<usize>>,
}

/// A read view for one burst (one lock taken per burst, not per frame).
pub struct FibView<'a> {
    entries: RwLockReadGuard<'a, HashMap<Mac, Entry>>,
}

impl FibView<'_> {
    /// Where a frame to `dst` from port `from` goes.
    pub fn destination(&self, dst: Mac, from: PortId) -> Destination {
        if dst.is_group() {
            return Destination::Flood;
        }
        match self.entries.get(&dst) {
            Some(e) if e.port == from => Destination::Drop,
            Some(e) => Destination::Port(e.port),
            None => Destination::Flood,
        }
    }

    /// Whether `src` is already known behind `port` (no learning needed).
    pub fn knows(&self, src: Mac, port: PortId) -> bool {
        self.entries.get(&src).is_some_and(|e| e.port == port)
    }
}

impl Fib {
    /// A table with each port's configured address fixed.
    pub fn new(fixed: &[Mac]) -> Fib {
        let entries = fixed
            .iter()
            .enumerate()
            .map(|(port, &mac)| (mac, Entry { port, fixed: true }))
            .collect();
        Fib {
            entries: RwLock::new(entries),
            learned: RwLock::new(vec![0; fixed.len()]),
        }
    }

    /// The table for one burst.
    pub fn view(&self) -> FibView<'_> {
        FibView {
            entries: self.entries.read().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Learns that `src` lives behind `port`; false if it is not learned
    /// (a group address, a fixed entry of another port, the port's share
    /// is full).
    pub fn learn(&self, src: Mac, port: PortId) -> bool {
        if src.is_group() {
            return false;
        }
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        let mut learned = self.learned.write().unwrap_or_else(PoisonError::into_inner);
        match entries.get(&src).copied() {
            Some(e) if e.port == port => true,
            Some(e) if e.fixed => false,
            existing => {
                if learned.get(port).is_none_or(|&n| n >= MAX_LEARNED_PER_PORT) {
                    return false;
                }
                if let Some(old) = existing {
                    if let Some(n) = learned.get_mut(old.port) {
                        *n -= 1;
                    }
                }
                entries.insert(src, Entry { port, fixed: false });
                learned[port] += 1;
                true
            }
        }
    }

    /// Forgets what was learned behind `port` (its fixed address stays).
    pub fn forget_port(&self, port: PortId) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|_, e| e.fixed || e.port != port);
        if let Some(n) = self
            .learned
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(port)
        {
            *n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(last: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, last])
    }

    #[test]
    fn learning_moves_learned_entries_but_never_fixed_ones() {
        let fib = Fib::new(&[mac(1), mac(2)]);
        assert_eq!(fib.view().destination(mac(1), 1), Destination::Port(0));
        assert_eq!(fib.view().destination(mac(1), 0), Destination::Drop);
        assert_eq!(fib.view().destination(mac(9), 0), Destination::Flood);
        assert_eq!(
            fib.view().destination(crate::mac::BROADCAST, 0),
            Destination::Flood
        );
        assert!(fib.learn(mac(9), 1));
        assert_eq!(fib.view().destination(mac(9), 0), Destination::Port(1));
        assert!(fib.view().knows(mac(9), 1));
        assert!(fib.learn(mac(9), 0), "a learned address moves");
        assert_eq!(fib.view().destination(mac(9), 1), Destination::Port(0));
        assert!(!fib.learn(mac(1), 1), "port 1 cannot take port 0's address");
        assert_eq!(fib.view().destination(mac(1), 1), Destination::Port(0));
        assert!(
            !fib.learn(Mac([1, 0, 0x5e, 0, 0, 1]), 0),
            "group sources are not learned"
        );
        fib.forget_port(0);
        assert_eq!(fib.view().destination(mac(9), 1), Destination::Flood);
        assert_eq!(fib.view().destination(mac(1), 1), Destination::Port(0));
        assert!(!fib.learn(mac(3), 7), "no such port");
    }

    #[test]
    fn a_port_learns_at_most_its_share() {
        let fib = Fib::new(&[mac(1), mac(2)]);
        for i in 0..MAX_LEARNED_PER_PORT as u32 {
            let b = i.to_be_bytes();
            assert!(fib.learn(Mac([2, 1, b[0], b[1], b[2], b[3]]), 0));
        }
        assert!(!fib.learn(Mac([2, 2, 0, 0, 0, 0]), 0));
        assert!(
            fib.learn(Mac([2, 2, 0, 0, 0, 0]), 1),
            "the other port still learns"
        );
        assert!(
            fib.learn(Mac([2, 1, 0, 0, 0, 0]), 1),
            "moving frees a share"
        );
        assert!(fib.learn(Mac([2, 2, 0, 0, 0, 1]), 0));
    }
}
