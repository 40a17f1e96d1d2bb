//! virtio-blk conformance of the real `vhost-user-blk` process in
//! `--iommu none` mode, driven over its socket by the test frontend (no
//! IOMMU: device addresses are guest-physical): features and config space,
//! every request type with its exact status and used length, bounds,
//! read-only disks, multiqueue, and hostile descriptor chains after which
//! the queue must keep serving. The statuses and used lengths are the ones
//! `plan.rs`, `layout.rs` and `segments.rs` document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Blk, Scratch};
use vhost_user_blk::features::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use viommu_frontend::blk::{
    BlkConfig, BlkDevice, BlkOptions, Guest, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use viommu_frontend::blk_load::pattern;
use viommu_frontend::blk_queue::{BlkRequest, Buf, Completion, RawDesc};
use viommu_frontend::guest_dma::{GuestDma, Policy};
use viommu_frontend::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of every VM here.
const RAM: u64 = 16 << 20;
/// An address past the end of guest RAM.
const OUTSIDE_RAM: u64 = RAM + 0x10000;
/// Longest wait for one completion: a hang fails the test.
const WAIT: Duration = Duration::from_secs(10);
/// The serial the backends are started with.
const SERIAL: &str = "conf-disk-7";
/// The default image: 8 MiB.
const IMAGE: u64 = 8 << 20;
/// VIRTIO_F_* bit of vhost-user's PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u32 = 30;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
/// DISCARD / WRITE_ZEROES segment flag: unmap.
const FLAG_UNMAP: u32 = 1;

fn bits(list: &[u32]) -> u64 {
    list.iter().fold(0, |a, &b| a | 1 << b)
}

/// One descriptor of a raw chain.
fn desc(b: Buf, writable: bool, next: Option<usize>) -> RawDesc {
    RawDesc {
        addr: b.dev,
        len: b.len,
        flags: if writable { VRING_DESC_F_WRITE } else { 0 },
        next,
    }
}

/// A DISCARD / WRITE_ZEROES segment list.
fn segments(list: &[(u64, u32, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(sector, num_sectors, flags) in list {
        out.extend_from_slice(&sector.to_le_bytes());
        out.extend_from_slice(&num_sectors.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
    }
    out
}

/// A VM without an IOMMU whose one device is a real backend process.
struct Vm {
    dev: BlkDevice,
    guest: Guest,
    blk: Blk,
    dir: Scratch,
    tag: usize,
}

impl Vm {
    /// Starts the backend in `dir` with `args` and brings the device up
    /// with `queues` queues of `queue_size` entries.
    fn start(dir: Scratch, args: &[&str], queues: u16, queue_size: u16) -> Vm {
        let mut all = args.to_vec();
        if !args.contains(&"--serial") {
            all.extend(["--serial", SERIAL]);
        }
        let blk = Blk::start(&dir, &all);
        let mut guest = Guest::Plain(GuestRam::new(RAM).unwrap());
        let mut dma = GuestDma::new(Policy::Off, 0, 0, (RAM / 2, RAM));
        let opts = BlkOptions {
            queues,
            queue_size,
            ..BlkOptions::default()
        };
        let dev = BlkDevice::connect(&blk.socket, &mut guest, &opts, &mut dma)
            .unwrap_or_else(|e| panic!("bring-up failed: {e}\n{}", blk.proc.log_text()));
        Vm {
            dev,
            guest,
            blk,
            dir,
            tag: 0,
        }
    }

    /// A one-queue device over a fresh image of `bytes`, with `extra` options.
    fn image(name: &str, bytes: u64, extra: &[&str]) -> Vm {
        let dir = Scratch::new(name);
        let img = dir.image("disk.img", bytes);
        let mut args = vec!["--blk-file", img.to_str().unwrap()];
        args.extend_from_slice(extra);
        Vm::start(dir, &args, 1, 256)
    }

    fn image_path(&self) -> std::path::PathBuf {
        self.dir.path("disk.img")
    }

    /// `len` bytes of guest RAM holding `fill`.
    fn buf(&mut self, len: u32, fill: u8) -> Buf {
        self.buf_with(&vec![fill; len as usize])
    }

    /// Guest RAM holding `bytes`.
    fn buf_with(&mut self, bytes: &[u8]) -> Buf {
        let len = bytes.len() as u64;
        let gpa = self.guest.ram().alloc(len.max(1), 512).unwrap().0;
        self.dev
            .mem()
            .write_slice(bytes, GuestAddress(gpa))
            .unwrap();
        Buf {
            dev: gpa,
            gpa,
            len: bytes.len() as u32,
        }
    }

    /// What `b` holds now.
    fn bytes(&self, b: Buf) -> Vec<u8> {
        let mut out = vec![0; b.len as usize];
        self.dev
            .mem()
            .read_slice(&mut out, GuestAddress(b.gpa))
            .unwrap();
        out
    }

    /// A 16-byte request header.
    fn header(&mut self, kind: u32, sector: u64) -> Buf {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.buf_with(&h)
    }

    /// A status byte holding 0xff, so a status never written shows.
    fn status(&mut self) -> Buf {
        self.buf(1, 0xff)
    }

    fn status_of(&self, b: Buf) -> u8 {
        self.bytes(b)[0]
    }

    /// Waits (bounded) for the used entry of `tag` on queue `q`.
    fn complete(&mut self, q: usize, tag: usize) -> Completion {
        let mem = self.dev.mem().clone();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(c) = self.dev.queue(q).pop(&mem).unwrap() {
                assert_eq!(c.tag, tag, "completion of another request");
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "queue {q}: no completion within {WAIT:?}\n{}",
                self.blk.proc.log_text()
            );
            self.dev
                .wait(Duration::ZERO, Duration::from_millis(100))
                .unwrap();
        }
    }

    fn next_tag(&mut self) -> usize {
        self.tag += 1;
        self.tag
    }

    /// Posts `raw` on queue `q` as it is; returns its used length.
    fn raw(&mut self, q: usize, raw: &[RawDesc]) -> u32 {
        let (mem, tag) = (self.dev.mem().clone(), self.next_tag());
        self.dev.queue(q).post_raw(&mem, raw, tag).unwrap();
        self.dev.publish(q).unwrap();
        self.complete(q, tag).used_len
    }

    /// Posts the buffers as one chain (`true`: device-writable); returns
    /// its used length.
    fn chain(&mut self, q: usize, bufs: &[(Buf, bool)]) -> u32 {
        let (mem, tag) = (self.dev.mem().clone(), self.next_tag());
        self.dev.queue(q).post_chain(&mem, bufs, tag).unwrap();
        self.dev.publish(q).unwrap();
        self.complete(q, tag).used_len
    }

    /// A request as Linux lays it out: (status, used length).
    fn request(&mut self, q: usize, kind: u32, sector: u64, data: &[(Buf, bool)]) -> (u8, u32) {
        let (header, status) = (self.buf(16, 0), self.buf(1, 0));
        let req = BlkRequest {
            kind,
            sector,
            header,
            data: data.to_vec(),
            status,
        };
        let (mem, tag) = (self.dev.mem().clone(), self.next_tag());
        self.dev.queue(q).post(&mem, &req, tag).unwrap();
        self.dev.publish(q).unwrap();
        let used = self.complete(q, tag).used_len;
        (self.status_of(status), used)
    }

    fn write(&mut self, q: usize, sector: u64, bytes: &[u8]) -> (u8, u32) {
        let data = self.buf_with(bytes);
        self.request(q, VIRTIO_BLK_T_OUT, sector, &[(data, false)])
    }

    /// Reads `len` bytes into a buffer first filled with 0x5a.
    fn read(&mut self, q: usize, sector: u64, len: u32) -> (u8, u32, Vec<u8>) {
        let data = self.buf(len, 0x5a);
        let (status, used) = self.request(q, VIRTIO_BLK_T_IN, sector, &[(data, true)]);
        (status, used, self.bytes(data))
    }

    /// What the disk holds (read through the device, which must succeed).
    fn disk(&mut self, sector: u64, len: u32) -> Vec<u8> {
        let (status, used, data) = self.read(0, sector, len);
        assert_eq!((status, used), (VIRTIO_BLK_S_OK, len + 1), "read back");
        data
    }

    /// Writes `pattern(tag)` at `sector` (must succeed); returns it.
    fn fill(&mut self, sector: u64, len: u32, tag: u64) -> Vec<u8> {
        let bytes = pattern(sector, tag, len as usize);
        assert_eq!(self.write(0, sector, &bytes), (VIRTIO_BLK_S_OK, 1));
        bytes
    }

    /// A DISCARD or WRITE_ZEROES with these segments: (status, used length).
    fn ranges(&mut self, kind: u32, list: &[(u64, u32, u32)]) -> (u8, u32) {
        let data = self.buf_with(&segments(list));
        self.request(0, kind, 0, &[(data, false)])
    }

    /// Queue `q` still serves: a read and a FLUSH complete OK.
    fn assert_serving(&mut self, q: usize) {
        let (status, used, _) = self.read(q, 0, 512);
        assert_eq!(
            (status, used),
            (VIRTIO_BLK_S_OK, 513),
            "queue {q} still reads"
        );
        assert_eq!(
            self.request(q, VIRTIO_BLK_T_FLUSH, 0, &[]),
            (VIRTIO_BLK_S_OK, 1),
            "queue {q} still flushes"
        );
        assert!(
            self.blk.proc.child.try_wait().unwrap().is_none(),
            "the backend died:\n{}",
            self.blk.proc.log_text()
        );
    }

    fn config_bytes(&mut self, offset: u32, len: u32) -> Vec<u8> {
        self.dev.connection().read_config(offset, len).unwrap()
    }
}

// ---- features and config space ----

#[test]
fn features_offered_match_a_writable_file_and_omit_access_platform() {
    let vm = Vm::image("feat", IMAGE, &[]);
    let expected = bits(&[
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        PROTOCOL_FEATURES,
        VIRTIO_F_VERSION_1,
    ]);
    let offered = vm.dev.offered_features();
    assert_eq!(offered, expected, "offered {offered:#x}");
    assert_eq!(offered & bits(&[VIRTIO_F_ACCESS_PLATFORM]), 0);
    assert_eq!(offered & bits(&[VIRTIO_BLK_F_RO]), 0);
    assert_eq!(
        vm.dev.acked_features(),
        expected,
        "a Linux driver takes them all"
    );
}

#[test]
fn read_only_disk_offers_ro_and_neither_discard_nor_write_zeroes() {
    let vm = Vm::image("feat-ro", IMAGE, &["--read-only"]);
    let offered = vm.dev.offered_features();
    assert_ne!(offered & bits(&[VIRTIO_BLK_F_RO]), 0, "{offered:#x}");
    assert_eq!(
        offered & bits(&[VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]),
        0
    );
    assert_ne!(offered & bits(&[VIRTIO_BLK_F_FLUSH]), 0);
    assert_eq!(offered & bits(&[VIRTIO_F_ACCESS_PLATFORM]), 0);
}

#[test]
fn config_space_describes_the_image_and_the_options() {
    let dir = Scratch::new("cfg");
    // A partial sector at the end is not exposed.
    let img = dir.image("disk.img", IMAGE + 100);
    let args = [
        "--blk-file",
        img.to_str().unwrap(),
        "--num-queues",
        "3",
        "--queue-size",
        "128",
    ];
    let mut vm = Vm::start(dir, &args, 3, 128);
    assert_eq!(
        vm.dev.config(),
        BlkConfig {
            capacity: IMAGE / 512,
            seg_max: 126,
            blk_size: 512,
            num_queues: 3,
            writeback: 1,
        }
    );
    assert_eq!(vm.dev.queue_count(), 3);
    let c = vm.config_bytes(0, 60);
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes(c[o..o + 2].try_into().unwrap());
    assert_eq!(u32_at(8), 4 << 20, "size_max");
    assert_eq!(&c[16..20], &[0; 4], "geometry (not offered)");
    assert_eq!(
        (c[24], c[25], u16_at(26), u32_at(28)),
        (0, 0, 1, 0),
        "topology"
    );
    assert_eq!(c[33], 0, "unused0");
    assert_eq!(u32_at(36), 1 << 22, "max_discard_sectors");
    assert_eq!(u32_at(40), 256, "max_discard_seg");
    assert_eq!(u32_at(44), 1, "discard_sector_alignment");
    assert_eq!(u32_at(48), 1 << 22, "max_write_zeroes_sectors");
    assert_eq!(u32_at(52), 256, "max_write_zeroes_seg");
    assert_eq!(&c[57..60], &[0; 3], "unused1");
}

#[test]
fn writeback_off_starts_with_writeback_zero() {
    let vm = Vm::image("cfg-wt", IMAGE, &["--writeback", "off"]);
    assert_eq!(vm.dev.config().writeback, 0);
}

#[test]
fn driver_flips_writeback_with_set_config_and_get_config_shows_it() {
    let mut vm = Vm::image("cfg-wce", IMAGE, &[]);
    assert_ne!(
        vm.dev.acked_features() & bits(&[VIRTIO_BLK_F_CONFIG_WCE]),
        0
    );
    assert_eq!(vm.config_bytes(32, 1), [1]);
    vm.dev.connection().write_config(32, &[0]).unwrap();
    assert_eq!(vm.config_bytes(32, 1), [0]);
    // Writes go through in write-through mode too.
    let bytes = vm.fill(16, 4096, 1);
    assert_eq!(vm.disk(16, 4096), bytes);
    vm.dev.connection().write_config(32, &[1]).unwrap();
    assert_eq!(vm.config_bytes(32, 1), [1]);
    let bytes = vm.fill(16, 4096, 2);
    assert_eq!(vm.disk(16, 4096), bytes);
}

#[test]
fn config_writes_to_other_fields_change_nothing_and_keep_the_connection() {
    let mut vm = Vm::image("cfg-ro", IMAGE, &[]);
    let before = vm.config_bytes(0, 60);
    let writes: [(u32, &[u8]); 9] = [
        (0, &[0xff; 8]),      // capacity
        (12, &[1, 0, 0, 0]),  // seg_max
        (20, &[0, 16, 0, 0]), // blk_size
        (33, &[1]),           // unused0
        (34, &[7, 0]),        // num_queues
        (32, &[0, 0]),        // writeback with the byte after it
        (32, &[2]),           // writeback, not 0 or 1
        (56, &[1]),           // write_zeroes_may_unmap
        (58, &[0; 4]),        // past the end
    ];
    for (offset, bytes) in writes {
        vm.dev.connection().write_config(offset, bytes).unwrap();
        assert_eq!(
            vm.config_bytes(0, 60),
            before,
            "after writing {bytes:?} at {offset}"
        );
    }
    vm.assert_serving(0);
}

#[test]
fn get_config_past_byte_60_reads_zeros() {
    let mut vm = Vm::image("cfg-past", IMAGE, &[]);
    let image = vm.config_bytes(0, 60);
    let straddling = vm.config_bytes(56, 16);
    assert_eq!(&straddling[..4], &image[56..60]);
    assert_eq!(&straddling[4..], &[0; 12]);
    assert_eq!(vm.config_bytes(60, 4), [0; 4]);
    assert_eq!(vm.config_bytes(200, 64), [0; 64]);
}

// ---- request types ----

#[test]
fn write_then_read_round_trips_with_exact_used_lengths() {
    let mut vm = Vm::image("rw", IMAGE, &[]);
    let bytes = pattern(8, 1, 4096);
    assert_eq!(vm.write(0, 8, &bytes), (VIRTIO_BLK_S_OK, 1));
    let (status, used, got) = vm.read(0, 8, 4096);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 4097));
    assert_eq!(got, bytes);
    // Data spread over several descriptors, both ways.
    let bytes = pattern(64, 2, 4096);
    let (a, b) = (vm.buf_with(&bytes[..1024]), vm.buf_with(&bytes[1024..]));
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_OUT, 64, &[(a, false), (b, false)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    let parts = [vm.buf(512, 0), vm.buf(2048, 0), vm.buf(1536, 0)];
    let data: Vec<(Buf, bool)> = parts.iter().map(|&p| (p, true)).collect();
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_IN, 64, &data),
        (VIRTIO_BLK_S_OK, 4097)
    );
    let got: Vec<u8> = parts.iter().flat_map(|&p| vm.bytes(p)).collect();
    assert_eq!(got, bytes);
    // The last sector of the disk.
    let last = IMAGE / 512 - 1;
    let bytes = vm.fill(last, 512, 3);
    assert_eq!(vm.disk(last, 512), bytes);
    // And the image file really holds what was written.
    let file = std::fs::read(vm.image_path()).unwrap();
    assert_eq!(&file[8 * 512..8 * 512 + 4096], &pattern(8, 1, 4096)[..]);
}

