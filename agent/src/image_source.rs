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

impl ImageSource for crate::images::ImageStore {
    fn resolve(&self, reference: &str) -> Option<ResolvedImage> {
        let image = match crate::images::ImageStore::resolve(self, reference) {
            Ok(image) => image?,
            Err(e) => {
                tracing::debug!(reference, error = %e, "image not resolved");
                return None;
            }
        };
        Some(ResolvedImage {
            id: image.id,
            entrypoint: image.config.entrypoint,
            cmd: image.config.cmd,
            env: image.config.env,
            working_dir: image.config.working_dir.unwrap_or_default(),
            user: image.config.user.unwrap_or_default(),
            layers: image.layers,
        })
    }
}

/// Opens the node's image store (`image-store` in the agent's folder) and
/// imports the air-gap archives found in `images`, as k3s does.
pub fn open_store(
    agent_dir: &std::path::Path,
) -> Result<crate::images::ImageStore, crate::images::ImageError> {
    let store = crate::images::ImageStore::open(&agent_dir.join("image-store"))?;
    let imported = store.import_dir(&agent_dir.join("images"))?;
    for image in imported {
        tracing::info!(id = %image.id, references = ?image.references, "imported an air-gap image");
    }
    Ok(store)
}
