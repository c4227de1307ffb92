//! Parses just what label and field selectors read from a stored object:
//! all of `metadata` and of the small top-level fields, but of `spec` and
//! `status` only their scalar members (and `status.podIPs`). A pod's
//! containers, volumes and conditions are skipped without being built, so
//! a filtered watch (every agent watches its node's pods) costs a fraction
//! of a full parse per event.
//!
//! Every selectable field (see `fieldset`) is a scalar of `spec` or
//! `status`, `status.podIPs`, or a top-level field; a test checks that
//! each one reads the same from the sparse and the full object.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The selectable view of a JSON object, or `None` if it is not one.
pub fn parse(bytes: &[u8]) -> Option<Value> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = Top.deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    Some(value)
}

/// The whole object, pruning `spec` and `status`.
struct Top;

/// A part of `spec` or `status`: the section itself (`member: false`),
/// whose members are kept if scalar, or one member (`member: true`),
/// which is `None` if it is an object or an array.
struct Part {
    member: bool,
}

impl<'de> DeserializeSeed<'de> for Top {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = match key.as_str() {
                "spec" | "status" => map
                    .next_value_seed(Part { member: false })?
                    .unwrap_or(Value::Null),
                _ => map.next_value::<Value>()?,
            };
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

impl<'de> DeserializeSeed<'de> for Part {
    type Value = Option<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Part {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if self.member {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(None);
        }
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = if key == "podIPs" {
                Some(map.next_value::<Value>()?)
            } else {
                map.next_value_seed(Part { member: true })?
            };
            if let Some(value) = value {
                object.insert(key, value);
            }
        }
        Ok(Some(Value::Object(object)))
    }

    // A section that is an array reads as absent (invalid objects read as
    // upstream reads them: zero values).
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Some(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Value::String(v.to_owned())))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Some(Value::Null))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::selectors::fieldset::field_value;
    use serde_json::json;

    /// Every selectable field of every kind with its own field set.
    const FIELDS: &[(&str, &str, &[&str])] = &[
        (
            "",
            "pods",
            &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.host",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.podIPs",
                "status.nominatedNodeName",
            ],
        ),
        ("", "nodes", &["metadata.name", "spec.unschedulable"]),
        ("", "namespaces", &["metadata.name", "status.phase"]),
        ("", "secrets", &["type", "metadata.namespace"]),
        ("", "services", &["spec.clusterIP", "spec.type"]),
        ("", "replicationcontrollers", &["status.replicas"]),
        ("apps", "replicasets", &["status.replicas"]),
        ("batch", "jobs", &["status.successful"]),
        (
            "certificates.k8s.io",
            "certificatesigningrequests",
            &["spec.signerName"],
        ),
        (
            "",
            "events",
            &[
                "reason",
                "type",
                "source",
                "reportingComponent",
                "involvedObject.kind",
                "involvedObject.name",
                "involvedObject.fieldPath",
            ],
        ),
        (
            "events.k8s.io",
            "events",
            &["reportingController", "regarding.uid", "source"],
        ),
    ];

    fn object() -> Value {
        json!({
            "kind": "X",
            "type": "Opaque",
            "reason": "Scheduled",
            "reportingComponent": "sched",
            "reportingController": "ctl",
            "source": {"component": "kubelet"},
            "involvedObject": {"kind": "Pod", "name": "p", "fieldPath": "spec.containers{c}"},
            "regarding": {"uid": "u"},
            "metadata": {"name": "n", "namespace": "ns", "labels": {"app": "web"}},
            "spec": {
                "nodeName": "node-1", "restartPolicy": "Always", "schedulerName": "s",
                "serviceAccountName": "sa", "hostNetwork": true, "unschedulable": true,
                "clusterIP": "10.0.0.1", "type": "ClusterIP", "signerName": "x/y",
                "containers": [{"name": "c", "image": "i"}],
                "affinity": {"nodeAffinity": {}}
            },
            "status": {
                "phase": "Running", "podIP": "10.1.0.1",
                "podIPs": [{"ip": "10.1.0.2"}], "nominatedNodeName": "node-2",
                "replicas": 3, "succeeded": 1,
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        })
    }

    #[test]
    fn every_selectable_field_reads_the_same() {
        let full = object();
        let sparse = parse(&serde_json::to_vec(&full).unwrap()).unwrap();
        for (group, plural, fields) in FIELDS {
            for field in *fields {
                assert_eq!(
                    field_value(group, plural, &sparse, field).unwrap(),
                    field_value(group, plural, &full, field).unwrap(),
                    "{group}/{plural} {field}"
                );
            }
        }
        assert_eq!(sparse["metadata"], full["metadata"]);
        assert!(sparse["spec"].get("containers").is_none());
        assert!(sparse["status"].get("conditions").is_none());
    }

    #[test]
    fn odd_shapes_and_bad_bytes() {
        assert_eq!(
            parse(br#"{"spec":[1],"status":"x"}"#).unwrap()["status"],
            "x"
        );
        assert!(parse(b"[1]").is_none());
        assert!(parse(br#"{"spec":{"a":1}"#).is_none());
        assert!(parse(br#"{} {}"#).is_none());
    }
}
