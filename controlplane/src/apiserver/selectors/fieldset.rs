//! Which fields each resource lets clients select on, and their values.
//!
//! Mirrors upstream's per-kind field label conversions (which labels are
//! accepted, and the error for the others) and `ToSelectableFields` (how a
//! value is rendered): strings as stored, booleans as `true`/`false`,
//! integers in decimal, and a missing field as its Go zero value (`""`,
//! `false`, `0`) — values are read from the stored JSON without defaulting.
//!
//! One deliberate difference: upstream's apps/v1 ReplicaSet forgot to
//! register its conversion, so `status.replicas` is rejected there even
//! though it is documented and in the field set (kubernetes#135136). Skiff
//! accepts it, as the documentation promises.

use serde_json::Value;

use super::SelectorError;
use super::validation::go_quote;

/// The value of `field` on `object` of resource `group`/`plural` for
/// matching a field selector.
///
/// `Ok(None)` is a field upstream accepts but never fills in
/// (`status.podIPs` on pods); it matches as the empty string. Unsupported
/// fields are an error with upstream's message, for a 400 BadRequest.
pub fn field_value(
    group: &str,
    plural: &str,
    object: &Value,
    field: &str,
) -> Result<Option<String>, SelectorError> {
    let set = FieldSet::of(group, plural);
    let extract = set.resolve(field).ok_or_else(|| set.unsupported(field))?;
    Ok(extract.read(object))
}

/// Checks that `field` is selectable on `group`/`plural`.
pub(crate) fn check_field(group: &str, plural: &str, field: &str) -> Result<(), SelectorError> {
    let set = FieldSet::of(group, plural);
    set.resolve(field)
        .map(|_| ())
        .ok_or_else(|| set.unsupported(field))
}

/// Resources with their own selectable fields; all others offer only
/// `metadata.name` and `metadata.namespace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldSet {
    Pods,
    Nodes,
    Namespaces,
    Secrets,
    Services,
    ReplicationControllers,
    CoreEvents,
    Events,
    ReplicaSets,
    Jobs,
    CertificateSigningRequests,
    Metadata,
}

/// How to read one field's value from a stored object.
#[derive(Debug, Clone, Copy)]
enum Extract {
    Text(&'static [&'static str]),
    Bool(&'static [&'static str]),
    Int(&'static [&'static str]),
    /// The first of `status.podIPs`, else `status.podIP`.
    PodIp,
    /// Accepted but never set upstream.
    Unset,
    /// A field of the object an event is about (`involvedObject` in
    /// core/v1, `regarding` in events.k8s.io/v1).
    EventRef(&'static str),
    /// The controller that emitted an event.
    EventReporter,
    /// `source.component`, falling back to the reporting controller.
    EventSource,
}

impl FieldSet {
    fn of(group: &str, plural: &str) -> Self {
        match (group, plural) {
            ("", "pods") => Self::Pods,
            ("", "nodes") => Self::Nodes,
            ("", "namespaces") => Self::Namespaces,
            ("", "secrets") => Self::Secrets,
            ("", "services") => Self::Services,
            ("", "replicationcontrollers") => Self::ReplicationControllers,
            ("", "events") => Self::CoreEvents,
            ("events.k8s.io", "events") => Self::Events,
            ("apps", "replicasets") => Self::ReplicaSets,
            ("batch", "jobs") => Self::Jobs,
            ("certificates.k8s.io", "certificatesigningrequests") => {
                Self::CertificateSigningRequests
            }
            _ => Self::Metadata,
        }
    }

