//! The backends that hold this daemon's table, kept in the state directory
//! (`--state-dir DIR`, file `DIR/backends`) so that the next daemon knows
//! them, and the barrier that makes that next daemon wait for them.
//!
//! With a state directory the table tells readers that it survives the
//! daemon ([`iotlb_shm::layout::header::HANDOVER`]): when the daemon dies,
//! backends go on translating through its frozen table — it is exactly the
//! guest's view, since no revocation can complete while no daemon runs —
//! until they connect to the restarted daemon and hand it over
//! (`PREVIOUS_TABLE`). The restarted daemon must therefore complete no
//! revocation until every backend of the previous daemon has handed its
//! table over and finished with it, or has exited. This ledger is how it
//! knows them: the daemon records each backend connection (its process's
//! PID and start time, which together name one process for the life of the
//! host, and its reader ID, which names the connection across daemons)
//! before it sends it the table, and forgets it once the backend is
//! released and no previous table it handed over is in use.
//!
//! At start-up the daemon reads the ledger its predecessor left: each
//! connection whose process still runs is **awaited**, until a connection
//! of the same process says it replaces it (`PREVIOUS_TABLE`). Until none is, every request that
//! takes access away (UNMAP, DETACH, ATTACH, a reset) waits after its grace
//! period ([`Ledger::wait_for_previous`]). An awaited backend that neither
//! hands over nor exits is warned about and, with `--stall-kill-ms`,
//! killed, as a backend stuck in a grace period is.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use iotlb_shm::{StallPolicy, TableWriter};
use tracing::{error, info, warn};

use crate::fd_store::FdStore;
use crate::shm_table::{SharedWriter, lock};

/// The ledger's file name in the state directory.
pub const FILE_NAME: &str = "backends";

/// The first line of the file.
const HEADER: &str = "# vhost-user-iommu backends v2: pid start-time (clock ticks since boot) reader-id, one line per connection";

/// The start time recorded when it cannot be read.
const UNKNOWN_START: u64 = 0;

/// How often the barrier looks at the processes it waits for.
const POLL: Duration = Duration::from_millis(1);
/// How often a stuck barrier repeats its warning.
const REMINDER: Duration = Duration::from_secs(10);

/// Why the ledger cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Reading or writing the file failed.
    #[error("{path}: {step}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a ledger (a line that does not parse).
    #[error(
        "{path}, line {line}: not a backend ledger line ({text:?}); remove the file only if no backend of the previous daemon still runs"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// One backend connection: its process, for the life of the host (PID and
/// start time), and its reader ID (unique across daemons: each numbers its
/// readers from a value of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Process {
    pid: i32,
    start: u64,
    id: u64,
}

/// A backend connection of the previous daemon whose process still runs.
#[derive(Debug)]
struct Awaited {
    process: Process,
    pidfd: OwnedFd,
    /// Its start time matched: the PID was not reused. An unverified one
    /// (its `/proc` entry is hidden, e.g. `ProtectProc=invisible`) is
    /// waited for but never killed.
    verified: bool,
    killed: bool,
}

#[derive(Debug)]
struct Inner {
    /// The file; `None` without a state directory (nothing outlives the
    /// daemon, but backends that reconnect still hand their previous
    /// table over).
    path: Option<PathBuf>,
    /// Backends of this daemon, by reader ID.
    current: std::collections::BTreeMap<u64, Process>,
    awaited: Vec<Awaited>,
}

