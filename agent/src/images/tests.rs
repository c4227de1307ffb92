//! Store and layer tests on hand-built layers and layouts, including
//! hostile ones: traversal, symlink escapes, tampered blobs.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;

use super::digest::sha256_hex;
use super::layer::{self, Outputs};
use super::{ImageError, ImageStore};

/// One tar entry of a test layer. Paths are written verbatim (no checks),
/// so hostile names can be built.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Char(&'a str, u32, u32),
}

fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let (name, kind, data): (&str, tar::EntryType, &[u8]) = match entry {
            E::Dir(name, mode) => {
                header.set_mode(*mode);
                (name, tar::EntryType::Directory, &[])
            }
            E::File(name, data, mode) => {
                header.set_mode(*mode);
                (name, tar::EntryType::Regular, data)
            }
            E::Symlink(name, target) => {
                header.set_mode(0o777);
                header.set_link_name_literal(target).unwrap();
                (name, tar::EntryType::Symlink, &[])
            }
            E::HardLink(name, target) => {
                header.set_mode(0o644);
                header.set_link_name_literal(target).unwrap();
                (name, tar::EntryType::Link, &[])
            }
            E::Char(name, major, minor) => {
                header.set_mode(0o666);
                header.set_device_major(*major).unwrap();
                header.set_device_minor(*minor).unwrap();
                (name, tar::EntryType::Char, &[])
            }
        };
        let bytes = name.as_bytes();
        header.as_gnu_mut().unwrap().name[..bytes.len()].copy_from_slice(bytes);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        tar.append(&header, data).unwrap();
    }
    tar.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Unpacks `tar` into `dir/layer`; the result and the layer path.
fn unpack(dir: &Path, tar: &[u8]) -> (Result<layer::LayerStats, ImageError>, PathBuf) {
    let blob = dir.join("blob");
    fs::write(&blob, tar).unwrap();
    let dest = dir.join("layer");
    let result = layer::process(
        &blob,
        "test-layer",
        Outputs {
            unpack_to: Some(&dest),
            ..Default::default()
        },
    );
    (result, dest)
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("skiff-test-images-")
        .tempdir()
        .unwrap()
}

fn unsafe_entry(result: Result<layer::LayerStats, ImageError>) -> String {
    match result {
        Err(ImageError::UnsafeLayer { entry, reason, .. }) => format!("{entry}: {reason}"),
        other => panic!("expected an unsafe-layer error, got {other:?}"),
    }
}

