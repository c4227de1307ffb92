//! What differs between kinds on create and update: which fields the
//! server owns, what the status subresource may change, when `generation`
//! moves, and the kind-specific validation rules.

use serde_json::{Map, Value, json};

use super::defaults;
use super::resources::{ResourceType, Subresource};
use super::status::Cause;
use super::validation::{self, NameRule};

/// Name rule for a kind, as upstream validates it.
pub fn name_rule(rt: &ResourceType) -> NameRule {
    match (rt.group, rt.plural) {
        ("", "namespaces") => NameRule::Label,
        ("", "services") => NameRule::Label1035,
        ("rbac.authorization.k8s.io", _) => NameRule::PathSegment,
        _ => NameRule::Subdomain,
    }
}

/// Kinds whose `metadata.generation` counts changes to their spec.
fn tracks_generation(object: &Value) -> bool {
    object.get("spec").is_some()
}

/// Server-owned fields of a new object, and its defaults.
pub fn prepare_create(rt: &ResourceType, object: &mut Value, uid: String, now: &str) {
    if let Some(meta) = super::objects::metadata_mut(object) {
        for owned in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "resourceVersion",
            "selfLink",
            "generation",
        ] {
            meta.remove(owned);
        }
        meta.insert("uid".into(), Value::String(uid));
        meta.insert("creationTimestamp".into(), Value::String(now.to_owned()));
    }
    if tracks_generation(object)
        && let Some(meta) = super::objects::metadata_mut(object)
    {
        meta.insert("generation".into(), json!(1));
    }
    match (rt.group, rt.plural) {
        ("", "namespaces") => {
            object["status"] = json!({"phase": "Active"});
            let spec = object
                .as_object_mut()
                .map(|o| o.entry("spec").or_insert_with(|| json!({})));
            if let Some(spec) = spec
                && spec.get("finalizers").is_none()
            {
                spec["finalizers"] = json!(["kubernetes"]);
            }
        }
        ("", "pods") => {
            let qos = defaults::qos_class(object);
            object["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        ("", "services") => {
            object["status"] = json!({"loadBalancer": {}});
        }
        // The node agent reports Node status itself, at creation too.
        ("", "nodes") => {}
        _ if rt.has(Subresource::Status) => {
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
        }
        _ => {}
    }
    defaults::apply(rt, object);
}

/// Carries server-owned fields from `old` into `new` for an update of the
/// main resource (`subresource == None`) or of its status.
pub fn prepare_update(
    rt: &ResourceType,
    new: &mut Value,
    old: &Value,
    subresource: Option<Subresource>,
) {
    if subresource == Some(Subresource::Finalize) {
        // Only the namespace's spec.finalizers changes through /finalize.
        let finalizers = new.pointer("/spec/finalizers").cloned();
        let mut merged = old.clone();
        match finalizers {
            Some(list) => merged["spec"]["finalizers"] = list,
            None => {
                if let Some(spec) = merged.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.remove("finalizers");
                }
            }
        }
        *new = merged;
        return;
    }
    if subresource == Some(Subresource::Status) {
        // Only status changes through /status: everything else stays.
        let status = new.get("status").cloned();
        let mut merged = old.clone();
        match status {
            Some(status) => merged["status"] = status,
            None => {
                if let Some(map) = merged.as_object_mut() {
                    map.remove("status");
                }
            }
        }
        *new = merged;
        return;
    }
    if let (Some(new_meta), Some(Value::Object(old_meta))) =
        (super::objects::metadata_mut(new), old.get("metadata"))
    {
        for owned in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "namespace",
            "name",
        ] {
            match old_meta.get(owned) {
                Some(value) => new_meta.insert(owned.into(), value.clone()),
                None => new_meta.remove(owned),
            };
        }
    }
    // The main resource does not change status when a status subresource
    // exists: controllers write it through /status.
    if rt.has(Subresource::Status) && rt.plural != "nodes" {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(map) = new.as_object_mut() {
                    map.remove("status");
                }
            }
        }
    }
    defaults::apply(rt, new);
    if tracks_generation(new) && new.get("spec") != old.get("spec") {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if let Some(meta) = super::objects::metadata_mut(new) {
            meta.insert("generation".into(), json!(generation + 1));
        }
    }
}