#[test]
fn zero_length_read_and_write_complete_ok() {
    let mut vm = Vm::image("rw-zero", IMAGE, &[]);
    assert_eq!(vm.request(0, VIRTIO_BLK_T_IN, 8, &[]), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_OUT, 8, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
}

#[test]
fn flush_completes_ok_with_used_length_1() {
    let mut vm = Vm::image("flush", IMAGE, &[]);
    vm.fill(0, 4096, 1);
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_FLUSH, 0, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
}

#[test]
fn get_id_returns_the_serial_padded_to_20_bytes() {
    let mut vm = Vm::image("getid", IMAGE, &[]);
    let mut id = [0u8; 20];
    id[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    let exact = vm.buf(20, 0xee);
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_GET_ID, 0, &[(exact, true)]),
        (VIRTIO_BLK_S_OK, 21)
    );
    assert_eq!(vm.bytes(exact), id);
    // A larger buffer gets 20 bytes; the rest is left alone.
    let large = vm.buf(512, 0xee);
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_GET_ID, 0, &[(large, true)]),
        (VIRTIO_BLK_S_OK, 21)
    );
    let got = vm.bytes(large);
    assert_eq!(&got[..20], &id);
    assert!(got[20..].iter().all(|&b| b == 0xee));
}

#[test]
fn get_id_into_a_short_buffer_fills_only_that_many_bytes() {
    let mut vm = Vm::image("getid-short", IMAGE, &[]);
    let area = vm.buf(32, 0xee);
    let short = Buf { len: 7, ..area };
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_GET_ID, 0, &[(short, true)]),
        (VIRTIO_BLK_S_OK, 8)
    );
    let got = vm.bytes(area);
    assert_eq!(&got[..7], &SERIAL.as_bytes()[..7]);
    assert!(got[7..].iter().all(|&b| b == 0xee), "{got:?}");
    // No room at all is a malformed GET_ID.
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_GET_ID, 0, &[]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
}

