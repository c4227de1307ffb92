//! The store's small JSON files (`index.json`, `archives.json`): read
//! whole, written whole by write-to-temp + fsync + rename, so a reader sees
//! the old or the new file and never a torn one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::ImageError;

/// Image id (`sha256:<config hex>`) → what the store keeps of it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Index {
    pub images: BTreeMap<String, IndexImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexImage {
    pub references: Vec<String>,
    /// `sha256:<hex>` of the manifest blob.
    pub manifest: String,
    pub layers: Vec<IndexLayer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexLayer {
    /// `sha256:<hex>` of the blob as stored.
    pub blob: String,
    /// `sha256:<hex>` of the uncompressed tar; names the unpacked directory.
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub size: u64,
}

impl Index {
    /// The image a normalised reference names.
    pub fn by_reference(&self, reference: &str) -> Option<&str> {
        self.images
            .iter()
            .find(|(_, image)| image.references.iter().any(|r| r == reference))
            .map(|(id, _)| id.as_str())
    }

    /// The image whose id is `sha256:<hex>`, `<hex>`, or a unique prefix
    /// of at least 12 hex digits (what `ls` prints).
    pub fn by_id(&self, id: &str) -> Option<&str> {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        if hex.len() < 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut matches = self.images.keys().filter(|key| {
            key.strip_prefix("sha256:")
                .is_some_and(|k| k.starts_with(hex))
        });
        let first = matches.next()?;
        matches.next().is_none().then_some(first.as_str())
    }
}

/// Archives already imported from an images folder: path → what it was.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Archives {
    pub archives: BTreeMap<String, ArchiveRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    pub size: u64,
    pub modified_ns: u128,
    /// Ids of the images it held.
    pub images: Vec<String>,
}

/// Reads a JSON file; a missing file is the empty value.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, ImageError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
            file: path.display().to_string(),
            reason: format!("corrupt store file: {e}"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(ImageError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Replaces `path` atomically and durably.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), ImageError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ImageError::Invalid {
        file: path.display().to_string(),
        reason: format!("encoding: {e}"),
    })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ImageError::Io {
            path: path.to_owned(),
            source: e,
        }
    })
}
