//! A node for end-to-end tests: a network namespace (so the pod bridge,
//! veths and routes stay out of the machine's own), and the clean-up of
//! everything a node agent leaves behind — containers and their shims,
//! mounts, cgroups — which also serves to check that nothing is left.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Names of the namespaces below: the prefix, then the hex pid of the test
/// process that made it.
const NETNS_PREFIX: &str = "skiff-e2e-";

/// A network namespace `skiff-e2e-<pid>-<random>` with its loopback up,
/// deleted on drop.
pub struct NodeNetns {
    pub name: String,
}

impl NodeNetns {
    pub fn create() -> anyhow::Result<NodeNetns> {
        remove_orphans();
        let name = format!("{NETNS_PREFIX}{:x}-{}", std::process::id(), random_suffix());
        run("ip", &["netns", "add", &name])?;
        let netns = NodeNetns { name };
        run("ip", &["-n", &netns.name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// A unique node name to go with it.
    pub fn node_name(&self) -> String {
        self.name.clone()
    }

    /// Runs `program args` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for NodeNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// What a node agent with data in `data_dir` and name `node` left on the
/// machine: runc containers, mounts, pod cgroups, pod network namespaces.
pub fn leftovers(data_dir: &Path, node: &str) -> Vec<String> {
    let mut found = Vec::new();
    for id in runc_containers(data_dir) {
        found.push(format!("runc container {id}"));
    }
    // The folder of pod namespaces is itself a mount (shared, as
    // /run/netns is): the node's, not a pod's.
    let netns_dir = data_dir.join("agent").join("netns");
    for mount in mounts_under(data_dir) {
        if mount != netns_dir {
            found.push(format!("mount {}", mount.display()));
        }
    }
    // `unified`: runc's container folders in the v2 hierarchy (hybrid).
    for controller in ["memory", "cpu", "pids", "unified"] {
        let base = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("skiff")
            .join(node);
        for dir in pod_cgroups(&base) {
            found.push(format!("cgroup {}", dir.display()));
        }
    }
    if let Ok(entries) = std::fs::read_dir(data_dir.join("agent").join("netns")) {
        for e in entries.flatten() {
            found.push(format!("netns {}", e.path().display()));
        }
    }
    found
}

/// Removes everything a node agent made: kills its containers and shims,
/// unmounts what it mounted under `data_dir` and removes the cgroups of
/// `node` (when known).
pub fn clean_up(data_dir: &Path, node: Option<&str>) {
    let root = data_dir.join("agent").join("runc");
    for id in runc_containers(data_dir) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["delete", "--force", &id])
            .stderr(Stdio::null())
            .status();
    }
    // Shims whose state lives in this data dir, by pid.
    let marker = data_dir.display().to_string();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("shim") && cmdline.contains(&marker) {
                unsafe_kill(pid);
            }
        }
    }
    // The agent's DNS dies with it; should it not, it goes here.
    for pid in node_dns_processes(data_dir) {
        unsafe_kill(pid as i32);
    }
    let mut mounts = mounts_under(data_dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in mounts {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&m)
            .stderr(Stdio::null())
            .status();
    }
    let Some(node) = node.filter(|n| !n.is_empty()) else {
        return;
    };
    for controller in [
        "memory", "cpu", "cpuacct", "pids", "cpuset", "blkio", "devices", "freezer", "systemd",
        "unified",
    ] {
        let base = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("skiff")
            .join(node);
        remove_cgroup_tree(&base);
    }
}

/// Live `skiff dns` processes serving the node whose data dir is
/// `data_dir` (their kubeconfig lies in it), as a joined agent runs them.
pub fn node_dns_processes(data_dir: &Path) -> Vec<u32> {
    let marker = data_dir.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|&b| b == 0);
            let is_dns = args.nth(1) == Some(b"dns".as_slice())
                && String::from_utf8_lossy(&cmdline).contains(&marker);
            (is_dns && !is_zombie(pid)).then_some(pid)
        })
        .collect()
}

/// A process that has exited and waits to be reaped (or is gone).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

