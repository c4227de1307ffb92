//! STAND-IN for helper-shim's `agent::shim` (same interface), deleted when
//! the real one is merged: runs `runc run` under `setsid sh` and records
//! the exit code. No CRI log format, no attach.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimSpec {
    pub id: String,
    pub bundle: PathBuf,
    pub runtime: PathBuf,
    pub runtime_root: PathBuf,
    pub log_path: PathBuf,
    pub state_dir: PathBuf,
    pub tty: bool,
    pub stdin: bool,
    pub stdin_once: bool,
    pub max_log_bytes: u64,
    pub max_log_files: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: i32,
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
        source: std::io::Error,
    },
    #[error("{0}")]
    Runtime(String),
}

impl ShimSpec {
    pub fn load(state_dir: &Path) -> Result<ShimSpec, ShimError> {
        let bytes = std::fs::read(state_dir.join("spec.json")).map_err(|e| ShimError::Io {
            what: "spec".into(),
            source: e,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ShimError::Runtime(e.to_string()))
    }
}

pub async fn spawn(_skiff_exe: &Path, spec: &ShimSpec) -> Result<u32, ShimError> {
    let io = |e| ShimError::Io {
        what: "shim".into(),
        source: e,
    };
    std::fs::create_dir_all(&spec.state_dir).map_err(io)?;
    let _ = std::fs::remove_file(spec.state_dir.join("exit"));
    std::fs::write(
        spec.state_dir.join("spec.json"),
        serde_json::to_vec(spec).unwrap_or_default(),
    )
    .map_err(io)?;
    std::fs::write(spec.state_dir.join("started"), Timestamp::now().to_string()).map_err(io)?;
    let script = format!(
        "{rt} --root {root} run --bundle {b} {id} >>{log} 2>&1 </dev/null; echo $? > {s}/exit.tmp; mv {s}/exit.tmp {s}/exit",
        rt = spec.runtime.display(),
        root = spec.runtime_root.display(),
        b = spec.bundle.display(),
        id = spec.id,
        log = spec.log_path.display(),
        s = spec.state_dir.display()
    );
    std::process::Command::new("setsid")
        .args(["-f", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io)?;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if spec.state_dir.join("exit").exists() || is_running(spec).await {
            return Ok(1);
        }
    }
    Err(ShimError::Runtime("container did not start".into()))
}

async fn is_running(spec: &ShimSpec) -> bool {
    tokio::process::Command::new(&spec.runtime)
        .arg("--root")
        .arg(&spec.runtime_root)
        .args(["state", &spec.id])
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

pub fn exit_status(state_dir: &Path) -> Result<Option<ExitStatus>, ShimError> {
    let Ok(text) = std::fs::read_to_string(state_dir.join("exit")) else {
        return Ok(None);
    };
    let raw: i32 = text.trim().parse().unwrap_or(255);
    let started = std::fs::read_to_string(state_dir.join("started"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(Timestamp::now);
    let finished = std::fs::metadata(state_dir.join("exit"))
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| Timestamp::try_from(t).ok())
        .unwrap_or_else(Timestamp::now);
    Ok(Some(ExitStatus {
        code: raw,
        signal: (raw > 128).then_some(raw - 128),
        started_at: started,
        finished_at: finished,
    }))
}

pub fn running(state_dir: &Path) -> bool {
    !state_dir.join("exit").exists() && state_dir.join("spec.json").exists()
}

pub async fn wait(state_dir: &Path) -> Result<ExitStatus, ShimError> {
    loop {
        if let Some(s) = exit_status(state_dir)? {
            return Ok(s);
        }
        if !state_dir.exists() {
            return Err(ShimError::Runtime("gone".into()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn kill(spec: &ShimSpec, signal: i32) -> Result<(), ShimError> {
    runc(spec, &["kill", &spec.id, &signal.to_string()]).await
}

pub async fn delete(spec: &ShimSpec) -> Result<(), ShimError> {
    let _ = runc(spec, &["delete", "--force", &spec.id]).await;
    for _ in 0..50 {
        if !running(&spec.state_dir) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(&spec.state_dir);
    Ok(())
}

async fn runc(spec: &ShimSpec, args: &[&str]) -> Result<(), ShimError> {
    let o = tokio::process::Command::new(&spec.runtime)
        .arg("--root")
        .arg(&spec.runtime_root)
        .args(args)
        .output()
        .await
        .map_err(|e| ShimError::Io {
            what: "runc".into(),
            source: e,
        })?;
    if o.status.success() {
        Ok(())
    } else {
        Err(ShimError::Runtime(
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    }
}
