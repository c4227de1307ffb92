//! Reading an extracted archive (or an OCI layout directory) into a plan:
//! the images it holds, their names, their verified manifest and config
//! bytes, and the layer files still to verify.
//!
//! Two formats:
//! - OCI image layout: `index.json` → manifests (or nested indexes, of
//!   which the one for this platform is taken) → config and layers, all in
//!   `blobs/<alg>/<hex>`. Names come from the `io.containerd.image.name`
//!   annotation, else from `org.opencontainers.image.ref.name` when it is
//!   a full reference rather than just a tag.
//! - `docker save`: `manifest.json` lists each image's config file,
//!   `RepoTags` and layer tars; the config's `rootfs.diff_ids` are the
//!   layers' digests.
//!
//! Docker 25+ writes both; the OCI index is read and `RepoTags` fill in
//! names the annotations lack.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;

use super::digest::{sha256_hex, sha256_hex_of};
use super::layer::clean_path;
use super::{ImageConfig, ImageError, normalize_reference};

const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Manifests and configs are small; anything bigger is not one.
const MAX_JSON: u64 = 16 * 1024 * 1024;

#[derive(Debug)]
pub struct PlannedImage {
    pub references: Vec<String>,
    /// sha256 hex of `config`: the image id.
    pub config_digest: String,
    pub config: Vec<u8>,
    /// The manifest as found (OCI); `None` for `docker save`, where the
    /// store writes one once the layer blobs are known.
    pub manifest: Option<Vec<u8>>,
    pub layers: Vec<PlannedLayer>,
}

#[derive(Debug, Clone)]
pub struct PlannedLayer {
    /// The blob's file.
    pub path: PathBuf,
    /// Its name in errors: `archive.tar: blobs/sha256/…`.
    pub file: String,
    /// sha256 hex the blob must have, when the format names it.
    pub blob_digest: Option<String>,
    pub blob_size: Option<u64>,
    /// sha256 hex of the uncompressed tar, from the config.
    pub diff_id: String,
}

/// Reads the layout in `dir`; `source` is what the user named (for errors).
pub fn read(dir: &Path, source: &Path) -> Result<Vec<PlannedImage>, ImageError> {
    let reader = Reader { dir, source };
    let oci = dir.join("index.json").is_file();
    let docker = dir.join("manifest.json").is_file();
    let mut images = match (oci, docker) {
        (true, _) => reader.oci()?,
        (false, true) => reader.docker()?,
        (false, false) => {
            return Err(ImageError::MissingManifest {
                path: source.to_owned(),
            });
        }
    };
    if oci && docker {
        // Names docker wrote only as RepoTags.
        if let Ok(docker_images) = reader.docker_names() {
            for image in &mut images {
                if let Some(names) = docker_images.get(&image.config_digest) {
                    for name in names {
                        if !image.references.contains(name) {
                            image.references.push(name.clone());
                        }
                    }
                }
            }
        }
    }
    for image in &mut images {
        image.references.sort();
        image.references.dedup();
    }
    Ok(images)
}

