//! Network namespaces for tests: created with `ip netns add`, deleted on
//! drop, and a way to run code inside one (sockets opened there stay
//! there, whichever thread uses them afterwards).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

pub struct Netns {
    name: String,
    /// A cgroup folder the namespace's commands also join (a pod's).
    cgroup: Option<PathBuf>,
}

impl Netns {
    /// Creates the namespace `name` with its loopback up.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", name])?;
        let netns = Netns {
            name: name.to_owned(),
            cgroup: None,
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args…`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A veth pair: `here` in this namespace, its peer `there` in `peer`.
    pub fn add_veth(&self, here: &str, peer: &Netns, there: &str) -> anyhow::Result<()> {
        self.ip(&[
            "link", "add", here, "type", "veth", "peer", "name", there, "netns", &peer.name,
        ])?;
        Ok(())
    }

    /// Makes every later [`Netns::command`] also join the cgroup folder
    /// `dir`, as a pod's processes are in the pod's cgroup.
    pub fn set_cgroup(&mut self, dir: PathBuf) {
        self.cgroup = Some(dir);
    }

    /// The cgroup folder of [`Netns::set_cgroup`].
    pub fn cgroup(&self) -> Option<&std::path::Path> {
        self.cgroup.as_deref()
    }

    /// `program args…` inside the namespace (and its cgroup, if it has
    /// one), not yet started.
    pub fn command(&self, program: &str) -> Command {
        let mut command = match &self.cgroup {
            Some(dir) => {
                let mut sh = Command::new("sh");
                sh.args([
                    "-c",
                    r#"echo $$ > "$0/cgroup.procs" && exec ip netns exec "$@""#,
                ])
                .arg(dir);
                sh
            }
            None => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec"]);
                ip
            }
        };
        command.args([&self.name, program]).stdin(Stdio::null());
        command
    }

    /// Runs `program args…` inside the namespace; fails with its output
    /// if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} {} in {} failed ({}): {}{}",
                args.join(" "),
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `f` on a fresh thread that has entered the namespace; for a
    /// pod's namespace, with this process in the pod's cgroup meanwhile
    /// (see [`crate::cgroup::join_process`]).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let _joined = self
            .cgroup
            .as_deref()
            .map(crate::cgroup::join_process)
            .transpose()?;
        enter(&self.name, f)
    }
}

/// Runs `f` on a fresh thread that has entered the namespace `name`
/// (one this test did not create, e.g. a node's).
pub fn enter<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread only; the fd is open.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow::Error::from(std::io::Error::last_os_error())
                        .context(format!("entering {name}")));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {name} panicked"))?
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Nodes of a multi-node test: a namespace each, joined by a bridge in
/// its own namespace (the underlay) with addresses `172.30.S.11` upward
/// (`S` from the test's pid); all deleted on drop (after the processes
/// in them).
pub struct Underlay {
    pub nodes: Vec<Netns>,
    _bridge: Netns,
    subnet: u8,
}

impl Underlay {
    /// `count` nodes named `<prefix>-n1`…, the bridge `<prefix>-u`.
    pub fn create(prefix: &str, count: usize) -> anyhow::Result<Underlay> {
        let bridge = Netns::create(&format!("{prefix}-u"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        let subnet = (std::process::id() % 200 + 20) as u8;
        let mut nodes = Vec::new();
        for i in 0..count {
            let netns = Netns::create(&format!("{prefix}-n{}", i + 1))?;
            let port = format!("u{}", i + 1);
            bridge.add_veth(&port, &netns, "eth0")?;
            bridge.ip(&["link", "set", &port, "master", "br0", "up"])?;
            let ip = format!("172.30.{subnet}.{}/24", 11 + i);
            netns.ip(&["addr", "add", &ip, "dev", "eth0"])?;
            netns.ip(&["link", "set", "eth0", "up"])?;
            nodes.push(netns);
        }
        Ok(Underlay {
            nodes,
            _bridge: bridge,
            subnet,
        })
    }

    /// The underlay address of node `index` (from 0).
    pub fn ip(&self, index: usize) -> String {
        format!("172.30.{}.{}", self.subnet, 11 + index)
    }
}

/// Names of all network namespaces.
pub fn list() -> anyhow::Result<Vec<String>> {
    Ok(run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
