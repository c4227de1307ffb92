//! What the pod worker needs from the image store: a reference resolved
//! to an image id, its config and its unpacked layers.

use std::path::PathBuf;

/// An image ready to run.
#[derive(Clone, Debug, Default)]
pub struct ResolvedImage {
    /// `sha256:...`
    pub id: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    /// Unpacked layer folders, bottom first.
    pub layers: Vec<PathBuf>,
}

pub trait ImageSource: Send + Sync {
    fn resolve(&self, reference: &str) -> Option<ResolvedImage>;
}
