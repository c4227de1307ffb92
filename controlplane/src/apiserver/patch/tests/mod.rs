//! Tests for patch application. Each strategic case names the kubectl action (or
//! controller) that sends such a patch.

mod directives;
mod errors;
mod json;
mod kubectl;
mod property;

use serde_json::{Value, json};

use super::{PatchError, PatchType, TypeRef, apply};

/// Applies a strategic merge patch to an object of kind `group`/`kind`.
fn strategic(group: &str, kind: &str, current: &Value, patch: &Value) -> Result<Value, PatchError> {
    apply(
        TypeRef::new(group, kind),
        current,
        PatchType::StrategicMerge,
        patch.to_string().as_bytes(),
    )
}

/// Applies a strategic merge patch to a Deployment, which must succeed.
fn patch_deployment(current: &Value, patch: &Value) -> Value {
    strategic("apps", "Deployment", current, patch).expect("the patch applies")
}

/// A Deployment whose pod template has `containers`.
fn deployment(containers: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": containers}
            }
        }
    })
}

/// The containers of a Deployment's pod template.
fn containers(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"]
}

/// The names of the items of a list of maps, by `key`.
fn keys<'v>(list: &'v Value, key: &str) -> Vec<&'v Value> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|item| &item[key])
        .collect()
}

/// Whether any map key anywhere in `value` starts with `$`.
fn has_directive_keys(value: &Value) -> bool {
    match value {
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.starts_with('$') || has_directive_keys(value)),
        Value::Array(items) => items.iter().any(has_directive_keys),
        _ => false,
    }
}
