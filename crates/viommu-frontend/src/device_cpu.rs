//! CPU time a device process spends, read from `/proc`: what a request
//! costs the device, whatever the round trip costs the driver.

use std::time::Duration;

/// CPU time of every thread of process `pid` so far (the first field of
/// each `/proc/PID/task/TID/schedstat`, in nanoseconds). `None` when the
/// process cannot be read (another host, another user, gone).
pub fn process_cpu(pid: i32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue; // The thread exited meanwhile.
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// The device's CPU time over a span of the driver's work.
#[derive(Clone, Copy, Debug)]
pub struct CpuMeter {
    pid: i32,
    start: Duration,
}

impl CpuMeter {
    /// Starts measuring process `pid`.
    pub fn start(pid: i32) -> Option<CpuMeter> {
        Some(CpuMeter {
            pid,
            start: process_cpu(pid)?,
        })
    }

    /// CPU time the process used since [`Self::start`].
    pub fn used(&self) -> Option<Duration> {
        process_cpu(self.pid)?.checked_sub(self.start)
    }

    /// The process measured.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_process_uses_cpu_and_a_missing_one_is_none() {
        // Another process, as the device is: a shell spinning a while.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 5",
            ])
            .spawn()
            .expect("sh");
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        let meter = CpuMeter::start(pid).expect("the child's /proc entry");
        assert_eq!(meter.pid(), pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let used = loop {
            let used = meter.used().expect("still running");
            if used > Duration::ZERO || std::time::Instant::now() > deadline {
                break used;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(used > Duration::ZERO, "a spinning process used no CPU");
        assert_eq!(process_cpu(i32::MAX), None);
    }
}
