//! The shim process: detach, create and start the container, copy its
//! output to the log and to attached clients, reap it, record its exit.
//!
//! It becomes a child subreaper, so the container's init (whose runc
//! parent exits after `runc create`) is re-parented to it and its exit
//! status comes straight from `waitpid`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{Mutex, broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use super::attach::{self, CLOSE_STDIN, EXIT, HELLO, RESIZE, STDERR, STDIN, STDOUT};
use super::logwriter::{LineSplitter, LogFile};
use super::{
    ATTACH_SOCKET, CONSOLE_SOCKET, EXIT_FILE, ExitStatus, INIT_PID_FILE, RUNC_LOG, SHIM_LOG,
    SHIM_PID_FILE, ShimError, ShimSpec, host_thp, io_error, socket_path, write_atomically,
};
use crate::crilog::Stream;
use crate::tty;

/// After the container exits, how long its output may take to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long attached clients get to read the exit status.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);

/// `skiff shim --state-dir DIR`. Must run before any other thread exists:
/// it forks. The calling process returns at once (its caller exits); the
/// forked one runs the container and never returns.
pub fn main(state_dir: &Path) -> Result<(), ShimError> {
    let spec = ShimSpec::load(state_dir)?;
    // The report pipe is stdout; keep it aside, closed on exec.
    let report = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_error("keeping the report pipe".into()))?;
    // SAFETY: the process is single-threaded here (see above), so the
    // child may run any code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => return Ok(()),
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(e) => {
            return Err(ShimError::Io {
                what: "forking the shim".into(),
                source: e.into(),
            });
        }
    }
    let code = match detach(&spec) {
        Ok(()) => run(spec, File::from(report)),
        Err(e) => {
            report_line(&mut File::from(report), &format!("error {e}"));
            1
        }
    };
    std::process::exit(code)
}

/// The spawner's reading of what the shim reported.
pub(super) fn parse_report(report: &str, state_dir: &Path) -> Result<u32, ShimError> {
    let line = report.lines().next().unwrap_or("");
    if let Some(pid) = line.strip_prefix("ready ") {
        return pid.trim().parse().map_err(|_| ShimError::State {
            path: state_dir.to_owned(),
            reason: format!("the shim reported {line:?}"),
        });
    }
    if let Some(message) = line.strip_prefix("error ") {
        return Err(ShimError::Runtime(message.to_owned()));
    }
    let log = std::fs::read_to_string(state_dir.join(SHIM_LOG)).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    Err(ShimError::Runtime(format!(
        "the container monitor exited without starting the container{}",
        if tail.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("; ")
            )
        }
    )))
}

/// A session of its own, stdio off the caller's terminal and pipes; logs
/// (stdout and stderr) to `shim.log`.
fn detach(spec: &ShimSpec) -> Result<(), ShimError> {
    nix::unistd::setsid().map_err(|e| ShimError::Io {
        what: "setsid".into(),
        source: e.into(),
    })?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_error("opening /dev/null".into()))?;
    let log_path = spec.state_dir.join(SHIM_LOG);
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_error(format!("opening {}", log_path.display())))?;
    let redirected = nix::unistd::dup2_stdin(&null)
        .and_then(|()| nix::unistd::dup2_stdout(&log))
        .and_then(|()| nix::unistd::dup2_stderr(&log));
    redirected.map_err(|e| ShimError::Io {
        what: "redirecting stdio".into(),
        source: e.into(),
    })?;
    write_atomically(
        &spec.state_dir.join(SHIM_PID_FILE),
        std::process::id().to_string().as_bytes(),
    )
}

fn run(spec: ShimSpec, report: File) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let mut report = report;
            report_line(
                &mut report,
                &format!("error starting the shim's runtime: {e}"),
            );
            return 1;
        }
    };
    runtime.block_on(monitor(spec, report))
}

fn report_line(report: &mut File, line: &str) {
    // A newline inside the message would cut it short for the reader.
    let line = line.replace('\n', " ");
    if let Err(e) = writeln!(report, "{line}") {
        tracing::warn!(error = %e, "could not report to the spawner");
    }
}

/// A container that runs, and what serves it.
struct Running {
    pid: Pid,
    started_at: Timestamp,
    writer: JoinHandle<()>,
    attach: JoinHandle<()>,
    shared: Arc<Shared>,
    exit: watch::Sender<Option<ExitStatus>>,
    _sockets: Vec<Option<OwnedFd>>,
}

