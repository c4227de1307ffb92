//! The scheduler's picture of the cluster, kept from its watches and its
//! own binds: every node's allocatable resources, labels and taints, and
//! what the pods bound to it already take. Nodes live in slots indexed by
//! number so that the hot loop walks a `Vec`; a slot stays (without a
//! node) while pods are bound to a name that has no Node object.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Taint};

use super::pod::{HostPort, PodInfo, Resources};
use super::quantity::Quantity;
use super::selector::Labels;

/// A node as the filters see it.
#[derive(Debug, PartialEq)]
pub struct NodeInfo {
    pub labels: Labels,
    /// `NoSchedule` and `NoExecute` taints: a pod must tolerate them.
    pub taints: Vec<Taint>,
    /// `PreferNoSchedule` taints: untolerated ones lower the score.
    pub soft_taints: Vec<Taint>,
    pub unschedulable: bool,
    pub allocatable: Resources,
    pub allowed_pods: i64,
    pub scalar: Vec<(String, i64)>,
}

impl NodeInfo {
    /// The node's name and what the scheduler keeps of it.
    pub fn new(node: Node) -> (String, NodeInfo) {
        let name = node.metadata.name.unwrap_or_default();
        let labels = node.metadata.labels.unwrap_or_default();
        let spec = node.spec.unwrap_or_default();
        let (taints, soft_taints) = spec
            .taints
            .unwrap_or_default()
            .into_iter()
            .partition(|t| t.effect != "PreferNoSchedule");
        let status = node.status.unwrap_or_default();
        // Allocatable is what pods may use; capacity stands in for it when
        // a node reports only that.
        let resources = status.allocatable.or(status.capacity).unwrap_or_default();
        let get = |name: &str| resources.get(name).and_then(|q| Quantity::parse(&q.0));
        let info = NodeInfo {
            labels,
            taints,
            soft_taints,
            unschedulable: spec.unschedulable == Some(true),
            allocatable: Resources {
                milli_cpu: get("cpu").map_or(0, |q| q.milli()),
                memory: get("memory").map_or(0, |q| q.value()),
            },
            allowed_pods: get("pods").map_or(0, |q| q.value()),
            scalar: resources
                .iter()
                .filter(|(n, _)| !matches!(n.as_str(), "cpu" | "memory" | "pods"))
                .filter_map(|(n, q)| Some((n.clone(), Quantity::parse(&q.0)?.value())))
                .collect(),
        };
        (name, info)
    }

    pub fn scalar(&self, name: &str) -> i64 {
        self.scalar
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }
}

/// One node name: the node if it exists and what is bound to it.
#[derive(Debug)]
pub struct Slot {
    pub name: String,
    pub node: Option<NodeInfo>,
    pub requested: Resources,
    pub nonzero: Resources,
    pub pods: i64,
    pub scalar: Vec<(String, i64)>,
    /// Host ports in use, one entry per pod port.
    pub ports: Vec<HostPort>,
    /// Index in `Cache::present`, while the node exists.
    position: Option<usize>,
}

impl Slot {
    pub fn scalar_used(&self, name: &str) -> i64 {
        self.scalar
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }
}

/// A pod bound (or assumed bound, its bind in flight) to a slot.
#[derive(Debug)]
pub struct Bound {
    pub slot: u32,
    pub info: Arc<PodInfo>,
    /// Bound by this scheduler and not yet seen bound in the watch.
    pub assumed: bool,
}

/// How a node update changed what scheduling sees.
#[derive(Debug, PartialEq, Eq)]
pub enum NodeChange {
    Added,
    Changed,
    Unchanged,
}

#[derive(Default)]
pub struct Cache {
    pub slots: Vec<Slot>,
    by_name: HashMap<String, u32>,
    /// Slots whose node exists, in the order scheduling walks them.
    pub present: Vec<u32>,
    bound: HashMap<String, Bound>,
    /// Per controller owner: how many of its pods each slot holds.
    owners: HashMap<Arc<str>, HashMap<u32, u32>>,
    /// Bound pods with required anti-affinity terms (their uids): every
    /// incoming pod is checked against them.
    pub with_anti_affinity: HashSet<String>,
}

impl Cache {
    pub fn upsert_node(&mut self, node: Node) -> NodeChange {
        let (name, info) = NodeInfo::new(node);
        let index = self.slot_for(&name);
        let slot = &mut self.slots[index as usize];
        let change = match &slot.node {
            None => NodeChange::Added,
            Some(old) if *old == info => NodeChange::Unchanged,
            Some(_) => NodeChange::Changed,
        };
        slot.node = Some(info);
        if slot.position.is_none() {
            slot.position = Some(self.present.len());
            self.present.push(index);
        }
        change
    }

