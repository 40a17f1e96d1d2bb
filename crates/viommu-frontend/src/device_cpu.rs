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
    fn this_process_uses_cpu_and_a_missing_one_is_none() {
        let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        let meter = CpuMeter::start(me).expect("own /proc entry");
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(2) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        let used = meter.used().expect("still running");
        assert!(used > Duration::ZERO, "a busy thread used no CPU");
        assert_eq!(process_cpu(i32::MAX), None);
    }
}