/// Kind-specific validation beyond what the typed structs enforce.
pub fn validate(rt: &ResourceType, object: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let empty = Map::new();
    let meta = object
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    validation::check_metadata(meta, name_rule(rt), &mut causes);
    match (rt.group, rt.plural) {
        ("", "pods") => {
            if let Some(spec) = object.get("spec") {
                pod_spec(spec, "spec", &[], &mut causes);
            } else {
                causes.push(Cause::required("spec"));
            }
        }
        ("apps", "deployments" | "replicasets" | "statefulsets" | "daemonsets") => {
            workload(object, &mut causes);
        }
        ("batch", "jobs") => {
            if let Some(spec) = object.pointer("/spec/template/spec") {
                pod_spec(spec, "spec.template.spec", &[], &mut causes);
            } else {
                causes.push(Cause::required("spec.template.spec"));
            }
        }
        ("", "services") => service(object, &mut causes),
        ("", "configmaps" | "secrets") => data_keys(object, &mut causes),
        _ => {}
    }
    causes
}

/// The names of a pod's volumes, each checked: the node agent makes a
/// folder of each name, so it must be a DNS-1123 label, as upstream
/// requires, and unique.
fn pod_volumes<'a>(spec: &'a Value, path: &str, causes: &mut Vec<Cause>) -> Vec<&'a str> {
    let mut names = Vec::new();
    let Some(list) = spec.get("volumes").and_then(Value::as_array) else {
        return names;
    };
    for (i, volume) in list.iter().enumerate() {
        let at = format!("{path}.volumes[{i}].name");
        match volume.get("name").and_then(Value::as_str) {
            None | Some("") => causes.push(Cause::required(at)),
            Some(name) => {
                if let Some(problem) = validation::dns1123_label(name) {
                    causes.push(Cause::invalid(at, name, problem));
                } else if names.contains(&name) {
                    causes.push(Cause::duplicate(at, name));
                } else {
                    names.push(name);
                }
            }
        }
    }
    names
}

/// A container's volume mounts name one of the pod's volumes, and a
/// `subPath` stays below the volume: relative, without `..`.
fn volume_mounts(container: &Value, at: &str, volumes: &[&str], causes: &mut Vec<Cause>) {
    let Some(mounts) = container.get("volumeMounts").and_then(Value::as_array) else {
        return;
    };
    for (j, mount) in mounts.iter().enumerate() {
        let here = format!("{at}.volumeMounts[{j}]");
        match mount.get("name").and_then(Value::as_str) {
            None | Some("") => causes.push(Cause::required(format!("{here}.name"))),
            Some(name) if !volumes.contains(&name) => {
                causes.push(Cause::not_found(format!("{here}.name"), name));
            }
            Some(_) => {}
        }
        if mount
            .get("mountPath")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            causes.push(Cause::required(format!("{here}.mountPath")));
        }
        for field in ["subPath", "subPathExpr"] {
            let Some(sub) = mount.get(field).and_then(Value::as_str) else {
                continue;
            };
            if sub.starts_with('/') {
                causes.push(Cause::invalid(
                    format!("{here}.{field}"),
                    sub,
                    "must be a relative path",
                ));
            } else if sub.split('/').any(|part| part == "..") {
                causes.push(Cause::invalid(
                    format!("{here}.{field}"),
                    sub,
                    "must not contain '..'",
                ));
            }
        }
    }
}

