//! The `scale` subresource: an `autoscaling/v1` Scale view of a workload's
//! replicas, which `kubectl scale` and autoscalers read and write.

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};

use super::handlers::{Reply, read, write_update};
use super::request::{BodyFormat, Query, decode_body};
use super::resources::ResourceType;
use super::status::{ApiError, Cause};
use super::{ApiState, objects};

#[allow(clippy::too_many_arguments)]
pub async fn serve(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    method: &Method,
    headers: &HeaderMap,
    query: &Query,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let dry_run = query.dry_run()?;
    let manager = query
        .get("fieldManager")
        .map(str::to_owned)
        .unwrap_or_else(|| {
            super::apply::default_manager(
                headers
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok()),
            )
        });
    let written = match *method {
        Method::GET => {
            let kv = read(state, rt, ns, name).await?;
            let object = objects::decode(&kv.value, kv.mod_revision)?;
            return Ok(Reply::value(StatusCode::OK, &to_scale(&object)));
        }
        Method::PUT => {
            let scale = decode_body(BodyFormat::of(headers)?, &body)?;
            let precondition = objects::meta_str(&scale, "resourceVersion")
                .filter(|rv| !rv.is_empty())
                .map(|rv| {
                    rv.parse::<i64>().map_err(|_| {
                        ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                    })
                })
                .transpose()?;
            let replicas = replicas_of(rt, name, &scale)?;
            write_update(
                state,
                rt,
                ns,
                name,
                None,
                precondition,
                dry_run,
                Some(&manager),
                |current| Ok(with_replicas(current, replicas)),
            )
            .await?
        }
        Method::PATCH => {
            let content_type = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let patch_type = super::patch::PatchType::from_content_type(content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
            write_update(
                state,
                rt,
                ns,
                name,
                None,
                None,
                dry_run,
                Some(&manager),
                |current| {
                    let scale = to_scale(current);
                    let patched =
                        super::patch_value("autoscaling", "Scale", &scale, patch_type, &body)?;
                    let replicas = replicas_of(rt, name, &patched)?;
                    Ok(with_replicas(current, replicas))
                },
            )
            .await?
        }
        _ => {
            return Err(ApiError::method_not_allowed(format!(
                "method {method} is not allowed on scale"
            )));
        }
    };
    let object: Value = serde_json::from_slice(written.body())
        .map_err(|e| ApiError::internal(format!("re-reading the scaled object: {e}")))?;
    Ok(Reply::value(StatusCode::OK, &to_scale(&object)))
}

fn to_scale(object: &Value) -> Value {
    let meta = object.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let mut scale_meta = serde_json::Map::new();
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = meta.get(field) {
            scale_meta.insert(field.into(), v.clone());
        }
    }
    let replicas = object
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let current = object
        .pointer("/status/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": scale_meta,
        "spec": {"replicas": replicas},
        "status": {"replicas": current, "selector": selector_string(object.pointer("/spec/selector"))},
    })
}

fn with_replicas(current: &Value, replicas: i64) -> Value {
    let mut object = current.clone();
    object["spec"]["replicas"] = json!(replicas);
    object
}

fn replicas_of(rt: &ResourceType, name: &str, scale: &Value) -> Result<i64, ApiError> {
    match scale.pointer("/spec/replicas") {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(r) if r >= 0 => Ok(r),
            _ => Err(ApiError::invalid(
                rt,
                name,
                vec![Cause::invalid(
                    "spec.replicas",
                    &n.to_string(),
                    "must be greater than or equal to 0",
                )],
            )),
        },
        None | Some(Value::Null) => Ok(0),
        Some(other) => Err(ApiError::bad_request(format!(
            "spec.replicas must be an integer, got {other}"
        ))),
    }
}

/// A label selector in its string form (`app=web,tier in (a,b)`).
fn selector_string(selector: Option<&Value>) -> String {
    let Some(selector) = selector else {
        return String::new();
    };
    let mut parts = Vec::new();
    if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in labels {
            parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    if let Some(exprs) = selector.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e.get("operator").and_then(Value::as_str) {
                Some("In") => parts.push(format!("{key} in ({})", values.join(","))),
                Some("NotIn") => parts.push(format!("{key} notin ({})", values.join(","))),
                Some("Exists") => parts.push(key.to_owned()),
                Some("DoesNotExist") => parts.push(format!("!{key}")),
                _ => {}
            }
        }
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_view_of_a_deployment() {
        let deployment = json!({
            "metadata": {"name": "web", "namespace": "default", "resourceVersion": "5"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}},
            "status": {"replicas": 2}
        });
        let scale = to_scale(&deployment);
        assert_eq!(scale["spec"]["replicas"], 3);
        assert_eq!(scale["status"]["replicas"], 2);
        assert_eq!(scale["status"]["selector"], "app=web,tier in (a,b)");
        assert_eq!(scale["metadata"]["resourceVersion"], "5");
    }
}