#[test]
fn whiteouts_become_overlay_markers() {
    let dir = tmp();
    let tar = layer(&[
        E::Dir("a/", 0o755),
        E::File(".wh.gone", b"", 0o644),
        E::File("a/.wh..wh..opq", b"", 0o644),
        E::File("a/keep", b"kept", 0o640),
        E::File("a/.wh..wh.plnk", b"", 0o644),
    ]);
    let (result, root) = unpack(dir.path(), &tar);
    result.unwrap();
    let gone = fs::symlink_metadata(root.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    assert_eq!((gone.uid(), gone.gid()), (0, 0));
    assert_eq!(
        xattr::get(root.join("a"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read(root.join("a/keep")).unwrap(), b"kept");
    assert_eq!(
        fs::metadata(root.join("a/keep"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    for name in [".wh.gone", "a/.wh..wh..opq", "a/.wh..wh.plnk"] {
        assert!(
            fs::symlink_metadata(root.join(name)).is_err(),
            "{name} left behind"
        );
    }
}

#[test]
fn parent_traversal_is_refused() {
    for name in ["../escape", "a/../../escape", "./../escape"] {
        let dir = tmp();
        let tar = layer(&[E::Dir("a/", 0o755), E::File(name, b"x", 0o644)]);
        let (result, _) = unpack(dir.path(), &tar);
        let message = unsafe_entry(result);
        assert!(message.contains(".."), "{message}");
        assert!(!dir.path().join("escape").exists());
    }
}

#[test]
fn absolute_paths_stay_inside_the_layer() {
    let dir = tmp();
    let tar = layer(&[E::File("/etc/inside", b"x", 0o644), E::Dir("/", 0o755)]);
    let (result, root) = unpack(dir.path(), &tar);
    result.unwrap();
    assert_eq!(fs::read(root.join("etc/inside")).unwrap(), b"x");
}

#[test]
fn symlinks_are_never_followed() {
    let dir = tmp();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"original").unwrap();
    let outside_str = outside.to_str().unwrap();
    let victim = outside.join("victim");
    let victim_str = victim.to_str().unwrap();

    // Writing through a symlinked directory, absolute or relative.
    for tar in [
        layer(&[
            E::Symlink("link", outside_str),
            E::File("link/pwned", b"x", 0o644),
        ]),
        layer(&[E::Symlink("up", "../.."), E::File("up/pwned", b"x", 0o644)]),
        layer(&[E::Symlink("link", outside_str), E::Dir("link/sub/", 0o755)]),
        layer(&[
            E::Symlink("link", outside_str),
            E::File("link/.wh.victim", b"", 0o644),
        ]),
    ] {
        let work = tmp();
        let (result, _) = unpack(work.path(), &tar);
        let message = unsafe_entry(result);
        assert!(message.contains("not a directory"), "{message}");
    }
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert_eq!(fs::read(&victim).unwrap(), b"original");

    // A file entry replaces a symlink of the same name instead of writing
    // through it.
    let work = tmp();
    let tar = layer(&[E::Symlink("f", victim_str), E::File("f", b"new", 0o644)]);
    let (result, root) = unpack(work.path(), &tar);
    result.unwrap();
    assert!(fs::symlink_metadata(root.join("f")).unwrap().is_file());
    assert_eq!(fs::read(&victim).unwrap(), b"original");

    // The symlink itself is kept as written: it resolves in the container.
    let work = tmp();
    let (result, root) = unpack(work.path(), &layer(&[E::Symlink("etc-link", "/etc")]));
    result.unwrap();
    assert_eq!(
        fs::read_link(root.join("etc-link")).unwrap(),
        Path::new("/etc")
    );
}

#[test]
fn hard_links_stay_inside_the_layer() {
    let dir = tmp();
    let tar = layer(&[
        E::File("bin/tool", b"binary", 0o755),
        E::HardLink("bin/alias", "bin/tool"),
        E::HardLink("/bin/alias2", "./bin/tool"),
    ]);
    let (result, root) = unpack(dir.path(), &tar);
    result.unwrap();
    let tool = fs::metadata(root.join("bin/tool")).unwrap();
    assert_eq!(
        tool.ino(),
        fs::metadata(root.join("bin/alias")).unwrap().ino()
    );
    assert_eq!(
        tool.ino(),
        fs::metadata(root.join("bin/alias2")).unwrap().ino()
    );

    let outside = dir.path().join("secret");
    fs::write(&outside, b"secret").unwrap();
    for tar in [
        layer(&[E::HardLink("stolen", "../secret")]),
        layer(&[E::HardLink("stolen", outside.to_str().unwrap())]),
        layer(&[
            E::Symlink("link", dir.path().to_str().unwrap()),
            E::HardLink("stolen", "link/secret"),
        ]),
    ] {
        let work = tmp();
        let (result, root) = unpack(work.path(), &tar);
        assert!(result.is_err(), "a hard link out of the layer was accepted");
        assert!(fs::symlink_metadata(root.join("stolen")).is_err());
    }
    assert_eq!(fs::metadata(&outside).unwrap().nlink(), 1);
}

#[test]
fn metadata_entries_are_not_files() {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.as_ustar_mut().unwrap().name[..20].copy_from_slice(b"../pax_global_header");
    header.set_entry_type(tar::EntryType::XGlobalHeader);
    let record = b"21 comment=a comment\n";
    header.set_size(record.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append(&header, &record[..]).unwrap();
    let mut tar = tar.into_inner().unwrap();
    tar.truncate(tar.len() - 1024);
    tar.extend(layer(&[E::File("kept", b"x", 0o644)]));
    let dir = tmp();
    let (result, root) = unpack(dir.path(), &tar);
    result.unwrap();
    assert_eq!(fs::read_dir(&root).unwrap().count(), 1);
    assert_eq!(fs::read(root.join("kept")).unwrap(), b"x");
}

#[test]
fn device_nodes_are_created() {
    let dir = tmp();
    let (result, root) = unpack(dir.path(), &layer(&[E::Char("dev/null", 1, 3)]));
    result.unwrap();
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
}

#[test]
fn gzip_and_plain_layers_have_the_same_diff_id() {
    let tar = layer(&[E::File("hello", b"world", 0o644)]);
    let dir = tmp();
    let plain = dir.path().join("plain");
    let gz = dir.path().join("gz");
    fs::write(&plain, &tar).unwrap();
    fs::write(&gz, gzip(&tar)).unwrap();
    let a = layer::process(&plain, "plain", Outputs::default()).unwrap();
    let b = layer::process(&gz, "gz", Outputs::default()).unwrap();
    assert_eq!(a.diff_id, sha256_hex(&tar));
    assert_eq!(a.diff_id, b.diff_id);
    assert_eq!(a.blob, a.diff_id);
    assert_eq!(b.blob, sha256_hex(&gzip(&tar)));
    assert!(!a.compressed && b.compressed);
    assert_eq!(a.size, tar.len() as u64);
}

#[test]
fn zstd_layers_are_refused_clearly() {
    let dir = tmp();
    let blob = dir.path().join("blob");
    fs::write(&blob, [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]).unwrap();
    let err = layer::process(&blob, "zstd-layer", Outputs::default()).unwrap_err();
    assert!(err.to_string().contains("zstd"), "{err}");
}

// ---- the store, on OCI layouts and docker-save trees built here ----

struct Built {
    dir: PathBuf,
    layer_blobs: Vec<String>,
    config_digest: String,
}

/// An OCI layout in `dir` with `layers` (tar bytes; gzip-compressed when
/// `gz`), named `name`.
fn oci_layout(dir: &Path, name: &str, layers: &[Vec<u8>], gz: bool) -> Built {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes).unwrap();
        hex
    };
    let mut descriptors = Vec::new();
    let mut layer_blobs = Vec::new();
    for tar in layers {
        let blob = if gz { gzip(tar) } else { tar.clone() };
        let hex = put(&blob);
        let media_type = if gz {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        descriptors.push(
            json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": blob.len()}),
        );
        layer_blobs.push(hex);
    }
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["A=1"], "WorkingDir": "/w"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let manifest_hex = put(&manifest);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_hex}"),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    Built {
        dir: dir.to_owned(),
        layer_blobs,
        config_digest,
    }
}

/// A `docker save` tree with uncompressed layers; `diff_ids` overrides the
/// config's (to build a lying one).
fn docker_tree(dir: &Path, tag: &str, layers: &[Vec<u8>], diff_ids: Option<Vec<String>>) {
    fs::create_dir_all(dir).unwrap();
    let mut names = Vec::new();
    for (i, tar) in layers.iter().enumerate() {
        let name = format!("l{i}/layer.tar");
        fs::create_dir_all(dir.join(format!("l{i}"))).unwrap();
        fs::write(dir.join(&name), tar).unwrap();
        names.push(name);
    }
    let diff_ids = diff_ids.unwrap_or_else(|| {
        layers
            .iter()
            .map(|l| format!("sha256:{}", sha256_hex(l)))
            .collect()
    });
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/app"], "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256_hex(&config));
    fs::write(dir.join(&config_name), &config).unwrap();
    let manifest = json!([{"Config": config_name, "RepoTags": [tag], "Layers": names}]);
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
}

/// Tars up `dir` (members relative to it) into `dest`, gzip when `gz`.
fn tar_dir(dir: &Path, dest: &Path, gz: bool) {
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all(".", dir).unwrap();
    let bytes = tar.into_inner().unwrap();
    fs::write(dest, if gz { gzip(&bytes) } else { bytes }).unwrap();
}

/// Everything under the store root except the lock, as (path, len).
fn snapshot(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if entry.file_name() != "lock" {
                out.push((entry.path(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

fn base_layer() -> Vec<u8> {
    layer(&[
        E::Dir("etc/", 0o755),
        E::File("etc/config", b"v1", 0o644),
        E::File("etc/remove-me", b"old", 0o644),
        E::Dir("data/", 0o755),
        E::File("data/lower-only", b"lower", 0o644),
        E::File("bin/app", b"#!/bin/sh\n", 0o755),
    ])
}

fn upper_layer() -> Vec<u8> {
    layer(&[
        E::File("etc/.wh.remove-me", b"", 0o644),
        E::File("etc/config", b"v2", 0o644),
        E::Dir("data/", 0o700),
        E::File("data/.wh..wh..opq", b"", 0o644),
        E::File("data/upper-only", b"upper", 0o644),
    ])
}

#[test]
fn multi_layer_image_merges_as_overlayfs_expects() {
    let dir = tmp();
    let built = oci_layout(
        &dir.path().join("layout"),
        "example.com/app:2",
        &[base_layer(), upper_layer()],
        true,
    );
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let summaries = store.import_archive(&built.dir).unwrap();
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].references, ["example.com/app:2"]);
    assert_eq!(summaries[0].id, format!("sha256:{}", built.config_digest));

    let image = store.resolve("example.com/app:2").unwrap().unwrap();
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/w"));
    assert_eq!(image.layers.len(), 2);
    let upper = &image.layers[1];
    assert!(
        fs::symlink_metadata(upper.join("etc/remove-me"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(
        xattr::get(upper.join("data"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );

    // The real thing: overlayfs over both layers, in a private mount
    // namespace that dies with the command.
    let merged = dir.path().join("merged");
    fs::create_dir(&merged).unwrap();
    let script = format!(
        "mount -t overlay skiff-test -o lowerdir={}:{} {} && cd {} && \
         cat etc/config && echo && ls etc && ls data && stat -c %a data",
        image.layers[1].display(),
        image.layers[0].display(),
        merged.display(),
        merged.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, "v2\nconfig\nupper-only\n700\n");
}

#[test]
fn gzip_outer_archive_and_plain_layers() {
    let dir = tmp();
    let built = oci_layout(&dir.path().join("layout"), "app:gz", &[base_layer()], false);
    let archive = dir.path().join("image.tar.gz");
    tar_dir(&built.dir, &archive, true);
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let summaries = store.import_archive(&archive).unwrap();
    assert_eq!(summaries[0].references, ["docker.io/library/app:gz"]);
    assert_eq!(summaries[0].size, base_layer().len() as u64);
    let image = store.resolve("app:gz").unwrap().unwrap();
    assert_eq!(fs::read(image.layers[0].join("etc/config")).unwrap(), b"v1");
}

#[test]
fn only_root_reaches_the_store() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp();
    let root = dir.path().join("store");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    ImageStore::open(&root).unwrap();
    let mode = fs::metadata(&root).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
}

#[test]
fn tampered_blobs_are_refused_and_the_store_is_unchanged() {
    let dir = tmp();
    let store_root = dir.path().join("store");
    let store = ImageStore::open(&store_root).unwrap();
    let good = oci_layout(&dir.path().join("good"), "good:1", &[base_layer()], true);
    store.import_archive(&good.dir).unwrap();
    let before = snapshot(&store_root);

    // A layer blob whose bytes are not the ones the manifest names.
    let bad = oci_layout(
        &dir.path().join("bad-layer"),
        "bad:1",
        &[upper_layer()],
        true,
    );
    let blob = bad.dir.join("blobs/sha256").join(&bad.layer_blobs[0]);
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 1;
    fs::write(&blob, &bytes).unwrap();
    let archive = dir.path().join("bad-layer.tar");
    tar_dir(&bad.dir, &archive, false);
    let err = store.import_archive(&archive).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&bad.layer_blobs[0]),
        "names the blob: {err}"
    );
    assert!(
        err.to_string().contains("bad-layer.tar"),
        "names the archive: {err}"
    );

    // A config blob that was edited.
    let bad = oci_layout(
        &dir.path().join("bad-config"),
        "bad:2",
        &[upper_layer()],
        true,
    );
    let config = bad.dir.join("blobs/sha256").join(&bad.config_digest);
    let edited = String::from_utf8(fs::read(&config).unwrap())
        .unwrap()
        .replace("A=1", "A=2");
    fs::write(&config, edited).unwrap();
    let err = store.import_archive(&bad.dir).unwrap_err();
    assert!(err.to_string().contains(&bad.config_digest), "{err}");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");

    // A docker-save config whose diff_id is not the layer's.
    let lying = dir.path().join("lying");
    let wrong = format!("sha256:{}", sha256_hex(b"something else"));
    docker_tree(&lying, "liar:1", &[upper_layer()], Some(vec![wrong]));
    let err = store.import_archive(&lying).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("l0/layer.tar"), "{err}");

    // A docker-save config file whose name is not its digest.
    let renamed = dir.path().join("renamed");
    docker_tree(&renamed, "renamed:1", &[upper_layer()], None);
    let manifest = fs::read_to_string(renamed.join("manifest.json")).unwrap();
    let config_name = manifest.split('"').nth(3).unwrap().to_owned();
    let mut config = fs::read(renamed.join(&config_name)).unwrap();
    config.push(b' ');
    fs::write(renamed.join(&config_name), config).unwrap();
    let err = store.import_archive(&renamed).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");

    // A layer that tries to escape, in an otherwise valid image.
    let hostile = oci_layout(
        &dir.path().join("hostile"),
        "hostile:1",
        &[
            base_layer(),
            layer(&[E::File("../../../escaped", b"x", 0o644)]),
        ],
        false,
    );
    let err = store.import_archive(&hostile.dir).unwrap_err();
    assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");

    assert_eq!(snapshot(&store_root), before);
    assert_eq!(store.list().len(), 1);
}

#[test]
fn malformed_archives_give_clear_errors() {
    let dir = tmp();
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.tar", Vec::new(), "empty"),
        ("text.tar", b"hello\n".repeat(200), "not an image archive"),
        ("garbage.tar.gz", gzip(&[7u8; 5000]), "not an image archive"),
        (
            "truncated.tar.gz",
            gzip(b"x")[..5].to_vec(),
            "not an image archive",
        ),
    ];
    for (name, bytes, expect) in cases {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        let err = store.import_archive(&path).unwrap_err().to_string();
        assert!(err.contains(expect), "{name}: {err}");
    }
    // Valid tar, bad JSON.
    let broken = dir.path().join("broken");
    fs::create_dir(&broken).unwrap();
    fs::write(broken.join("manifest.json"), b"{not json").unwrap();
    let err = store.import_archive(&broken).unwrap_err().to_string();
    assert!(
        err.contains("manifest.json") && err.contains("bad JSON"),
        "{err}"
    );
    // Members that climb out of the archive.
    fs::write(
        broken.join("manifest.json"),
        br#"[{"Config":"../../etc/passwd","Layers":[]}]"#,
    )
    .unwrap();
    let err = store.import_archive(&broken).unwrap_err().to_string();
    assert!(err.contains(".."), "{err}");
    let err = store
        .import_archive(&dir.path().join("missing.tar"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.tar"), "{err}");
    assert!(store.list().is_empty());
}

#[test]
fn tags_move_and_removal_collects_garbage() {
    let dir = tmp();
    let root = dir.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    let v1 = oci_layout(&dir.path().join("v1"), "app:latest", &[base_layer()], true);
    let v2 = oci_layout(
        &dir.path().join("v2"),
        "app:latest",
        &[base_layer(), upper_layer()],
        true,
    );
    store.import_archive(&v1.dir).unwrap();
    let docker = dir.path().join("docker");
    docker_tree(&docker, "app:v1", &[base_layer()], None);
    store.import_archive(&docker).unwrap();
    assert_eq!(store.list().len(), 2);

    // app:latest moves to v2; v1 lost its only name and goes.
    store.import_archive(&v2.dir).unwrap();
    let list = store.list();
    assert_eq!(list.len(), 2, "{list:?}");
    let latest = store.resolve("app").unwrap().unwrap();
    assert_eq!(latest.id, format!("sha256:{}", v2.config_digest));
    assert_eq!(fs::read_dir(root.join("layers")).unwrap().count(), 2);
    assert!(!root.join("blobs/sha256").join(&v1.config_digest).exists());

    // By short id: the image and its names go; the shared base layer stays.
    let short = &v2.config_digest[..12];
    assert!(store.resolve(short).unwrap().is_some());
    store.remove(short).unwrap();
    assert!(store.resolve("app:latest").unwrap().is_none());
    assert_eq!(fs::read_dir(root.join("layers")).unwrap().count(), 1);
    assert!(store.resolve("docker.io/library/app:v1").unwrap().is_some());

    assert!(matches!(
        store.remove("app:latest"),
        Err(ImageError::NotFound { .. })
    ));
    assert!(matches!(
        store.remove("Bad Ref"),
        Err(ImageError::NotFound { .. })
    ));
    assert!(matches!(
        store.resolve("Bad Ref"),
        Err(ImageError::InvalidReference { .. })
    ));
    store.remove("app:v1").unwrap();
    assert!(store.list().is_empty());
    assert_eq!(fs::read_dir(root.join("layers")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(root.join("blobs/sha256")).unwrap().count(), 0);
}

#[test]
fn import_dir_imports_each_archive_once() {
    let dir = tmp();
    let images = dir.path().join("images");
    fs::create_dir(&images).unwrap();
    let one = oci_layout(&dir.path().join("one"), "one:1", &[base_layer()], true);
    tar_dir(&one.dir, &images.join("one.tar"), false);
    docker_tree(&dir.path().join("two"), "two:1", &[upper_layer()], None);
    tar_dir(&dir.path().join("two"), &images.join("two.tar.gz"), true);
    fs::write(images.join("README"), b"not an image").unwrap();
    fs::write(images.join("broken.tar"), b"not a tar either").unwrap();

    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let results = store.import_dir_results(&images).unwrap();
    assert_eq!(results.len(), 3, "README is not a candidate");
    assert!(results[0].1.is_err(), "broken.tar fails alone");
    let imported = store.import_dir(&images).unwrap();
    let mut names: Vec<String> = imported.iter().flat_map(|i| i.references.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        ["docker.io/library/one:1", "docker.io/library/two:1"]
    );

    // Unchanged (same size and mtime) archives are skipped: corrupting one
    // in place without changing those goes unnoticed, proving it was not
    // read again.
    let path = images.join("one.tar");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let zeros = vec![0u8; fs::metadata(&path).unwrap().len() as usize];
    fs::write(&path, &zeros).unwrap();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(store.import_dir(&images).unwrap().len(), 2);

    // Once its image is gone, the archive is read again (and now fails).
    store.remove("one:1").unwrap();
    let results = store.import_dir_results(&images).unwrap();
    assert!(results.iter().any(|(p, r)| p == &path && r.is_err()));
    assert!(
        store
            .import_dir(&dir.path().join("nonexistent"))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn open_clears_what_a_crash_left() {
    let dir = tmp();
    let root = dir.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    let built = oci_layout(&dir.path().join("layout"), "kept:1", &[base_layer()], true);
    store.import_archive(&built.dir).unwrap();
    let before = snapshot(&root);
    // An import that died after moving a layer in, before the index.
    fs::create_dir_all(root.join("tmp/import-1-0/layer-0/etc")).unwrap();
    fs::create_dir_all(root.join("layers").join("a".repeat(64)).join("etc")).unwrap();
    fs::write(root.join("blobs/sha256").join("b".repeat(64)), b"orphan").unwrap();
    drop(store);
    let store = ImageStore::open(&root).unwrap();
    assert_eq!(snapshot(&root), before);
    assert!(store.resolve("kept:1").unwrap().is_some());
}

#[test]
fn docker_save_layers_are_stored_with_an_oci_manifest() {
    let dir = tmp();
    let tree = dir.path().join("tree");
    docker_tree(
        &tree,
        "docker.io/me/app:1",
        &[base_layer(), upper_layer()],
        None,
    );
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    store.import_archive(&tree).unwrap();
    let image = store.resolve("me/app:1").unwrap().unwrap();
    assert_eq!(image.config.entrypoint, ["/bin/app"]);
    assert_eq!(image.config.user.as_deref(), Some("1000:1000"));
    let hex = image.manifest_digest.strip_prefix("sha256:").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.path().join("store/blobs/sha256").join(hex)).unwrap())
            .unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);
    // By repository and manifest digest, as pods may name images.
    let pinned = format!("me/app@{}", image.manifest_digest);
    assert_eq!(store.resolve(&pinned).unwrap().unwrap().id, image.id);
    let elsewhere = format!("other/app@{}", image.manifest_digest);
    assert!(store.resolve(&elsewhere).unwrap().is_none());
    assert_eq!(
        manifest["layers"][0]["digest"],
        format!("sha256:{}", sha256_hex(&base_layer()))
    );
}

#[test]
fn a_multi_platform_index_yields_this_platforms_image() {
    let dir = tmp();
    let layout = dir.path().join("layout");
    let built = oci_layout(&layout, "unused", &[base_layer()], true);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut ours = index["manifests"][0].clone();
    ours.as_object_mut().unwrap().remove("annotations");
    ours["platform"] = json!({"architecture": host_arch(), "os": "linux"});
    let missing = format!("sha256:{}", sha256_hex(b"never read"));
    let theirs = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": missing, "size": 10,
        "platform": {"architecture": "s390x", "os": "linux"},
    });
    let nested = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [theirs, ours],
    }))
    .unwrap();
    let nested_hex = sha256_hex(&nested);
    fs::write(layout.join("blobs/sha256").join(&nested_hex), &nested).unwrap();
    let top = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{nested_hex}"),
            "size": nested.len(),
            "annotations": {"io.containerd.image.name": "docker.io/library/multi:1"},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();

    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let summaries = store.import_archive(&layout).unwrap();
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].references, ["docker.io/library/multi:1"]);
    assert_eq!(summaries[0].id, format!("sha256:{}", built.config_digest));
}

