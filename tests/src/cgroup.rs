//! cgroup v2 folders standing in for the node agent's pod cgroups, so that
//! what a test runs "in a pod" meets what the node's data plane attaches
//! to the node's pod cgroup (connect-time Service balancing). The whole
//! tree goes on drop, after the processes still in it are killed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;

/// A cgroup folder (and everything below it) removed on drop.
pub struct Cgroup {
    root: PathBuf,
    relative: String,
    path: PathBuf,
}

impl Cgroup {
    /// Creates `relative` below the cgroup v2 root; `None` when this
    /// machine mounts no v2 hierarchy or refuses the folder.
    pub fn create(relative: &str) -> Option<Cgroup> {
        let root = v2_root()?;
        let path = root.join(relative);
        if let Err(e) = std::fs::create_dir_all(&path) {
            eprintln!("no test cgroup {}: {e}", path.display());
            return None;
        }
        Some(Cgroup {
            root,
            relative: relative.to_owned(),
            path,
        })
    }

    /// The path below the hierarchy's root (what `--pod-cgroup` takes).
    pub fn relative(&self) -> &str {
        &self.relative
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Never kill the test itself (see `JOINS`).
        if let Ok(home) = home() {
            let _ = move_to(home);
        }
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        // Killed processes leave their cgroups a moment later.
        for _ in 0..100 {
            if remove_tree(&self.path) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The parents this test made, if nothing else uses them now.
        for parent in Path::new(&self.relative).ancestors().skip(1) {
            if parent.as_os_str().is_empty() || std::fs::remove_dir(self.root.join(parent)).is_err()
            {
                break;
            }
        }
    }
}

/// This process in a pod's cgroup folder until dropped: connections it
/// opens meanwhile meet what is attached there, as the pod's own would.
pub struct Joined {
    id: u64,
}

/// Live joins, oldest first: the process is in the newest one's folder,
/// or back where it started when there is none. So nested joins (a pod's
/// `enter` inside a longer stay) and overlapping ones from several threads
/// unwind correctly, and the process is never stranded in a pod's folder
/// (which is killed with the cluster).
static JOINS: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());

/// Moves this whole process into `dir` (cgroup v2 moves processes, not
/// threads) until the returned guard is dropped.
pub fn join_process(dir: &Path) -> anyhow::Result<Joined> {
    static IDS: AtomicU64 = AtomicU64::new(0);
    home()?;
    let mut joins = JOINS.lock().unwrap_or_else(|p| p.into_inner());
    move_to(dir)?;
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    joins.push((id, dir.to_owned()));
    Ok(Joined { id })
}

impl Drop for Joined {
    fn drop(&mut self) {
        let mut joins = JOINS.lock().unwrap_or_else(|p| p.into_inner());
        joins.retain(|(id, _)| *id != self.id);
        let target = match joins.last() {
            Some((_, dir)) => Ok(dir.as_path()),
            None => home(),
        };
        if let Err(e) = target.and_then(move_to) {
            eprintln!("cannot move the test process back: {e:#}");
        }
    }
}

/// The cgroup this process started in.
fn home() -> anyhow::Result<&'static Path> {
    static HOME: OnceLock<Option<PathBuf>> = OnceLock::new();
    HOME.get_or_init(|| {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let relative = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(v2_root()?.join(relative.trim_start_matches('/')))
    })
    .as_deref()
    .context("this process's cgroup v2 folder is unknown")
}

fn move_to(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving this process into {}", dir.display()))
}

fn v2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|root| root.join("cgroup.controllers").exists())
}

/// Removes the folders below `dir`, then `dir`; whether it is gone.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}
