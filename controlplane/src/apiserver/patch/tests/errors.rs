//! Malformed and inapplicable patches: always an error, never a panic.

use serde_json::{Value, json};

use super::{deployment, strategic};
use crate::apiserver::patch::{PatchError, PatchType, TypeRef, apply};

fn strategic_bytes(body: &[u8]) -> Result<Value, PatchError> {
    apply(
        TypeRef::new("apps", "Deployment"),
        &deployment(json!([{"name": "app"}])),
        PatchType::StrategicMerge,
        body,
    )
}

fn strategic_error(patch: Value) -> PatchError {
    strategic(
        "apps",
        "Deployment",
        &deployment(json!([{"name": "app", "env": []}])),
        &patch,
    )
    .expect_err("the patch is refused")
}

#[track_caller]
fn assert_bad_request(error: &PatchError, needle: &str) {
    assert!(
        matches!(error, PatchError::BadRequest(message) if message.contains(needle)),
        "expected BadRequest mentioning {needle:?}, got {error:?}"
    );
    assert_eq!(error.status_code(), 400);
}

#[track_caller]
fn assert_invalid(error: &PatchError, needle: &str) {
    assert!(
        matches!(error, PatchError::Invalid(message) if message.contains(needle)),
        "expected Invalid mentioning {needle:?}, got {error:?}"
    );
    assert_eq!(error.status_code(), 422);
}

#[test]
fn bodies_that_are_not_json_objects() {
    for body in [
        &b"[]"[..],
        b"\"text\"",
        b"42",
        b"null",
        b"{",
        b"",
        b"apiVersion: v1",
    ] {
        let error = strategic_bytes(body).expect_err("refused");
        assert_eq!(error.status_code(), 400, "{body:?}: {error:?}");
    }
}

#[test]
fn a_list_where_an_object_belongs() {
    assert_invalid(&strategic_error(json!({"metadata": []})), "metadata");
    assert_invalid(
        &strategic_error(json!({"metadata": {"labels": ["a"]}})),
        "ObjectMeta.labels",
    );
}

#[test]
fn an_object_where_a_list_belongs() {
    let error =
        strategic_error(json!({"spec": {"template": {"spec": {"containers": {"name": "app"}}}}}));
    assert_invalid(&error, "spec.template.spec.containers");
    assert_invalid(
        &strategic_error(json!({"metadata": {"finalizers": "a"}})),
        "finalizers",
    );
}

#[test]
fn an_item_without_its_merge_key() {
    // e.g. `kubectl patch` with a container missing its name.
    let error = strategic_error(
        json!({"spec": {"template": {"spec": {"containers": [{"image": "nginx"}]}}}}),
    );
    assert_bad_request(&error, "does not contain declared merge key: name");

    let error = strategic_error(
        json!({"spec": {"template": {"spec": {"containers": [{"$patch": "delete"}]}}}}),
    );
    assert_bad_request(&error, "does not contain declared merge key: name");

    let error = strategic_error(json!({"spec": {"template": {"spec": {"containers": [
        {"name": "app", "env": [{"value": "1"}]}
    ]}}}}));
    assert_bad_request(&error, "spec.template.spec.containers[name=\"app\"].env");
}

#[test]
fn a_scalar_in_a_list_of_maps() {
    let error = strategic_error(json!({"spec": {"template": {"spec": {"containers": ["nginx"]}}}}));
    assert_bad_request(&error, "expected a map");
}

#[test]
fn an_unknown_patch_directive() {
    let error = strategic_error(json!({"metadata": {"labels": {"$patch": "frobnicate"}}}));
    assert_bad_request(&error, "unknown patch type");
    let error = strategic_error(
        json!({"spec": {"template": {"spec": {"containers": [{"$patch": 1, "name": "app"}]}}}}),
    );
    assert_bad_request(&error, "unknown patch type");
}

#[test]
fn malformed_retain_keys() {
    assert_bad_request(
        &strategic_error(json!({"spec": {"strategy": {"$retainKeys": "type"}}})),
        "retainKeys",
    );
    // The patch sets a key that $retainKeys would drop.
    assert_bad_request(
        &strategic_error(
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "rollingUpdate": {"maxSurge": 1}}}}),
        ),
        "rollingUpdate",
    );
}

#[test]
fn malformed_set_element_order() {
    assert_bad_request(
        &strategic_error(json!({"metadata": {"$setElementOrder": ["a"]}})),
        "setElementOrder",
    );
    assert_bad_request(
        &strategic_error(json!({"metadata": {"$setElementOrder/": ["a"]}})),
        "setElementOrder",
    );
    assert_bad_request(
        &strategic_error(
            json!({"spec": {"template": {"spec": {"$setElementOrder/containers": {"name": "app"}}}}}),
        ),
        "setElementOrder",
    );
    assert_bad_request(
        &strategic_error(
            json!({"spec": {"template": {"spec": {"$setElementOrder/containers": [{"image": "x"}]}}}}),
        ),
        "merge key: name",
    );
    // The patch list names an item the order does not.
    let error = strategic_error(json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}],
        "containers": [{"name": "other"}]
    }}}}));
    assert_bad_request(&error, "doesn't match the $setElementOrder list");
    // Or names them in another order.
    let error = strategic_error(json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
        "containers": [{"name": "b"}, {"name": "a"}]
    }}}}));
    assert_bad_request(&error, "doesn't match");
    // The list next to the order is not a list.
    let error = strategic_error(json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}],
        "containers": {"name": "app"}
    }}}}));
    assert_bad_request(&error, "expected a list");
}

