//! Store benchmark: the same workloads against the embedded store and a
//! local etcd (Debian's etcd-server) started for this run, so the ratio is
//! measured on the same machine at the same time.
//!
//! Workloads: sequential writes, 64 concurrent writers, point reads from 16
//! readers, prefix lists of 1,000 and 10,000 keys, and one write fanned out
//! to 1,000 watchers. Values are 256 bytes, as in etcd's own benchmark.
//!
//! `cargo run --release -p skiff-bench --bin store [-- --scale 0.2]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use controlplane::storage::embedded::EmbeddedStore;
use controlplane::storage::etcd::EtcdStore;
use controlplane::storage::{RangeRequest, Store};
use futures::StreamExt;
use skiff_bench::Samples;
use skiff_e2e::etcd::Etcd;

const VALUE_BYTES: usize = 256;

struct Workload {
    name: &'static str,
    result: Samples,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let scale = parse_scale()?;
    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-store-")
        .tempdir()?;
    let embedded: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("state.db"))?);
    let etcd = Etcd::start().await.context("starting etcd")?;
    let remote: Arc<dyn Store> = Arc::new(EtcdStore::connect(&[etcd.endpoint()]).await?);

    println!("store benchmark: embedded (SQLite WAL, synchronous=FULL) vs etcd 3.4 on loopback");
    let ours = run_all("embedded", embedded, scale).await?;
    let theirs = run_all("etcd", remote, scale).await?;

    println!();
    println!(
        "{:<28} {:>12} {:>10} {:>10} | {:>12} {:>10} {:>10} | {:>8}",
        "workload", "embedded/s", "p50", "p99", "etcd/s", "p50", "p99", "ratio"
    );
    for (a, b) in ours.iter().zip(&theirs) {
        println!(
            "{:<28} {:>12.0} {:>10} {:>10} | {:>12.0} {:>10} {:>10} | {:>7.2}x",
            a.name,
            a.result.rate(),
            fmt(a.result.percentile(50.0)),
            fmt(a.result.percentile(99.0)),
            b.result.rate(),
            fmt(b.result.percentile(50.0)),
            fmt(b.result.percentile(99.0)),
            a.result.rate() / b.result.rate(),
        );
    }
    Ok(())
}

async fn run_all(label: &str, store: Arc<dyn Store>, scale: f64) -> anyhow::Result<Vec<Workload>> {
    let n = |base: usize| ((base as f64 * scale) as usize).max(64);
    eprintln!("{label}: sequential writes");
    let sequential = writes(&store, "/seq/", 1, n(2_000)).await?;
    eprintln!("{label}: 64 concurrent writers");
    let concurrent = writes(&store, "/conc/", 64, n(20_000)).await?;
    eprintln!("{label}: point reads");
    let reads = point_reads(&store, "/conc/", n(20_000), 16).await?;
    eprintln!("{label}: lists");
    fill(&store, "/list1k/", 1_000).await?;
    fill(&store, "/list10k/", 10_000).await?;
    let list1k = lists(&store, "/list1k/", 200).await?;
    let list10k = lists(&store, "/list10k/", 30).await?;
    eprintln!("{label}: watch fan-out");
    let fanout = watch_fanout(&store, 1_000, 50).await?;
    Ok(vec![
        Workload {
            name: "sequential writes",
            result: sequential,
        },
        Workload {
            name: "writes, 64 writers",
            result: concurrent,
        },
        Workload {
            name: "point reads, 16 readers",
            result: reads,
        },
        Workload {
            name: "list 1,000 keys",
            result: list1k,
        },
        Workload {
            name: "list 10,000 keys",
            result: list10k,
        },
        Workload {
            name: "watch fan-out, 1,000 (events)",
            result: fanout,
        },
    ])
}

