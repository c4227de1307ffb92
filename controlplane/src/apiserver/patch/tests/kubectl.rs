//! Strategic merge patches as kubectl and the cluster's own components send them.

use serde_json::json;

use super::{containers, deployment, has_directive_keys, keys, patch_deployment, strategic};
use crate::apiserver::patch::{PatchType, TypeRef, apply};

#[test]
fn set_image_updates_one_container_in_place() {
    // `kubectl set image deployment/web app=nginx:1.25`: a two-way patch of the
    // changed container, with the order of all containers.
    let current = deployment(json!([
        {"name": "app", "image": "nginx:1.24", "ports": [{"containerPort": 80, "protocol": "TCP"}]},
        {"name": "sidecar", "image": "busybox:1.36"}
    ]));
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
        "containers": [{"image": "nginx:1.25", "name": "app"}]
    }}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched),
        &json!([
            {"name": "app", "image": "nginx:1.25", "ports": [{"containerPort": 80, "protocol": "TCP"}]},
            {"name": "sidecar", "image": "busybox:1.36"}
        ])
    );
    assert_eq!(patched["spec"]["replicas"], 2);
}

#[test]
fn apply_removing_a_container_port() {
    // `kubectl apply` after deleting port 8080 from the manifest: a three-way patch
    // with a delete directive for the port, the remaining order, and the new
    // last-applied annotation.
    let current = deployment(json!([{
        "name": "app",
        "image": "nginx:1.25",
        "ports": [
            {"containerPort": 80, "protocol": "TCP"},
            {"containerPort": 8080, "protocol": "TCP"}
        ]
    }]));
    let patch = json!({
        "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"Deployment\"}\n"}},
        "spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "app"}],
            "containers": [{
                "$setElementOrder/ports": [{"containerPort": 80}],
                "name": "app",
                "ports": [{"$patch": "delete", "containerPort": 8080}]
            }]
        }}}
    });
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched)[0]["ports"],
        json!([{"containerPort": 80, "protocol": "TCP"}])
    );
    assert_eq!(
        patched["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
        "{\"kind\":\"Deployment\"}\n"
    );
    assert_eq!(patched["metadata"]["labels"], json!({"app": "web"}));
    assert!(!has_directive_keys(&patched));
}

#[test]
fn apply_adding_and_removing_env_vars() {
    // `kubectl apply` after replacing env var B with C in the manifest.
    let current = deployment(json!([{
        "name": "app",
        "image": "app:1",
        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    }]));
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}],
        "containers": [{
            "$setElementOrder/env": [{"name": "A"}, {"name": "C"}],
            "env": [{"name": "C", "value": "3"}, {"$patch": "delete", "name": "B"}],
            "name": "app"
        }]
    }}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched)[0]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "C", "value": "3"}])
    );
}

#[test]
fn changing_an_env_var_value_keeps_the_others() {
    // `kubectl set env deployment/web B=20`.
    let current = deployment(json!([{
        "name": "app",
        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "C", "value": "3"}]
    }]));
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}],
        "containers": [{
            "$setElementOrder/env": [{"name": "A"}, {"name": "B"}, {"name": "C"}],
            "env": [{"name": "B", "value": "20"}],
            "name": "app"
        }]
    }}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched)[0]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "B", "value": "20"}, {"name": "C", "value": "3"}])
    );
}

#[test]
fn apply_switching_strategy_to_recreate_drops_rolling_update() {
    // `kubectl apply` after changing `strategy.type` to Recreate and removing
    // `rollingUpdate`: DeploymentSpec.strategy is tagged retainKeys.
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"spec": {"strategy": {
        "$retainKeys": ["type"],
        "rollingUpdate": null,
        "type": "Recreate"
    }}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(patched["spec"]["strategy"], json!({"type": "Recreate"}));
}

#[test]
fn retain_keys_alone_clears_the_unlisted_keys() {
    // `kubectl apply` of `strategy: {type: RollingUpdate}` when the live object
    // also has `rollingUpdate` defaulted: only the directive changes anything.
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "RollingUpdate"}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched["spec"]["strategy"],
        json!({"type": "RollingUpdate"})
    );
}

