//! Defaults the API server fills in, as upstream's defaulting functions and
//! default admission plugins do, so that `kubectl get -o yaml` shows what a
//! user of any cluster expects and controllers can rely on the fields.

use base64::Engine;
use serde_json::{Map, Value, json};

use super::resources::ResourceType;

pub fn apply(rt: &ResourceType, object: &mut Value) {
    match (rt.group, rt.plural) {
        ("", "pods") => {
            if let Some(spec) = object.get_mut("spec") {
                pod_spec(spec);
                default_tolerations(spec);
            }
        }
        ("apps", "deployments") => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                let strategy = spec.entry("strategy").or_insert_with(|| json!({}));
                if strategy.get("type").is_none() {
                    strategy["type"] = json!("RollingUpdate");
                }
                if strategy["type"] == "RollingUpdate" {
                    let rolling = strategy
                        .as_object_mut()
                        .map(|s| s.entry("rollingUpdate").or_insert_with(|| json!({})));
                    if let Some(Value::Object(rolling)) = rolling {
                        rolling.entry("maxSurge").or_insert(json!("25%"));
                        rolling.entry("maxUnavailable").or_insert(json!("25%"));
                    }
                }
            }
            template(object);
        }
        ("apps", "replicasets") => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
            }
            template(object);
        }
        ("apps", "statefulsets") => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
                spec.entry("podManagementPolicy")
                    .or_insert(json!("OrderedReady"));
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                let strategy = spec
                    .entry("updateStrategy")
                    .or_insert_with(|| json!({"type": "RollingUpdate"}));
                if strategy["type"] == "RollingUpdate" && strategy.get("rollingUpdate").is_none() {
                    strategy["rollingUpdate"] = json!({"partition": 0});
                }
                spec.entry("persistentVolumeClaimRetentionPolicy")
                    .or_insert(json!({"whenDeleted": "Retain", "whenScaled": "Retain"}));
            }
            template(object);
        }
        ("apps", "daemonsets") => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                let strategy = spec
                    .entry("updateStrategy")
                    .or_insert_with(|| json!({"type": "RollingUpdate"}));
                if strategy["type"] == "RollingUpdate" && strategy.get("rollingUpdate").is_none() {
                    strategy["rollingUpdate"] = json!({"maxUnavailable": 1, "maxSurge": 0});
                }
            }
            template(object);
        }
        ("batch", "jobs") => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("parallelism").or_insert(json!(1));
                spec.entry("completions").or_insert(json!(1));
                spec.entry("backoffLimit").or_insert(json!(6));
                spec.entry("completionMode").or_insert(json!("NonIndexed"));
                spec.entry("suspend").or_insert(json!(false));
            }
            template(object);
        }
        ("", "services") => service(object),
        ("", "secrets") => secret(object),
        _ => {}
    }
}

fn template(object: &mut Value) {
    if let Some(spec) = object.pointer_mut("/spec/template/spec") {
        pod_spec(spec);
    }
}

fn pod_spec(spec: &mut Value) {
    let Some(map) = spec.as_object_mut() else {
        return;
    };
    map.entry("restartPolicy").or_insert(json!("Always"));
    map.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    map.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    map.entry("securityContext").or_insert(json!({}));
    map.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    map.entry("enableServiceLinks").or_insert(json!(true));
    map.entry("preemptionPolicy")
        .or_insert(json!("PreemptLowerPriority"));
    map.entry("priority").or_insert(json!(0));
    // The ServiceAccount admission plugin's default.
    map.entry("serviceAccountName").or_insert(json!("default"));
    for field in ["initContainers", "containers"] {
        if let Some(Value::Array(containers)) = map.get_mut(field) {
            for container in containers {
                container_defaults(container);
            }
        }
    }
}

/// The DefaultTolerationSeconds admission plugin: pods (not templates)
/// stay five minutes on a node that went not-ready or unreachable.
fn default_tolerations(spec: &mut Value) {
    let Some(map) = spec.as_object_mut() else {
        return;
    };
    let tolerations = map.entry("tolerations").or_insert_with(|| json!([]));
    if let Value::Array(list) = tolerations {
        for key in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            let present = list.iter().any(|t| {
                t.get("key").and_then(Value::as_str) == Some(key)
                    && t.get("effect")
                        .and_then(Value::as_str)
                        .is_none_or(|e| e == "NoExecute")
            });
            if !present {
                list.push(json!({
                    "key": key, "operator": "Exists", "effect": "NoExecute",
                    "tolerationSeconds": 300
                }));
            }
        }
    }
}

