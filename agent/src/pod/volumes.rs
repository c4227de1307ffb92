//! Pod volumes on the node: emptyDir (a folder, or tmpfs for `medium:
//! Memory`), configMap, secret, downwardAPI and projected volumes (with
//! service-account tokens from [`Tokens`]) written
//! as upstream's atomic writer does (files are symlinks into `..data`,
//! itself a symlink to a timestamped folder that is swapped in one
//! rename), hostPath, and persistentVolumeClaims bound to hostPath or
//! local PersistentVolumes.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{KeyToPath, Pod, Volume};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::env::{self, Sources};
use super::sa_token::Tokens;

/// What a volume needs from the cluster beyond ConfigMaps and Secrets.
pub trait Claims {
    /// The host folder of the PersistentVolume bound to the claim.
    fn claim_path(&self, namespace: &str, claim: &str) -> Result<PathBuf, String>;
}

/// A volume's host folder, and whether its content is managed by the
/// agent (rewritten when its sources change).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub path: PathBuf,
    pub managed: bool,
}

/// Sets up (or refreshes) every volume of the pod under `dir`.
pub fn prepare(
    pod: &Pod,
    dir: &Path,
    pod_ip: Option<&str>,
    host_ip: &str,
    sources: &dyn Sources,
    claims: &dyn Claims,
    tokens: &Tokens,
) -> Result<BTreeMap<String, Prepared>, String> {
    let mut out = BTreeMap::new();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        // The API server admits only DNS-1123 labels; a pod stored before
        // it checked, or written to the store directly, must still not
        // name a folder outside `dir`.
        if !is_folder_name(&volume.name) {
            return Err(format!(
                "volume {:?}: the name must be a DNS-1123 label",
                volume.name
            ));
        }
        let path = dir.join(&volume.name);
        let prepared = prepare_one(
            pod, namespace, volume, &path, pod_ip, host_ip, sources, claims, tokens,
        )
        .map_err(|e| format!("volume {:?}: {e}", volume.name))?;
        out.insert(volume.name.clone(), prepared);
    }
    Ok(out)
}

/// Where a mount's `subPath` of the volume at `root` is, creating missing
/// folders when `create`. Symlinks on the way are followed only while they
/// stay inside the volume: a container that shares a volume can make a
/// link to `/` in it, and runc would bind the host's root for a later
/// container mounting that subPath.
///
/// A container could still swap a checked folder for a link between this
/// check and runc's mount; kubelet closes that window by binding through
/// a descriptor opened without following links, which this does not do.
pub fn sub_path(root: &Path, sub: &str, create: bool) -> Result<PathBuf, String> {
    if sub.starts_with('/') || sub.split('/').any(|part| part == "..") {
        return Err(format!("invalid subPath {sub:?}"));
    }
    let outside = || format!("subPath {sub:?} leads outside its volume");
    let base = std::fs::canonicalize(root).map_err(|e| format!("volume folder: {e}"))?;
    let mut path = base.clone();
    for part in sub.split('/').filter(|p| !p.is_empty() && *p != ".") {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                path = std::fs::canonicalize(&path).map_err(|_| outside())?;
                if !path.starts_with(&base) {
                    return Err(outside());
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&path).map_err(|e| format!("subPath {sub:?}: {e}"))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(path),
            Err(e) => return Err(format!("subPath {sub:?}: {e}")),
        }
    }
    Ok(path)
}

