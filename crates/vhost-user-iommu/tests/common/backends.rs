//! Backends in separate processes for the end-to-end tests: the real daemon
//! with a backend socket, a VMM stand-in (viommu-frontend's driver) on its
//! vhost-user socket, and backend processes that get the table over the
//! backend socket.
//!
//! A backend is the test binary re-executed with `VIOMMU_TEST_BACKEND` set
//! to the backend socket ([`run_backend_role_if_asked`] at the top of the
//! test's `main`). It connects, then obeys one command per stdin line and
//! answers on stdout. The guest's RAM, when the test passes it, is the
//! backend's descriptor 3.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::any::Any;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use iotlb_shm::backend_proto::{self, MAX_LEN, Message};
use iotlb_shm::{Access, BackendClient, Fault, FaultKind, SentinelSlot, Session};
use viommu_frontend::driver::{Driver, DriverOptions};
use virtio_iommu_proto::{Attach, Map, MapFlags, Request, Status, Unmap};

/// The endpoint the tests' backends serve.
pub const EP: u32 = 8;
const ROLE_ENV: &str = "VIOMMU_TEST_BACKEND";
/// The backend's descriptor of the guest's RAM, when the test passes it.
const GUEST_RAM_FD: RawFd = 3;

/// `CLOCK_MONOTONIC` in ns: the same clock in every process.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ------------------------------------------------------------ the daemon

/// The daemon with a backend socket, in a scratch directory; killed when
/// dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub vmm: PathBuf,
    pub backends: PathBuf,
    pub log: PathBuf,
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    viommu_test_support::scratch::dir("viommu-bs", name)
}

impl Daemon {
    /// Starts the daemon in a fresh scratch directory.
    pub fn start(name: &str, extra: &[&str]) -> Daemon {
        let dir = scratch(name);
        Daemon::start_in(
            &dir,
            env!("CARGO_BIN_EXE_vhost-user-iommu").as_ref(),
            None,
            extra,
        )
    }

    /// Starts `binary` in `dir` (as `uid` if given), with its sockets and
    /// log there; waits until both sockets exist.
    pub fn start_in(dir: &Path, binary: &Path, uid: Option<u32>, extra: &[&str]) -> Daemon {
        let (vmm, backends, log) = (
            dir.join("vmm.sock"),
            dir.join("backends.sock"),
            dir.join("daemon.log"),
        );
        let mut cmd = Command::new(binary);
        cmd.arg("--socket-path")
            .arg(&vmm)
            .arg("--backend-socket")
            .arg(&backends)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        Daemon::ready(cmd.spawn().unwrap(), dir)
    }

