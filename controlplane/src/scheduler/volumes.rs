//! Upstream's VolumeBinding plugin, for what Skiff provisions: a pod's
//! bound claims keep it on the nodes their volumes allow, an unbound
//! `WaitForFirstConsumer` claim lets the pod go anywhere and is then told
//! the chosen node (the provisioner makes its volume there), and a pod
//! with a missing or otherwise unbound claim waits.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;

use super::pod::PodInfo;
use super::selector::NodeSelector;
use crate::controllers::volume::SELECTED_NODE;

/// What the scheduler knows of claims, volumes and classes.
#[derive(Default)]
pub struct Volumes {
    /// By `namespace/name`.
    claims: HashMap<String, Claim>,
    /// Each volume's required node affinity, if it has one.
    volumes: HashMap<String, Option<NodeSelector>>,
    /// Classes with `volumeBindingMode: WaitForFirstConsumer`.
    waiting_classes: HashSet<String>,
}

struct Claim {
    volume: Option<String>,
    class: Option<String>,
    node_selected: bool,
}

/// How a pod's claims constrain it.
#[derive(Default)]
pub struct Plan {
    /// Every one must match the chosen node.
    pub node_selectors: Vec<NodeSelector>,
    /// Unbound claims to tell the chosen node.
    pub select_node_for: Vec<String>,
}

impl Volumes {
    pub fn apply_claim(&mut self, claim: &PersistentVolumeClaim) {
        let spec = claim.spec.as_ref();
        self.claims.insert(
            claim_key(claim),
            Claim {
                volume: spec
                    .and_then(|s| s.volume_name.clone())
                    .filter(|v| !v.is_empty()),
                class: spec.and_then(|s| s.storage_class_name.clone()),
                node_selected: claim
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(SELECTED_NODE)),
            },
        );
    }

    pub fn delete_claim(&mut self, claim: &PersistentVolumeClaim) {
        self.claims.remove(&claim_key(claim));
    }

    pub fn apply_volume(&mut self, pv: &PersistentVolume) {
        let selector = pv
            .spec
            .as_ref()
            .and_then(|s| s.node_affinity.as_ref())
            .and_then(|a| a.required.as_ref())
            .map(|r| NodeSelector::new(&r.node_selector_terms));
        self.volumes
            .insert(pv.metadata.name.clone().unwrap_or_default(), selector);
    }

    pub fn delete_volume(&mut self, pv: &PersistentVolume) {
        self.volumes
            .remove(pv.metadata.name.as_deref().unwrap_or_default());
    }

    pub fn apply_class(&mut self, class: &StorageClass) {
        let name = class.metadata.name.clone().unwrap_or_default();
        if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
            self.waiting_classes.insert(name);
        } else {
            self.waiting_classes.remove(&name);
        }
    }

    pub fn delete_class(&mut self, class: &StorageClass) {
        self.waiting_classes
            .remove(class.metadata.name.as_deref().unwrap_or_default());
    }

    /// How `pod`'s claims constrain it, or why it cannot be placed yet
    /// (upstream's messages).
    pub fn plan(&self, pod: &PodInfo) -> Result<Plan, String> {
        let mut plan = Plan::default();
        for name in &pod.claims {
            let key = format!("{}/{name}", pod.namespace);
            let Some(claim) = self.claims.get(&key) else {
                return Err(format!("persistentvolumeclaim \"{name}\" not found"));
            };
            match &claim.volume {
                Some(volume) => match self.volumes.get(volume) {
                    Some(Some(selector)) => plan.node_selectors.push(selector.clone()),
                    Some(None) => {}
                    None => {
                        return Err(format!(
                            "persistentvolumeclaim \"{name}\" bound to non-existent persistentvolume \"{volume}\""
                        ));
                    }
                },
                None => {
                    let waits = claim
                        .class
                        .as_ref()
                        .is_some_and(|c| self.waiting_classes.contains(c));
                    if !waits {
                        return Err("pod has unbound immediate PersistentVolumeClaims".into());
                    }
                    if !claim.node_selected {
                        plan.select_node_for.push(name.clone());
                    }
                }
            }
        }
        Ok(plan)
    }
}

fn claim_key(claim: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim.metadata.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod_with_claims(claims: &[&str]) -> PodInfo {
        let volumes: Vec<_> = claims
            .iter()
            .map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
            .collect();
        let pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"containers": [{"name": "c", "image": "x"}], "volumes": volumes},
        }))
        .expect("a pod");
        PodInfo::new(&pod)
    }

    fn claim(name: &str, class: &str, volume: Option<&str>) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"storageClassName": class, "volumeName": volume},
        }))
        .expect("a claim")
    }

    #[test]
    fn claims_pin_wait_or_block() {
        let mut v = Volumes::default();
        v.apply_class(
            &serde_json::from_value(json!({"metadata": {"name": "local-path"},
                "provisioner": "skiff.io/local-path", "volumeBindingMode": "WaitForFirstConsumer"}))
            .expect("a class"),
        );
        let pod = pod_with_claims(&["data"]);
        assert_eq!(
            v.plan(&pod).err().as_deref(),
            Some("persistentvolumeclaim \"data\" not found")
        );
        v.apply_claim(&claim("data", "local-path", None));
        let plan = v.plan(&pod).expect("schedulable");
        assert_eq!(plan.select_node_for, vec!["data".to_owned()]);
        assert!(plan.node_selectors.is_empty());

        v.apply_claim(&claim("data", "manual", None));
        assert_eq!(
            v.plan(&pod).err().as_deref(),
            Some("pod has unbound immediate PersistentVolumeClaims")
        );

        v.apply_claim(&claim("data", "local-path", Some("pv1")));
        assert!(v.plan(&pod).is_err(), "the volume is not known yet");
        v.apply_volume(
            &serde_json::from_value(json!({"metadata": {"name": "pv1"}, "spec": {"nodeAffinity":
                {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}]}]}}}}))
            .expect("a volume"),
        );
        let plan = v.plan(&pod).expect("schedulable");
        assert_eq!(plan.node_selectors.len(), 1);
        let labels = [("kubernetes.io/hostname".to_owned(), "n1".to_owned())]
            .into_iter()
            .collect();
        assert!(plan.node_selectors[0].matches("n1", &labels));
        assert!(plan.select_node_for.is_empty());
    }
}