struct Reader<'a> {
    dir: &'a Path,
    source: &'a Path,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl Reader<'_> {
    fn oci(&self) -> Result<Vec<PlannedImage>, ImageError> {
        let bytes = self.read_member("index.json")?;
        let index: ImageIndex = self.parse("index.json", &bytes)?;
        let mut images: Vec<PlannedImage> = Vec::new();
        for descriptor in index.manifests() {
            let names = self.names(descriptor)?;
            for image in self.descend(descriptor, 0)? {
                add_image(&mut images, image, &names);
            }
        }
        if images.is_empty() {
            return Err(ImageError::Invalid {
                file: self.file("index.json"),
                reason: "no image manifests".to_owned(),
            });
        }
        Ok(images)
    }

    /// The images a descriptor in an index leads to: one for a manifest,
    /// the platform's for a nested index.
    fn descend(&self, descriptor: &Descriptor, depth: u8) -> Result<Vec<PlannedImage>, ImageError> {
        let (member, bytes) = self.blob(descriptor)?;
        match media_type_of(descriptor, &bytes) {
            Kind::Index => {
                if depth > 4 {
                    return Err(ImageError::Invalid {
                        file: self.file(&member),
                        reason: "image indexes nested too deep".to_owned(),
                    });
                }
                let index: ImageIndex = self.parse(&member, &bytes)?;
                let chosen = index
                    .manifests()
                    .iter()
                    .find(|d| platform_matches(d))
                    .ok_or_else(|| ImageError::Unsupported {
                        file: self.file(&member),
                        reason: format!("no image for this platform (linux/{})", host_arch()),
                    })?;
                self.descend(chosen, depth + 1)
            }
            Kind::Manifest => Ok(vec![self.manifest(&member, bytes)?]),
            Kind::Other(media_type) => {
                tracing::debug!(%member, %media_type, "skipping a non-image descriptor");
                Ok(Vec::new())
            }
        }
    }

    fn manifest(&self, member: &str, bytes: Vec<u8>) -> Result<PlannedImage, ImageError> {
        let manifest: ImageManifest = self.parse(member, &bytes)?;
        let (config_member, config) = self.blob(manifest.config())?;
        let config_digest = sha256_hex(&config);
        let diff_ids = self.diff_ids(&config_member, &config)?;
        if diff_ids.len() != manifest.layers().len() {
            return Err(self.invalid(
                member,
                format!(
                    "{} layers but the config lists {} diff_ids",
                    manifest.layers().len(),
                    diff_ids.len()
                ),
            ));
        }
        let mut layers = Vec::new();
        for (descriptor, diff_id) in manifest.layers().iter().zip(diff_ids) {
            let media_type = descriptor.media_type().to_string();
            if media_type.contains("zstd") {
                return Err(ImageError::Unsupported {
                    file: self.file(member),
                    reason: format!("zstd-compressed layers are not supported ({media_type})"),
                });
            }
            let hex = self.sha256(member, descriptor)?;
            let blob_member = format!("blobs/sha256/{hex}");
            let path = self.dir.join(&blob_member);
            if !path.is_file() {
                let reason = if descriptor.urls().is_some() {
                    "a foreign layer (fetched from a URL) is not in the archive"
                } else {
                    "layer blob missing from the archive"
                };
                return Err(self.invalid(&blob_member, reason.to_owned()));
            }
            layers.push(PlannedLayer {
                path,
                file: self.file(&blob_member),
                blob_digest: Some(hex.to_owned()),
                blob_size: Some(descriptor.size()),
                diff_id,
            });
        }
        Ok(PlannedImage {
            references: Vec::new(),
            config_digest,
            config,
            manifest: Some(bytes),
            layers,
        })
    }

    fn docker(&self) -> Result<Vec<PlannedImage>, ImageError> {
        let entries = self.docker_manifest()?;
        let mut images: Vec<PlannedImage> = Vec::new();
        for entry in entries {
            let config_path = self.member_path(&entry.config)?;
            let config = self.read_member(&entry.config)?;
            let config_digest = sha256_hex(&config);
            // `<hex>.json` (old docker) or `blobs/sha256/<hex>` (docker 25+)
            // name the digest the file must have.
            let named = config_path
                .file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.trim_end_matches(".json"))
                .filter(|n| super::digest::is_sha256_hex(n));
            if let Some(named) = named
                && named != config_digest
            {
                return Err(ImageError::DigestMismatch {
                    file: self.file(&entry.config),
                    expected: format!("sha256:{named}"),
                    actual: format!("sha256:{config_digest}"),
                });
            }
            let diff_ids = self.diff_ids(&entry.config, &config)?;
            if diff_ids.len() != entry.layers.len() {
                return Err(self.invalid(
                    "manifest.json",
                    format!(
                        "{} layers but {} lists {} diff_ids",
                        entry.layers.len(),
                        entry.config,
                        diff_ids.len()
                    ),
                ));
            }
            let mut layers = Vec::new();
            for (member, diff_id) in entry.layers.iter().zip(diff_ids) {
                let path = self.member_path(member)?;
                if !path.is_file() {
                    return Err(self.invalid(member, "layer missing from the archive".to_owned()));
                }
                let blob_digest = member
                    .strip_prefix("blobs/sha256/")
                    .filter(|hex| super::digest::is_sha256_hex(hex))
                    .map(str::to_owned);
                layers.push(PlannedLayer {
                    path,
                    file: self.file(member),
                    blob_digest,
                    blob_size: None,
                    diff_id,
                });
            }
            let names = entry
                .repo_tags
                .unwrap_or_default()
                .iter()
                .map(|tag| normalize_reference(tag))
                .collect::<Result<Vec<_>, _>>()?;
            let image = PlannedImage {
                references: Vec::new(),
                config_digest,
                config,
                manifest: None,
                layers,
            };
            add_image(&mut images, image, &names);
        }
        if images.is_empty() {
            return Err(self.invalid("manifest.json", "no images".to_owned()));
        }
        Ok(images)
    }

    /// config digest → normalised RepoTags, from manifest.json.
    fn docker_names(&self) -> Result<BTreeMap<String, Vec<String>>, ImageError> {
        let mut out = BTreeMap::new();
        for entry in self.docker_manifest()? {
            let config = self.read_member(&entry.config)?;
            let names = entry
                .repo_tags
                .unwrap_or_default()
                .iter()
                .filter_map(|tag| normalize_reference(tag).ok())
                .collect();
            out.insert(sha256_hex(&config), names);
        }
        Ok(out)
    }

    fn docker_manifest(&self) -> Result<Vec<DockerManifest>, ImageError> {
        let bytes = self.read_member("manifest.json")?;
        self.parse("manifest.json", &bytes)
    }

    /// The image's names from its descriptor's annotations.
    fn names(&self, descriptor: &Descriptor) -> Result<Vec<String>, ImageError> {
        let annotations = descriptor.annotations().as_ref();
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let name = match (get(CONTAINERD_NAME), get(OCI_REF_NAME)) {
            (Some(name), _) => name,
            // Per the OCI spec ref.name is often only a tag ("latest"):
            // that names no repository, so the image stays unnamed.
            (None, Some(name)) if name.contains('/') || name.contains(':') => name,
            _ => return Ok(Vec::new()),
        };
        Ok(vec![normalize_reference(name)?])
    }

    /// The config's diff_ids as sha256 hex (parsing it also checks it).
    fn diff_ids(&self, member: &str, bytes: &[u8]) -> Result<Vec<String>, ImageError> {
        let parsed: ImageConfiguration = self.parse(member, bytes)?;
        let diff_ids = parsed
            .rootfs()
            .diff_ids()
            .iter()
            .map(|d| {
                sha256_hex_of(d).map(str::to_owned).ok_or_else(|| {
                    self.invalid(member, format!("diff_id {d:?} is not a sha256 digest"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(diff_ids)
    }

    /// Reads and verifies the blob a descriptor names.
    fn blob(&self, descriptor: &Descriptor) -> Result<(String, Vec<u8>), ImageError> {
        let hex = self.sha256("index.json", descriptor)?;
        let member = format!("blobs/sha256/{hex}");
        let bytes = self.read_member(&member)?;
        let actual = sha256_hex(&bytes);
        if actual != hex {
            return Err(ImageError::DigestMismatch {
                file: self.file(&member),
                expected: format!("sha256:{hex}"),
                actual: format!("sha256:{actual}"),
            });
        }
        if bytes.len() as u64 != descriptor.size() {
            return Err(self.invalid(
                &member,
                format!(
                    "size {} but the descriptor says {}",
                    bytes.len(),
                    descriptor.size()
                ),
            ));
        }
        Ok((member, bytes))
    }

    fn sha256<'d>(&self, member: &str, descriptor: &'d Descriptor) -> Result<&'d str, ImageError> {
        let digest = descriptor.digest().as_ref();
        sha256_hex_of(digest).ok_or_else(|| ImageError::Unsupported {
            file: self.file(member),
            reason: format!("digest {digest:?}: only sha256 is supported"),
        })
    }

    fn read_member(&self, member: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.member_path(member)?;
        let meta = fs::metadata(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                self.invalid(member, "missing from the archive".to_owned())
            }
            _ => ImageError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        if meta.len() > MAX_JSON {
            return Err(self.invalid(member, format!("{} bytes is too big for JSON", meta.len())));
        }
        fs::read(&path).map_err(ImageError::io(&path))
    }

    /// A member's path inside the layout; names that climb out are refused.
    fn member_path(&self, member: &str) -> Result<PathBuf, ImageError> {
        match clean_path(member.as_bytes()) {
            Ok(Some(rel)) => Ok(self.dir.join(rel)),
            Ok(None) => Err(self.invalid(member, "not a file name".to_owned())),
            Err(reason) => Err(self.invalid(member, reason)),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        member: &str,
        bytes: &[u8],
    ) -> Result<T, ImageError> {
        serde_json::from_slice(bytes).map_err(|e| self.invalid(member, format!("bad JSON: {e}")))
    }

    fn invalid(&self, member: &str, reason: String) -> ImageError {
        ImageError::Invalid {
            file: self.file(member),
            reason,
        }
    }

    fn file(&self, member: &str) -> String {
        format!("{}: {member}", self.source.display())
    }
}

/// Adds `image` under `names`, merging with an image of the same config
/// (one image tagged twice appears twice in an index).
fn add_image(images: &mut Vec<PlannedImage>, image: PlannedImage, names: &[String]) {
    let position = images
        .iter()
        .position(|i| i.config_digest == image.config_digest);
    let target = match position {
        Some(i) => &mut images[i],
        None => {
            images.push(image);
            let last = images.len() - 1;
            &mut images[last]
        }
    };
    for name in names {
        if !target.references.contains(name) {
            target.references.push(name.clone());
        }
    }
}

enum Kind {
    Index,
    Manifest,
    Other(String),
}

/// The media type of a descriptor's blob; docker's v2 types count as
/// their OCI equivalents, and an untyped blob is judged by its fields.
fn media_type_of(descriptor: &Descriptor, bytes: &[u8]) -> Kind {
    match descriptor.media_type() {
        MediaType::ImageIndex => Kind::Index,
        MediaType::ImageManifest => Kind::Manifest,
        MediaType::Other(t) if t == "application/vnd.docker.distribution.manifest.list.v2+json" => {
            Kind::Index
        }
        MediaType::Other(t) if t == "application/vnd.docker.distribution.manifest.v2+json" => {
            Kind::Manifest
        }
        other => {
            #[derive(Deserialize)]
            struct Probe {
                manifests: Option<serde_json::Value>,
                layers: Option<serde_json::Value>,
            }
            match serde_json::from_slice::<Probe>(bytes) {
                Ok(Probe {
                    manifests: Some(_), ..
                }) => Kind::Index,
                Ok(Probe {
                    layers: Some(_), ..
                }) => Kind::Manifest,
                _ => Kind::Other(other.to_string()),
            }
        }
    }
}

fn platform_matches(descriptor: &Descriptor) -> bool {
    let Some(platform) = descriptor.platform() else {
        return true;
    };
    platform.os().to_string() == "linux" && platform.architecture().to_string() == host_arch()
}

/// This machine's architecture in OCI (Go) terms.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The runtime fields of an image config.
pub fn image_config(config: &ImageConfiguration) -> ImageConfig {
    let Some(c) = config.config() else {
        return ImageConfig::default();
    };
    let non_empty = |s: &Option<String>| s.as_ref().filter(|s| !s.is_empty()).cloned();
    ImageConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: non_empty(c.working_dir()),
        user: non_empty(c.user()),
    }
}
