//! The rules of each strategic directive and of list ordering, case by case.

use serde_json::json;

use super::{containers, deployment, has_directive_keys, keys, patch_deployment, strategic};
use crate::apiserver::patch::PatchError;

#[test]
fn nulls_inside_new_values_are_dropped() {
    // `kubectl apply` of a field the live object lacks never stores nulls.
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"spec": {"template": {"spec": {"securityContext": {"runAsUser": 1000, "fsGroup": null}}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched["spec"]["template"]["spec"]["securityContext"],
        json!({"runAsUser": 1000})
    );
}

#[test]
fn replace_directive_on_a_map() {
    // `kubectl patch -p '{"metadata":{"labels":{"$patch":"replace","app":"new"}}}'`.
    let mut current = deployment(json!([{"name": "app"}]));
    current["metadata"]["labels"] = json!({"app": "web", "tier": "frontend"});
    let patch = json!({"metadata": {"labels": {"$patch": "replace", "app": "new"}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(patched["metadata"]["labels"], json!({"app": "new"}));
}

#[test]
fn delete_directive_on_a_map() {
    // `kubectl patch -p '{"spec":{"template":{"spec":{"securityContext":{"$patch":"delete"}}}}}'`:
    // upstream leaves an empty map where one existed, and nothing where none did.
    let mut current = deployment(json!([{"name": "app"}]));
    current["spec"]["template"]["spec"]["securityContext"] = json!({"runAsUser": 1000});
    let patch = json!({"spec": {"template": {"spec": {
        "securityContext": {"$patch": "delete"},
        "dnsConfig": {"$patch": "delete"}
    }}}});
    let patched = patch_deployment(&current, &patch);
    let spec = &patched["spec"]["template"]["spec"];
    assert_eq!(spec["securityContext"], json!({}));
    assert!(spec.get("dnsConfig").is_none());
}

#[test]
fn merge_directive_is_the_default() {
    // `$patch: merge` in a map or as a list item changes nothing.
    let current = deployment(json!([{"name": "app", "image": "app:1"}]));
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"$patch": "merge", "name": "app", "image": "app:2"},
        {"$patch": "merge"}
    ]}}, "strategy": {"$patch": "merge", "type": "Recreate"}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched),
        &json!([{"name": "app", "image": "app:2"}])
    );
    assert_eq!(patched["spec"]["strategy"]["type"], "Recreate");
    assert!(!has_directive_keys(&patched));
}

#[test]
fn deleting_an_absent_item_is_a_no_op() {
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"$patch": "delete", "name": "gone"}]}}}});
    assert_eq!(patch_deployment(&current, &patch), current);
}

#[test]
fn replace_directive_on_the_whole_object() {
    // A patch that starts with `$patch: replace` replaces the object's content.
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"$patch": "replace", "kind": "Deployment", "metadata": {"name": "web"}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched,
        json!({"kind": "Deployment", "metadata": {"name": "web"}})
    );
}

#[test]
fn delete_directive_on_the_whole_object_is_refused() {
    let current = deployment(json!([{"name": "app"}]));
    let error =
        strategic("apps", "Deployment", &current, &json!({"$patch": "delete"})).unwrap_err();
    assert!(matches!(error, PatchError::Invalid(_)), "{error:?}");
}

#[test]
fn delete_from_primitive_list_works_on_lists_without_a_strategy() {
    // Upstream applies deletion lists to any list of scalars.
    let current = deployment(json!([{"name": "app", "args": ["-a", "-b", "-c"]}]));
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "app", "$deleteFromPrimitiveList/args": ["-b"]}
    ]}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(containers(&patched)[0]["args"], json!(["-a", "-c"]));
}

#[test]
fn null_deletion_list_removes_the_list() {
    let mut current = deployment(json!([{"name": "app"}]));
    current["metadata"]["finalizers"] = json!(["a"]);
    let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": null}});
    let patched = patch_deployment(&current, &patch);
    assert!(patched["metadata"].get("finalizers").is_none());
}

