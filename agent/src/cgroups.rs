//! Pod cgroups on the v1 (hybrid) hierarchies: one parent per pod under a
//! QoS-class folder, as upstream lays out `kubepods`, with the pod's
//! summed limits; container cgroups below it are made by the runtime.
//! Also reads usage for metrics and the OOM-kill counter.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

use crate::resources::{self, Qos};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Controllers the agent makes pod folders in.
const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "cpuset"];
/// The v2 hierarchy of a hybrid host, where runc also puts each container
/// (and where the data plane attaches its connect-time Service balancing
/// to `/skiff/<node>`): the agent removes the pod's folder there too.
const UNIFIED: &str = "unified";
/// Upstream's CFS period.
const CPU_PERIOD: u64 = 100_000;

/// Where one node's pods live in every hierarchy: `/skiff/<node>`.
#[derive(Clone, Debug)]
pub struct CgroupLayout {
    base: String,
}

impl CgroupLayout {
    pub fn new(node: &str) -> CgroupLayout {
        CgroupLayout {
            base: format!("/skiff/{node}"),
        }
    }

    /// The pod's cgroup path relative to each hierarchy's root.
    pub fn pod_path(&self, qos: Qos, uid: &str) -> String {
        match qos {
            Qos::Guaranteed => format!("{}/pod{uid}", self.base),
            Qos::Burstable => format!("{}/burstable/pod{uid}", self.base),
            Qos::BestEffort => format!("{}/besteffort/pod{uid}", self.base),
        }
    }

    /// Every pod folder that exists, as (QoS path, uid).
    pub fn existing_pods(&self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for sub in ["", "/burstable", "/besteffort"] {
            let rel = format!("{}{sub}", self.base);
            let Ok(entries) = std::fs::read_dir(dir("memory", &rel)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(uid) = name.strip_prefix("pod") {
                    found.push((format!("{rel}/{name}"), uid.to_owned()));
                }
            }
        }
        found
    }
}

/// Creates the pod's folders and writes its limits. Errors writing a
/// limit are logged, not fatal: the containers still get their own.
pub fn create_pod(path: &str, pod: &Pod) -> std::io::Result<()> {
    for controller in CONTROLLERS {
        let d = dir(controller, path);
        std::fs::create_dir_all(&d)?;
        if controller == "cpuset" {
            // A new cpuset folder is empty; it must inherit before tasks can join.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                inherit(&d, file);
            }
        }
    }
    let totals = resources::pod_totals(pod);
    let cpu_shares = resources::cpu_shares(totals.cpu_request_millis);
    write(
        &dir("cpu", path).join("cpu.shares"),
        &cpu_shares.to_string(),
    );
    if let Some(limit) = totals.cpu_limit_millis {
        let quota = limit * CPU_PERIOD / 1000;
        write(
            &dir("cpu", path).join("cpu.cfs_period_us"),
            &CPU_PERIOD.to_string(),
        );
        write(
            &dir("cpu", path).join("cpu.cfs_quota_us"),
            &quota.max(1000).to_string(),
        );
    }
    if let Some(limit) = totals.memory_limit {
        write(
            &dir("memory", path).join("memory.limit_in_bytes"),
            &limit.to_string(),
        );
    }
    Ok(())
}

/// Removes the pod's folders (children first). Folders still holding
/// tasks stay and the error says so.
pub fn remove_pod(path: &str) -> std::io::Result<()> {
    let mut last = Ok(());
    for controller in CONTROLLERS.into_iter().chain([UNIFIED]) {
        if let Err(e) = remove_tree(&dir(controller, path)) {
            last = Err(e);
        }
    }
    last
}

/// Removes the node's now-empty QoS folders and base (for tests and
/// clean shutdown).
pub fn remove_layout(layout: &CgroupLayout) {
    for controller in CONTROLLERS {
        let _ = remove_tree(&dir(controller, &layout.base));
    }
}

/// CPU time (ns) and memory working set (bytes) of a cgroup.
pub fn usage(path: &str) -> Option<(u64, u64)> {
    let cpu = read_u64(&dir("cpuacct", path).join("cpuacct.usage"))?;
    let mem = read_u64(&dir("memory", path).join("memory.usage_in_bytes"))?;
    // Working set as upstream: usage minus inactive file pages.
    let inactive = std::fs::read_to_string(dir("memory", path).join("memory.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("total_inactive_file "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Some((cpu, mem.saturating_sub(inactive)))
}

/// How many processes the kernel's OOM killer killed in this cgroup.
pub fn oom_kills(path: &str) -> u64 {
    std::fs::read_to_string(dir("memory", path).join("memory.oom_control"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn dir(controller: &str, path: &str) -> PathBuf {
    Path::new(CGROUP_ROOT)
        .join(controller)
        .join(path.trim_start_matches('/'))
}

/// An empty cpuset file takes its parent's value, parents first.
fn inherit(d: &Path, file: &str) {
    let empty = |p: &Path| std::fs::read_to_string(p.join(file)).is_ok_and(|v| v.trim().is_empty());
    if !empty(d) {
        return;
    }
    let Some(parent) = d.parent() else { return };
    inherit(parent, file);
    if let Ok(value) = std::fs::read_to_string(parent.join(file)) {
        write(&d.join(file), value.trim());
    }
}

fn write(path: &Path, value: &str) {
    if let Err(e) = std::fs::write(path, value) {
        tracing::warn!(path = %path.display(), value, error = %e, "cannot write a cgroup setting");
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// cgroup folders are removed with rmdir, deepest first.
fn remove_tree(d: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(d) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
