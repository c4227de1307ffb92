//! A pod's sandbox without a pause container: the network namespace from
//! `cni/` with the pod's IP, IPC and UTS namespaces kept alive by bind
//! mounts (the UTS one carries the pod's hostname), the pod cgroup, and a
//! folder with the pod's `/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname`. Every container of the pod joins these.
//!
//! What was made is recorded in `sandbox.json` in the pod folder, so an
//! agent started later can find and remove it.

use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use serde::{Deserialize, Serialize};

pub const RECORD: &str = "sandbox.json";

/// The pod network, as `cni/` provides it.
#[async_trait]
pub trait PodNetwork: Send + Sync {
    /// Creates the namespace `name`; returns its path.
    async fn create_netns(&self, name: &str) -> Result<PathBuf, String>;
    /// Gives the namespace an `eth0` on the node's bridge; returns its IP.
    async fn attach(&self, sandbox_id: &str, netns: &Path) -> Result<IpAddr, String>;
    /// Undoes `attach` and `create_netns`; missing pieces are not errors.
    async fn remove(&self, sandbox_id: &str, netns_name: &str) -> Result<(), String>;
}

/// What exists for one pod.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub host_network: bool,
    pub netns_name: Option<String>,
    pub netns: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    pub ip: Option<IpAddr>,
    pub cgroup: String,
    pub created: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    Network(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the pod network is not ready yet (no podCIDR for this node)")]
    NoNetwork,
}

/// Creates the namespaces and pins them.
pub async fn create(
    network: Option<Arc<dyn PodNetwork>>,
    ns_dir: &Path,
    record: &mut SandboxRecord,
    hostname: &str,
) -> Result<(), SandboxError> {
    let id = record.uid.clone();
    if record.ipc.is_none() {
        let ipc = ns_dir.join(format!("{id}-ipc"));
        let uts = ns_dir.join(format!("{id}-uts"));
        let (dir, host, ipc2, uts2) = (
            ns_dir.to_owned(),
            hostname.to_owned(),
            ipc.clone(),
            uts.clone(),
        );
        // A thread of its own, as it unshares its namespaces; awaited, not
        // joined, so pods starting together do not hold the runtime's
        // threads while their namespaces are made.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(pin_ipc_uts(&dir, &ipc2, &uts2, &host));
        });
        done_rx
            .await
            .map_err(|_| SandboxError::Network("the namespace thread panicked".into()))??;
        record.ipc = Some(ipc);
        record.uts = Some(uts);
    }
    if record.host_network {
        return Ok(());
    }
    let network = network.ok_or(SandboxError::NoNetwork)?;
    if record.netns.is_none() {
        let name = format!("skiff-{id}");
        let path = network
            .create_netns(&name)
            .await
            .map_err(SandboxError::Network)?;
        record.netns_name = Some(name);
        record.netns = Some(path);
    }
    if record.ip.is_none()
        && let Some(netns) = &record.netns
    {
        record.ip = Some(
            network
                .attach(&id, netns)
                .await
                .map_err(SandboxError::Network)?,
        );
    }
    Ok(())
}

/// Removes everything `create` made; safe to repeat.
pub async fn destroy(
    network: Option<Arc<dyn PodNetwork>>,
    record: &SandboxRecord,
) -> Result<(), SandboxError> {
    if let Some(name) = &record.netns_name {
        let network = network.ok_or(SandboxError::NoNetwork)?;
        network
            .remove(&record.uid, name)
            .await
            .map_err(SandboxError::Network)?;
    }
    for path in [&record.ipc, &record.uts].into_iter().flatten() {
        unpin(path)?;
    }
    Ok(())
}

/// Writes `record` into the pod folder.
pub fn save(pod_dir: &Path, record: &SandboxRecord) -> Result<(), SandboxError> {
    let json = serde_json::to_vec_pretty(record).map_err(|e| SandboxError::Io {
        what: "encoding the sandbox record".into(),
        source: std::io::Error::other(e),
    })?;
    let tmp = pod_dir.join(".sandbox.json.tmp");
    std::fs::write(&tmp, json).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, pod_dir.join(RECORD)).map_err(|e| io(&tmp, e))
}

pub fn load(pod_dir: &Path) -> Option<SandboxRecord> {
    let bytes = std::fs::read(pod_dir.join(RECORD)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// New IPC and UTS namespaces on this (throwaway) thread, the hostname
/// set, both bind-mounted to files so they outlive the thread.
fn pin_ipc_uts(dir: &Path, ipc: &Path, uts: &Path, hostname: &str) -> Result<(), SandboxError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for file in [ipc, uts] {
        let _ = unpin(file);
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o444)
            .open(file)
            .map_err(|e| io(file, e))?;
    }
    unshare(CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS).map_err(|e| sys("unshare", e))?;
    nix::unistd::sethostname(hostname).map_err(|e| sys("sethostname", e))?;
    for (kind, file) in [("ipc", ipc), ("uts", uts)] {
        let source = format!("/proc/thread-self/ns/{kind}");
        mount(
            Some(source.as_str()),
            file,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| sys("bind-mounting a namespace", e))?;
    }
    Ok(())
}

fn unpin(path: &Path) -> Result<(), SandboxError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(sys("unmounting a namespace", e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, e)),
    }
}

fn io(path: &Path, source: std::io::Error) -> SandboxError {
    SandboxError::Io {
        what: path.display().to_string(),
        source,
    }
}

fn sys(what: &str, e: Errno) -> SandboxError {
    SandboxError::Io {
        what: what.into(),
        source: e.into(),
    }
}
