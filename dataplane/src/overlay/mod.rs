//! The TUN overlay between nodes.
//!
//! [`run`] creates the TUN device (one queue per worker), the underlay
//! sockets and one worker thread per queue (see [`worker`]), then watches
//! Node objects: every change rebuilds the peer table (podCIDR → underlay
//! address), hands it to the workers, and brings the device's routes in
//! line — a joining node is reachable and a leaving one forgotten as soon
//! as its watch event arrives. Stopping (dropping the future) stops the
//! workers, which closes the device and with it its routes; the next start
//! creates both again.

mod idle_spin;
pub mod node_ports;
pub mod nodes;
pub mod peers;
pub mod reassembly;
pub mod routes;
pub mod worker;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};

use crate::device::{tun, udp};
use crate::metrics::Metrics;
use crate::nftables::Kernel;
use crate::service::{Engine, EngineConfig, TableConfig};
use crate::services::Services;
use crate::socket::SocketBalancer;

use nodes::{NodeInfo, Plan};
use peers::{Reader, Shared};
use routes::Routes;

/// The overlay's TUN device (flannel's is `flannel.1`); the agent's pod
/// bridge is `skiff0`.
pub const DEFAULT_TUN: &str = "skiff.1";
/// The overlay's UDP port (flannel's VXLAN port, so firewalls that let a
/// flannel cluster through let this one through).
pub const DEFAULT_PORT: u16 = 8472;
/// Routes are re-checked this often, to repair what someone else removed.
const RESYNC: Duration = Duration::from_secs(10);
/// A failed route update is retried this soon.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// This node's Node object.
    pub node_name: String,
    /// The address other nodes reach this one at; unspecified binds all.
    pub underlay_ip: IpAddr,
    pub port: u16,
    pub tun_name: String,
    /// MTU of the TUN device and the pods: underlay MTU minus 44 bytes of
    /// IPv4, UDP and overlay headers (1450 under a 1500-byte underlay,
    /// as VXLAN).
    pub mtu: u16,
    /// Also routed into the device, for the service load balancer; an
    /// IPv4 range turns the Service engine on.
    pub service_cidr: Option<IpNet>,
    /// The whole pod network: sources outside it reaching a Service are
    /// SNATed so replies come back through this node.
    pub cluster_cidr: Option<IpNet>,
    /// Worker threads and TUN queues; 0 means one per CPU.
    pub workers: usize,
    /// Largest super-packet the kernel hands the device (`gso_max_size`).
    /// The default, 64 KiB, is what a pod's veth builds: below that the
    /// kernel cuts every super-packet into MTU-sized packets before the
    /// device sees them (one system call per 1.4 KB). A TCP super-packet
    /// crosses as one datagram per segment, so its size does not change
    /// what one lost datagram costs.
    pub max_super_packet: u32,
    /// `nodeIP:port` for ports in this range is steered into the device
    /// for the Service engine (the API server's
    /// `--service-node-port-range`).
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// Send and receive buffer of each underlay socket.
    pub socket_buffer: usize,
    /// After a packet, the packet loops keep polling this long instead of
    /// sleeping, while the machine has a CPU to spare (`idle_spin`): sparse
    /// packets then find the loops awake. Zero (the default) sleeps after
    /// a short linger.
    pub busy_poll: Duration,
    /// Serve `/metrics` here.
    pub metrics_addr: Option<SocketAddr>,
    /// Which backend balances connections from this node's pods.
    pub service_backend: ServiceBackend,
    /// The cgroup v2 folder holding this node's pods, relative to the
    /// hierarchy's root (`None`: the agent's, `/skiff/<node>`).
    pub pod_cgroup: Option<String>,
}

