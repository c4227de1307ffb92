//! [`ImageStore`]: import, list, remove and resolve images; the on-disk
//! layout is described in the module docs.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use serde_json::json;

use super::digest::{sha256_hex, sha256_hex_of};
use super::index::{self, ArchiveRecord, Archives, Index, IndexImage, IndexLayer};
use super::layer::{self, LayerStats, Outputs};
use super::layout::{self, PlannedImage};
use super::{Image, ImageConfig, ImageError, ImageSummary, normalize_reference};

const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The node's image store. Cheap to clone; every clone (and every process)
/// sees the same store.
#[derive(Clone, Debug)]
pub struct ImageStore {
    inner: Arc<Paths>,
}

#[derive(Debug)]
struct Paths {
    root: PathBuf,
    blobs: PathBuf,
    layers: PathBuf,
    tmp: PathBuf,
    index: PathBuf,
    archives: PathBuf,
    lock: PathBuf,
}

/// Unique staging names within this process (the lock serialises
/// processes).
static STAGING: AtomicU64 = AtomicU64::new(0);

impl ImageStore {
    /// Opens (creating if needed) the store at `root`, and clears what an
    /// interrupted import left behind.
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        let paths = Paths {
            root: root.to_owned(),
            blobs: root.join("blobs").join("sha256"),
            layers: root.join("layers"),
            tmp: root.join("tmp"),
            index: root.join("index.json"),
            archives: root.join("archives.json"),
            lock: root.join("lock"),
        };
        for dir in [&paths.root, &paths.blobs, &paths.layers, &paths.tmp] {
            fs::create_dir_all(dir).map_err(ImageError::io(dir))?;
        }
        // Layers keep the device nodes and setuid files their images hold,
        // as containers need them; no other user of the host may reach them.
        fs::set_permissions(&paths.root, fs::Permissions::from_mode(0o700))
            .map_err(ImageError::io(&paths.root))?;
        let store = ImageStore {
            inner: Arc::new(paths),
        };
        // Someone else changing the store right now will collect after
        // themselves; don't wait for them.
        if let Some(_lock) = store.try_lock()? {
            store.clear_tmp()?;
            let index: Index = index::load(&store.inner.index)?;
            store.collect_garbage(&index)?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Imports a `docker save` archive, an OCI image archive (tar or
    /// tar.gz) or an OCI layout directory. Every digest is checked before
    /// anything is stored: on error the store is unchanged.
    pub fn import_archive(&self, path: &Path) -> Result<Vec<ImageSummary>, ImageError> {
        let _lock = self.lock()?;
        self.import_locked(path)
    }

    /// Imports every archive (`*.tar`, `*.tar.gz`, `*.tgz`) and OCI layout
    /// directory in `dir`, as k3s does with its air-gap images folder.
    /// Archives imported before and unchanged since (same size and mtime,
    /// images still present) are skipped. An archive that fails is logged
    /// and skipped; see [`ImageStore::import_dir_results`] for the details.
    pub fn import_dir(&self, dir: &Path) -> Result<Vec<ImageSummary>, ImageError> {
        let mut out = Vec::new();
        for (path, result) in self.import_dir_results(dir)? {
            match result {
                Ok(images) => out.extend(images),
                Err(error) => {
                    tracing::warn!(archive = %path.display(), %error, "image archive not imported");
                }
            }
        }
        Ok(out)
    }

    /// [`ImageStore::import_dir`], with each archive's own result.
    #[allow(clippy::type_complexity)]
    pub fn import_dir_results(
        &self,
        dir: &Path,
    ) -> Result<Vec<(PathBuf, Result<Vec<ImageSummary>, ImageError>)>, ImageError> {
        let candidates = match fs::read_dir(dir) {
            Ok(entries) => {
                let mut paths: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| is_importable(p))
                    .collect();
                paths.sort();
                paths
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io(dir)(e)),
        };
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let mut archives: Archives = index::load(&self.inner.archives)?;
        let mut results = Vec::new();
        for path in candidates {
            let key = path.display().to_string();
            let stamp = stamp(&path);
            if let (Some(stamp), Some(old)) = (&stamp, archives.archives.get(&key))
                && stamp.0 == old.size
                && stamp.1 == old.modified_ns
            {
                let index: Index = index::load(&self.inner.index)?;
                if old.images.iter().all(|id| index.images.contains_key(id)) {
                    let summaries = old
                        .images
                        .iter()
                        .filter_map(|id| index.images.get(id).map(|image| summary(id, image)))
                        .collect();
                    results.push((path, Ok(summaries)));
                    continue;
                }
            }
            let result = self.import_locked(&path);
            match (&result, stamp) {
                (Ok(images), Some((size, modified_ns))) => {
                    let record = ArchiveRecord {
                        size,
                        modified_ns,
                        images: images.iter().map(|i| i.id.clone()).collect(),
                    };
                    archives.archives.insert(key, record);
                }
                _ => {
                    archives.archives.remove(&key);
                }
            }
            results.push((path, result));
        }
        index::save(&self.inner.archives, &archives)?;
        Ok(results)
    }

    /// Every image, sorted by its first reference (unnamed ones last).
    pub fn list(&self) -> Vec<ImageSummary> {
        let index: Index = match index::load(&self.inner.index) {
            Ok(index) => index,
            Err(error) => {
                tracing::warn!(%error, "reading the image index");
                return Vec::new();
            }
        };
        let mut out: Vec<ImageSummary> = index
            .images
            .iter()
            .map(|(id, image)| summary(id, image))
            .collect();
        out.sort_by(|a, b| {
            let key = |s: &ImageSummary| (s.references.is_empty(), s.references.first().cloned());
            key(a).cmp(&key(b)).then_with(|| a.id.cmp(&b.id))
        });
        out
    }

    /// Removes a reference; the image goes when its last reference does.
    /// Given an image id, removes the image with all its references.
    /// Blobs and layers no image uses any more are deleted.
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let _lock = self.lock()?;
        let mut index: Index = index::load(&self.inner.index)?;
        let not_found = || ImageError::NotFound {
            reference: reference.to_owned(),
        };
        let normalized = normalize_reference(reference).ok();
        let by_reference = normalized.as_deref().and_then(|r| {
            index
                .by_reference(r)
                .map(|id| (id.to_owned(), r.to_owned()))
        });
        match by_reference {
            Some((id, name)) => {
                let image = index.images.get_mut(&id).ok_or_else(not_found)?;
                image.references.retain(|r| *r != name);
                if image.references.is_empty() {
                    index.images.remove(&id);
                }
            }
            None => {
                let id = index.by_id(reference).ok_or_else(not_found)?.to_owned();
                index.images.remove(&id);
            }
        }
        index::save(&self.inner.index, &index)?;
        self.collect_garbage(&index)
    }

