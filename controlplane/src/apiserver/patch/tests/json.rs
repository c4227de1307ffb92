//! JSON patch (RFC 6902) and JSON merge patch (RFC 7386).

use serde_json::{Value, json};

use super::deployment;
use crate::apiserver::patch::{PatchError, PatchType, TypeRef, apply};

fn json_patch(current: &Value, patch: &Value) -> Result<Value, PatchError> {
    apply(
        TypeRef::new("apps", "Deployment"),
        current,
        PatchType::Json,
        patch.to_string().as_bytes(),
    )
}

fn merge_patch(current: &Value, body: &[u8]) -> Result<Value, PatchError> {
    apply(
        TypeRef::new("apps", "Deployment"),
        current,
        PatchType::Merge,
        body,
    )
}

#[test]
fn rollout_undo_of_a_deployment() {
    // `kubectl rollout undo deployment/web` replaces the template and the
    // annotations with a JSON patch.
    let mut current = deployment(json!([{"name": "app", "image": "app:2"}]));
    current["metadata"]["annotations"] = json!({"deployment.kubernetes.io/revision": "2"});
    let template = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}});
    let patch = json!([
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "replace", "path": "/metadata/annotations", "value": {"deployment.kubernetes.io/revision": "1"}}
    ]);
    let patched = json_patch(&current, &patch).expect("applies");
    assert_eq!(patched["spec"]["template"], template);
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({"deployment.kubernetes.io/revision": "1"})
    );
}

#[test]
fn a_failed_test_operation_is_invalid_and_changes_nothing() {
    // `kubectl patch --type=json` guarded by a `test` operation.
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!([
        {"op": "replace", "path": "/spec/replicas", "value": 5},
        {"op": "test", "path": "/metadata/name", "value": "other"}
    ]);
    let error = json_patch(&current, &patch).unwrap_err();
    assert!(
        matches!(&error, PatchError::Invalid(message) if message.contains("/metadata/name")),
        "{error:?}"
    );
    assert_eq!(error.status_code(), 422);
    assert_eq!(current["spec"]["replicas"], 2);
}

#[test]
fn a_missing_path_is_invalid() {
    let current = deployment(json!([{"name": "app"}]));
    for patch in [
        json!([{"op": "remove", "path": "/metadata/annotations/absent"}]),
        json!([{"op": "add", "path": "/no/such/parent", "value": 1}]),
        json!([{"op": "replace", "path": "/spec/template/spec/containers/5/image", "value": "x"}]),
    ] {
        let error = json_patch(&current, &patch).unwrap_err();
        assert_eq!(error.status_code(), 422, "{patch}: {error:?}");
    }
}

#[test]
fn malformed_json_patches_are_bad_requests() {
    let current = deployment(json!([{"name": "app"}]));
    for patch in [
        json!({"op": "add", "path": "/a", "value": 1}),
        json!([{"op": "frobnicate", "path": "/a"}]),
        json!([{"op": "add", "value": 1}]),
        json!([{"op": "add", "path": "no-leading-slash", "value": 1}]),
        json!(["add"]),
    ] {
        let error = json_patch(&current, &patch).unwrap_err();
        assert_eq!(error.status_code(), 400, "{patch}: {error:?}");
    }
}

#[test]
fn too_many_operations() {
    let operations: Vec<Value> = (0..10_001)
        .map(|_| json!({"op": "test", "path": "/kind", "value": "Deployment"}))
        .collect();
    let error = json_patch(&deployment(json!([])), &Value::Array(operations)).unwrap_err();
    assert_eq!(
        error,
        PatchError::TooManyOperations {
            max: 10_000,
            got: 10_001
        }
    );
    assert_eq!(error.status_code(), 413);
}

#[test]
fn the_result_must_stay_an_object() {
    let error = json_patch(
        &deployment(json!([])),
        &json!([{"op": "replace", "path": "", "value": 7}]),
    )
    .unwrap_err();
    assert!(matches!(error, PatchError::Invalid(_)), "{error:?}");
}

