//! Benchmarks live in `src/bin/`, one binary each; every one measures a
//! named peer in the same run and prints the ratio. This library holds what
//! they share.

use std::time::Duration;

/// Latencies of one workload and the wall time it took.
pub struct Samples {
    sorted: Vec<Duration>,
    wall: Duration,
}

impl Samples {
    pub fn new(mut latencies: Vec<Duration>, wall: Duration) -> Self {
        latencies.sort_unstable();
        Samples {
            sorted: latencies,
            wall,
        }
    }

    /// How many latencies were taken.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The wall time the workload took.
    pub fn wall(&self) -> Duration {
        self.wall
    }

    /// Operations per second over the wall time.
    pub fn rate(&self) -> f64 {
        self.sorted.len() as f64 / self.wall.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The latency at percentile `p` (0–100), nearest rank.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }
}

/// The `skiff` binary a benchmark measures: `SKIFF_BIN` if set, else the
/// one beside the benchmark's own binary (both built with `--release`),
/// else the release one (the benchmark built with `--profile bench`).
pub fn skiff_binary() -> anyhow::Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("SKIFF_BIN") {
        let bin = std::path::PathBuf::from(bin);
        anyhow::ensure!(bin.exists(), "SKIFF_BIN {} does not exist", bin.display());
        return Ok(bin);
    }
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name("skiff");
    if beside.exists() {
        return Ok(beside);
    }
    let release = exe
        .parent()
        .and_then(|dir| dir.parent())
        .map(|target| target.join("release").join("skiff"));
    match release {
        Some(bin) if bin.exists() => Ok(bin),
        _ => anyhow::bail!(
            "no skiff binary beside {} or in the release folder: run `cargo build --release -p \
             skiff` first",
            exe.display()
        ),
    }
}

/// Stops a peer server as its init script would: SIGTERM first, so that
/// nginx's and HAProxy's master processes stop their workers (a SIGKILL of
/// the master leaves the workers running, holding the ports), then SIGKILL
/// if it has not exited within two seconds.
pub fn stop(child: &mut std::process::Child) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// User + system CPU seconds a process has used so far (all its threads),
/// from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    /// Linux reports these fields in USER_HZ ticks, fixed at 100.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name (which may hold spaces);
    // utime and stime are the 14th and 15th of the whole line.
    let rest = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow::anyhow!("malformed /proc/{pid}/stat"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields
        .get(11..13)
        .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<f64>())
        .sum::<Result<f64, _>>()?;
    Ok(ticks / TICKS_PER_SECOND)
}

/// How busy one CPU is over a stretch of time, from `/proc/stat`: busy
/// is every state but idle and iowait.
pub struct CpuBusy {
    cpu: usize,
    start: Option<(u64, u64)>,
}

impl CpuBusy {
    /// Starts measuring `cpu`.
    pub fn start(cpu: usize) -> CpuBusy {
        CpuBusy {
            cpu,
            start: cpu_ticks(cpu),
        }
    }

    /// The busy share since [`CpuBusy::start`], in percent (NaN when
    /// `/proc/stat` could not be read).
    pub fn percent(&self) -> f64 {
        match (self.start, cpu_ticks(self.cpu)) {
            (Some((busy0, all0)), Some((busy1, all1))) if all1 > all0 => {
                (busy1 - busy0) as f64 * 100.0 / (all1 - all0) as f64
            }
            _ => f64::NAN,
        }
    }
}

/// Busy and total ticks of one CPU.
fn cpu_ticks(cpu: usize) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let prefix = format!("cpu{cpu} ");
    let line = stat.lines().find(|l| l.starts_with(&prefix))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let all: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((all - idle, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let ms = |n| Duration::from_millis(n);
        let samples = Samples::new((1..=100).rev().map(ms).collect(), Duration::from_secs(1));
        assert_eq!(samples.percentile(50.0), ms(50));
        assert_eq!(samples.percentile(99.0), ms(99));
        assert_eq!(samples.percentile(100.0), ms(100));
        assert_eq!(samples.rate(), 100.0);
    }
}