    fn resolve(self, field: &str) -> Option<Extract> {
        use Extract::*;
        match field {
            "metadata.name" => return Some(Text(&["metadata", "name"])),
            // Cluster-scoped kinds with their own conversion don't list it.
            "metadata.namespace"
                if !matches!(
                    self,
                    Self::Nodes | Self::Namespaces | Self::CertificateSigningRequests
                ) =>
            {
                return Some(Text(&["metadata", "namespace"]));
            }
            _ => {}
        }
        Some(match (self, field) {
            // `spec.host` is the pre-v1 name, still accepted.
            (Self::Pods, "spec.nodeName" | "spec.host") => Text(&["spec", "nodeName"]),
            (Self::Pods, "spec.restartPolicy") => Text(&["spec", "restartPolicy"]),
            (Self::Pods, "spec.schedulerName") => Text(&["spec", "schedulerName"]),
            (Self::Pods, "spec.serviceAccountName") => Text(&["spec", "serviceAccountName"]),
            (Self::Pods, "spec.hostNetwork") => Bool(&["spec", "hostNetwork"]),
            (Self::Pods, "status.phase") => Text(&["status", "phase"]),
            (Self::Pods, "status.podIP") => PodIp,
            (Self::Pods, "status.podIPs") => Unset,
            (Self::Pods, "status.nominatedNodeName") => Text(&["status", "nominatedNodeName"]),
            (Self::Nodes, "spec.unschedulable") => Bool(&["spec", "unschedulable"]),
            (Self::Namespaces, "status.phase") => Text(&["status", "phase"]),
            (Self::Secrets, "type") => Text(&["type"]),
            (Self::Services, "spec.clusterIP") => Text(&["spec", "clusterIP"]),
            (Self::Services, "spec.type") => Text(&["spec", "type"]),
            (Self::ReplicationControllers | Self::ReplicaSets, "status.replicas") => {
                Int(&["status", "replicas"])
            }
            (Self::Jobs, "status.successful") => Int(&["status", "succeeded"]),
            (Self::CertificateSigningRequests, "spec.signerName") => Text(&["spec", "signerName"]),
            (Self::CoreEvents | Self::Events, "reason") => Text(&["reason"]),
            (Self::CoreEvents | Self::Events, "type") => Text(&["type"]),
            (Self::CoreEvents | Self::Events, "source") => EventSource,
            (Self::CoreEvents, "reportingComponent") => EventReporter,
            (Self::Events, "reportingController") => EventReporter,
            (Self::CoreEvents, f) => EventRef(event_ref_field(f.strip_prefix("involvedObject.")?)?),
            (Self::Events, f) => EventRef(event_ref_field(f.strip_prefix("regarding.")?)?),
            _ => return None,
        })
    }

    /// Upstream's error for an unsupported field, which differs by kind.
    fn unsupported(self, field: &str) -> SelectorError {
        SelectorError::UnsupportedField(match self {
            Self::Metadata => format!(
                "{} is not a known field selector: only \"metadata.name\", \"metadata.namespace\"",
                go_quote(field)
            ),
            Self::Jobs => format!(
                "field label {} not supported for batchv1.Job",
                go_quote(field)
            ),
            _ => format!("field label not supported: {field}"),
        })
    }
}

/// The selectable fields of an event's object reference.
fn event_ref_field(field: &str) -> Option<&'static str> {
    Some(match field {
        "kind" => "kind",
        "namespace" => "namespace",
        "name" => "name",
        "uid" => "uid",
        "apiVersion" => "apiVersion",
        "resourceVersion" => "resourceVersion",
        "fieldPath" => "fieldPath",
        _ => return None,
    })
}

impl Extract {
    fn read(self, object: &Value) -> Option<String> {
        Some(match self {
            Self::Text(path) => text(at(object, path)),
            Self::Bool(path) => at(object, path)
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .to_string(),
            Self::Int(path) => at(object, path)
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .to_string(),
            Self::PodIp => {
                let first = at(object, &["status", "podIPs"])
                    .and_then(Value::as_array)
                    .and_then(|ips| ips.first())
                    .and_then(|ip| ip.get("ip"));
                match first {
                    Some(ip) => text(Some(ip)),
                    None => text(at(object, &["status", "podIP"])),
                }
            }
            Self::Unset => return None,
            Self::EventRef(field) => {
                let reference = object
                    .get("involvedObject")
                    .or_else(|| object.get("regarding"));
                text(reference.and_then(|r| r.get(field)))
            }
            Self::EventReporter => event_reporter(object).to_string(),
            Self::EventSource => {
                let component = ["source", "deprecatedSource"]
                    .iter()
                    .map(|s| text(at(object, &[s, "component"])))
                    .find(|c| !c.is_empty())
                    .unwrap_or_default();
                if component.is_empty() {
                    event_reporter(object).to_string()
                } else {
                    component
                }
            }
        })
    }
}