#[test]
fn get_id_of_a_20_byte_serial_has_no_terminator() {
    let dir = Scratch::new("getid-20");
    let img = dir.image("disk.img", IMAGE);
    let serial = "ABCDEFGHIJKLMNOPQRST";
    let mut vm = Vm::start(
        dir,
        &["--blk-file", img.to_str().unwrap(), "--serial", serial],
        1,
        256,
    );
    let id = vm.buf(24, 0xee);
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_GET_ID, 0, &[(id, true)]),
        (VIRTIO_BLK_S_OK, 21)
    );
    let got = vm.bytes(id);
    assert_eq!(&got[..20], serial.as_bytes());
    assert_eq!(&got[20..], &[0xee; 4]);
}

#[test]
fn discard_makes_the_range_read_back_as_zeros() {
    let mut vm = Vm::image("discard", IMAGE, &[]);
    let bytes = vm.fill(0, 16384, 1);
    // Sectors 8..16 and 24..32: two segments.
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_DISCARD, &[(8, 8, 0), (24, 8, 0)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    let got = vm.disk(0, 16384);
    for (i, chunk) in got.chunks(4096).enumerate() {
        if i % 2 == 1 {
            assert!(chunk.iter().all(|&b| b == 0), "4 KiB block {i} discarded");
        } else {
            assert_eq!(chunk, &bytes[i * 4096..(i + 1) * 4096], "block {i} kept");
        }
    }
}

#[test]
fn write_zeroes_makes_the_range_read_back_as_zeros() {
    let mut vm = Vm::image("wzeroes", IMAGE, &[]);
    let bytes = vm.fill(0, 16384, 1);
    // Without and with the unmap flag; a 0-sector segment does nothing.
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(1, 7, 0), (100, 0, 0)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(16, 8, FLAG_UNMAP)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    let got = vm.disk(0, 16384);
    let mut want = bytes;
    want[512..4096].fill(0);
    want[8192..12288].fill(0);
    assert_eq!(got, want);
}

#[test]
fn segment_flags_the_request_does_not_define_are_unsupp_and_change_nothing() {
    let mut vm = Vm::image("seg-flags", IMAGE, &[]);
    let bytes = vm.fill(0, 8192, 1);
    // DISCARD defines no flag (unmap included); WRITE_ZEROES only unmap.
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 8, FLAG_UNMAP)]),
        (VIRTIO_BLK_S_UNSUPP, 1)
    );
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0), (8, 8, 2)]),
        (VIRTIO_BLK_S_UNSUPP, 1)
    );
    assert_eq!(vm.disk(0, 8192), bytes);
}

