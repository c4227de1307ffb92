//! The container monitor with real runc and busybox containers: CRI logs
//! with rotation, exit statuses, start errors in runc's words, attach
//! (pipes and terminal), and containers that outlive the process that
//! started them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::crilog;
use agent::shim::{self, ShimSpec, attach};
use anyhow::{Context, bail, ensure};
use skiff_e2e::runc::{BundleOptions, RuncRoot, busybox_bundle, unique};

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const WAIT: Duration = Duration::from_secs(60);

/// A spec for a busybox container running `args`, with its bundle, log and
/// state inside `root`.
fn spec(root: &RuncRoot, args: &[&str], tty: bool, stdin: bool) -> anyhow::Result<ShimSpec> {
    let id = unique("skiff-shim");
    let bundle = root.subdir(&format!("{id}/bundle"))?;
    busybox_bundle(
        &bundle,
        &BundleOptions {
            args,
            tty,
            netns: None,
        },
    )?;
    Ok(ShimSpec {
        bundle,
        runtime: PathBuf::from("runc"),
        runtime_root: root.root(),
        log_path: root.subdir(&format!("{id}/logs"))?.join("0.log"),
        state_dir: root.subdir(&format!("{id}/state"))?,
        tty,
        stdin,
        stdin_once: stdin,
        max_log_bytes: 10 * 1024 * 1024,
        max_log_files: 5,
        id,
    })
}

async fn wait(state_dir: &Path) -> anyhow::Result<shim::ExitStatus> {
    tokio::time::timeout(WAIT, shim::wait(state_dir))
        .await
        .context("the container did not exit in time")?
        .context("waiting for the container")
}

/// Every record of a log and its rotations, oldest first.
fn records(log: &Path) -> anyhow::Result<Vec<(crilog::Stream, bool, String)>> {
    let mut out = Vec::new();
    for file in crilog::files_oldest_first(log) {
        for line in std::fs::read(&file)?.split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let record = crilog::parse(line).with_context(|| {
                format!("not a CRI record: {:?}", String::from_utf8_lossy(line))
            })?;
            out.push((
                record.stream,
                record.full,
                String::from_utf8_lossy(record.content).into_owned(),
            ));
        }
    }
    Ok(out)
}

#[tokio::test]
async fn logs_rotate_and_the_exit_status_is_recorded() -> anyhow::Result<()> {
    let root = RuncRoot::new()?;
    let script = "i=0; while [ $i -lt 300 ]; do echo \"line $i\"; i=$((i+1)); done; \
                  echo oops >&2; printf unterminated; exit 3";
    let mut spec = spec(&root, &["sh", "-c", script], false, false)?;
    spec.max_log_bytes = 4000;
    spec.max_log_files = 3;
    let pid = shim::spawn(SKIFF.as_ref(), &spec).await?;
    ensure!(pid > 1, "pid {pid}");
    let status = wait(&spec.state_dir).await?;
    ensure!(status.code == 3 && status.signal.is_none(), "{status:?}");
    ensure!(status.finished_at >= status.started_at, "{status:?}");
    ensure!(!shim::running(&spec.state_dir));
    ensure!(shim::exit_status(&spec.state_dir)? == Some(status));

    // Three files at most, each within the limit.
    let files = crilog::files_oldest_first(&spec.log_path);
    ensure!(files.len() == 3, "{files:?}");
    ensure!(!crilog::rotated(&spec.log_path, 3).exists());
    for file in &files {
        let size = std::fs::metadata(file)?.len();
        ensure!(size <= 4000, "{} is {size} bytes", file.display());
    }
    let records = records(&spec.log_path)?;
    let stdout: Vec<&str> = records
        .iter()
        .filter(|(s, full, _)| *s == crilog::Stream::Stdout && *full)
        .map(|(_, _, text)| text.as_str())
        .collect();
    // The newest lines are all there, in order, ending with the
    // unterminated one (a full record, as containerd writes it).
    ensure!(stdout.last() == Some(&"unterminated"), "{stdout:?}");
    let lines = &stdout[..stdout.len() - 1];
    ensure!(lines.last() == Some(&"line 299"), "{lines:?}");
    let first: usize = lines[0]
        .strip_prefix("line ")
        .context("first line")?
        .parse()?;
    for (i, line) in lines.iter().enumerate() {
        ensure!(*line == format!("line {}", first + i), "{line} at {i}");
    }
    ensure!(first > 0, "nothing rotated away");
    ensure!(
        records
            .iter()
            .any(|(s, _, text)| *s == crilog::Stream::Stderr && text == "oops"),
        "{records:?}"
    );
    shim::delete(&spec).await?;
    ensure!(!spec.state_dir.exists());
    ensure!(root.containers().is_empty(), "{:?}", root.containers());
    ensure!(spec.log_path.exists(), "delete keeps the logs");
    Ok(())
}

