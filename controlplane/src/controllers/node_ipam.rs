//! Node podCIDR allocation, as kube-controller-manager's range allocator
//! does: every Node gets one /24 of `--cluster-cidr` in `spec.podCIDR` and
//! `spec.podCIDRs`, and no range is ever handed to two nodes.
//!
//! The Nodes themselves are the record of what is in use: after every
//! (re)list the allocator is rebuilt from their `spec.podCIDR`, so a restart
//! or a new leader never reuses a range. One task owns the allocator and
//! handles node events one at a time, so concurrent node creations are
//! served in turn; each assignment is written with the node's
//! resourceVersion as a precondition, so it never overwrites a range some
//! other writer set first.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

use futures::StreamExt;
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, watcher};
use serde_json::json;

/// The size of each node's range, upstream's `--node-cidr-mask-size`.
const NODE_MASK: u8 = 24;
/// Nodes whose assignment failed are retried this often.
const RETRY: Duration = Duration::from_secs(5);

pub async fn run(client: kube::Client, cluster_cidr: IpNet) {
    let IpNet::V4(cidr) = cluster_cidr else {
        tracing::error!(%cluster_cidr, "only IPv4 cluster CIDRs are supported; no podCIDRs will be allocated");
        return;
    };
    let Some(mut allocator) = Allocator::new(cidr, NODE_MASK) else {
        tracing::error!(%cidr, "--cluster-cidr must be /{NODE_MASK} or larger; no podCIDRs will be allocated");
        return;
    };
    let nodes: Api<Node> = Api::all(client.clone());
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "node-ipam-controller".into(),
            instance: None,
        },
    );
    let ipam = Ipam {
        nodes: nodes.clone(),
        recorder,
    };
    let mut events = std::pin::pin!(
        watcher(nodes, watcher::Config::default())
            .default_backoff()
            .boxed()
    );
    let mut listed: Vec<Node> = Vec::new();
    let mut synced = false;
    // Nodes whose assignment failed for a passing reason.
    let mut retry: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(RETRY);
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
            _ = tick.tick() => {
                if synced {
                    for name in std::mem::take(&mut retry) {
                        ipam.retry(&mut allocator, &name, &mut retry).await;
                    }
                }
                continue;
            }
        };
        match event {
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(node)) => listed.push(node),
            Ok(watcher::Event::InitDone) => {
                // A fresh list is the whole truth: rebuild from it, then
                // serve the nodes still waiting for a range.
                allocator.clear();
                for node in &listed {
                    occupy(&mut allocator, node);
                }
                for node in std::mem::take(&mut listed) {
                    if pod_cidr(&node).is_none() {
                        ipam.assign(&mut allocator, node, &mut retry).await;
                    }
                }
                synced = true;
            }
            Ok(watcher::Event::Apply(node)) => {
                if pod_cidr(&node).is_some() {
                    occupy(&mut allocator, &node);
                } else if node.metadata.deletion_timestamp.is_none() {
                    ipam.assign(&mut allocator, node, &mut retry).await;
                }
            }
            Ok(watcher::Event::Delete(node)) => {
                let name = node.metadata.name.unwrap_or_default();
                retry.remove(&name);
                allocator.release(&name);
            }
            Err(e) => tracing::debug!(error = %e, "node watch error in the podCIDR allocator"),
        }
    }
}

struct Ipam {
    nodes: Api<Node>,
    recorder: Recorder,
}