/// What attach connections share.
struct Shared {
    stdin_once: bool,
    stdin: Mutex<Option<pipe::Sender>>,
    console: Option<OwnedFd>,
    output: broadcast::Sender<(Stream, Bytes)>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

async fn monitor(spec: ShimSpec, mut report: File) -> i32 {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
    // Listen before the container can exit, so no SIGCHLD is missed.
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            report_line(&mut report, &format!("error watching for SIGCHLD: {e}"));
            return 1;
        }
    };
    let running = match start(&spec).await {
        Ok(running) => running,
        Err(message) => {
            let _ = runc(&spec)
                .args(["delete", "--force", &spec.id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
            // No container runs: nothing here may say otherwise.
            for file in [ATTACH_SOCKET, SHIM_PID_FILE, INIT_PID_FILE] {
                let _ = std::fs::remove_file(spec.state_dir.join(file));
            }
            report_line(&mut report, &format!("error {message}"));
            return 1;
        }
    };
    report_line(&mut report, &format!("ready {}", running.pid));
    drop(report);
    tracing::info!(id = %spec.id, pid = %running.pid, "container started");

    let ended = reap(running.pid, &mut sigchld).await;
    let finished_at = Timestamp::now();
    let (code, signal) = match ended {
        WaitStatus::Exited(_, code) => (code, None),
        WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
        other => {
            tracing::warn!(?other, "unexpected wait status");
            (255, None)
        }
    };
    // Output first: whoever sees the exit status finds all of it logged.
    if tokio::time::timeout(DRAIN_TIMEOUT, running.writer)
        .await
        .is_err()
    {
        tracing::warn!("container output did not drain in time");
    }
    let status = ExitStatus {
        code,
        signal,
        started_at: running.started_at,
        finished_at,
    };
    match serde_json::to_vec(&status) {
        Ok(json) => {
            if let Err(e) = write_atomically(&spec.state_dir.join(EXIT_FILE), &json) {
                tracing::error!(error = %e, "recording the exit status");
            }
        }
        Err(e) => tracing::error!(error = %e, "encoding the exit status"),
    }
    tracing::info!(id = %spec.id, code, ?signal, "container exited");
    let _ = running.exit.send(Some(status));
    // Let attached clients read it, then stop serving.
    running.attach.abort();
    let deadline = tokio::time::Instant::now() + GOODBYE_TIMEOUT;
    while Arc::strong_count(&running.shared) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(spec.state_dir.join(ATTACH_SOCKET));
    0
}

/// Creates and starts the container; on failure, the runtime's message.
async fn start(spec: &ShimSpec) -> Result<Running, String> {
    let dir = &spec.state_dir;
    let log = LogFile::open(&spec.log_path, spec.max_log_bytes, spec.max_log_files)
        .map_err(|e| format!("opening the log {}: {e}", spec.log_path.display()))?;
    let mut sockets = Vec::new();

    let mut create = runc(spec);
    create
        .arg("create")
        .arg("--bundle")
        .arg(&spec.bundle)
        .arg("--pid-file")
        .arg(dir.join(INIT_PID_FILE));
    // The container's ends of its stdio, and ours.
    let mut ours = Stdio3::default();
    let console_listener = if spec.tty {
        let _ = std::fs::remove_file(dir.join(CONSOLE_SOCKET));
        let (path, guard) =
            socket_path(dir, CONSOLE_SOCKET).map_err(|e| format!("console socket: {e}"))?;
        sockets.push(guard);
        let listener =
            UnixListener::bind(&path).map_err(|e| format!("binding the console socket: {e}"))?;
        create.arg("--console-socket").arg(&path);
        create
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Some(listener)
    } else {
        let (out_r, out_w) = pipe_pair()?;
        let (err_r, err_w) = pipe_pair()?;
        ours.stdout = Some(out_r);
        ours.stderr = Some(err_r);
        if spec.stdin {
            let (in_r, in_w) = pipe_pair()?;
            ours.stdin = Some(in_w);
            create.stdin(Stdio::from(in_r));
        } else {
            create.stdin(Stdio::null());
        }
        create.stdout(Stdio::from(out_w)).stderr(Stdio::from(err_w));
        None
    };
    create.arg(&spec.id);
    let mut child = create
        .spawn()
        .map_err(|e| format!("running {}: {e}", spec.runtime.display()))?;
    // Our copies of the container's ends must go, or its pipes never end.
    drop(create);

    let mut console = None;
    if let Some(listener) = console_listener {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.map_err(|e| format!("console socket: {e}"))?;
                console = Some(receive_console(stream).await?);
            }
            status = child.wait() => {
                let status = status.map_err(|e| format!("waiting for runc create: {e}"))?;
                return Err(runtime_error(dir, "create", status));
            }
        }
        let _ = std::fs::remove_file(dir.join(CONSOLE_SOCKET));
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for runc create: {e}"))?;
    if !status.success() {
        return Err(runtime_error(dir, "create", status));
    }
    let pid = super::init_pid(dir)
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw)
        .ok_or_else(|| "runc wrote no container pid".to_owned())?;

    // Output goes to the log and to whoever is attached.
    let (output, _) = broadcast::channel(256);
    let (records, received) = mpsc::channel(64);
    let mut stdin = None;
    if let Some(master) = &console {
        let reader = master.try_clone().map_err(|e| format!("console: {e}"))?;
        spawn_pump(reader, Stream::Stdout, &records, &output)?;
        if spec.stdin {
            let writer = master.try_clone().map_err(|e| format!("console: {e}"))?;
            stdin = Some(
                pipe::Sender::from_owned_fd_unchecked(writer)
                    .map_err(|e| format!("console: {e}"))?,
            );
        }
    } else {
        if let Some(fd) = ours.stdout.take() {
            spawn_pump(fd, Stream::Stdout, &records, &output)?;
        }
        if let Some(fd) = ours.stderr.take() {
            spawn_pump(fd, Stream::Stderr, &records, &output)?;
        }
        if let Some(fd) = ours.stdin.take() {
            stdin = Some(pipe::Sender::from_owned_fd(fd).map_err(|e| format!("stdin: {e}"))?);
        }
    }
    drop(records);
    let writer = tokio::spawn(write_log(log, received));

    let (exit, exit_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        stdin_once: spec.stdin_once,
        stdin: Mutex::new(stdin),
        console,
        output,
        exit: exit_rx,
    });
    let _ = std::fs::remove_file(dir.join(ATTACH_SOCKET));
    let (path, guard) =
        socket_path(dir, ATTACH_SOCKET).map_err(|e| format!("attach socket: {e}"))?;
    sockets.push(guard);
    let listener =
        UnixListener::bind(&path).map_err(|e| format!("binding the attach socket: {e}"))?;
    let attach = tokio::spawn(serve_attach(listener, shared.clone()));

    let status = runc(spec)
        .arg("start")
        .arg(&spec.id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("running {}: {e}", spec.runtime.display()))?;
    if !status.success() {
        attach.abort();
        return Err(runtime_error(dir, "start", status));
    }
    Ok(Running {
        pid,
        started_at: Timestamp::now(),
        writer,
        attach,
        shared,
        exit,
        _sockets: sockets,
    })
}