fn unsafe_kill(pid: i32) {
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn runc_containers(data_dir: &Path) -> Vec<String> {
    let root = data_dir.join("agent").join("runc");
    if !root.exists() {
        return Vec::new();
    }
    let output = Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["list", "-q"])
        .output();
    match output {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(PathBuf::from)
        .collect()
}

fn pod_cgroups(base: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for sub in [
        base.to_owned(),
        base.join("burstable"),
        base.join("besteffort"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("pod") {
                    found.push(e.path());
                }
            }
        }
    }
    found
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    // The shared `skiff` parent goes too once empty.
    if let Some(parent) = dir.parent()
        && parent.file_name().is_some_and(|n| n == "skiff")
    {
        let _ = std::fs::remove_dir(parent);
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Deletes the namespaces of test processes that no longer exist: a test
/// killed outright (a timeout, SIGKILL) never runs its drops.
fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| u32::from_str_radix(pid, 16).ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn random_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}")
}

/// A `skiff server` with its node agent, inside its own network
/// namespace; on drop the server is killed and everything its agent made
/// is removed.
pub struct AgentNode {
    pub server: crate::server::Server,
    pub netns: NodeNetns,
    base_args: Vec<String>,
}

impl AgentNode {
    /// Imports the busybox test image as `reference` with the `skiff`
    /// binary `bin`, as `skiff images import` would on a node.
    pub fn import_busybox(&self, bin: &Path, reference: &str) -> anyhow::Result<()> {
        import_busybox(bin, self.server.data_dir(), reference)
    }

    /// Starts the server in a new namespace, named after it, with short
    /// crash back-offs for tests.
    pub async fn start(bin: &Path, extra_args: &[&str]) -> anyhow::Result<AgentNode> {
        let netns = NodeNetns::create()?;
        let node = netns.node_name();
        let mut args = vec!["--node-name", node.as_str(), "--crash-loop-backoff", "2s"];
        args.extend_from_slice(extra_args);
        let server = crate::server::Server::start_in(bin, &netns.name, &args).await?;
        let base_args = args.iter().map(|s| (*s).to_owned()).collect();
        Ok(AgentNode {
            server,
            netns,
            base_args,
        })
    }

    /// Restarts the server (SIGKILL first) with `extra_args` added to the
    /// ones it was started with, e.g. `--disable agent`.
    pub async fn restart_with(&mut self, extra_args: &[&str]) -> anyhow::Result<()> {
        let mut args: Vec<&str> = self.base_args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra_args);
        self.server.set_extra_args(&args);
        self.server.restart().await
    }

    pub fn node_name(&self) -> String {
        self.netns.node_name()
    }

    /// What the agent left behind (see [`leftovers`]).
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = leftovers(self.server.data_dir(), &self.node_name());
        if let Ok(links) = self
            .netns
            .exec("ip", &["-o", "link", "show", "type", "veth"])
        {
            found.extend(links.lines().map(|l| format!("veth {l}")));
        }
        found
    }

    /// Polls `check` until it gives a value, failing with the last error
    /// and the server log after two minutes (generous: the machine may be
    /// busy running other tests).
    pub async fn eventually<T>(
        &self,
        what: &str,
        check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        poll_until(
            what,
            || format!("server log:\n{}", self.server.log_tail()),
            check,
        )
        .await
    }

    /// The pod `name` in the default namespace, as `kubectl get -o json`.
    pub fn pod_json(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let out = self
            .server
            .kubectl_ok(&["get", "pod", name, "-o", "json"])?;
        Ok(serde_json::from_str(&out)?)
    }
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        self.server.kill();
        clean_up(self.server.data_dir(), Some(&self.netns.name));
    }
}

