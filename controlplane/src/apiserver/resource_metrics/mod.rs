//! The resource metrics API (`metrics.k8s.io/v1beta1`), served by the API
//! server itself as k3s bundles metrics-server: every `--metric-resolution`
//! the [`collect`] task scrapes each node agent's `/metrics/resource`, turns
//! cumulative CPU seconds into a rate over the interval, and swaps in a new
//! [`Snapshot`]. `kubectl top` and the HorizontalPodAutoscaler read it.

pub mod collect;
pub mod text;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::response::Response;
use http::StatusCode;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::selectors::LabelSelector;
use super::status::ApiError;

pub const GROUP: &str = "metrics.k8s.io";
pub const VERSION: &str = "v1beta1";

/// The latest usage the collector worked out.
#[derive(Default)]
pub struct ResourceMetrics {
    snapshot: RwLock<Arc<Snapshot>>,
}

#[derive(Default)]
pub struct Snapshot {
    pub nodes: BTreeMap<String, Usage>,
    /// By (namespace, name).
    pub pods: BTreeMap<(String, String), PodUsage>,
}

/// CPU in nanocores and memory in bytes, measured over `window_seconds`
/// ending at `timestamp`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub timestamp: Timestamp,
    pub window_seconds: f64,
    pub cpu_nanocores: u64,
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodUsage {
    pub labels: BTreeMap<String, String>,
    pub timestamp: Timestamp,
    pub window_seconds: f64,
    /// (container name, usage), in the order the agent listed them.
    pub containers: Vec<(String, Usage)>,
}

impl ResourceMetrics {
    pub fn replace(&self, snapshot: Snapshot) {
        let mut slot = self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Arc::new(snapshot);
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Answers a GET under `/apis/metrics.k8s.io`.
pub fn serve(
    metrics: &ResourceMetrics,
    path: &str,
    label_selector: Option<&str>,
) -> Result<Response, ApiError> {
    let selector = label_selector
        .map(|s| LabelSelector::parse(s).map_err(|e| ApiError::bad_request(e.to_string())))
        .transpose()?;
    let matches =
        |labels: &BTreeMap<String, String>| selector.as_ref().is_none_or(|s| s.matches_map(labels));
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let snapshot = metrics.snapshot();
    let value = match segments.as_slice() {
        ["apis", GROUP] => super::discovery::api_group(GROUP, VERSION),
        ["apis", GROUP, VERSION] => resource_list(),
        ["apis", GROUP, VERSION, "nodes"] => list(
            "NodeMetricsList",
            snapshot.nodes.iter().map(|(name, u)| node_metrics(name, u)),
        ),
        ["apis", GROUP, VERSION, "nodes", name] => match snapshot.nodes.get(*name) {
            Some(u) => node_metrics(name, u),
            None => return Err(not_found("nodes", name)),
        },
        ["apis", GROUP, VERSION, "pods"] => list(
            "PodMetricsList",
            snapshot
                .pods
                .iter()
                .filter(|(_, p)| matches(&p.labels))
                .map(|((ns, name), p)| pod_metrics(ns, name, p)),
        ),
        ["apis", GROUP, VERSION, "namespaces", ns, "pods"] => list(
            "PodMetricsList",
            snapshot
                .pods
                .iter()
                .filter(|((pod_ns, _), p)| pod_ns == ns && matches(&p.labels))
                .map(|((ns, name), p)| pod_metrics(ns, name, p)),
        ),
        ["apis", GROUP, VERSION, "namespaces", ns, "pods", name] => {
            match snapshot.pods.get(&((*ns).to_owned(), (*name).to_owned())) {
                Some(p) => pod_metrics(ns, name, p),
                None => return Err(not_found("pods", name)),
            }
        }
        _ => return Err(ApiError::no_route(path)),
    };
    Ok(super::json_response(StatusCode::OK, &value))
}

fn resource_list() -> Value {
    let resource = |name: &str, kind: &str, namespaced: bool| {
        json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
            "verbs": ["get", "list"]})
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [resource("nodes", "NodeMetrics", false), resource("pods", "PodMetrics", true)],
    })
}

