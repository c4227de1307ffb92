//! Test images built at test time: Debian's static busybox (package
//! `busybox-static`) in a one-layer image, written as an OCI image archive or
//! in `docker save` format, optionally with extra files (e.g. one of the
//! project's own binaries) and config overrides.
//!
//! ```no_run
//! # use skiff_e2e::images::*;
//! # use std::path::Path;
//! # fn f(dir: &Path, my_binary: &Path) -> anyhow::Result<()> {
//! busybox_oci_archive(&dir.join("busybox.tar"), "busybox:latest")?;
//! busybox_image_with(
//!     &dir.join("echo.tar"),
//!     "skiff-test/echo:1",
//!     ArchiveFormat::Oci,
//!     &[ExtraFile::host("/usr/local/bin/echo-server", my_binary)],
//!     &ConfigOverrides { entrypoint: Some(vec!["/usr/local/bin/echo-server".into()]), ..Default::default() },
//! )?;
//! # Ok(()) }
//! ```
//!
//! The archives are deterministic: the same inputs give the same bytes, so
//! the same image id.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX: &str = "/usr/bin/busybox";

/// The applets linked into `/bin` of every test image.
pub const APPLETS: &[&str] = &[
    "sh", "httpd", "nc", "sleep", "cat", "echo", "ls", "wget", "nslookup", "env", "id", "hostname",
    "ps", "kill", "true", "false", "mkdir", "rm", "touch", "date", "grep", "head", "tail", "seq",
    "dd", "printf", "test", "ip", "ping", "wc", "sed", "awk", "mount", "df", "stat",
];

/// The PATH of every test image.
pub const PATH_ENV: &str = "PATH=/bin:/usr/bin:/sbin:/usr/sbin";

/// Files' modification time in the layer: fixed, so archives are reproducible.
const MTIME: u64 = 1_700_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// A tar of an OCI image layout, gzip-compressed layer (what
    /// `ctr images export` and `skopeo copy oci-archive:` write).
    Oci,
    /// `docker save`: manifest.json with RepoTags, config, uncompressed layer.tar.
    DockerSave,
}

/// The bytes of a file to put in the image.
#[derive(Clone, Debug)]
pub enum FileSource<'a> {
    /// Copied from the host, keeping its permission bits.
    Host(&'a Path),
    /// These bytes with this mode (e.g. `0o755` for a script).
    Bytes(&'a [u8], u32),
}

/// A file added to the image's layer at `path` (absolute, in the image);
/// missing parent directories are created (0755).
#[derive(Clone, Debug)]
pub struct ExtraFile<'a> {
    pub path: &'a str,
    pub source: FileSource<'a>,
}

impl<'a> ExtraFile<'a> {
    pub fn host(path: &'a str, host: &'a Path) -> Self {
        ExtraFile {
            path,
            source: FileSource::Host(host),
        }
    }

    pub fn bytes(path: &'a str, bytes: &'a [u8], mode: u32) -> Self {
        ExtraFile {
            path,
            source: FileSource::Bytes(bytes, mode),
        }
    }
}

/// Image config fields that replace the busybox defaults when set. `env`
/// entries are added after PATH (an entry `PATH=...` replaces it).
#[derive(Clone, Debug, Default)]
pub struct ConfigOverrides {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
}

/// The busybox image as an OCI image archive at `dest`, named `reference`
/// (e.g. `busybox:latest` or `docker.io/library/busybox:latest`).
pub fn busybox_oci_archive(dest: &Path, reference: &str) -> anyhow::Result<()> {
    busybox_image_with(
        dest,
        reference,
        ArchiveFormat::Oci,
        &[],
        &ConfigOverrides::default(),
    )
}

/// The busybox image in `docker save` format at `dest`, tagged `reference`.
pub fn docker_save_archive(dest: &Path, reference: &str) -> anyhow::Result<()> {
    busybox_image_with(
        dest,
        reference,
        ArchiveFormat::DockerSave,
        &[],
        &ConfigOverrides::default(),
    )
}

