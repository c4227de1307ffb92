//! One scheduling decision: filter nodes, score the feasible ones, pick
//! the best. The filters and scores are upstream's default plugins, in
//! their order and with their weights and messages; they read the cache
//! and the pod's precompiled requirements and allocate nothing per node.
//!
//! As upstream does, a cluster with many nodes is not searched whole: the
//! walk starts where the last one stopped and ends once enough feasible
//! nodes are found (`percentageOfNodesToScore`'s adaptive default).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::cache::{Cache, Slot};
use super::pod::PodInfo;
use super::selector::{NodeSelector, tolerated};

/// Below this many nodes, all are searched.
const MIN_FEASIBLE_TO_FIND: usize = 100;
/// The adaptive percentage never drops below this.
const MIN_PERCENT_TO_FIND: usize = 5;

/// Score weights of upstream's default plugins.
const WEIGHT_TAINT: i64 = 3;
const WEIGHT_NODE_AFFINITY: i64 = 2;
const WEIGHT_SPREAD: i64 = 2;
const WEIGHT_FIT: i64 = 1;
const WEIGHT_BALANCED: i64 = 1;
const MAX_SCORE: i64 = 100;

/// Why a node does not fit, first failing filter first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfit {
    Unschedulable,
    /// The index of the first untolerated taint of the node.
    Taint(u16),
    NodeAffinity,
    Ports,
    Resources {
        pods: bool,
        cpu: bool,
        memory: bool,
        /// Index in the pod's `scalar` of a resource short, if any.
        scalar: Option<u16>,
    },
    PodAffinity,
    PodAntiAffinity,
    ExistingAntiAffinity,
    VolumeNodeAffinity,
}

/// Topology domains (label key → values) worked out once per pod from the
/// pods already bound, for pod (anti-)affinity.
#[derive(Default)]
struct Topology {
    /// Domains holding pods the pod's required affinity selects.
    affinity: HashMap<String, HashSet<String>>,
    /// No pod matches the affinity terms anywhere but the pod matches them
    /// itself: the first of a group may go anywhere.
    affinity_open: bool,
    /// Domains holding pods the pod's anti-affinity selects.
    anti: HashMap<String, HashSet<String>>,
    /// Domains where an existing pod's anti-affinity selects this pod.
    existing: HashMap<String, HashSet<String>>,
}

/// The outcome of one attempt.
pub enum Decision {
    Node(u32),
    /// Fits nowhere; the FailedScheduling message.
    Unschedulable(String),
}

/// Scheduling state that lives across attempts: where the next walk
/// starts, the random state for ties, and reused buffers.
pub struct Algorithm {
    next_start: usize,
    rng: u64,
    feasible: Vec<u32>,
    unfit: Vec<(u32, Unfit)>,
    scores: Vec<Scored>,
}

struct Scored {
    slot: u32,
    base: i64,
    owned: i64,
    preferred: i64,
    soft_taints: i64,
}

impl Default for Algorithm {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        Algorithm {
            next_start: 0,
            rng: seed | 1,
            feasible: Vec::new(),
            unfit: Vec::new(),
            scores: Vec::new(),
        }
    }
}

impl Algorithm {
    /// Places `pod` on a node that also matches every one of `volumes`
    /// (the node affinities of its bound volumes).
    pub fn schedule(&mut self, cache: &Cache, pod: &PodInfo, volumes: &[NodeSelector]) -> Decision {
        let total = cache.present.len();
        if total == 0 {
            return Decision::Unschedulable("no nodes available to schedule pods".into());
        }
        let topology = needs_topology(cache, pod).then(|| topology(cache, pod));
        let want = feasible_to_find(total);
        self.feasible.clear();
        self.unfit.clear();
        let start = self.next_start % total;
        let mut walked = 0;
        for k in 0..total {
            let index = cache.present[(start + k) % total];
            walked = k + 1;
            match filter(
                &cache.slots[index as usize],
                pod,
                topology.as_ref(),
                volumes,
            ) {
                Ok(()) => {
                    self.feasible.push(index);
                    if self.feasible.len() >= want {
                        break;
                    }
                }
                Err(why) => self.unfit.push((index, why)),
            }
        }
        self.next_start = (start + walked) % total;
        match self.feasible.len() {
            0 => Decision::Unschedulable(diagnose(cache, pod, total, &self.unfit)),
            1 => Decision::Node(self.feasible[0]),
            _ => Decision::Node(self.best(cache, pod)),
        }
    }