/// `total` creates from `writers` concurrent tasks.
async fn writes(
    store: &Arc<dyn Store>,
    prefix: &str,
    writers: usize,
    total: usize,
) -> anyhow::Result<Samples> {
    let each = total / writers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(each);
            let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
            for i in 0..each {
                let key = format!("{prefix}{w}/{i}");
                let t = Instant::now();
                store.create(key.as_bytes(), value.clone()).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut samples = Vec::with_capacity(total);
    for task in tasks {
        samples.extend(task.await??);
    }
    Ok(Samples::new(samples, start.elapsed()))
}

/// Gets of keys written by the 64-writer run, spread over `readers`.
async fn point_reads(
    store: &Arc<dyn Store>,
    prefix: &str,
    total: usize,
    readers: usize,
) -> anyhow::Result<Samples> {
    let each = total / readers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for r in 0..readers {
        let store = store.clone();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(each);
            for i in 0..each {
                // Writer w wrote keys w/0.. — walk them in a scattered order.
                let key = format!("{prefix}{}/{}", (i * 7 + r) % 64, i % 64);
                let t = Instant::now();
                let found = store.get(key.as_bytes()).await?;
                latencies.push(t.elapsed());
                anyhow::ensure!(found.is_some(), "{key} missing");
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut samples = Vec::with_capacity(total);
    for task in tasks {
        samples.extend(task.await??);
    }
    Ok(Samples::new(samples, start.elapsed()))
}

async fn fill(store: &Arc<dyn Store>, prefix: &str, count: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for w in 0..32 {
        let store = store.clone();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
            for i in (w..count).step_by(32) {
                store
                    .create(format!("{prefix}{i:06}").as_bytes(), value.clone())
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

async fn lists(store: &Arc<dyn Store>, prefix: &str, times: usize) -> anyhow::Result<Samples> {
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(times);
    for _ in 0..times {
        let t = Instant::now();
        let listed = store
            .range(RangeRequest {
                prefix: Bytes::copy_from_slice(prefix.as_bytes()),
                ..RangeRequest::default()
            })
            .await?;
        latencies.push(t.elapsed());
        anyhow::ensure!(listed.kvs.len() == listed.count && !listed.more);
    }
    Ok(Samples::new(latencies, start.elapsed()))
}

/// `watchers` watches on one prefix, then `events` writes; each sample is
/// the time from a write's acknowledgement to a watcher receiving it, and
/// the rate is events delivered per second across all watchers.
async fn watch_fanout(
    store: &Arc<dyn Store>,
    watchers: usize,
    events: usize,
) -> anyhow::Result<Samples> {
    let from = store.current_revision().await?;
    let epoch = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut stream = store.watch(b"/fan/", from).await?;
        tasks.push(tokio::spawn(async move {
            let mut received = Vec::with_capacity(events);
            while received.len() < events {
                match stream.next().await {
                    Some(Ok(event)) => received.push((event.revision(), epoch.elapsed())),
                    Some(Err(e)) => return Err(anyhow::anyhow!("watch failed: {e}")),
                    None => anyhow::bail!("watch ended"),
                }
            }
            anyhow::Ok(received)
        }));
    }
    let start = Instant::now();
    let mut acked = std::collections::HashMap::new();
    let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
    for i in 0..events {
        let kv = store
            .create(format!("/fan/{i}").as_bytes(), value.clone())
            .await?;
        acked.insert(kv.mod_revision, epoch.elapsed());
    }
    let mut latencies = Vec::with_capacity(watchers * events);
    for task in tasks {
        for (revision, at) in task.await?? {
            let written = acked.get(&revision).context("event for an unknown write")?;
            latencies.push(at.saturating_sub(*written));
        }
    }
    Ok(Samples::new(latencies, start.elapsed()))
}

fn parse_scale() -> anyhow::Result<f64> {
    let mut args = std::env::args().skip(1);
    let mut scale = 1.0;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--scale" => {
                scale = args
                    .next()
                    .context("--scale needs a number")?
                    .parse()
                    .context("--scale")?;
            }
            other => anyhow::bail!("unknown argument {other} (usage: store [--scale F])"),
        }
    }
    Ok(scale)
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1}µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2}ms", d.as_secs_f64() * 1e3)
    }
}