    /// The daemon `child` started in `dir` (its sockets and log named as
    /// [`Self::start_in`] names them), once both sockets exist.
    pub fn ready(mut child: Child, dir: &Path) -> Daemon {
        let (vmm, backends, log) = (
            dir.join("vmm.sock"),
            dir.join("backends.sock"),
            dir.join("daemon.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(vmm.exists() && backends.exists()) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "daemon exited: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "daemon did not create its sockets"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Daemon {
            child,
            dir: dir.to_path_buf(),
            vmm,
            backends,
            log,
        }
    }

    pub fn driver(&self) -> Driver {
        Driver::connect(
            &self.vmm,
            DriverOptions {
                ram_size: 64 << 20,
                ..DriverOptions::default()
            },
        )
        .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the daemon never logged {text:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------ requests

pub fn attach(domain: u32) -> Request {
    Request::Attach(Attach {
        domain,
        endpoint: EP,
        flags: Default::default(),
        reserved: Default::default(),
    })
}

pub fn map_range(domain: u32, iova: u64, len: u64, gpa: u64) -> Request {
    Request::Map(Map {
        domain,
        virt_start: iova,
        virt_end: iova + len - 1,
        phys_start: gpa,
        flags: MapFlags::READ.union(MapFlags::WRITE),
    })
}

pub fn map(domain: u32, iova: u64, gpa: u64) -> Request {
    map_range(domain, iova, 0x1000, gpa)
}

pub fn unmap_range(domain: u32, iova: u64, len: u64) -> Request {
    Request::Unmap(Unmap {
        domain,
        virt_start: iova,
        virt_end: iova + len - 1,
        reserved: [0; 4],
    })
}

pub fn unmap(domain: u32, iova: u64) -> Request {
    unmap_range(domain, iova, 0x1000)
}

pub fn ok(d: &mut Driver, r: Request) {
    assert_eq!(d.send_one(&r).unwrap().status(), Some(Status::Ok), "{r:?}");
}

/// Sends `req` on another thread and returns the driver and whether it
/// completed within `wait`; if not, calls `meanwhile` and then waits up to
/// 10 s more. Returns (completed within `wait`, status).
pub fn request_racing(
    drv: &mut Driver,
    req: Request,
    wait: Duration,
    meanwhile: impl FnOnce(),
) -> (bool, Option<Status>) {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let _ = tx.send(drv.send_one(&req).map(|o| o.status()));
        });
        match rx.recv_timeout(wait) {
            Ok(status) => (true, status.unwrap()),
            Err(_) => {
                meanwhile();
                let status = rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the request never completed");
                (false, status.unwrap())
            }
        }
    })
}

// ------------------------------------------------------------ backend handle

/// A backend process.
pub struct Backend {
    pub child: Child,
    pub input: ChildStdin,
    pub output: BufReader<ChildStdout>,
}

impl Backend {
    /// Spawns a backend on `socket`, as `uid` if given.
    pub fn spawn(socket: &Path, uid: Option<u32>) -> Backend {
        Backend::spawn_with_ram(socket, uid, None)
    }

    /// Spawns a backend that also gets the guest's RAM (`ram`: the memfd
    /// behind the driver's memory) as its descriptor 3.
    pub fn spawn_with_ram(socket: &Path, uid: Option<u32>, ram: Option<RawFd>) -> Backend {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(ROLE_ENV, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        if let Some(fd) = ram {
            // SAFETY: only fcntl and dup2 (async-signal-safe) run between
            // fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                    if high < 0 || libc::dup2(high, GUEST_RAM_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Backend {
            child,
            input,
            output,
        }
    }

    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.output.read_line(&mut s).unwrap();
        s.trim().to_string()
    }

    /// Sends one command line in a single write(2). `writeln!` would write
    /// the command and its newline separately, and a reader that exits on
    /// its first byte (the child of `fork-exit`) may be gone before the
    /// newline: EPIPE.
    pub fn send(&mut self, cmd: &str) {
        self.input.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    }