/// The busybox image plus `extra_files`, with `config` applied, written in
/// `format` to `dest` and named `reference`.
pub fn busybox_image_with(
    dest: &Path,
    reference: &str,
    format: ArchiveFormat,
    extra_files: &[ExtraFile<'_>],
    config: &ConfigOverrides,
) -> anyhow::Result<()> {
    let layer = busybox_layer(extra_files)?;
    let diff_id = sha256_hex(&layer);
    let config = image_config(config, &diff_id);
    match format {
        ArchiveFormat::Oci => write_oci_archive(dest, reference, &layer, &config),
        ArchiveFormat::DockerSave => write_docker_save(dest, reference, &layer, &config),
    }
}

/// The uncompressed layer tar: busybox, its applet links, /etc/passwd and
/// /etc/group, /tmp, /var/www, then the extra files.
pub fn busybox_layer(extra_files: &[ExtraFile<'_>]) -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (install Debian's busybox-static)"))?;
    let mut layer = LayerWriter::default();
    for dir in [
        "bin", "etc", "root", "usr", "usr/bin", "sbin", "var", "var/www", "home",
    ] {
        layer.dir(dir, 0o755)?;
    }
    layer.dir("tmp", 0o1777)?;
    layer.file("bin/busybox", &busybox, 0o755)?;
    for applet in APPLETS {
        layer.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    layer.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        0o644,
    )?;
    layer.file("etc/group", b"root:x:0:\nnobody:x:65534:\n", 0o644)?;
    for extra in extra_files {
        let path = extra.path.trim_start_matches('/');
        if path.is_empty() || path.split('/').any(|part| part == ".." || part == ".") {
            bail!(
                "{:?} is not an absolute, normalised path in the image",
                extra.path
            );
        }
        match &extra.source {
            FileSource::Host(host) => {
                let bytes =
                    std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
                let mode = std::fs::metadata(host)
                    .with_context(|| format!("reading {}", host.display()))?
                    .permissions()
                    .mode()
                    & 0o7777;
                layer.file(path, &bytes, mode)?;
            }
            FileSource::Bytes(bytes, mode) => layer.file(path, bytes, *mode)?,
        }
    }
    layer.finish()
}

/// Tar entries in order, with parents created before children.
struct LayerWriter {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Default for LayerWriter {
    fn default() -> Self {
        LayerWriter {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }
}

impl LayerWriter {
    fn dir(&mut self, path: &str, mode: u32) -> anyhow::Result<()> {
        if !self.dirs.insert(path.to_owned()) {
            return Ok(());
        }
        let mut header = header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut header, format!("{path}/"), std::io::empty())?;
        Ok(())
    }

    fn parents(&mut self, path: &str) -> anyhow::Result<()> {
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.dir(&parent.clone(), 0o755)?;
        }
        Ok(())
    }

    fn file(&mut self, path: &str, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
        self.parents(path)?;
        let mut header = header(tar::EntryType::Regular, mode, bytes.len() as u64);
        self.tar.append_data(&mut header, path, bytes)?;
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        self.parents(path)?;
        let mut header = header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut header, path, target)?;
        Ok(())
    }

    fn finish(self) -> anyhow::Result<Vec<u8>> {
        Ok(self.tar.into_inner()?)
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header
}

fn image_config(overrides: &ConfigOverrides, diff_id: &str) -> Value {
    let mut env = vec![PATH_ENV.to_owned()];
    for entry in &overrides.env {
        if entry.starts_with("PATH=") {
            env[0] = entry.clone();
        } else {
            env.push(entry.clone());
        }
    }
    let mut config = json!({
        "Env": env,
        "Cmd": overrides.cmd.clone().unwrap_or_else(|| vec!["sh".to_owned()]),
    });
    if let Some(entrypoint) = &overrides.entrypoint {
        config["Entrypoint"] = json!(entrypoint);
    }
    if let Some(dir) = &overrides.working_dir {
        config["WorkingDir"] = json!(dir);
    }
    if let Some(user) = &overrides.user {
        config["User"] = json!(user);
    }
    if !overrides.exposed_ports.is_empty() {
        let ports: serde_json::Map<String, Value> = overrides
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect();
        config["ExposedPorts"] = Value::Object(ports);
    }
    json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": "2023-11-14T22:13:20Z", "created_by": "skiff-e2e busybox_image_with" }],
    })
}

fn write_oci_archive(
    dest: &Path,
    reference: &str,
    layer: &[u8],
    config: &Value,
) -> anyhow::Result<()> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(layer)?;
    let layer_gz = gz.finish()?;
    let config = serde_json::to_vec(config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer_gz)],
    }))?;
    let mut manifest_descriptor =
        descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    // As containerd's export writes them: the full name, and the tag alone.
    manifest_descriptor["annotations"] = json!({
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": tag_of(reference),
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    }))?;

    let mut out = ArchiveWriter::create(dest)?;
    out.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    out.file("index.json", &index)?;
    for blob in [&manifest, &config, &layer_gz] {
        out.file(&format!("blobs/sha256/{}", sha256_hex(blob)), blob)?;
    }
    out.finish()
}

