//! Endpoint change latency: the time from an EndpointSlice update sent to
//! the API server to the first new connection answered by the new endpoint,
//! seen by a client pod probing the ClusterIP, with the cluster holding
//! N Services of 5 endpoints each (50,000 endpoints at 10,000 Services).
//!
//! The update goes the whole way: API write, the data planes' watch, the
//! table update, the next SYN's Maglev pick. The probe Service and the
//! fillers have no selector, so the benchmark owns their EndpointSlices (as
//! any custom endpoint controller does); the probe's single endpoint flips
//! between a listener in the same-node pod and one in the cross-node pod,
//! each answering a connection with its own tag byte.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use skiff_bench::Samples;
use skiff_e2e::cluster::Cluster;

use crate::api::ApiThread;

const PROBE_PORT: u16 = 9000;
const NAMESPACE: &str = "default";
const ENDPOINTS_PER_SERVICE: u32 = 5;
/// Requests in flight while the fillers are created.
const CREATE_CONCURRENCY: usize = 16;
const CHANGES: usize = 10;
/// The probe's pause between connections (bounds its load on the engine).
const PROBE_GAP: Duration = Duration::from_millis(1);
/// Probing clients running at once (see [`Prober`]).
const PROBERS: usize = 4;
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

/// Measures at each Service count in `scales` (ascending), adding fillers
/// between scales.
pub async fn run(cluster: &Cluster, api: &ApiThread, scales: &[u32]) -> anyhow::Result<()> {
    let local = cluster.pod("local");
    let remote = cluster.pod("remote");
    let _listeners = [
        Listener::start(&local.netns, b'L')?,
        Listener::start(&remote.netns, b'R')?,
    ];
    let client = api.client.clone();
    let probe_vip = api
        .run(create_probe(client.clone(), local.ip))
        .await
        .context("creating the probe Service")?;
    // The probing threads stand for processes of the client pod: they
    // connect as it does, through its cgroup's connect-time balancing.
    let _joined = cluster
        .pod("client")
        .netns
        .cgroup()
        .map(skiff_e2e::cgroup::join_process)
        .transpose()?;
    let started = Instant::now();
    let prober = Prober::start(cluster, SocketAddr::from((probe_vip, PROBE_PORT)))?;
    prober
        .wait_for(b'L', started, CHANGE_DEADLINE)
        .context("the probe Service never answered from its first endpoint")?;

    println!(
        "service endpoint change: EndpointSlice write to the API → first new connection to the \
         ClusterIP answered by the new endpoint (client pod on node 1, endpoint flipped between \
         node 1 and node 2, {CHANGES} changes per size; goal ≤ 100 ms at 10,000 Services)"
    );
    let mut fillers = 0u32;
    for &services in scales {
        // The probe Service counts as one.
        let want = services.saturating_sub(1);
        if want > fillers {
            let before = table_size(cluster)?;
            let started = Instant::now();
            api.run(create_fillers(client.clone(), fillers, want))
                .await
                .with_context(|| format!("creating Services {fillers}..{want}"))?;
            let created = started.elapsed();
            wait_for_table(cluster, before + u64::from(want - fillers)).await?;
            println!(
                "  {services} Services ({} endpoints): created through the API in {:.1} s, all in \
                 node 1's data plane {:.1} s after the first create",
                services * ENDPOINTS_PER_SERVICE,
                created.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
            fillers = want;
        }
        let mut visible = Vec::with_capacity(CHANGES);
        let mut written = Vec::with_capacity(CHANGES);
        let mut after_write = Vec::with_capacity(CHANGES);
        for change in 0..CHANGES {
            let (tag, ip) = if change % 2 == 0 {
                (b'R', remote.ip)
            } else {
                (b'L', local.ip)
            };
            prober.drain();
            let t0 = Instant::now();
            api.run(set_probe_endpoint(client.clone(), ip)).await?;
            let t1 = Instant::now();
            let seen = prober
                .wait_for(tag, t0, CHANGE_DEADLINE)
                .with_context(|| format!("endpoint change {change} at {services} Services"))?;
            written.push(t1.duration_since(t0));
            visible.push(seen.duration_since(t0));
            // Zero when the new endpoint answered before the API did.
            after_write.push(seen.saturating_duration_since(t1));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let visible = Samples::new(visible, Duration::ZERO);
        let written = Samples::new(written, Duration::ZERO);
        let after_write = Samples::new(after_write, Duration::ZERO);
        println!(
            "  {services:>6} Services: new endpoint answers p50 {:.1} ms, max {:.1} ms after the \
             write was sent | the API write itself p50 {:.1} ms, max {:.1} ms | after the API's \
             answer p50 {:.1} ms, max {:.1} ms",
            millis(visible.percentile(50.0)),
            millis(visible.percentile(100.0)),
            millis(written.percentile(50.0)),
            millis(written.percentile(100.0)),
            millis(after_write.percentile(50.0)),
            millis(after_write.percentile(100.0)),
        );
    }
    Ok(())
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until node 1's data plane balances `count` Services.
async fn wait_for_table(cluster: &Cluster, count: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let services = table_size(cluster)?;
        if services >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node 1's data plane has {services} of {count} Services after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Services in node 1's data plane.
fn table_size(cluster: &Cluster) -> anyhow::Result<u64> {
    let metrics = cluster.metrics(0)?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("skiff_service_services "))
        .and_then(|v| v.trim().parse().ok())
        .context("no skiff_service_services in node 1's metrics")
}

fn port() -> serde_json::Value {
    json!([{"name": "p", "port": PROBE_PORT, "protocol": "TCP"}])
}

fn slice_for(service: &str, addresses: &[Ipv4Addr]) -> anyhow::Result<EndpointSlice> {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    Ok(serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": service, "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "skiff-bench",
        }},
        "addressType": "IPv4",
        "ports": port(),
        "endpoints": endpoints,
    }))?)
}