/// core/v1 spells the reporting controller `reportingComponent`,
/// events.k8s.io/v1 `reportingController`; accept either stored shape.
fn event_reporter(object: &Value) -> &str {
    ["reportingComponent", "reportingController"]
        .iter()
        .filter_map(|k| object.get(*k).and_then(Value::as_str))
        .find(|s| !s.is_empty())
        .unwrap_or("")
}

fn at<'a>(object: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, key| v.get(*key))
}

/// A string field as upstream's field set holds it: non-strings (invalid
/// objects) read as the zero value.
fn text(value: Option<&Value>) -> String {
    value.and_then(Value::as_str).unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value(group: &str, plural: &str, object: &Value, field: &str) -> String {
        field_value(group, plural, object, field)
            .unwrap_or_else(|e| panic!("{field}: {e}"))
            .unwrap_or_default()
    }

    fn unsupported(group: &str, plural: &str, field: &str) -> String {
        field_value(group, plural, &json!({}), field)
            .expect_err(field)
            .to_string()
    }

    #[test]
    fn pod_fields() {
        let pod = json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"nodeName": "n1", "restartPolicy": "Always", "schedulerName": "default-scheduler",
                     "serviceAccountName": "sa", "hostNetwork": true},
            "status": {"phase": "Running", "podIP": "10.0.0.9",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}], "nominatedNodeName": "n2"}
        });
        let cases = [
            ("metadata.name", "p"),
            ("metadata.namespace", "ns"),
            ("spec.nodeName", "n1"),
            ("spec.host", "n1"),
            ("spec.restartPolicy", "Always"),
            ("spec.schedulerName", "default-scheduler"),
            ("spec.serviceAccountName", "sa"),
            ("spec.hostNetwork", "true"),
            ("status.phase", "Running"),
            ("status.podIP", "10.0.0.1"),
            ("status.podIPs", ""),
            ("status.nominatedNodeName", "n2"),
        ];
        for (field, want) in cases {
            assert_eq!(value("", "pods", &pod, field), want, "{field}");
        }
        let bare = json!({"status": {"podIP": "10.0.0.9"}});
        assert_eq!(value("", "pods", &bare, "spec.hostNetwork"), "false");
        assert_eq!(value("", "pods", &bare, "spec.nodeName"), "");
        assert_eq!(value("", "pods", &bare, "status.podIP"), "10.0.0.9");
        assert_eq!(value("", "pods", &json!("garbage"), "status.phase"), "");
        assert_eq!(
            unsupported("", "pods", "spec.containers"),
            "field label not supported: spec.containers"
        );
    }

    #[test]
    fn cluster_scoped_kinds() {
        let node = json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}});
        assert_eq!(value("", "nodes", &node, "spec.unschedulable"), "true");
        assert_eq!(
            value("", "nodes", &json!({}), "spec.unschedulable"),
            "false"
        );
        assert_eq!(
            unsupported("", "nodes", "metadata.namespace"),
            "field label not supported: metadata.namespace"
        );
        let ns = json!({"status": {"phase": "Terminating"}});
        assert_eq!(value("", "namespaces", &ns, "status.phase"), "Terminating");
        assert_eq!(
            unsupported("", "namespaces", "metadata.namespace"),
            "field label not supported: metadata.namespace"
        );
        // Default conversion accepts metadata.namespace even when cluster scoped.
        assert_eq!(
            value("", "persistentvolumes", &json!({}), "metadata.namespace"),
            ""
        );
    }

    #[test]
    fn other_kinds() {
        assert_eq!(
            value("", "secrets", &json!({"type": "Opaque"}), "type"),
            "Opaque"
        );
        let svc = json!({"spec": {"clusterIP": "10.43.0.1", "type": "NodePort"}});
        assert_eq!(value("", "services", &svc, "spec.clusterIP"), "10.43.0.1");
        assert_eq!(value("", "services", &svc, "spec.type"), "NodePort");
        assert_eq!(
            value(
                "apps",
                "replicasets",
                &json!({"status": {"replicas": 3}}),
                "status.replicas"
            ),
            "3"
        );
        assert_eq!(
            value("apps", "replicasets", &json!({}), "status.replicas"),
            "0"
        );
        assert_eq!(
            value("", "replicationcontrollers", &json!({}), "status.replicas"),
            "0"
        );
        assert_eq!(
            value(
                "batch",
                "jobs",
                &json!({"status": {"succeeded": 2}}),
                "status.successful"
            ),
            "2"
        );
        assert_eq!(
            unsupported("batch", "jobs", "status.succeeded"),
            "field label \"status.succeeded\" not supported for batchv1.Job"
        );
        assert_eq!(
            unsupported("apps", "deployments", "spec.replicas"),
            "\"spec.replicas\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
        );
        assert_eq!(
            value(
                "apps",
                "deployments",
                &json!({"metadata": {"name": "d"}}),
                "metadata.name"
            ),
            "d"
        );
    }

    #[test]
    fn core_events() {
        let ev = json!({
            "involvedObject": {"kind": "Pod", "namespace": "ns", "name": "p", "uid": "u",
                               "apiVersion": "v1", "resourceVersion": "7", "fieldPath": "spec.containers{c}"},
            "reason": "Pulled", "type": "Normal", "reportingComponent": "kubelet",
        });
        let cases = [
            ("involvedObject.kind", "Pod"),
            ("involvedObject.namespace", "ns"),
            ("involvedObject.name", "p"),
            ("involvedObject.uid", "u"),
            ("involvedObject.apiVersion", "v1"),
            ("involvedObject.resourceVersion", "7"),
            ("involvedObject.fieldPath", "spec.containers{c}"),
            ("reason", "Pulled"),
            ("type", "Normal"),
            ("reportingComponent", "kubelet"),
            ("source", "kubelet"),
        ];
        for (field, want) in cases {
            assert_eq!(value("", "events", &ev, field), want, "{field}");
        }
        let with_source = json!({"source": {"component": "scheduler"}, "reportingComponent": "x"});
        assert_eq!(value("", "events", &with_source, "source"), "scheduler");
        assert_eq!(
            unsupported("", "events", "regarding.kind"),
            "field label not supported: regarding.kind"
        );
        assert_eq!(
            unsupported("", "events", "involvedObject.bogus"),
            "field label not supported: involvedObject.bogus"
        );
    }

    #[test]
    fn events_k8s_io() {
        let ev = json!({
            "regarding": {"kind": "Node", "name": "n1"},
            "reason": "Starting", "type": "Normal", "reportingController": "skiff-agent",
            "deprecatedSource": {"component": "kubelet"},
        });
        assert_eq!(
            value("events.k8s.io", "events", &ev, "regarding.kind"),
            "Node"
        );
        assert_eq!(
            value("events.k8s.io", "events", &ev, "regarding.name"),
            "n1"
        );
        assert_eq!(
            value("events.k8s.io", "events", &ev, "reportingController"),
            "skiff-agent"
        );
        assert_eq!(value("events.k8s.io", "events", &ev, "source"), "kubelet");
        assert_eq!(
            unsupported("events.k8s.io", "events", "involvedObject.kind"),
            "field label not supported: involvedObject.kind"
        );
        assert!(check_field("events.k8s.io", "events", "reportingComponent").is_err());
    }
}