#[test]
fn malformed_delete_from_primitive_list() {
    assert_bad_request(
        &strategic_error(json!({"metadata": {"$deleteFromPrimitiveList/finalizers": "a"}})),
        "primitive list",
    );
    assert_bad_request(
        &strategic_error(json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [{"a": 1}]}})),
        "primitive list",
    );
    assert_bad_request(
        &strategic_error(json!({"metadata": {"$deleteFromPrimitiveListfinalizers": ["a"]}})),
        "primitive list",
    );
}

#[test]
fn malformed_sets() {
    assert_invalid(
        &strategic_error(json!({"metadata": {"finalizers": [["a"]]}})),
        "lists of lists",
    );
    assert_bad_request(
        &strategic_error(json!({"metadata": {"finalizers": [{"a": 1}]}})),
        "merge key",
    );
    let mut current = deployment(json!([{"name": "app"}]));
    current["metadata"]["finalizers"] = json!(["a"]);
    let error = strategic(
        "apps",
        "Deployment",
        &current,
        &json!({"metadata": {"finalizers": [1]}}),
    )
    .unwrap_err();
    assert_invalid(&error, "not identical");
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    // Just past our bound, and past serde_json's own recursion limit.
    for depth in [101, 150, 100_000] {
        let body = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        let error = strategic_bytes(body.as_bytes()).expect_err("refused");
        assert_eq!(error.status_code(), 400, "depth {depth}: {error:?}");
        let list_body = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let error = apply(
            TypeRef::new("", "Pod"),
            &json!({}),
            PatchType::Json,
            list_body.as_bytes(),
        )
        .expect_err("refused");
        assert_eq!(error.status_code(), 400, "depth {depth}: {error:?}");
    }
    // Nesting within the bound is fine.
    let body = format!("{}1{}", "{\"a\":".repeat(90), "}".repeat(90));
    strategic_bytes(body.as_bytes()).expect("applies");
}

#[test]
fn the_deepest_accepted_patch_fits_a_small_stack() {
    // Maps and lists alternating down to the depth bound, applied on a thread
    // with tokio's default 2 MiB stack, in a debug build.
    let levels = 50;
    let body = format!("{}1{}", "{\"a\":[".repeat(levels), "]}".repeat(levels));
    let worker = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || strategic_bytes(body.as_bytes()).map(|_| ()))
        .expect("thread starts");
    worker.join().expect("no stack overflow").expect("applies");
}

#[test]
fn server_side_apply_is_not_handled_here() {
    let error = apply(
        TypeRef::new("", "ConfigMap"),
        &json!({}),
        PatchType::Apply,
        b"apiVersion: v1\nkind: ConfigMap\n",
    )
    .unwrap_err();
    assert_eq!(error, PatchError::Unsupported(PatchType::Apply));
    assert_eq!(
        (error.status_code(), error.reason()),
        (415, "UnsupportedMediaType")
    );
}

#[test]
fn statuses_and_reasons() {
    let cases = [
        (PatchError::BadRequest("x".into()), 400, "BadRequest"),
        (PatchError::Invalid("x".into()), 422, "Invalid"),
        (
            PatchError::TooManyOperations { max: 1, got: 2 },
            413,
            "RequestEntityTooLarge",
        ),
        (
            PatchError::Unsupported(PatchType::Apply),
            415,
            "UnsupportedMediaType",
        ),
    ];
    for (error, status, reason) in cases {
        assert_eq!((error.status_code(), error.reason()), (status, reason));
    }
}

#[test]
fn content_types() {
    let cases = [
        ("application/json-patch+json", Some(PatchType::Json)),
        (
            "application/merge-patch+json; charset=utf-8",
            Some(PatchType::Merge),
        ),
        (
            "Application/Strategic-Merge-Patch+JSON",
            Some(PatchType::StrategicMerge),
        ),
        (
            "application/apply-patch+yaml ; charset=utf-8",
            Some(PatchType::Apply),
        ),
        ("application/json", None),
        ("", None),
    ];
    for (content_type, expected) in cases {
        assert_eq!(
            PatchType::from_content_type(content_type),
            expected,
            "{content_type}"
        );
    }
    for patch_type in [
        PatchType::Json,
        PatchType::Merge,
        PatchType::StrategicMerge,
        PatchType::Apply,
    ] {
        assert_eq!(
            PatchType::from_content_type(patch_type.content_type()),
            Some(patch_type)
        );
        assert_eq!(patch_type.to_string(), patch_type.content_type());
    }
}