fn service_for(name: &str) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": port()},
    }))?)
}

async fn create_probe(client: kube::Client, endpoint: Ipv4Addr) -> anyhow::Result<Ipv4Addr> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    let created = services
        .create(&PostParams::default(), &service_for("probe")?)
        .await?;
    slices
        .create(&PostParams::default(), &slice_for("probe", &[endpoint])?)
        .await?;
    let vip = created
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the probe Service got no clusterIP")?;
    Ok(vip.parse()?)
}

async fn set_probe_endpoint(client: kube::Client, endpoint: Ipv4Addr) -> anyhow::Result<()> {
    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    let patch = json!({"endpoints": [
        {"addresses": [endpoint.to_string()], "conditions": {"ready": true}}
    ]});
    slices
        .patch("probe", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Services `filler-{from}..filler-{to}`, each with a slice of five
/// endpoints nobody connects to (addresses outside every routed range).
async fn create_fillers(client: kube::Client, from: u32, to: u32) -> anyhow::Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    futures::stream::iter(from..to)
        .map(|i| {
            let services = services.clone();
            let slices = slices.clone();
            async move {
                let name = format!("filler-{i}");
                let base = u32::from(Ipv4Addr::new(10, 46, 0, 0)) + i * ENDPOINTS_PER_SERVICE;
                let addresses: Vec<Ipv4Addr> = (0..ENDPOINTS_PER_SERVICE)
                    .map(|k| Ipv4Addr::from(base + k))
                    .collect();
                services
                    .create(&PostParams::default(), &service_for(&name)?)
                    .await?;
                slices
                    .create(&PostParams::default(), &slice_for(&name, &addresses)?)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<()>()
        .await
}

/// A TCP listener in a pod that answers every connection with its tag.
struct Listener {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    netns: String,
}

impl Listener {
    fn start(netns: &skiff_e2e::netns::Netns, tag: u8) -> anyhow::Result<Self> {
        let listener = netns.enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PROBE_PORT)))??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(mut stream) = stream {
                    let _ = stream.write_all(&[tag]);
                }
            }
        });
        Ok(Listener {
            stop,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, PROBE_PORT)),
            netns: netns.name().to_owned(),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = skiff_e2e::netns::enter(&self.netns, || {
            TcpStream::connect_timeout(&self.addr, Duration::from_secs(1))
        });
    }
}

/// Clients in the client pod connecting to the probe Service over and
/// over, each reporting every change of the tag that answers it (0: no
/// answer). There are several so that a connection caught by the change
/// itself (its SYN sent to the old endpoint, which left the Service before
/// its SYN-ACK came back: the client retransmits a second later) does not
/// hold up the probes that follow it.
struct Prober {
    stop: Arc<AtomicBool>,
    changes: mpsc::Receiver<(Instant, u8)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(cluster: &Cluster, target: SocketAddr) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, changes) = mpsc::channel();
        let mut threads = Vec::with_capacity(PROBERS);
        for _ in 0..PROBERS {
            let flag = stop.clone();
            let tx = tx.clone();
            // A thread started inside the namespace stays in it.
            threads.push(cluster.pod("client").netns.enter(move || {
                std::thread::spawn(move || {
                    let mut last = None;
                    while !flag.load(Ordering::Relaxed) {
                        let tag = probe(target).unwrap_or(0);
                        if last != Some(tag) {
                            last = Some(tag);
                            if tx.send((Instant::now(), tag)).is_err() {
                                return;
                            }
                        }
                        std::thread::sleep(PROBE_GAP);
                    }
                })
            })?);
        }
        Ok(Prober {
            stop,
            changes,
            threads,
        })
    }

    fn drain(&self) {
        while self.changes.try_recv().is_ok() {}
    }

    /// When `tag` first answered after `since`.
    fn wait_for(&self, tag: u8, since: Instant, within: Duration) -> anyhow::Result<Instant> {
        let deadline = since + within;
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.changes.recv_timeout(left) {
                Ok((at, seen)) if seen == tag && at >= since => return Ok(at),
                Ok((_, seen)) => last = Some(seen),
                Err(_) => bail!(
                    "no answer from endpoint {:?} within {within:?} (last answer: {:?})",
                    tag as char,
                    last.map(|t: u8| t as char)
                ),
            }
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One connection: the tag byte of whoever answered.
fn probe(target: SocketAddr) -> Option<u8> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    let mut tag = [0u8];
    stream.read_exact(&mut tag).ok()?;
    Some(tag[0])
}
