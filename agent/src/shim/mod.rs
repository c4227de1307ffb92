//! The container monitor ("shim"): one small process per container that
//! owns it for its whole life, so containers outlive the agent that
//! started them, as containerd-shim and conmon do.
//!
//! [`spawn`] starts `skiff shim --state-dir DIR`, which detaches into its
//! own session, creates and starts the container with runc, writes its
//! output to a CRI log file (rotated), serves an attach socket, records
//! the exit status and exits after the container. Everything about one
//! container lives in its state directory, so an agent started later finds
//! it there: [`exit_status`], [`running`] and [`wait`] work for any shim,
//! whoever started it.
//!
//! Files in the state directory: `spec.json` (the [`ShimSpec`]),
//! `shim.pid`, `init.pid` (the container's init, written by runc),
//! `attach.sock`, `exit.json` (the [`ExitStatus`], written atomically),
//! `runc.log` (runc's own log, whose last error is the start failure) and
//! `shim.log` (the shim's diagnostics).

pub mod attach;
mod daemon;
mod logwriter;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

pub use self::daemon::main;

/// How long [`spawn`] waits for the container to be created and started.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`delete`] waits for the shim to record the exit.
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);

const SPEC_FILE: &str = "spec.json";
const SHIM_PID_FILE: &str = "shim.pid";
const INIT_PID_FILE: &str = "init.pid";
const EXIT_FILE: &str = "exit.json";
const ATTACH_SOCKET: &str = "attach.sock";
const CONSOLE_SOCKET: &str = "console.sock";
const RUNC_LOG: &str = "runc.log";
const SHIM_LOG: &str = "shim.log";

/// mimalloc's switch for transparent huge pages, read when the process
/// starts. A shim allocates little, but with THP each of its few touched
/// heap pages became a 2 MB huge page: 6 of its 9 MB. The shim gives the
/// setting (a per-process flag the kernel passes on) back to its children.
const NO_THP_ENV: (&str, &str) = ("MIMALLOC_ALLOW_THP", "0");

/// What one shim runs and where it keeps things.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimSpec {
    /// The runtime's container id.
    pub id: String,
    /// The OCI bundle (config.json and rootfs).
    pub bundle: PathBuf,
    /// The runc binary.
    pub runtime: PathBuf,
    /// runc's `--root`: where it keeps container state.
    pub runtime_root: PathBuf,
    /// The CRI log file.
    pub log_path: PathBuf,
    /// This container's state directory (created by [`spawn`]).
    pub state_dir: PathBuf,
    /// Run the container on a terminal (the bundle must say
    /// `process.terminal: true` as well).
    pub tty: bool,
    /// Keep the container's stdin open for attach.
    pub stdin: bool,
    /// Close the container's stdin when the first attach that used it ends.
    pub stdin_once: bool,
    /// Rotate the log when it would grow past this (0: never).
    pub max_log_bytes: u64,
    /// Log files kept, the live one included (as kubelet's
    /// `containerLogMaxFiles`).
    pub max_log_files: u32,
}

/// How a container ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code; 128 + the signal for a container killed by one, as
    /// kubelet reports it.
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
}

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The runtime refused; its own message.
    #[error("{0}")]
    Runtime(String),
    /// The shim ended without recording how the container ended.
    #[error("the container monitor in {0} is gone and recorded no exit status")]
    Gone(PathBuf),
    #[error("invalid shim state in {path}: {reason}")]
    State { path: PathBuf, reason: String },
}

