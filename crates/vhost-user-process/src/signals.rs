//! Prompt, clean exit on SIGTERM and SIGINT.
//!
//! The signals are blocked in every thread (so no thread is interrupted in
//! the middle of a request) and received by one dedicated thread, which
//! removes the socket files the process still owns, logs, and exits with status 0.

use tracing::info;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully
    // before sigaddset reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM/SIGINT in the calling thread and every thread it spawns
/// later, and starts the thread that waits for them. Call it before any
/// other thread is spawned.
pub fn exit_on_termination() -> std::io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is a valid, initialised signal set; no old mask is read.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            loop {
                // SAFETY: `set` is valid and `sig` is a live c_int to write to.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    break;
                }
            }
            let name = if sig == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            crate::socket_file::remove_owned();
            // Nothing may keep the process from exiting: not even a panic
            // while logging.
            let _ = std::panic::catch_unwind(|| info!(signal = name, "exiting"));
            std::process::exit(0);
        })?;
    Ok(())
}