    /// The image a reference (normalised first) or an image id names.
    pub fn resolve(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        let index: Index = index::load(&self.inner.index)?;
        let id = match normalize_reference(reference)
            .ok()
            .and_then(|r| index.by_reference(&r).map(str::to_owned))
        {
            Some(id) => id,
            None => match index.by_id(reference) {
                Some(id) => id.to_owned(),
                None => {
                    // Neither a valid reference nor an id: say why.
                    normalize_reference(reference)?;
                    return Ok(None);
                }
            },
        };
        let Some(image) = index.images.get(&id) else {
            return Ok(None);
        };
        let config = self.read_config(&id)?;
        let mut layers = Vec::with_capacity(image.layers.len());
        for layer in &image.layers {
            let dir = self.layer_dir(&layer.diff_id)?;
            if !dir.is_dir() {
                return Err(ImageError::Invalid {
                    file: dir.display().to_string(),
                    reason: format!("layer {} of {id} is missing from the store", layer.diff_id),
                });
            }
            layers.push(dir);
        }
        Ok(Some(Image {
            id,
            references: image.references.clone(),
            config,
            layers,
            manifest_digest: image.manifest.clone(),
        }))
    }

    fn import_locked(&self, path: &Path) -> Result<Vec<ImageSummary>, ImageError> {
        let staging = Staging::new(&self.inner.tmp)?;
        let (layout_dir, staged) = if path.is_dir() {
            (path.to_owned(), false)
        } else {
            let dir = staging.path.join("archive");
            super::archive::extract(path, &dir)?;
            (dir, true)
        };
        let planned = layout::read(&layout_dir, path)?;

        // Verify (and unpack) every layer; nothing outside `staging` yet.
        let mut done: HashMap<PathBuf, Verified> = HashMap::new();
        let mut unpacked: HashMap<String, PathBuf> = HashMap::new();
        for image in &planned {
            for planned_layer in &image.layers {
                if done.contains_key(&planned_layer.path) {
                    continue;
                }
                let n = done.len();
                let have_layer = self.layer_dir(&planned_layer.diff_id)?.is_dir()
                    || unpacked.contains_key(&planned_layer.diff_id);
                let have_blob = planned_layer
                    .blob_digest
                    .as_deref()
                    .is_some_and(|hex| self.inner.blobs.join(hex).is_file());
                let unpack_to = staging.path.join(format!("layer-{n}"));
                let copy_to = staging.path.join(format!("blob-{n}"));
                let outputs = Outputs {
                    unpack_to: (!have_layer).then_some(unpack_to.as_path()),
                    copy_to: (!have_blob && !staged).then_some(copy_to.as_path()),
                    expected_blob: planned_layer.blob_digest.as_deref(),
                };
                let copied = outputs.copy_to.is_some();
                let stats = layer::process(&planned_layer.path, &planned_layer.file, outputs)?;
                check_layer(planned_layer, &stats)?;
                if !have_layer {
                    unpacked.insert(stats.diff_id.clone(), unpack_to);
                }
                let blob_file = if copied {
                    copy_to
                } else {
                    planned_layer.path.clone()
                };
                done.insert(
                    planned_layer.path.clone(),
                    Verified {
                        stats,
                        blob_file,
                        movable: staged || copied,
                    },
                );
            }
        }

        // Everything checks out: make the staged files durable, then move
        // them into place, and only then name them in the index.
        if let Ok(dir) = File::open(&staging.path) {
            let _ = nix::unistd::syncfs(&dir);
        }
        for (diff_id, dir) in unpacked {
            let target = self.layer_dir(&diff_id)?;
            if !target.is_dir() {
                fs::rename(&dir, &target).map_err(ImageError::io(&target))?;
            }
        }
        let mut index: Index = index::load(&self.inner.index)?;
        let mut summaries = Vec::new();
        for image in &planned {
            let layers: Vec<(&Verified, IndexLayer)> = image
                .layers
                .iter()
                .filter_map(|l| done.get(&l.path))
                .map(|v| {
                    let layer = IndexLayer {
                        blob: format!("sha256:{}", v.stats.blob),
                        diff_id: format!("sha256:{}", v.stats.diff_id),
                        size: v.stats.size,
                    };
                    (v, layer)
                })
                .collect();
            let manifest = match &image.manifest {
                Some(bytes) => bytes.clone(),
                None => synthesize_manifest(image, &layers),
            };
            let manifest_hex = sha256_hex(&manifest);
            self.put_blob(&manifest_hex, &manifest)?;
            self.put_blob(&image.config_digest, &image.config)?;
            for (verified, _) in &layers {
                self.put_layer_blob(verified)?;
            }
            let id = format!("sha256:{}", image.config_digest);
            let entry = IndexImage {
                references: image.references.clone(),
                manifest: format!("sha256:{manifest_hex}"),
                layers: layers.into_iter().map(|(_, l)| l).collect(),
            };
            tag(&mut index, &id, entry);
            if let Some(stored) = index.images.get(&id) {
                summaries.push(summary(&id, stored));
            }
        }
        index::save(&self.inner.index, &index)?;
        self.collect_garbage(&index)?;
        for s in &summaries {
            tracing::debug!(id = %s.id, references = ?s.references, "image imported");
        }
        Ok(summaries)
    }

