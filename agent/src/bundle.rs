//! OCI runtime bundles: `config.json` written with `oci-spec` for one
//! container of a pod, and its root filesystem, an overlay over the
//! image's unpacked layers with an upper and work folder per container
//! (a copy of the layers where overlayfs is not available).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder,
    ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

/// Capabilities a container gets by default, as containerd gives them.
const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("building the OCI config: {0}")]
    Spec(String),
}

/// One extra mount: a host path bound into the container.
#[derive(Clone, Debug)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// Everything `config.json` says about one container.
#[derive(Clone, Debug, Default)]
pub struct ContainerConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub tty: bool,
    pub read_only_root: bool,
    pub privileged: bool,
    pub caps_add: Vec<String>,
    pub caps_drop: Vec<String>,
    pub no_new_privileges: bool,
    pub mounts: Vec<BindMount>,
    /// `/proc/.../ns` files of the pod's namespaces (None: the host's).
    pub netns: Option<PathBuf>,
    pub ipcns: Option<PathBuf>,
    pub utsns: Option<PathBuf>,
    pub cgroups_path: String,
    pub cpu_shares: u64,
    pub cpu_quota: Option<i64>,
    pub memory_limit: Option<i64>,
    pub annotations: HashMap<String, String>,
}

/// Makes the rootfs at `bundle/rootfs` from `layers` (bottom first).
pub fn prepare_rootfs(bundle: &Path, layers: &[PathBuf]) -> Result<PathBuf, BundleError> {
    let rootfs = bundle.join("rootfs");
    let upper = bundle.join("upper");
    let work = bundle.join("work");
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| io(format!("creating {}", d.display()), e))?;
    }
    if is_mounted(&rootfs) {
        return Ok(rootfs);
    }
    let lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    // overlayfs needs at least one lower layer; an image with none gets an empty one.
    let lower = if lower.is_empty() {
        let empty = bundle.join("empty");
        std::fs::create_dir_all(&empty)
            .map_err(|e| io(format!("creating {}", empty.display()), e))?;
        empty.display().to_string()
    } else {
        lower.join(":")
    };
    let options = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    match mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    ) {
        Ok(()) => Ok(rootfs),
        Err(e) => {
            tracing::info!(error = %e, "overlayfs unavailable; copying the image layers");
            for layer in layers {
                copy_tree(layer, &rootfs)?;
            }
            Ok(rootfs)
        }
    }
}

/// Unmounts the rootfs (if mounted) and removes the bundle folder.
pub fn remove(bundle: &Path) -> Result<(), BundleError> {
    let rootfs = bundle.join("rootfs");
    if is_mounted(&rootfs) {
        umount2(&rootfs, MntFlags::MNT_DETACH)
            .map_err(|e| io(format!("unmounting {}", rootfs.display()), e.into()))?;
    }
    match std::fs::remove_dir_all(bundle) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing {}", bundle.display()), e)),
    }
}