#[test]
fn unknown_request_type_is_unsupp_with_used_length_1() {
    let mut vm = Vm::image("unknown", IMAGE, &[]);
    assert_eq!(vm.request(0, 77, 0, &[]), (VIRTIO_BLK_S_UNSUPP, 1));
    let data = vm.buf(512, 0xee);
    assert_eq!(
        vm.request(0, 77, 0, &[(data, true)]),
        (VIRTIO_BLK_S_UNSUPP, 1)
    );
    assert_eq!(vm.bytes(data), vec![0xee; 512], "nothing written");
    vm.assert_serving(0);
}

// ---- bounds ----

#[test]
fn transfers_past_the_capacity_are_ioerr_and_write_nothing() {
    let mut vm = Vm::image("bounds-cap", IMAGE, &[]);
    let capacity = IMAGE / 512;
    let last = vm.fill(capacity - 1, 512, 1);
    for (sector, len) in [(capacity, 512), (capacity - 1, 1024), (capacity + 8, 4096)] {
        let (status, used, got) = vm.read(0, sector, len);
        assert_eq!((status, used), (VIRTIO_BLK_S_IOERR, 1), "IN {sector}+{len}");
        assert!(
            got.iter().all(|&b| b == 0x5a),
            "IN {sector}+{len} wrote data"
        );
        let bytes = pattern(sector, 9, len as usize);
        assert_eq!(
            vm.write(0, sector, &bytes),
            (VIRTIO_BLK_S_IOERR, 1),
            "OUT {sector}+{len}"
        );
    }
    assert_eq!(vm.disk(capacity - 1, 512), last);
    assert_eq!(
        std::fs::metadata(vm.image_path()).unwrap().len(),
        IMAGE,
        "the image did not grow"
    );
    // Segments past the end.
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_DISCARD, &[(capacity - 1, 8, 0)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(capacity - 1, 8, 0)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(vm.disk(capacity - 1, 512), last);
}

#[test]
fn data_length_not_a_multiple_of_512_is_ioerr_and_writes_nothing() {
    let mut vm = Vm::image("bounds-len", IMAGE, &[]);
    let bytes = vm.fill(0, 4096, 1);
    for len in [1u32, 511, 513, 1000, 4095] {
        let (status, used, got) = vm.read(0, 0, len);
        assert_eq!((status, used), (VIRTIO_BLK_S_IOERR, 1), "IN of {len}");
        assert!(got.iter().all(|&b| b == 0x5a), "IN of {len} wrote data");
        let junk = vec![0xcc; len as usize];
        assert_eq!(
            vm.write(0, 0, &junk),
            (VIRTIO_BLK_S_IOERR, 1),
            "OUT of {len}"
        );
    }
    assert_eq!(vm.disk(0, 4096), bytes);
}

#[test]
fn sector_whose_byte_offset_overflows_is_ioerr() {
    let mut vm = Vm::image("bounds-ovf", IMAGE, &[]);
    let bytes = vm.fill(0, 4096, 1);
    for sector in [u64::MAX / 512, u64::MAX / 512 + 1, 1 << 63, u64::MAX] {
        let (status, used, _) = vm.read(0, sector, 512);
        assert_eq!((status, used), (VIRTIO_BLK_S_IOERR, 1), "IN at {sector:#x}");
        assert_eq!(
            vm.write(0, sector, &[0xcc; 512]),
            (VIRTIO_BLK_S_IOERR, 1),
            "OUT at {sector:#x}"
        );
    }
    assert_eq!(vm.disk(0, 4096), bytes);
    vm.assert_serving(0);
}

// ---- read-only disk ----

#[test]
fn read_only_disk_refuses_every_write_and_keeps_its_data() {
    let dir = Scratch::new("ro");
    let img = dir.path("disk.img");
    let content = pattern(0, 1, IMAGE as usize);
    std::fs::write(&img, &content).unwrap();
    let mut vm = Vm::start(
        dir,
        &["--blk-file", img.to_str().unwrap(), "--read-only"],
        1,
        256,
    );
    assert_eq!(vm.disk(0, 8192), &content[..8192]);
    assert_eq!(
        vm.write(0, 0, &[0xcc; 4096]),
        (VIRTIO_BLK_S_IOERR, 1),
        "OUT"
    );
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_OUT, 0, &[]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // DISCARD and WRITE_ZEROES are not offered on a read-only disk, so
    // the driver cannot negotiate them: plan.rs answers UNSUPP for a
    // request whose feature was not negotiated.
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        assert_eq!(
            vm.ranges(kind, &[(0, 16, 0)]),
            (VIRTIO_BLK_S_UNSUPP, 1),
            "type {kind}"
        );
    }
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_FLUSH, 0, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(vm.disk(0, 8192), &content[..8192]);
    assert_eq!(std::fs::read(vm.image_path()).unwrap(), content);
}