    pub fn remove_node(&mut self, name: &str) {
        let Some(&index) = self.by_name.get(name) else {
            return;
        };
        let slot = &mut self.slots[index as usize];
        slot.node = None;
        if let Some(position) = slot.position.take() {
            self.present.swap_remove(position);
            if let Some(&moved) = self.present.get(position) {
                self.slots[moved as usize].position = Some(position);
            }
        }
    }

    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.present
            .iter()
            .map(|&i| self.slots[i as usize].name.as_str())
    }

    pub fn slot_name(&self, slot: u32) -> &str {
        &self.slots[slot as usize].name
    }

    pub fn bound(&self, uid: &str) -> Option<&Bound> {
        self.bound.get(uid)
    }

    pub fn bound_pods(&self) -> impl Iterator<Item = &Bound> {
        self.bound.values()
    }

    pub fn bound_uids(&self) -> impl Iterator<Item = &String> {
        self.bound.keys()
    }

    /// Accounts `info` on `node`, replacing what was there for its uid.
    pub fn add_pod(&mut self, info: Arc<PodInfo>, node: &str, assumed: bool) {
        let slot = self.slot_for(node);
        if let Some(old) = self.bound.get_mut(&info.uid)
            && old.slot == slot
            && old.info == info
        {
            old.assumed &= assumed;
            return;
        }
        self.remove_pod(&info.uid);
        let s = &mut self.slots[slot as usize];
        s.requested.add(info.requests);
        s.nonzero.add(info.nonzero);
        s.pods += 1;
        for (name, amount) in &info.scalar {
            match s.scalar.iter_mut().find(|(n, _)| n == name) {
                Some((_, used)) => *used = used.saturating_add(*amount),
                None => s.scalar.push((name.clone(), *amount)),
            }
        }
        s.ports.extend(info.host_ports.iter().cloned());
        if let Some(owner) = &info.owner {
            *self
                .owners
                .entry(owner.clone())
                .or_default()
                .entry(slot)
                .or_default() += 1;
        }
        if !info.anti_affinity.is_empty() {
            self.with_anti_affinity.insert(info.uid.clone());
        }
        self.bound.insert(
            info.uid.clone(),
            Bound {
                slot,
                info,
                assumed,
            },
        );
    }

    /// Marks an assumed pod as seen bound.
    pub fn confirm(&mut self, uid: &str) {
        if let Some(b) = self.bound.get_mut(uid) {
            b.assumed = false;
        }
    }

    /// Releases what the pod took; returns it if it was there.
    pub fn remove_pod(&mut self, uid: &str) -> Option<Bound> {
        let bound = self.bound.remove(uid)?;
        let info = &bound.info;
        let s = &mut self.slots[bound.slot as usize];
        s.requested.sub(info.requests);
        s.nonzero.sub(info.nonzero);
        s.pods -= 1;
        for (name, amount) in &info.scalar {
            if let Some((_, used)) = s.scalar.iter_mut().find(|(n, _)| n == name) {
                *used = used.saturating_sub(*amount);
            }
        }
        for port in &info.host_ports {
            if let Some(i) = s.ports.iter().position(|p| p == port) {
                s.ports.swap_remove(i);
            }
        }
        if let Some(owner) = &info.owner
            && let Some(counts) = self.owners.get_mut(owner)
        {
            if let Some(n) = counts.get_mut(&bound.slot) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&bound.slot);
                }
            }
            if counts.is_empty() {
                self.owners.remove(owner);
            }
        }
        self.with_anti_affinity.remove(uid);
        Some(bound)
    }

    /// Per slot, how many pods of `owner` it holds.
    pub fn owner_counts(&self, owner: Option<&Arc<str>>) -> Option<&HashMap<u32, u32>> {
        self.owners.get(owner?)
    }

    fn slot_for(&mut self, name: &str) -> u32 {
        if let Some(&index) = self.by_name.get(name) {
            return index;
        }
        let index = self.slots.len() as u32;
        self.slots.push(Slot {
            name: name.to_owned(),
            node: None,
            requested: Resources::default(),
            nonzero: Resources::default(),
            pods: 0,
            scalar: Vec::new(),
            ports: Vec::new(),
            position: None,
        });
        self.by_name.insert(name.to_owned(), index);
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    fn node(name: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}}
        }))
        .expect("node")
    }

    fn pod(uid: &str) -> Arc<PodInfo> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": uid, "namespace": "ns", "uid": uid,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs1", "controller": true}]},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}],
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}]}
        }))
        .expect("pod");
        Arc::new(PodInfo::new(&pod))
    }

    #[test]
    fn accounts_pods_and_survives_node_churn() {
        let mut cache = Cache::default();
        assert_eq!(cache.upsert_node(node("a")), NodeChange::Added);
        assert_eq!(cache.upsert_node(node("b")), NodeChange::Added);
        assert_eq!(cache.upsert_node(node("a")), NodeChange::Unchanged);
        cache.add_pod(pod("p1"), "a", true);
        cache.add_pod(pod("p2"), "a", false);
        let a = &cache.slots[0];
        assert_eq!(
            a.requested,
            Resources {
                milli_cpu: 1000,
                memory: 2 << 30
            }
        );
        assert_eq!((a.pods, a.ports.len()), (2, 2));
        assert_eq!(
            cache
                .owner_counts(pod("p1").owner.as_ref())
                .and_then(|c| c.get(&0)),
            Some(&2)
        );

        cache.remove_node("a");
        assert_eq!(cache.node_names().collect::<Vec<_>>(), ["b"]);
        assert!(cache.remove_pod("p1").is_some());
        assert!(cache.remove_pod("p1").is_none());
        assert_eq!(cache.upsert_node(node("a")), NodeChange::Added);
        let a = &cache.slots[0];
        assert_eq!((a.pods, a.requested.milli_cpu, a.ports.len()), (1, 500, 1));
        cache.remove_pod("p2");
        assert!(cache.owner_counts(pod("p1").owner.as_ref()).is_none());
    }
}