    /// The highest scoring feasible node; ties broken at random.
    fn best(&mut self, cache: &Cache, pod: &PodInfo) -> u32 {
        let owners = cache.owner_counts(pod.owner.as_ref());
        self.scores.clear();
        let (mut max_owned, mut max_preferred, mut max_soft) = (0, 0, 0);
        for &index in &self.feasible {
            let slot = &cache.slots[index as usize];
            let Some(node) = &slot.node else { continue };
            let owned = owners
                .and_then(|o| o.get(&index))
                .map_or(0, |&n| i64::from(n));
            let preferred: i64 = pod
                .preferred
                .iter()
                .filter(|(_, term)| term.matches(&slot.name, &node.labels))
                .map(|(weight, _)| *weight)
                .sum();
            let soft_taints = node
                .soft_taints
                .iter()
                .filter(|t| !tolerated(&pod.tolerations, t))
                .count() as i64;
            max_owned = max_owned.max(owned);
            max_preferred = max_preferred.max(preferred);
            max_soft = max_soft.max(soft_taints);
            self.scores.push(Scored {
                slot: index,
                base: WEIGHT_FIT * least_allocated(slot, pod)
                    + WEIGHT_BALANCED * balanced(slot, pod),
                owned,
                preferred,
                soft_taints,
            });
        }
        let mut best = self.feasible[0];
        let mut best_score = i64::MIN;
        let mut ties = 0u64;
        for s in &self.scores {
            let mut score = s.base;
            score += WEIGHT_SPREAD
                * if max_owned == 0 {
                    MAX_SCORE
                } else {
                    MAX_SCORE * (max_owned - s.owned) / max_owned
                };
            if max_preferred > 0 {
                score += WEIGHT_NODE_AFFINITY * MAX_SCORE * s.preferred / max_preferred;
            }
            score += WEIGHT_TAINT
                * if max_soft == 0 {
                    MAX_SCORE
                } else {
                    MAX_SCORE - MAX_SCORE * s.soft_taints / max_soft
                };
            if score > best_score {
                best_score = score;
                best = s.slot;
                ties = 1;
            } else if score == best_score {
                ties += 1;
                if next_random(&mut self.rng).is_multiple_of(ties) {
                    best = s.slot;
                }
            }
        }
        best
    }
}

/// How many feasible nodes to look for among `total` (upstream's
/// adaptive `percentageOfNodesToScore`: 50% less 1% per 125 nodes, at
/// least 5%, at least 100 nodes).
fn feasible_to_find(total: usize) -> usize {
    if total < MIN_FEASIBLE_TO_FIND {
        return total;
    }
    let percent = 50usize.saturating_sub(total / 125).max(MIN_PERCENT_TO_FIND);
    (total * percent / 100).max(MIN_FEASIBLE_TO_FIND)
}