/// A name that is one plain folder below its parent: lowercase letters,
/// digits and inner dashes, as a DNS-1123 label.
fn is_folder_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Unmounts tmpfs volumes and removes the pod's volume folders (never
/// hostPath or PV data, which live elsewhere).
pub fn remove_all(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let _ = umount2(&entry.path(), MntFlags::MNT_DETACH);
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove pod volumes");
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare_one(
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
    path: &Path,
    pod_ip: Option<&str>,
    host_ip: &str,
    sources: &dyn Sources,
    claims: &dyn Claims,
    tokens: &Tokens,
) -> Result<Prepared, String> {
    let unmanaged = |path: PathBuf| {
        Ok(Prepared {
            path,
            managed: false,
        })
    };
    if let Some(empty) = &volume.empty_dir {
        mkdir(path)?;
        if empty.medium.as_deref() == Some("Memory") && !is_mountpoint(path) {
            let size = empty
                .size_limit
                .as_ref()
                .and_then(|q| crate::resources::parse(q, "memory"))
                .map(|b| format!("size={b}"));
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                size.as_deref(),
            )
            .map_err(|e| format!("mounting tmpfs: {e}"))?;
        }
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777));
        return unmanaged(path.to_owned());
    }
    if let Some(host) = &volume.host_path {
        let host_path = PathBuf::from(&host.path);
        match host.type_.as_deref().unwrap_or("") {
            "DirectoryOrCreate" => mkdir(&host_path)?,
            "FileOrCreate" if !host_path.exists() => {
                if let Some(parent) = host_path.parent() {
                    mkdir(parent)?;
                }
                std::fs::write(&host_path, b"").map_err(|e| e.to_string())?;
            }
            "Directory" if !host_path.is_dir() => {
                return Err(format!("hostPath {} is not a directory", host.path));
            }
            "File" if !host_path.is_file() => {
                return Err(format!("hostPath {} is not a file", host.path));
            }
            _ => {}
        }
        return unmanaged(host_path);
    }
    if let Some(claim) = &volume.persistent_volume_claim {
        let host_path = claims.claim_path(namespace, &claim.claim_name)?;
        mkdir(&host_path)?;
        return unmanaged(host_path);
    }
    let mode = |default: Option<i32>| default.unwrap_or(0o644) as u32;
    let files: Vec<(String, Vec<u8>, u32)> = if let Some(cm) = &volume.config_map {
        let default_mode = mode(cm.default_mode);
        match sources.config_map(namespace, &cm.name) {
            Some(object) => {
                let mut data: BTreeMap<String, Vec<u8>> = object
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in object.binary_data.unwrap_or_default() {
                    data.insert(k, v.0);
                }
                select(data, cm.items.as_deref(), default_mode)?
            }
            None if cm.optional.unwrap_or(false) => Vec::new(),
            None => return Err(format!("configmap \"{}\" not found", cm.name)),
        }
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        let default_mode = mode(secret.default_mode);
        match sources.secret(namespace, &name) {
            Some(object) => {
                let data: BTreeMap<String, Vec<u8>> = env::secret_data(&object)
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                select(data, secret.items.as_deref(), default_mode)?
            }
            None if secret.optional.unwrap_or(false) => Vec::new(),
            None => return Err(format!("secret \"{name}\" not found")),
        }
    } else if let Some(downward) = &volume.downward_api {
        let default_mode = mode(downward.default_mode);
        downward_files(
            pod,
            downward.items.iter().flatten(),
            default_mode,
            pod_ip,
            host_ip,
        )?
    } else if let Some(projected) = &volume.projected {
        let default_mode = mode(projected.default_mode);
        let mut files = Vec::new();
        for source in projected.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                if let Some(object) = sources.config_map(namespace, &cm.name) {
                    let data = object
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    files.extend(select(data, cm.items.as_deref(), default_mode)?);
                } else if !cm.optional.unwrap_or(false) {
                    return Err(format!("configmap \"{}\" not found", cm.name));
                }
            }
            if let Some(secret) = &source.secret {
                if let Some(object) = sources.secret(namespace, &secret.name) {
                    let data = env::secret_data(&object)
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    files.extend(select(data, secret.items.as_deref(), default_mode)?);
                } else if !secret.optional.unwrap_or(false) {
                    return Err(format!("secret \"{}\" not found", secret.name));
                }
            }
            if let Some(wanted) = &source.service_account_token {
                let token = tokens
                    .get(&volume.name, &wanted.path)
                    .ok_or_else(|| format!("no service account token for {:?} yet", wanted.path))?;
                files.push((wanted.path.clone(), token.as_bytes().to_vec(), default_mode));
            }
            if let Some(downward) = &source.downward_api {
                files.extend(downward_files(
                    pod,
                    downward.items.iter().flatten(),
                    default_mode,
                    pod_ip,
                    host_ip,
                )?);
            }
        }
        files
    } else {
        return Err("this volume type is not supported by the skiff agent".into());
    };
    write_atomic(path, &files)?;
    Ok(Prepared {
        path: path.to_owned(),
        managed: true,
    })
}

fn select(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: u32,
) -> Result<Vec<(String, Vec<u8>, u32)>, String> {
    match items {
        None => Ok(data
            .into_iter()
            .map(|(k, v)| (k, v, default_mode))
            .collect()),
        Some(items) => {
            let mut out = Vec::new();
            for item in items {
                let Some(value) = data.get(&item.key) else {
                    return Err(format!("key {:?} not found", item.key));
                };
                let mode = item.mode.map_or(default_mode, |m| m as u32);
                out.push((item.path.clone(), value.clone(), mode));
            }
            Ok(out)
        }
    }
}

fn downward_files<'a>(
    pod: &Pod,
    items: impl Iterator<Item = &'a k8s_openapi::api::core::v1::DownwardAPIVolumeFile>,
    default_mode: u32,
    pod_ip: Option<&str>,
    host_ip: &str,
) -> Result<Vec<(String, Vec<u8>, u32)>, String> {
    let mut out = Vec::new();
    for item in items {
        let value = if let Some(f) = &item.field_ref {
            env::field(pod, &f.field_path, pod_ip, host_ip)?
        } else if let Some(r) = &item.resource_field_ref {
            let container = pod
                .spec
                .as_ref()
                .and_then(|s| {
                    s.containers
                        .iter()
                        .find(|c| Some(c.name.as_str()) == r.container_name.as_deref())
                })
                .ok_or_else(|| format!("container {:?} not found", r.container_name))?;
            let divisor = r
                .divisor
                .as_ref()
                .and_then(|d| crate::resources::parse_quantity(&d.0))
                .filter(|d| *d > 0.0)
                .unwrap_or(1.0);
            env::resource_field(container, &r.resource, divisor)?
        } else {
            continue;
        };
        let mode = item.mode.map_or(default_mode, |m| m as u32);
        out.push((item.path.clone(), value.into_bytes(), mode));
    }
    Ok(out)
}