fn write_docker_save(
    dest: &Path,
    reference: &str,
    layer: &[u8],
    config: &Value,
) -> anyhow::Result<()> {
    let config = serde_json::to_vec(config)?;
    let config_name = format!("{}.json", sha256_hex(&config));
    let layer_name = format!("{}/layer.tar", sha256_hex(layer));
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": [reference],
        "Layers": [layer_name],
    }]))?;
    let mut out = ArchiveWriter::create(dest)?;
    out.file(&config_name, &config)?;
    out.file(&layer_name, layer)?;
    out.file("manifest.json", &manifest)?;
    out.finish()
}

/// The outer archive, written straight to its file.
struct ArchiveWriter {
    tar: tar::Builder<BufWriter<File>>,
    dirs: BTreeSet<String>,
}

impl ArchiveWriter {
    fn create(dest: &Path) -> anyhow::Result<Self> {
        let file = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        Ok(ArchiveWriter {
            tar: tar::Builder::new(BufWriter::new(file)),
            dirs: BTreeSet::new(),
        })
    }

    fn file(&mut self, path: &str, bytes: &[u8]) -> anyhow::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            let mut prefix = String::new();
            for part in parent.split('/') {
                prefix.push_str(part);
                prefix.push('/');
                if self.dirs.insert(prefix.clone()) {
                    let mut h = header(tar::EntryType::Directory, 0o755, 0);
                    self.tar.append_data(&mut h, &prefix, std::io::empty())?;
                }
            }
        }
        let mut h = header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
        self.tar.append_data(&mut h, path, bytes)?;
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        let mut out = self.tar.into_inner()?;
        out.flush()?;
        Ok(())
    }
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": format!("sha256:{}", sha256_hex(blob)),
        "size": blob.len(),
    })
}

/// `busybox:1.36` → `1.36`; `reg:5000/x` → `latest`.
fn tag_of(reference: &str) -> &str {
    let name = reference.split('@').next().unwrap_or(reference);
    let last = name.rsplit('/').next().unwrap_or(name);
    last.split_once(':').map_or("latest", |(_, tag)| tag)
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(tag_of("busybox"), "latest");
        assert_eq!(tag_of("busybox:1.36"), "1.36");
        assert_eq!(tag_of("reg:5000/x"), "latest");
        assert_eq!(tag_of("reg:5000/x:v1"), "v1");
    }

    #[test]
    fn archives_are_reproducible() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for format in [ArchiveFormat::Oci, ArchiveFormat::DockerSave] {
            let a = dir.path().join("a.tar");
            let b = dir.path().join("b.tar");
            let extra = [ExtraFile::bytes(
                "/opt/app/run.sh",
                b"#!/bin/sh\necho hi\n",
                0o755,
            )];
            let config = ConfigOverrides {
                entrypoint: Some(vec!["/opt/app/run.sh".into()]),
                ..Default::default()
            };
            busybox_image_with(&a, "x/y:1", format, &extra, &config)?;
            busybox_image_with(&b, "x/y:1", format, &extra, &config)?;
            assert_eq!(std::fs::read(&a)?, std::fs::read(&b)?);
        }
        Ok(())
    }

    #[test]
    fn layer_has_busybox_applets_and_extra_files() -> anyhow::Result<()> {
        let layer = busybox_layer(&[ExtraFile::bytes("/opt/app/run.sh", b"hi", 0o700)])?;
        let mut archive = tar::Archive::new(layer.as_slice());
        let mut names = Vec::new();
        for entry in archive.entries()? {
            let entry = entry?;
            names.push((
                entry.path()?.to_string_lossy().into_owned(),
                entry.header().mode()?,
            ));
        }
        let has = |name: &str| names.iter().any(|(n, _)| n == name);
        assert!(has("bin/busybox") && has("bin/sh") && has("bin/httpd") && has("etc/passwd"));
        assert!(has("opt/") && has("opt/app/"));
        assert!(names.iter().any(|(n, m)| n == "tmp/" && *m == 0o1777));
        assert!(
            names
                .iter()
                .any(|(n, m)| n == "opt/app/run.sh" && *m == 0o700)
        );
        Ok(())
    }
}
