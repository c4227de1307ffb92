//! The pod template as a Deployment's ReplicaSets carry it: the
//! `pod-template-hash` that names them, and template equality that ignores
//! that label (how the controller, and `kubectl rollout undo`, find the
//! ReplicaSet of a template).

use std::io;

use k8s_openapi::api::core::v1::PodTemplateSpec;

use crate::controllers::workload::POD_TEMPLATE_HASH;

/// Characters upstream's `SafeEncodeString` maps to: no vowels (no words),
/// no look-alikes.
const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// FNV-32a of the template (as JSON), then of the collision count if any,
/// encoded as upstream's `ComputeHash` does: a stable, label-safe value
/// that changes with every template change.
pub fn hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut hasher = Fnv32a::default();
    // Writing into the hasher cannot fail; a template that cannot be
    // serialized at all would hash as its prefix.
    let _ = serde_json::to_writer(&mut hasher, template);
    if let Some(count) = collision_count {
        hasher.add(&(count as u32).to_le_bytes());
    }
    hasher
        .0
        .to_string()
        .bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

/// Equal but for the `pod-template-hash` label.
pub fn same(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    if a.spec != b.spec {
        return false;
    }
    let mut a = a.metadata.clone().unwrap_or_default();
    let mut b = b.metadata.clone().unwrap_or_default();
    for meta in [&mut a, &mut b] {
        if let Some(labels) = meta.labels.as_mut() {
            labels.remove(POD_TEMPLATE_HASH);
            if labels.is_empty() {
                meta.labels = None;
            }
        }
        if meta.annotations.as_ref().is_some_and(|a| a.is_empty()) {
            meta.annotations = None;
        }
    }
    a == b
}

struct Fnv32a(u32);

impl Default for Fnv32a {
    fn default() -> Self {
        Fnv32a(0x811c_9dc5)
    }
}

impl Fnv32a {
    fn add(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u32::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0193);
        }
    }
}

impl io::Write for Fnv32a {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.add(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some([("app".to_owned(), "web".to_owned())].into()),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn fnv32a_matches_the_reference_vectors() {
        let mut h = Fnv32a::default();
        h.add(b"a");
        assert_eq!(h.0, 0xe40c_292c);
        let mut h = Fnv32a::default();
        h.add(b"foobar");
        assert_eq!(h.0, 0xbf9c_f968);
    }

    #[test]
    fn hash_is_stable_label_safe_and_follows_the_template() {
        let a = hash(&template("nginx:1"), None);
        assert_eq!(a, hash(&template("nginx:1"), None));
        assert_ne!(a, hash(&template("nginx:2"), None));
        assert_ne!(a, hash(&template("nginx:1"), Some(1)));
        assert!(!a.is_empty() && a.len() <= 10);
        assert!(a.bytes().all(|b| ALPHANUMS.contains(&b)));
    }

    #[test]
    fn equality_ignores_the_hash_label() {
        let mut labelled = template("nginx:1");
        if let Some(labels) = labelled.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
            labels.insert(POD_TEMPLATE_HASH.into(), "abc".into());
        }
        assert!(same(&labelled, &template("nginx:1")));
        assert!(!same(&labelled, &template("nginx:2")));
    }
}