/// Imports the busybox test image as `reference` into the images of the
/// node whose data dir is `data_dir`.
pub fn import_busybox(bin: &Path, data_dir: &Path, reference: &str) -> anyhow::Result<()> {
    let archive = data_dir.join("busybox.tar");
    crate::images::busybox_oci_archive(&archive, reference)?;
    let output = Command::new(bin)
        .args(["images", "import", "--data-dir"])
        .arg(data_dir)
        .arg(&archive)
        .output()
        .context("running skiff images import")?;
    if !output.status.success() {
        bail!(
            "skiff images import failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A `skiff agent` joined to a server with its token, running in the
/// network namespace `netns`; stopped and its containers removed on drop.
pub struct JoinedAgent {
    pub child: Child,
    pub data_dir: tempfile::TempDir,
    pub name: String,
    /// `nsenter` and its arguments, to start the agent again.
    command: Vec<std::ffi::OsString>,
}

impl JoinedAgent {
    /// Starts the agent `name` with its own data dir and copy of `bin` (its
    /// shims outlive rebuilds), the busybox image imported as `image`,
    /// short crash back-offs, and `extra_args`.
    pub fn start(
        bin: &Path,
        server: &crate::server::Server,
        server_url: &str,
        netns: &str,
        name: &str,
        image: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<JoinedAgent> {
        let data_dir = tempfile::Builder::new()
            .prefix("skiff-test-agent-")
            .tempdir()?;
        let copy = data_dir.path().join("skiff");
        std::fs::copy(bin, &copy)?;
        import_busybox(&copy, data_dir.path(), image)?;
        let token = std::fs::read_to_string(server.data_dir().join("server").join("token"))
            .context("reading the join token")?;
        let mut command: Vec<std::ffi::OsString> =
            vec![format!("--net=/run/netns/{netns}").into(), copy.into()];
        command.extend(
            ["agent", "--server", server_url, "--token", token.trim()]
                .into_iter()
                .chain(["--node-name", name, "--crash-loop-backoff", "2s"])
                .chain(extra_args.iter().copied())
                .map(Into::into),
        );
        command.push("--data-dir".into());
        command.push(data_dir.path().into());
        let child = spawn_agent(&command, &data_dir.path().join("agent.log"))?;
        Ok(JoinedAgent {
            child,
            data_dir,
            name: name.to_owned(),
            command,
        })
    }

    /// Kills the agent (SIGKILL) unless it has stopped, and starts it
    /// again as it was started.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_agent(&self.command, &self.data_dir.path().join("agent.log"))?;
        Ok(())
    }

    /// The node's DNS processes (see [`node_dns_processes`]).
    pub fn dns_processes(&self) -> Vec<u32> {
        node_dns_processes(self.data_dir.path())
    }

    /// Joins an agent to `node`'s server from inside the same network
    /// namespace (node IP 127.0.0.1), under the node's name: for a server
    /// started without its own agent.
    pub fn beside(bin: &Path, node: &AgentNode, image: &str) -> anyhow::Result<JoinedAgent> {
        JoinedAgent::start(
            bin,
            &node.server,
            &node.server.url(),
            &node.netns.name,
            &node.node_name(),
            image,
            &["--node-ip", "127.0.0.1"],
        )
    }

    /// Polls `check` as [`AgentNode::eventually`] does, failing with this
    /// agent's log and `server`'s.
    pub async fn eventually<T>(
        &self,
        server: &crate::server::Server,
        what: &str,
        check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let logs = || {
            format!(
                "agent log:\n{}\nserver log:\n{}",
                self.log_tail(),
                server.log_tail()
            )
        };
        poll_until(what, logs, check).await
    }

    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.data_dir.path().join("agent.log")).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or(&text).to_owned()
    }
}

/// `nsenter command…`, logging to `log` (appended to, across restarts).
fn spawn_agent(command: &[std::ffi::OsString], log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new("nsenter")
        .args(command)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting skiff agent")
}

impl Drop for JoinedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        clean_up(self.data_dir.path(), Some(&self.name));
    }
}

/// Polls `check` every 300 ms until it gives a value; after two minutes
/// (generous: the machine may be busy running other tests) fails with the
/// last error and `logs()`.
async fn poll_until<T>(
    what: &str,
    logs: impl Fn() -> String,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {last}\n{}", logs());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
