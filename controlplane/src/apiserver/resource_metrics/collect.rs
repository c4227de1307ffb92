//! Scrapes every node agent's `/metrics/resource` once per resolution and
//! turns the cumulative CPU counters into usage over the interval, as
//! metrics-server does. A node that does not answer keeps no entry: stale
//! usage would mislead the autoscaler more than none.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};

use super::text::{self, Scrape};
use super::{PodUsage, ResourceMetrics, Snapshot, Usage};
use crate::apiserver::proxy::{self, KubeletClient};

/// The largest `/metrics/resource` body read.
const BODY_LIMIT: usize = 8 << 20;
const PATH: &str = "/metrics/resource";

/// One node's previous scrape, to take rates against.
struct Previous {
    at: Instant,
    scrape: Scrape,
}

/// Runs until the process ends.
pub async fn run(
    client: kube::Client,
    kubelet: KubeletClient,
    metrics: Arc<ResourceMetrics>,
    resolution: Duration,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client);
    let mut previous: HashMap<String, Previous> = HashMap::new();
    let mut tick = tokio::time::interval(resolution);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let everything = ListParams::default();
        let (node_list, pod_list) =
            match tokio::join!(nodes.list(&everything), pods.list(&everything)) {
                (Ok(n), Ok(p)) => (n.items, p.items),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(error = %e, "resource metrics: listing nodes and pods");
                    continue;
                }
            };
        let labels: HashMap<(String, String), BTreeMap<String, String>> = pod_list
            .into_iter()
            .map(|p| {
                let key = (
                    p.metadata.namespace.unwrap_or_default(),
                    p.metadata.name.unwrap_or_default(),
                );
                (key, p.metadata.labels.unwrap_or_default())
            })
            .collect();
        let scrapes = join_all(node_list.into_iter().map(|node| {
            let kubelet = kubelet.clone();
            async move {
                let name = node.metadata.name.clone().unwrap_or_default();
                let result = proxy::agent_get(&kubelet, node, PATH, BODY_LIMIT).await;
                (name, Instant::now(), result)
            }
        }))
        .await;
        let now = Timestamp::now();
        let mut snapshot = Snapshot::default();
        let mut next = HashMap::new();
        for (node, at, result) in scrapes {
            let body = match result {
                Ok(body) => body,
                Err(e) => {
                    tracing::debug!(%node, error = %e, "resource metrics: scrape failed");
                    continue;
                }
            };
            let scrape = text::parse(&String::from_utf8_lossy(&body));
            if let Some(before) = previous.get(&node) {
                let window = at.duration_since(before.at).as_secs_f64();
                if window > 0.0 {
                    add_usage(
                        &mut snapshot,
                        &node,
                        &before.scrape,
                        &scrape,
                        window,
                        now,
                        &labels,
                    );
                }
            }
            next.insert(node, Previous { at, scrape });
        }
        previous = next;
        metrics.replace(snapshot);
    }
}

/// Adds the usage between two scrapes of `node` to the snapshot.
fn add_usage(
    snapshot: &mut Snapshot,
    node: &str,
    before: &Scrape,
    after: &Scrape,
    window: f64,
    now: Timestamp,
    labels: &HashMap<(String, String), BTreeMap<String, String>>,
) {
    let usage = |cpu_before: Option<f64>, cpu_after: Option<f64>, memory: Option<f64>| {
        let (Some(a), Some(b), Some(memory)) = (cpu_before, cpu_after, memory) else {
            return None;
        };
        // A restarted container's counter starts over: no rate this time.
        (b >= a).then(|| Usage {
            timestamp: now,
            window_seconds: window,
            cpu_nanocores: ((b - a) / window * 1e9) as u64,
            memory_bytes: memory.max(0.0) as u64,
        })
    };
    if let Some(u) = usage(
        before.node_cpu_seconds,
        after.node_cpu_seconds,
        after.node_memory_bytes,
    ) {
        snapshot.nodes.insert(node.to_owned(), u);
    }
    let mut keys: Vec<_> = after.containers.keys().collect();
    keys.sort();
    for key in keys {
        let (ns, pod, container) = key;
        let sample = &after.containers[key];
        let Some(u) = usage(
            before.containers.get(key).and_then(|s| s.cpu_seconds),
            sample.cpu_seconds,
            sample.memory_bytes,
        ) else {
            continue;
        };
        let pod_key = (ns.clone(), pod.clone());
        // Pods the API no longer knows are not reported.
        let Some(pod_labels) = labels.get(&pod_key) else {
            continue;
        };
        let entry = snapshot.pods.entry(pod_key).or_insert_with(|| PodUsage {
            labels: pod_labels.clone(),
            timestamp: now,
            window_seconds: window,
            containers: Vec::new(),
        });
        entry.containers.push((container.clone(), u));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_the_rate_between_scrapes() {
        let before = text::parse(
            "container_cpu_usage_seconds_total{container=\"c\",namespace=\"ns\",pod=\"p\"} 10\n\
             container_memory_working_set_bytes{container=\"c\",namespace=\"ns\",pod=\"p\"} 100\n\
             container_cpu_usage_seconds_total{container=\"c\",namespace=\"ns\",pod=\"gone\"} 1\n\
             node_cpu_usage_seconds_total 100\nnode_memory_working_set_bytes 5000\n",
        );
        let after = text::parse(
            "container_cpu_usage_seconds_total{container=\"c\",namespace=\"ns\",pod=\"p\"} 13\n\
             container_memory_working_set_bytes{container=\"c\",namespace=\"ns\",pod=\"p\"} 200\n\
             container_cpu_usage_seconds_total{container=\"c\",namespace=\"ns\",pod=\"gone\"} 2\n\
             container_memory_working_set_bytes{container=\"c\",namespace=\"ns\",pod=\"gone\"} 1\n\
             node_cpu_usage_seconds_total 115\nnode_memory_working_set_bytes 6000\n",
        );
        let labels = [(("ns".to_owned(), "p".to_owned()), BTreeMap::new())].into();
        let mut snapshot = Snapshot::default();
        add_usage(
            &mut snapshot,
            "n1",
            &before,
            &after,
            15.0,
            Timestamp::UNIX_EPOCH,
            &labels,
        );
        assert_eq!(snapshot.nodes["n1"].cpu_nanocores, 1_000_000_000);
        assert_eq!(snapshot.nodes["n1"].memory_bytes, 6000);
        let pod = &snapshot.pods[&("ns".to_owned(), "p".to_owned())];
        assert_eq!(pod.containers[0].1.cpu_nanocores, 200_000_000);
        assert_eq!(pod.containers[0].1.memory_bytes, 200);
        assert_eq!(
            snapshot.pods.len(),
            1,
            "pods the API does not know are left out"
        );
    }
}
