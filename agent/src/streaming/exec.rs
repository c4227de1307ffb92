//! The processes behind exec and attach sessions: `runc exec` in the
//! container (with pipes, or on a pseudoterminal of ours for a tty), and
//! an attach to the container's shim.
//!
//! runc hands a console over `--console-socket` only when it detaches,
//! and a detached exec's exit status would go to whoever reaps it. So a
//! tty exec runs runc in the foreground on a pty we own: runc puts its own
//! terminal in raw mode, copies between it and the container's console,
//! and passes on window sizes when SIGWINCH tells it ours changed (which
//! the kernel sends runc's process group when we resize the pty).

use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ContainerRef;
use super::session::{Io, Outcome, Process};
use crate::shim::attach;
use crate::tty;

/// After the process ends, how long its output may take to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// `runc exec` of `command` in `container`.
pub fn runc_exec(container: &ContainerRef, command: Vec<String>, tty: bool) -> Process {
    let container = container.clone();
    Box::new(move |io| {
        Box::pin(async move {
            let result = if tty {
                exec_on_pty(&container, &command, io).await
            } else {
                exec_with_pipes(&container, &command, io).await
            };
            result.unwrap_or_else(Outcome::Failed)
        })
    })
}

/// Attaches to the container's main process through its shim.
pub fn attach(container: &ContainerRef) -> Process {
    let state_dir = container.state_dir.clone();
    Box::new(move |io| {
        Box::pin(async move {
            let wants = attach::Wants {
                stdin: io.stdin.is_some(),
                stdout: io.stdout.is_some(),
                stderr: io.stderr.is_some(),
            };
            let client = match attach::Client::connect(&state_dir, wants).await {
                Ok(client) => client,
                Err(e) => return Outcome::Failed(format!("attaching to the container: {e}")),
            };
            let (mut events, mut input) = client.split();
            let gone = io.client_gone();
            let Io {
                stdin,
                resize,
                stdout,
                stderr,
                ..
            } = io;
            let forward_input = tokio::spawn(async move {
                let mut stdin = stdin;
                let mut resize = resize;
                loop {
                    tokio::select! {
                        data = recv(&mut stdin) => match data {
                            Some(data) => {
                                if input.stdin(&data).await.is_err() {
                                    return;
                                }
                            }
                            None => {
                                stdin = None;
                                let _ = input.close_stdin().await;
                            }
                        },
                        size = recv(&mut resize) => match size {
                            Some(size) => {
                                let _ = input.resize(size.width, size.height).await;
                            }
                            None => resize = None,
                        },
                    }
                    if stdin.is_none() && resize.is_none() {
                        break;
                    }
                }
                // The shim takes the end of our side of the socket for a
                // detach: hold it open until the output has ended.
                let _input = input;
                std::future::pending::<()>().await;
            });
            let output = async {
                // As kubelet: attach ends without an exit code of its own.
                while let Ok(Some(event)) = events.next().await {
                    let (sink, data) = match event {
                        attach::Event::Stdout(data) => (&stdout, data),
                        attach::Event::Stderr(data) => (&stderr, data),
                        attach::Event::Exit(_) => break,
                    };
                    if let Some(sink) = sink {
                        let _ = sink.send(data).await;
                    }
                }
            };
            tokio::select! {
                () = output => {}
                () = gone => {}
            }
            forward_input.abort();
            Outcome::Exited(0)
        })
    })
}

/// The next item of an optional channel; pending forever when there is
/// none, so a `select!` branch on it never fires.
async fn recv<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn runc_command(container: &ContainerRef) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&container.runtime);
    crate::shim::host_thp(&mut command);
    command
        .arg("--root")
        .arg(&container.runtime_root)
        .arg("exec");
    command
}

