//! Named network namespaces, kept alive by bind mounts in a run folder (the
//! way `ip netns` does it under `/run/netns`), and a way to run code inside
//! one.
//!
//! Entering a namespace (`setns`) changes only the calling thread, so every
//! entry happens on a fresh OS thread that exits afterwards: a tokio worker
//! or the caller's thread never ends up in a pod's namespace.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::statfs::{NSFS_MAGIC, statfs};

use crate::error::CniError;

/// Namespace jobs (`run_in_async`) running at once. Each has a thread, a
/// runtime and netlink socket buffers of its own, and the kernel takes one
/// lock (RTNL) for every link change anyway, so more at once bought no
/// speed: 50 pods starting together only raised the agent's peak memory,
/// which its allocator then keeps.
const PARALLEL_JOBS: usize = 2;
static JOBS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(PARALLEL_JOBS);

/// A network namespace pinned by a bind mount at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    pub path: PathBuf,
    pub name: String,
}

/// Creates the namespace `dir/name` with its loopback up.
pub fn create(dir: &Path, name: &str) -> Result<NetNs, CniError> {
    validate_name(name)?;
    fs::create_dir_all(dir).map_err(|e| CniError::io(format!("creating {}", dir.display()), e))?;
    make_shared_mount(dir)?;
    let path = dir.join(name);
    if is_namespace(&path) {
        return Err(CniError::Conflict(format!(
            "network namespace {} already exists",
            path.display()
        )));
    }
    // A plain file left by a crash between creating and mounting: reuse it.
    if let Err(e) = fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        return Err(CniError::io(format!("removing {}", path.display()), e));
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)
        .map_err(|e| CniError::io(format!("creating {}", path.display()), e))?;

    let target = path.clone();
    let made = on_thread(move || {
        unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| CniError::sys("creating a network namespace", e))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| CniError::sys(format!("bind-mounting {}", target.display()), e))?;
        crate::netlink::block_on_here(|handle| async move {
            crate::netlink::set_up_by_name(&handle, "lo").await
        })
    })
    .and_then(|inner| inner);
    if let Err(err) = made {
        let _ = remove(dir, name);
        return Err(err);
    }
    Ok(NetNs {
        path,
        name: name.to_string(),
    })
}

/// The namespace `dir/name`, or `None` when there is none.
pub fn open(dir: &Path, name: &str) -> Result<Option<NetNs>, CniError> {
    validate_name(name)?;
    let path = dir.join(name);
    Ok(is_namespace(&path).then(|| NetNs {
        path,
        name: name.to_string(),
    }))
}

/// Unmounts and deletes `dir/name`. Succeeds when it is already gone.
pub fn remove(dir: &Path, name: &str) -> Result<(), CniError> {
    validate_name(name)?;
    let path = dir.join(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(CniError::sys(format!("unmounting {}", path.display()), e)),
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::io(format!("removing {}", path.display()), e)),
    }
}

/// Names of the namespaces in `dir` (empty when `dir` does not exist).
pub fn list(dir: &Path) -> Result<Vec<String>, CniError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CniError::io(format!("listing {}", dir.display()), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CniError::io(format!("listing {}", dir.display()), e))?;
        if let Some(name) = entry.file_name().to_str()
            && is_namespace(&entry.path())
        {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Removes every namespace in `dir`, then the mount `create` put on `dir`
/// itself, then `dir`. For uninstalling and for tests.
pub fn remove_dir(dir: &Path) -> Result<(), CniError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CniError::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        if let Some(name) = entry.file_name().to_str() {
            remove(dir, name)?;
        }
    }
    match umount2(dir, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(CniError::sys(format!("unmounting {}", dir.display()), e)),
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::io(format!("removing {}", dir.display()), e)),
    }
}

/// Runs `f` on a new thread that has entered the namespace at `ns`, and
/// waits for it. Blocks: from async code, call it in `spawn_blocking`.
pub fn run_in<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CniError> {
    let ns = ns.to_path_buf();
    on_thread(move || {
        enter(&ns)?;
        Ok(f())
    })
    .and_then(|inner| inner)
}

/// Like `run_in`, but awaits the thread instead of blocking; `None` runs `f`
/// in the caller's own namespace (still on a new thread, which inherits it).
/// At most [`PARALLEL_JOBS`] run at once; the rest wait their turn.
pub(crate) async fn run_in_async<T: Send + 'static>(
    ns: Option<&Path>,
    f: impl FnOnce() -> Result<T, CniError> + Send + 'static,
) -> Result<T, CniError> {
    let _turn = JOBS
        .acquire()
        .await
        .map_err(|_| CniError::Thread("the namespace job queue is closed".into()))?;
    let ns = ns.map(Path::to_path_buf);
    let (tx, rx) = tokio::sync::oneshot::channel();
    thread::Builder::new()
        .name("skiff-netns".into())
        .spawn(move || {
            let result = match &ns {
                Some(ns) => enter(ns).and_then(|()| f()),
                None => f(),
            };
            let _ = tx.send(result);
        })
        .map_err(|e| CniError::io("starting a namespace worker thread", e))?;
    rx.await
        .map_err(|_| CniError::Thread("it stopped without an answer".into()))?
}

/// Whether `path` is a mounted namespace (and not a leftover plain file).
pub(crate) fn is_namespace(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC)
}

fn enter(ns: &Path) -> Result<(), CniError> {
    let file = File::open(ns).map_err(|e| CniError::io(format!("opening {}", ns.display()), e))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::sys(format!("entering network namespace {}", ns.display()), e))
}

fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, CniError> {
    thread::Builder::new()
        .name("skiff-netns".into())
        .spawn(f)
        .map_err(|e| CniError::io("starting a namespace worker thread", e))?
        .join()
        .map_err(|_| CniError::Thread("it panicked".into()))
}

/// Makes `dir` a shared mount point, as iproute2 does for `/run/netns`: an
/// unmount in `remove` then also reaches copies of the bind mount that other
/// mount namespaces took, so the namespace really goes away.
fn make_shared_mount(dir: &Path) -> Result<(), CniError> {
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => return Ok(()),
        Err(Errno::EINVAL) => {}
        Err(e) => return Err(CniError::sys(format!("sharing mount {}", dir.display()), e)),
    }
    // Not a mount point yet: bind it onto itself, then share it.
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| CniError::sys(format!("bind-mounting {}", dir.display()), e))?;
    shared().map_err(|e| CniError::sys(format!("sharing mount {}", dir.display()), e))
}

fn validate_name(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid(
            "namespace name",
            format!("{name:?} (use letters, digits, '-', '_', '.')"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_the_folder_are_rejected() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x\n"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["pod-1", "abc_def.1", "A9"] {
            assert!(validate_name(good).is_ok(), "{good:?} rejected");
        }
    }
}