/// Every filter, in upstream's order: the first that fails names why.
fn filter(
    slot: &Slot,
    pod: &PodInfo,
    topology: Option<&Topology>,
    volumes: &[NodeSelector],
) -> Result<(), Unfit> {
    let Some(node) = &slot.node else {
        return Err(Unfit::NodeAffinity);
    };
    if node.unschedulable && !pod.tolerates_unschedulable {
        return Err(Unfit::Unschedulable);
    }
    if let Some(i) = node
        .taints
        .iter()
        .position(|t| !tolerated(&pod.tolerations, t))
    {
        return Err(Unfit::Taint(i.min(u16::MAX as usize) as u16));
    }
    if !pod
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
        || pod
            .required
            .as_ref()
            .is_some_and(|r| !r.matches(&slot.name, &node.labels))
    {
        return Err(Unfit::NodeAffinity);
    }
    if !volumes.iter().all(|v| v.matches(&slot.name, &node.labels)) {
        return Err(Unfit::VolumeNodeAffinity);
    }
    if !pod.host_ports.is_empty()
        && pod
            .host_ports
            .iter()
            .any(|want| slot.ports.iter().any(|used| used.conflicts(want)))
    {
        return Err(Unfit::Ports);
    }
    let free = |allocatable: i64, used: i64, want: i64| want <= 0 || want <= allocatable - used;
    let pods = slot.pods + 1 > node.allowed_pods;
    let cpu = !free(
        node.allocatable.milli_cpu,
        slot.requested.milli_cpu,
        pod.requests.milli_cpu,
    );
    let memory = !free(
        node.allocatable.memory,
        slot.requested.memory,
        pod.requests.memory,
    );
    let scalar = pod
        .scalar
        .iter()
        .position(|(name, want)| !free(node.scalar(name), slot.scalar_used(name), *want))
        .map(|i| i.min(u16::MAX as usize) as u16);
    if pods || cpu || memory || scalar.is_some() {
        return Err(Unfit::Resources {
            pods,
            cpu,
            memory,
            scalar,
        });
    }
    if let Some(t) = topology {
        let value = |key: &str| node.labels.get(key).map(String::as_str);
        if !pod.affinity.is_empty() {
            let mut all_present = true;
            let mut all_found = true;
            for term in &pod.affinity {
                match value(&term.topology_key) {
                    None => all_present = false,
                    Some(v) => {
                        all_found &= t
                            .affinity
                            .get(&term.topology_key)
                            .is_some_and(|values| values.contains(v));
                    }
                }
            }
            if !all_present || !(all_found || t.affinity_open) {
                return Err(Unfit::PodAffinity);
            }
        }
        let in_domain = |domains: &HashMap<String, HashSet<String>>| {
            domains
                .iter()
                .any(|(key, values)| value(key).is_some_and(|v| values.contains(v)))
        };
        if in_domain(&t.anti) {
            return Err(Unfit::PodAntiAffinity);
        }
        if in_domain(&t.existing) {
            return Err(Unfit::ExistingAntiAffinity);
        }
    }
    Ok(())
}

fn needs_topology(cache: &Cache, pod: &PodInfo) -> bool {
    !pod.affinity.is_empty()
        || !pod.anti_affinity.is_empty()
        || !cache.with_anti_affinity.is_empty()
}

/// Upstream's InterPodAffinity pre-filter: which topology domains hold
/// pods that the pod's terms select, and which forbid the pod through an
/// existing pod's anti-affinity. Walks the bound pods once.
fn topology(cache: &Cache, pod: &PodInfo) -> Topology {
    let mut t = Topology::default();
    let domain = |slot: u32, key: &str| -> Option<String> {
        cache.slots[slot as usize]
            .node
            .as_ref()?
            .labels
            .get(key)
            .cloned()
    };
    if !pod.affinity.is_empty() || !pod.anti_affinity.is_empty() {
        for bound in cache.bound_pods() {
            let other = &bound.info;
            for term in &pod.affinity {
                if term.selects(&other.namespace, &other.labels)
                    && let Some(v) = domain(bound.slot, &term.topology_key)
                {
                    t.affinity
                        .entry(term.topology_key.clone())
                        .or_default()
                        .insert(v);
                }
            }
            for term in &pod.anti_affinity {
                if term.selects(&other.namespace, &other.labels)
                    && let Some(v) = domain(bound.slot, &term.topology_key)
                {
                    t.anti
                        .entry(term.topology_key.clone())
                        .or_default()
                        .insert(v);
                }
            }
        }
        t.affinity_open = t.affinity.is_empty()
            && pod
                .affinity
                .iter()
                .all(|term| term.selects(&pod.namespace, &pod.labels));
    }
    for uid in &cache.with_anti_affinity {
        let Some(bound) = cache.bound(uid) else {
            continue;
        };
        for term in &bound.info.anti_affinity {
            if term.selects(&pod.namespace, &pod.labels)
                && let Some(v) = domain(bound.slot, &term.topology_key)
            {
                t.existing
                    .entry(term.topology_key.clone())
                    .or_default()
                    .insert(v);
            }
        }
    }
    t
}

/// NodeResourcesFit's LeastAllocated score: the free share of cpu and
/// memory after placing the pod, averaged.
fn least_allocated(slot: &Slot, pod: &PodInfo) -> i64 {
    let Some(node) = &slot.node else { return 0 };
    let free = |capacity: i64, requested: i64| {
        if capacity <= 0 || requested > capacity {
            0
        } else {
            (capacity - requested) * MAX_SCORE / capacity
        }
    };
    let cpu = free(
        node.allocatable.milli_cpu,
        slot.nonzero.milli_cpu + pod.nonzero.milli_cpu,
    );
    let memory = free(
        node.allocatable.memory,
        slot.nonzero.memory + pod.nonzero.memory,
    );
    (cpu + memory) / 2
}

