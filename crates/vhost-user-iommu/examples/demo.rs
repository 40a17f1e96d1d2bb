//! One-command demo: `cargo run --release -p vhost-user-iommu --example demo`.
//!
//! Starts the daemon (the real serving code, on real Unix sockets in a
//! temporary directory), a backend in a separate process that receives the
//! shared table over the backend socket, and a VMM/guest-driver stand-in
//! (`viommu-frontend`) that sends requests the way Linux does. It walks
//! through ATTACH → MAP → translate in the backend → UNMAP → the backend's
//! fault reaching the guest's event queue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iotlb_shm::{Access, BackendClient};
use vhost_user_iommu::settings::Settings;
use viommu_frontend::driver::{Driver, DriverOptions};
use virtio_iommu_proto::{Attach, Map, MapFlags, Request, Unmap};

const EP: u32 = 0x20; // PCI 00:04.0
const IOVA: u64 = 0xffff_e000;
const GPA: u64 = 0x0480_0000;

/// The backend process: connect, then answer one command per line.
fn backend(socket: &str) -> ! {
    let client =
        BackendClient::connect(Path::new(socket), 1, 4).expect("connect to the backend socket");
    println!("connected as reader {}", client.reader_id);
    let mut slot = client.slots.claim_slot().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let result = {
            let session = slot.enter(&client.table);
            session.translate_one(EP, IOVA + 0x123, Access::WRITE)
        };
        match (line.trim(), result) {
            ("translate", Ok(p)) if p.len > 1 << 32 => {
                println!(
                    "iova {:#x} -> gpa {:#x} (identity: bypass)",
                    IOVA + 0x123,
                    p.gpa
                )
            }
            ("translate", Ok(p)) => {
                println!(
                    "iova {:#x} -> gpa {:#x} ({} bytes to the end of the page)",
                    IOVA + 0x123,
                    p.gpa,
                    p.len
                )
            }
            ("translate", Err(f)) => println!("iova {:#x} -> {:?} fault", IOVA + 0x123, f.kind),
            ("report", Err(f)) => {
                client.report_fault(&f).unwrap();
                println!("reported the {:?} fault to the daemon", f.kind);
            }
            (other, r) => println!("? {other} {r:?}"),
        }
    }
    std::process::exit(0)
}

fn main() {
    if let Ok(socket) = std::env::var("VIOMMU_DEMO_BACKEND") {
        backend(&socket);
    }
    let dir = std::env::temp_dir().join(format!("viommu-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (vmm, backends) = (dir.join("vmm.sock"), dir.join("backends.sock"));
    let settings = Settings::from_args([
        "vhost-user-iommu".as_ref(),
        "--socket-path".as_ref(),
        vmm.as_os_str(),
        "--backend-socket".as_ref(),
        backends.as_os_str(),
        "--log-level".as_ref(),
        "warn".as_ref(),
        // The daemon runs inside this program, which goes on to spawn a
        // backend and play the VMM: a filter for the daemon's calls alone
        // would kill it (the daemon binary keeps its filter on).
        "--seccomp".as_ref(),
        "off".as_ref(),
    ])
    .unwrap();
    vhost_user_iommu::logging::init(&settings.log).unwrap();
    let listen = settings.listen.clone().unwrap();
    println!(
        "1. daemon: VMM socket {}, backend socket {}",
        vmm.display(),
        backends.display()
    );
    std::thread::spawn(move || vhost_user_iommu::serve::run(&settings, &listen));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(vmm.exists() && backends.exists()) {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("VIOMMU_DEMO_BACKEND", &backends)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_backend = child.stdin.take().unwrap();
    let mut from_backend = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    from_backend.read_line(&mut first).unwrap();
    println!("2. backend process {}: {}", child.id(), first.trim());
    let mut ask = |cmd: &str| {
        writeln!(to_backend, "{cmd}").unwrap();
        let mut s = String::new();
        from_backend.read_line(&mut s).unwrap();
        s.trim().to_string()
    };

    let mut drv = Driver::connect(
        &vmm,
        DriverOptions {
            ram_size: 256 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    drv.post_event_buffers(8, 24).unwrap();
    println!(
        "3. VMM connected, features {:#x} acked, 8 event buffers posted",
        drv.acked_features()
    );
    println!(
        "   backend before ATTACH (endpoint in bypass): {}",
        ask("translate")
    );

    let attach = Request::Attach(Attach {
        domain: 1,
        endpoint: EP,
        flags: 0,
        reserved: [0; 4],
    });
    let t = Instant::now();
    let out = drv.send_one(&attach).unwrap();
    println!(
        "4. ATTACH endpoint {EP:#x} to domain 1: {:?} in {:?}",
        out.status().unwrap(),
        t.elapsed()
    );
    println!("   backend: {}", ask("translate"));

    let map = Request::Map(Map {
        domain: 1,
        virt_start: IOVA,
        virt_end: IOVA + 0xfff,
        phys_start: GPA,
        flags: MapFlags::READ.union(MapFlags::WRITE),
    });
    let t = Instant::now();
    let out = drv.send_one(&map).unwrap();
    println!(
        "5. MAP {IOVA:#x}-{:#x} -> {GPA:#x} RW: {:?} in {:?}",
        IOVA + 0xfff,
        out.status().unwrap(),
        t.elapsed()
    );
    println!(
        "   backend (no message to the daemon): {}",
        ask("translate")
    );

    let unmap = Request::Unmap(Unmap {
        domain: 1,
        virt_start: IOVA,
        virt_end: IOVA + 0xfff,
        reserved: [0; 4],
    });
    let t = Instant::now();
    let out = drv.send_one(&unmap).unwrap();
    println!(
        "6. UNMAP: {:?} in {:?}, after a grace period covering the backend",
        out.status().unwrap(),
        t.elapsed()
    );
    println!("   backend: {}", ask("translate"));

    println!("7. backend: {}", ask("report"));
    let events = drv.take_events(Duration::from_secs(5)).unwrap();
    match events.first().and_then(|e| e.record) {
        Some(r) => println!(
            "8. guest event queue: fault record reason {:?}, endpoint {:#x}, address {:#x}, flags {:#x}",
            r.reason,
            r.endpoint,
            r.address.unwrap_or(0),
            r.access.0
        ),
        None => println!("8. guest event queue: no fault record arrived ({events:?})"),
    }
    drop(to_backend);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!("done.");
}