// ---- multiqueue ----

#[test]
fn requests_on_every_one_of_four_queues_complete() {
    let dir = Scratch::new("mq");
    let img = dir.image("disk.img", IMAGE);
    let args = ["--blk-file", img.to_str().unwrap(), "--num-queues", "4"];
    let mut vm = Vm::start(dir, &args, 4, 256);
    assert_eq!(vm.dev.config().num_queues, 4);
    assert_eq!(vm.dev.queue_count(), 4);
    for q in 0..4 {
        let sector = 8 * q as u64;
        let bytes = pattern(sector, 1, 4096);
        assert_eq!(
            vm.write(q, sector, &bytes),
            (VIRTIO_BLK_S_OK, 1),
            "queue {q}"
        );
        let (status, used, got) = vm.read(q, sector, 4096);
        assert_eq!((status, used), (VIRTIO_BLK_S_OK, 4097), "queue {q}");
        assert_eq!(got, bytes, "queue {q}");
    }
    // All four at once, 16 requests each.
    let mem = vm.dev.mem().clone();
    let mut posted = Vec::new();
    for q in 0..4 {
        for i in 0..16u64 {
            let data = vm.buf(4096, 0);
            let req = BlkRequest {
                kind: VIRTIO_BLK_T_IN,
                sector: 8 * i,
                header: vm.buf(16, 0),
                data: vec![(data, true)],
                status: vm.buf(1, 0),
            };
            let tag = vm.next_tag();
            vm.dev.queue(q).post(&mem, &req, tag).unwrap();
            posted.push((q, tag, req.status));
        }
        vm.dev.publish(q).unwrap();
    }
    let deadline = Instant::now() + WAIT;
    let mut done = std::collections::HashSet::new();
    while done.len() < posted.len() {
        for q in 0..4 {
            while let Some(c) = vm.dev.queue(q).pop(&mem).unwrap() {
                assert_eq!(c.used_len, 4097);
                assert!(posted.iter().any(|&(pq, t, _)| pq == q && t == c.tag));
                done.insert(c.tag);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} done",
            done.len(),
            posted.len()
        );
        if done.len() < posted.len() {
            vm.dev
                .wait(Duration::ZERO, Duration::from_millis(100))
                .unwrap();
        }
    }
    for &(_, _, status) in &posted {
        assert_eq!(vm.status_of(status), VIRTIO_BLK_S_OK);
    }
}