/// NodeResourcesBalancedAllocation: nodes where cpu and memory are used in
/// like shares score higher (one less their standard deviation).
fn balanced(slot: &Slot, pod: &PodInfo) -> i64 {
    let Some(node) = &slot.node else { return 0 };
    let share = |capacity: i64, requested: i64| {
        if capacity <= 0 {
            1.0
        } else {
            (requested as f64 / capacity as f64).min(1.0)
        }
    };
    let cpu = share(
        node.allocatable.milli_cpu,
        slot.nonzero.milli_cpu + pod.nonzero.milli_cpu,
    );
    let memory = share(
        node.allocatable.memory,
        slot.nonzero.memory + pod.nonzero.memory,
    );
    let deviation = (cpu - memory).abs() / 2.0;
    ((1.0 - deviation) * MAX_SCORE as f64) as i64
}

/// Upstream's FitError message: `0/3 nodes are available: 1 Insufficient
/// cpu, 2 node(s) had untolerated taint {k: v}.`, reasons counted and
/// sorted as strings.
fn diagnose(cache: &Cache, pod: &PodInfo, total: usize, unfit: &[(u32, Unfit)]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = |reason: String| *counts.entry(reason).or_default() += 1;
    for &(index, why) in unfit {
        let slot = &cache.slots[index as usize];
        match why {
            Unfit::Unschedulable => count("node(s) were unschedulable".into()),
            Unfit::Taint(i) => {
                let taint = slot
                    .node
                    .as_ref()
                    .and_then(|n| n.taints.get(usize::from(i)));
                let (key, value) = taint.map_or(("", ""), |t| {
                    (t.key.as_str(), t.value.as_deref().unwrap_or_default())
                });
                count(format!("node(s) had untolerated taint {{{key}: {value}}}"));
            }
            Unfit::NodeAffinity => {
                count("node(s) didn't match Pod's node affinity/selector".into())
            }
            Unfit::Ports => {
                count("node(s) didn't have free ports for the requested pod ports".into())
            }
            Unfit::Resources {
                pods,
                cpu,
                memory,
                scalar,
            } => {
                if pods {
                    count("Too many pods".into());
                }
                if cpu {
                    count("Insufficient cpu".into());
                }
                if memory {
                    count("Insufficient memory".into());
                }
                if let Some((name, _)) = scalar.and_then(|i| pod.scalar.get(usize::from(i))) {
                    count(format!("Insufficient {name}"));
                }
            }
            Unfit::PodAffinity => count("node(s) didn't match pod affinity rules".into()),
            Unfit::PodAntiAffinity => count("node(s) didn't match pod anti-affinity rules".into()),
            Unfit::ExistingAntiAffinity => {
                count("node(s) didn't satisfy existing pods anti-affinity rules".into())
            }
            Unfit::VolumeNodeAffinity => count("node(s) had volume node affinity conflict".into()),
        }
    }
    let mut reasons: Vec<String> = counts
        .into_iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect();
    reasons.sort();
    format!("0/{total} nodes are available: {}.", reasons.join(", "))
}