    fn read_config(&self, id: &str) -> Result<ImageConfig, ImageError> {
        let hex = sha256_hex_of(id).ok_or_else(|| ImageError::Invalid {
            file: self.inner.index.display().to_string(),
            reason: format!("bad image id {id:?}"),
        })?;
        let path = self.inner.blobs.join(hex);
        let bytes = fs::read(&path).map_err(ImageError::io(&path))?;
        let parsed: oci_spec::image::ImageConfiguration =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
                file: path.display().to_string(),
                reason: format!("bad image config: {e}"),
            })?;
        Ok(layout::image_config(&parsed))
    }

    fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        let hex = sha256_hex_of(diff_id).unwrap_or(diff_id);
        if !super::digest::is_sha256_hex(hex) {
            return Err(ImageError::Invalid {
                file: self.inner.index.display().to_string(),
                reason: format!("bad diff_id {diff_id:?}"),
            });
        }
        Ok(self.inner.layers.join(hex))
    }

    /// Stores small verified bytes under their digest.
    fn put_blob(&self, hex: &str, bytes: &[u8]) -> Result<(), ImageError> {
        let path = self.inner.blobs.join(hex);
        if path.is_file() {
            return Ok(());
        }
        index::write_atomic(&path, bytes)
    }

    fn put_layer_blob(&self, verified: &Verified) -> Result<(), ImageError> {
        let path = self.inner.blobs.join(&verified.stats.blob);
        if path.is_file() {
            return Ok(());
        }
        if verified.movable {
            match fs::rename(&verified.blob_file, &path) {
                Ok(()) => return Ok(()),
                // Already moved for another image of this archive.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_file() => {
                    return Ok(());
                }
                Err(e) => return Err(ImageError::io(&path)(e)),
            }
        }
        Err(ImageError::Invalid {
            file: verified.blob_file.display().to_string(),
            reason: "layer blob was not staged".to_owned(),
        })
    }

    /// Deletes blobs and layer directories no image refers to.
    fn collect_garbage(&self, index: &Index) -> Result<(), ImageError> {
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for (id, image) in &index.images {
            for digest in [id, &image.manifest] {
                if let Some(hex) = sha256_hex_of(digest) {
                    blobs.insert(hex.to_owned());
                }
            }
            for layer in &image.layers {
                if let Some(hex) = sha256_hex_of(&layer.blob) {
                    blobs.insert(hex.to_owned());
                }
                if let Some(hex) = sha256_hex_of(&layer.diff_id) {
                    layers.insert(hex.to_owned());
                }
            }
        }
        for (dir, keep) in [(&self.inner.blobs, &blobs), (&self.inner.layers, &layers)] {
            let entries = fs::read_dir(dir).map_err(ImageError::io(dir))?;
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if keep.contains(name.as_ref()) {
                    continue;
                }
                let path = entry.path();
                let result = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                match result {
                    Ok(()) => tracing::debug!(path = %path.display(), "removed unused image data"),
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "removing unused image data");
                    }
                }
            }
        }
        Ok(())
    }

    fn clear_tmp(&self) -> Result<(), ImageError> {
        let tmp = &self.inner.tmp;
        for entry in fs::read_dir(tmp)
            .map_err(ImageError::io(tmp))?
            .filter_map(Result::ok)
        {
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
        Ok(())
    }

    fn lock(&self) -> Result<Flock<File>, ImageError> {
        let file = self.lock_file()?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| ImageError::Io {
            path: self.inner.lock.clone(),
            source: errno.into(),
        })
    }

    fn try_lock(&self) -> Result<Option<Flock<File>>, ImageError> {
        let file = self.lock_file()?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(ImageError::Io {
                path: self.inner.lock.clone(),
                source: errno.into(),
            }),
        }
    }

    fn lock_file(&self) -> Result<File, ImageError> {
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.inner.lock)
            .map_err(ImageError::io(&self.inner.lock))
    }
}