// ---- hostile and odd chains ----

#[test]
fn header_split_1_and_15_is_a_normal_request() {
    let mut vm = Vm::image("split-1-15", IMAGE, &[]);
    let bytes = pattern(8, 1, 4096);
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (data, status) = (vm.buf_with(&bytes), vm.status());
    let first = Buf { len: 1, ..header };
    let rest = Buf {
        dev: header.dev + 1,
        gpa: header.gpa + 1,
        len: 15,
    };
    let used = vm.chain(
        0,
        &[(first, false), (rest, false), (data, false), (status, true)],
    );
    assert_eq!((vm.status_of(status), used), (VIRTIO_BLK_S_OK, 1));
    // Reading it back with the same split.
    let header = vm.header(VIRTIO_BLK_T_IN, 8);
    let (data, status) = (vm.buf(4096, 0), vm.status());
    let first = Buf { len: 1, ..header };
    let rest = Buf {
        dev: header.dev + 1,
        gpa: header.gpa + 1,
        len: 15,
    };
    let used = vm.chain(
        0,
        &[(first, false), (rest, false), (data, true), (status, true)],
    );
    assert_eq!((vm.status_of(status), used), (VIRTIO_BLK_S_OK, 4097));
    assert_eq!(vm.bytes(data), bytes);
    vm.assert_serving(0);
}

#[test]
fn header_in_one_descriptor_per_byte_is_a_normal_request() {
    let mut vm = Vm::image("split-16", IMAGE, &[]);
    let bytes = vm.fill(8, 512, 1);
    let header = vm.header(VIRTIO_BLK_T_IN, 8);
    let (data, status) = (vm.buf(512, 0), vm.status());
    let mut bufs: Vec<(Buf, bool)> = (0..16)
        .map(|i| {
            let b = Buf {
                dev: header.dev + i,
                gpa: header.gpa + i,
                len: 1,
            };
            (b, false)
        })
        .collect();
    bufs.extend([(data, true), (status, true)]);
    let used = vm.chain(0, &bufs);
    assert_eq!((vm.status_of(status), used), (VIRTIO_BLK_S_OK, 513));
    assert_eq!(vm.bytes(data), bytes);
    vm.assert_serving(0);
}

#[test]
fn status_sharing_the_last_data_descriptor_is_a_normal_request() {
    let mut vm = Vm::image("status-shared", IMAGE, &[]);
    let bytes = vm.fill(8, 512, 1);
    let header = vm.header(VIRTIO_BLK_T_IN, 8);
    let area = vm.buf(513, 0xff);
    let used = vm.chain(0, &[(header, false), (area, true)]);
    let got = vm.bytes(area);
    assert_eq!((got[512], used), (VIRTIO_BLK_S_OK, 513));
    assert_eq!(&got[..512], &bytes[..]);
    vm.assert_serving(0);
}

#[test]
fn readable_descriptor_after_a_writable_one_is_refused_and_writes_nothing() {
    let mut vm = Vm::image("order", IMAGE, &[]);
    let bytes = vm.fill(8, 512, 1);
    // Ending in a writable byte: IOERR there, used length 1.
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (junk, data, status) = (vm.buf(512, 0xee), vm.buf(512, 0xcc), vm.status());
    let used = vm.chain(
        0,
        &[(header, false), (junk, true), (data, false), (status, true)],
    );
    assert_eq!((vm.status_of(status), used), (VIRTIO_BLK_S_IOERR, 1));
    assert_eq!(vm.bytes(junk), vec![0xee; 512], "writable data untouched");
    vm.assert_serving(0);
    // Ending in a readable descriptor: no status byte, used length 0.
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (status, data) = (vm.status(), vm.buf(512, 0xcc));
    let used = vm.chain(0, &[(header, false), (status, true), (data, false)]);
    assert_eq!((vm.status_of(status), used), (0xff, 0));
    vm.assert_serving(0);
    assert_eq!(vm.disk(8, 512), bytes, "nothing written");
}

#[test]
fn chain_without_a_writable_byte_gets_used_length_0_and_writes_nothing() {
    let mut vm = Vm::image("no-status", IMAGE, &[]);
    let bytes = vm.fill(8, 512, 1);
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let data = vm.buf(512, 0xcc);
    assert_eq!(vm.chain(0, &[(header, false), (data, false)]), 0);
    vm.assert_serving(0);
    // A zero-length writable descriptor is no status byte either.
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (data, empty) = (vm.buf(512, 0xcc), vm.buf(0, 0));
    assert_eq!(
        vm.chain(0, &[(header, false), (data, false), (empty, true)]),
        0
    );
    vm.assert_serving(0);
    // A header alone.
    let header = vm.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(vm.chain(0, &[(header, false)]), 0);
    vm.assert_serving(0);
    assert_eq!(vm.disk(8, 512), bytes, "nothing written");
}

