//! A block workload as a Linux guest would issue it through its DMA layer:
//! random reads and writes of one block size, a fixed number in flight per
//! queue, every buffer mapped by the [`GuestDma`] policy before the device
//! sees it and unmapped when it is done; IOPS and latency percentiles, and
//! (with `verify`) every read checked against what was last written there.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::blk::{BlkDevice, BlkError, Guest, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use crate::blk_queue::{BlkRequest, Buf};
use crate::driver::Driver;
use crate::guest_dma::{DmaError, DmaStats, GuestDma, Policy};
use crate::memory::GuestRam;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Requests in flight per queue.
    pub depth: usize,
    /// Percentage of reads (the rest are writes).
    pub read_percent: u8,
    /// Bytes per request (a multiple of 512).
    pub block: u32,
    /// Stop after this many requests...
    pub count: Option<u64>,
    /// ... or after this long (whichever comes first; one is needed).
    pub duration: Option<Duration>,
    /// Blocks of the disk used (from sector 0); `None`: the whole disk.
    pub span_blocks: Option<u64>,
    /// Random seed.
    pub seed: u64,
    /// Check every read against the pattern last written there.
    pub verify: bool,
    /// How long to poll the used rings before sleeping on the call
    /// eventfds: a vCPU's halt polling (KVM polls a halted vCPU for up to
    /// 200 µs by default before it really sleeps). Zero: sleep at once.
    pub spin: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            depth: 1,
            read_percent: 100,
            block: 4096,
            count: Some(1000),
            duration: None,
            span_blocks: None,
            seed: 1,
            verify: false,
            spin: Duration::ZERO,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Requests completed.
    pub ios: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Requests that completed with a status other than OK.
    pub errors: u64,
    /// Reads whose data did not match what was written (`verify`).
    pub mismatches: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latencies in ns, sorted.
    pub latencies: Vec<u64>,
    /// IOMMU requests.
    pub dma: DmaStats,
}

