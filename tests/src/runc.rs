//! Real runc containers for tests: a busybox OCI bundle built at test time
//! (Debian's static busybox and its applet links), a private runc state
//! root, and a network namespace, each removed on drop even when the test
//! fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail, ensure};
use tempfile::TempDir;

/// The applets tests run.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "nc", "httpd", "ls", "true", "false", "stty", "seq", "head",
    "printf", "tty", "env", "id", "wc",
];

/// Where Debian's `busybox-static` puts busybox.
pub const BUSYBOX: &str = "/bin/busybox";

/// A prefix unique to this process and call, for ids, namespaces and files.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temp folder holding runc's state (`--root`) and whatever the test
/// puts next to it. Drop deletes every container in that root first.
pub struct RuncRoot {
    dir: TempDir,
}

impl RuncRoot {
    pub fn new() -> anyhow::Result<RuncRoot> {
        let dir = tempfile::Builder::new()
            .prefix("skiff-test-runc-")
            .tempdir()
            .context("creating a runc root")?;
        std::fs::create_dir(dir.path().join("state"))?;
        Ok(RuncRoot { dir })
    }

    /// runc's `--root`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A fresh folder inside the temp folder.
    pub fn subdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path)?;
        Ok(path)
    }

    /// Container ids runc knows in this root.
    pub fn containers(&self) -> Vec<String> {
        Command::new("runc")
            .arg("--root")
            .arg(self.root())
            .args(["list", "-q"])
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for RuncRoot {
    fn drop(&mut self) {
        for id in self.containers() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(self.root())
                .args(["delete", "--force", &id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Options of a test bundle.
pub struct BundleOptions<'a> {
    pub args: &'a [&'a str],
    pub tty: bool,
    /// The network namespace to join; none: the container gets a new one.
    pub netns: Option<&'a Path>,
}

/// Writes an OCI bundle at `dir`: a busybox rootfs and runc's default
/// spec with the given process, a writable root, and the given network
/// namespace.
pub fn busybox_bundle(dir: &Path, options: &BundleOptions<'_>) -> anyhow::Result<()> {
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "proc", "dev", "sys", "tmp", "etc", "www"] {
        std::fs::create_dir_all(rootfs.join(sub))?;
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
        .with_context(|| format!("copying {BUSYBOX} (Debian package busybox-static)"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    std::fs::write(rootfs.join("www/index.html"), "hello from the pod\n")?;
    let status = Command::new("runc")
        .arg("spec")
        .arg("--bundle")
        .arg(dir)
        .status()
        .context("runc spec")?;
    ensure!(status.success(), "runc spec failed: {status}");
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    config["process"]["terminal"] = options.tty.into();
    config["process"]["args"] = options.args.iter().map(|a| (*a).to_owned()).collect();
    config["root"]["readonly"] = false.into();
    let Some(namespaces) = config["linux"]["namespaces"].as_array_mut() else {
        bail!("runc spec wrote no namespaces");
    };
    namespaces.retain(|ns| ns["type"] != "network");
    if let Some(netns) = options.netns {
        namespaces.push(serde_json::json!({"type": "network", "path": netns}));
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// A network namespace (`ip netns add`) with its loopback up, deleted on
/// drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> anyhow::Result<Netns> {
        let name = unique(prefix);
        ip(&["netns", "add", &name])?;
        let netns = Netns { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (Debian package iproute2)")?;
    ensure!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