impl ShimSpec {
    /// The spec a shim was started with, from its state directory.
    pub fn load(state_dir: &Path) -> Result<ShimSpec, ShimError> {
        let path = state_dir.join(SPEC_FILE);
        let bytes =
            std::fs::read(&path).map_err(io_error(format!("reading {}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| ShimError::State {
            path,
            reason: e.to_string(),
        })
    }
}

/// Starts a shim for `spec` with `skiff_exe shim`, and returns the
/// container's init pid once the container runs, or the runtime's error
/// when it could not start it.
pub async fn spawn(skiff_exe: &Path, spec: &ShimSpec) -> Result<u32, ShimError> {
    let dir = &spec.state_dir;
    std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
    for stale in [
        EXIT_FILE,
        INIT_PID_FILE,
        SHIM_PID_FILE,
        ATTACH_SOCKET,
        RUNC_LOG,
    ] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let json = serde_json::to_vec_pretty(spec).map_err(|e| ShimError::State {
        path: dir.join(SPEC_FILE),
        reason: e.to_string(),
    })?;
    write_atomically(&dir.join(SPEC_FILE), &json)?;

    // The first process forks the monitor and exits at once; the monitor
    // reports on this pipe when the container runs, then lets go of it.
    let mut launcher = tokio::process::Command::new(skiff_exe)
        .arg("shim")
        .arg("--state-dir")
        .arg(dir)
        .env(NO_THP_ENV.0, NO_THP_ENV.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(io_error(format!("running {} shim", skiff_exe.display())))?;
    let mut report = String::new();
    let mut pipe = launcher
        .stdout
        .take()
        .ok_or_else(|| ShimError::Runtime("the shim's stdout was not piped".into()))?;
    let read = tokio::time::timeout(START_TIMEOUT, pipe.read_to_string(&mut report)).await;
    let _ = launcher.wait().await;
    match read {
        Err(_) => {
            return Err(ShimError::Runtime(format!(
                "the container did not start within {}s",
                START_TIMEOUT.as_secs()
            )));
        }
        Ok(result) => {
            result.map_err(io_error("reading the shim's report".into()))?;
        }
    }
    daemon::parse_report(&report, dir)
}

/// Gives a runtime command (and so the container or the process it execs)
/// the machine's transparent huge page setting back: the shim and a
/// joined agent turn THP off for themselves (see [`NO_THP_ENV`]), a flag
/// the kernel passes on to children.
pub fn host_thp(command: &mut tokio::process::Command) {
    command.env_remove(NO_THP_ENV.0);
    // SAFETY: prctl is a plain system call, safe between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Turns transparent huge pages off for this process (and the children
/// it starts, unless they go through [`host_thp`]).
pub fn disable_own_thp() -> io::Result<()> {
    // SAFETY: a plain system call with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How the container ended, once it has.
pub fn exit_status(state_dir: &Path) -> Result<Option<ExitStatus>, ShimError> {
    let path = state_dir.join(EXIT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ShimError::State {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ShimError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Whether the container has not exited yet and its shim is alive.
pub fn running(state_dir: &Path) -> bool {
    !state_dir.join(EXIT_FILE).exists() && shim_alive(state_dir)
}

/// The container's init pid, as runc recorded it.
pub fn init_pid(state_dir: &Path) -> Option<u32> {
    read_pid(&state_dir.join(INIT_PID_FILE))
}

/// Resolves when the container has exited, whichever process started its
/// shim. It holds a connection to the shim's attach socket, which the shim
/// answers with the exit status.
pub async fn wait(state_dir: &Path) -> Result<ExitStatus, ShimError> {
    loop {
        if let Some(status) = exit_status(state_dir)? {
            return Ok(status);
        }
        if !shim_alive(state_dir) {
            // It may have written the file just before exiting.
            return exit_status(state_dir)?.ok_or_else(|| ShimError::Gone(state_dir.to_owned()));
        }
        match attach::Client::connect(state_dir, attach::Wants::NOTHING).await {
            Ok(mut client) => {
                // Only the exit frame or the end of the connection comes.
                while let Ok(Some(_)) = client.next().await {}
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Sends `signal` to the container's init (`runc kill`).
pub async fn kill(spec: &ShimSpec, signal: i32) -> Result<(), ShimError> {
    runc(spec, &["kill", &spec.id, &signal.to_string()]).await
}

/// Removes the container from the runtime (killing it if it still runs),
/// waits for the shim to record that, and removes the state directory.
/// The log files stay, for `kubectl logs --previous`.
pub async fn delete(spec: &ShimSpec) -> Result<(), ShimError> {
    match runc(spec, &["delete", "--force", &spec.id]).await {
        Ok(()) => {}
        Err(ShimError::Runtime(msg)) if msg.contains("does not exist") => {}
        Err(e) => return Err(e),
    }
    let deadline = tokio::time::Instant::now() + DELETE_TIMEOUT;
    while shim_alive(&spec.state_dir) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match std::fs::remove_dir_all(&spec.state_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ShimError::Io {
            what: format!("removing {}", spec.state_dir.display()),
            source: e,
        }),
    }
}

/// Runs `runc --root R ARGS`, turning a failure into its message.
async fn runc(spec: &ShimSpec, args: &[&str]) -> Result<(), ShimError> {
    let mut command = tokio::process::Command::new(&spec.runtime);
    host_thp(&mut command);
    let output = command
        .arg("--root")
        .arg(&spec.runtime_root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io_error(format!("running {}", spec.runtime.display())))?;
    if output.status.success() {
        return Ok(());
    }
    let message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    Err(ShimError::Runtime(if message.is_empty() {
        format!(
            "{} {} failed: {}",
            spec.runtime.display(),
            args.join(" "),
            output.status
        )
    } else {
        message
    }))
}

/// Whether the shim recorded in `state_dir` still runs: its pid is alive,
/// not a zombie, and its command line names this directory (pids are
/// reused).
fn shim_alive(state_dir: &Path) -> bool {
    let Some(pid) = read_pid(&state_dir.join(SHIM_PID_FILE)) else {
        return false;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let dir = state_dir.as_os_str().as_encoded_bytes();
    let names_dir = cmdline.split(|b| *b == 0).any(|arg| arg == dir);
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
        })
        .is_some_and(|state| state == 'Z' || state == 'X');
    names_dir && !zombie
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes `bytes` to `path` so that readers see the old file or the whole
/// new one, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ShimError> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(io_error(format!("writing {}", path.display())))
}

/// A path for a Unix socket named `name` in `dir` that fits the 108 bytes
/// a socket address holds: the plain path when short enough, else one
/// through `/proc/PID/fd/N` of a descriptor held open on `dir`, which any
/// process of the same user can use. The descriptor must live as long as
/// the path is used.
fn socket_path(dir: &Path, name: &str) -> io::Result<(PathBuf, Option<OwnedFd>)> {
    let plain = dir.join(name);
    if plain.as_os_str().len() < 100 {
        return Ok((plain, None));
    }
    let handle: OwnedFd = std::fs::File::open(dir)?.into();
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}/{name}",
        std::process::id(),
        handle.as_raw_fd()
    ));
    Ok((path, Some(handle)))
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> ShimError {
    move |source| ShimError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_socket_paths_go_through_proc() {
        let base = tempfile::tempdir().unwrap();
        let long = base.path().join("x".repeat(120));
        std::fs::create_dir(&long).unwrap();
        let (path, guard) = socket_path(&long, "a.sock").unwrap();
        assert!(guard.is_some());
        assert!(path.as_os_str().len() < 100, "{}", path.display());
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(long.join("a.sock").exists());
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(listener);
        let (short, guard) = socket_path(base.path(), "b.sock").unwrap();
        assert!(guard.is_none());
        assert_eq!(short, base.path().join("b.sock"));
    }

    #[test]
    fn no_exit_status_before_the_exit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(exit_status(dir.path()).unwrap().is_none());
        assert!(!running(dir.path()));
        std::fs::write(dir.path().join(EXIT_FILE), b"{").unwrap();
        assert!(matches!(
            exit_status(dir.path()),
            Err(ShimError::State { .. })
        ));
    }
}
