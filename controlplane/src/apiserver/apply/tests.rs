//! Unit tests: managedFields as upstream writes them, merging, pruning and
//! conflicts.

use serde_json::{Value, json};

use super::fieldset::FieldSet;
use super::schema::{self, Shape};
use super::*;

const T0: &str = "2025-01-01T00:00:00Z";
const T1: &str = "2025-01-01T00:01:00Z";
const T2: &str = "2025-01-01T00:02:00Z";

fn deployment() -> KindRef<'static> {
    KindRef::new("apps", "Deployment")
}

fn config(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [
                    {"name": "app", "image": image, "ports": [{"containerPort": 80}]}
                ]}
            }
        }
    })
}

/// A configuration of the same Deployment that says only what `spec` says.
fn partial(spec: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": spec
    })
}

/// What the store holds after a write: the object plus server-set metadata.
fn stored(mut object: Value) -> Value {
    object["metadata"]["uid"] = json!("0b9c2f7e");
    object["metadata"]["resourceVersion"] = json!("7");
    object["metadata"]["creationTimestamp"] = json!(T0);
    object
}

fn create(config: &Value, manager: &str) -> Value {
    stored(apply(deployment(), None, config, manager, false, T0).expect("create by apply"))
}

fn apply_ok(live: &Value, config: &Value, manager: &str, now: &str) -> Value {
    stored(apply(deployment(), Some(live), config, manager, false, now).expect("apply"))
}