#[tokio::test]
async fn a_container_that_cannot_start_reports_runc_s_error() -> anyhow::Result<()> {
    let root = RuncRoot::new()?;
    let spec = spec(&root, &["no-such-command"], false, false)?;
    let err = shim::spawn(SKIFF.as_ref(), &spec)
        .await
        .err()
        .context("a container without its command started")?;
    ensure!(
        err.to_string()
            .contains(r#"exec: "no-such-command": executable file not found"#),
        "{err}"
    );
    ensure!(!shim::running(&spec.state_dir));
    ensure!(root.containers().is_empty(), "{:?}", root.containers());
    Ok(())
}

#[tokio::test]
async fn a_signal_is_reported_as_kubelet_does() -> anyhow::Result<()> {
    let root = RuncRoot::new()?;
    let spec = spec(&root, &["sleep", "1000"], false, false)?;
    shim::spawn(SKIFF.as_ref(), &spec).await?;
    ensure!(shim::running(&spec.state_dir));
    shim::kill(&spec, 9).await?;
    let status = wait(&spec.state_dir).await?;
    ensure!(status.code == 137 && status.signal == Some(9), "{status:?}");
    shim::delete(&spec).await?;
    Ok(())
}

/// Run by `containers_outlive_the_process_that_started_them` in a process
/// of its own: spawns the shim for the spec in `SKIFF_SHIM_TEST_SPEC`,
/// prints the container's pid, and waits to be killed.
#[tokio::test]
#[ignore = "a helper process for another test"]
async fn spawner_process() -> anyhow::Result<()> {
    let Ok(path) = std::env::var("SKIFF_SHIM_TEST_SPEC") else {
        return Ok(());
    };
    let spec: ShimSpec = serde_json::from_slice(&std::fs::read(path)?)?;
    let pid = shim::spawn(SKIFF.as_ref(), &spec).await?;
    println!("SPAWNED {pid}");
    tokio::time::sleep(Duration::from_secs(600)).await;
    Ok(())
}

#[tokio::test]
async fn containers_outlive_the_process_that_started_them() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let root = RuncRoot::new()?;
    let spec = spec(
        &root,
        &["sh", "-c", "echo started; sleep 1000"],
        false,
        false,
    )?;
    let spec_file = root.subdir("specs")?.join("spec.json");
    std::fs::write(&spec_file, serde_json::to_vec(&spec)?)?;
    let mut spawner = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "spawner_process", "--ignored", "--nocapture"])
        .env("SKIFF_SHIM_TEST_SPEC", &spec_file)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = spawner.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let pid = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .context("the spawner said nothing")??
            .context("the spawner ended")?;
        if let Some(pid) = line.strip_prefix("SPAWNED ") {
            break pid.trim().parse::<u32>()?;
        }
    };
    // SIGKILL: no chance to clean anything up.
    spawner.start_kill()?;
    spawner.wait().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the container died with its spawner"
    );
    ensure!(shim::running(&spec.state_dir));
    ensure!(shim::init_pid(&spec.state_dir) == Some(pid));

    // This process never started the shim, yet waits for the exit.
    let waiter = tokio::spawn({
        let dir = spec.state_dir.clone();
        async move { wait(&dir).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !waiter.is_finished(),
        "wait returned while the container ran"
    );
    // The container's init ignores SIGTERM (no handler in a PID
    // namespace's init), as kubelet's users know.
    shim::kill(&spec, 9).await?;
    let status = waiter.await??;
    ensure!(status.signal == Some(9) && status.code == 137, "{status:?}");
    let records = records(&spec.log_path)?;
    ensure!(
        records.iter().any(|(_, _, t)| t == "started"),
        "{records:?}"
    );
    shim::delete(&spec).await?;
    Ok(())
}

#[tokio::test]
async fn attach_with_pipes() -> anyhow::Result<()> {
    let root = RuncRoot::new()?;
    let script = "echo ready; read line; echo \"got $line\"; echo bye >&2; exit 4";
    let spec = spec(&root, &["sh", "-c", script], false, true)?;
    shim::spawn(SKIFF.as_ref(), &spec).await?;
    let client = attach::Client::connect(
        &spec.state_dir,
        attach::Wants {
            stdin: true,
            stdout: true,
            stderr: true,
        },
    )
    .await?;
    let (mut events, mut input) = client.split();
    input.stdin(b"hello shim\n").await?;
    input.close_stdin().await?;
    let (stdout, stderr, status) = collect(&mut events).await?;
    // "ready" may have come before the attach.
    ensure!(stdout.ends_with("got hello shim\n"), "{stdout:?}");
    ensure!(stderr == "bye\n", "{stderr:?}");
    ensure!(status.code == 4, "{status:?}");
    let records = records(&spec.log_path)?;
    ensure!(
        records.iter().any(|(_, _, t)| t == "got hello shim"),
        "{records:?}"
    );
    shim::delete(&spec).await?;
    Ok(())
}

#[tokio::test]
async fn attach_to_a_terminal() -> anyhow::Result<()> {
    let root = RuncRoot::new()?;
    let spec = spec(&root, &["sh"], true, true)?;
    shim::spawn(SKIFF.as_ref(), &spec).await?;
    let client = attach::Client::connect(
        &spec.state_dir,
        attach::Wants {
            stdin: true,
            stdout: true,
            stderr: false,
        },
    )
    .await?;
    let (mut events, mut input) = client.split();
    input.resize(123, 45).await?;
    input.stdin(b"tty; stty size; echo sum=$((40+2))\n").await?;
    input.stdin(b"exit 7\n").await?;
    let (stdout, _, status) = collect(&mut events).await?;
    ensure!(stdout.contains("/dev/"), "no terminal: {stdout:?}");
    ensure!(
        stdout.contains("45 123"),
        "window size not applied: {stdout:?}"
    );
    ensure!(stdout.contains("sum=42"), "{stdout:?}");
    ensure!(status.code == 7, "{status:?}");
    // A terminal's output is logged as stdout, CRLF made LF.
    let records = records(&spec.log_path)?;
    ensure!(
        records
            .iter()
            .any(|(s, _, t)| *s == crilog::Stream::Stdout && t == "sum=42"),
        "{records:?}"
    );
    shim::delete(&spec).await?;
    Ok(())
}

/// Output and the exit status of an attach session.
async fn collect(
    events: &mut attach::Events,
) -> anyhow::Result<(String, String, shim::ExitStatus)> {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        loop {
            match events.next().await? {
                Some(attach::Event::Stdout(data)) => stdout.extend_from_slice(&data),
                Some(attach::Event::Stderr(data)) => stderr.extend_from_slice(&data),
                Some(attach::Event::Exit(status)) => return Ok(status),
                None => bail!("the shim closed without an exit status"),
            }
        }
    })
    .await;
    let status = match result {
        Ok(status) => status?,
        Err(_) => bail!(
            "no exit in time; stdout so far: {:?}",
            String::from_utf8_lossy(&stdout)
        ),
    };
    Ok((
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
        status,
    ))
}