#[derive(Default)]
struct Stdio3 {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("creating a pipe: {e}"))
}

/// `runc --root R --log state/runc.log --log-format json`, with the
/// machine's transparent huge page setting back (see [`NO_THP_ENV`]).
fn runc(spec: &ShimSpec) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&spec.runtime);
    host_thp(&mut command);
    command
        .arg("--root")
        .arg(&spec.runtime_root)
        .arg("--log")
        .arg(spec.state_dir.join(RUNC_LOG))
        .arg("--log-format")
        .arg("json");
    command
}

/// runc's own words for a failure: the last error in its JSON log.
fn runtime_error(dir: &Path, verb: &str, status: std::process::ExitStatus) -> String {
    let log = std::fs::read_to_string(dir.join(RUNC_LOG)).unwrap_or_default();
    log.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["level"] == "error")
        .and_then(|entry| entry["msg"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("runc {verb} failed: {status}"))
}

async fn receive_console(stream: UnixStream) -> Result<OwnedFd, String> {
    let stream = stream
        .into_std()
        .map_err(|e| format!("console socket: {e}"))?;
    tokio::task::spawn_blocking(move || {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        tty::receive_console(&stream)
    })
    .await
    .map_err(|e| format!("console socket: {e}"))?
    .map_err(|e| format!("receiving the console: {e}"))
}

fn spawn_pump(
    fd: OwnedFd,
    stream: Stream,
    records: &mpsc::Sender<Vec<u8>>,
    output: &broadcast::Sender<(Stream, Bytes)>,
) -> Result<(), String> {
    // A terminal's master is no pipe, but reads the same way.
    let reader = pipe::Receiver::from_owned_fd_unchecked(fd)
        .map_err(|e| format!("reading container output: {e}"))?;
    tokio::spawn(pump(reader, stream, records.clone(), output.clone()));
    Ok(())
}

async fn pump(
    mut reader: pipe::Receiver,
    stream: Stream,
    records: mpsc::Sender<Vec<u8>>,
    output: broadcast::Sender<(Stream, Bytes)>,
) {
    let mut splitter = LineSplitter::new(stream);
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        // A terminal whose container side is closed reads EIO: the end.
        let n = match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buffer[..n];
        if output.receiver_count() > 0 {
            let _ = output.send((stream, Bytes::copy_from_slice(data)));
        }
        let mut batch = Vec::with_capacity(n + 64);
        splitter.push(data, Timestamp::now(), &mut batch);
        if !batch.is_empty() && records.send(batch).await.is_err() {
            return;
        }
    }
    let mut batch = Vec::new();
    splitter.finish(Timestamp::now(), &mut batch);
    if !batch.is_empty() {
        let _ = records.send(batch).await;
    }
}