#[test]
fn patching_in_a_finalizer_puts_it_first() {
    // `kubectl patch deploy web -p '{"metadata":{"finalizers":["example.com/b"]}}'`:
    // finalizers are a set; new items precede the existing ones, as upstream.
    let mut current = deployment(json!([{"name": "app"}]));
    current["metadata"]["finalizers"] = json!(["example.com/a"]);
    let patch = json!({"metadata": {"finalizers": ["example.com/b", "example.com/a"]}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched["metadata"]["finalizers"],
        json!(["example.com/b", "example.com/a"])
    );

    let patch = json!({"metadata": {"finalizers": ["example.com/c"]}});
    let patched = patch_deployment(&patched, &patch);
    assert_eq!(
        patched["metadata"]["finalizers"],
        json!(["example.com/c", "example.com/b", "example.com/a"])
    );
}

#[test]
fn apply_replacing_a_finalizer() {
    // `kubectl apply` after changing finalizers from [a, b] to [b, c]: a parallel
    // deletion list, the addition and the order.
    let mut current = deployment(json!([{"name": "app"}]));
    current["metadata"]["finalizers"] = json!(["a", "b"]);
    let patch = json!({"metadata": {
        "$deleteFromPrimitiveList/finalizers": ["a"],
        "$setElementOrder/finalizers": ["b", "c"],
        "finalizers": ["c"]
    }});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(patched["metadata"]["finalizers"], json!(["b", "c"]));
}

#[test]
fn controller_removing_its_finalizer() {
    // A controller done with cleanup sends a deletion list for its finalizer only.
    let mut current = deployment(json!([{"name": "app"}]));
    current["metadata"]["finalizers"] = json!(["a", "b", "c"]);
    let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b"]}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(patched["metadata"]["finalizers"], json!(["a", "c"]));
}

#[test]
fn label_and_annotate() {
    // `kubectl label deployment web tier=frontend` and
    // `kubectl annotate deployment web owner=team-a`.
    let current = deployment(json!([{"name": "app"}]));
    let patch =
        json!({"metadata": {"labels": {"tier": "frontend"}, "annotations": {"owner": "team-a"}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched["metadata"]["labels"],
        json!({"app": "web", "tier": "frontend"})
    );
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({"owner": "team-a"})
    );

    // `kubectl label deployment web app-` and `kubectl annotate ... --overwrite owner=team-b`.
    let patch = json!({"metadata": {"labels": {"app": null}, "annotations": {"owner": "team-b"}}});
    let patched = patch_deployment(&patched, &patch);
    assert_eq!(patched["metadata"]["labels"], json!({"tier": "frontend"}));
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({"owner": "team-b"})
    );

    // Removing a label that is not there changes nothing and stores no null.
    let patch = json!({"metadata": {"labels": {"absent": null}}});
    let again = patch_deployment(&patched, &patch);
    assert_eq!(again, patched);
}

#[test]
fn rollout_restart_adds_a_template_annotation() {
    // `kubectl rollout restart deployment/web`.
    let current = deployment(json!([{"name": "app", "image": "app:1"}]));
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2026-11-02T10:00:00Z"
    }}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched["spec"]["template"]["metadata"],
        json!({
            "labels": {"app": "web"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-02T10:00:00Z"}
        })
    );
    assert_eq!(
        containers(&patched),
        &json!([{"name": "app", "image": "app:1"}])
    );
}

#[test]
fn rollout_undo_of_a_daemon_set_replaces_the_template() {
    // `kubectl rollout undo daemonset/agent`: the ControllerRevision's data is a
    // patch replacing the pod template wholesale.
    let current = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}, "annotations": {"restartedAt": "x"}},
                "spec": {"containers": [
                    {"name": "agent", "image": "agent:2", "env": [{"name": "DEBUG", "value": "1"}]}
                ]}
            }
        }
    });
    let patch = json!({"spec": {"template": {
        "$patch": "replace",
        "metadata": {"labels": {"app": "agent"}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]}
    }}});
    let patched = strategic("apps", "DaemonSet", &current, &patch).expect("applies");
    assert_eq!(
        patched["spec"]["template"],
        json!({
            "metadata": {"labels": {"app": "agent"}},
            "spec": {"containers": [{"name": "agent", "image": "agent:1"}]}
        })
    );
    assert_eq!(
        patched["spec"]["selector"],
        json!({"matchLabels": {"app": "agent"}})
    );
}

