//! The C ABI: the hand-kept header agrees with `src/capi.rs`, and a C
//! program (`examples/c/translate.c`), built with gcc against the
//! staticlib and run as its own process, translates through the table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iotlb_shm::capi;
use iotlb_shm::{EndpointTarget, Perms, TableWriter, WriterConfig};

const CRATE: &str = env!("CARGO_MANIFEST_DIR");

// ---------------------------------------------------------------------------
// Header ↔ Rust consistency.

/// name → (parameter types, return type), all as canonical C types.
type Signatures = BTreeMap<String, (Vec<String>, String)>;

/// Canonical C spelling: single spaces, no space around `*`.
fn canon(c: &str) -> String {
    let s = c.split_whitespace().collect::<Vec<_>>().join(" ");
    s.replace(" *", "*").replace("* ", "*")
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// The C type a Rust FFI type is declared as in the header.
fn rust_to_c(ty: &str) -> String {
    let ty = ty.trim();
    if let Some(rest) = ty.strip_prefix("*mut ") {
        return format!("{}*", rust_to_c(rest));
    }
    if let Some(rest) = ty.strip_prefix("*const ") {
        let inner = rust_to_c(rest);
        return if inner.ends_with('*') {
            format!("{inner}const*")
        } else {
            format!("const {inner}*")
        };
    }
    match ty {
        "c_int" | "std::ffi::c_int" | "core::ffi::c_int" => "int".into(),
        "u8" => "uint8_t".into(),
        "u16" => "uint16_t".into(),
        "u32" => "uint32_t".into(),
        "u64" => "uint64_t".into(),
        "i32" => "int32_t".into(),
        "i64" => "int64_t".into(),
        "usize" => "size_t".into(),
        "()" => "void".into(),
        t if t.starts_with("Iotlb") && t.chars().all(|c| c.is_ascii_alphanumeric()) => {
            format!("struct {}", snake(t))
        }
        t => panic!("src/capi.rs uses a type the header check cannot map to C: {t}"),
    }
}

fn rust_signatures(src: &str) -> Signatures {
    let mut out = Signatures::new();
    let mut rest = src;
    while let Some(at) = rest.find("extern \"C\" fn ") {
        let before = &rest[..at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let prefix = before[line_start..].trim();
        rest = &rest[at + "extern \"C\" fn ".len()..];
        if !(prefix == "pub" || prefix == "pub unsafe") {
            continue;
        }
        let open = rest.find('(').expect("(");
        let name = rest[..open].trim().to_string();
        let close = rest.find(')').expect(")");
        let params = rest[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| canon(&rust_to_c(p.split_once(':').expect("name: type").1)))
            .collect();
        let body = rest.find('{').expect("{");
        let ret = rest[close + 1..body].trim();
        let ret = ret
            .strip_prefix("->")
            .map_or("void".to_string(), |t| canon(&rust_to_c(t)));
        assert!(
            out.insert(name.clone(), (params, ret)).is_none(),
            "{name} defined twice"
        );
    }
    out
}

fn strip_c_comments(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find("*/").expect("unterminated comment");
        rest = &rest[i + end + 2..];
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn header_signatures(header: &str) -> Signatures {
    let code: String = header
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Signatures::new();
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        let Some(open) = stmt.find('(') else { continue };
        let head = &stmt[..open];
        let name_at = head
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let name = head[name_at..].to_string();
        if !name.starts_with("iotlb_") {
            continue;
        }
        let head = head[..name_at].trim();
        // Anything before the return type (a closing brace of a struct) goes.
        let ret = head.rsplit('}').next().unwrap_or(head);
        let close = stmt.rfind(')').expect(")");
        let params: Vec<String> = stmt[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "void")
            .map(|p| {
                let cut = p
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .expect("a named parameter");
                canon(&p[..=cut])
            })
            .collect();
        assert!(
            out.insert(name.clone(), (params, canon(ret))).is_none(),
            "{name} declared twice"
        );
    }
    out
}

fn rust_consts(src: &str) -> BTreeMap<String, u64> {
    src.lines()
        .filter_map(|l| l.trim().strip_prefix("pub const IOTLB_"))
        .map(|l| {
            let (name, rest) = l.split_once(':').expect("const NAME: T = V;");
            let value = rest
                .split_once('=')
                .expect("= V")
                .1
                .trim()
                .trim_end_matches(';')
                .trim();
            (
                format!("IOTLB_{name}"),
                value.parse().expect("integer literal"),
            )
        })
        .collect()
}

fn header_defines(header: &str) -> BTreeMap<String, u64> {
    strip_c_comments(header)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("#define IOTLB_"))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let value = it.next()?.parse().ok()?;
            Some((format!("IOTLB_{name}"), value))
        })
        .collect()
}