/// A pod spec at `path`; `claims` are the names of volumes the pods get
/// besides the spec's own (a StatefulSet's claim templates).
fn pod_spec(spec: &Value, path: &str, claims: &[&str], causes: &mut Vec<Cause>) {
    let containers = spec.get("containers").and_then(Value::as_array);
    match containers {
        None => causes.push(Cause::required(format!("{path}.containers"))),
        Some(list) if list.is_empty() => causes.push(Cause::required(format!("{path}.containers"))),
        Some(_) => {}
    }
    let mut volumes = pod_volumes(spec, path, causes);
    volumes.extend(claims);
    let mut names: Vec<&str> = Vec::new();
    for field in ["initContainers", "containers"] {
        let Some(list) = spec.get(field).and_then(Value::as_array) else {
            continue;
        };
        for (i, container) in list.iter().enumerate() {
            let at = format!("{path}.{field}[{i}]");
            match container.get("name").and_then(Value::as_str) {
                None | Some("") => causes.push(Cause::required(format!("{at}.name"))),
                Some(name) => {
                    if let Some(problem) = validation::dns1123_label(name) {
                        causes.push(Cause::invalid(format!("{at}.name"), name, problem));
                    }
                    if names.contains(&name) {
                        causes.push(Cause::duplicate(format!("{at}.name"), name));
                    }
                    names.push(name);
                }
            }
            if container
                .get("image")
                .and_then(Value::as_str)
                .is_none_or(|s| s.trim().is_empty())
            {
                causes.push(Cause::required(format!("{at}.image")));
            }
            volume_mounts(container, &at, &volumes, causes);
            if let Some(ports) = container.get("ports").and_then(Value::as_array) {
                for (j, port) in ports.iter().enumerate() {
                    let number = port.get("containerPort").and_then(Value::as_i64);
                    if !number.is_some_and(|n| (1..=65535).contains(&n)) {
                        causes.push(Cause::invalid(
                            format!("{at}.ports[{j}].containerPort"),
                            &number.unwrap_or(0).to_string(),
                            "must be between 1 and 65535, inclusive",
                        ));
                    }
                }
            }
        }
    }
    if let Some(policy) = spec.get("restartPolicy").and_then(Value::as_str)
        && !["Always", "OnFailure", "Never"].contains(&policy)
    {
        causes.push(Cause::unsupported(
            format!("{path}.restartPolicy"),
            policy,
            &["Always", "OnFailure", "Never"],
        ));
    }
}

fn workload(object: &Value, causes: &mut Vec<Cause>) {
    if let Some(replicas) = object.pointer("/spec/replicas").and_then(Value::as_i64)
        && replicas < 0
    {
        causes.push(Cause::invalid(
            "spec.replicas",
            &replicas.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    let selector = object.pointer("/spec/selector");
    let match_labels = selector
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object);
    let has_expressions = selector
        .and_then(|s| s.get("matchExpressions"))
        .and_then(Value::as_array)
        .is_some_and(|e| !e.is_empty());
    if match_labels.is_none_or(|m| m.is_empty()) && !has_expressions {
        causes.push(Cause::required("spec.selector"));
    }
    let labels = object
        .pointer("/spec/template/metadata/labels")
        .and_then(Value::as_object);
    if let Some(wanted) = match_labels {
        let selects = wanted
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        if !selects {
            causes.push(Cause::invalid(
                "spec.template.metadata.labels",
                &labels
                    .map(|l| Value::Object(l.clone()).to_string())
                    .unwrap_or_default(),
                "`selector` does not match template `labels`",
            ));
        }
    }
    // A StatefulSet's pods also get a volume for each claim template.
    let claims: Vec<&str> = object
        .pointer("/spec/volumeClaimTemplates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|claim| claim.pointer("/metadata/name").and_then(Value::as_str))
        .collect();
    match object.pointer("/spec/template/spec") {
        Some(spec) => pod_spec(spec, "spec.template.spec", &claims, causes),
        None => causes.push(Cause::required("spec.template.spec")),
    }
}

fn service(object: &Value, causes: &mut Vec<Cause>) {
    let kind = object
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    const TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    if !TYPES.contains(&kind) {
        causes.push(Cause::unsupported("spec.type", kind, TYPES));
    }
    let headless = object.pointer("/spec/clusterIP").and_then(Value::as_str) == Some("None");
    let ports = object
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if ports.is_empty() && kind != "ExternalName" && !headless {
        causes.push(Cause::required("spec.ports"));
    }
    if kind == "ExternalName"
        && object
            .pointer("/spec/externalName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        causes.push(Cause::required("spec.externalName"));
    }
    let mut seen = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let number = port.get("port").and_then(Value::as_i64);
        if !number.is_some_and(|n| (1..=65535).contains(&n)) {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &number.unwrap_or(0).to_string(),
                "must be between 1 and 65535, inclusive",
            ));
        }
        let name = port.get("name").and_then(Value::as_str).unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            causes.push(Cause::required(format!("spec.ports[{i}].name")));
        }
        let protocol = port
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP");
        let key = (number, protocol);
        if seen.contains(&key) {
            causes.push(Cause::duplicate(
                format!("spec.ports[{i}]"),
                &format!("{}/{protocol}", number.unwrap_or(0)),
            ));
        }
        seen.push(key);
    }
}