fn entries(object: &Value) -> Vec<Value> {
    object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn entry(object: &Value, manager: &str, operation: &str) -> Option<Value> {
    entries(object)
        .into_iter()
        .find(|e| e["manager"] == manager && e["operation"] == operation)
}

fn fields(object: &Value, manager: &str, operation: &str) -> Value {
    entry(object, manager, operation).map_or(Value::Null, |e| e["fieldsV1"].clone())
}

fn owns(object: &Value, manager: &str, operation: &str, path: &[&str]) -> bool {
    let mut node = fields(object, manager, operation);
    for step in path {
        node = node[*step].clone();
    }
    node.is_object()
}

fn without_managed_fields(object: &Value) -> Value {
    let mut object = object.clone();
    set_managed_fields(&mut object, None);
    object
}

/// An update by `manager` that changes `object` with `edit`.
fn update(object: &Value, manager: &str, now: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut new = object.clone();
    edit(&mut new);
    record_update(deployment(), Some(object), &mut new, manager, now);
    new
}

fn conflicts_of(result: Result<Value, ApplyError>) -> Vec<Conflict> {
    match result {
        Err(ApplyError::Conflict { conflicts }) => conflicts,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

const CONTAINER_APP: &str = r#"k:{"name":"app"}"#;
const PORT_80: &str = r#"k:{"containerPort":80,"protocol":"TCP"}"#;

#[test]
fn create_by_apply_owns_exactly_the_applied_fields() {
    let created = apply(
        deployment(),
        None,
        &config("nginx:1.27"),
        "kubectl",
        false,
        T0,
    )
    .expect("create by apply");
    assert_eq!(without_managed_fields(&created), config("nginx:1.27"));
    assert_eq!(
        entries(&created),
        vec![json!({
            "manager": "kubectl",
            "operation": "Apply",
            "apiVersion": "apps/v1",
            "time": T0,
            "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:selector": {},
                    "f:template": {
                        "f:metadata": {"f:labels": {"f:app": {}}},
                        "f:spec": {"f:containers": {CONTAINER_APP: {
                            ".": {},
                            "f:image": {},
                            "f:name": {},
                            "f:ports": {PORT_80: {".": {}, "f:containerPort": {}}}
                        }}}
                    }
                }
            }
        })]
    );
}

#[test]
fn reapplying_a_changed_image_updates_it() {
    let live = create(&config("nginx:1.27"), "kubectl");
    let result = apply_ok(&live, &config("nginx:1.28"), "kubectl", T1);
    assert_eq!(
        result["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.28"
    );
    let mine = entry(&result, "kubectl", "Apply").expect("apply entry");
    assert_eq!(mine["time"], T1);
    assert_eq!(mine["fieldsV1"], fields(&live, "kubectl", "Apply"));
    assert_eq!(result["metadata"]["uid"], live["metadata"]["uid"]);
}

#[test]
fn reapplying_the_same_configuration_changes_nothing() {
    let live = create(&config("nginx:1.27"), "kubectl");
    let result = apply(
        deployment(),
        Some(&live),
        &config("nginx:1.27"),
        "kubectl",
        false,
        T1,
    )
    .expect("apply");
    assert_eq!(result, live);
}

#[test]
fn fields_dropped_from_the_configuration_are_removed() {
    let mut first = config("nginx:1.27");
    first["metadata"]["labels"]["tier"] = json!("front");
    first["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "sidecar", "image": "busybox"}));
    let live = create(&first, "kubectl");

    let mut second = config("nginx:1.27");
    second["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("replicas");
    let result = apply_ok(&live, &second, "kubectl", T1);

    assert_eq!(result["metadata"]["labels"], json!({"app": "web"}));
    assert!(result["spec"].get("replicas").is_none());
    let containers = &result["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers.as_array().map(Vec::len), Some(1));
    assert_eq!(containers[0]["name"], "app");
    assert!(!owns(
        &result,
        "kubectl",
        "Apply",
        &["f:spec", "f:replicas"]
    ));
}

#[test]
fn a_dropped_field_someone_else_owns_stays() {
    let mut with_tier = config("nginx:1.27");
    with_tier["metadata"]["labels"]["tier"] = json!("front");
    let live = create(&with_tier, "a");
    let tier_only = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"tier": "front"}}
    });
    let shared = apply_ok(&live, &tier_only, "b", T1);
    assert!(owns(
        &shared,
        "b",
        "Apply",
        &["f:metadata", "f:labels", "f:tier"]
    ));

    let result = apply_ok(&shared, &config("nginx:1.27"), "a", T2);
    assert_eq!(result["metadata"]["labels"]["tier"], "front");
    assert!(!owns(
        &result,
        "a",
        "Apply",
        &["f:metadata", "f:labels", "f:tier"]
    ));
    assert!(owns(
        &result,
        "b",
        "Apply",
        &["f:metadata", "f:labels", "f:tier"]
    ));
}

#[test]
fn an_updated_field_conflicts_and_force_takes_it_over() {
    let live = create(&config("nginx:1.27"), "kubectl");
    let scaled = update(&live, "kubectl-client-side-apply", T1, |d| {
        d["spec"]["replicas"] = json!(5);
    });
    assert!(!owns(
        &scaled,
        "kubectl",
        "Apply",
        &["f:spec", "f:replicas"]
    ));
    assert!(owns(
        &scaled,
        "kubectl-client-side-apply",
        "Update",
        &["f:spec", "f:replicas"]
    ));

    let mut again = config("nginx:1.28");
    again["spec"]["replicas"] = json!(3);
    let error =
        apply(deployment(), Some(&scaled), &again, "kubectl", false, T2).expect_err("a conflict");
    assert_eq!(error.status_code(), 409);
    assert_eq!(error.reason(), "Conflict");
    assert_eq!(
        error.to_string(),
        r#"Apply failed with 1 conflict: conflict with "kubectl-client-side-apply" using apps/v1: .spec.replicas"#
    );
    let conflicts = conflicts_of(Err(error));
    assert_eq!(
        conflicts,
        vec![Conflict {
            manager: "kubectl-client-side-apply".to_owned(),
            owner: r#""kubectl-client-side-apply" using apps/v1"#.to_owned(),
            field: ".spec.replicas".to_owned(),
        }]
    );
    assert_eq!(
        conflicts[0].message(),
        r#"conflict with "kubectl-client-side-apply" using apps/v1"#
    );

    let forced = stored(
        apply(deployment(), Some(&scaled), &again, "kubectl", true, T2).expect("forced apply"),
    );
    assert_eq!(forced["spec"]["replicas"], 3);
    assert!(owns(&forced, "kubectl", "Apply", &["f:spec", "f:replicas"]));
    // The updater owned nothing else, so its entry is gone.
    assert_eq!(entry(&forced, "kubectl-client-side-apply", "Update"), None);
}

#[test]
fn a_scale_conflict_names_the_subresource() {
    let live = create(&config("nginx:1.27"), "kubectl");
    let mut scaled = live.clone();
    scaled["spec"]["replicas"] = json!(5);
    record_subresource_update(deployment(), "scale", &live, &mut scaled, "kubectl", T1);
    let scaler = entry(&scaled, "kubectl", "Update").expect("scale entry");
    assert_eq!(scaler["subresource"], "scale");
    assert_eq!(scaler["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));

    let error = apply(
        deployment(),
        Some(&scaled),
        &config("nginx:1.27"),
        "kubectl",
        false,
        T2,
    )
    .expect_err("a conflict");
    assert_eq!(
        error.to_string(),
        r#"Apply failed with 1 conflict: conflict with "kubectl" with subresource "scale" using apps/v1: .spec.replicas"#
    );
}

#[test]
fn applying_the_live_value_shares_the_field() {
    let live = create(&config("nginx:1.27"), "a");
    let scaled = update(&live, "hpa", T1, |d| d["spec"]["replicas"] = json!(3));
    let mut same = config("nginx:1.27");
    same["spec"]["replicas"] = json!(3);
    let shared = apply_ok(&scaled, &same, "a", T2);
    assert!(owns(&shared, "a", "Apply", &["f:spec", "f:replicas"]));
    assert!(owns(&shared, "hpa", "Update", &["f:spec", "f:replicas"]));

    // Changing a shared field conflicts with the other owner.
    let mut more = same.clone();
    more["spec"]["replicas"] = json!(4);
    let conflicts = conflicts_of(apply(deployment(), Some(&shared), &more, "a", false, T2));
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].manager, "hpa");
}

#[test]
fn containers_merge_by_name_across_managers() {
    let live = create(&config("nginx:1.27"), "a");
    let sidecar = partial(json!({"template": {"spec": {"containers": [
        {"name": "sidecar", "image": "busybox"}
    ]}}}));
    let both = apply_ok(&live, &sidecar, "b", T1);
    let names: Vec<&Value> = both["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .map(|c| &c["name"])
        .collect();
    assert_eq!(names, vec!["app", "sidecar"]);
    let path = ["f:spec", "f:template", "f:spec", "f:containers"];
    assert_eq!(
        fields(&both, "b", "Apply"),
        json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {
            r#"k:{"name":"sidecar"}"#: {".": {}, "f:image": {}, "f:name": {}}
        }}}}})
    );
    assert!(owns(
        &both,
        "a",
        "Apply",
        &[path[0], path[1], path[2], path[3], CONTAINER_APP]
    ));

    // Each manager re-applying its own container leaves the other's alone.
    let result = apply_ok(&both, &config("nginx:1.28"), "a", T2);
    let containers = &result["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["image"], "nginx:1.28");
    assert_eq!(containers[1]["name"], "sidecar");
}