#[test]
fn replace_directive_in_a_list_replaces_the_list() {
    // `kubectl patch --type=strategic` with `{"$patch": "replace"}` as a list
    // item: the containers become exactly the patch's.
    let current = deployment(json!([
        {"name": "app", "image": "app:1"},
        {"name": "sidecar", "image": "sidecar:1"}
    ]));
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "solo", "image": "solo:1"},
        {"$patch": "replace"}
    ]}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched),
        &json!([{"name": "solo", "image": "solo:1"}])
    );
}

#[test]
fn lists_without_a_strategy_are_replaced() {
    // `kubectl edit` / `kubectl apply` changing tolerations and args: neither
    // list has a patch strategy, so the patch carries and sets the whole list.
    let current = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {
            "tolerations": [
                {"key": "a", "operator": "Exists"},
                {"key": "b", "operator": "Exists"}
            ],
            "containers": [{"name": "app", "args": ["--one", "--two"]}]
        }
    });
    let patch = json!({"spec": {
        "tolerations": [{"key": "c", "operator": "Exists"}],
        "$setElementOrder/containers": [{"name": "app"}],
        "containers": [{"name": "app", "args": ["--three"]}]
    }});
    let patched = strategic("", "Pod", &current, &patch).expect("applies");
    assert_eq!(
        patched["spec"]["tolerations"],
        json!([{"key": "c", "operator": "Exists"}])
    );
    assert_eq!(patched["spec"]["containers"][0]["args"], json!(["--three"]));
}

#[test]
fn cordon_sets_unschedulable() {
    // `kubectl cordon node-1`.
    let current = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}, "spec": {"podCIDR": "10.42.0.0/24"}});
    let patch = json!({"spec": {"unschedulable": true}});
    let patched = strategic("", "Node", &current, &patch).expect("applies");
    assert_eq!(
        patched["spec"],
        json!({"podCIDR": "10.42.0.0/24", "unschedulable": true})
    );
}

