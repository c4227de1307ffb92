//! What the scheduler needs from a pod, extracted once when the pod is seen
//! (quantities parsed, selectors compiled) so that evaluating it against
//! thousands of nodes parses and allocates nothing.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Pod, PodAffinityTerm, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as ApiQuantity;

use super::quantity::Quantity;
use super::selector::{LabelMatcher, Labels, NodeSelector, NodeTerm, tolerated};

/// Upstream's requests assumed for scoring when a container sets none, so
/// that pods without requests still spread (`DefaultMilliCPURequest`,
/// `DefaultMemoryRequest`).
const DEFAULT_MILLI_CPU: i64 = 100;
const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// The taint `spec.unschedulable` stands for.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// Cpu in millicores and memory in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
}

impl Resources {
    pub fn add(&mut self, other: Resources) {
        self.milli_cpu = self.milli_cpu.saturating_add(other.milli_cpu);
        self.memory = self.memory.saturating_add(other.memory);
    }

    pub fn sub(&mut self, other: Resources) {
        self.milli_cpu = self.milli_cpu.saturating_sub(other.milli_cpu);
        self.memory = self.memory.saturating_sub(other.memory);
    }

    fn max(self, other: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.max(other.milli_cpu),
            memory: self.memory.max(other.memory),
        }
    }
}

/// A host port a pod binds: two conflict on the same protocol and port
/// when their IPs are equal or either is the wildcard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub port: i32,
    pub protocol: String,
    /// Empty for `0.0.0.0`.
    pub ip: String,
}

impl HostPort {
    pub fn conflicts(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip.is_empty() || other.ip.is_empty() || self.ip == other.ip)
    }
}

/// Which namespaces a pod affinity term looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    List(Vec<String>),
    All,
}

impl Namespaces {
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Namespaces::List(list) => list.iter().any(|n| n == namespace),
            Namespaces::All => true,
        }
    }
}

/// A required pod (anti-)affinity term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityTerm {
    pub selector: LabelMatcher,
    pub namespaces: Namespaces,
    pub topology_key: String,
}

impl AffinityTerm {
    /// Whether a pod in `namespace` with `labels` is one this term is about.
    pub fn selects(&self, namespace: &str, labels: &Labels) -> bool {
        self.namespaces.contains(namespace) && self.selector.matches(labels)
    }
}

#[derive(Debug, PartialEq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub priority: i32,
    /// What the pod needs from a node to fit.
    pub requests: Resources,
    /// `requests` with upstream's defaults for containers that set none:
    /// what scoring counts.
    pub nonzero: Resources,
    /// Requests of other resources (extended, ephemeral-storage).
    pub scalar: Vec<(String, i64)>,
    pub node_selector: Vec<(String, String)>,
    pub required: Option<NodeSelector>,
    pub preferred: Vec<(i64, NodeTerm)>,
    pub tolerations: Vec<Toleration>,
    pub tolerates_unschedulable: bool,
    pub host_ports: Vec<HostPort>,
    /// The controller owner's uid: pods of one owner are spread.
    pub owner: Option<Arc<str>>,
    pub labels: Labels,
    pub affinity: Vec<AffinityTerm>,
    pub anti_affinity: Vec<AffinityTerm>,
    /// The PersistentVolumeClaims its volumes name.
    pub claims: Vec<String>,
}