#[test]
fn ports_are_keyed_by_number_and_protocol() {
    let mut dns = config("coredns");
    dns["spec"]["template"]["spec"]["containers"][0]["ports"] = json!([
        {"containerPort": 53, "protocol": "UDP", "name": "dns"},
        {"containerPort": 53, "name": "dns-tcp"}
    ]);
    let live = create(&dns, "a");
    let ports = &fields(&live, "a", "Apply")["f:spec"]["f:template"]["f:spec"]["f:containers"]
        [CONTAINER_APP]["f:ports"];
    assert_eq!(
        ports,
        &json!({
            r#"k:{"containerPort":53,"protocol":"TCP"}"#: {".": {}, "f:containerPort": {}, "f:name": {}},
            r#"k:{"containerPort":53,"protocol":"UDP"}"#: {".": {}, "f:containerPort": {}, "f:name": {}, "f:protocol": {}}
        })
    );

    // The server defaulted the protocol; the configuration still leaves it out.
    let mut defaulted = live.clone();
    defaulted["spec"]["template"]["spec"]["containers"][0]["ports"][1]["protocol"] = json!("TCP");
    let mut tcp_only = dns.clone();
    tcp_only["spec"]["template"]["spec"]["containers"][0]["ports"] =
        json!([{"containerPort": 53, "name": "dns-tcp"}]);
    let result = apply_ok(&defaulted, &tcp_only, "a", T1);
    assert_eq!(
        result["spec"]["template"]["spec"]["containers"][0]["ports"],
        json!([{"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"}])
    );
}

#[test]
fn labels_are_owned_one_by_one() {
    let live = create(&config("nginx:1.27"), "a");
    let team = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"team": "blue"}}
    });
    let both = apply_ok(&live, &team, "b", T1);
    assert_eq!(
        both["metadata"]["labels"],
        json!({"app": "web", "team": "blue"})
    );
    assert_eq!(
        fields(&both, "b", "Apply"),
        json!({"f:metadata": {"f:labels": {"f:team": {}}}})
    );
    assert!(owns(
        &both,
        "a",
        "Apply",
        &["f:metadata", "f:labels", "f:app"]
    ));
    assert!(!owns(
        &both,
        "a",
        "Apply",
        &["f:metadata", "f:labels", "f:team"]
    ));

    // b dropping its label removes only that label.
    let gone = apply_ok(
        &both,
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}),
        "b",
        T2,
    );
    assert_eq!(gone["metadata"]["labels"], json!({"app": "web"}));
    assert_eq!(entry(&gone, "b", "Apply"), None);
}

#[test]
fn a_create_gives_the_creator_every_field_it_wrote() {
    let mut new = config("nginx:1.27");
    record_update(deployment(), None, &mut new, "kubectl-create", T0);
    assert_eq!(
        entries(&new),
        vec![json!({
            "manager": "kubectl-create",
            "operation": "Update",
            "apiVersion": "apps/v1",
            "time": T0,
            "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:selector": {},
                    "f:template": {
                        "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                        "f:spec": {"f:containers": {CONTAINER_APP: {
                            ".": {},
                            "f:image": {},
                            "f:name": {},
                            "f:ports": {".": {}, PORT_80: {".": {}, "f:containerPort": {}}}
                        }}}
                    }
                }
            }
        })]
    );
}

#[test]
fn an_update_that_changes_nothing_keeps_managed_fields() {
    let mut created = config("nginx:1.27");
    record_update(deployment(), None, &mut created, "creator", T0);
    let created = stored(created);
    let same = update(&created, "creator", T1, |_| {});
    assert_eq!(same, created);
    let other = update(&created, "someone", T1, |_| {});
    assert_eq!(other, created);
}

