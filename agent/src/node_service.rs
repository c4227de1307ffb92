//! Node services: helper processes an agent keeps running beside itself
//! on its node (the node-local cluster DNS), the job upstream gives a
//! DaemonSet, but tied to the agent's life. A service that exits is
//! started again after a back-off; dropping the [`NodeService`] kills
//! it, and the kernel kills it when the agent dies outright
//! (`PR_SET_PDEATHSIG`), so none outlives its agent. A crash of the
//! service does not take the agent down, and its memory is its own.
//!
//! Each service is watched by a plain thread, not a task: the kernel
//! sends the parent-death signal when the *thread* that started the
//! child ends, and an async runtime's threads may come and go. This one
//! lives until the service is dropped.

use std::io;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

use crate::Backoff;

/// A service that ran this long before exiting is restarted after the
/// first delay again, as the kubelet resets a container's back-off.
const STABLE: Duration = Duration::from_secs(60);

/// A running node service; dropping it stops the service.
pub struct NodeService {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    stopping: bool,
    /// The child while it runs. Cleared before the child is reaped, so
    /// a pid read here is never one the kernel has handed out again.
    running: Option<Pid>,
}

impl NodeService {
    /// Starts `command` as the service `name` and keeps it running,
    /// restarting it after `backoff` (doubling) whenever it exits.
    pub fn start(name: &str, mut command: Command, backoff: Backoff) -> io::Result<NodeService> {
        let agent = std::process::id();
        // SAFETY: prctl and getppid are plain system calls, safe between
        // fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // An agent that died before the prctl sends no signal.
                if u32::try_from(libc::getppid()).ok() != Some(agent) {
                    return Err(io::Error::other("the agent is gone"));
                }
                Ok(())
            });
        }
        command.stdin(std::process::Stdio::null());
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread = std::thread::Builder::new()
            .name(format!("svc-{name}").chars().take(15).collect())
            .spawn({
                let shared = shared.clone();
                let name = name.to_owned();
                move || supervise(&name, command, backoff, &shared)
            })?;
        Ok(NodeService {
            shared,
            thread: Some(thread),
        })
    }

    /// The service's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        let state = lock(&self.shared);
        state
            .running
            .and_then(|pid| u32::try_from(pid.as_raw()).ok())
    }
}

impl Drop for NodeService {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        state.stopping = true;
        if let Some(pid) = state.running {
            let _ = kill(pid, Signal::SIGKILL);
        }
        drop(state);
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the service, waits for it to exit, waits out the back-off,
/// and again, until the service is dropped.
fn supervise(name: &str, mut command: Command, backoff: Backoff, shared: &Shared) {
    let mut delay = backoff.initial;
    loop {
        let started = Instant::now();
        let child = {
            let mut state = lock(shared);
            if state.stopping {
                return;
            }
            match command.spawn() {
                Ok(child) => {
                    state.running = i32::try_from(child.id()).ok().map(Pid::from_raw);
                    Some(child)
                }
                Err(e) => {
                    tracing::error!(service = name, error = %e, "cannot start the node service");
                    None
                }
            }
        };
        if let Some(mut child) = child {
            tracing::info!(service = name, pid = child.id(), "node service started");
            wait_exited(child.id());
            lock(shared).running = None;
            let status = child.wait();
            if lock(shared).stopping {
                return;
            }
            if started.elapsed() >= STABLE {
                delay = backoff.initial;
            }
            match status {
                Ok(status) => tracing::warn!(
                    service = name, %status, restart_in = ?delay, "node service exited"
                ),
                Err(e) => tracing::warn!(
                    service = name, error = %e, restart_in = ?delay, "node service lost"
                ),
            }
        }
        let state = lock(shared);
        let (state, _) = shared
            .wake
            .wait_timeout_while(state, delay, |s| !s.stopping)
            .unwrap_or_else(PoisonError::into_inner);
        if state.stopping {
            return;
        }
        delay = (delay * 2).min(backoff.max);
    }
}

/// Blocks until the child `pid` has exited, leaving it unreaped.
fn wait_exited(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
    loop {
        match waitid(Id::Pid(Pid::from_raw(raw)), flags) {
            Err(nix::errno::Errno::EINTR) => continue,
            // Exited, or no longer ours to wait for: either way it is done.
            _ => return,
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(initial_ms: u64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(initial_ms * 4),
        }
    }

    fn alive(pid: u32) -> bool {
        // A zombie still has a /proc entry; its state is Z.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim()
                .starts_with('Z')
        })
    }

    fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_service_that_exits_is_restarted_and_drop_kills_it() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let service = NodeService::start("sleeper", command, backoff(50)).unwrap();
        let first = wait_for(|| service.pid());
        assert!(alive(first));
        kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
        let second = wait_for(|| service.pid().filter(|&p| p != first));
        assert!(alive(second));
        drop(service);
        assert!(!alive(second), "the service outlived its drop");
    }

    #[test]
    fn a_service_that_keeps_failing_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("starts");
        let mut command = Command::new("sh");
        command.args(["-c", &format!("echo x >> {}; exit 3", log.display())]);
        let service = NodeService::start("failing", command, backoff(100)).unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        drop(service);
        let starts = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        // 0, 100, 300, 700 ms (then every 400 ms): about five starts in a
        // second, far from a busy loop's hundreds.
        assert!((2..=8).contains(&starts), "{starts} starts");
    }
}