fn struct_fields(body: &str, rust: bool) -> Vec<(String, String)> {
    body.split(if rust { ',' } else { ';' })
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            if rust {
                let (name, ty) = f
                    .trim_start_matches("pub ")
                    .split_once(':')
                    .expect("field: type");
                (name.trim().to_string(), canon(&rust_to_c(ty)))
            } else {
                let cut = f.rfind(' ').expect("type name");
                (f[cut + 1..].to_string(), canon(&f[..cut]))
            }
        })
        .collect()
}

fn between<'a>(s: &'a str, start: &str) -> &'a str {
    let from = s.find(start).unwrap_or_else(|| panic!("{start} not found")) + start.len();
    let open = from + s[from..].find('{').expect("{") + 1;
    &s[open..open + s[open..].find('}').expect("}")]
}

fn strip_rust_comments(src: &str) -> String {
    src.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_header_declares_exactly_the_exported_functions_with_the_same_types() {
    let rust_src = std::fs::read_to_string(Path::new(CRATE).join("src/capi.rs")).unwrap();
    let header = std::fs::read_to_string(Path::new(CRATE).join("include/iotlb_shm.h")).unwrap();
    let rust = rust_signatures(&strip_rust_comments(&rust_src));
    let c = header_signatures(&strip_c_comments(&header));
    assert!(rust.len() >= 13, "parser found only {:?}", rust.keys());
    for (name, sig) in &rust {
        assert_eq!(
            c.get(name),
            Some(sig),
            "`{name}`: src/capi.rs {sig:?} vs include/iotlb_shm.h {:?}",
            c.get(name)
        );
    }
    for name in c.keys() {
        assert!(
            rust.contains_key(name),
            "include/iotlb_shm.h declares `{name}`, src/capi.rs does not export it"
        );
    }

    let (rc, hc) = (rust_consts(&rust_src), header_defines(&header));
    assert!(rc.len() >= 7);
    assert_eq!(
        rc, hc,
        "constants differ between src/capi.rs and include/iotlb_shm.h"
    );
    // And the Rust values are what the parser read.
    assert_eq!(
        rc["IOTLB_FAULT_PERMISSION"],
        capi::IOTLB_FAULT_PERMISSION as u64
    );
    assert_eq!(rc["IOTLB_PIECE_MMIO"], u64::from(capi::IOTLB_PIECE_MMIO));

    let rust_piece = struct_fields(
        between(&strip_rust_comments(&rust_src), "pub struct IotlbPiece"),
        true,
    );
    let c_piece = struct_fields(
        between(&strip_c_comments(&header), "struct iotlb_piece"),
        false,
    );
    assert_eq!(rust_piece, c_piece, "struct iotlb_piece differs");
    assert_eq!(
        size_of::<capi::IotlbPiece>(),
        24,
        "translate.c asserts the same size"
    );
}

#[test]
fn the_header_check_notices_a_mismatch() {
    let rust = rust_signatures(
        "#[unsafe(no_mangle)]\npub unsafe extern \"C\" fn iotlb_x(a: *const IotlbSlot, n: usize) -> c_int {\n}\nextern \"C\" fn private() {}\n",
    );
    assert_eq!(rust.len(), 1);
    let good = header_signatures("int iotlb_x(const struct iotlb_slot *slot, size_t n);");
    let bad = header_signatures("int iotlb_x(struct iotlb_slot *slot, size_t n);");
    let fewer = header_signatures("int iotlb_x(const struct iotlb_slot *slot);");
    assert_eq!(rust, good);
    assert_ne!(rust, bad, "const-ness is checked");
    assert_ne!(rust, fewer, "parameter count is checked");
}

// ---------------------------------------------------------------------------
// The C example, in its own process.

/// The staticlib cargo built next to this test (same profile, same
/// features: the self dev-dependency turns `capi` on).
fn staticlib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [
        deps.join("libiotlb_shm.a"),
        deps.parent().unwrap().join("libiotlb_shm.a"),
    ];
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no libiotlb_shm.a next to {} (crate-type staticlib)",
        exe.display()
    );
    // Newest first; it must carry the C ABI (a build without `capi` may
    // have overwritten it: then `cargo clean -p iotlb-shm` and rerun).
    for (_, path) in found.iter().rev() {
        match Command::new("nm")
            .args(["-g", "--defined-only"])
            .arg(path)
            .output()
        {
            Ok(out) if String::from_utf8_lossy(&out.stdout).contains(" T iotlb_table_open") => {
                return path.clone();
            }
            Ok(_) => eprintln!(
                "{} does not export iotlb_table_open (built without `capi`)",
                path.display()
            ),
            // No nm: let the linker tell.
            Err(_) => return path.clone(),
        }
    }
    panic!(
        "no libiotlb_shm.a built with feature `capi` among {found:?}; another build without the feature \
         overwrote it: run `cargo clean -p iotlb-shm` and rerun the tests"
    );
}

