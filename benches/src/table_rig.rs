//! A daemon's shared table in this process, as a backend sees it: a
//! `TableWriter` with the given mappings behind a real backend socket, and
//! a backend's [`Dma`] connected to it in each mode, over the same guest
//! RAM. For benchmarks of a backend's per-batch translation work.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use iotlb_shm::{EndpointTarget, Perms, TableWriter, WriterConfig};
use viommu_backend::{Dma, DmaOptions, IommuMode};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The endpoint the backend's device is.
pub const EP: u32 = 8;

/// The table, its socket and the guest RAM.
pub struct TableRig {
    dir: PathBuf,
    pub socket: PathBuf,
    pub ram: Arc<GuestMemoryMmap<()>>,
}

impl TableRig {
    /// A table where endpoint [`EP`] is in domain 1 with `maps` (IOVA,
    /// guest-physical) pages mapped read-write, over `ram` bytes of RAM.
    pub fn new(name: &str, ram: u64, maps: impl IntoIterator<Item = (u64, u64)>) -> TableRig {
        let dir = std::env::temp_dir().join(format!("viommu-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("backends.sock");
        let mut w = TableWriter::new(&WriterConfig::default()).unwrap();
        w.create_domain(1).unwrap();
        w.set_endpoint(EP, EndpointTarget::Domain(1)).unwrap();
        let rw = Perms {
            read: true,
            write: true,
            mmio: false,
        };
        for (iova, gpa) in maps {
            w.map(1, iova, iova + 0xfff, gpa, rw).unwrap();
        }
        let writer = Arc::new(Mutex::new(w));
        vhost_user_iommu::backend_socket::BackendSocket::bind(
            &socket,
            Vec::new(),
            writer,
            vhost_user_iommu::backend_socket::FaultRoute::default(),
            vhost_user_iommu::iotlb_msg::Subscribers::new(iotlb_shm::StallPolicy::default()),
        )
        .and_then(vhost_user_iommu::backend_socket::BackendSocket::spawn)
        .unwrap();
        let ram = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram as usize)]).unwrap(),
        );
        TableRig { dir, socket, ram }
    }

    /// A device's DMA in `mode` (`Table`/`IotlbMsg` take this rig's socket).
    pub fn dma(&self, mode: &str, pins: u32) -> Dma {
        let mode = match mode {
            "none" => IommuMode::None,
            "table" => IommuMode::Table(self.socket.clone()),
            _ => IommuMode::IotlbMsg(self.socket.clone()),
        };
        let d = Dma::connect(&DmaOptions {
            mode,
            endpoint: EP,
            slots: 2,
            pins,
        })
        .unwrap();
        d.set_memory(self.ram.clone());
        d
    }
}

impl Drop for TableRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