#[test]
fn taint_replaces_the_taint_list() {
    // `kubectl taint node node-1 dedicated=gpu:NoSchedule`: taints are atomic, so
    // kubectl sends the full new list.
    let current = json!({"kind": "Node", "metadata": {"name": "node-1"}, "spec": {
        "taints": [{"key": "old", "effect": "NoExecute"}]
    }});
    let patch = json!({"spec": {"taints": [
        {"key": "old", "effect": "NoExecute"},
        {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
    ]}});
    let patched = strategic("", "Node", &current, &patch).expect("applies");
    assert_eq!(patched["spec"]["taints"], patch["spec"]["taints"]);
}

#[test]
fn node_status_heartbeat_merges_conditions_by_type() {
    // The node agent's status update (as the kubelet does it): only the changed
    // condition fields, plus the order of all conditions.
    let current = json!({"kind": "Node", "metadata": {"name": "node-1"}, "status": {
        "conditions": [
            {"type": "Ready", "status": "True", "lastHeartbeatTime": "t1"},
            {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": "t1"}
        ],
        "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": "node-1"}]
    }});
    let patch = json!({"status": {
        "$setElementOrder/conditions": [{"type": "Ready"}, {"type": "MemoryPressure"}],
        "conditions": [
            {"type": "Ready", "lastHeartbeatTime": "t2"},
            {"type": "MemoryPressure", "lastHeartbeatTime": "t2"}
        ]
    }});
    let patched = strategic("", "Node", &current, &patch).expect("applies");
    assert_eq!(
        patched["status"]["conditions"],
        json!([
            {"type": "Ready", "status": "True", "lastHeartbeatTime": "t2"},
            {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": "t2"}
        ])
    );
    assert_eq!(
        patched["status"]["addresses"],
        current["status"]["addresses"]
    );
}

#[test]
fn apply_adding_a_service_port() {
    // `kubectl apply` after adding port 443 to a Service (ports merge by `port`).
    let current = json!({"kind": "Service", "metadata": {"name": "web"}, "spec": {
        "clusterIP": "10.43.0.20",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        "selector": {"app": "web"}
    }});
    let patch = json!({"spec": {
        "$setElementOrder/ports": [{"port": 80}, {"port": 443}],
        "ports": [{"name": "https", "port": 443, "targetPort": 8443}]
    }});
    let patched = strategic("", "Service", &current, &patch).expect("applies");
    assert_eq!(
        patched["spec"]["ports"],
        json!([
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
            {"name": "https", "port": 443, "targetPort": 8443}
        ])
    );
    assert_eq!(patched["spec"]["clusterIP"], "10.43.0.20");
}

#[test]
fn scale_sends_a_merge_patch() {
    // `kubectl scale deployment/web --replicas=3` patches the scale subresource
    // with a JSON merge patch.
    let current = json!({"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": {"name": "web"}, "spec": {"replicas": 2}});
    let patched = apply(
        TypeRef::new("autoscaling", "Scale"),
        &current,
        PatchType::Merge,
        br#"{"spec":{"replicas":3}}"#,
    )
    .expect("applies");
    assert_eq!(patched["spec"]["replicas"], 3);
}

#[test]
fn edit_removing_a_volume_and_its_mount() {
    // `kubectl edit deployment/web` deleting the `cache` volume and its mount.
    let mut current = deployment(json!([{
        "name": "app",
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/app"},
            {"name": "cache", "mountPath": "/cache"}
        ]
    }]));
    current["spec"]["template"]["spec"]["volumes"] = json!([
        {"name": "config", "configMap": {"name": "app-config"}},
        {"name": "cache", "emptyDir": {}}
    ]);
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}],
        "$setElementOrder/volumes": [{"name": "config"}],
        "containers": [{
            "$setElementOrder/volumeMounts": [{"mountPath": "/etc/app"}],
            "name": "app",
            "volumeMounts": [{"$patch": "delete", "mountPath": "/cache"}]
        }],
        "volumes": [{"$patch": "delete", "name": "cache"}]
    }}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched["spec"]["template"]["spec"]["volumes"],
        json!([{"name": "config", "configMap": {"name": "app-config"}}])
    );
    assert_eq!(
        containers(&patched)[0]["volumeMounts"],
        json!([{"name": "config", "mountPath": "/etc/app"}])
    );
}

#[test]
fn apply_switching_a_volume_source() {
    // `kubectl apply` after changing volume `data` from emptyDir to hostPath:
    // volumes are tagged `merge,retainKeys`.
    let mut current = deployment(json!([{"name": "app"}]));
    current["spec"]["template"]["spec"]["volumes"] =
        json!([{"name": "data", "emptyDir": {"medium": "Memory"}}]);
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/volumes": [{"name": "data"}],
        "volumes": [{
            "$retainKeys": ["hostPath", "name"],
            "emptyDir": null,
            "hostPath": {"path": "/data"},
            "name": "data"
        }]
    }}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        patched["spec"]["template"]["spec"]["volumes"],
        json!([{"name": "data", "hostPath": {"path": "/data"}}])
    );
}

#[test]
fn garbage_collector_removes_an_owner_reference() {
    // The garbage collector drops a dangling owner with a delete directive keyed
    // by uid (plus the object's uid as a precondition).
    let current = json!({"kind": "Pod", "metadata": {
        "name": "web-abc",
        "uid": "pod-uid",
        "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u1"},
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "keep", "uid": "u2"}
        ]
    }});
    let patch = json!({"metadata": {"ownerReferences": [{"$patch": "delete", "uid": "u1"}], "uid": "pod-uid"}});
    let patched = strategic("", "Pod", &current, &patch).expect("applies");
    assert_eq!(
        keys(&patched["metadata"]["ownerReferences"], "uid"),
        [&json!("u2")]
    );
}

#[test]
fn apply_adding_a_container_follows_the_element_order() {
    // `kubectl apply` after adding container `metrics` last in the manifest.
    let current = deployment(json!([{"name": "app"}, {"name": "sidecar"}]));
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}, {"name": "metrics"}],
        "containers": [{"name": "metrics", "image": "metrics:1"}]
    }}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        keys(containers(&patched), "name"),
        [&json!("app"), &json!("sidecar"), &json!("metrics")]
    );
}