#[test]
fn set_element_order_alone_reorders() {
    // `kubectl apply` after swapping two containers in the manifest: only the
    // order changes.
    let current = deployment(json!([{"name": "a", "image": "a"}, {"name": "b", "image": "b"}]));
    let patch = json!({"spec": {"template": {"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}]}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched),
        &json!([{"name": "b", "image": "b"}, {"name": "a", "image": "a"}])
    );
}

#[test]
fn set_element_order_for_an_absent_list_is_dropped() {
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"spec": {"template": {"spec": {"$setElementOrder/initContainers": [{"name": "init"}]}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(patched, current);
}

#[test]
fn server_only_items_keep_their_place_between_patch_items() {
    // Without `$setElementOrder`, items present in both keep the object's order,
    // and new items come before the server-only items that follow them.
    let current = deployment(json!([{"name": "a"}, {"name": "b"}, {"name": "c"}]));
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "d"},
        {"name": "b", "image": "b:2"}
    ]}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        keys(containers(&patched), "name"),
        [&json!("d"), &json!("a"), &json!("b"), &json!("c")]
    );
}

#[test]
fn set_union_keeps_existing_order_and_drops_duplicates() {
    let mut current = deployment(json!([{"name": "app"}]));
    current["metadata"]["finalizers"] = json!(["a", "b", "a"]);
    let patch = json!({"metadata": {"finalizers": ["b", "c", "c"]}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(patched["metadata"]["finalizers"], json!(["a", "b", "c"]));
}

#[test]
fn merge_keys_compare_numbers_by_value() {
    // A client that serialises ports as floats still matches the stored port.
    let current =
        deployment(json!([{"name": "app", "ports": [{"containerPort": 80, "name": "http"}]}]));
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "app", "ports": [{"containerPort": 80.0, "name": "web"}]}
    ]}}}});
    let patched = patch_deployment(&current, &patch);
    // Matched, not appended; like upstream, the patch's spelling of the key wins.
    assert_eq!(
        containers(&patched)[0]["ports"],
        json!([{"containerPort": 80.0, "name": "web"}])
    );
}

#[test]
fn directives_inside_new_values_are_applied_not_stored() {
    // A new init container carrying every kind of directive: none is stored.
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"spec": {"template": {"spec": {"initContainers": [{
        "name": "init",
        "$setElementOrder/env": [{"name": "A"}],
        "env": [{"name": "A", "value": "1"}, {"$patch": "delete", "name": "B"}],
        "$deleteFromPrimitiveList/args": ["x"],
        "securityContext": {"$retainKeys": ["runAsUser"], "runAsUser": 1},
        "resources": {"$patch": "delete"},
        "lifecycle": {"$patch": "replace", "preStop": {"exec": {"command": ["sleep", "1"]}}}
    }]}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched["spec"]["template"]["spec"]["initContainers"],
        json!([{
            "name": "init",
            "env": [{"name": "A", "value": "1"}],
            "securityContext": {"runAsUser": 1},
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", "1"]}}}
        }])
    );
}

#[test]
fn a_value_changing_json_type_is_replaced() {
    // `kubectl apply` turning a string into a map (or back) replaces the value.
    let mut current = deployment(json!([{"name": "app"}]));
    current["spec"]["extra"] = json!("text");
    let patch = json!({"spec": {"extra": {"nested": {"$patch": "replace", "a": 1}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(patched["spec"]["extra"], json!({"nested": {"a": 1}}));
}

#[test]
fn unknown_dollar_keys_are_ordinary_fields() {
    // Only the documented directives are special; upstream treats other keys
    // starting with `$` as data.
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"metadata": {"annotations": {"$weird": "x"}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(patched["metadata"]["annotations"], json!({"$weird": "x"}));
}

#[test]
fn long_lists_merge_in_linear_time() {
    // A request body near the size limit can hold ~100k list items; merging must
    // not be quadratic in them.
    let count = 50_000;
    let env: Vec<_> = (0..count)
        .map(|i| json!({"name": format!("V{i}"), "value": "old"}))
        .collect();
    let current = deployment(json!([{"name": "app", "env": env}]));
    let updates: Vec<_> = (0..count)
        .rev()
        .map(|i| json!({"name": format!("V{}", i * 2), "value": "new"}))
        .collect();
    let patch =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "env": updates}]}}}});
    let started = std::time::Instant::now();
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched)[0]["env"].as_array().map(Vec::len),
        Some(count + count / 2)
    );
    assert!(
        started.elapsed().as_secs() < 20,
        "took {:?}",
        started.elapsed()
    );
}