#[test]
fn short_header_is_ioerr_and_writes_nothing() {
    let mut vm = Vm::image("short-hdr", IMAGE, &[]);
    let bytes = vm.fill(0, 512, 1);
    let header = vm.header(VIRTIO_BLK_T_OUT, 0);
    let short = Buf { len: 15, ..header };
    let status = vm.status();
    assert_eq!(vm.chain(0, &[(short, false), (status, true)]), 1);
    assert_eq!(vm.status_of(status), VIRTIO_BLK_S_IOERR);
    vm.assert_serving(0);
    assert_eq!(vm.disk(0, 512), bytes);
}

#[test]
fn zero_length_data_descriptors_are_ignored() {
    let mut vm = Vm::image("zero-desc", IMAGE, &[]);
    let bytes = pattern(8, 1, 512);
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (empty, data, status) = (vm.buf(0, 0), vm.buf_with(&bytes), vm.status());
    let used = vm.chain(
        0,
        &[
            (header, false),
            (empty, false),
            (data, false),
            (empty, false),
            (status, true),
        ],
    );
    assert_eq!((vm.status_of(status), used), (VIRTIO_BLK_S_OK, 1));
    let header = vm.header(VIRTIO_BLK_T_IN, 8);
    let (data, status) = (vm.buf(512, 0), vm.status());
    let used = vm.chain(
        0,
        &[
            (header, false),
            (empty, true),
            (data, true),
            (empty, true),
            (status, true),
        ],
    );
    assert_eq!((vm.status_of(status), used), (VIRTIO_BLK_S_OK, 513));
    assert_eq!(vm.bytes(data), bytes);
    // A zero-length descriptor as the only data: a zero-length read.
    let header = vm.header(VIRTIO_BLK_T_IN, 8);
    let status = vm.status();
    let used = vm.chain(0, &[(header, false), (empty, true), (status, true)]);
    assert_eq!((vm.status_of(status), used), (VIRTIO_BLK_S_OK, 1));
    vm.assert_serving(0);
}

#[test]
fn data_outside_guest_ram_is_ioerr_and_the_queue_keeps_serving() {
    let mut vm = Vm::image("outside", IMAGE, &[]);
    let bytes = vm.fill(8, 4096, 1);
    let outside = Buf {
        dev: OUTSIDE_RAM,
        gpa: OUTSIDE_RAM,
        len: 4096,
    };
    let straddling = Buf {
        dev: RAM - 2048,
        gpa: RAM - 2048,
        len: 4096,
    };
    for data in [outside, straddling] {
        for (kind, writable) in [(VIRTIO_BLK_T_OUT, false), (VIRTIO_BLK_T_IN, true)] {
            assert_eq!(
                vm.request(0, kind, 8, &[(data, writable)]),
                (VIRTIO_BLK_S_IOERR, 1),
                "type {kind} with data at {:#x}",
                data.dev
            );
            vm.assert_serving(0);
        }
    }
    // One good piece and one outside RAM: nothing of it is done.
    let good = vm.buf(2048, 0xcc);
    let far = Buf {
        len: 2048,
        ..outside
    };
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_OUT, 8, &[(good, false), (far, false)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // The header outside RAM.
    let status = vm.status();
    let header = Buf { len: 16, ..outside };
    assert_eq!(vm.chain(0, &[(header, false), (status, true)]), 1);
    assert_eq!(vm.status_of(status), VIRTIO_BLK_S_IOERR);
    vm.assert_serving(0);
    // GET_ID into memory outside RAM.
    let id = Buf { len: 20, ..outside };
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_GET_ID, 0, &[(id, true)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // The status byte outside RAM: nothing can be written, used length 0.
    let header = vm.header(VIRTIO_BLK_T_FLUSH, 0);
    let status = Buf { len: 1, ..outside };
    assert_eq!(vm.chain(0, &[(header, false), (status, true)]), 0);
    vm.assert_serving(0);
    assert_eq!(vm.disk(8, 4096), bytes, "nothing written");
}

#[test]
fn looping_chain_gets_used_length_0_and_the_queue_keeps_serving() {
    let mut vm = Vm::image("loop", IMAGE, &[]);
    let bytes = vm.fill(8, 512, 1);
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (data, status) = (vm.buf(512, 0xcc), vm.status());
    // The last descriptor points at itself.
    let raw = [
        desc(header, false, Some(1)),
        desc(data, false, Some(2)),
        desc(status, true, Some(2)),
    ];
    assert_eq!(vm.raw(0, &raw), 0);
    assert_eq!(vm.status_of(status), 0xff, "no status written");
    vm.assert_serving(0);
    // The last descriptor points back at the head.
    let raw = [
        desc(header, false, Some(1)),
        desc(data, false, Some(2)),
        desc(status, true, Some(0)),
    ];
    assert_eq!(vm.raw(0, &raw), 0);
    assert_eq!(vm.status_of(status), 0xff, "no status written");
    vm.assert_serving(0);
    assert_eq!(vm.disk(8, 512), bytes, "nothing written");
}

#[test]
fn next_index_out_of_range_gets_used_length_0_and_the_queue_keeps_serving() {
    let mut vm = Vm::image("bad-next", IMAGE, &[]);
    let bytes = vm.fill(8, 512, 1);
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (data, status) = (vm.buf(512, 0xcc), vm.status());
    for next in [256, 1000, usize::from(u16::MAX)] {
        let raw = [
            desc(header, false, Some(1)),
            desc(data, false, Some(next)),
            desc(status, true, None),
        ];
        assert_eq!(vm.raw(0, &raw), 0, "next {next}");
        assert_eq!(vm.status_of(status), 0xff, "no status written");
        vm.assert_serving(0);
    }
    assert_eq!(vm.disk(8, 512), bytes, "nothing written");
}

/// Writes an indirect table of (buffer, flags, next) entries to guest RAM.
fn indirect_table(vm: &mut Vm, entries: &[(u64, u32, u16, u16)]) -> Buf {
    let mut table = Vec::new();
    for &(addr, len, flags, next) in entries {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&next.to_le_bytes());
    }
    vm.buf_with(&table)
}

/// The one descriptor that points at an indirect table.
fn indirect(table: Buf) -> RawDesc {
    RawDesc {
        addr: table.dev,
        len: table.len,
        flags: VRING_DESC_F_INDIRECT,
        next: None,
    }
}

#[test]
fn indirect_table_works_like_a_direct_chain() {
    let mut vm = Vm::image("indirect", IMAGE, &[]);
    let (n, w) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE);
    let bytes = pattern(8, 1, 4096);
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (data, status) = (vm.buf_with(&bytes), vm.status());
    let table = indirect_table(
        &mut vm,
        &[
            (header.dev, 16, n, 1),
            (data.dev, 4096, n, 2),
            (status.dev, 1, w, 0),
        ],
    );
    assert_eq!(vm.raw(0, &[indirect(table)]), 1);
    assert_eq!(vm.status_of(status), VIRTIO_BLK_S_OK);
    // A read through a table whose entries are not in index order.
    let header = vm.header(VIRTIO_BLK_T_IN, 8);
    let (first, second, status) = (vm.buf(1024, 0), vm.buf(3072, 0), vm.status());
    let table = indirect_table(
        &mut vm,
        &[
            (header.dev, 16, n, 3),
            (status.dev, 1, w, 0),
            (second.dev, 3072, w | n, 1),
            (first.dev, 1024, w | n, 2),
        ],
    );
    assert_eq!(vm.raw(0, &[indirect(table)]), 4097);
    assert_eq!(vm.status_of(status), VIRTIO_BLK_S_OK);
    let mut got = vm.bytes(first);
    got.extend(vm.bytes(second));
    assert_eq!(got, bytes);
    vm.assert_serving(0);
}

