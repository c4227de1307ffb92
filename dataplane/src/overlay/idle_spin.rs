//! Busy-polling on idle CPUs (`--busy-poll-us`).
//!
//! A packet loop that sleeps in `poll` between packets makes every sparse
//! packet wait for a thread to wake on each node it crosses; on a virtual
//! machine whose idle CPUs halt, that wake costs tens of microseconds (the
//! overlay bench's ping, 10 ms apart, measured +96 to +216 µs over kernel
//! VXLAN with sleeping loops, and +3 to +78 µs, median +37, with 20 ms of
//! this). Polling on for a while after the last packet removes the wake,
//! and it costs nothing but power while no other task wants the CPU. So the loop keeps polling
//! only while the machine's runnable tasks fit its CPUs; once another task
//! has waited longer than [`CONTENTION_GRACE`], it sleeps until the next
//! packet. Off by default: an idle node with a packet every few
//! milliseconds keeps a CPU busy.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// How long other tasks may wait for a CPU before the loop stops polling.
/// Longer than a short-lived task's turn (a ping answering, a request
/// handled) so that those do not end the polling, short against a
/// scheduler's time slice.
const CONTENTION_GRACE: Duration = Duration::from_micros(200);

pub struct IdleSpin {
    budget: Duration,
    /// Polling stops here (the last packet plus the budget, or earlier).
    until: Instant,
    contended_since: Option<Instant>,
    loadavg: File,
    cpus: usize,
    buf: [u8; 128],
}

/// The longest budget: more only keeps a CPU busy longer, and each packet
/// adds the budget to the current instant, which a huge one would overflow.
const MAX_BUDGET: Duration = Duration::from_secs(1);

impl IdleSpin {
    /// Polls for up to `budget` (at most [`MAX_BUDGET`]) after each packet;
    /// `None` when the budget is zero or the machine's run queue cannot be
    /// read.
    pub fn new(budget: Duration) -> Option<Self> {
        if budget.is_zero() {
            return None;
        }
        let budget = budget.min(MAX_BUDGET);
        let loadavg = match File::open("/proc/loadavg") {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(error = %e, "busy polling is off: cannot read /proc/loadavg");
                return None;
            }
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some(IdleSpin {
            budget,
            until: Instant::now(),
            contended_since: None,
            loadavg,
            cpus,
            buf: [0; 128],
        })
    }

    /// A packet was handled at `now`.
    pub fn restart(&mut self, now: Instant) {
        self.until = now + self.budget;
        self.contended_since = None;
    }

    /// Whether to keep polling instead of sleeping.
    pub fn keep_polling(&mut self, now: Instant) -> bool {
        if now >= self.until {
            return false;
        }
        let Some(runnable) = self.runnable() else {
            self.until = now;
            return false;
        };
        if runnable <= self.cpus {
            self.contended_since = None;
            return true;
        }
        let since = *self.contended_since.get_or_insert(now);
        if now.duration_since(since) > CONTENTION_GRACE {
            self.until = now;
            return false;
        }
        true
    }

    /// Runnable tasks on the machine, this one included.
    fn runnable(&mut self) -> Option<usize> {
        let n = self.loadavg.read_at(&mut self.buf, 0).ok()?;
        runnable_tasks(&self.buf[..n])
    }
}

/// The running count of `/proc/loadavg` ("0.45 1.47 1.73 2/345 12345").
fn runnable_tasks(loadavg: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(loadavg).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split_once('/')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_running_count_and_refuses_anything_else() {
        assert_eq!(runnable_tasks(b"0.45 1.47 1.73 2/345 12345\n"), Some(2));
        assert_eq!(runnable_tasks(b"0.00 0.00 0.00 17/90 1\n"), Some(17));
        assert_eq!(runnable_tasks(b"0.45 1.47 1.73"), None);
        assert_eq!(runnable_tasks(b"0.45 1.47 1.73 x/345 1"), None);
        assert_eq!(runnable_tasks(b"\xff\xfe"), None);
    }

    #[test]
    fn polls_only_within_the_budget() {
        let Some(mut spin) = IdleSpin::new(Duration::from_millis(5)) else {
            return;
        };
        let now = Instant::now();
        assert!(!spin.keep_polling(now), "no packet yet");
        spin.restart(now);
        assert!(!spin.keep_polling(now + Duration::from_millis(6)));
        assert!(IdleSpin::new(Duration::ZERO).is_none());
        // A budget too large to add to an instant is cut to the longest.
        if let Some(mut spin) = IdleSpin::new(Duration::MAX) {
            spin.restart(now);
            assert!(!spin.keep_polling(now + MAX_BUDGET + Duration::from_millis(1)));
        }
    }
}
