//! STAND-IN wiring until cni/ and the image store land: no pod network
//! (only hostNetwork pods run) and no images.

use std::sync::Arc;

use tokio::sync::watch;

use crate::AgentConfig;
use crate::image_source::{ImageSource, ResolvedImage};
use crate::sandbox::PodNetwork;

pub async fn run(
    _client: kube::Client,
    _config: Arc<AgentConfig>,
    _tx: watch::Sender<Option<Arc<dyn PodNetwork>>>,
) {
}

struct NoImages;

impl ImageSource for NoImages {
    fn resolve(&self, _reference: &str) -> Option<ResolvedImage> {
        None
    }
}

pub fn images(_config: &AgentConfig) -> Arc<dyn ImageSource> {
    Arc::new(NoImages)
}