impl Ipam {
    /// Gives `node` a range and writes it, unless it got one meanwhile.
    async fn assign(
        &self,
        allocator: &mut Allocator,
        mut node: Node,
        retry: &mut BTreeSet<String>,
    ) {
        let name = node.metadata.name.clone().unwrap_or_default();
        if allocator.holds(&name) {
            // An event from before our own assignment landed.
            return;
        }
        for _ in 0..3 {
            let Some(cidr) = allocator.allocate(&name) else {
                tracing::warn!(node = %name, "no podCIDR left in the cluster CIDR");
                self.event(
                    &node,
                    "CIDRNotAvailable",
                    "no podCIDR is left in the cluster CIDR",
                )
                .await;
                break;
            };
            let patch = json!({
                "metadata": {"resourceVersion": node.metadata.resource_version},
                "spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]},
            });
            let written = self
                .nodes
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            match written {
                Ok(_) => {
                    tracing::info!(node = %name, %cidr, "podCIDR assigned");
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    allocator.release(&name);
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // The node changed since we saw it: look again.
                    allocator.release(&name);
                    match self.nodes.get_opt(&name).await {
                        Ok(Some(fresh)) if pod_cidr(&fresh).is_some() => {
                            occupy(allocator, &fresh);
                            return;
                        }
                        Ok(Some(fresh)) => node = fresh,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                Err(e) => {
                    allocator.release(&name);
                    tracing::debug!(node = %name, error = %e, "podCIDR assignment failed");
                    self.event(&node, "CIDRAssignmentFailed", &e.to_string())
                        .await;
                    break;
                }
            }
        }
        retry.insert(name);
    }

    /// Reads `name` afresh and assigns it a range if it still needs one.
    async fn retry(&self, allocator: &mut Allocator, name: &str, retry: &mut BTreeSet<String>) {
        match self.nodes.get_opt(name).await {
            Ok(Some(node)) if pod_cidr(&node).is_some() => occupy(allocator, &node),
            Ok(Some(node)) if node.metadata.deletion_timestamp.is_none() => {
                self.assign(allocator, node, retry).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(node = %name, error = %e, "cannot read node for podCIDR retry");
                retry.insert(name.to_owned());
            }
        }
    }

    async fn event(&self, node: &Node, reason: &str, note: &str) {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: "AssignPodCIDR".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &node.object_ref(&())).await {
            tracing::debug!(error = %e, "cannot record a node event");
        }
    }
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .filter(|c| !c.is_empty())
}

/// Marks the range(s) `node` already has as taken.
fn occupy(allocator: &mut Allocator, node: &Node) {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let spec = node.spec.as_ref();
    let cidrs = spec
        .and_then(|s| s.pod_cidrs.as_deref())
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .chain(pod_cidr(node));
    for cidr in cidrs {
        let Ok(net) = cidr.parse::<Ipv4Net>() else {
            continue;
        };
        if let Some(other) = allocator.occupy(name, net) {
            tracing::warn!(node = %name, %other, %net, "podCIDR also belongs to another node");
        }
    }
}

/// Which node-sized blocks of the cluster CIDR are taken, and by whom.
#[derive(Debug)]
struct Allocator {
    network: u32,
    mask: u8,
    blocks: u32,
    used: Vec<u64>,
    /// Where the next search starts, so freed blocks are reused last.
    next: u32,
    /// Each node's blocks, and each taken block's node.
    owners: HashMap<String, Vec<u32>>,
    holders: HashMap<u32, String>,
}

impl Allocator {
    fn new(cidr: Ipv4Net, mask: u8) -> Option<Self> {
        if cidr.prefix_len() > mask || mask > 32 {
            return None;
        }
        let blocks = 1u32.checked_shl(u32::from(mask - cidr.prefix_len()))?;
        Some(Allocator {
            network: u32::from(cidr.network()),
            mask,
            blocks,
            used: vec![0; blocks.div_ceil(64) as usize],
            next: 0,
            owners: HashMap::new(),
            holders: HashMap::new(),
        })
    }

    fn clear(&mut self) {
        self.used.fill(0);
        self.owners.clear();
        self.holders.clear();
    }

    fn block_net(&self, block: u32) -> Option<Ipv4Net> {
        let addr = self.network + (block << (32 - u32::from(self.mask)));
        Ipv4Net::new(Ipv4Addr::from(addr), self.mask).ok()
    }

