//! The service load balancer's status half, as k3s's ServiceLB does it:
//! every Service of type LoadBalancer is reachable on each node's address at
//! its nodePort (the data plane does that part), so its
//! `status.loadBalancer.ingress` lists the addresses of the Ready nodes.
//!
//! Services naming a `loadBalancerClass` belong to some other implementation
//! and are left alone; a Service that stops being a LoadBalancer loses the
//! ingress this controller gave it. The set of addresses changes with the
//! nodes, so a node event re-checks every LoadBalancer Service; a Service is
//! only written when its ingress differs from what it should be.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use serde_json::json;

/// Nodes carrying this label are not load balancer targets (upstream's
/// well-known label, honoured by cloud providers and k3s alike).
const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

pub async fn run(client: kube::Client) {
    let services: Api<Service> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let mut service_events = std::pin::pin!(
        watcher(services, watcher::Config::default())
            .default_backoff()
            .boxed()
    );
    let mut node_events = std::pin::pin!(
        watcher(nodes, watcher::Config::default())
            .default_backoff()
            .boxed()
    );
    let mut state = State::default();
    let mut relisted_nodes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut relisted_services: BTreeMap<Key, Service> = BTreeMap::new();
    loop {
        tokio::select! {
            event = node_events.next() => {
                let Some(event) = event else { return };
                let changed = match event {
                    Ok(watcher::Event::Init) => {
                        relisted_nodes.clear();
                        false
                    }
                    Ok(watcher::Event::InitApply(node)) => {
                        let (name, addresses) = node_entry(&node);
                        relisted_nodes.insert(name, addresses);
                        false
                    }
                    Ok(watcher::Event::InitDone) => {
                        state.nodes = std::mem::take(&mut relisted_nodes);
                        state.nodes_synced = true;
                        true
                    }
                    Ok(watcher::Event::Apply(node)) => {
                        let (name, addresses) = node_entry(&node);
                        state.nodes.insert(name, addresses.clone()) != Some(addresses)
                    }
                    Ok(watcher::Event::Delete(node)) => {
                        let name = node.metadata.name.unwrap_or_default();
                        state.nodes.remove(&name).is_some()
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "node watch error in the service load balancer");
                        false
                    }
                };
                if changed {
                    state.sync_all(&client).await;
                }
            }
            event = service_events.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Init) => relisted_services.clear(),
                    Ok(watcher::Event::InitApply(service)) => {
                        relisted_services.insert(key(&service), service);
                    }
                    Ok(watcher::Event::InitDone) => {
                        state.services = std::mem::take(&mut relisted_services);
                        state.sync_all(&client).await;
                    }
                    Ok(watcher::Event::Apply(service)) => {
                        let k = key(&service);
                        state.sync(&client, &service).await;
                        state.services.insert(k, service);
                    }
                    Ok(watcher::Event::Delete(service)) => {
                        state.services.remove(&key(&service));
                    }
                    Err(e) => tracing::debug!(error = %e, "service watch error in the service load balancer"),
                }
            }
        }
    }
}

/// Namespace and name.
type Key = (String, String);

#[derive(Default)]
struct State {
    /// Every node's load balancer addresses; empty for nodes that are not
    /// Ready or are excluded.
    nodes: BTreeMap<String, Vec<String>>,
    /// Until the first node list, the address set is unknown: writing an
    /// empty one then would flap every Service's status on a restart.
    nodes_synced: bool,
    services: BTreeMap<Key, Service>,
}

impl State {
    async fn sync_all(&self, client: &kube::Client) {
        for service in self.services.values() {
            self.sync(client, service).await;
        }
    }