/// A layer blob that passed its checks.
struct Verified {
    stats: LayerStats,
    /// Where its bytes are now.
    blob_file: PathBuf,
    /// Whether that file is ours to move into the store.
    movable: bool,
}

/// A private folder under `tmp/`, removed on drop (the import's leftovers
/// when it fails; the emptied folder when it succeeds).
struct Staging {
    path: PathBuf,
}

impl Staging {
    fn new(tmp: &Path) -> Result<Self, ImageError> {
        let n = STAGING.fetch_add(1, Ordering::Relaxed);
        let path = tmp.join(format!("import-{}-{n}", std::process::id()));
        if path.exists() {
            let _ = fs::remove_dir_all(&path);
        }
        fs::create_dir(&path).map_err(ImageError::io(&path))?;
        Ok(Staging { path })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "removing import staging");
        }
    }
}

/// The layer's digests against what the manifest and config promise.
fn check_layer(planned: &layout::PlannedLayer, stats: &LayerStats) -> Result<(), ImageError> {
    if let Some(expected) = &planned.blob_digest
        && *expected != stats.blob
    {
        return Err(ImageError::DigestMismatch {
            file: planned.file.clone(),
            expected: format!("sha256:{expected}"),
            actual: format!("sha256:{}", stats.blob),
        });
    }
    if let Some(size) = planned.blob_size
        && size != stats.blob_size
    {
        return Err(ImageError::Invalid {
            file: planned.file.clone(),
            reason: format!("size {} but the manifest says {size}", stats.blob_size),
        });
    }
    if planned.diff_id != stats.diff_id {
        return Err(ImageError::DigestMismatch {
            file: format!(
                "{} (uncompressed, against the config's diff_id)",
                planned.file
            ),
            expected: format!("sha256:{}", planned.diff_id),
            actual: format!("sha256:{}", stats.diff_id),
        });
    }
    Ok(())
}