/// Writes `files` into `dir` as the atomic writer does; does nothing when
/// the current content is already the same.
pub fn write_atomic(dir: &Path, files: &[(String, Vec<u8>, u32)]) -> Result<(), String> {
    mkdir(dir)?;
    let data_link = dir.join("..data");
    if let Ok(current) = std::fs::read_link(&data_link)
        && same_content(&dir.join(&current), files)
    {
        return Ok(());
    }
    for (path, _, _) in files {
        if path.starts_with('/') || path.split('/').any(|part| part == "..") {
            return Err(format!("invalid path {path:?}"));
        }
    }
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let new_dir = dir.join(&stamp);
    mkdir(&new_dir)?;
    for (path, bytes, mode) in files {
        let target = new_dir.join(path);
        if let Some(parent) = target.parent() {
            mkdir(parent)?;
        }
        std::fs::write(&target, bytes).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| e.to_string())?;
    }
    let old = std::fs::read_link(&data_link).ok();
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp_link, &data_link).map_err(|e| e.to_string())?;
    // Top-level names point through ..data, so they follow the swap.
    let wanted: std::collections::BTreeSet<String> = files
        .iter()
        .filter_map(|(p, _, _)| p.split('/').next().map(str::to_owned))
        .collect();
    for name in &wanted {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)
                .map_err(|e| e.to_string())?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !wanted.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn same_content(current: &Path, files: &[(String, Vec<u8>, u32)]) -> bool {
    let count = count_files(current);
    count == files.len()
        && files.iter().all(|(path, bytes, mode)| {
            let p = current.join(path);
            std::fs::read(&p).is_ok_and(|b| b == *bytes)
                && std::fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode)
        })
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn mkdir(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))
}

fn is_mountpoint(path: &Path) -> bool {
    let target = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(target.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_paths_stay_inside_their_volume() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vol");
        std::fs::create_dir(&root).unwrap();
        let base = std::fs::canonicalize(&root).unwrap();
        assert_eq!(sub_path(&root, "a/b", true).unwrap(), base.join("a/b"));
        assert!(base.join("a/b").is_dir(), "created");
        // A link inside the volume, as a configMap's keys are, is fine.
        std::os::unix::fs::symlink("a", root.join("inside")).unwrap();
        assert_eq!(
            sub_path(&root, "inside/b", false).unwrap(),
            base.join("a/b")
        );
        // A link out of it is refused, and nothing is created through it.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("out")).unwrap();
        std::os::unix::fs::symlink("/", root.join("slash")).unwrap();
        assert!(sub_path(&root, "out", false).is_err());
        assert!(sub_path(&root, "out/new", true).is_err());
        assert!(!elsewhere.join("new").exists());
        assert!(sub_path(&root, "slash/etc", false).is_err());
        std::os::unix::fs::symlink(dir.path().join("dangling"), root.join("dangling")).unwrap();
        assert!(sub_path(&root, "dangling", true).is_err());
        assert!(!dir.path().join("dangling").exists());
        for bad in ["../x", "/etc", "a/../../x"] {
            assert!(sub_path(&root, bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_plain_names_become_volume_folders() {
        for good in ["data", "kube-api-access-x1", "a", "0"] {
            assert!(is_folder_name(good), "{good}");
        }
        for bad in ["", "..", ".", "../../etc", "a/b", "-a", "a-", "Data", "x.y"] {
            assert!(!is_folder_name(bad), "{bad}");
        }
    }

    #[test]
    fn atomic_writer_swaps_content() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("v");
        write_atomic(
            &vol,
            &[
                ("a".into(), b"1".to_vec(), 0o644),
                ("b".into(), b"2".to_vec(), 0o600),
            ],
        )
        .unwrap();
        assert_eq!(std::fs::read(vol.join("a")).unwrap(), b"1");
        let first = std::fs::read_link(vol.join("..data")).unwrap();
        write_atomic(
            &vol,
            &[
                ("a".into(), b"1".to_vec(), 0o644),
                ("b".into(), b"2".to_vec(), 0o600),
            ],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_link(vol.join("..data")).unwrap(),
            first,
            "unchanged content is not rewritten"
        );
        write_atomic(&vol, &[("a".into(), b"3".to_vec(), 0o644)]).unwrap();
        assert_eq!(std::fs::read(vol.join("a")).unwrap(), b"3");
        assert!(std::fs::symlink_metadata(vol.join("b")).is_err());
        assert!(
            !dir.path().join("v").join(&first).exists(),
            "the old generation is removed"
        );
        assert!(write_atomic(&vol, &[("../x".into(), b"".to_vec(), 0o644)]).is_err());
    }
}