/// The aggregated-discovery entry for this group.
pub fn aggregated_group() -> Value {
    let resource = |name: &str, kind: &str, scope: &str| {
        json!({"resource": name, "responseKind": {"group": GROUP, "version": VERSION, "kind": kind},
            "scope": scope, "singularResource": "", "verbs": ["get", "list"]})
    };
    json!({
        "metadata": {"name": GROUP, "creationTimestamp": null},
        "versions": [{"version": VERSION, "freshness": "Current", "resources": [
            resource("nodes", "NodeMetrics", "Cluster"),
            resource("pods", "PodMetrics", "Namespaced"),
        ]}],
    })
}

fn list(kind: &str, items: impl Iterator<Item = Value>) -> Value {
    json!({
        "kind": kind,
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {},
        "items": items.collect::<Vec<_>>(),
    })
}

fn node_metrics(name: &str, usage: &Usage) -> Value {
    json!({
        "kind": "NodeMetrics",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {"name": name, "creationTimestamp": Timestamp::now().to_string()},
        "timestamp": usage.timestamp.to_string(),
        "window": window(usage.window_seconds),
        "usage": usage_value(usage),
    })
}

fn pod_metrics(namespace: &str, name: &str, pod: &PodUsage) -> Value {
    let containers: Vec<Value> = pod
        .containers
        .iter()
        .map(|(name, usage)| json!({"name": name, "usage": usage_value(usage)}))
        .collect();
    json!({
        "kind": "PodMetrics",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {"name": name, "namespace": namespace, "labels": pod.labels,
            "creationTimestamp": Timestamp::now().to_string()},
        "timestamp": pod.timestamp.to_string(),
        "window": window(pod.window_seconds),
        "containers": containers,
    })
}

/// Quantities as metrics-server writes them: nanocores and kibibytes.
fn usage_value(usage: &Usage) -> Value {
    json!({
        "cpu": format!("{}n", usage.cpu_nanocores),
        "memory": format!("{}Ki", usage.memory_bytes / 1024),
    })
}

fn window(seconds: f64) -> String {
    format!("{}s", seconds.round().max(0.0) as u64)
}

fn not_found(resource: &str, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{resource}.{GROUP} \"{name}\" not found"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> ResourceMetrics {
        let metrics = ResourceMetrics::default();
        let usage = |cpu, mem| Usage {
            timestamp: Timestamp::UNIX_EPOCH,
            window_seconds: 15.0,
            cpu_nanocores: cpu,
            memory_bytes: mem,
        };
        let mut snapshot = Snapshot::default();
        snapshot
            .nodes
            .insert("n1".into(), usage(500_000_000, 1 << 30));
        for (name, app) in [("web-1", "web"), ("db-1", "db")] {
            snapshot.pods.insert(
                ("default".into(), name.into()),
                PodUsage {
                    labels: [("app".to_owned(), app.to_owned())].into(),
                    timestamp: Timestamp::UNIX_EPOCH,
                    window_seconds: 15.0,
                    containers: vec![("main".into(), usage(25_000_000, 20 << 20))],
                },
            );
        }
        metrics.replace(snapshot);
        metrics
    }

    async fn body(response: Response) -> Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[tokio::test]
    async fn serves_node_and_pod_metrics_with_selectors() {
        let metrics = snapshot();
        let nodes =
            body(serve(&metrics, "/apis/metrics.k8s.io/v1beta1/nodes", None).unwrap()).await;
        assert_eq!(nodes["items"][0]["metadata"]["name"], "n1");
        assert_eq!(nodes["items"][0]["usage"]["cpu"], "500000000n");
        assert_eq!(nodes["items"][0]["usage"]["memory"], "1048576Ki");
        let pods = body(
            serve(
                &metrics,
                "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods",
                Some("app=web"),
            )
            .unwrap(),
        )
        .await;
        let items = pods["items"].as_array().expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "web-1");
        assert_eq!(items[0]["containers"][0]["usage"]["cpu"], "25000000n");
        assert_eq!(items[0]["window"], "15s");
        let missing = serve(&metrics, "/apis/metrics.k8s.io/v1beta1/nodes/n9", None);
        assert!(missing.is_err());
        assert!(
            serve(
                &metrics,
                "/apis/metrics.k8s.io/v1beta1/pods",
                Some("app in (")
            )
            .is_err()
        );
    }
}