#[test]
fn malformed_indirect_descriptors_get_used_length_0_and_the_queue_keeps_serving() {
    let mut vm = Vm::image("indirect-bad", IMAGE, &[]);
    let (n, w, i) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT);
    let bytes = vm.fill(8, 512, 1);
    let header = vm.header(VIRTIO_BLK_T_OUT, 8);
    let (data, status) = (vm.buf(512, 0xcc), vm.status());
    let good = indirect_table(
        &mut vm,
        &[
            (header.dev, 16, n, 1),
            (data.dev, 512, n, 2),
            (status.dev, 1, w, 0),
        ],
    );
    // An indirect descriptor inside an indirect table.
    let nested = indirect_table(
        &mut vm,
        &[(header.dev, 16, n, 1), (good.dev, good.len, i, 0)],
    );
    // A loop inside the table, and a next past its end.
    let looping = indirect_table(&mut vm, &[(header.dev, 16, n, 1), (data.dev, 512, n, 0)]);
    let past_end = indirect_table(&mut vm, &[(header.dev, 16, n, 1), (data.dev, 512, n, 7)]);
    let cases: [(&str, RawDesc); 6] = [
        ("nested indirect", indirect(nested)),
        ("loop in the table", indirect(looping)),
        ("next past the table", indirect(past_end)),
        (
            "length not a multiple of 16",
            indirect(Buf { len: 40, ..good }),
        ),
        (
            "table outside RAM",
            RawDesc {
                addr: OUTSIDE_RAM,
                ..indirect(good)
            },
        ),
        (
            "INDIRECT together with NEXT",
            RawDesc {
                next: Some(1),
                ..indirect(good)
            },
        ),
    ];
    for (what, head) in cases {
        let raw: Vec<RawDesc> = if head.next.is_some() {
            vec![head, desc(status, true, None)]
        } else {
            vec![head]
        };
        assert_eq!(vm.raw(0, &raw), 0, "{what}");
        assert_eq!(vm.status_of(status), 0xff, "{what}: no status written");
        vm.assert_serving(0);
    }
    assert_eq!(vm.disk(8, 512), bytes, "nothing written");
}

// ---- the null target ----

#[test]
fn null_target_answers_every_request_type_as_a_file_does() {
    let dir = Scratch::new("null");
    let mut vm = Vm::start(dir, &["--blk-file", "null:64M"], 1, 256);
    let capacity = (64u64 << 20) / 512;
    assert_eq!(vm.dev.config().capacity, capacity);
    let offered = vm.dev.offered_features();
    let both = bits(&[VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
    assert_eq!(offered & both, both, "{offered:#x}");
    assert_eq!(vm.write(0, 8, &pattern(8, 1, 4096)), (VIRTIO_BLK_S_OK, 1));
    let (status, used, _) = vm.read(0, 8, 4096);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 4097));
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_FLUSH, 0, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
    let id = vm.buf(20, 0xee);
    assert_eq!(
        vm.request(0, VIRTIO_BLK_T_GET_ID, 0, &[(id, true)]),
        (VIRTIO_BLK_S_OK, 21)
    );
    assert_eq!(&vm.bytes(id)[..SERIAL.len()], SERIAL.as_bytes());
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(
        vm.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, FLAG_UNMAP)]),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(vm.request(0, 77, 0, &[]), (VIRTIO_BLK_S_UNSUPP, 1));
    let (status, used, _) = vm.read(0, capacity, 512);
    assert_eq!((status, used), (VIRTIO_BLK_S_IOERR, 1), "past the end");
    assert_eq!(
        vm.write(0, 0, &[0; 100]),
        (VIRTIO_BLK_S_IOERR, 1),
        "not a multiple of 512"
    );
    vm.assert_serving(0);
}