#[test]
fn patching_in_a_container_without_an_order_puts_it_first() {
    // `kubectl patch deployment web -p '{"spec":{"template":{"spec":{"containers":[...]}}}}'`
    // with a new container: upstream places patch items before the others.
    let current = deployment(json!([{"name": "app"}, {"name": "sidecar"}]));
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "debug", "image": "busybox"}]}}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        keys(containers(&patched), "name"),
        [&json!("debug"), &json!("app"), &json!("sidecar")]
    );
}

#[test]
fn apply_creating_lists_the_object_lacks() {
    // `kubectl apply` adding env vars to a container that had none: the live
    // object lacks the list, the patch still carries an order directive.
    let current = deployment(json!([{"name": "app"}]));
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}],
        "containers": [{
            "$setElementOrder/env": [{"name": "A"}, {"name": "B"}],
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
            "name": "app"
        }]
    }}}});
    let patched = patch_deployment(&current, &patch);
    assert_eq!(
        containers(&patched)[0]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
    );
    assert!(!has_directive_keys(&patched));
}

#[test]
fn status_conditions_of_workloads_merge_by_type() {
    // Controllers update one condition of a Job / HPA status at a time.
    let job = json!({"kind": "Job", "metadata": {"name": "j"}, "status": {"conditions": [
        {"type": "SuccessCriteriaMet", "status": "True"}
    ]}});
    let patch = json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}});
    let patched = strategic("batch", "Job", &job, &patch).expect("applies");
    assert_eq!(
        keys(&patched["status"]["conditions"], "type"),
        [&json!("Complete"), &json!("SuccessCriteriaMet")]
    );

    let hpa = json!({"kind": "HorizontalPodAutoscaler", "status": {"conditions": [
        {"type": "AbleToScale", "status": "True"},
        {"type": "ScalingActive", "status": "True"}
    ]}});
    let patch = json!({"status": {"conditions": [{"type": "ScalingActive", "status": "False"}]}});
    let patched =
        strategic("autoscaling", "HorizontalPodAutoscaler", &hpa, &patch).expect("applies");
    assert_eq!(
        patched["status"]["conditions"],
        json!([{"type": "AbleToScale", "status": "True"}, {"type": "ScalingActive", "status": "False"}])
    );
}

#[test]
fn stateful_set_volume_claim_templates_are_replaced() {
    // `kubectl apply` of a StatefulSet: volumeClaimTemplates have no strategy.
    let current = json!({"kind": "StatefulSet", "spec": {"volumeClaimTemplates": [
        {"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"]}},
        {"metadata": {"name": "logs"}}
    ]}});
    let patch = json!({"spec": {"volumeClaimTemplates": [{"metadata": {"name": "data"}}]}});
    let patched = strategic("apps", "StatefulSet", &current, &patch).expect("applies");
    assert_eq!(
        patched["spec"]["volumeClaimTemplates"],
        json!([{"metadata": {"name": "data"}}])
    );
}

#[test]
fn cron_job_template_containers_merge_by_name() {
    // `kubectl set image cronjob/report report=report:2`.
    let current = json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [
        {"name": "report", "image": "report:1"},
        {"name": "uploader", "image": "uploader:1"}
    ]}}}}}});
    let patch = json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "report"}, {"name": "uploader"}],
        "containers": [{"name": "report", "image": "report:2"}]
    }}}}}});
    let patched = strategic("batch", "CronJob", &current, &patch).expect("applies");
    assert_eq!(
        patched["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"],
        json!([{"name": "report", "image": "report:2"}, {"name": "uploader", "image": "uploader:1"}])
    );
}

#[test]
fn kinds_without_a_table_still_merge_metadata() {
    // `kubectl apply` of an RBAC Role: rules have no strategy; metadata still
    // has its strategies.
    let current = json!({"kind": "Role", "metadata": {"name": "r", "finalizers": ["a"]}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    ]});
    let patch = json!({"metadata": {"finalizers": ["b"]}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
    ]});
    let patched =
        strategic("rbac.authorization.k8s.io", "Role", &current, &patch).expect("applies");
    assert_eq!(patched["metadata"]["finalizers"], json!(["b", "a"]));
    assert_eq!(patched["rules"], patch["rules"]);
}
