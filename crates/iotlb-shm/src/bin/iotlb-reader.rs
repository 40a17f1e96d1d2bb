//! `iotlb-reader`: a reader of the shared translation table, for operators
//! (`lookup`, on a live daemon's backend socket) and for the test suite's
//! multi-process tests (the other modes, which inherit the table at fixed
//! descriptors: 3 = table file, 4 = arena file, 5 = its slot file, 6 =
//! (stress only) the writer's completion log).
//!
//! ```text
//! iotlb-reader lookup SOCKET EP IOVA [LEN]    connect to a daemon's backend socket, print the
//!                                             translation of [IOVA, IOVA+LEN) for endpoint EP
//! iotlb-reader translate    EP IOVA           print one translation
//! iotlb-reader hold-session EP IOVA           translate, print "ready", stay in the session until killed
//! iotlb-reader hold-pin     EP IOVA LEN       pin the range, print "ready", unpin when stdin gives a line or closes
//! iotlb-reader write-table                    try to write the table (must die of SIGSEGV)
//! iotlb-reader fork-touch   EP IOVA           translate, fork, let the child read the table (it must die of SIGSEGV)
//! iotlb-reader stress EP PAGES MILLIS SEED    random lookups checked against the log (see tests/processes.rs)
//! ```

#[cfg(not(loom))]
fn main() -> std::process::ExitCode {
    app::main()
}

/// Under `cfg(loom)` only the protocol is built; this tool is not.
#[cfg(loom)]
fn main() {}

#[cfg(not(loom))]
mod app {
    use std::io::{BufRead, Write};
    use std::os::fd::BorrowedFd;
    use std::process::ExitCode;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use iotlb_shm::{Access, SlotFile, TableReader, memfd::SharedMapping};

    const TABLE_FD: i32 = 3;
    const ARENA_FD: i32 = 4;
    const SLOTS_FD: i32 = 5;
    const LOG_FD: i32 = 6;

    pub fn main() -> ExitCode {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match run(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("iotlb-reader: {e}");
                ExitCode::from(2)
            }
        }
    }

    fn num(args: &[String], i: usize) -> Result<u64, String> {
        let s = args
            .get(i)
            .ok_or_else(|| format!("missing argument {i}; see iotlb-reader --help"))?;
        let r = match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => s.parse(),
        };
        r.map_err(|e| format!("argument {s:?}: {e}"))
    }

    fn fd(n: i32) -> BorrowedFd<'static> {
        // SAFETY: the parent passes these descriptors open for the process's
        // whole life; nothing in this program closes them.
        unsafe { BorrowedFd::borrow_raw(n) }
    }

    fn open() -> Result<(TableReader, std::sync::Arc<SlotFile>), String> {
        let table = TableReader::open(fd(TABLE_FD), fd(ARENA_FD))
            .map_err(|e| format!("{e}: {:?}", e.source_chain()))?;
        let slots = SlotFile::open(fd(SLOTS_FD)).map_err(|e| e.to_string())?;
        Ok((table, slots))
    }

    trait Chain {
        fn source_chain(&self) -> Vec<String>;
    }

    impl<E: std::error::Error> Chain for E {
        fn source_chain(&self) -> Vec<String> {
            let mut v = Vec::new();
            let mut s = self.source();
            while let Some(e) = s {
                v.push(e.to_string());
                s = e.source();
            }
            v
        }
    }

    fn say(line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    const USAGE: &str = "\
Usage: iotlb-reader lookup SOCKET EP IOVA [LEN]

Connects to a running vhost-user-iommu daemon's backend socket (its
--backend-socket) as a backend would, and prints how endpoint EP's
[IOVA, IOVA+LEN) translates now: one line per guest-physical piece, or the
fault. Numbers are decimal or 0x-hex; LEN defaults to 1. Needs a user the
daemon accepts (its own, root, or a --backend-uid).

  iotlb-reader lookup /run/vhost-user-iommu/vm1-backends.sock 0x20 0xfffff000

