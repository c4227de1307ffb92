//! `skiff images import|ls|rm`, the real binary, on archives built at test
//! time from Debian's busybox-static in both formats (OCI archive and
//! `docker save`), plus the failures a user can cause.

use std::path::Path;
use std::process::{Command, Output};

use agent::images::{ImageStore, store_dir};
use anyhow::{Context, ensure};
use skiff_e2e::images::{
    ArchiveFormat, ConfigOverrides, ExtraFile, busybox_image_with, busybox_oci_archive,
    docker_save_archive,
};

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

fn skiff(data_dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(SKIFF)
        .arg("images")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .context("running skiff")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!stderr.contains("panicked"), "skiff panicked: {stderr}");
    Ok(output)
}

fn ok(data_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = skiff(data_dir, args)?;
    ensure!(
        output.status.success(),
        "skiff images {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Runs a command expected to fail with exit code 1; returns its stderr.
fn fails(data_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = skiff(data_dir, args)?;
    ensure!(
        output.status.code() == Some(1),
        "skiff images {args:?} should exit 1, got {:?}; stdout: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(String::from_utf8(output.stderr)?)
}

fn tmp() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("skiff-test-images-")
        .tempdir()?)
}

fn count_entries(dir: &Path) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(dir)?.count())
}

#[test]
fn import_list_and_remove_both_formats() -> anyhow::Result<()> {
    let dir = tmp()?;
    let data = dir.path().join("data");
    let oci = dir.path().join("busybox-oci.tar");
    let docker = dir.path().join("busybox-docker.tar");
    busybox_oci_archive(&oci, "busybox:latest")?;
    docker_save_archive(&docker, "registry.local:5000/tools/busybox:1.35")?;

    let out = ok(
        &data,
        &["import", oci.to_str().unwrap(), docker.to_str().unwrap()],
    )?;
    assert!(
        out.contains("imported docker.io/library/busybox:latest"),
        "{out}"
    );
    assert!(
        out.contains("registry.local:5000/tools/busybox:1.35"),
        "{out}"
    );

    let ls = ok(&data, &["ls"])?;
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["IMAGE", "ID", "SIZE"]
    );
    assert_eq!(lines.len(), 3, "{ls}");
    let row = |name: &str| -> Vec<String> {
        lines
            .iter()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let a = row("docker.io/library/busybox:latest");
    let b = row("registry.local:5000/tools/busybox:1.35");
    // The same image in both formats: one id (the config digest), one size.
    assert_eq!(a.len(), 3, "{ls}");
    assert_eq!(a[1..], b[1..], "{ls}");
    assert_eq!(a[1].len(), 12);
    assert!(a[2].ends_with("MB"), "{ls}");

    // Unpacked once, and runnable straight from the layer.
    let store = ImageStore::open(&store_dir(&data))?;
    let image = store.resolve("busybox")?.context("busybox resolves")?;
    assert_eq!(image.layers.len(), 1);
    assert_eq!(count_entries(&store_dir(&data).join("layers"))?, 1);
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.config.env, ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"]);
    let sh = image.layers[0].join("bin/sh");
    let echoed = Command::new(&sh)
        .args(["-c", "echo from-the-layer"])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&echoed.stdout), "from-the-layer\n");
    assert!(image.layers[0].join("tmp").is_dir());

    // Removing one name keeps the image; removing the last one deletes it
    // and everything it alone used.
    ok(&data, &["rm", "busybox"])?;
    let ls = ok(&data, &["ls"])?;
    assert!(!ls.contains("docker.io/library/busybox"), "{ls}");
    assert!(
        ls.contains("registry.local:5000/tools/busybox:1.35"),
        "{ls}"
    );
    assert!(store.resolve("busybox")?.is_none());
    assert_eq!(count_entries(&store_dir(&data).join("layers"))?, 1);

    ok(&data, &["rm", "registry.local:5000/tools/busybox:1.35"])?;
    assert_eq!(ok(&data, &["ls"])?.lines().count(), 1);
    assert_eq!(count_entries(&store_dir(&data).join("layers"))?, 0);
    assert_eq!(count_entries(&store_dir(&data).join("blobs/sha256"))?, 0);
    Ok(())
}