/// Which backend balances connections from this node's pods to Services
/// (everything else goes through the engine either way; see `nftables`).
/// The default is `auto`: connect-time translation for TCP where a BPF
/// program can be attached to the node's pod cgroup (`socket`), nftables
/// rules where `nft` can program the node's namespace, and the engine for
/// the rest. The Service benchmark measured the kernel rules ahead of the
/// engine for same-node keep-alive traffic (the engine's path crosses the
/// TUN device twice) and even across nodes, and connect-time translation
/// level with the pod IP itself (its path is the pod IP's from the first
/// packet), where the rule-based paths stayed between 0.8x and 1.0x.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceBackend {
    #[default]
    Auto,
    Engine,
    Nftables,
    /// As `auto`, but failing when the BPF programs cannot be attached.
    Socket,
}

impl std::str::FromStr for ServiceBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ServiceBackend::Auto),
            "engine" => Ok(ServiceBackend::Engine),
            "nftables" => Ok(ServiceBackend::Nftables),
            "socket" => Ok(ServiceBackend::Socket),
            other => Err(format!(
                "unknown Service backend {other:?} (auto, engine, nftables or socket)"
            )),
        }
    }
}

impl OverlayConfig {
    pub fn new(node_name: impl Into<String>, underlay_ip: IpAddr) -> Self {
        OverlayConfig {
            node_name: node_name.into(),
            underlay_ip,
            port: DEFAULT_PORT,
            tun_name: DEFAULT_TUN.into(),
            mtu: 1450,
            service_cidr: None,
            cluster_cidr: None,
            workers: 0,
            max_super_packet: 64 * 1024,
            node_port_range: 30000..=32767,
            socket_buffer: 8 << 20,
            busy_poll: Duration::ZERO,
            metrics_addr: None,
            service_backend: ServiceBackend::default(),
            pod_cgroup: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating TUN device {name}: {source}")]
    Tun { name: String, source: io::Error },
    #[error("opening the overlay socket on {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
    #[error("setting up the TUN device's routes: {0}")]
    Routes(#[from] routes::Error),
    #[error("starting a worker thread: {0}")]
    Thread(io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("the Node watch ended")]
    WatchEnded,
    #[error(transparent)]
    Services(#[from] crate::services::WatchError),
}

/// Runs the overlay for `config.node_name` until the future is dropped,
/// with its own metrics (served at `config.metrics_addr`).
pub async fn run(client: kube::Client, config: OverlayConfig) -> Result<(), Error> {
    run_with_metrics(client, config, Arc::new(Metrics::new())).await
}

/// [`run`], counting into `metrics`.
pub async fn run_with_metrics(
    client: kube::Client,
    config: OverlayConfig,
    metrics: Arc<Metrics>,
) -> Result<(), Error> {
    let _serving = config.metrics_addr.map(|addr| {
        let metrics = metrics.clone();
        AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, metrics).await {
                tracing::error!(%addr, error = %e, "cannot serve data plane metrics");
            }
        }))
    });
    let services = match service_net(&config) {
        Some(_) => Some(services(&config, &metrics).await?),
        None => None,
    };
    let _kernel = services
        .as_ref()
        .and_then(|services| services.kernel.clone())
        .map(KernelRules::start);
    let result = async {
        let running = start(&config, metrics.clone(), services.clone()).await?;
        match services {
            Some(services) => tokio::select! {
                result = watch(client.clone(), &config, &running, &metrics) => result,
                result = crate::services::watch(client, services) => result.map_err(Error::from),
            },
            None => watch(client, &config, &running, &metrics).await,
        }
    }
    .await;
    if result.is_err() {
        metrics.start_failures.inc();
    }
    result
}