    pub fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.line()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill9(&mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------ backend role

/// Runs the backend role and exits if this process was started as one.
pub fn run_backend_role_if_asked() {
    if let Ok(socket) = std::env::var(ROLE_ENV) {
        backend_main(Path::new(&socket));
    }
}

fn connect(socket: &Path) -> BackendClient {
    match BackendClient::connect(socket, 4, 16) {
        Ok(c) => c,
        Err(e) => {
            println!("refused {e}");
            std::process::exit(3);
        }
    }
}

fn backend_main(socket: &Path) -> ! {
    let mut role = Role {
        client: Rc::new(connect(socket)),
        socket: socket.to_path_buf(),
        keep: Vec::new(),
    };
    println!("connected {}", role.client.reader_id);
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    while let Some(Ok(line)) = lines.next() {
        role.command(&line, None, &mut lines);
    }
    std::process::exit(0)
}

/// What a backend process holds between commands.
struct Role {
    client: Rc<BackendClient>,
    socket: PathBuf,
    /// Pins, rings and sockets whose I/O must stay in flight.
    keep: Vec<Box<dyn Any>>,
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

fn show(r: Result<iotlb_shm::Piece, Fault>) -> String {
    match r {
        Ok(p) => format!("gpa {:#x}", p.gpa),
        Err(f) => format!("fault {:?}", f.kind),
    }
}

/// The guest's RAM, mapped shared and writable.
fn guest_ram() -> (*mut u8, usize) {
    // SAFETY: the test passed the memfd as descriptor 3; we never close it.
    let fd = unsafe { BorrowedFd::borrow_raw(GUEST_RAM_FD) };
    let len = iotlb_shm::memfd::size(fd).unwrap() as usize;
    // SAFETY: a fresh shared mapping of the guest's RAM, kept for the life
    // of the process (backends access guest memory this way).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            GUEST_RAM_FD,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    (p.cast(), len)
}

impl Role {
    /// Runs one command. `session` is the session held by an enclosing
    /// `enter`, if any.
    fn command(
        &mut self,
        line: &str,
        session: Option<&Session<'_>>,
        lines: &mut impl Iterator<Item = std::io::Result<String>>,
    ) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(&cmd) = w.first() else { return };
        let num = |i: usize| hex(w[i]);
        match cmd {
            "translate" => {
                let mut slot = self.client.slots.claim_slot().unwrap();
                let s = slot.enter(&self.client.table);
                println!(
                    "{}",
                    show(s.translate_one(num(1) as u32, num(2), Access::READ))
                );
            }
            "enter" => {
                // Stay in the session, running other commands, until "exit".
                let client = Rc::clone(&self.client);
                let mut slot = client.slots.claim_slot().unwrap();
                let s = slot.enter(&client.table);
                println!(
                    "{}",
                    show(s.translate_one(num(1) as u32, num(2), Access::READ))
                );
                while let Some(Ok(l)) = lines.next() {
                    if l.trim() == "exit" {
                        break;
                    }
                    self.command(&l, Some(&s), lines);
                }
                drop(s);
                println!("left");
            }
            "fault" => {
                let f = Fault {
                    kind: FaultKind::Mapping,
                    endpoint: num(1) as u32,
                    iova: num(2),
                    access: Access::WRITE,
                };
                self.client.report_fault(&f).unwrap();
                println!("sent");
            }
            "faults" => {
                // faults COUNT EP FIRST_IOVA: COUNT faults, one page apart.
                for i in 0..num(1) {
                    let f = Fault {
                        kind: FaultKind::Domain,
                        endpoint: num(2) as u32,
                        iova: num(3) + i * 0x1000,
                        access: Access::READ,
                    };
                    self.client.report_fault(&f).unwrap();
                }
                println!("sent");
            }
            "raw" | "raw-fds" => {
                // raw HEXBYTES / raw-fds N HEXBYTES: any bytes, then the
                // daemon's answer.
                let (n_fds, bytes) = if cmd == "raw" {
                    (0, w[1])
                } else {
                    (num(1) as usize, w[2])
                };
                let bytes: Vec<u8> = (0..bytes.len() / 2)
                    .map(|i| u8::from_str_radix(&bytes[2 * i..2 * i + 2], 16).unwrap())
                    .collect();
                let null = std::fs::File::open("/dev/null").unwrap();
                let fds: Vec<BorrowedFd<'_>> = (0..n_fds).map(|_| null.as_fd()).collect();
                match backend_proto::send_with_fds(self.client.connection(), &bytes, &fds) {
                    Ok(()) => println!("{}", self.answer()),
                    Err(_) => println!("closed"),
                }
            }
            "previous-file" => {
                // previous-file fresh|retired: a slot file of this process's
                // own making, handed over as a previous daemon's (kept open).
                let fd = iotlb_shm::slots::create(1, 1).unwrap();
                let file = iotlb_shm::SlotFile::open(fd.as_fd()).unwrap();
                if w[1] == "retired" {
                    file.retire();
                }
                let msg = Message::PreviousTable {
                    cookie: 5,
                    replaced: vec![],
                }
                .encode();
                match backend_proto::send_with_fds(self.client.connection(), &msg, &[fd.as_fd()]) {
                    Ok(()) => println!("{}", self.answer()),
                    Err(_) => println!("closed"),
                }
                self.keep.push(Box::new((file, fd)));
            }
            "fork-exit" => fork_exit(),
            "zc-send" => self.zc_send(num(1) as u32, num(2), num(3), num(4) as u16, session),
            "zc-ring-send" => {
                self.zc_ring_send(num(1) as u32, num(2), num(3), num(4) as u16, session)
            }
            "uring-read" => self.uring_read(num(1) as u32, num(2), Path::new(w[3]), session),
            "loop" => self.translate_loop(num(1) as u32, num(2), num(3)),
            "reconnect" => {
                self.client = Rc::new(connect(&self.socket));
                println!("connected {}", self.client.reader_id);
            }
            _ => println!("?"),
        }
    }

    /// The daemon's next message: "error CODE", "ack", "closed", "no answer".
    fn answer(&self) -> String {
        let sock = self.client.connection();
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, bounded wait.
        if unsafe { libc::poll(&mut p, 1, 2000) } <= 0 {
            return "no answer".into();
        }
        let mut buf = [0u8; MAX_LEN];
        match backend_proto::recv_message(sock, &mut buf) {
            Ok(Some((Message::Error { code, .. }, _))) => format!("error {code}"),
            Ok(Some((other, _))) => format!("other {other:?}"),
            Ok(None) | Err(_) => "closed".into(),
        }
    }

    /// Pins `[iova, iova + len)` in `session` (or a session of its own)
    /// and returns the host address of its guest-physical start (the range
    /// must be one piece).
    fn pin(
        &mut self,
        ep: u32,
        iova: u64,
        len: u64,
        access: Access,
        session: Option<&Session<'_>>,
    ) -> *mut u8 {
        let client = Rc::clone(&self.client);
        let mut own_slot = client.slots.claim_slot().unwrap();
        let own;
        let s = match session {
            Some(s) => s,
            None => {
                own = own_slot.enter(&client.table);
                &own
            }
        };
        let pin = s.pin(ep, iova, len, access).unwrap();
        let mut pieces = s.translate(ep, iova, len, access);
        let piece = pieces.next().unwrap().unwrap();
        assert!(
            pieces.next().is_none(),
            "the test maps one contiguous piece"
        );
        self.keep.push(Box::new(pin));
        let (ram, ram_len) = guest_ram();
        assert!(piece.gpa + len <= ram_len as u64);
        // SAFETY: inside the guest RAM mapping (checked above).
        unsafe { ram.add(piece.gpa as usize) }
    }

    /// MSG_ZEROCOPY sends of a pinned range to 127.0.0.1:port, as much as
    /// the socket takes now; the pin is kept (until the notifications, which
    /// this backend never reads).
    fn zc_send(&mut self, ep: u32, iova: u64, len: u64, port: u16, session: Option<&Session<'_>>) {
        let sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        self.client.register_zerocopy_socket(sock.as_fd()).unwrap();
        let one: i32 = 1;
        // SAFETY: SO_ZEROCOPY reads one int.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ZEROCOPY,
                (&one as *const i32).cast(),
                4,
            )
        };
        assert_eq!(rc, 0);
        let host = self.pin(ep, iova, len, Access::READ, session);
        let mut sent = 0usize;
        while (sent as u64) < len {
            // SAFETY: sends from the pinned guest range, inside the mapping.
            let n = unsafe {
                libc::send(
                    sock.as_raw_fd(),
                    host.add(sent).cast(),
                    len as usize - sent,
                    libc::MSG_ZEROCOPY | libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            sent += n as usize;
        }
        self.keep.push(Box::new(sock));
        println!("sent {sent}");
    }

    /// One IORING_OP_SEND_ZC of a pinned range on a registered ring.
    fn zc_ring_send(
        &mut self,
        ep: u32,
        iova: u64,
        len: u64,
        port: u16,
        session: Option<&Session<'_>>,
    ) {
        let sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut ring: io_uring::IoUring = io_uring::IoUring::new(8).unwrap();
        // SAFETY: the ring's descriptor is open for the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        self.client
            .register_ring(fd, SentinelSlot::NewTable { entries: 1 })
            .unwrap();
        let host = self.pin(ep, iova, len, Access::READ, session);
        let sqe =
            io_uring::opcode::SendZc::new(io_uring::types::Fd(sock.as_raw_fd()), host, len as u32)
                .build();
        // SAFETY: the buffer (pinned guest memory) outlives the request.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let result = ring.completion().next().unwrap().result();
        self.keep.push(Box::new(sock));
        self.keep.push(Box::new(ring));
        println!("sent {result}");
    }

    /// An O_DIRECT read of one page of `file` into a pinned guest page, on a
    /// registered ring; returns once it is submitted.
    fn uring_read(&mut self, ep: u32, iova: u64, file: &Path, session: Option<&Session<'_>>) {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(file)
            .unwrap();
        let mut ring: io_uring::IoUring = io_uring::IoUring::new(8).unwrap();
        // SAFETY: the ring's descriptor is open for the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        self.client
            .register_ring(fd, SentinelSlot::NewTable { entries: 1 })
            .unwrap();
        let host = self.pin(ep, iova, 4096, Access::WRITE, session);
        let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(f.as_raw_fd()), host, 4096)
            .offset(0)
            .build();
        // SAFETY: the buffer (pinned guest memory) outlives the request.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit().unwrap();
        self.keep.push(Box::new(f));
        self.keep.push(Box::new(ring));
        println!("submitted");
    }

    /// Translates `iova` in a fresh session each time — saying "looping"
    /// after the first success — until 200 ms after the first DETACHED
    /// fault (or 20 s), then reports: successes (all must give `gpa`), when
    /// the last one began, DETACHED faults and when the first one began,
    /// anything else.
    fn translate_loop(&mut self, ep: u32, iova: u64, gpa: u64) {
        let mut slot = self.client.slots.claim_slot().unwrap();
        let give_up = Instant::now() + Duration::from_secs(20);
        let (mut ok, mut last_ok, mut detached, mut first_detached, mut wrong) =
            (0u64, 0u64, 0u64, u64::MAX, 0u64);
        let mut detached_at = None;
        while Instant::now() < give_up
            && detached_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(200))
        {
            let began = monotonic_ns();
            let s = slot.enter(&self.client.table);
            match s.translate_one(ep, iova, Access::READ) {
                Ok(p) if p.gpa == gpa => {
                    if ok == 0 {
                        println!("looping");
                        let _ = std::io::stdout().flush();
                    }
                    ok += 1;
                    last_ok = began;
                }
                Err(f) if f.kind == FaultKind::Detached => {
                    detached += 1;
                    first_detached = first_detached.min(began);
                    detached_at.get_or_insert_with(Instant::now);
                }
                _ => wrong += 1,
            }
        }
        println!(
            "loop ok={ok} last_ok={last_ok} detached={detached} first_detached={first_detached} wrong={wrong}"
        );
    }
}

/// Forks: the child keeps every descriptor (the connection included) and
/// lives until a byte arrives on stdin; this process exits at once, inside
/// whatever session it is in.
fn fork_exit() -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: the child runs only read(2) and _exit(2).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut b = [0u8; 1];
        // SAFETY: reads one byte from stdin into `b`, then exits.
        unsafe {
            libc::read(0, b.as_mut_ptr().cast(), 1);
            libc::_exit(0)
        }
    }
    println!("forked {pid}");
    let _ = std::io::stdout().flush();
    // SAFETY: exits without running destructors: the session stays open.
    unsafe { libc::_exit(0) }
}

// ------------------------------------------------------------ runner

pub use viommu_test_support::cases::Case;

/// The test binary's `main`: backend role if asked, else the cases (see
/// [`viommu_test_support::cases::run_cases`]).
pub fn run_cases(suite: &str, cases: &[Case]) {
    run_backend_role_if_asked();
    viommu_test_support::cases::run_cases(suite, cases);
}

/// The guest's RAM memfd of a driver (valid while the driver lives).
pub fn ram_fd(drv: &mut Driver) -> RawFd {
    drv.ram().region_info().unwrap().mmap_handle
}