impl PodInfo {
    pub fn new(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let labels = meta.labels.clone().unwrap_or_default();
        let owner = meta
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))
            .map(|r| Arc::from(r.uid.as_str()));
        let name = meta.name.clone().unwrap_or_default();
        let mut info = PodInfo {
            uid: pod_uid(pod),
            namespace,
            name,
            priority: 0,
            requests: Resources::default(),
            nonzero: Resources::default(),
            scalar: Vec::new(),
            node_selector: Vec::new(),
            required: None,
            preferred: Vec::new(),
            tolerations: Vec::new(),
            tolerates_unschedulable: false,
            host_ports: Vec::new(),
            owner,
            labels,
            affinity: Vec::new(),
            anti_affinity: Vec::new(),
            claims: Vec::new(),
        };
        let Some(spec) = &pod.spec else {
            return info;
        };
        info.priority = spec.priority.unwrap_or(0);
        info.claims = spec
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
            .collect();
        info.requests_from(spec);
        info.node_selector = spec
            .node_selector
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        info.tolerations = spec.tolerations.clone().unwrap_or_default();
        let unschedulable = k8s_openapi::api::core::v1::Taint {
            key: UNSCHEDULABLE_TAINT.into(),
            effect: "NoSchedule".into(),
            value: None,
            time_added: None,
        };
        info.tolerates_unschedulable = tolerated(&info.tolerations, &unschedulable);
        let host_network = spec.host_network == Some(true);
        for port in spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
        {
            let host_port = match port.host_port {
                Some(p) if p > 0 => p,
                // Upstream defaulting: host networking binds the container port.
                _ if host_network => port.container_port,
                _ => continue,
            };
            let ip = port.host_ip.as_deref().unwrap_or_default();
            info.host_ports.push(HostPort {
                port: host_port,
                protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ip: if ip == "0.0.0.0" {
                    String::new()
                } else {
                    ip.to_owned()
                },
            });
        }
        if let Some(affinity) = &spec.affinity {
            if let Some(node) = &affinity.node_affinity {
                info.required = node
                    .required_during_scheduling_ignored_during_execution
                    .as_ref()
                    .map(|s| NodeSelector::new(&s.node_selector_terms));
                info.preferred = node
                    .preferred_during_scheduling_ignored_during_execution
                    .iter()
                    .flatten()
                    .filter(|p| p.weight != 0)
                    .map(|p| (i64::from(p.weight), NodeTerm::new(&p.preference)))
                    .collect();
            }
            if let Some(terms) = affinity.pod_affinity.as_ref().and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            }) {
                info.affinity = terms.iter().map(|t| info.term(t)).collect();
            }
            if let Some(terms) = affinity.pod_anti_affinity.as_ref().and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            }) {
                info.anti_affinity = terms.iter().map(|t| info.term(t)).collect();
            }
        }
        info
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Effective requests as upstream computes them: the sum of the app
    /// and sidecar containers, or the largest init container step if that
    /// is more, plus overhead; pod-level resources win where set.
    fn requests_from(&mut self, spec: &k8s_openapi::api::core::v1::PodSpec) {
        let mut sum = Resources::default();
        let mut nonzero = Resources::default();
        for c in &spec.containers {
            sum.add(container_requests(c, &mut self.scalar, true));
            nonzero.add(nonzero_requests(c));
        }
        let mut sidecars = Resources::default();
        let mut sidecars_nonzero = Resources::default();
        let mut init_peak = Resources::default();
        let mut init_peak_nonzero = Resources::default();
        for c in spec.init_containers.iter().flatten() {
            let r = container_requests(c, &mut Vec::new(), false);
            let nz = nonzero_requests(c);
            if c.restart_policy.as_deref() == Some("Always") {
                sidecars.add(r);
                sidecars_nonzero.add(nz);
                container_requests(c, &mut self.scalar, true);
            } else {
                let mut step = r;
                step.add(sidecars);
                init_peak = init_peak.max(step);
                let mut step = nz;
                step.add(sidecars_nonzero);
                init_peak_nonzero = init_peak_nonzero.max(step);
            }
        }
        sum.add(sidecars);
        nonzero.add(sidecars_nonzero);
        sum = sum.max(init_peak);
        nonzero = nonzero.max(init_peak_nonzero);
        if let Some(pod_level) = spec.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            if let Some(cpu) = pod_level.get("cpu").and_then(quantity) {
                sum.milli_cpu = cpu.milli();
                nonzero.milli_cpu = if sum.milli_cpu == 0 {
                    DEFAULT_MILLI_CPU
                } else {
                    sum.milli_cpu
                };
            }
            if let Some(memory) = pod_level.get("memory").and_then(quantity) {
                sum.memory = memory.value();
                nonzero.memory = if sum.memory == 0 {
                    DEFAULT_MEMORY
                } else {
                    sum.memory
                };
            }
        }
        if let Some(overhead) = &spec.overhead {
            let extra = Resources {
                milli_cpu: overhead
                    .get("cpu")
                    .and_then(quantity)
                    .map_or(0, |q| q.milli()),
                memory: overhead
                    .get("memory")
                    .and_then(quantity)
                    .map_or(0, |q| q.value()),
            };
            sum.add(extra);
            nonzero.add(extra);
        }
        self.requests = sum;
        self.nonzero = nonzero;
    }

    fn term(&self, term: &PodAffinityTerm) -> AffinityTerm {
        let namespaces = match (&term.namespaces, &term.namespace_selector) {
            (_, Some(_)) => Namespaces::All,
            (Some(list), None) if !list.is_empty() => Namespaces::List(list.clone()),
            _ => Namespaces::List(vec![self.namespace.clone()]),
        };
        AffinityTerm {
            selector: LabelMatcher::with_label_keys(
                term.label_selector.as_ref(),
                term.match_label_keys.as_deref().unwrap_or_default(),
                term.mismatch_label_keys.as_deref().unwrap_or_default(),
                &self.labels,
            ),
            namespaces,
            topology_key: term.topology_key.clone(),
        }
    }
}

