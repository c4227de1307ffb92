//! A container's environment: `env` (values, `valueFrom`), `envFrom`,
//! the image's variables underneath, and `$(VAR)` expansion in values,
//! command and args, as upstream does it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};

use crate::resources;

/// Where `valueFrom` and `envFrom` look things up.
pub trait Sources {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap>;
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret>;
}

/// The environment as `NAME=value` lines, in order: image variables
/// first, then the Service variables, then `envFrom` and `env`.
pub fn build(
    pod: &Pod,
    container: &Container,
    image_env: &[String],
    service_env: &[(String, String)],
    pod_ip: Option<&str>,
    host_ip: &str,
    sources: &dyn Sources,
) -> Result<Vec<(String, String)>, String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, name: String, value: String| {
        if let Some(slot) = vars.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            vars.push((name, value));
        }
    };
    for line in image_env {
        if let Some((name, value)) = line.split_once('=') {
            set(&mut vars, name.to_owned(), value.to_owned());
        }
    }
    for (name, value) in service_env {
        set(&mut vars, name.clone(), value.clone());
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(cm_ref) = &from.config_map_ref {
            let optional = cm_ref.optional.unwrap_or(false);
            match sources.config_map(namespace, &cm_ref.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        set(&mut vars, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if optional => {}
                None => return Err(format!("configmap \"{}\" not found", cm_ref.name)),
            }
        }
        if let Some(s_ref) = &from.secret_ref {
            let optional = s_ref.optional.unwrap_or(false);
            match sources.secret(namespace, &s_ref.name) {
                Some(secret) => {
                    for (k, v) in secret_data(&secret) {
                        set(&mut vars, format!("{prefix}{k}"), v);
                    }
                }
                None if optional => {}
                None => return Err(format!("secret \"{}\" not found", s_ref.name)),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            let size: usize = vars.iter().map(|(n, v)| n.len() + v.len()).sum();
            if size > MAX_ENVIRONMENT {
                return Err(format!(
                    "the environment is larger than {MAX_ENVIRONMENT} bytes"
                ));
            }
            let lookup: BTreeMap<&str, &str> =
                vars.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            expand(value, &lookup).map_err(|e| format!("env {}: {e}", var.name))?
        } else if let Some(from) = &var.value_from {
            let value = if let Some(r) = &from.config_map_key_ref {
                let object = sources.config_map(namespace, &r.name);
                let missing = object.is_none();
                let found = object.and_then(|cm| cm.data.and_then(|d| d.get(&r.key).cloned()));
                match found {
                    Some(v) => Some(v),
                    None if r.optional.unwrap_or(false) => None,
                    None if missing => return Err(format!("configmap \"{}\" not found", r.name)),
                    None => {
                        return Err(format!(
                            "couldn't find key {} in ConfigMap {namespace}/{}",
                            r.key, r.name
                        ));
                    }
                }
            } else if let Some(r) = &from.secret_key_ref {
                let object = sources.secret(namespace, &r.name);
                let missing = object.is_none();
                let found = object.and_then(|s| secret_data(&s).remove(&r.key));
                match found {
                    Some(v) => Some(v),
                    None if r.optional.unwrap_or(false) => None,
                    None if missing => return Err(format!("secret \"{}\" not found", r.name)),
                    None => {
                        return Err(format!(
                            "couldn't find key {} in Secret {namespace}/{}",
                            r.key, r.name
                        ));
                    }
                }
            } else if let Some(r) = &from.field_ref {
                Some(field(pod, &r.field_path, pod_ip, host_ip)?)
            } else if let Some(r) = &from.resource_field_ref {
                let target = match r.container_name.as_deref() {
                    Some(name) if !name.is_empty() => pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.containers.iter().find(|c| c.name == name))
                        .unwrap_or(container),
                    _ => container,
                };
                let divisor = r
                    .divisor
                    .as_ref()
                    .and_then(|d| resources::parse_quantity(&d.0))
                    .filter(|d| *d > 0.0)
                    .unwrap_or(1.0);
                Some(resource_field(target, &r.resource, divisor)?)
            } else {
                None
            };
            match value {
                Some(v) => v,
                None => continue,
            }
        } else {
            String::new()
        };
        set(&mut vars, var.name.clone(), value);
    }
    Ok(vars)
}

/// `fieldRef` values upstream supports in env.
pub fn field(pod: &Pod, path: &str, pod_ip: Option<&str>, host_ip: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.unwrap_or_default().to_owned(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_owned(),
        "metadata.labels" => map_lines(meta.labels.as_ref()),
        "metadata.annotations" => map_lines(meta.annotations.as_ref()),
        other => {
            let key = |prefix: &str| {
                other
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix("']"))
                    .map(str::to_owned)
            };
            if let Some(k) = key("metadata.labels['") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&k))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(k) = key("metadata.annotations['") {
                meta.annotations
                    .as_ref()
                    .and_then(|l| l.get(&k))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(format!("unsupported fieldRef {other:?}"));
            }
        }
    };
    Ok(value)
}