#[test]
fn docker_25_archives_take_names_from_repo_tags() {
    // Docker 25+ writes an OCI layout whose index may carry only a tag,
    // plus manifest.json with RepoTags pointing into blobs/.
    let dir = tmp();
    let layout = dir.path().join("layout");
    let built = oci_layout(&layout, "1.0", &[base_layer()], false);
    let manifest = json!([{
        "Config": format!("blobs/sha256/{}", built.config_digest),
        "RepoTags": ["team/tool:1.0"],
        "Layers": [format!("blobs/sha256/{}", built.layer_blobs[0])],
    }]);
    fs::write(
        layout.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let summaries = store.import_archive(&layout).unwrap();
    assert_eq!(summaries[0].references, ["docker.io/team/tool:1.0"]);

    // A tag alone names nothing: the image is kept, unnamed, by id.
    let bare = dir.path().join("bare");
    let built = oci_layout(&bare, "latest", &[upper_layer()], true);
    let summaries = store.import_archive(&bare).unwrap();
    assert!(summaries[0].references.is_empty());
    let id = format!("sha256:{}", built.config_digest);
    assert_eq!(store.resolve(&id).unwrap().unwrap().id, id);
}

#[test]
fn concurrent_imports_from_two_handles_both_land() {
    let dir = tmp();
    let root = dir.path().join("store");
    let a = oci_layout(&dir.path().join("a"), "a:1", &[base_layer()], true);
    let b = oci_layout(
        &dir.path().join("b"),
        "b:1",
        &[base_layer(), upper_layer()],
        true,
    );
    let threads: Vec<_> = [a.dir, b.dir]
        .into_iter()
        .map(|layout| {
            let root = root.clone();
            std::thread::spawn(move || {
                let store = ImageStore::open(&root).unwrap();
                for _ in 0..3 {
                    store.import_archive(&layout).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let store = ImageStore::open(&root).unwrap();
    assert_eq!(store.list().len(), 2);
    assert!(store.resolve("a:1").unwrap().is_some());
    assert_eq!(store.resolve("b:1").unwrap().unwrap().layers.len(), 2);
    assert_eq!(fs::read_dir(root.join("layers")).unwrap().count(), 2);
    assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[test]
fn mutated_layers_never_panic_or_escape() {
    // Deterministic xorshift, so a failure reproduces.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let original = layer(&[
        E::Dir("etc/", 0o755),
        E::File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644),
        E::Symlink("lib", "/usr/lib"),
        E::HardLink("etc/passwd-", "etc/passwd"),
        E::File("etc/.wh.shadow", b"", 0o644),
        E::File("etc/.wh..wh..opq", b"", 0o644),
        E::Char("dev/zero", 1, 5),
    ]);
    for round in 0..300 {
        let mut bytes = original.clone();
        for _ in 0..(1 + next() % 8) {
            let at = (next() as usize) % bytes.len();
            bytes[at] = match next() % 4 {
                0 => b'.',
                1 => b'/',
                2 => 0,
                _ => next() as u8,
            };
        }
        let work = tmp();
        let (_result, _) = unpack(work.path(), &bytes);
        let mut names: Vec<String> = fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert!(
            names == ["blob", "layer"] || names == ["blob"],
            "round {round}: wrote outside the layer: {names:?}"
        );
    }
}