/// The ledger of one daemon; see the [module documentation](self).
#[derive(Debug)]
pub struct Ledger {
    inner: Mutex<Inner>,
    stall: StallPolicy,
    /// Bumped whenever something may have become pending (a hand-over).
    changes: AtomicU64,
    /// The value of `changes` when nothing was found pending last.
    quiet_at: AtomicU64,
    /// Names in systemd's descriptor store of the previous daemon's
    /// backends (`crate::fd_store`), removed once none is pending.
    carried: Mutex<Option<(Arc<FdStore>, Vec<String>)>>,
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, clock
/// ticks after boot).
fn start_time(pid: i32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    start_field(&stat).ok_or_else(|| std::io::Error::other("no start time in /proc/PID/stat"))
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) may
/// hold spaces and parentheses: the fields that follow start after its
/// last ')'.
fn start_field(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn parse(path: &Path, text: &str) -> Result<Vec<Process>, LedgerError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let process = match fields.as_slice() {
            [pid, start, id] => match (
                pid.parse::<i32>().ok().filter(|p| *p > 0),
                start.parse::<u64>().ok(),
                id.parse::<u64>().ok(),
            ) {
                (Some(pid), Some(start), Some(id)) => Some(Process { pid, start, id }),
                _ => None,
            },
            _ => None,
        };
        match process {
            Some(p) => out.push(p),
            None => {
                return Err(LedgerError::Format {
                    path: path.to_path_buf(),
                    line: i + 1,
                    text: line.chars().take(80).collect(),
                });
            }
        }
    }
    Ok(out)
}

impl Inner {
    /// Rewrites the file: the backends of this daemon and those of the
    /// previous one still awaited (written to a temporary file, then
    /// renamed over the ledger, so a crash leaves one or the other).
    fn save(&self) -> Result<(), LedgerError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // One line per connection, of this daemon or awaited from the
        // previous one: each is resolved by the connection that replaces it.
        let mut processes: Vec<Process> = self.current.values().copied().collect();
        processes.extend(self.awaited.iter().map(|a| a.process));
        processes.sort();
        let mut text = format!("{HEADER}\n");
        for p in &processes {
            text.push_str(&format!("{} {} {}\n", p.pid, p.start, p.id));
        }
        let io = |step| {
            let path = path.clone();
            move |source| LedgerError::Io { path, step, source }
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io("create"))?;
        f.write_all(text.as_bytes()).map_err(io("write"))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io("rename"))
    }
}