/// `resourceFieldRef`: limits default to the node's capacity, as upstream.
pub fn resource_field(c: &Container, resource: &str, divisor: f64) -> Result<String, String> {
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {resource:?}"))?;
    let units = |name: &str, value: u64| -> f64 {
        if name == "cpu" {
            value as f64 / 1000.0
        } else {
            value as f64
        }
    };
    let value = match kind {
        "limits" => resources::limit(c, name)
            .map(|v| units(name, v))
            .unwrap_or_else(|| {
                if name == "cpu" {
                    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
                } else {
                    node_memory_bytes() as f64
                }
            }),
        "requests" => resources::request(c, name).map_or(0.0, |v| units(name, v)),
        _ => return Err(format!("unsupported resource {resource:?}")),
    };
    Ok(format!("{}", (value / divisor).ceil() as u64))
}

/// Expands `$(VAR)` from `vars`; `$$` escapes; unknown names stay as written.
pub fn expand(input: &str, vars: &BTreeMap<&str, &str>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        // Each variable may refer to the ones before it twice over, so
        // forty of them could double a value forty times.
        if out.len() > MAX_EXPANDED {
            return Err(format!(
                "{input:?} expands to more than {MAX_EXPANDED} bytes"
            ));
        }
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    if out.len() > MAX_EXPANDED {
        return Err(format!(
            "{input:?} expands to more than {MAX_EXPANDED} bytes"
        ));
    }
    Ok(out)
}

/// The longest value `$(VAR)` expansion may produce: 1 MiB, half of what
/// Linux lets a process start with in all its arguments and environment.
const MAX_EXPANDED: usize = 1 << 20;
/// The most the environment may hold before another variable is expanded
/// against it: Linux would not start a process with more anyway.
const MAX_ENVIRONMENT: usize = 2 << 20;

pub fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone());
    }
    out
}

fn map_lines(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn node_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion() {
        let vars = BTreeMap::from([("A", "1")]);
        assert_eq!(expand("x$(A)y", &vars).unwrap(), "x1y");
        assert_eq!(expand("$(B)", &vars).unwrap(), "$(B)");
        assert_eq!(expand("$$(A)", &vars).unwrap(), "$(A)");
        assert_eq!(expand("a$b", &vars).unwrap(), "a$b");
        assert_eq!(expand("$(A", &vars).unwrap(), "$(A");
    }

    struct NoSources;
    impl Sources for NoSources {
        fn config_map(&self, _: &str, name: &str) -> Option<ConfigMap> {
            (name == "cm").then(|| ConfigMap {
                data: Some(BTreeMap::from([("k".into(), "v".into())])),
                ..ConfigMap::default()
            })
        }
        fn secret(&self, _: &str, _: &str) -> Option<Secret> {
            None
        }
    }

    #[test]
    fn env_sources() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "x"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c",
                "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
                "resources": {"limits": {"memory": "64Mi"}},
                "env": [
                    {"name": "A", "value": "a"},
                    {"name": "B", "value": "$(A)-b"},
                    {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
                    {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "M", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                    {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "x", "optional": true}}}
                ]}]}
        }))
        .unwrap();
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let env = build(
            &pod,
            c,
            &["PATH=/bin".into()],
            &[("SVC_SERVICE_HOST".into(), "10.43.0.5".into())],
            Some("10.0.0.1"),
            "1.1.1.1",
            &NoSources,
        )
        .unwrap();
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("CM_k"), Some("v"));
        assert_eq!(get("B"), Some("a-b"));
        assert_eq!(get("K"), Some("v"));
        assert_eq!(get("N"), Some("p"));
        assert_eq!(get("L"), Some("x"));
        assert_eq!(get("IP"), Some("10.0.0.1"));
        assert_eq!(get("M"), Some("64"));
        assert_eq!(get("S"), None);
    }

    #[test]
    fn doubling_expansions_are_refused_not_built() {
        // A1 = A0 twice, A2 = A1 twice, ...: forty would be 16 TiB.
        let mut env = vec![serde_json::json!({"name": "A0", "value": "x".repeat(16)})];
        for i in 1..=40 {
            let before = format!("$(A{})", i - 1);
            env.push(
                serde_json::json!({"name": format!("A{i}"), "value": format!("{before}{before}")}),
            );
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "env": env}]}
        }))
        .unwrap();
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let error = build(&pod, c, &[], &[], None, "1.1.1.1", &NoSources).unwrap_err();
        assert!(
            error.contains("expands to more than") || error.contains("environment is larger"),
            "{error}"
        );
        // Each reference to A doubles in length: 512 KiB of them expand to
        // more than 1 MiB.
        let vars = BTreeMap::from([("A", "12345678")]);
        let refs = "$(A)".repeat(MAX_EXPANDED / 8 + 1);
        assert!(expand(&refs, &vars).is_err());
        assert!(expand(&refs[..4 * 1000], &vars).is_ok_and(|v| v.len() == 8000));
    }
}
