//! The OCI runtime behind the agent: a [`Runtime`] trait and one
//! implementation that drives `runc` (or `crun`, whose command line is the
//! same) through a `skiff shim` per container, so containers outlive the
//! agent.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;

use crate::shim::{self, ExitStatus, ShimError, ShimSpec};

/// Which runtime binary to use.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// `runc` or `crun`.
    pub name: String,
    /// The binary (found on PATH when relative).
    pub binary: PathBuf,
    /// The runtime's `--root` (container state).
    pub root: PathBuf,
}

impl RuntimeConfig {
    /// `crun` only where the cgroup layout is the unified (v2) one it
    /// needs; `runc` otherwise, which also works on hybrid hierarchies.
    pub fn detect(root: PathBuf) -> RuntimeConfig {
        let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let name = if unified && which("crun").is_some() {
            "crun"
        } else {
            "runc"
        };
        RuntimeConfig {
            name: name.into(),
            binary: which(name).unwrap_or_else(|| PathBuf::from(name)),
            root,
        }
    }
}

/// Why the runtime cannot run containers, if it cannot.
pub fn problem(config: &RuntimeConfig) -> Option<String> {
    if config.binary.is_absolute() && config.binary.exists() {
        None
    } else {
        Some(format!("{} is not installed", config.name))
    }
}

/// `runc://1.1.5`-style version for the Node's system info.
pub fn version(config: &RuntimeConfig) -> String {
    let output = std::process::Command::new(&config.binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output();
    let version = output
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{}://{version}", config.name)
}

/// What a command run inside a container produced.
#[derive(Debug)]
pub struct ExecOutput {
    pub code: i32,
    pub output: String,
}

/// Runs containers: start through a shim, signal, remove, and run a
/// command inside a running one.
#[async_trait]
pub trait Runtime: Send + Sync {
    fn config(&self) -> &RuntimeConfig;
    /// Starts the container described by `spec`; returns its init pid.
    async fn start(&self, spec: &ShimSpec) -> Result<u32, ShimError>;
    /// How it ended, once it has.
    fn exit_status(&self, state_dir: &Path) -> Option<ExitStatus>;
    /// Whether it still runs.
    fn running(&self, state_dir: &Path) -> bool;
    /// Resolves when it has exited.
    async fn wait(&self, state_dir: &Path) -> Result<ExitStatus, ShimError>;
    async fn kill(&self, spec: &ShimSpec, signal: i32) -> Result<(), ShimError>;
    /// Removes it from the runtime and removes its state directory.
    async fn delete(&self, spec: &ShimSpec) -> Result<(), ShimError>;
    /// Runs `argv` inside the running container `id`, for at most `timeout`.
    async fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ShimError>;
    /// Ids of every container the runtime knows under its root.
    async fn list(&self) -> Vec<String>;
}

/// `runc`/`crun` via `skiff shim`.
pub struct OciRuntime {
    config: RuntimeConfig,
    skiff_exe: PathBuf,
}

impl OciRuntime {
    pub fn new(config: RuntimeConfig, skiff_exe: PathBuf) -> OciRuntime {
        OciRuntime { config, skiff_exe }
    }
}

#[async_trait]
impl Runtime for OciRuntime {
    fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    async fn start(&self, spec: &ShimSpec) -> Result<u32, ShimError> {
        shim::spawn(&self.skiff_exe, spec).await
    }

    fn exit_status(&self, state_dir: &Path) -> Option<ExitStatus> {
        shim::exit_status(state_dir).ok().flatten()
    }

    fn running(&self, state_dir: &Path) -> bool {
        shim::running(state_dir)
    }

    async fn wait(&self, state_dir: &Path) -> Result<ExitStatus, ShimError> {
        shim::wait(state_dir).await
    }

    async fn kill(&self, spec: &ShimSpec, signal: i32) -> Result<(), ShimError> {
        shim::kill(spec, signal).await
    }

    async fn delete(&self, spec: &ShimSpec) -> Result<(), ShimError> {
        shim::delete(spec).await
    }

    async fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ShimError> {
        let mut command = tokio::process::Command::new(&self.config.binary);
        shim::host_thp(&mut command);
        command
            .arg("--root")
            .arg(&self.config.root)
            .arg("exec")
            .arg(id)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().map_err(|e| ShimError::Io {
            what: format!("running {} exec", self.config.binary.display()),
            source: e,
        })?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Err(_) => Err(ShimError::Runtime(format!(
                "command timed out after {}s",
                timeout.as_secs_f64()
            ))),
            Ok(Err(e)) => Err(ShimError::Io {
                what: "waiting for exec".into(),
                source: e,
            }),
            Ok(Ok(output)) => {
                let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&output.stderr));
                Ok(ExecOutput {
                    code: output.status.code().unwrap_or(-1),
                    output: text,
                })
            }
        }
    }

    async fn list(&self) -> Vec<String> {
        let output = tokio::process::Command::new(&self.config.binary)
            .arg("--root")
            .arg(&self.config.root)
            .args(["list", "-q"])
            .stdin(Stdio::null())
            .output()
            .await;
        match output {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .filter(|l| !l.is_empty())
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