/// xorshift64: tie-breaking needs no more.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Node, Pod};
    use serde_json::{Value, json};
    use std::sync::Arc;

    fn node(name: &str, cpu: &str, extra: Value) -> Node {
        let mut node = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": cpu, "memory": "4Gi", "pods": "10"}}
        });
        merge(&mut node, extra);
        serde_json::from_value(node).expect("node")
    }

    fn pod(name: &str, extra: Value) -> PodInfo {
        let mut pod = json!({
            "metadata": {"name": name, "namespace": "default", "uid": name, "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "500m", "memory": "100Mi"}}}]}
        });
        merge(&mut pod, extra);
        PodInfo::new(&serde_json::from_value::<Pod>(pod).expect("pod"))
    }

    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn place(cache: &mut Cache, algo: &mut Algorithm, pod: PodInfo) -> Result<String, String> {
        match algo.schedule(cache, &pod, &[]) {
            Decision::Node(i) => {
                let name = cache.slot_name(i).to_owned();
                cache.add_pod(Arc::new(pod), &name, true);
                Ok(name)
            }
            Decision::Unschedulable(why) => Err(why),
        }
    }

    #[test]
    fn filters_name_every_reason() {
        let mut cache = Cache::default();
        cache.upsert_node(node(
            "small",
            "100m",
            json!({"metadata": {"labels": {"disk": "ssd"}}}),
        ));
        cache.upsert_node(node(
            "cordoned",
            "8",
            json!({"spec": {"unschedulable": true}}),
        ));
        cache.upsert_node(node("tainted", "8", json!({"spec": {"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]}})));
        cache.upsert_node(node(
            "other",
            "8",
            json!({"metadata": {"labels": {"disk": "hdd"}}}),
        ));
        let mut algo = Algorithm::default();
        let why = place(
            &mut cache,
            &mut algo,
            pod("p", json!({"spec": {"nodeSelector": {"disk": "ssd"}}})),
        );
        assert_eq!(
            why,
            Err("0/4 nodes are available: 1 Insufficient cpu, 1 node(s) didn't match Pod's node affinity/selector, \
                 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, 1 node(s) were unschedulable."
                .into())
        );
        let tolerant = json!({"spec": {"tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}]}});
        cache.remove_node("other");
        assert_eq!(
            place(&mut cache, &mut algo, pod("q", tolerant)),
            Ok("tainted".into())
        );
    }

    #[test]
    fn resources_ports_and_anti_affinity() {
        let mut cache = Cache::default();
        cache.upsert_node(node("a", "1", json!({})));
        cache.upsert_node(node("b", "1", json!({})));
        let mut algo = Algorithm::default();
        let anti = json!({"spec": {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}}});
        let first = place(&mut cache, &mut algo, pod("p1", anti.clone())).expect("fits");
        let second = place(&mut cache, &mut algo, pod("p2", anti.clone())).expect("fits");
        assert_ne!(first, second);
        assert_eq!(
            place(&mut cache, &mut algo, pod("p3", anti)),
            Err("0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.".into())
        );
        // A plain pod is kept off by the existing pods' anti-affinity.
        assert_eq!(
            place(&mut cache, &mut algo, pod("p4", json!({}))),
            Err("0/2 nodes are available: 2 node(s) didn't satisfy existing pods anti-affinity rules.".into())
        );
        cache.remove_pod("p1");
        cache.remove_pod("p2");
        let port = json!({"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}],
            "resources": {"requests": {"cpu": "100m"}}}]}});
        place(&mut cache, &mut algo, pod("h1", port.clone())).expect("fits");
        place(&mut cache, &mut algo, pod("h2", port.clone())).expect("fits");
        assert_eq!(
            place(&mut cache, &mut algo, pod("h3", port)),
            Err("0/2 nodes are available: 2 node(s) didn't have free ports for the requested pod ports.".into())
        );
        place(&mut cache, &mut algo, pod("c1", json!({}))).expect("fits");
        place(&mut cache, &mut algo, pod("c2", json!({}))).expect("fits");
        assert_eq!(
            place(&mut cache, &mut algo, pod("c3", json!({}))),
            Err("0/2 nodes are available: 2 Insufficient cpu.".into())
        );
    }

    #[test]
    fn spreads_an_owners_pods_and_prefers_affinity() {
        let mut cache = Cache::default();
        for n in ["a", "b", "c"] {
            cache.upsert_node(node(n, "64", json!({})));
        }
        let mut algo = Algorithm::default();
        let owned = json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "rs", "uid": "rs-1", "controller": true}]}});
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..9 {
            let name =
                place(&mut cache, &mut algo, pod(&format!("r{i}"), owned.clone())).expect("fits");
            *per_node.entry(name).or_default() += 1;
        }
        assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [3, 3, 3]);

        let preferred = json!({"spec": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]}}]}}}});
        assert_eq!(
            place(&mut cache, &mut algo, pod("pref", preferred)),
            Ok("b".into())
        );
        let required = json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["a", "b"]}]}]}}}}});
        assert_eq!(
            place(&mut cache, &mut algo, pod("req", required)),
            Ok("c".into())
        );
    }

    #[test]
    fn searches_a_share_of_large_clusters() {
        assert_eq!(feasible_to_find(50), 50);
        assert_eq!(feasible_to_find(1000), 420);
        assert_eq!(feasible_to_find(5000), 500);
        assert_eq!(feasible_to_find(50_000), 2500);
    }
}