impl Ledger {
    /// Opens the ledger of state directory `dir` (locked by the caller):
    /// the backends its previous daemon recorded that still run become
    /// awaited; the file is rewritten to list only them.
    pub fn open(dir: &Path, stall: StallPolicy) -> Result<Ledger, LedgerError> {
        let path = dir.join(FILE_NAME);
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(LedgerError::Io {
                    path,
                    step: "read",
                    source,
                });
            }
        };
        let mut awaited = Vec::new();
        for process in recorded {
            // Opened first, checked after: the pidfd then names the
            // process whose start time matched, never a reused PID.
            let Ok(pidfd) = iotlb_shm::memfd::pidfd_open(process.pid) else {
                continue; // gone
            };
            let verified = match start_time(process.pid) {
                Ok(start) if start == process.start && start != UNKNOWN_START => true,
                Ok(_) if process.start != UNKNOWN_START => continue, // PID reused
                _ => false,
            };
            awaited.push(Awaited {
                process,
                pidfd,
                verified,
                killed: false,
            });
        }
        let inner = Inner {
            path: Some(path),
            current: Default::default(),
            awaited,
        };
        inner.save()?;
        if !inner.awaited.is_empty() {
            let pids: Vec<i32> = inner.awaited.iter().map(|a| a.process.pid).collect();
            warn!(
                ?pids,
                "backends of the previous daemon still run: no UNMAP, DETACH or reset completes until each has handed its table over (it reconnects) or exited"
            );
        }
        Ok(Ledger::with(inner, stall))
    }

    /// A ledger kept in memory only (no `--state-dir`).
    pub fn in_memory(stall: StallPolicy) -> Ledger {
        let inner = Inner {
            path: None,
            current: Default::default(),
            awaited: Vec::new(),
        };
        Ledger::with(inner, stall)
    }

    fn with(inner: Inner, stall: StallPolicy) -> Ledger {
        Ledger {
            inner: Mutex::new(inner),
            stall,
            changes: AtomicU64::new(0),
            quiet_at: AtomicU64::new(u64::MAX),
            carried: Mutex::new(None),
        }
    }

    /// Removes `names` from `store` once no backend of the previous daemon
    /// is pending any more (they name its backends' descriptors).
    pub fn forget_carried_later(&self, store: Arc<FdStore>, names: Vec<String>) {
        if !names.is_empty() {
            *self.carried.lock().unwrap_or_else(PoisonError::into_inner) = Some((store, names));
        }
    }

    fn forget_carried(&self) {
        let carried = self
            .carried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((store, names)) = carried {
            store.forget(&names);
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records backend `id` (process `pid`) before it is sent the table.
    /// A backend that cannot be recorded must not get the table: the next
    /// daemon would not wait for it.
    pub fn admit(&self, id: u64, pid: i32) -> Result<(), LedgerError> {
        // Hidden from this daemon (`ProtectProc=invisible` and another
        // user): recorded as unknown, waited for but never killed.
        let start = start_time(pid).unwrap_or(UNKNOWN_START);
        let mut inner = self.inner();
        inner.current.insert(id, Process { pid, start, id });
        inner.save().inspect_err(|_| {
            inner.current.remove(&id);
        })
    }

    /// Forgets backend `id`, released (nothing of it can touch guest
    /// memory any more).
    pub fn forget(&self, id: u64) {
        let mut inner = self.inner();
        if inner.current.remove(&id).is_some() {
            if let Err(e) = inner.save() {
                // Keeping a released backend listed only makes a later
                // daemon wait for a process that may have exited.
                warn!(error = %vhost_user_process::report_line(&e), "cannot update the backend ledger");
            }
        }
    }

    /// A connection of process `pid` replaces the connections `replaced`
    /// (reader IDs) it had with previous daemons, and handed over what it
    /// still holds of their tables: those connections are no longer
    /// awaited. Only the process's own are. Returns how many were.
    pub fn handed_over(&self, pid: i32, replaced: &[u64]) -> usize {
        let mut inner = self.inner();
        let before = inner.awaited.len();
        inner
            .awaited
            .retain(|a| !(a.process.pid == pid && replaced.contains(&a.process.id)));
        let resolved = before - inner.awaited.len();
        if resolved > 0 {
            if let Err(e) = inner.save() {
                warn!(error = %vhost_user_process::report_line(&e), "cannot update the backend ledger");
            }
        }
        resolved
    }

    /// Backends of the previous daemon still awaited.
    pub fn awaited(&self) -> usize {
        self.inner().awaited.len()
    }

    /// Forgets the awaited backends that exited; returns how many are left.
    fn drop_exited(&self) -> usize {
        let mut inner = self.inner();
        let before = inner.awaited.len();
        inner.awaited.retain(|a| {
            let exited = iotlb_shm::memfd::pidfd_exited(a.pidfd.as_fd());
            if exited {
                info!(
                    pid = a.process.pid,
                    "a backend of the previous daemon exited before handing its table over"
                );
            }
            !exited
        });
        if inner.awaited.len() != before {
            if let Err(e) = inner.save() {
                warn!(error = %vhost_user_process::report_line(&e), "cannot update the backend ledger");
            }
        }
        inner.awaited.len()
    }

    /// Kills the awaited backends not killed yet (the stall policy).
    fn kill_awaited(&self) {
        let mut inner = self.inner();
        for a in inner.awaited.iter_mut().filter(|a| !a.killed) {
            a.killed = true;
            if !a.verified {
                warn!(
                    pid = a.process.pid,
                    "not killing a backend of the previous daemon whose start time cannot be read (its PID may have been reused)"
                );
                continue;
            }
            match iotlb_shm::memfd::pidfd_kill(a.pidfd.as_fd()) {
                Ok(()) => error!(
                    pid = a.process.pid,
                    "killed a backend of the previous daemon that did not hand its table over within --stall-kill-ms"
                ),
                Err(e) => error!(
                    pid = a.process.pid,
                    error = %e,
                    "could not kill a backend of the previous daemon; waiting for it instead"
                ),
            }
        }
    }

    /// Notes that a backend handed over a previous table (call it after
    /// registering the table's slot file).
    pub fn previous_registered(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether anything of the previous daemon's backends must still be
    /// waited for: one is awaited, or one handed its table over and still
    /// has a session open or a pin held in it. Costs one atomic load once
    /// nothing is.
    pub fn pending(&self, writer: &SharedWriter) -> bool {
        !self.quiet() && self.pending_with(&lock(writer))
    }

    /// Whether nothing was pending at the last look and nothing was handed
    /// over since.
    fn quiet(&self) -> bool {
        self.quiet_at.load(Ordering::SeqCst) == self.changes.load(Ordering::SeqCst)
    }

    /// [`Self::pending`] with the table already locked.
    pub fn pending_with(&self, writer: &TableWriter) -> bool {
        let changes = self.changes.load(Ordering::SeqCst);
        if self.quiet_at.load(Ordering::SeqCst) == changes {
            return false;
        }
        let pending = self.awaited() > 0 || writer.previous_readers() > 0;
        if !pending {
            self.quiet_at.store(changes, Ordering::SeqCst);
            self.forget_carried();
        }
        pending
    }

    /// Waits until no backend of the previous daemon can still use its
    /// table: each one awaited has handed it over or exited, and each one
    /// that handed it over has ended its sessions and released its pins in
    /// it. Call it after the grace period of a revocation, before
    /// completing it, without the device lock held.
    pub fn wait_for_previous(&self, writer: &SharedWriter) {
        if !self.pending(writer) {
            return;
        }
        let started = Instant::now();
        let mut next_warning = started + self.stall.warn_after;
        let mut killed = false;
        loop {
            let awaited = self.drop_exited();
            let handed_over = lock(writer).release_previous_readers();
            if awaited == 0 && handed_over == 0 {
                self.forget_carried();
                return;
            }
            let now = Instant::now();
            if now >= next_warning {
                next_warning = now + REMINDER;
                warn!(
                    awaited,
                    handed_over,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "backends of the previous daemon hold a revocation back: some have not reconnected, or still use the previous table"
                );
            }
            if !killed
                && self
                    .stall
                    .kill_after
                    .is_some_and(|k| started.elapsed() >= k)
            {
                killed = true;
                self.kill_awaited();
                lock(writer).kill_previous_readers();
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        viommu_test_support::scratch::dir("viommu-ledger", name)
    }

    fn policy() -> StallPolicy {
        StallPolicy {
            warn_after: Duration::from_secs(60),
            kill_after: None,
        }
    }

    #[test]
    fn a_backend_is_listed_once_admitted_and_gone_once_forgotten() {
        let dir = scratch("admit");
        let ledger = Ledger::open(&dir, policy()).unwrap();
        let me = std::process::id() as i32;
        ledger.admit(7, me).unwrap();
        let text = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        let listed = parse(&dir, &text).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].pid, me);
        assert_eq!(listed[0].start, start_time(me).unwrap());
        ledger.forget(7);
        let text = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        assert!(parse(&dir, &text).unwrap().is_empty());
    }

    #[test]
    fn the_next_daemon_awaits_the_running_backends_only() {
        let dir = scratch("await");
        let me = std::process::id() as i32;
        let start = start_time(me).unwrap();
        // This process, the same PID with another start time (a reused
        // PID), and a PID that runs nothing.
        std::fs::write(
            dir.join(FILE_NAME),
            format!(
                "{HEADER}\n{me} {start} 11\n{me} {} 12\n999999999 5 13\n",
                start + 1
            ),
        )
        .unwrap();
        let ledger = Ledger::open(&dir, policy()).unwrap();
        assert_eq!(ledger.awaited(), 1);
        let text = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        assert_eq!(
            parse(&dir, &text).unwrap(),
            vec![Process {
                pid: me,
                start,
                id: 11
            }]
        );
        assert_eq!(ledger.handed_over(me + 1, &[11]), 0, "another process");
        assert_eq!(ledger.handed_over(me, &[12]), 0, "another connection");
        assert_eq!(ledger.handed_over(me, &[11]), 1);
        assert_eq!(ledger.awaited(), 0);
        let text = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        assert!(parse(&dir, &text).unwrap().is_empty());
    }

    /// A process with two connections (two devices) is awaited until both
    /// have been replaced; a new connection that replaces nothing, or a
    /// replacement that dies before saying so, resolves nothing.
    #[test]
    fn each_connection_is_awaited_until_the_one_that_replaces_it_says_so() {
        let dir = scratch("connections");
        let me = std::process::id() as i32;
        let start = start_time(me).unwrap();
        std::fs::write(
            dir.join(FILE_NAME),
            format!("{HEADER}\n{me} {start} 21\n{me} {start} 22\n"),
        )
        .unwrap();
        let ledger = Ledger::open(&dir, policy()).unwrap();
        assert_eq!(ledger.awaited(), 2);
        // A connection of this daemon, admitted before it says anything.
        ledger.admit(31, me).unwrap();
        assert_eq!(ledger.handed_over(me, &[]), 0, "replaces nothing");
        assert_eq!(ledger.handed_over(me, &[21]), 1);
        assert_eq!(ledger.awaited(), 1, "the process's other connection");
        // The file holds the connection still awaited and the current one:
        // a daemon started now waits for both.
        let text = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        let ids: Vec<u64> = parse(&dir, &text).unwrap().iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![22, 31]);
        assert_eq!(ledger.handed_over(me, &[22]), 1);
        assert_eq!(ledger.awaited(), 0);
    }

    /// A start time that could not be read (another user's process behind
    /// `ProtectProc=invisible`) is recorded as 0: such a process is
    /// awaited, but the stall policy never kills it — its PID may belong
    /// to another process by now.
    #[test]
    fn an_unverified_backend_is_awaited_but_never_killed() {
        let dir = scratch("unverified");
        let me = std::process::id() as i32;
        std::fs::write(dir.join(FILE_NAME), format!("{me} {UNKNOWN_START} 1\n")).unwrap();
        let ledger = Ledger::open(
            &dir,
            StallPolicy {
                warn_after: Duration::ZERO,
                kill_after: Some(Duration::ZERO),
            },
        )
        .unwrap();
        assert_eq!(ledger.awaited(), 1);
        // Would be SIGKILL for this very test process if it were killed.
        ledger.kill_awaited();
        assert_eq!(ledger.awaited(), 1);
    }

    #[test]
    fn an_exited_backend_is_no_longer_awaited() {
        let dir = scratch("exited");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::fs::write(
            dir.join(FILE_NAME),
            format!("{} {} 1\n", pid, start_time(pid).unwrap()),
        )
        .unwrap();
        let ledger = Ledger::open(&dir, policy()).unwrap();
        assert_eq!(ledger.awaited(), 1);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(ledger.drop_exited(), 0);
    }

    #[test]
    fn a_ledger_that_does_not_parse_is_refused_with_its_line() {
        let dir = scratch("bad");
        for bad in [
            "12 3\n",
            "12 x 1\n",
            "-3 4 5\n",
            "1 2 3 4\n",
            "1 2 x\n",
            "\u{0}\n",
        ] {
            std::fs::write(dir.join(FILE_NAME), format!("{HEADER}\n{bad}")).unwrap();
            match Ledger::open(&dir, policy()) {
                Err(LedgerError::Format { line: 2, .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn start_times_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let fields: Vec<String> = (3..=52).map(|f| f.to_string()).collect();
        let line = format!("4242 (a) (b c) {}\n", fields.join(" "));
        assert_eq!(start_field(&line), Some(22));
        assert_eq!(start_field("4242 (a) 3 4"), None);
        assert_eq!(start_field("no name at all"), None);
        let me = std::process::id() as i32;
        assert!(start_time(me).unwrap() > 0);
        assert!(start_time(i32::MAX).is_err());
    }
}