#[test]
fn an_update_takes_changed_fields_from_other_managers() {
    let live = create(&config("nginx:1.27"), "a");
    let edited = update(&live, "kubectl-edit", T1, |d| {
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.28");
    });
    let image = [
        "f:spec",
        "f:template",
        "f:spec",
        "f:containers",
        CONTAINER_APP,
        "f:image",
    ];
    assert!(!owns(&edited, "a", "Apply", &image));
    assert!(owns(&edited, "kubectl-edit", "Update", &image));
    assert!(owns(&edited, "a", "Apply", &["f:spec", "f:replicas"]));
    assert_eq!(
        entry(&edited, "kubectl-edit", "Update").expect("entry")["time"],
        T1
    );
    // Entries are listed appliers first.
    assert_eq!(entries(&edited)[0]["operation"], "Apply");
}

#[test]
fn a_removal_takes_ownership_away_without_giving_any() {
    let live = create(&config("nginx:1.27"), "a");
    let removed = update(&live, "cleaner", T1, |d| {
        d["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("labels");
    });
    assert!(!owns(&removed, "a", "Apply", &["f:metadata"]));
    assert_eq!(entry(&removed, "cleaner", "Update"), None);
}

#[test]
fn objects_without_managed_fields_are_owned_by_nobody() {
    let mut old = without_managed_fields(&create(&config("nginx:1.27"), "x"));
    old["spec"]["replicas"] = json!(5);
    let result = apply_ok(&old, &config("nginx:1.28"), "a", T1);
    assert_eq!(result["spec"]["replicas"], 2);
    assert_eq!(entries(&result).len(), 1);
}

#[test]
fn conflicts_with_several_managers_are_grouped() {
    let live = create(&config("nginx:1.27"), "a");
    let scaled = update(&live, "b", T1, |d| d["spec"]["replicas"] = json!(5));
    let edited = update(&scaled, "c", T1, |d| {
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.26");
        d["metadata"]["labels"]["app"] = json!("old");
    });
    let error = apply(
        deployment(),
        Some(&edited),
        &config("nginx:1.28"),
        "a",
        false,
        T2,
    )
    .expect_err("conflicts");
    assert_eq!(
        error.to_string(),
        "Apply failed with 3 conflicts: conflicts with \"b\" using apps/v1:\n\
         - .spec.replicas\n\
         conflicts with \"c\" using apps/v1:\n\
         - .metadata.labels.app\n\
         - .spec.template.spec.containers[name=\"app\"].image"
    );
}

#[test]
fn the_default_manager_is_the_user_agent_program() {
    assert_eq!(
        default_manager(Some("kubectl/v1.33.1 (linux/amd64) kubernetes/8adc0f0")),
        "kubectl"
    );
    assert_eq!(default_manager(Some("python-requests")), "python-requests");
    assert_eq!(default_manager(None), "");
    assert_eq!(default_manager(Some("a\u{7}b/1")), "ab");
    let long = "é".repeat(100);
    let manager = default_manager(Some(&long));
    assert_eq!(manager.len(), 128);
    assert!(manager.chars().all(|c| c == 'é'));
}

#[test]
fn field_managers_are_checked() {
    assert!(validate_manager("kubectl", true).is_ok());
    assert!(validate_manager("", false).is_ok());
    let required = validate_manager("", true).expect_err("required");
    assert_eq!(required.status_code(), 400);
    assert!(validate_manager(&"m".repeat(129), false).is_err());
    assert!(validate_manager("tab\there", false).is_err());
    assert!(apply(deployment(), None, &config("x"), "", false, T0).is_err());
}

#[test]
fn fields_v1_round_trips() {
    let upstream = json!({
        "f:metadata": {"f:annotations": {".": {}, "f:deployment.kubernetes.io/revision": {}}},
        "f:spec": {"f:template": {"f:spec": {
            "f:containers": {r#"k:{"name":"nginx"}"#: {".": {}, "f:image": {}}},
            "f:finalizers": {r#"v:"example.com/x""#: {}}
        }}},
        "f:status": {"f:conditions": {
            r#"k:{"type":"Available"}"#: {".": {}, "f:status": {}, "f:type": {}}
        }}
    });
    let set = FieldSet::from_fields_v1(&upstream).expect("decodes");
    assert_eq!(set.to_fields_v1(), upstream);
    // Keys are canonical whatever their spelling.
    let respelled = json!({"f:ports": {r#"k:{ "protocol": "TCP", "containerPort": 80.0 }"#: {}}});
    assert_eq!(
        FieldSet::from_fields_v1(&respelled)
            .expect("decodes")
            .to_fields_v1(),
        json!({"f:ports": {PORT_80: {}}})
    );
    assert!(FieldSet::from_fields_v1(&json!({"x:y": {}})).is_err());
    assert!(FieldSet::from_fields_v1(&json!({"f:a": []})).is_err());
}

#[test]
fn malformed_configurations_are_refused() {
    let mut nameless = config("nginx");
    nameless["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .expect("container")
        .remove("name");
    let error = apply(deployment(), None, &nameless, "a", false, T0).expect_err("invalid");
    assert_eq!(error.status_code(), 422);
    assert_eq!(
        error.to_string(),
        "failed to create typed patch object (default/web; apps/v1, Kind=Deployment): \
         .spec.template.spec.containers: element 0: associative list with keys has an \
         element that omits key field \"name\" (and doesn't have default value)"
    );

    let mut twice = config("nginx");
    let container = twice["spec"]["template"]["spec"]["containers"][0].clone();
    twice["spec"]["template"]["spec"]["containers"] = json!([container.clone(), container]);
    let error = apply(deployment(), None, &twice, "a", false, T0).expect_err("invalid");
    assert!(
        error
            .to_string()
            .ends_with(r#".spec.template.spec.containers: duplicate entries for key [name="app"]"#),
        "{error}"
    );

    let mut managed = config("nginx");
    managed["metadata"]["managedFields"] = json!([]);
    let error = apply(deployment(), None, &managed, "a", false, T0).expect_err("bad request");
    assert_eq!(
        error,
        ApplyError::BadRequest("metadata.managedFields must be nil".into())
    );

    let mut pod = config("nginx");
    pod["kind"] = json!("Pod");
    assert_eq!(
        apply(deployment(), None, &pod, "a", false, T0)
            .expect_err("wrong kind")
            .to_string(),
        "Incorrect kind specified in apply patch. Specified patch kind: Pod, expected: Deployment"
    );
    let mut core = config("nginx");
    core["apiVersion"] = json!("v1");
    assert!(apply(deployment(), None, &core, "a", false, T0).is_err());
    assert!(apply(deployment(), None, &json!([1]), "a", false, T0).is_err());
}

#[test]
fn deep_configurations_are_refused_without_recursion_trouble() {
    // Built by hand: `json!` would serialize (recursively) the value it wraps.
    let mut deep = json!("leaf");
    for _ in 0..5000 {
        let mut level = serde_json::Map::new();
        level.insert("x".to_owned(), deep);
        deep = Value::Object(level);
    }
    let mut body = config("nginx");
    body["spec"]["deep"] = deep;
    let error = apply(deployment(), None, &body, "a", false, T0).expect_err("too deep");
    assert_eq!(error.status_code(), 400);
    // Dropping it iteratively: serde_json's own drop would recurse 5000 deep.
    let mut pending = vec![body];
    while let Some(mut value) = pending.pop() {
        if let Value::Object(map) = &mut value {
            pending.extend(std::mem::take(map).into_iter().map(|(_, v)| v));
        }
    }
}

#[test]
fn apply_leaves_the_status_alone() {
    let mut live = create(&config("nginx:1.27"), "a");
    live["status"] = json!({"replicas": 2, "readyReplicas": 1});
    let mut with_status = config("nginx:1.28");
    with_status["status"] = json!({"replicas": 9});
    with_status["metadata"]["uid"] = json!("forged");
    with_status["metadata"]["creationTimestamp"] = Value::Null;
    let result = apply_ok(&live, &with_status, "a", T1);
    assert_eq!(result["status"], live["status"]);
    assert_eq!(result["metadata"]["uid"], "0b9c2f7e");
    assert!(!owns(&result, "a", "Apply", &["f:status"]));
    assert!(!owns(&result, "a", "Apply", &["f:metadata", "f:uid"]));
}

#[test]
fn kubectl_takes_over_fields_from_its_client_side_apply() {
    let mut csa = config("nginx:1.27");
    let annotation = format!("{}\n", config("nginx:1.27"));
    csa["metadata"]["annotations"] = json!({LAST_APPLIED: annotation});
    record_update(
        deployment(),
        None,
        &mut csa,
        "kubectl-client-side-apply",
        T0,
    );
    let live = stored(csa);

    // Another manager conflicts on the image.
    let conflicts = conflicts_of(apply(
        deployment(),
        Some(&live),
        &config("nginx:1.28"),
        "deployer",
        false,
        T1,
    ));
    assert_eq!(
        conflicts[0].field,
        r#".spec.template.spec.containers[name="app"].image"#
    );

    // kubectl's own server-side apply upgrades without conflict.
    let upgraded = apply_ok(&live, &config("nginx:1.28"), "kubectl", T1);
    let image = [
        "f:spec",
        "f:template",
        "f:spec",
        "f:containers",
        CONTAINER_APP,
        "f:image",
    ];
    assert!(owns(&upgraded, "kubectl", "Apply", &image));
    assert!(!owns(
        &upgraded,
        "kubectl-client-side-apply",
        "Update",
        &image
    ));
    assert_eq!(
        upgraded["metadata"]["annotations"][LAST_APPLIED],
        format!("{}\n", config("nginx:1.28"))
    );

    // A field changed since the last client-side apply is still a conflict.
    let edited = update(&live, "kubectl-client-side-apply", T1, |d| {
        d["spec"]["replicas"] = json!(7);
    });
    let conflicts = conflicts_of(apply(
        deployment(),
        Some(&edited),
        &config("nginx:1.28"),
        "kubectl",
        false,
        T2,
    ));
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].field, ".spec.replicas");
}

#[test]
fn update_entries_are_capped() {
    let mut object = create(&config("nginx:1.27"), "a");
    for n in 0..12 {
        let time = format!("2025-01-01T01:{n:02}:00Z");
        object = update(&object, &format!("writer-{n}"), &time, |d| {
            d["metadata"]["labels"][format!("l{n}")] = json!("x");
        });
    }
    let all = entries(&object);
    let updaters: Vec<&Value> = all.iter().filter(|e| e["operation"] == "Update").collect();
    assert_eq!(updaters.len(), 10);
    let ancient = entry(&object, "ancient-changes", "Update").expect("folded entry");
    assert_eq!(ancient["time"], "2025-01-01T01:02:00Z");
    let labels = &ancient["fieldsV1"]["f:metadata"]["f:labels"];
    for n in 0..3 {
        assert!(labels[format!("f:l{n}")].is_object(), "{labels}");
    }
    assert_eq!(entry(&object, "writer-2", "Update"), None);
    assert!(entry(&object, "writer-3", "Update").is_some());
}

#[test]
fn merged_lists_follow_the_configuration_order() {
    let mut live = config("unused");
    live["spec"]["template"]["spec"]["containers"] = json!([
        {"name": "a", "image": "a"}, {"name": "b", "image": "b"}, {"name": "c", "image": "c"}
    ]);
    let reordered = partial(json!({"template": {"spec": {"containers": [
        {"name": "c", "image": "c2"}, {"name": "a", "image": "a2"}
    ]}}}));
    let result = apply_ok(&stored(live), &reordered, "x", T1);
    assert_eq!(
        result["spec"]["template"]["spec"]["containers"],
        json!([
            {"name": "b", "image": "b"}, {"name": "c", "image": "c2"}, {"name": "a", "image": "a2"}
        ])
    );

    let mut live = config("unused");
    live["spec"]["template"]["spec"]["containers"] =
        json!([{"name": "a", "image": "a"}, {"name": "b", "image": "b"}]);
    let inserted = partial(json!({"template": {"spec": {"containers": [
        {"name": "new", "image": "n"}, {"name": "b", "image": "b"}
    ]}}}));
    let result = apply_ok(&stored(live), &inserted, "x", T1);
    let names: Vec<&Value> = result["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .map(|c| &c["name"])
        .collect();
    assert_eq!(names, vec!["a", "new", "b"]);
}

#[test]
fn finalizers_are_a_set() {
    let mut live = without_managed_fields(&create(&config("nginx"), "a"));
    live["metadata"]["finalizers"] = json!(["example.com/keep"]);
    let mut body = config("nginx");
    body["metadata"]["finalizers"] = json!(["example.com/mine"]);
    let result = apply_ok(&live, &body, "a", T1);
    assert_eq!(
        result["metadata"]["finalizers"],
        json!(["example.com/keep", "example.com/mine"])
    );
    assert_eq!(
        fields(&result, "a", "Apply")["f:metadata"]["f:finalizers"],
        json!({r#"v:"example.com/mine""#: {}})
    );
    let dropped = apply_ok(&result, &config("nginx"), "a", T2);
    assert_eq!(
        dropped["metadata"]["finalizers"],
        json!(["example.com/keep"])
    );
}

#[test]
fn status_writes_own_only_the_status() {
    let live = create(&config("nginx:1.27"), "a");
    let mut new = live.clone();
    new["status"] = json!({
        "replicas": 2,
        "conditions": [{"type": "Available", "status": "True"}]
    });
    new["spec"]["replicas"] = json!(9);
    record_subresource_update(
        deployment(),
        "status",
        &live,
        &mut new,
        "kube-controller-manager",
        T1,
    );
    let controller = entry(&new, "kube-controller-manager", "Update").expect("entry");
    assert_eq!(controller["subresource"], "status");
    assert_eq!(
        controller["fieldsV1"],
        json!({"f:status": {
            ".": {},
            "f:conditions": {
                ".": {},
                r#"k:{"type":"Available"}"#: {".": {}, "f:status": {}, "f:type": {}}
            },
            "f:replicas": {}
        }})
    );
    assert!(owns(&new, "a", "Apply", &["f:spec", "f:replicas"]));

    // A main-resource update does not take status fields from the controller.
    let later = update(&new, "someone", T2, |d| d["status"]["replicas"] = json!(0));
    assert_eq!(
        entry(&later, "kube-controller-manager", "Update").map(|e| e["fieldsV1"].clone()),
        Some(controller["fieldsV1"].clone())
    );
}

#[test]
fn atomic_structs_and_maps_are_owned_whole() {
    let mut body = config("nginx");
    body["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "u-1"
    }]);
    body["spec"]["template"]["spec"]["nodeSelector"] = json!({"disk": "ssd"});
    body["spec"]["template"]["spec"]["containers"][0]["env"] = json!([{
        "name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}
    }]);
    let created = create(&body, "a");
    let mine = fields(&created, "a", "Apply");
    assert_eq!(
        mine["f:metadata"]["f:ownerReferences"],
        json!({r#"k:{"uid":"u-1"}"#: {}})
    );
    let pod_spec = &mine["f:spec"]["f:template"]["f:spec"];
    assert_eq!(pod_spec["f:nodeSelector"], json!({}));
    assert_eq!(
        pod_spec["f:containers"][CONTAINER_APP]["f:env"],
        json!({r#"k:{"name":"POD"}"#: {".": {}, "f:name": {}, "f:valueFrom": {"f:fieldRef": {}}}})
    );
}

#[test]
fn a_single_empty_entry_clears_managed_fields() {
    let live = create(&config("nginx:1.27"), "a");
    let mut reset = live.clone();
    reset["metadata"]["managedFields"] = json!([{}]);
    record_update(deployment(), Some(&live), &mut reset, "resetter", T1);
    assert_eq!(reset["metadata"].get("managedFields"), None);

    // An empty list is not a reset: clients unaware of managedFields send it.
    let mut unaware = live.clone();
    unaware["metadata"]["managedFields"] = json!([]);
    record_update(deployment(), Some(&live), &mut unaware, "unaware", T1);
    assert_eq!(entries(&unaware), entries(&live));
}

#[test]
fn kinds_without_a_table_still_track_fields() {
    let role = KindRef::new("rbac.authorization.k8s.io", "Role");
    let body = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "r", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    });
    let created = apply(role, None, &body, "a", false, T0).expect("create");
    assert_eq!(
        created["metadata"]["managedFields"][0]["fieldsV1"],
        json!({"f:rules": {}})
    );
}

#[test]
fn prune_removes_a_struct_nobody_owns_any_more() {
    let mut first = config("nginx");
    first["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2}});
    let mut live = create(&first, "a");
    // A default the server filled in, owned by nobody.
    live["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = json!("25%");
    let mut second = config("nginx");
    second["spec"]["strategy"] = json!({"type": "RollingUpdate"});
    let result = apply_ok(&live, &second, "a", T1);
    assert_eq!(result["spec"]["strategy"], json!({"type": "RollingUpdate"}));
}

#[test]
fn field_sets_answer_membership() {
    let mut set = FieldSet::default();
    let path = [
        PathElement::Field("spec".into()),
        PathElement::Field("replicas".into()),
    ];
    set.insert(&path);
    assert!(set.contains(&path));
    assert!(!set.contains(&path[..1]));
    assert_eq!(set.paths(), vec![path.to_vec()]);
}

/// The shape at `path`; `[]` steps into the items of a list.
fn shape_at(kind: KindRef<'_>, path: &str) -> String {
    let mut shape = schema::root(kind);
    for step in path.split('.') {
        shape = match (step, shape) {
            ("[]", Shape::ListMap(list)) => list.item(),
            ("[]", _) => return format!("no items at {step}"),
            (name, shape) => shape.child(name),
        };
    }
    match shape {
        Shape::Struct(_) => "struct".to_owned(),
        Shape::Map => "map".to_owned(),
        Shape::Atomic => "atomic".to_owned(),
        Shape::Set => "set".to_owned(),
        Shape::ListMap(list) => {
            let items = match list.item() {
                Shape::Atomic => " of atomic items",
                _ => "",
            };
            format!("map by {}{items}", list.keys().join(","))
        }
    }
}

#[test]
fn apply_shapes_follow_the_list_and_map_types() {
    let pod = KindRef::new("", "Pod");
    let cases = [
        (pod, "metadata.labels", "map"),
        (pod, "metadata.finalizers", "set"),
        (
            pod,
            "metadata.ownerReferences",
            "map by uid of atomic items",
        ),
        (pod, "spec.containers", "map by name"),
        (
            pod,
            "spec.containers.[].ports",
            "map by containerPort,protocol",
        ),
        (
            pod,
            "spec.initContainers.[].ports",
            "map by containerPort,protocol",
        ),
        (pod, "spec.containers.[].env", "map by name"),
        (
            pod,
            "spec.containers.[].env.[].valueFrom.secretKeyRef",
            "atomic",
        ),
        (pod, "spec.containers.[].volumeMounts", "map by mountPath"),
        (pod, "spec.containers.[].args", "atomic"),
        (pod, "spec.containers.[].resources.limits", "map"),
        (
            pod,
            "spec.containers.[].resources.claims",
            "map by name of atomic items",
        ),
        (pod, "spec.containers.[].securityContext", "struct"),
        (pod, "spec.imagePullSecrets", "map by name of atomic items"),
        (pod, "spec.nodeSelector", "atomic"),
        (pod, "spec.tolerations", "atomic"),
        (pod, "spec.volumes", "map by name"),
        (
            pod,
            "spec.topologySpreadConstraints",
            "map by topologyKey,whenUnsatisfiable",
        ),
        (
            pod,
            "spec.topologySpreadConstraints.[].labelSelector",
            "atomic",
        ),
        (
            pod,
            "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution",
            "atomic",
        ),
        (deployment(), "spec.selector", "atomic"),
        (
            deployment(),
            "spec.template.spec.containers.[].ports",
            "map by containerPort,protocol",
        ),
        (
            KindRef::new("", "Service"),
            "spec.ports",
            "map by port,protocol",
        ),
        (KindRef::new("", "Service"), "spec.selector", "atomic"),
        (
            KindRef::new("", "ReplicationController"),
            "spec.selector",
            "atomic",
        ),
        (
            KindRef::new("", "PersistentVolume"),
            "spec.claimRef",
            "atomic",
        ),
        (
            KindRef::new("", "PersistentVolumeClaim"),
            "spec.dataSource",
            "atomic",
        ),
        (KindRef::new("", "ConfigMap"), "data", "map"),
        (
            KindRef::new("networking.k8s.io", "Ingress"),
            "spec.rules",
            "atomic",
        ),
    ];
    for (kind, path, expected) in cases {
        assert_eq!(shape_at(kind, path), expected, "{} {path}", kind.kind);
    }
}

/// What the general comparison finds added or modified, as FieldsV1.
fn changed_by_comparison(kind: KindRef<'_>, old: &Value, new: &Value) -> Value {
    let keep = |parent: &[PathElement], name: &str| is_tracked(Scope::Main, parent, name);
    let comparison = compare::compare_where(old, new, schema::root(kind), &keep);
    let mut changed = comparison.added;
    changed.union_with(&comparison.modified);
    changed.to_fields_v1()
}

#[test]
fn fields_v1_written_during_the_walk_match_the_comparison() {
    let pod = KindRef::new("", "Pod");
    let service = KindRef::new("", "Service");
    let full_pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default", "uid": "u",
            "labels": {"app": "web"}, "annotations": {}, "finalizers": ["a", "b", "a"]},
        "spec": {
            "containers": [
                {"name": "app", "image": "nginx", "ports": [
                    {"containerPort": 80, "protocol": "TCP"},
                    {"containerPort": 80, "protocol": "UDP"}],
                 "env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}],
                 "args": ["x", "y"], "resources": {"requests": {"cpu": "100m"}}},
                {"name": "side", "image": "busybox", "volumeMounts": null}
            ],
            "volumes": [],
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "nodeSelector": {"disk": "ssd"},
            "securityContext": {}
        },
        "status": {"phase": "Pending"}
    });
    let cases = [
        // Creates: against the kind's skeleton.
        (pod, schema::skeleton(pod), full_pod.clone()),
        (
            deployment(),
            schema::skeleton(deployment()),
            config("nginx:1"),
        ),
        (
            service,
            schema::skeleton(service),
            json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}, {"port": 80, "protocol": "UDP"}], "selector": {"app": "web"}, "type": "ClusterIP"}}),
        ),
        // A field of the wrong type where the skeleton has a struct, and
        // containers that cannot be keyed.
        (
            deployment(),
            schema::skeleton(deployment()),
            json!({"spec": {"strategy": "fast", "template": {"spec": {"containers": [{"image": "x"}]}}}}),
        ),
        (
            pod,
            schema::skeleton(pod),
            json!({"metadata": {"name": "p"}}),
        ),
        (pod, schema::skeleton(pod), json!({})),
        // Updates: added, modified and removed at once.
        (pod, full_pod.clone(), {
            let mut new = full_pod.clone();
            new["spec"]["containers"][0]["image"] = json!("nginx:2");
            new["spec"]["containers"][1] = json!({"name": "other", "image": "busybox"});
            new["metadata"]["labels"] = json!({"tier": "web"});
            new["spec"]["nodeSelector"] = Value::Null;
            new
        }),
        (deployment(), config("nginx:1"), config("nginx:2")),
    ];
    for (kind, old, new) in &cases {
        let keep = |parent: &[PathElement], name: &str| is_tracked(Scope::Main, parent, name);
        let written = compare::changed_fields_v1(old, new, schema::root(*kind), &keep);
        assert_eq!(
            Value::Object(written),
            changed_by_comparison(*kind, old, new),
            "{new}"
        );
    }
}

#[test]
fn a_create_owns_what_it_set_as_the_comparison_finds() {
    let mut created = config("nginx:1");
    record_update(deployment(), None, &mut created, "kubectl", T0);
    let expected = changed_by_comparison(
        deployment(),
        &schema::skeleton(deployment()),
        &without_managed_fields(&created),
    );
    assert_eq!(fields(&created, "kubectl", "Update"), expected);
    assert_eq!(entries(&created).len(), 1);
    assert_eq!(entry(&created, "kubectl", "Update").unwrap()["time"], T0);

    // Nothing tracked set: no entry at all.
    let mut bare = json!({"apiVersion": "apps/v1", "kind": "Deployment"});
    record_update(deployment(), None, &mut bare, "kubectl", T0);
    assert!(bare.pointer("/metadata/managedFields").is_none(), "{bare}");
}