fn build_example() -> PathBuf {
    let lib = staticlib();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("translate");
    let out = match Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg("-I")
        .arg(Path::new(CRATE).join("include"))
        .arg(Path::new(CRATE).join("examples/c/translate.c"))
        .arg(&lib)
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
            "-o",
        ])
        .arg(&exe)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("the C ABI test needs gcc on PATH (it is not optional): {e}"),
    };
    assert!(
        out.status.success(),
        "gcc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Duplicates `fd` to a descriptor ≥ 100 (close-on-exec), so that the
/// child's `dup2` to 3, 4, 5 cannot clobber a source.
fn high_dup(fd: RawFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor has no memory effects.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
    assert!(n >= 100, "dup: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(n) }
}

const RW: Perms = Perms {
    read: true,
    write: true,
    mmio: false,
};
const RO: Perms = Perms {
    read: true,
    write: false,
    mmio: false,
};

#[derive(Debug, PartialEq, Eq)]
struct Line {
    rc: i32,
    gpa: u64,
    len: u64,
    flags: u32,
}

fn parse_translate(line: &str) -> (u32, u64, Line) {
    let kv: BTreeMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect();
    let hex = |k: &str| u64::from_str_radix(kv[k].trim_start_matches("0x"), 16).unwrap();
    let ep = kv["ep"].parse().unwrap();
    (
        ep,
        hex("iova"),
        Line {
            rc: kv["rc"].parse().unwrap(),
            gpa: hex("gpa"),
            len: hex("len"),
            flags: kv["flags"].parse().unwrap(),
        },
    )
}

#[test]
fn a_c_reader_process_translates_checks_and_pins() {
    let exe = build_example();

    let mut w = TableWriter::new(&WriterConfig::default()).unwrap();
    w.create_domain(1).unwrap();
    w.set_endpoint(8, EndpointTarget::Domain(1)).unwrap();
    w.map(1, 0x1000, 0x1fff, 0x8000_0000, RW).unwrap(); // 4 KiB
    w.map(1, 0x20_0000, 0x3f_ffff, 0x4000_0000, RW).unwrap(); // one 2 MiB leaf
    w.map(1, 0x5000, 0x5fff, 0x9000_0000, RO).unwrap(); // read-only
    w.map(1, 0x7000, 0x7fff, 0xfee0_0000, Perms { mmio: true, ..RW })
        .unwrap();
    w.map(1, 0x10000, 0x11fff, 0x50000, RW).unwrap(); // contiguous pair
    w.map(1, 0x12000, 0x12fff, 0x90000, RW).unwrap(); // then a jump
    let slot_fd = iotlb_shm::slots::create(4, 16).unwrap();

    let fds = [
        high_dup(w.table_fd().as_raw_fd()),
        high_dup(w.arena_fd().as_raw_fd()),
        high_dup(slot_fd.as_raw_fd()),
    ];
    let raw: [RawFd; 3] = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    let checks = [
        "t:8:0x1234:rw:0x80000234+0xdcc",
        "t:8:0x212345:r:0x40012345+0x1edcbb",
        "t:8:0x200000:w:0x40000000+0x200000",
        "t:8:0x5008:r:0x90000008+0xff8",
        "t:8:0x5008:w:fault=permission",
        "t:8:0x7010:rw:0xfee00010+0xff0",
        "t:8:0x9000:r:fault=mapping",
        "t:9:0x1000:r:fault=domain",
        "t:70000:0x1000:r:fault=domain",
        "r:8:0x10800+0x2100:r:0x50800+0x1800,0x90000+0x900",
        // Mapped, same page again, huge leaf, read-only, MMIO, holes, and
        // more than one lane group; then faulting endpoints.
        "b:8:w:0x1234,0x1238,0x212345,0x5008,0x7010,0x9000,0x10008,0x11ff8,0x12000,0x13000,0x1000,0x3fffff",
        "b:8:r:0x5008,0x1234,0x200000,0x7010,0x9000",
        "b:9:r:0x1000,0x2000",
        "b:70000:rw:0x1000",
        "p:8:0x1000+0x1000:rw",
    ];
    let mut cmd = Command::new(&exe);
    cmd.args(["3", "4", "5"])
        .args(checks)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls dup2, which is async-signal-safe, on
    // descriptors that are open in the child (inherited copies of `fds`).
    unsafe {
        cmd.pre_exec(move || {
            for (target, src) in (3..).zip(raw) {
                if libc::dup2(src, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(fds);
    // Registered before it may enter a session: the child waits for "go".
    w.register_reader(slot_fd.as_fd(), child.id() as i32)
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());

    let mut lines = Vec::new();
    let pinned = loop {
        let mut l = String::new();
        if stdout.read_line(&mut l).unwrap() == 0 {
            let status = child.wait().unwrap();
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!(
                "child ended ({status}) before pinning; stdout:\n{}\nstderr:\n{err}",
                lines.join("")
            );
        }
        lines.push(l.clone());
        if l.starts_with("pinned") {
            break l;
        }
    };
    assert!(pinned.trim_end().ends_with("rc=0 ok"), "{pinned}");

    // The C process holds a pin on 0x1000 (and no session): an UNMAP of it
    // must not complete until the pin is released.
    w.unmap(1, 0x1000, 0x1fff).unwrap();
    let done = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let sync = s.spawn(|| {
            let r = w.synchronize();
            done.store(true, Ordering::SeqCst);
            r
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !done.load(Ordering::SeqCst),
            "the grace period ended while a C reader held a pin on the range"
        );
        writeln!(stdin, "unpin").unwrap();
        sync.join().unwrap()
    });
    assert!(report.waited);
    drop(stdin);

    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    lines.extend(rest.lines().map(|l| format!("{l}\n")));
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let all = lines.concat();
    assert!(
        status.success(),
        "C reader exited {status}; stdout:\n{all}\nstderr:\n{err}"
    );
    assert!(!all.contains("MISMATCH"), "{all}");
    assert!(
        all.contains("unpinned\n") && all.contains("done failures=0\n"),
        "{all}"
    );
    for what in [
        "negative-fd",
        "wrong-file",
        "null-out",
        "null-session",
        "nested-enter",
        "bad-access",
        "null-piece",
        "exited-session",
        "burst-misuse",
        "exited-session-burst",
    ] {
        assert!(all.contains(&format!("abi {what} ok\n")), "{what}: {all}");
    }

    for burst in [
        "burst ep=8 n=12 faults=3 ok\n",
        "burst ep=8 n=5 faults=1 ok\n",
        "burst ep=9 n=2 faults=2 ok\n",
        "burst ep=70000 n=1 faults=1 ok\n",
    ] {
        assert!(all.contains(burst), "{burst}: {all}");
    }

    // Parse what C printed and check it here too (not only in C).
    let got: BTreeMap<(u32, u64, String), Line> = all
        .lines()
        .filter(|l| l.starts_with("translate "))
        .map(|l| {
            let (ep, iova, line) = parse_translate(l);
            let access = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("access="))
                .unwrap()
                .to_string();
            ((ep, iova, access), line)
        })
        .collect();
    let ok = |gpa, len, flags| Line {
        rc: 0,
        gpa,
        len,
        flags,
    };
    let fault = |rc| Line {
        rc,
        gpa: 0,
        len: 0,
        flags: 0,
    };
    let want = [
        ((8, 0x1234, "rw"), ok(0x8000_0234, 0xdcc, 0)),
        (
            (8, 0x21_2345, "r"),
            ok(0x4001_2345, 0x20_0000 - 0x1_2345, 0),
        ),
        ((8, 0x20_0000, "w"), ok(0x4000_0000, 0x20_0000, 0)),
        ((8, 0x5008, "r"), ok(0x9000_0008, 0xff8, 0)),
        ((8, 0x5008, "w"), fault(capi::IOTLB_FAULT_PERMISSION)),
        (
            (8, 0x7010, "rw"),
            ok(0xfee0_0010, 0xff0, capi::IOTLB_PIECE_MMIO),
        ),
        ((8, 0x9000, "r"), fault(capi::IOTLB_FAULT_MAPPING)),
        ((9, 0x1000, "r"), fault(capi::IOTLB_FAULT_DOMAIN)),
        ((70000, 0x1000, "r"), fault(capi::IOTLB_FAULT_DOMAIN)),
    ];
    assert_eq!(got.len(), want.len(), "{all}");
    for ((ep, iova, access), line) in want {
        assert_eq!(
            got.get(&(ep, iova, access.to_string())),
            Some(&line),
            "ep {ep} iova {iova:#x} {access}"
        );
    }
    assert!(
        all.contains(
            "range iova=0x10800 len=0x2100 rc=0 pieces=2 0x50800+0x1800 0x90000+0x900 ok\n"
        ),
        "{all}"
    );

    // The process is gone: the writer reaps it and grace periods stop
    // looking at its slots.
    assert_eq!(w.release_finished_readers().len(), 1);
    std::fs::remove_dir_all(exe.parent().unwrap()).unwrap();
}