async fn write_log(mut log: LogFile, mut records: mpsc::Receiver<Vec<u8>>) {
    while let Some(batch) = records.recv().await {
        if let Err(e) = log.write(&batch) {
            tracing::warn!(error = %e, "writing the container log");
        }
    }
}

/// Waits for `pid` to exit, reaping any other orphan that comes along.
async fn reap(pid: Pid, sigchld: &mut Signal) -> WaitStatus {
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) if status.pid() == Some(pid) => return status,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    // Not our child after all (no subreaper): watch /proc.
                    while Path::new(&format!("/proc/{pid}")).exists() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    tracing::warn!(%pid, "the container's exit status could not be read");
                    return WaitStatus::Exited(pid, 255);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid");
                    break;
                }
            }
        }
        // A missed signal costs at most a second.
        let _ = tokio::time::timeout(Duration::from_secs(1), sigchld.recv()).await;
    }
}

async fn serve_attach(listener: UnixListener, shared: Arc<Shared>) {
    while let Ok((stream, _)) = listener.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = attached(stream, &shared).await {
                tracing::debug!(error = %e, "attach connection ended");
            }
        });
    }
}

async fn attached(stream: UnixStream, shared: &Shared) -> std::io::Result<()> {
    let (mut reader, mut writer) = stream.into_split();
    let wants = match attach::read_frame(&mut reader).await? {
        Some((HELLO, flags)) if flags.len() == 3 => attach::Wants {
            stdin: flags[0] != 0,
            stdout: flags[1] != 0,
            stderr: flags[2] != 0,
        },
        _ => return Ok(()),
    };
    let mut output = shared.output.subscribe();
    let mut output_open = true;
    let mut exit = shared.exit.clone();
    // Frames are read in a task of their own: a read cut short by the
    // select below would lose the part of a frame already read.
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel(16);
    let reading = tokio::spawn(async move {
        loop {
            let frame = attach::read_frame(&mut reader).await;
            let end = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || end {
                return;
            }
        }
    });
    let result = async {
        loop {
            let ended = exit.borrow_and_update().clone();
            if let Some(status) = ended {
                // Whatever output is still queued goes first.
                while let Ok((stream, data)) = output.try_recv() {
                    send_output(&mut writer, wants, stream, &data).await?;
                }
                let json = serde_json::to_vec(&status).map_err(std::io::Error::other)?;
                attach::write_frame(&mut writer, EXIT, &json).await?;
                return Ok(());
            }
            tokio::select! {
                biased;
                item = output.recv(), if output_open => match item {
                    Ok((stream, data)) => send_output(&mut writer, wants, stream, &data).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => output_open = false,
                },
                frame = frames.recv() => match frame.unwrap_or(Ok(None))? {
                    None => return Ok(()),
                    Some((STDIN, data)) if wants.stdin => {
                        let mut stdin = shared.stdin.lock().await;
                        if let Some(pipe) = stdin.as_mut()
                            && pipe.write_all(&data).await.is_err()
                        {
                            *stdin = None;
                        }
                    }
                    Some((CLOSE_STDIN, _)) if wants.stdin && shared.stdin_once => {
                        *shared.stdin.lock().await = None;
                    }
                    Some((RESIZE, size)) => {
                        if let (Some(console), Some((w, h))) =
                            (&shared.console, attach::parse_resize(&size))
                            && let Err(e) = tty::resize(console.as_fd(), w, h)
                        {
                            tracing::debug!(error = %e, "resizing the console");
                        }
                    }
                    Some(_) => {}
                },
                _ = exit.changed() => {}
            }
        }
    }
    .await;
    reading.abort();
    if wants.stdin && shared.stdin_once {
        *shared.stdin.lock().await = None;
    }
    result
}

async fn send_output(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    wants: attach::Wants,
    stream: Stream,
    data: &[u8],
) -> std::io::Result<()> {
    match stream {
        Stream::Stdout if wants.stdout => attach::write_frame(writer, STDOUT, data).await,
        Stream::Stderr if wants.stderr => attach::write_frame(writer, STDERR, data).await,
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(parse_report("ready 42\n", dir.path()).unwrap(), 42);
        let e = parse_report("error exec: \"foo\": not found\n", dir.path()).unwrap_err();
        assert_eq!(e.to_string(), "exec: \"foo\": not found");
        std::fs::write(dir.path().join(SHIM_LOG), "boom\n").unwrap();
        let e = parse_report("", dir.path()).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
    }
}
