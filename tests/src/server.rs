//! A real `skiff server` process on a free loopback port with its own data
//! directory, and the real `kubectl` pointed at it. The process is killed
//! and the directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::etcd::free_port;

pub struct Server {
    bin: PathBuf,
    child: Option<Child>,
    dir: TempDir,
    pub port: u16,
    extra_args: Vec<String>,
    /// The network namespace the server (its agent, and kubectl) run in;
    /// `None` is the machine's own, where the server never sets up pod
    /// networking.
    netns: Option<String>,
}

impl Server {
    /// Starts `bin server` with the embedded store and without a node
    /// agent; `extra_args` are added to its command line (e.g.
    /// `--datastore-endpoint`).
    pub async fn start(bin: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut args = vec!["--disable", "agent"];
        args.extend_from_slice(extra_args);
        Self::start_with(bin, &args, None).await
    }

    /// Starts `bin server` with its agent inside the network namespace
    /// `netns` (see [`crate::node::NodeNetns`]).
    pub async fn start_in(bin: &Path, netns: &str, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(bin, extra_args, Some(netns.to_owned())).await
    }

    /// Starts `bin server` without an agent inside the network namespace
    /// `netns`; kubectl then runs there too.
    pub async fn start_in_netns(
        bin: &Path,
        netns: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = vec!["--disable", "agent"];
        args.extend_from_slice(extra_args);
        Self::start_with(bin, &args, Some(netns.to_owned())).await
    }

    async fn start_with(
        bin: &Path,
        extra_args: &[&str],
        netns: Option<String>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("skiff-test-server-")
            .tempdir()
            .context("creating the server's data directory")?;
        // A node's server keeps its own copy of the binary: its containers'
        // monitors run it too, and outlive a rebuild of the original.
        let bin = match &netns {
            Some(_) => {
                let copy = dir.path().join("skiff");
                std::fs::copy(bin, &copy).with_context(|| format!("copying {}", bin.display()))?;
                copy
            }
            None => bin.to_owned(),
        };
        let mut server = Server {
            bin,
            child: None,
            dir,
            port: free_port()?,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            netns,
        };
        server.spawn().await?;
        Ok(server)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig.yaml")
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A command run in the server's network namespace (or here, when it
    /// has none).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    /// `kubectl` with this server's admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = self.command("kubectl");
        command
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        command
    }

    /// Runs kubectl with `args`, failing with its output if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .kubectl()
            .args(args)
            .output()
            .context("running kubectl")?;
        check(args, &output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs kubectl with `args` and `stdin` as its input.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(stdin.as_bytes())?;
        let output = child.wait_with_output()?;
        check(args, &output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs kubectl expecting it to fail; returns its stderr.
    pub fn kubectl_err(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .kubectl()
            .args(args)
            .output()
            .context("running kubectl")?;
        if output.status.success() {
            bail!(
                "kubectl {} succeeded but should have failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    }

    /// Runs `args` in `pod` (default namespace) with `kubectl exec`;
    /// whether it succeeded and what it printed (stdout, then stderr).
    pub fn exec_in(&self, pod: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let output = self
            .kubectl()
            .args(["exec", pod, "--"])
            .args(args)
            .output()
            .context("running kubectl exec")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok((output.status.success(), text))
    }

    /// Replaces the extra command-line arguments for the next (re)start.
    pub fn set_extra_args(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|s| (*s).to_owned()).collect();
    }

    /// Stops the server with SIGKILL, keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join("server.log"))
            .context("creating the server log")?;
        // nsenter enters only the network namespace: the agent's mounts
        // (rootfs, namespaces) stay in the machine's mount namespace, so a
        // restarted server sees them, as on a real node.
        let mut command = self.command(&self.bin);
        command.arg("server");
        if self.netns.is_none() {
            // Tests never change the machine's own network.
            command.args(["--disable", "network"]);
        }
        let child = command
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--https-listen-port")
            .arg(self.port.to_string())
            .args(&self.extra_args)
            // SKIFF_TEST_LOG (a RUST_LOG filter) turns up the server's log
            // when a test needs debugging.
            .env(
                "RUST_LOG",
                std::env::var("SKIFF_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("skiff server exited with {status}: {}", self.log_tail());
            }
            if self.kubeconfig().exists() {
                let probe = self.kubectl().args(["get", "--raw", "/readyz"]).output()?;
                if probe.status.success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("skiff server did not become ready: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        log[log.floor_char_boundary(start)..].to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if self.runs_agent() {
            // What the server's own agent left: containers, mounts (its
            // namespace folder is one), cgroups. Without this the data
            // dir cannot be removed either.
            crate::node::clean_up(self.dir.path(), self.node_name());
        }
    }
}

impl Server {
    fn runs_agent(&self) -> bool {
        !self
            .extra_args
            .windows(2)
            .any(|pair| pair[0] == "--disable" && pair[1] == "agent")
    }

    /// `--node-name`, when the test gave one: the hostname default may be
    /// shared with other tests' servers, whose cgroups must stay.
    fn node_name(&self) -> Option<&str> {
        self.extra_args
            .windows(2)
            .find(|pair| pair[0] == "--node-name")
            .map(|pair| pair[1].as_str())
    }
}

fn check(args: &[&str], output: &Output) -> anyhow::Result<()> {
    if !output.status.success() {
        bail!(
            "kubectl {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(())
}