#[test]
fn image_with_own_files_and_config() -> anyhow::Result<()> {
    let dir = tmp()?;
    let data = dir.path().join("data");
    let archive = dir.path().join("app.tar");
    let script = b"#!/bin/sh\necho \"app says $GREETING from $(pwd)\"\n";
    busybox_image_with(
        &archive,
        "skiff-test/app:v1",
        ArchiveFormat::DockerSave,
        &[
            ExtraFile::bytes("/opt/app/run.sh", script, 0o755),
            ExtraFile::host("/opt/app/busybox-copy", Path::new("/usr/bin/busybox")),
        ],
        &ConfigOverrides {
            entrypoint: Some(vec!["/opt/app/run.sh".into()]),
            cmd: Some(vec![]),
            env: vec!["GREETING=hello".into()],
            working_dir: Some("/opt/app".into()),
            user: Some("65534".into()),
            ..Default::default()
        },
    )?;
    ok(&data, &["import", archive.to_str().unwrap()])?;
    let store = ImageStore::open(&store_dir(&data))?;
    let image = store
        .resolve("docker.io/skiff-test/app:v1")?
        .context("app resolves")?;
    assert_eq!(image.config.entrypoint, ["/opt/app/run.sh"]);
    assert!(image.config.cmd.is_empty());
    assert_eq!(image.config.working_dir.as_deref(), Some("/opt/app"));
    assert_eq!(image.config.user.as_deref(), Some("65534"));
    assert!(image.config.env.contains(&"GREETING=hello".to_owned()));
    let layer = &image.layers[0];
    assert_eq!(std::fs::read(layer.join("opt/app/run.sh"))?, script);
    let copy = std::fs::metadata(layer.join("opt/app/busybox-copy"))?;
    assert_eq!(copy.len(), std::fs::metadata("/usr/bin/busybox")?.len());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(copy.permissions().mode() & 0o777, 0o755);

    // Importing the same archive again is harmless and changes nothing.
    ok(&data, &["import", archive.to_str().unwrap()])?;
    assert_eq!(ok(&data, &["ls"])?.lines().count(), 2);
    Ok(())
}

#[test]
fn bad_input_is_refused_and_the_store_is_unchanged() -> anyhow::Result<()> {
    let dir = tmp()?;
    let data = dir.path().join("data");
    let good = dir.path().join("good.tar");
    busybox_oci_archive(&good, "busybox:good")?;
    ok(&data, &["import", good.to_str().unwrap()])?;
    let before = ok(&data, &["ls"])?;
    let blobs = count_entries(&store_dir(&data).join("blobs/sha256"))?;

    // Not a tar.
    let text = dir.path().join("notes.tar");
    std::fs::write(&text, "this is not an archive\n".repeat(100))?;
    let err = fails(&data, &["import", text.to_str().unwrap()])?;
    assert!(err.contains("is not an image archive"), "{err}");

    // A tar without a manifest.
    let empty = dir.path().join("empty.tar");
    let status = Command::new("tar")
        .args([
            "-cf",
            empty.to_str().unwrap(),
            "-C",
            dir.path().to_str().unwrap(),
            "notes.tar",
        ])
        .status()?;
    assert!(status.success());
    let err = fails(&data, &["import", empty.to_str().unwrap()])?;
    assert!(err.contains("has no image manifest"), "{err}");

    // A tampered layer blob, in an OCI layout folder (imported in place).
    let layout = dir.path().join("layout");
    let other = dir.path().join("other.tar");
    busybox_image_with(
        &other,
        "busybox:tampered",
        ArchiveFormat::Oci,
        &[ExtraFile::bytes("/etc/motd", b"changed\n", 0o644)],
        &ConfigOverrides::default(),
    )?;
    std::fs::create_dir(&layout)?;
    let status = Command::new("tar")
        .args([
            "-xf",
            other.to_str().unwrap(),
            "-C",
            layout.to_str().unwrap(),
        ])
        .status()?;
    assert!(status.success());
    let mut biggest = None;
    for entry in std::fs::read_dir(layout.join("blobs/sha256"))? {
        let entry = entry?;
        let len = entry.metadata()?.len();
        if biggest.as_ref().is_none_or(|(l, _)| len > *l) {
            biggest = Some((len, entry.path()));
        }
    }
    let (_, layer_blob) = biggest.context("a layer blob")?;
    let mut bytes = std::fs::read(&layer_blob)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&layer_blob, &bytes)?;
    let err = fails(&data, &["import", layout.to_str().unwrap()])?;
    assert!(err.contains("digest mismatch"), "{err}");
    let blob_name = layer_blob
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(err.contains(&blob_name), "the error names the file: {err}");

    // Unknown references and missing files.
    let err = fails(&data, &["rm", "no-such-image:1"])?;
    assert!(err.contains("no such image"), "{err}");
    let err = fails(&data, &["rm", "Not_A_Valid/Ref"])?;
    assert!(err.contains("no such image"), "{err}");
    let err = fails(&data, &["import", "/nonexistent/skiff-image.tar"])?;
    assert!(err.contains("/nonexistent/skiff-image.tar"), "{err}");

    // Nothing of the failed imports remains.
    assert_eq!(ok(&data, &["ls"])?, before);
    assert_eq!(
        count_entries(&store_dir(&data).join("blobs/sha256"))?,
        blobs
    );
    assert_eq!(count_entries(&store_dir(&data).join("layers"))?, 1);
    assert_eq!(count_entries(&store_dir(&data).join("tmp"))?, 0);
    Ok(())
}
