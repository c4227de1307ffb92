//! The agent's Node object: registration with capacity, addresses and
//! system info; conditions refreshed every minute (or when readiness
//! changes); and the heartbeat Lease in `kube-node-lease`, renewed every
//! 10 s as upstream's kubelet does.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::AgentConfig;

const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_PERIOD: Duration = Duration::from_secs(10);
const LEASE_DURATION_SECONDS: i32 = 40;
const STATUS_PERIOD: Duration = Duration::from_secs(60);
/// Upstream's default `--max-pods`.
const MAX_PODS: u32 = 110;

/// Creates the Node if it does not exist and writes its status.
pub async fn register(client: &kube::Client, config: &AgentConfig) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(&config.node_name).await?.is_none() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(config.node_name.clone()),
                labels: Some(labels(&config.node_name)),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => tracing::info!(node = %config.node_name, "registered the node"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    write_status(&nodes, config).await
}

/// Renews the Lease and refreshes the Node's status until the process
/// stops; API errors are logged and retried at the next period.
pub async fn heartbeat(client: kube::Client, config: std::sync::Arc<AgentConfig>) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let mut lease_tick = tokio::time::interval(LEASE_PERIOD);
    let mut status_tick = tokio::time::interval(STATUS_PERIOD);
    status_tick.tick().await;
    loop {
        tokio::select! {
            _ = lease_tick.tick() => {
                if let Err(e) = renew_lease(&leases, &nodes, &config).await {
                    tracing::warn!(error = %e, "cannot renew the node lease");
                }
            }
            _ = status_tick.tick() => {
                if let Err(e) = write_status(&nodes, &config).await {
                    tracing::warn!(error = %e, "cannot update the node status");
                }
            }
        }
    }
}

async fn renew_lease(
    leases: &Api<Lease>,
    nodes: &Api<Node>,
    config: &AgentConfig,
) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    let name = &config.node_name;
    match leases.get_opt(name).await? {
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.renew_time = Some(now);
            spec.holder_identity = Some(name.clone());
            spec.lease_duration_seconds = Some(LEASE_DURATION_SECONDS);
            leases.replace(name, &PostParams::default(), &lease).await?;
        }
        None => {
            // Like the kubelet, the Lease is owned by the Node so it goes
            // away with it.
            let uid = nodes.get(name).await?.metadata.uid;
            let owner = uid.map(|uid| {
                vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: name.clone(),
                        uid,
                        ..Default::default()
                    },
                ]
            });
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    owner_references: owner,
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.clone()),
                    lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
                    renew_time: Some(now),
                    ..LeaseSpec::default()
                }),
            };
            match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

async fn write_status(nodes: &Api<Node>, config: &AgentConfig) -> Result<(), kube::Error> {
    let status = status(config);
    nodes
        .patch_status(
            &config.node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
    Ok(())
}

fn labels(node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kubernetes.io/hostname".into(), node.into()),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), arch().into()),
        ("node-role.kubernetes.io/agent".into(), "true".into()),
    ])
}

/// The node's status as of now.
pub fn status(config: &AgentConfig) -> NodeStatus {
    let now = Time(Timestamp::now());
    let runtime_problem = crate::runtime::problem(&config.runtime);
    let ready = match &runtime_problem {
        None => condition(
            "Ready",
            "True",
            "KubeletReady",
            "skiff agent is posting ready status",
            &now,
        ),
        Some(problem) => condition(
            "Ready",
            "False",
            "KubeletNotReady",
            &format!("container runtime is not ready: {problem}"),
            &now,
        ),
    };
    let capacity = capacity(config);
    NodeStatus {
        capacity: Some(capacity.clone()),
        allocatable: Some(capacity),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: config.node_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: config.node_name.clone(),
            },
        ]),
        conditions: Some(vec![
            ready,
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "skiff agent has sufficient memory available",
                &now,
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "skiff agent has no disk pressure",
                &now,
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "skiff agent has sufficient PID available",
                &now,
            ),
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(config.kubelet_port),
            }),
        }),
        node_info: Some(system_info(config)),
        ..NodeStatus::default()
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: &str, now: &Time) -> NodeCondition {
    NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    }
}

fn capacity(config: &AgentConfig) -> BTreeMap<String, Quantity> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory_kib = meminfo_total_kib().unwrap_or(0);
    let storage = disk_bytes(&config.data_dir).unwrap_or(0);
    BTreeMap::from([
        ("cpu".into(), Quantity(cpus.to_string())),
        ("memory".into(), Quantity(format!("{memory_kib}Ki"))),
        ("pods".into(), Quantity(MAX_PODS.to_string())),
        ("ephemeral-storage".into(), Quantity(storage.to_string())),
        ("hugepages-2Mi".into(), Quantity("0".into())),
    ])
}

fn meminfo_total_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn disk_bytes(path: &std::path::Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some(stat.blocks().saturating_mul(stat.fragment_size()))
}

fn system_info(config: &AgentConfig) -> NodeSystemInfo {
    let uname = nix::sys::utsname::uname().ok();
    let kernel = uname
        .as_ref()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let os_image = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".into());
    NodeSystemInfo {
        architecture: arch().into(),
        boot_id: read("/proc/sys/kernel/random/boot_id"),
        container_runtime_version: crate::runtime::version(&config.runtime),
        kernel_version: kernel,
        kube_proxy_version: String::new(),
        kubelet_version: format!("v1.33.0-skiff+{}", env!("CARGO_PKG_VERSION")),
        machine_id: read("/etc/machine-id"),
        operating_system: "linux".into(),
        os_image,
        system_uuid: read("/sys/class/dmi/id/product_uuid"),
        ..NodeSystemInfo::default()
    }
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
