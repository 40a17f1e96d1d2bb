//! The vrings the framework keeps for a device: vhost-user-backend's
//! [`VringRwLock`], except for how a kick is read. Every binary of the
//! workspace uses [`TolerantVring`] as its backend's `Vring`.
//!
//! The framework's epoll thread, for an event on a queue's kick eventfd,
//! first reads that queue's *current* kick eventfd and ends itself (and with
//! it every queue event, hand-over and fault wake-up of the connection) if
//! the read fails, `EAGAIN` included. But a kick eventfd can be readable in
//! the events one `epoll_wait` returned and empty when its turn comes:
//!
//! - another reader of the same eventfd (the IOMMU daemon's io_uring kick
//!   loop, once the eventfd is handed over to it); when the hand-over runs for the queue's enable
//!   notification and the kick's event is next in the same batch, the
//!   io_uring thread may take the count first;
//! - the VMM may have replaced the kick eventfd (`SET_VRING_KICK`) since the
//!   event came, and the read goes to the new, empty one.
//!
//! [`TolerantVring`] reads the kick as the framework does, but an empty kick
//! eventfd is not an error: the event goes to the backend as a kick, which
//! at worst makes one empty pass (or one more hand-over).

use std::fs::File;
use std::io;
use tracing::debug;
use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as vhost-user-backend hands it over.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// A vring as [`VringRwLock`], whose kick read tolerates a count another
/// reader took first. Cheap to clone: clones share the vring.
#[derive(Clone)]
pub struct TolerantVring(VringRwLock);

impl TolerantVring {
    /// The framework's vring inside (what the request ring and the
    /// io_uring thread work on).
    pub fn rwlock(&self) -> &VringRwLock {
        &self.0
    }
}

impl<'a> VringStateGuard<'a, GuestMem> for TolerantVring {
    type G = <VringRwLock as VringStateGuard<'a, GuestMem>>::G;
}

impl<'a> VringStateMutGuard<'a, GuestMem> for TolerantVring {
    type G = <VringRwLock as VringStateMutGuard<'a, GuestMem>>::G;
}

impl VringT<GuestMem> for TolerantVring {
    fn new(mem: GuestMem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        VringRwLock::new(mem, max_queue_size).map(Self)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, GuestMem>>::G {
        self.0.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, GuestMem>>::G {
        self.0.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.0.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.0.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.0.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.0.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.0.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.0.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.0.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.0.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.0.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.0.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.0.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.0.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.0.set_kick(file)
    }

    /// Reads the kick eventfd, if any; whether the queue is enabled. An
    /// empty kick eventfd (`EAGAIN`: its count was taken by the io_uring
    /// thread, or the eventfd is a new one) is a kick all the same.
    fn read_kick(&self) -> io::Result<bool> {
        let state = self.0.get_ref();
        if let Some(kick) = state.get_kick() {
            match kick.consume() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    debug!("a kick event found its eventfd empty (read elsewhere, or replaced)");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(state.is_enabled())
    }

    fn set_call(&self, file: Option<File>) {
        self.0.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.0.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::{GuestMem, TolerantVring};
    use std::fs::File;
    use std::io;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vhost_user_backend::{VringRwLock, VringT};
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

    /// A kick eventfd as QEMU (and the test frontend) make it, and a
    /// duplicate of it: the io_uring thread's copy.
    fn kick_pair() -> (File, EventFd) {
        let kick = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
        let other = kick.try_clone().unwrap();
        // SAFETY: `into_raw_fd` gives up the descriptor, owned by the File
        // from here on.
        let file = unsafe { File::from_raw_fd(kick.into_raw_fd()) };
        (file, other)
    }

    fn mem() -> GuestMem {
        GuestMem::new(GuestMemoryMmap::new())
    }

    #[test]
    fn a_kick_whose_count_another_reader_took_is_still_a_kick() {
        let vring = TolerantVring::new(mem(), 256).unwrap();
        let (file, io_uring_copy) = kick_pair();
        vring.set_kick(Some(file));
        vring.set_enabled(true);
        // The driver kicks; the io_uring thread reads the count before the
        // framework's epoll thread handles the event it had seen.
        io_uring_copy.write(1).unwrap();
        assert_eq!(io_uring_copy.read().unwrap(), 1);
        assert!(
            vring.read_kick().unwrap(),
            "an empty kick eventfd must not fail the epoll thread"
        );
        // A kick of its own is read as before.
        io_uring_copy.write(1).unwrap();
        assert!(vring.read_kick().unwrap());
        assert_eq!(
            io_uring_copy.read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "the count was consumed"
        );
        vring.set_enabled(false);
        assert!(!vring.read_kick().unwrap(), "disabled: not served");
    }

    /// Why [`TolerantVring`] exists: the framework's own vring fails the read,
    /// and its epoll thread ends on that error (no more queue events for
    /// the connection: the request queue's next kick eventfd is never
    /// handed over). Should this start to fail, the framework tolerates an
    /// empty kick itself and [`TolerantVring`] can go.
    #[test]
    fn the_framework_vring_fails_on_an_empty_kick() {
        let vring = VringRwLock::new(mem(), 256).unwrap();
        let (file, io_uring_copy) = kick_pair();
        vring.set_kick(Some(file));
        vring.set_enabled(true);
        io_uring_copy.write(1).unwrap();
        assert_eq!(io_uring_copy.read().unwrap(), 1);
        assert_eq!(
            vring.read_kick().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