The other modes (translate, hold-session, hold-pin, write-table, fork-touch,
stress) are the test suite's: they inherit the table at descriptors 3-6.
";

    fn run(args: &[String]) -> Result<ExitCode, String> {
        let mode = args.first().map(String::as_str).unwrap_or("");
        match mode {
            "-h" | "--help" | "help" => {
                print!("{USAGE}");
                Ok(ExitCode::SUCCESS)
            }
            "lookup" => {
                let socket = args
                    .get(1)
                    .ok_or_else(|| format!("lookup needs SOCKET EP IOVA\n\n{USAGE}"))?;
                let ep = u32::try_from(num(args, 2)?).map_err(|e| e.to_string())?;
                let iova = num(args, 3)?;
                let len = if args.len() > 4 { num(args, 4)? } else { 1 };
                let client = iotlb_shm::BackendClient::connect(std::path::Path::new(socket), 1, 1)
                    .map_err(|e| {
                        format!("cannot connect to {socket}: {e}: {:?}", e.source_chain())
                    })?;
                let pieces = client.lookup(ep, iova, len).map_err(|e| e.to_string())?;
                let mut faulted = false;
                for piece in pieces {
                    match piece {
                        Ok((at, p)) => say(&format!(
                            "iova={at:#x} len={:#x} gpa={:#x}{}",
                            p.len,
                            p.gpa,
                            if p.mmio { " mmio" } else { "" }
                        )),
                        Err(f) => {
                            faulted = true;
                            say(&format!("fault={:?} iova={:#x}", f.kind, f.iova));
                        }
                    }
                }
                Ok(if faulted {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                })
            }
            "translate" | "hold-session" => {
                let (table, slots) = open()?;
                let ep = u32::try_from(num(args, 1)?).map_err(|e| e.to_string())?;
                let iova = num(args, 2)?;
                let mut slot = slots.claim_slot().map_err(|e| e.to_string())?;
                let session = slot.enter(&table);
                let result = match session.translate_one(ep, iova, Access::READ) {
                    Ok(p) => format!("gpa={:#x} len={:#x}", p.gpa, p.len),
                    Err(f) => format!("fault={:?}", f.kind),
                };
                if mode == "translate" {
                    drop(session);
                    say(&result);
                    return Ok(ExitCode::SUCCESS);
                }
                say(&format!("ready {result}"));
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            "hold-pin" => {
                let (table, slots) = open()?;
                let ep = u32::try_from(num(args, 1)?).map_err(|e| e.to_string())?;
                let (iova, len) = (num(args, 2)?, num(args, 3)?);
                let mut slot = slots.claim_slot().map_err(|e| e.to_string())?;
                let pin = {
                    let session = slot.enter(&table);
                    session
                        .pin(ep, iova, len, Access::READ)
                        .map_err(|e| format!("{e}: {:?}", e.source_chain()))?
                };
                say("ready");
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
                drop(pin);
                say("released");
                Ok(ExitCode::SUCCESS)
            }
            "write-table" => {
                let (table, _slots) = open()?;
                say("writing");
                // SAFETY: deliberately writes through a read-only mapping; the
                // kernel must kill this process with SIGSEGV. This is the test
                // that a reader cannot corrupt the table.
                unsafe { std::ptr::write_volatile(table.table_ptr().cast_mut().add(64), 0xff) };
                say("write went through");
                Ok(ExitCode::from(1))
            }
            "fork-touch" => {
                let (table, slots) = open()?;
                let ep = u32::try_from(num(args, 1)?).map_err(|e| e.to_string())?;
                let mut slot = slots.claim_slot().map_err(|e| e.to_string())?;
                let session = slot.enter(&table);
                match session.translate_one(ep, num(args, 2)?, Access::READ) {
                    Ok(p) => say(&format!("parent gpa={:#x}", p.gpa)),
                    Err(f) => say(&format!("parent fault={:?}", f.kind)),
                }
                // SAFETY: the child only reads one word and exits; it runs no
                // code that could deadlock on locks held by other threads
                // (this process has none).
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: reads the table mapping, which a forked child
                    // must not have (MADV_DONTFORK): this faults.
                    let word = unsafe { std::ptr::read_volatile(table.table_ptr().cast::<u64>()) };
                    // SAFETY: _exit is async-signal-safe and ends the child.
                    unsafe { libc::_exit(if word != 0 { 10 } else { 11 }) };
                }
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                if libc::WIFSIGNALED(status) {
                    say(&format!("child signal={}", libc::WTERMSIG(status)));
                } else {
                    say(&format!(
                        "child read the table, exit={}",
                        libc::WEXITSTATUS(status)
                    ));
                }
                drop(session);
                Ok(ExitCode::SUCCESS)
            }
            "stress" => stress(args),
            _ => Err(format!(
                "unknown mode {mode:?}; modes: lookup, translate, hold-session, hold-pin, write-table, fork-touch, stress (see --help)"
            )),
        }
    }

    /// The IOVA of stress page `i`: 16 one-GiB regions so that pages need
    /// their own level-1 and level-0 nodes (node churn, arena growth).
    pub fn stress_iova(i: u64) -> u64 {
        (i % 16) * (1 << 30) + (i / 16) * 4096
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

    fn stress(args: &[String]) -> Result<ExitCode, String> {
        let (table, slots) = open()?;
        let ep = u32::try_from(num(args, 1)?).map_err(|e| e.to_string())?;
        let pages = num(args, 2)?;
        let millis = num(args, 3)?;
        let mut rng = Rng(num(args, 4)? | 1);
        let log = SharedMapping::map(
            fd(LOG_FD),
            (pages as usize * 8).div_ceil(4096) * 4096,
            false,
        )
        .map_err(|e| format!("map log: {e}"))?;
        let mut slot = slots.claim_slot().map_err(|e| e.to_string())?;
        let (mut lookups, mut hits, mut pins, mut violations) = (0u64, 0u64, 0u64, 0u64);
        let deadline = Instant::now() + Duration::from_millis(millis);
        let mut first_violation = None;
        while Instant::now() < deadline {
            for _ in 0..256 {
                let i = rng.next() % pages;
                let off = (rng.next() % 512) * 8;
                let iova = stress_iova(i) + off;
                // Every UNMAP of a version <= `done` completed before this load,
                // hence before the session below began.
                let done = log.word(i as usize * 8).load(Ordering::Acquire);
                let pinning = rng.next() % 64 == 0;
                let (result, pin, during) = {
                    let session = slot.enter(&table);
                    let pin = if pinning {
                        session.pin(ep, stress_iova(i), 4096, Access::READ).ok()
                    } else {
                        None
                    };
                    let result = session.translate_one(ep, iova, Access::READ);
                    // Use the translation for a moment, then look whether its
                    // UNMAP completed while this session still held it.
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                    (
                        result,
                        pin,
                        log.word(i as usize * 8).load(Ordering::Acquire),
                    )
                };
                lookups += 1;
                let Ok(p) = result else { continue };
                hits += 1;
                let version = p.gpa >> 32;
                let page = (p.gpa >> 12) & 0xf_ffff;
                let bad = if page != i || p.gpa & 0xfff != off {
                    Some(format!(
                        "iova {iova:#x} (page {i}) translated to {:#x}: wrong page",
                        p.gpa
                    ))
                } else if version <= done {
                    Some(format!(
                        "use after unmap: page {i} version {version} was unmapped (log {done}) before the session"
                    ))
                } else if version <= during {
                    Some(format!(
                        "page {i} version {version}: its UNMAP completed while a session held it"
                    ))
                } else {
                    None
                };
                if let Some(pin) = pin {
                    pins += 1;
                    for _ in 0..200 {
                        std::hint::spin_loop();
                    }
                    let now = log.word(i as usize * 8).load(Ordering::Acquire);
                    if now >= version {
                        violations += 1;
                        first_violation.get_or_insert(format!(
                            "page {i} version {version} unmapped under a pin"
                        ));
                    }
                    drop(pin);
                }
                if let Some(b) = bad {
                    violations += 1;
                    first_violation.get_or_insert(b);
                }
            }
        }
        say(&format!(
            "lookups={lookups} hits={hits} pins={pins} violations={violations}"
        ));
        if let Some(v) = first_violation {
            say(&format!("first violation: {v}"));
            return Ok(ExitCode::from(1));
        }
        Ok(ExitCode::SUCCESS)
    }
}
