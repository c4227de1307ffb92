//! The node's image store: content-addressed, offline, fed by `docker save`
//! archives and OCI image archives/layouts (what air-gapped clusters ship).
//!
//! On disk, under the store's root (`DATA_DIR/agent/image-store`):
//!
//! ```text
//! blobs/sha256/<hex>   manifests, configs and layer blobs, by digest
//! layers/<hex>/        each layer unpacked once, by its diff_id, with
//!                      whiteouts as overlayfs expects; read-only, shared
//! index.json           image id -> references, manifest, layers
//! archives.json        archives already imported from an images folder
//! tmp/                 staging; emptied on open
//! lock                 flock held by whoever changes the store
//! ```
//!
//! An import reads and verifies everything into `tmp/` first and only then
//! moves it into place and rewrites the index, so a bad archive or a crash
//! leaves the store as it was (unreferenced leftovers are collected on the
//! next open). Readers take no lock: the index and every layer directory
//! appear by atomic rename.
//!
//! All methods block on the filesystem; call them from a blocking thread.

mod archive;
mod digest;
mod index;
mod layer;
mod layout;
mod reference;
mod store;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use reference::normalize_reference;
pub use store::ImageStore;

/// The store under a node's data dir: `DATA_DIR/agent/image-store`.
pub fn store_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("agent").join("image-store")
}

/// Where air-gap image archives are picked up: `DATA_DIR/agent/images`.
pub fn airgap_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("agent").join("images")
}

/// One image as `skiff images ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSummary {
    /// `sha256:<config digest>`.
    pub id: String,
    /// Normalised references (`docker.io/library/busybox:latest`), sorted.
    pub references: Vec<String>,
    /// Bytes of the uncompressed layers.
    pub size: u64,
}

/// What the runtime needs to run a container of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// `sha256:<config digest>`.
    pub id: String,
    pub references: Vec<String>,
    pub config: ImageConfig,
    /// Unpacked layer directories, bottom first: overlayfs lower dirs
    /// (pass them top first in `lowerdir=`). Read-only and shared between
    /// containers.
    pub layers: Vec<PathBuf>,
    /// `sha256:<manifest digest>` (for a `docker save` archive, of the OCI
    /// manifest the store wrote for it).
    pub manifest_digest: String,
}

/// The parts of the image config that the container spec is merged with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an image archive: {reason}")]
    NotAnArchive { path: PathBuf, reason: String },
    #[error(
        "{path} has no image manifest: expected index.json (OCI layout) or manifest.json (docker save)"
    )]
    MissingManifest { path: PathBuf },
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("{file}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file}: unsafe layer entry {entry:?}: {reason}")]
    UnsafeLayer {
        file: String,
        entry: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    Unsupported { file: String, reason: String },
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("no such image: {reference}")]
    NotFound { reference: String },
}

impl ImageError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { path, source }
    }
}