/// A container's requests; `limits` stand in for missing requests, as the
/// API server's defaulting would have set them. Other resources are added
/// into `scalar` when `with_scalar`.
fn container_requests(
    c: &Container,
    scalar: &mut Vec<(String, i64)>,
    with_scalar: bool,
) -> Resources {
    let Some(resources) = &c.resources else {
        return Resources::default();
    };
    let get = |name: &str| -> Option<Quantity> {
        resources
            .requests
            .as_ref()
            .and_then(|r| r.get(name))
            .or_else(|| resources.limits.as_ref().and_then(|l| l.get(name)))
            .and_then(quantity)
    };
    if with_scalar {
        let requested = resources.requests.iter().flatten().map(|(n, _)| n);
        let limited = resources
            .limits
            .iter()
            .flatten()
            .map(|(n, _)| n)
            .filter(|n| {
                resources
                    .requests
                    .as_ref()
                    .is_none_or(|r| !r.contains_key(*n))
            });
        for name in requested.chain(limited) {
            if name == "cpu" || name == "memory" {
                continue;
            }
            let amount = get(name).map_or(0, |q| q.value());
            if amount <= 0 {
                continue;
            }
            match scalar.iter_mut().find(|(n, _)| n == name) {
                Some((_, total)) => *total = total.saturating_add(amount),
                None => scalar.push((name.clone(), amount)),
            }
        }
    }
    Resources {
        milli_cpu: get("cpu").map_or(0, |q| q.milli()),
        memory: get("memory").map_or(0, |q| q.value()),
    }
}

fn nonzero_requests(c: &Container) -> Resources {
    let r = container_requests(c, &mut Vec::new(), false);
    Resources {
        milli_cpu: if r.milli_cpu == 0 {
            DEFAULT_MILLI_CPU
        } else {
            r.milli_cpu
        },
        memory: if r.memory == 0 {
            DEFAULT_MEMORY
        } else {
            r.memory
        },
    }
}

/// The pod's identity across its watch events: its uid (its namespace and
/// name for an object without one).
pub fn pod_uid(pod: &Pod) -> String {
    let meta = &pod.metadata;
    match &meta.uid {
        Some(uid) if !uid.is_empty() => uid.clone(),
        _ => format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        ),
    }
}

fn quantity(q: &ApiQuantity) -> Option<Quantity> {
    Quantity::parse(&q.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(spec: serde_json::Value) -> PodInfo {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": spec
        }))
        .expect("pod");
        PodInfo::new(&pod)
    }

    #[test]
    fn requests_sum_containers_and_take_the_init_peak() {
        let pod = info(json!({
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
                {"name": "b", "resources": {"limits": {"cpu": "1", "memory": "1Gi", "example.com/gpu": "2"}}}
            ],
            "initContainers": [
                {"name": "i", "resources": {"requests": {"cpu": "2"}}},
                {"name": "s", "restartPolicy": "Always", "resources": {"requests": {"memory": "1Mi"}}}
            ],
            "overhead": {"cpu": "10m"}
        }));
        assert_eq!(pod.requests.milli_cpu, 2010);
        assert_eq!(pod.requests.memory, (64 << 20) + (1 << 30) + (1 << 20));
        assert_eq!(pod.scalar, vec![("example.com/gpu".to_owned(), 2)]);
    }

    #[test]
    fn nonzero_defaults_for_scoring() {
        let pod = info(
            json!({"containers": [{"name": "a"}, {"name": "b", "resources": {"requests": {"cpu": "1"}}}]}),
        );
        assert_eq!(
            pod.requests,
            Resources {
                milli_cpu: 1000,
                memory: 0
            }
        );
        assert_eq!(
            pod.nonzero,
            Resources {
                milli_cpu: 1100,
                memory: 2 * DEFAULT_MEMORY
            }
        );
    }

    #[test]
    fn host_ports_and_tolerations() {
        let pod = info(json!({
            "hostNetwork": true,
            "containers": [{"name": "a", "ports": [{"containerPort": 80}, {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "0.0.0.0"}]}],
            "tolerations": [{"key": UNSCHEDULABLE_TAINT, "operator": "Exists"}]
        }));
        assert_eq!(pod.host_ports.len(), 2);
        assert!(pod.host_ports[0].conflicts(&HostPort {
            port: 80,
            protocol: "TCP".into(),
            ip: "10.0.0.1".into()
        }));
        assert!(!pod.host_ports[1].conflicts(&HostPort {
            port: 5353,
            protocol: "TCP".into(),
            ip: String::new()
        }));
        assert!(pod.tolerates_unschedulable);
    }
}