/// The Service state, made once per process (it outlives restarts of the
/// overlay) with the backend `config` asks for.
async fn services(config: &OverlayConfig, metrics: &Metrics) -> Result<Arc<Services>, Error> {
    if let Some(services) = metrics.services.get() {
        return Ok(services.clone());
    }
    let kernel = match config.service_backend {
        ServiceBackend::Engine => None,
        ServiceBackend::Auto | ServiceBackend::Nftables | ServiceBackend::Socket => {
            let node_ips = table_config(config).node_ips;
            Kernel::start(&config.tun_name, &config.node_name, node_ips)
                .await
                .map(Arc::new)
        }
    };
    if kernel.is_none() {
        match config.service_backend {
            ServiceBackend::Nftables => {
                return Err(Error::Config(
                    "the nftables Service backend was asked for, but nft cannot program this \
                     namespace"
                        .into(),
                ));
            }
            ServiceBackend::Auto | ServiceBackend::Socket => {
                tracing::info!("nftables is not usable here: the engine balances the rest")
            }
            ServiceBackend::Engine => {}
        }
    }
    let socket = match config.service_backend {
        ServiceBackend::Engine | ServiceBackend::Nftables => None,
        ServiceBackend::Auto | ServiceBackend::Socket => {
            let cgroup = config
                .pod_cgroup
                .clone()
                .unwrap_or_else(|| format!("/skiff/{}", config.node_name));
            match SocketBalancer::start(&cgroup, &config.node_name) {
                Ok(balancer) => Some(Arc::new(balancer)),
                Err(e) if config.service_backend == ServiceBackend::Socket => {
                    return Err(Error::Config(format!(
                        "the socket Service backend was asked for, but {e}"
                    )));
                }
                Err(e) => {
                    tracing::info!(error = %e, "no connect-time Service balancing here");
                    None
                }
            }
        }
    };
    Ok(metrics
        .services
        .get_or_init(|| Arc::new(Services::new(table_config(config), kernel, socket)))
        .clone())
}

/// The nftables backend's rules while the overlay runs: rebuilt when it
/// starts, followed while it runs, removed when it stops.
struct KernelRules {
    kernel: Arc<Kernel>,
    task: tokio::task::JoinHandle<()>,
}

impl KernelRules {
    fn start(kernel: Arc<Kernel>) -> Self {
        let running = kernel.clone();
        KernelRules {
            kernel,
            task: tokio::spawn(async move { running.run().await }),
        }
    }
}

impl Drop for KernelRules {
    fn drop(&mut self) {
        self.task.abort();
        self.kernel.remove_blocking();
    }
}