/// Writes `bundle/config.json`.
pub fn write_config(bundle: &Path, config: &ContainerConfig) -> Result<(), BundleError> {
    let spec = build_spec(config)?;
    let path = bundle.join("config.json");
    let json = serde_json::to_vec_pretty(&spec).map_err(|e| BundleError::Spec(e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| io(format!("writing {}", path.display()), e))
}

fn build_spec(c: &ContainerConfig) -> Result<Spec, BundleError> {
    let err = |e: oci_spec::OciSpecError| BundleError::Spec(e.to_string());
    let caps = capabilities(c);
    let cap_set: oci_spec::runtime::Capabilities = caps.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(cap_set.clone())
        .effective(cap_set.clone())
        .permitted(cap_set)
        .build()
        .map_err(err)?;
    let user = UserBuilder::default()
        .uid(c.uid)
        .gid(c.gid)
        .additional_gids(c.additional_gids.clone())
        .build()
        .map_err(err)?;
    let process = ProcessBuilder::default()
        .terminal(c.tty)
        .user(user)
        .args(c.args.clone())
        .env(c.env.clone())
        .cwd(if c.cwd.is_empty() {
            "/".to_owned()
        } else {
            c.cwd.clone()
        })
        .capabilities(capabilities)
        .no_new_privileges(c.no_new_privileges)
        .build()
        .map_err(err)?;

    let mut namespaces = vec![
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Pid)
            .build()
            .map_err(err)?,
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Mount)
            .build()
            .map_err(err)?,
    ];
    for (typ, path) in [
        (LinuxNamespaceType::Network, &c.netns),
        (LinuxNamespaceType::Ipc, &c.ipcns),
        (LinuxNamespaceType::Uts, &c.utsns),
    ] {
        // A pod on the host's network shares the host namespace: no entry.
        if let Some(path) = path {
            namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(typ)
                    .path(path.clone())
                    .build()
                    .map_err(err)?,
            );
        }
    }

    let mut memory = LinuxMemoryBuilder::default();
    if let Some(limit) = c.memory_limit {
        memory = memory.limit(limit);
    }
    let mut cpu = LinuxCpuBuilder::default().shares(c.cpu_shares);
    if let Some(quota) = c.cpu_quota {
        cpu = cpu.quota(quota).period(100_000u64);
    }
    let resources = LinuxResourcesBuilder::default()
        .memory(memory.build().map_err(err)?)
        .cpu(cpu.build().map_err(err)?)
        .build()
        .map_err(err)?;

    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        .cgroups_path(PathBuf::from(&c.cgroups_path));
    if !c.privileged {
        linux = linux
            .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
            .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default());
    }
    let linux = linux.build().map_err(err)?;

    let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts();
    if c.privileged {
        // A privileged container sees /sys read-write.
        for m in &mut mounts {
            if m.destination() == Path::new("/sys") {
                m.set_options(Some(vec!["nosuid".into(), "noexec".into(), "nodev".into()]));
            }
        }
    }
    for m in &c.mounts {
        let mut options = vec!["rbind".to_owned(), "rprivate".to_owned()];
        options.push(if m.read_only { "ro" } else { "rw" }.into());
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(&m.destination))
                .typ("bind")
                .source(m.source.clone())
                .options(options)
                .build()
                .map_err(err)?,
        );
    }

    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(c.read_only_root)
            .build()
            .map_err(err)?,
    ));
    // The hostname lives in the pod's shared UTS namespace, set once.
    spec.set_hostname(None);
    spec.set_mounts(Some(mounts));
    spec.set_linux(Some(linux));
    spec.set_annotations(Some(c.annotations.clone()));
    Ok(spec)
}

fn capabilities(c: &ContainerConfig) -> Vec<Capability> {
    if c.privileged {
        return all_capabilities();
    }
    let norm = |s: &str| {
        s.trim()
            .to_ascii_uppercase()
            .trim_start_matches("CAP_")
            .to_owned()
    };
    let drop_all = c.caps_drop.iter().any(|d| norm(d) == "ALL");
    let mut caps: Vec<Capability> = if drop_all {
        Vec::new()
    } else {
        DEFAULT_CAPS
            .iter()
            .copied()
            .filter(|cap| !c.caps_drop.iter().any(|d| norm(d) == cap_name(*cap)))
            .collect()
    };
    for add in &c.caps_add {
        if norm(add) == "ALL" {
            return all_capabilities();
        }
        if let Ok(cap) = norm(add).parse::<Capability>()
            && !caps.contains(&cap)
        {
            caps.push(cap);
        }
    }
    caps
}

fn cap_name(cap: Capability) -> String {
    cap.to_string()
}

/// Every capability this kernel knows, for privileged containers.
fn all_capabilities() -> Vec<Capability> {
    const NAMES: &str = "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID \
        SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK \
        IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT \
        SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL \
        SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF \
        CHECKPOINT_RESTORE";
    NAMES
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn is_mounted(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = path.display().to_string();
    mountinfo
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(target.as_str()))
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), BundleError> {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .map_err(|e| io("running cp".into(), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(io(
            format!("copying {} to {}", from.display(), to.display()),
            std::io::Error::other(status.to_string()),
        ))
    }
}

fn io(what: String, source: std::io::Error) -> BundleError {
    BundleError::Io { what, source }
}
