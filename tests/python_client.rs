//! The Python `kubernetes` client (from PyPI; `.ci/run` installs it)
//! against a real `skiff server`.

use std::process::Command;

use anyhow::{Context, ensure};
use skiff_e2e::server::Server;

#[tokio::test]
async fn python_client_lists_creates_patches_watches_deletes() -> anyhow::Result<()> {
    let server = Server::start(env!("CARGO_BIN_EXE_skiff").as_ref(), &[]).await?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/client_roundtrip.py"
    );
    let output = Command::new("python3")
        .arg(script)
        .arg(server.kubeconfig())
        .output()
        .context("running python3 (with the `kubernetes` package)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success() && stdout.trim() == "ok",
        "python client failed: {stdout}{stderr}\nserver log:\n{}",
        server.log_tail()
    );
    Ok(())
}