#[test]
fn merge_patch_merges_maps_deletes_nulls_and_replaces_lists() {
    // `kubectl patch --type=merge`.
    let current = deployment(json!([{"name": "app"}, {"name": "sidecar"}]));
    let body = br#"{"metadata":{"labels":{"app":null,"tier":"web"}},"spec":{"template":{"spec":{"containers":[{"name":"only"}]}}}}"#;
    let patched = merge_patch(&current, body).expect("applies");
    assert_eq!(patched["metadata"]["labels"], json!({"tier": "web"}));
    assert_eq!(
        patched["spec"]["template"]["spec"]["containers"],
        json!([{"name": "only"}])
    );
    assert_eq!(patched["spec"]["replicas"], 2);
}

#[test]
fn merge_patch_bodies_must_be_objects() {
    let current = deployment(json!([]));
    for body in [&b"[]"[..], b"\"x\"", b"null", b"{"] {
        let error = merge_patch(&current, body).unwrap_err();
        assert_eq!(error.status_code(), 400, "{body:?}");
    }
}

#[test]
fn the_failing_operation_is_named_by_its_index() {
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!([
        {"op": "replace", "path": "/spec/replicas", "value": 5},
        {"op": "add", "path": "/metadata/labels/tier", "value": "web"},
        {"op": "remove", "path": "/metadata/annotations/absent"}
    ]);
    let error = json_patch(&current, &patch).unwrap_err();
    assert!(error.to_string().contains("operation '/2'"), "{error}");
}

#[test]
fn copies_cannot_double_the_object_without_bound() {
    // Each copy of /x into itself doubles it: thirty would need terabytes.
    let mut operations =
        vec![json!({"op": "add", "path": "/x", "value": {"s": "a".repeat(100_000)}})];
    operations
        .extend((1..=30).map(|k| json!({"op": "copy", "from": "/x", "path": format!("/x/k{k}")})));
    let error = json_patch(&deployment(json!([])), &Value::Array(operations)).unwrap_err();
    assert!(
        matches!(&error, PatchError::Invalid(message) if message.contains("copy operations duplicate more than")),
        "{error:?}"
    );
    assert_eq!(error.status_code(), 422);
    // Copies within the budget apply.
    let patched = json_patch(
        &deployment(json!([{"name": "app"}])),
        &json!([{"op": "copy", "from": "/spec/template/spec/containers/0", "path": "/spec/template/spec/containers/-"}]),
    )
    .unwrap();
    assert_eq!(
        patched["spec"]["template"]["spec"]["containers"][1]["name"],
        "app"
    );
}

#[test]
fn patches_cannot_nest_the_object_without_bound() {
    // Each copy of /x into its deepest object doubles its depth: fifteen would
    // nest it 30,000 levels, deep enough to overflow the stack on clone or drop.
    // After k copies /x holds a chain of 2^k - 1 objects under "a".
    let mut operations = vec![json!({"op": "add", "path": "/x", "value": {}})];
    for k in 0..15 {
        let target = format!("/x{}", "/a".repeat(1 << k));
        operations.push(json!({"op": "copy", "from": "/x", "path": target}));
    }
    let error = json_patch(&deployment(json!([])), &Value::Array(operations)).unwrap_err();
    assert!(
        matches!(&error, PatchError::Invalid(message) if message.contains("levels deep")),
        "{error:?}"
    );
    // So is a chain of adds, each one level below the last.
    let mut operations = vec![json!({"op": "add", "path": "/y", "value": {}})];
    let mut path = String::from("/y");
    for _ in 0..120 {
        path.push_str("/b");
        operations.push(json!({"op": "add", "path": path, "value": {}}));
    }
    let error = json_patch(&deployment(json!([])), &Value::Array(operations)).unwrap_err();
    assert_eq!(error.status_code(), 422, "{error:?}");
}