/// ConfigMap and Secret keys: `[-._a-zA-Z0-9]+`, not `.` or `..`.
fn data_keys(object: &Value, causes: &mut Vec<Cause>) {
    for field in ["data", "binaryData", "stringData"] {
        let Some(map) = object.get(field).and_then(Value::as_object) else {
            continue;
        };
        for key in map.keys() {
            let ok = !key.is_empty()
                && key.len() <= 253
                && key != "."
                && key != ".."
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok {
                causes.push(Cause::invalid(
                    format!("{field}[{key}]"),
                    key,
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::apiserver::resources::Registry;

    fn pod_causes(spec: Value) -> Vec<(String, &'static str)> {
        let registry = Registry::new();
        let pods = registry.get("", "v1", "pods").expect("pods are served");
        let pod = json!({"metadata": {"name": "p"}, "spec": spec});
        validate(pods, &pod)
            .into_iter()
            .map(|c| (c.field, c.reason))
            .collect()
    }

    #[test]
    fn volume_names_and_mounts_are_checked() {
        let container = |mounts: Value| json!({"name": "c", "image": "i", "volumeMounts": mounts});
        let ok = pod_causes(json!({
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [container(json!([{"name": "data", "mountPath": "/d", "subPath": "a/b"}]))],
        }));
        assert!(ok.is_empty(), "{ok:?}");

        // The agent makes a folder of each volume's name.
        let causes = pod_causes(json!({
            "volumes": [{"name": "../../etc", "emptyDir": {}}, {"name": "x", "emptyDir": {}}, {"name": "x", "emptyDir": {}}],
            "containers": [container(json!([
                {"name": "../../etc", "mountPath": "/d"},
                {"name": "x", "mountPath": "/e", "subPath": "../up"},
                {"name": "x", "mountPath": "/f", "subPathExpr": "/abs"},
                {"name": "x"},
            ]))],
        }));
        let want = [
            ("spec.volumes[0].name", "FieldValueInvalid"),
            ("spec.volumes[2].name", "FieldValueDuplicate"),
            (
                "spec.containers[0].volumeMounts[0].name",
                "FieldValueNotFound",
            ),
            (
                "spec.containers[0].volumeMounts[1].subPath",
                "FieldValueInvalid",
            ),
            (
                "spec.containers[0].volumeMounts[2].subPathExpr",
                "FieldValueInvalid",
            ),
            (
                "spec.containers[0].volumeMounts[3].mountPath",
                "FieldValueRequired",
            ),
        ];
        let got: Vec<(&str, &str)> = causes.iter().map(|(f, r)| (f.as_str(), *r)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_statefulset_mounts_its_claim_templates() {
        let registry = Registry::new();
        let sets = registry
            .get("apps", "v1", "statefulsets")
            .expect("statefulsets are served");
        let set = |claim: &str| {
            json!({
                "metadata": {"name": "web"},
                "spec": {
                    "selector": {"matchLabels": {"app": "web"}},
                    "volumeClaimTemplates": [{"metadata": {"name": claim}}],
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "c", "image": "i",
                            "volumeMounts": [{"name": "data", "mountPath": "/d"}]}]}
                    }
                }
            })
        };
        assert!(validate(sets, &set("data")).is_empty());
        let causes = validate(sets, &set("other"));
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].reason, "FieldValueNotFound");
    }
}