async fn exec_with_pipes(
    container: &ContainerRef,
    command: &[String],
    io: Io,
) -> Result<Outcome, String> {
    let mut runc = runc_command(container);
    runc.arg(&container.id)
        .args(command)
        .stdin(piped_if(io.stdin.is_some()))
        .stdout(piped_if(io.stdout.is_some()))
        .stderr(piped_if(io.stderr.is_some()));
    let mut child = runc
        .spawn()
        .map_err(|e| format!("running {}: {e}", container.runtime.display()))?;
    let gone = io.client_gone();
    let Io {
        stdin,
        stdout,
        stderr,
        ..
    } = io;
    let feeding = match (stdin, child.stdin.take()) {
        (Some(rx), Some(pipe)) => Some(tokio::spawn(feed(rx, pipe))),
        _ => None,
    };
    let mut pumps = Vec::new();
    if let (Some(tx), Some(pipe)) = (stdout, child.stdout.take()) {
        pumps.push(tokio::spawn(pump(pipe, tx)));
    }
    if let (Some(tx), Some(pipe)) = (stderr, child.stderr.take()) {
        pumps.push(tokio::spawn(pump(pipe, tx)));
    }
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| format!("waiting for runc exec: {e}"))?,
        // Nobody to report to: the process keeps running, as with kubelet.
        () = gone => return Ok(Outcome::Failed("the client went away".into())),
    };
    drain(pumps).await;
    if let Some(feeding) = feeding {
        feeding.abort();
    }
    Ok(Outcome::Exited(exit_code(status)))
}

async fn exec_on_pty(
    container: &ContainerRef,
    command: &[String],
    io: Io,
) -> Result<Outcome, String> {
    let (master, slave) = tty::open_pty().map_err(|e| format!("allocating a terminal: {e}"))?;
    let stdio = |fd: &OwnedFd| {
        fd.try_clone()
            .map(Stdio::from)
            .map_err(|e| format!("terminal: {e}"))
    };
    let mut runc = runc_command(container);
    runc.arg("--tty")
        .arg(&container.id)
        .args(command)
        .stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(stdio(&slave)?);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        runc.pre_exec(|| {
            // runc's own session, with our pty as its controlling
            // terminal: resizing the pty signals it.
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = runc
        .spawn()
        .map_err(|e| format!("running {}: {e}", container.runtime.display()))?;
    drop(runc);
    drop(slave);
    let gone = io.client_gone();
    let Io {
        stdin,
        resize,
        stdout,
        ..
    } = io;
    let clone = |what: &str| {
        master
            .try_clone()
            .map_err(|e| format!("terminal ({what}): {e}"))
    };
    let mut pumps = Vec::new();
    if let Some(tx) = stdout {
        let reader = pipe::Receiver::from_owned_fd_unchecked(clone("output")?)
            .map_err(|e| format!("terminal: {e}"))?;
        pumps.push(tokio::spawn(pump(reader, tx)));
    }
    let feeding = match stdin {
        Some(rx) => {
            let writer = pipe::Sender::from_owned_fd_unchecked(clone("input")?)
                .map_err(|e| format!("terminal: {e}"))?;
            Some(tokio::spawn(feed(rx, writer)))
        }
        None => None,
    };
    let resizing = resize.map(|mut rx| {
        let console = clone("resize");
        tokio::spawn(async move {
            let Ok(console) = console else { return };
            while let Some(size) = rx.recv().await {
                if let Err(e) = tty::resize(console.as_fd(), size.width, size.height) {
                    tracing::debug!(error = %e, "resizing an exec terminal");
                }
            }
        })
    });
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| format!("waiting for runc exec: {e}"))?,
        () = gone => return Ok(Outcome::Failed("the client went away".into())),
    };
    // The terminal's output ends (EIO) once no one holds its other end.
    drain(pumps).await;
    for task in [feeding, resizing].into_iter().flatten() {
        task.abort();
    }
    Ok(Outcome::Exited(exit_code(status)))
}

fn piped_if(wanted: bool) -> Stdio {
    if wanted {
        Stdio::piped()
    } else {
        Stdio::null()
    }
}

/// runc's exit status is the process's (128 + the signal if one killed
/// runc itself).
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

async fn pump<R: AsyncRead + Unpin>(mut reader: R, tx: mpsc::Sender<Bytes>) {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(Bytes::copy_from_slice(&buffer[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Client stdin into the process; its end closes the process's stdin.
async fn feed<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Bytes>, mut writer: W) {
    while let Some(data) = rx.recv().await {
        if writer.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

async fn drain(pumps: Vec<JoinHandle<()>>) {
    for pump in pumps {
        let abort = pump.abort_handle();
        if tokio::time::timeout(DRAIN_TIMEOUT, pump).await.is_err() {
            abort.abort();
        }
    }
}