/// [`run`] for a component that must not fail because of the network
/// (`skiff server`): errors are logged and counted, and the overlay is
/// started again after a pause.
pub async fn run_supervised(client: kube::Client, config: OverlayConfig) {
    let metrics = Arc::new(Metrics::new());
    loop {
        if let Err(e) = run_with_metrics(client.clone(), config.clone(), metrics.clone()).await {
            tracing::error!(error = %e, "pod network overlay is not running; retrying in 30s");
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

/// The device, its routes and the worker threads; dropping it stops the
/// workers, which closes the device.
struct Running {
    shared: Arc<Shared>,
    routes: Routes,
    stop: Arc<AtomicBool>,
    /// Whether NodePort rules were installed, to be removed on the way out.
    node_ports: bool,
    /// Keeps the LoadBalancer port rules in step with the Services.
    load_balancer_ports: Option<AbortOnDrop>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // No rule may be added after they are all removed.
        self.load_balancer_ports.take();
        if self.node_ports {
            node_ports::remove_blocking();
        }
    }
}

async fn start(
    config: &OverlayConfig,
    metrics: Arc<Metrics>,
    services: Option<Arc<Services>>,
) -> Result<Running, Error> {
    if usize::from(config.mtu) < 576 {
        return Err(Error::Config(format!("MTU {} is below 576", config.mtu)));
    }
    let workers = match config.workers {
        // The engine's flow table belongs to one packet loop, and a flow's
        // two directions (different addresses after NAT, or one from the
        // TUN and one from the underlay) would land on different queues:
        // with Services, one loop owns the device until flows are steered
        // per queue.
        _ if services.is_some() => 1,
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let queues =
        tun::create(&config.tun_name, config.mtu, workers).map_err(|source| Error::Tun {
            name: config.tun_name.clone(),
            source,
        })?;
    let routes = Routes::open(&config.tun_name).await?;
    routes
        .configure(config.max_super_packet, worker::MAX_SEGMENTS as u32)
        .await?;
    enable_forwarding();
    let (node_ports, load_balancer_ports) = match (&services, config.underlay_ip) {
        (Some(services), IpAddr::V4(node_ip)) if !node_ip.is_unspecified() => {
            steer_node_ports(config, &routes, node_ip).await?;
            let follow = node_ports::follow_load_balancer_ports(
                routes.handle(),
                node_ip,
                config.node_port_range.clone(),
                services.load_balancer_ports(),
            );
            (true, Some(AbortOnDrop(tokio::spawn(follow))))
        }
        _ => (false, None),
    };

    let listen = SocketAddr::new(config.underlay_ip, config.port);
    let send_from = SocketAddr::new(config.underlay_ip, 0);
    let socket_error = |addr| move |source| Error::Socket { addr, source };
    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    let running = Running {
        shared: shared.clone(),
        routes,
        stop: stop.clone(),
        node_ports,
        load_balancer_ports,
    };
    for (i, queue) in queues.into_iter().enumerate() {
        let rx = udp::UdpSocket::bind(
            listen,
            &udp::Options {
                reuse_port: true,
                gro: true,
                segment: None,
                buffer: config.socket_buffer,
            },
        )
        .map_err(socket_error(listen))?;
        let tx = udp::UdpSocket::bind(
            send_from,
            &udp::Options {
                reuse_port: false,
                gro: false,
                segment: None,
                buffer: config.socket_buffer,
            },
        )
        .map_err(socket_error(send_from))?;
        let worker = worker::Worker::new(worker::Setup {
            queue,
            rx,
            tx,
            peers: Reader::new(shared.clone()),
            metrics: metrics.clone(),
            stop: stop.clone(),
            chunk: usize::from(config.mtu),
            mtu: usize::from(config.mtu),
            busy_poll: config.busy_poll,
            services: services.as_ref().map(|services| worker::ServiceSetup {
                engine: Engine::new(
                    engine_config(config),
                    services.published(),
                    services.metrics.clone(),
                ),
                services: services.clone(),
                cluster_cidr: match config.cluster_cidr {
                    Some(IpNet::V4(net)) => Some(net),
                    _ => None,
                },
            }),
        });
        std::thread::Builder::new()
            .name(format!("overlay-{i}"))
            .spawn(move || worker.run())
            .map_err(Error::Thread)?;
    }
    tracing::info!(
        device = %config.tun_name,
        %listen,
        workers,
        mtu = config.mtu,
        "pod network overlay started"
    );
    Ok(running)
}

/// Follows Node objects, publishing peer tables and syncing routes.
async fn watch(
    client: kube::Client,
    config: &OverlayConfig,
    running: &Running,
    metrics: &Metrics,
) -> Result<(), Error> {
    let api: Api<Node> = Api::all(client);
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    let want_v4 = match config.underlay_ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.is_unspecified(),
    };
    let mut nodes: BTreeMap<String, NodeInfo> = BTreeMap::new();
    let mut relist: Option<BTreeMap<String, NodeInfo>> = None;
    let mut synced = false;
    let mut applied: Option<Plan> = None;
    let mut routes_ok = true;
    let mut resync = tokio::time::interval(RESYNC);
    let mut retry = tokio::time::interval(RETRY);
    loop {
        let changed = tokio::select! {
            event = events.next() => match event {
                None => return Err(Error::WatchEnded),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching Nodes");
                    false
                }
                Some(Ok(watcher::Event::Init)) => {
                    relist = Some(BTreeMap::new());
                    false
                }
                Some(Ok(watcher::Event::InitApply(node))) => {
                    if let (Some(list), Some(name)) = (relist.as_mut(), node.metadata.name.clone()) {
                        list.insert(name, NodeInfo::from_node(&node, want_v4));
                    }
                    false
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    nodes = relist.take().unwrap_or_default();
                    synced = true;
                    true
                }
                Some(Ok(watcher::Event::Apply(node))) => {
                    if let Some(name) = node.metadata.name.clone() {
                        nodes.insert(name, NodeInfo::from_node(&node, want_v4));
                    }
                    true
                }
                Some(Ok(watcher::Event::Delete(node))) => {
                    if let Some(name) = &node.metadata.name {
                        nodes.remove(name);
                    }
                    true
                }
            },
            _ = resync.tick() => synced,
            _ = retry.tick() => synced && !routes_ok,
        };
        if !changed {
            continue;
        }
        let plan = Plan::new(&config.node_name, &nodes, config.port, config.service_cidr);
        if applied.as_ref() != Some(&plan) {
            running.shared.publish(plan.table());
            metrics
                .peers
                .set(running.shared.current().peer_count() as i64);
            tracing::info!(
                local = ?plan.local,
                remote = ?plan.remote,
                "overlay peers updated"
            );
        }
        match running.routes.sync(&plan.routes).await {
            Ok((added, removed)) => {
                routes_ok = true;
                metrics.routes.set(plan.routes.len() as i64);
                if added + removed > 0 {
                    tracing::info!(added, removed, "overlay routes updated");
                }
            }
            Err(e) => {
                routes_ok = false;
                metrics.route_errors.inc();
                tracing::warn!(error = %e, "updating overlay routes; retrying");
            }
        }
        applied = Some(plan);
    }
}

/// The IPv4 Service network, if Services are balanced here.
fn service_net(config: &OverlayConfig) -> Option<Ipv4Net> {
    match config.service_cidr {
        Some(IpNet::V4(net)) => Some(net.trunc()),
        _ => None,
    }
}

fn table_config(config: &OverlayConfig) -> TableConfig {
    let node_ips = match config.underlay_ip {
        IpAddr::V4(ip) if !ip.is_unspecified() => vec![ip],
        _ => Vec::new(),
    };
    TableConfig {
        node_name: config.node_name.clone(),
        node_ips,
    }
}

fn engine_config(config: &OverlayConfig) -> EngineConfig {
    let services = service_net(config);
    // The Service network's broadcast address is never a ClusterIP and is
    // routed into this node's device: flows to local endpoints are SNATed
    // to it so their replies come back through the engine (see DESIGN.md
    // §5). Until the node watch tells the podCIDR it is the SNAT address
    // for everything.
    let local_snat = services.map_or(Ipv4Addr::UNSPECIFIED, |net| net.broadcast());
    let mut engine = EngineConfig::new(local_snat);
    engine.service_cidr = services;
    engine.local_snat_ip = services.map(|net| net.broadcast());
    engine.cluster_cidr = match config.cluster_cidr {
        Some(IpNet::V4(net)) => Some(net),
        _ => None,
    };
    engine
}

/// Routes NodePort traffic for `node_ip` into the device. The engine's
/// replies to it leave the device with the node's own address as source,
/// which the kernel drops as martian unless the device accepts local
/// sources.
async fn steer_node_ports(
    config: &OverlayConfig,
    routes: &Routes,
    node_ip: Ipv4Addr,
) -> Result<(), Error> {
    let accept_local = format!("/proc/sys/net/ipv4/conf/{}/accept_local", config.tun_name);
    if let Err(e) = std::fs::write(&accept_local, "1") {
        tracing::warn!(error = %e, "cannot accept local sources on the device; NodePort replies will be dropped");
    }
    node_ports::NodePorts::install(
        routes.handle(),
        routes.index(),
        node_ip,
        config.node_port_range.clone(),
    )
    .await?;
    tracing::info!(%node_ip, ports = ?config.node_port_range, "NodePort traffic steered into the device");
    Ok(())
}

/// Decapsulated packets are forwarded from the TUN device to the pods'
/// bridge, and pods' packets into the device: both need IP forwarding.
fn enable_forwarding() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        tracing::warn!(error = %e, "cannot enable IPv4 forwarding; pods on this node may be unreachable");
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