/// The OCI manifest of a `docker save` image, so every stored image has one.
fn synthesize_manifest(image: &PlannedImage, layers: &[(&Verified, IndexLayer)]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|(v, l)| {
            json!({
                "mediaType": if v.stats.compressed { LAYER_TAR_GZIP } else { LAYER_TAR },
                "digest": l.blob,
                "size": v.stats.blob_size,
            })
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", image.config_digest),
            "size": image.config.len(),
        },
        "layers": layers,
    });
    // Serialising a `Value` built here cannot fail.
    serde_json::to_vec(&manifest).unwrap_or_default()
}

/// Adds or updates image `id` with `entry`'s references, moving each
/// reference off any other image; an image left without references by
/// this goes, as a retagged image does in containerd.
fn tag(index: &mut Index, id: &str, entry: IndexImage) {
    let mut orphaned = Vec::new();
    for (other_id, other) in index.images.iter_mut() {
        if other_id == id {
            continue;
        }
        let before = other.references.len();
        other.references.retain(|r| !entry.references.contains(r));
        if before > 0 && other.references.is_empty() {
            orphaned.push(other_id.clone());
        }
    }
    for other in orphaned {
        index.images.remove(&other);
    }
    match index.images.get_mut(id) {
        Some(existing) => {
            for r in entry.references {
                if !existing.references.contains(&r) {
                    existing.references.push(r);
                }
            }
            existing.references.sort();
            existing.manifest = entry.manifest;
            existing.layers = entry.layers;
        }
        None => {
            index.images.insert(id.to_owned(), entry);
        }
    }
}

fn summary(id: &str, image: &IndexImage) -> ImageSummary {
    ImageSummary {
        id: id.to_owned(),
        references: image.references.clone(),
        size: image.layers.iter().map(|l| l.size).sum(),
    }
}

fn is_importable(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.starts_with('.') {
        return false;
    }
    if path.is_dir() {
        return path.join("index.json").is_file() || path.join("manifest.json").is_file();
    }
    path.is_file()
        && [".tar", ".tar.gz", ".tgz"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

/// Size and mtime (ns) of a file, to notice it changed.
fn stamp(path: &Path) -> Option<(u64, u128)> {
    let meta = fs::metadata(path).ok()?;
    let ns = u128::try_from(meta.mtime()).ok()? * 1_000_000_000
        + u128::try_from(meta.mtime_nsec()).ok()?;
    Some((meta.len(), ns))
}
