//! Removes the folders of local-path PersistentVolumes that are gone.
//!
//! The control plane's provisioner names a folder under the node's
//! storage directory (`DATA_DIR/storage/pvc-<uid>_<namespace>_<claim>`)
//! in each volume it makes and deletes the volume once its claim is gone
//! (reclaim policy `Delete`); the data stays on the node until its agent
//! sees that no volume names the folder any more.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::runtime::reflector::Store;

/// How often the storage folder is looked at.
const SCAN_EVERY: Duration = Duration::from_secs(5);

/// The folder local-path volumes of this node live in: `storage` next to
/// the agent's own folder, where the server's provisioner puts them.
pub fn storage_dir(agent_dir: &Path) -> Option<PathBuf> {
    agent_dir.parent().map(|p| p.join("storage"))
}

/// Scans `storage` every few seconds until the process stops.
pub async fn run(storage: PathBuf, volumes: Store<PersistentVolume>) {
    // Deciding on a cache that has not listed the volumes yet would
    // delete every folder.
    if volumes.wait_until_ready().await.is_err() {
        return;
    }
    // A folder is removed only when two scans in a row found it orphaned,
    // so a volume created between the listing and the check is not lost.
    let mut suspects = HashSet::new();
    loop {
        let named = named_paths(&volumes.state());
        let dir = storage.clone();
        let previous = std::mem::take(&mut suspects);
        let result = tokio::task::spawn_blocking(move || sweep(&dir, &named, &previous)).await;
        if let Ok(still) = result {
            suspects = still;
        }
        tokio::time::sleep(SCAN_EVERY).await;
    }
}

/// The host folders every volume names.
fn named_paths(volumes: &[std::sync::Arc<PersistentVolume>]) -> HashSet<PathBuf> {
    volumes
        .iter()
        .filter_map(|pv| {
            let spec = pv.spec.as_ref()?;
            spec.host_path
                .as_ref()
                .map(|h| h.path.clone())
                .or_else(|| spec.local.as_ref().map(|l| l.path.clone()))
        })
        .map(PathBuf::from)
        .collect()
}

/// Removes the provisioned folders (`pvc-…`) of `storage` that no volume
/// names and that were already orphaned in the previous scan; returns the
/// ones orphaned now, for the next.
pub fn sweep(
    storage: &Path,
    named: &HashSet<PathBuf>,
    previous: &HashSet<PathBuf>,
) -> HashSet<PathBuf> {
    let mut orphaned = HashSet::new();
    let Ok(entries) = std::fs::read_dir(storage) else {
        return orphaned;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let provisioned = entry.file_name().to_string_lossy().starts_with("pvc-")
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !provisioned || named.contains(&path) {
            continue;
        }
        if !previous.contains(&path) {
            orphaned.insert(path);
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed the folder of a deleted volume")
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove the folder of a deleted volume");
                orphaned.insert(path);
            }
        }
    }
    orphaned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_orphaned_provisioned_folders_go_on_the_second_scan() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { return };
        let storage = dir.path();
        let kept = storage.join("pvc-1_default_kept");
        let gone = storage.join("pvc-2_default_gone");
        let other = storage.join("user-data");
        for d in [&kept, &gone, &other] {
            assert!(std::fs::create_dir_all(d.join("sub")).is_ok());
            assert!(std::fs::write(d.join("sub/file"), "x").is_ok());
        }
        let named: HashSet<PathBuf> = [kept.clone()].into_iter().collect();
        let first = sweep(storage, &named, &HashSet::new());
        assert_eq!(first, [gone.clone()].into_iter().collect());
        assert!(gone.exists(), "not on the first sighting");
        let second = sweep(storage, &named, &first);
        assert!(second.is_empty());
        assert!(!gone.exists());
        assert!(kept.join("sub/file").exists() && other.join("sub/file").exists());
        // Named again before the second scan: kept.
        let back = storage.join("pvc-3_default_back");
        assert!(std::fs::create_dir_all(&back).is_ok());
        let seen = sweep(storage, &named, &HashSet::new());
        let named: HashSet<PathBuf> = [kept, back.clone()].into_iter().collect();
        sweep(storage, &named, &seen);
        assert!(back.exists());
    }
}