    /// Writes the ingress `service` should have, if it has another.
    async fn sync(&self, client: &kube::Client, service: &Service) {
        if !self.nodes_synced || service.metadata.deletion_timestamp.is_some() {
            return;
        }
        let spec = service.spec.as_ref();
        let current = current_ingress(service);
        let wanted = match spec.and_then(|s| s.type_.as_deref()) {
            Some("LoadBalancer") if spec.and_then(|s| s.load_balancer_class.as_ref()).is_none() => {
                self.addresses()
            }
            // Not ours to clear when another implementation owns it.
            Some("LoadBalancer") => return,
            _ if current.is_empty() => return,
            _ => Vec::new(),
        };
        if wanted == current {
            return;
        }
        let (namespace, name) = key(service);
        let ingress = if wanted.is_empty() {
            serde_json::Value::Null
        } else {
            wanted
                .iter()
                .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
                .collect()
        };
        let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
        let api: Api<Service> = Api::namespaced(client.clone(), &namespace);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(%namespace, %name, ingress = ?wanted, "load balancer status set")
            }
            // The next event for this Service or any node retries it.
            Err(e) => {
                tracing::warn!(%namespace, %name, error = %e, "could not set the load balancer status")
            }
        }
    }

    /// The ingress addresses: every Ready node's, sorted and deduplicated so
    /// that comparisons with the stored status are stable.
    fn addresses(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.nodes.values().flatten().collect();
        set.into_iter().cloned().collect()
    }
}

/// A node's name and the addresses it contributes: its ExternalIPs when it
/// has any, else its InternalIPs (k3s's choice), and none unless it is Ready.
fn node_entry(node: &Node) -> (String, Vec<String>) {
    let name = node.metadata.name.clone().unwrap_or_default();
    let excluded = node
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(EXCLUDE_LABEL));
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if excluded || !ready || node.metadata.deletion_timestamp.is_some() {
        return (name, Vec::new());
    }
    let addresses = status.and_then(|s| s.addresses.as_deref()).unwrap_or(&[]);
    let of_type = |kind: &str| -> Vec<String> {
        addresses
            .iter()
            .filter(|a| a.type_ == kind)
            .filter(|a| a.address.parse::<std::net::IpAddr>().is_ok())
            .map(|a| a.address.clone())
            .collect()
    };
    let external = of_type("ExternalIP");
    let chosen = if external.is_empty() {
        of_type("InternalIP")
    } else {
        external
    };
    (name, chosen)
}

fn current_ingress(service: &Service) -> Vec<String> {
    let mut ips: Vec<String> = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ingress| ingress.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default();
    ips.sort();
    ips.dedup();
    ips
}

fn key(service: &Service) -> Key {
    (
        service.metadata.namespace.clone().unwrap_or_default(),
        service.metadata.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ready: &str, addresses: &[(&str, &str)], labels: &[&str]) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": labels.iter().map(|l| (l.to_string(), "")).collect::<BTreeMap<_, _>>()},
            "status": {
                "conditions": [{"type": "Ready", "status": ready}],
                "addresses": addresses.iter().map(|(t, a)| json!({"type": t, "address": a})).collect::<Vec<_>>(),
            },
        }))
        .expect("a valid node")
    }

    #[test]
    fn ready_nodes_offer_external_before_internal_addresses() {
        let internal = node(
            "True",
            &[("InternalIP", "10.0.0.1"), ("Hostname", "n")],
            &[],
        );
        assert_eq!(node_entry(&internal).1, vec!["10.0.0.1"]);
        let both = node(
            "True",
            &[("InternalIP", "10.0.0.1"), ("ExternalIP", "203.0.113.1")],
            &[],
        );
        assert_eq!(node_entry(&both).1, vec!["203.0.113.1"]);
        let not_ready = node("Unknown", &[("InternalIP", "10.0.0.1")], &[]);
        assert!(node_entry(&not_ready).1.is_empty());
        let excluded = node("True", &[("InternalIP", "10.0.0.1")], &[EXCLUDE_LABEL]);
        assert!(node_entry(&excluded).1.is_empty());
    }

    #[test]
    fn addresses_are_sorted_and_unique() {
        let mut state = State::default();
        state.nodes.insert("b".into(), vec!["10.0.0.2".into()]);
        state
            .nodes
            .insert("a".into(), vec!["10.0.0.9".into(), "10.0.0.2".into()]);
        state.nodes.insert("c".into(), Vec::new());
        assert_eq!(state.addresses(), vec!["10.0.0.2", "10.0.0.9"]);
    }
}