    fn is_used(&self, block: u32) -> bool {
        self.used[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set(&mut self, block: u32, used: bool) {
        let word = &mut self.used[(block / 64) as usize];
        if used {
            *word |= 1 << (block % 64);
        } else {
            *word &= !(1 << (block % 64));
        }
    }

    /// The blocks `net` covers, if it lies in the cluster CIDR.
    fn blocks_of(&self, net: Ipv4Net) -> Option<std::ops::Range<u32>> {
        let shift = 32 - u32::from(self.mask);
        let start = u32::from(net.network()).checked_sub(self.network)? >> shift;
        let end = if net.prefix_len() >= self.mask {
            start + 1
        } else {
            start + (1u32 << (self.mask - net.prefix_len()))
        };
        (end <= self.blocks).then_some(start..end)
    }

    /// Marks `net` as `node`'s; returns another node already holding it.
    fn occupy(&mut self, node: &str, net: Ipv4Net) -> Option<String> {
        let blocks = self.blocks_of(net)?;
        let mut clash = None;
        for block in blocks {
            if self.is_used(block) {
                match self.holders.get(&block) {
                    Some(holder) if holder == node => {}
                    other => clash = other.cloned(),
                }
                continue;
            }
            self.take(block, node);
        }
        clash
    }

    fn take(&mut self, block: u32, node: &str) {
        self.set(block, true);
        self.holders.insert(block, node.to_owned());
        match self.owners.get_mut(node) {
            Some(blocks) => blocks.push(block),
            None => {
                self.owners.insert(node.to_owned(), vec![block]);
            }
        }
    }

    /// Takes the next free block for `node`.
    fn allocate(&mut self, node: &str) -> Option<Ipv4Net> {
        for offset in 0..self.blocks {
            let block = (self.next + offset) % self.blocks;
            if !self.is_used(block) {
                self.take(block, node);
                self.next = (block + 1) % self.blocks;
                return self.block_net(block);
            }
        }
        None
    }

    fn holds(&self, node: &str) -> bool {
        self.owners.contains_key(node)
    }

    /// Frees every block `node` holds.
    fn release(&mut self, node: &str) {
        for block in self.owners.remove(node).unwrap_or_default() {
            self.set(block, false);
            self.holders.remove(&block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn hands_out_distinct_blocks_in_order() {
        let mut a = Allocator::new(net("10.42.0.0/16"), 24).unwrap();
        assert_eq!(a.allocate("a"), Some(net("10.42.0.0/24")));
        assert_eq!(a.allocate("b"), Some(net("10.42.1.0/24")));
        a.release("a");
        // Freed blocks are reused only after the rest.
        assert_eq!(a.allocate("c"), Some(net("10.42.2.0/24")));
    }

    #[test]
    fn existing_ranges_are_never_handed_out() {
        let mut a = Allocator::new(net("10.42.0.0/16"), 24).unwrap();
        assert_eq!(a.occupy("old", net("10.42.0.0/24")), None);
        assert_eq!(a.occupy("old", net("10.42.0.0/24")), None);
        assert_eq!(a.occupy("wide", net("10.42.2.0/23")), None);
        assert_eq!(a.occupy("twin", net("10.42.0.0/24")), Some("old".into()));
        assert!(a.holds("old") && a.holds("wide") && !a.holds("twin"));
        // Outside the cluster CIDR: ignored.
        assert_eq!(a.occupy("far", net("10.99.0.0/24")), None);
        let got: Vec<_> = (0..3)
            .map(|i| a.allocate(&i.to_string()).unwrap())
            .collect();
        assert_eq!(
            got,
            [
                net("10.42.1.0/24"),
                net("10.42.4.0/24"),
                net("10.42.5.0/24")
            ]
        );
    }

    #[test]
    fn exhaustion_and_small_ranges() {
        let mut a = Allocator::new(net("10.0.0.0/23"), 24).unwrap();
        assert!(a.allocate("a").is_some());
        assert!(a.allocate("b").is_some());
        assert_eq!(a.allocate("c"), None);
        a.release("a");
        assert_eq!(a.allocate("c"), Some(net("10.0.0.0/24")));
        assert!(Allocator::new(net("10.0.0.0/25"), 24).is_none());
        let whole = Allocator::new(net("0.0.0.0/0"), 24).unwrap();
        assert_eq!(whole.blocks, 1 << 24);
    }
}