fn container_defaults(container: &mut Value) {
    let image = container
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(map) = container.as_object_mut() else {
        return;
    };
    map.entry("imagePullPolicy")
        .or_insert_with(|| json!(pull_policy_for(&image)));
    map.entry("terminationMessagePath")
        .or_insert(json!("/dev/termination-log"));
    map.entry("terminationMessagePolicy")
        .or_insert(json!("File"));
    map.entry("resources").or_insert(json!({}));
    if let Some(Value::Array(ports)) = map.get_mut("ports") {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert(json!("TCP"));
        }
    }
}

/// `Always` for `:latest` or untagged images, else `IfNotPresent`.
fn pull_policy_for(image: &str) -> &'static str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    match last.split_once(':') {
        _ if image.contains('@') => "IfNotPresent",
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn service(object: &mut Value) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let kind = spec
        .entry("type")
        .or_insert(json!("ClusterIP"))
        .as_str()
        .unwrap_or("ClusterIP")
        .to_owned();
    if kind == "ExternalName" {
        return;
    }
    spec.entry("sessionAffinity").or_insert(json!("None"));
    spec.entry("internalTrafficPolicy")
        .or_insert(json!("Cluster"));
    if kind == "NodePort" || kind == "LoadBalancer" {
        spec.entry("externalTrafficPolicy")
            .or_insert(json!("Cluster"));
    }
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert(json!("TCP"));
            if !port.contains_key("targetPort")
                && let Some(number) = port.get("port").cloned()
            {
                port.insert("targetPort".into(), number);
            }
        }
    }
}

fn secret(object: &mut Value) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    map.entry("type").or_insert(json!("Opaque"));
    // stringData is write-only: merged into data, base64-encoded.
    if let Some(Value::Object(strings)) = map.remove("stringData") {
        let data = map
            .entry("data")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(data) = data {
            for (key, value) in strings {
                let text = value.as_str().unwrap_or_default();
                let encoded = base64::engine::general_purpose::STANDARD.encode(text);
                data.insert(key, Value::String(encoded));
            }
        }
    }
}

/// The pod's QoS class from its containers' requests and limits.
pub fn qos_class(pod: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|f| pod.pointer(&format!("/spec/{f}")).and_then(Value::as_array))
        .flatten()
        .collect();
    let mut any_set = false;
    let mut guaranteed = true;
    for container in &containers {
        let requests = container
            .pointer("/resources/requests")
            .and_then(Value::as_object);
        let limits = container
            .pointer("/resources/limits")
            .and_then(Value::as_object);
        for resource in ["cpu", "memory"] {
            let request = requests.and_then(|r| r.get(resource));
            let limit = limits.and_then(|l| l.get(resource));
            if request.is_some() || limit.is_some() {
                any_set = true;
            }
            // A limit without a request defaults the request to the limit.
            let effective_request = request.or(limit);
            if limit.is_none() || effective_request != limit {
                guaranteed = false;
            }
        }
    }
    if !any_set {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_follows_the_tag() {
        assert_eq!(pull_policy_for("nginx"), "Always");
        assert_eq!(pull_policy_for("nginx:latest"), "Always");
        assert_eq!(pull_policy_for("nginx:1.25"), "IfNotPresent");
        assert_eq!(pull_policy_for("registry:5000/nginx"), "Always");
        assert_eq!(pull_policy_for("nginx@sha256:abc"), "IfNotPresent");
    }

    #[test]
    fn qos_classes() {
        let pod = |resources: Value| json!({"spec": {"containers": [{"resources": resources}]}});
        assert_eq!(qos_class(&pod(json!({}))), "BestEffort");
        assert_eq!(
            qos_class(&pod(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&pod(json!({"requests": {"cpu": "1"}}))),
            "Burstable"
        );
    }
}