impl LoadReport {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th percentile latency (0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        Duration::from_nanos(self.latencies[i.min(self.latencies.len() - 1)])
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The device.
    #[error(transparent)]
    Blk(#[from] BlkError),
    /// The DMA layer.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// A queue.
    #[error(transparent)]
    Queue(#[from] crate::blk_queue::QueueError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// The device completed nothing for too long.
    #[error("no completion for {0:?} with {1} requests in flight")]
    Stalled(Duration, usize),
}

/// The buffers of one in-flight request.
#[derive(Clone, Copy)]
struct Slot {
    /// Header at +0, status at +64 of one page.
    meta: u64,
    data: u64,
}

struct InFlight {
    req: BlkRequest,
    block: u64,
    generation: u64,
    started: Instant,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The bytes a block holds after write number `generation` of it.
pub fn pattern(block: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.wrapping_add(1);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out[..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&generation.to_le_bytes());
    out
}

/// Runs the workload on every queue of `dev`.
pub fn run(
    dev: &mut BlkDevice,
    guest: &mut Guest,
    dma: &mut GuestDma,
    opts: &LoadOptions,
) -> Result<LoadReport, LoadError> {
    if opts.block == 0 || opts.block % 512 != 0 || opts.depth == 0 {
        return Err(LoadError::Options(
            "the block size must be a non-zero multiple of 512 and the depth non-zero".into(),
        ));
    }
    if opts.count.is_none() && opts.duration.is_none() {
        return Err(LoadError::Options("give a count or a duration".into()));
    }
    if dma.policy() != Policy::Off && dma.policy() != Policy::Passthrough && guest.iommu().is_none()
    {
        return Err(LoadError::Options(format!(
            "policy {} needs the IOMMU",
            dma.policy()
        )));
    }
    let sectors_per_block = u64::from(opts.block / 512);
    let disk_blocks = dev.config().capacity / sectors_per_block;
    let blocks = opts.span_blocks.unwrap_or(disk_blocks).min(disk_blocks);
    if blocks == 0 {
        return Err(LoadError::Options(
            "the disk is smaller than one block".into(),
        ));
    }
    let queues = dev.queue_count();
    let mut slots: Vec<Vec<Slot>> = Vec::new();
    for _ in 0..queues {
        let mut q = Vec::new();
        for _ in 0..opts.depth {
            q.push(Slot {
                meta: guest.ram().alloc(4096, 4096)?.0,
                data: guest.ram().alloc(u64::from(opts.block), 4096)?.0,
            });
        }
        slots.push(q);
    }
    let mem = dev.mem().clone();
    let mut free: Vec<Vec<usize>> = (0..queues)
        .map(|_| (0..opts.depth).rev().collect())
        .collect();
    let mut flight: Vec<Vec<Option<InFlight>>> = (0..queues)
        .map(|_| (0..opts.depth).map(|_| None).collect())
        .collect();
    let mut written: HashMap<u64, u64> = HashMap::new();
    let mut busy: HashSet<u64> = HashSet::new();
    let mut rng = Rng(opts.seed | 1);
    let mut report = LoadReport::default();
    let start = Instant::now();
    let mut issued = 0u64;
    let mut last_progress = Instant::now();
    let stats_before = dma.stats();
    loop {
        let stop = opts.count.is_some_and(|c| issued >= c)
            || opts.duration.is_some_and(|d| start.elapsed() >= d);
        // Prepare new requests (mapped), then send the IOMMU batch, then
        // post them: the device never sees a buffer before its MAP completed.
        let mut posts: Vec<(usize, usize)> = Vec::new();
        if !stop {
            for q in 0..queues {
                while let Some(&s) = free[q].last() {
                    if opts.count.is_some_and(|c| issued >= c) {
                        break;
                    }
                    let mut block = rng.next() % blocks;
                    if opts.verify {
                        let mut tries = 0;
                        while busy.contains(&block) && tries < 64 {
                            block = rng.next() % blocks;
                            tries += 1;
                        }
                        if busy.contains(&block) {
                            break;
                        }
                        busy.insert(block);
                    }
                    free[q].pop();
                    let read = (rng.next() % 100) < u64::from(opts.read_percent);
                    let slot = slots[q][s];
                    let started = Instant::now();
                    let mut generation = 0;
                    if !read {
                        generation = written.get(&block).map_or(1, |g| g + 1);
                        mem.write_slice(
                            &pattern(block, generation, opts.block as usize),
                            GuestAddress(slot.data),
                        )
                        .map_err(|_| LoadError::Options("data buffer outside RAM".into()))?;
                    }
                    // As virtio_ring maps a request: each entry on its own.
                    let header = Buf {
                        dev: dma.map(guest.iommu(), slot.meta, 16, false)?,
                        gpa: slot.meta,
                        len: 16,
                    };
                    let data = Buf {
                        dev: dma.map(guest.iommu(), slot.data, u64::from(opts.block), read)?,
                        gpa: slot.data,
                        len: opts.block,
                    };
                    let status = Buf {
                        dev: dma.map(guest.iommu(), slot.meta + 64, 1, true)?,
                        gpa: slot.meta + 64,
                        len: 1,
                    };
                    flight[q][s] = Some(InFlight {
                        req: BlkRequest {
                            kind: if read {
                                VIRTIO_BLK_T_IN
                            } else {
                                VIRTIO_BLK_T_OUT
                            },
                            sector: block * sectors_per_block,
                            header,
                            data: vec![(data, read)],
                            status,
                        },
                        block,
                        generation,
                        started,
                    });
                    posts.push((q, s));
                    issued += 1;
                }
            }
        }
        let mut touched = vec![false; queues];
        for &(q, s) in &posts {
            if let Some(f) = &flight[q][s] {
                dev.queue(q).post(&mem, &f.req, s)?;
                touched[q] = true;
            }
        }
        for (q, t) in touched.iter().enumerate() {
            if *t {
                dev.publish(q)?;
            }
        }
        let in_flight: usize = (0..queues).map(|q| dev.queue(q).in_flight()).sum();
        if in_flight == 0 {
            if stop || opts.count.is_some_and(|c| issued >= c) {
                break;
            }
            continue;
        }
        // Completions.
        let mut done = 0;
        for q in 0..queues {
            while let Some(c) = dev.queue(q).pop(&mem)? {
                let Some(f) = flight[q][c.tag].take() else {
                    continue;
                };
                done += 1;
                let now = Instant::now();
                report.latencies.push((now - f.started).as_nanos() as u64);
                let mut status = [0u8; 1];
                let _ = mem.read_slice(&mut status, GuestAddress(f.req.status.gpa));
                let read = f.req.kind == VIRTIO_BLK_T_IN;
                report.ios += 1;
                if read {
                    report.reads += 1;
                } else {
                    report.writes += 1;
                }
                if status[0] != VIRTIO_BLK_S_OK {
                    report.errors += 1;
                } else if read && opts.verify {
                    if let Some(&g) = written.get(&f.block) {
                        let mut got = vec![0u8; opts.block as usize];
                        let _ = mem.read_slice(&mut got, GuestAddress(f.req.data[0].0.gpa));
                        if got != pattern(f.block, g, opts.block as usize) {
                            report.mismatches += 1;
                        }
                    }
                } else if !read {
                    written.insert(f.block, f.generation);
                }
                busy.remove(&f.block);
                dma.unmap(guest.iommu(), f.req.header.dev, 16)?;
                dma.unmap(guest.iommu(), f.req.data[0].0.dev, u64::from(opts.block))?;
                dma.unmap(guest.iommu(), f.req.status.dev, 1)?;
                free[q].push(c.tag);
            }
        }
        dma.flush(guest.iommu(), false)?;
        if done > 0 {
            last_progress = Instant::now();
        } else {
            if last_progress.elapsed() > Duration::from_secs(10) {
                return Err(LoadError::Stalled(last_progress.elapsed(), in_flight));
            }
            dev.wait(opts.spin, Duration::from_millis(100))?;
        }
    }
    dma.flush(guest.iommu(), true)?;
    report.elapsed = start.elapsed();
    report.latencies.sort_unstable();
    let after = dma.stats();
    report.dma = DmaStats {
        maps: after.maps - stats_before.maps,
        unmaps: after.unmaps - stats_before.unmaps,
        batches: after.batches - stats_before.batches,
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_their_block_and_generation_and_differ() {
        let a = pattern(7, 1, 4096);
        assert_eq!(a.len(), 4096);
        assert_eq!(&a[..8], &7u64.to_le_bytes());
        assert_eq!(&a[8..16], &1u64.to_le_bytes());
        assert_ne!(a, pattern(7, 2, 4096));
        assert_ne!(a, pattern(8, 1, 4096));
        assert_eq!(a, pattern(7, 1, 4096));
    }
}

/// A VM with one virtio-blk device behind (or without) the IOMMU.
pub struct BlkVm {
    /// RAM and the IOMMU.
    pub guest: Guest,
    /// The guest's DMA layer for the device.
    pub dma: GuestDma,
    /// The device.
    pub dev: BlkDevice,
}

/// Where a [`BlkVm`] connects and how.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// The vhost-user-blk backend's socket.
    pub blk_socket: std::path::PathBuf,
    /// The vhost-user-iommu daemon's socket (not used with `off`).
    pub iommu_socket: Option<std::path::PathBuf>,
    /// DMA policy.
    pub policy: Policy,
    /// The device's endpoint ID.
    pub endpoint: u32,
    /// Domain for strict and lazy.
    pub domain: u32,
    /// Guest RAM; IOVAs are allocated in its upper half.
    pub ram_size: u64,
    /// The device's queues.
    pub blk: crate::blk::BlkOptions,
}

impl BlkVm {
    /// Connects everything and brings the device up.
    pub fn start(opts: &VmOptions) -> Result<BlkVm, LoadError> {
        let window = (opts.ram_size / 2, opts.ram_size);
        let mut dma = GuestDma::new(opts.policy, opts.endpoint, opts.domain, window);
        let mut blk = opts.blk.clone();
        blk.iommu_platform = opts.policy != Policy::Off;
        let mut guest = match opts.policy {
            Policy::Off => Guest::Plain(GuestRam::new(opts.ram_size)?),
            _ => {
                let socket = opts.iommu_socket.as_deref().ok_or_else(|| {
                    LoadError::Options(format!("policy {} needs the IOMMU socket", opts.policy))
                })?;
                let driver = Driver::connect(
                    socket,
                    crate::driver::DriverOptions {
                        ram_size: opts.ram_size,
                        ..crate::driver::DriverOptions::default()
                    },
                )
                .map_err(|e| LoadError::Dma(DmaError::Iommu(e)))?;
                Guest::WithIommu(Box::new(driver))
            }
        };
        dma.attach(guest.iommu())?;
        let dev = BlkDevice::connect(&opts.blk_socket, &mut guest, &blk, &mut dma)?;
        Ok(BlkVm { guest, dma, dev })
    }

    /// `stop` then `cont`, as QEMU sends them ([`BlkDevice::pause_and_resume`]).
    pub fn pause_and_resume(&mut self) -> Result<(), LoadError> {
        Ok(self.dev.pause_and_resume(self.guest.ram())?)
    }

    /// Runs a workload (see [`LoadOptions`]).
    pub fn run(&mut self, opts: &LoadOptions) -> Result<LoadReport, LoadError> {
        run(&mut self.dev, &mut self.guest, &mut self.dma, opts)
    }
}
