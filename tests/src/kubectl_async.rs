//! The real kubectl as an async process, for tests whose own runtime serves
//! what kubectl talks to (a node agent, a fake kubelet), so kubectl must not
//! block it. Each call is killed if dropped or after [`TIMEOUT`].

use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

use crate::server::Server;

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// kubectl for `server` with `args` and extra environment, stderr piped.
pub fn command(server: &Server, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::from(server.kubectl());
    command
        .args(args)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs kubectl to the end, feeding it `stdin` when given.
pub async fn output(
    server: &Server,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> anyhow::Result<Output> {
    let mut command = command(server, args, env);
    command.stdout(Stdio::piped());
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().context("running kubectl")?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().context("kubectl stdin")?;
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    match tokio::time::timeout(TIMEOUT, child.wait_with_output()).await {
        Ok(output) => Ok(output?),
        Err(_) => bail!("kubectl {} timed out", args.join(" ")),
    }
}

/// kubectl's stdout; its failure is an error carrying the server's log.
pub async fn ok(
    server: &Server,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let output = output(server, args, env, stdin).await?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed ({}): {}{}\nserver log:\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
            server.log_tail()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// kubectl's stderr from a command that must fail.
pub async fn err(
    server: &Server,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let output = output(server, args, env, stdin).await?;
    if output.status.success() {
        bail!(
            "kubectl {} succeeded but should have failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}
