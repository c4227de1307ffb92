//! Table rendering tests: the cells users read in `kubectl get`.

use super::*;
use serde_json::json;

/// Every resource with its own printer.
const PRINTED: &[(&str, &str)] = &[
    ("", "pods"),
    ("", "podtemplates"),
    ("", "replicationcontrollers"),
    ("", "services"),
    ("", "endpoints"),
    ("", "nodes"),
    ("", "namespaces"),
    ("", "events"),
    ("events.k8s.io", "events"),
    ("", "configmaps"),
    ("", "secrets"),
    ("", "serviceaccounts"),
    ("", "persistentvolumes"),
    ("", "persistentvolumeclaims"),
    ("apps", "deployments"),
    ("apps", "replicasets"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("apps", "controllerrevisions"),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
    ("autoscaling", "horizontalpodautoscalers"),
    ("policy", "poddisruptionbudgets"),
    ("discovery.k8s.io", "endpointslices"),
    ("networking.k8s.io", "ingresses"),
    ("networking.k8s.io", "ingressclasses"),
    ("networking.k8s.io", "networkpolicies"),
    ("coordination.k8s.io", "leases"),
    ("scheduling.k8s.io", "priorityclasses"),
    ("node.k8s.io", "runtimeclasses"),
    ("rbac.authorization.k8s.io", "rolebindings"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
    ),
    (
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
    ),
    ("storage.k8s.io", "storageclasses"),
    ("example.com", "widgets"),
];

fn now() -> Timestamp {
    "2024-06-01T12:00:00Z".parse().expect("valid timestamp")
}

/// `now` minus `seconds`, as a stored timestamp.
fn ago(seconds: i64) -> String {
    let ts = now() - jiff::SignedDuration::from_secs(seconds);
    ts.to_string()
}

fn table(group: &str, plural: &str, objects: &[Value]) -> Value {
    render(group, plural, objects, now(), IncludeObject::None)
}

/// The cell under `column` in the only row of a one-object table.
fn cell(group: &str, plural: &str, object: Value, column: &str) -> Value {
    let t = table(group, plural, &[object]);
    let index = t["columnDefinitions"]
        .as_array()
        .and_then(|cols| cols.iter().position(|c| c["name"] == column))
        .unwrap_or_else(|| panic!("no column {column} for {plural}"));
    t["rows"][0]["cells"][index].clone()
}

fn pod_cell(pod: Value, column: &str) -> Value {
    cell("", "pods", pod, column)
}

fn running(name: &str, ready: bool) -> Value {
    json!({"name": name, "ready": ready, "restartCount": 0,
           "state": {"running": {"startedAt": ago(600)}}})
}

#[test]
fn table_shape() {
    let pod = json!({"metadata": {"name": "web", "creationTimestamp": ago(30)}});
    let t = render("", "pods", &[pod], now(), IncludeObject::Metadata);
    assert_eq!(t["kind"], "Table");
    assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
    assert!(t["metadata"].is_object());
    let first = &t["columnDefinitions"][0];
    assert_eq!(first["name"], "Name");
    assert_eq!(first["type"], "string");
    assert_eq!(first["format"], "name");
    assert_eq!(first["priority"], 0);
    assert!(first["description"].is_string());
    assert_eq!(t["columnDefinitions"][5]["name"], "IP");
    assert_eq!(t["columnDefinitions"][5]["priority"], 1);
    assert_eq!(t["rows"][0]["cells"][0], "web");
    assert_eq!(t["rows"][0]["cells"][4], "30s");
    let empty = table("", "pods", &[]);
    assert_eq!(empty["rows"], json!([]));
}

#[test]
fn first_column_is_name_except_events() {
    for (group, plural) in PRINTED {
        let t = table(group, plural, &[]);
        let columns = t["columnDefinitions"].as_array().expect("columns");
        let names: Vec<_> = columns.iter().filter(|c| c["format"] == "name").collect();
        assert_eq!(names.len(), 1, "{plural}");
        if *plural != "events" {
            assert_eq!(columns[0]["name"], "Name", "{plural}");
        }
    }
}

#[test]
fn include_object_variants() {
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "web", "namespace": "ns", "labels": {"a": "b"}},
                     "spec": {"containers": []}});
    let row =
        |include| render("", "pods", std::slice::from_ref(&pod), now(), include)["rows"][0].clone();
    assert_eq!(row(IncludeObject::None)["object"], Value::Null);
    assert_eq!(row(IncludeObject::Object)["object"], pod);
    assert_eq!(
        row(IncludeObject::Metadata)["object"],
        json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
               "metadata": {"name": "web", "namespace": "ns", "labels": {"a": "b"}}})
    );
    assert_eq!(
        row(IncludeObject::Metadata)["object"],
        render(
            "",
            "pods",
            std::slice::from_ref(&pod),
            now(),
            IncludeObject::default()
        )["rows"][0]["object"]
    );
    let garbage = render("", "pods", &[json!(42)], now(), IncludeObject::Metadata);
    assert_eq!(garbage["rows"][0]["object"]["metadata"], json!({}));

    assert_eq!(IncludeObject::parse(None), Ok(IncludeObject::Metadata));
    assert_eq!(IncludeObject::parse(Some("")), Ok(IncludeObject::Metadata));
    assert_eq!(IncludeObject::parse(Some("None")), Ok(IncludeObject::None));
    assert_eq!(
        IncludeObject::parse(Some("Object")),
        Ok(IncludeObject::Object)
    );
    assert_eq!(
        IncludeObject::parse(Some("All")),
        Err("unrecognized includeObject value: \"All\"".into())
    );
}

#[test]
fn garbage_never_panics_and_rows_are_full() {
    let garbage = [
        json!(null),
        json!(42),
        json!("pod"),
        json!([1, 2]),
        json!({}),
        json!({"metadata": "x", "spec": [], "status": 7}),
        json!({"metadata": {"name": 5, "labels": [1], "creationTimestamp": "soon",
                            "deletionTimestamp": 3, "ownerReferences": {"a": 1}},
               "spec": {"containers": "x", "initContainers": [null, 3, {"restartPolicy": 1}],
                        "replicas": "3", "ports": [null, {"port": "80", "nodePort": -1}],
                        "rules": [null], "selector": {"matchExpressions": [{"operator": 1}]},
                        "metrics": [null, {"type": "Resource"}, {"type": "Pods"}, {"type": "External"}],
                        "readinessGates": [{}], "unschedulable": "yes", "capacity": []},
               "status": {"containerStatuses": [null, {"state": {"terminated": 1}}],
                          "initContainerStatuses": [{"state": {"waiting": {"reason": 1}}}],
                          "conditions": "all", "addresses": [{}], "podIPs": [7],
                          "loadBalancer": {"ingress": [{}]}, "currentMetrics": [null]},
               "subsets": [{"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 80}]}, 9],
               "endpoints": [{"addresses": "x"}], "series": {"count": "x"},
               "webhooks": 3, "subjects": [{"kind": "User"}], "data": {"a": 1}}),
    ];
    for (group, plural) in PRINTED {
        let printer = printer_for(group, plural);
        let ctx = Ctx { now: now() };
        for object in &garbage {
            let cells = (printer.cells)(Obj::new(object), &ctx);
            assert_eq!(cells.len(), printer.columns.len(), "{plural}: {object}");
            let t = render(
                group,
                plural,
                std::slice::from_ref(object),
                now(),
                IncludeObject::Metadata,
            );
            assert_eq!(t["rows"].as_array().map(Vec::len), Some(1), "{plural}");
        }
    }
}

#[test]
fn pod_ready_counts_ready_running_containers() {
    let pod = json!({
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
        "status": {"phase": "Running", "containerStatuses": [running("a", true), running("b", false)]}
    });
    assert_eq!(pod_cell(pod.clone(), "Ready"), "1/2");
    assert_eq!(pod_cell(pod.clone(), "Status"), "Running");
    assert_eq!(pod_cell(pod, "Restarts"), "0");
}

#[test]
fn pod_terminating() {
    let pod = json!({
        "metadata": {"name": "web", "deletionTimestamp": ago(5)},
        "spec": {"containers": [{"name": "a"}]},
        "status": {"phase": "Running", "containerStatuses": [running("a", true)]}
    });
    assert_eq!(pod_cell(pod, "Status"), "Terminating");
    let finished =
        json!({"metadata": {"deletionTimestamp": ago(5)}, "status": {"phase": "Succeeded"}});
    assert_eq!(pod_cell(finished, "Status"), "Succeeded");
    let lost = json!({"metadata": {"deletionTimestamp": ago(5)},
                      "status": {"phase": "Running", "reason": "NodeLost"}});
    assert_eq!(pod_cell(lost, "Status"), "Unknown");
}

#[test]
fn pod_crash_loop_with_restart_age() {
    let pod = json!({
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "a"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "a", "ready": false, "restartCount": 5,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": ago(300)}}
        }]}
    });
    assert_eq!(pod_cell(pod.clone(), "Status"), "CrashLoopBackOff");
    assert_eq!(pod_cell(pod.clone(), "Ready"), "0/1");
    assert_eq!(pod_cell(pod, "Restarts"), "5 (5m ago)");
}

#[test]
fn pod_init_containers() {
    let init = |statuses: Value| {
        json!({
            "spec": {"initContainers": [{"name": "i1"}, {"name": "i2"}], "containers": [{"name": "a"}]},
            "status": {"phase": "Pending", "initContainerStatuses": statuses,
                       "containerStatuses": [{"name": "a", "state": {"waiting": {"reason": "PodInitializing"}}}]}
        })
    };
    let done =
        json!({"name": "i1", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}});
    let busy = json!({"name": "i2", "state": {"running": {}}});
    assert_eq!(pod_cell(init(json!([done, busy])), "Status"), "Init:1/2");
    let failed = json!({"name": "i2", "restartCount": 2,
                        "state": {"terminated": {"exitCode": 3}}});
    assert_eq!(
        pod_cell(init(json!([done, failed])), "Status"),
        "Init:ExitCode:3"
    );
    assert_eq!(pod_cell(init(json!([done, failed])), "Restarts"), "2");
    let killed = json!({"name": "i2", "state": {"terminated": {"exitCode": 137, "signal": 9}}});
    assert_eq!(
        pod_cell(init(json!([done, killed])), "Status"),
        "Init:Signal:9"
    );
    let backoff = json!({"name": "i2", "state": {"waiting": {"reason": "ImagePullBackOff"}}});
    assert_eq!(
        pod_cell(init(json!([done, backoff])), "Status"),
        "Init:ImagePullBackOff"
    );
    let all_done = json!({"name": "i2", "state": {"terminated": {"exitCode": 0}}});
    assert_eq!(
        pod_cell(init(json!([done, all_done])), "Status"),
        "PodInitializing"
    );
}

#[test]
fn pod_sidecars_count_as_containers() {
    let pod = json!({
        "spec": {"initContainers": [{"name": "proxy", "restartPolicy": "Always"}],
                 "containers": [{"name": "app"}]},
        "status": {"phase": "Running",
                   "conditions": [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"}],
                   "initContainerStatuses": [{"name": "proxy", "started": true, "ready": true, "restartCount": 1,
                                              "state": {"running": {}}}],
                   "containerStatuses": [running("app", true)]}
    });
    assert_eq!(pod_cell(pod.clone(), "Ready"), "2/2");
    assert_eq!(pod_cell(pod.clone(), "Status"), "Running");
    assert_eq!(pod_cell(pod, "Restarts"), "1");
}

#[test]
fn pod_completed_and_running_mix() {
    let pod = |ready_condition: bool| {
        json!({
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": if ready_condition { "True" } else { "False" }}],
                       "containerStatuses": [
                           {"name": "a", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
                           running("b", true)]}
        })
    };
    assert_eq!(pod_cell(pod(true), "Status"), "Running");
    assert_eq!(pod_cell(pod(false), "Status"), "NotReady");
    let done = json!({"status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "a", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}});
    assert_eq!(pod_cell(done.clone(), "Status"), "Completed");
    let row = &table("", "pods", &[done])["rows"][0];
    assert_eq!(row["conditions"][0]["type"], "Completed");
    assert_eq!(row["conditions"][0]["reason"], "Succeeded");
    let oom = json!({"status": {"phase": "Running", "containerStatuses": [
        {"name": "a", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}});
    assert_eq!(pod_cell(oom, "Status"), "OOMKilled");
}

#[test]
fn pod_wide_columns() {
    let pod = json!({
        "spec": {"nodeName": "n1", "readinessGates": [{"conditionType": "a"}, {"conditionType": "b"}]},
        "status": {"podIP": "10.42.0.9", "podIPs": [{"ip": "10.42.0.9"}, {"ip": "fd00::9"}],
                   "conditions": [{"type": "a", "status": "True"}, {"type": "b", "status": "False"}]}
    });
    assert_eq!(pod_cell(pod.clone(), "IP"), "10.42.0.9");
    assert_eq!(pod_cell(pod.clone(), "Node"), "n1");
    assert_eq!(pod_cell(pod.clone(), "Nominated Node"), "<none>");
    assert_eq!(pod_cell(pod, "Readiness Gates"), "1/2");
    let bare =
        json!({"status": {"conditions": [{"type": "PodScheduled", "reason": "SchedulingGated"}]}});
    assert_eq!(pod_cell(bare.clone(), "IP"), "<none>");
    assert_eq!(pod_cell(bare.clone(), "Readiness Gates"), "<none>");
    assert_eq!(pod_cell(bare, "Status"), "SchedulingGated");
}

#[test]
fn deployment_counts() {
    let d = json!({
        "metadata": {"name": "web", "creationTimestamp": ago(3 * 3600 + 120)},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"spec": {"containers": [{"name": "web", "image": "nginx:1"},
                                                       {"name": "log", "image": "busybox"}]}}},
        "status": {"readyReplicas": 3, "updatedReplicas": 3, "availableReplicas": 3}
    });
    let t = table("apps", "deployments", &[d]);
    assert_eq!(
        t["rows"][0]["cells"],
        json!([
            "web",
            "3/3",
            3,
            3,
            "3h2m",
            "web,log",
            "nginx:1,busybox",
            "app=web"
        ])
    );
    assert_eq!(cell("apps", "deployments", json!({}), "Ready"), "0/1");
}

#[test]
fn workload_tables() {
    let rs = json!({"spec": {"replicas": 2, "selector": {"matchLabels": {"a": "b"}}},
                    "status": {"replicas": 2, "readyReplicas": 1}});
    assert_eq!(cell("apps", "replicasets", rs.clone(), "Desired"), 2);
    assert_eq!(cell("apps", "replicasets", rs.clone(), "Ready"), 1);
    assert_eq!(cell("apps", "replicasets", rs, "Selector"), "a=b");
    let ss = json!({"spec": {"replicas": 3}, "status": {"readyReplicas": 2}});
    assert_eq!(cell("apps", "statefulsets", ss, "Ready"), "2/3");
    let ds = json!({"spec": {"template": {"spec": {"nodeSelector": {"os": "linux"}}}},
                    "status": {"desiredNumberScheduled": 4, "numberReady": 4}});
    assert_eq!(cell("apps", "daemonsets", ds.clone(), "Desired"), 4);
    assert_eq!(cell("apps", "daemonsets", ds, "Node Selector"), "os=linux");
    let cr = json!({"revision": 2, "metadata": {"ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "controller": true}]}});
    assert_eq!(
        cell("apps", "controllerrevisions", cr.clone(), "Controller"),
        "daemonset.apps/agent"
    );
    assert_eq!(cell("apps", "controllerrevisions", cr, "Revision"), 2);
    assert_eq!(
        cell("apps", "controllerrevisions", json!({}), "Controller"),
        "<none>"
    );
}

#[test]
fn job_status_completions_duration() {
    let done = json!({
        "spec": {"completions": 3},
        "status": {"succeeded": 3, "startTime": ago(600), "completionTime": ago(420),
                   "conditions": [{"type": "Complete", "status": "True"}]}
    });
    assert_eq!(cell("batch", "jobs", done.clone(), "Status"), "Complete");
    assert_eq!(cell("batch", "jobs", done.clone(), "Completions"), "3/3");
    assert_eq!(cell("batch", "jobs", done, "Duration"), "3m");
    let running = json!({"spec": {"parallelism": 2}, "status": {"startTime": ago(45)}});
    assert_eq!(cell("batch", "jobs", running.clone(), "Status"), "Running");
    assert_eq!(
        cell("batch", "jobs", running.clone(), "Completions"),
        "0/1 of 2"
    );
    assert_eq!(cell("batch", "jobs", running, "Duration"), "45s");
    assert_eq!(cell("batch", "jobs", json!({}), "Duration"), "");
    let failed = json!({"status": {"conditions": [{"type": "Failed", "status": "True"}]}});
    assert_eq!(cell("batch", "jobs", failed, "Status"), "Failed");
}

#[test]
fn hpa_targets() {
    let hpa = json!({
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "minReplicas": 1, "maxReplicas": 5,
                 "metrics": [
                     {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}},
                     {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "100Mi"}}},
                     {"type": "Pods", "pods": {"target": {"averageValue": "1k"}}}]},
        "status": {"currentReplicas": 2, "currentMetrics": [
            {"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 30}}}]}
    });
    assert_eq!(
        cell(
            "autoscaling",
            "horizontalpodautoscalers",
            hpa.clone(),
            "Reference"
        ),
        "Deployment/web"
    );
    assert_eq!(
        cell(
            "autoscaling",
            "horizontalpodautoscalers",
            hpa.clone(),
            "Targets"
        ),
        "cpu: 30%/80%, memory: <unknown>/100Mi + 1 more..."
    );
    assert_eq!(
        cell(
            "autoscaling",
            "horizontalpodautoscalers",
            hpa.clone(),
            "MinPods"
        ),
        "1"
    );
    assert_eq!(
        cell("autoscaling", "horizontalpodautoscalers", hpa, "MaxPods"),
        5
    );
    let v1 = json!({"spec": {"targetCPUUtilizationPercentage": 50}});
    assert_eq!(
        cell("autoscaling", "horizontalpodautoscalers", v1, "Targets"),
        "cpu: <unknown>/50%"
    );
    assert_eq!(
        cell(
            "autoscaling",
            "horizontalpodautoscalers",
            json!({}),
            "Targets"
        ),
        "<none>"
    );
}

#[test]
fn service_ports_and_addresses() {
    let svc = |spec: Value, status: Value| json!({"spec": spec, "status": status});
    let node_port = svc(
        json!({"type": "NodePort", "clusterIP": "10.43.0.5", "clusterIPs": ["10.43.0.5"],
               "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}], "selector": {"app": "web"}}),
        json!({}),
    );
    assert_eq!(
        cell("", "services", node_port.clone(), "Port(s)"),
        "80:30080/TCP"
    );
    assert_eq!(cell("", "services", node_port.clone(), "Type"), "NodePort");
    assert_eq!(
        cell("", "services", node_port.clone(), "Cluster-IP"),
        "10.43.0.5"
    );
    assert_eq!(
        cell("", "services", node_port.clone(), "External-IP"),
        "<none>"
    );
    assert_eq!(cell("", "services", node_port, "Selector"), "app=web");
    let multi = svc(
        json!({"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]}),
        json!({}),
    );
    assert_eq!(
        cell("", "services", multi.clone(), "Port(s)"),
        "53/UDP,53/TCP"
    );
    assert_eq!(cell("", "services", multi.clone(), "Type"), "ClusterIP");
    assert_eq!(cell("", "services", multi, "Cluster-IP"), "<none>");
    let headless = svc(json!({"clusterIP": "None"}), json!({}));
    assert_eq!(cell("", "services", headless.clone(), "Cluster-IP"), "None");
    assert_eq!(cell("", "services", headless.clone(), "Port(s)"), "<none>");
    assert_eq!(cell("", "services", headless, "Selector"), "<none>");
    let lb = svc(json!({"type": "LoadBalancer"}), json!({}));
    assert_eq!(cell("", "services", lb, "External-IP"), "<pending>");
    let lb = svc(
        json!({"type": "LoadBalancer", "externalIPs": ["1.1.1.1"]}),
        json!({"loadBalancer": {"ingress": [{"ip": "9.9.9.9"}, {"hostname": "lb.example"}, {"ip": "9.9.9.9"}]}}),
    );
    assert_eq!(
        cell("", "services", lb, "External-IP"),
        "9.9.9.9,lb.example,1.1.1.1"
    );
    let ext = svc(
        json!({"type": "ExternalName", "externalName": "db.example"}),
        json!({}),
    );
    assert_eq!(cell("", "services", ext, "External-IP"), "db.example");
}

#[test]
fn endpoints_and_slices() {
    let ep = json!({"subsets": [
        {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}], "ports": [{"port": 80}, {"port": 443}]}]});
    assert_eq!(
        cell("", "endpoints", ep, "Endpoints"),
        "10.0.0.1:80,10.0.0.2:80,10.0.0.1:443 + 1 more..."
    );
    assert_eq!(cell("", "endpoints", json!({}), "Endpoints"), "<none>");
    let headless = json!({"subsets": [{"addresses": [{"ip": "fd00::1"}]}]});
    assert_eq!(cell("", "endpoints", headless, "Endpoints"), "fd00::1");
    let slice = json!({"addressType": "IPv4", "ports": [{"port": 80}, {"name": "http"}, {}],
                       "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]});
    assert_eq!(
        cell("discovery.k8s.io", "endpointslices", slice.clone(), "Ports"),
        "80,http,*"
    );
    assert_eq!(
        cell("discovery.k8s.io", "endpointslices", slice, "Endpoints"),
        "10.0.0.1,10.0.0.2"
    );
    assert_eq!(
        cell("discovery.k8s.io", "endpointslices", json!({}), "Endpoints"),
        "<unset>"
    );
}

#[test]
fn ingress_tables() {
    let ing = json!({"spec": {"ingressClassName": "skiff", "tls": [{}],
                              "rules": [{"host": "a.example"}, {}, {"host": "b.example"}, {"host": "c.example"}, {"host": "d.example"}]},
                     "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}});
    assert_eq!(
        cell("networking.k8s.io", "ingresses", ing.clone(), "Class"),
        "skiff"
    );
    assert_eq!(
        cell("networking.k8s.io", "ingresses", ing.clone(), "Hosts"),
        "a.example,b.example,c.example + 2 more..."
    );
    assert_eq!(
        cell("networking.k8s.io", "ingresses", ing.clone(), "Address"),
        "10.0.0.1"
    );
    assert_eq!(
        cell("networking.k8s.io", "ingresses", ing, "Ports"),
        "80, 443"
    );
    assert_eq!(
        cell("networking.k8s.io", "ingresses", json!({}), "Hosts"),
        "*"
    );
    assert_eq!(
        cell("networking.k8s.io", "ingresses", json!({}), "Class"),
        "<none>"
    );
    let class = json!({"spec": {"controller": "skiff.dev/ingress",
                                "parameters": {"apiGroup": "k8s.example.com", "kind": "Params", "name": "p"}}});
    assert_eq!(
        cell(
            "networking.k8s.io",
            "ingressclasses",
            class.clone(),
            "Controller"
        ),
        "skiff.dev/ingress"
    );
    assert_eq!(
        cell("networking.k8s.io", "ingressclasses", class, "Parameters"),
        "Params.k8s.example.com/p"
    );
}

#[test]
fn node_status_and_roles() {
    let node = json!({
        "metadata": {"name": "cp", "labels": {"node-role.kubernetes.io/control-plane": "",
                                                "node-role.kubernetes.io/master": "", "kubernetes.io/role": "etcd"}},
        "spec": {"unschedulable": true},
        "status": {"conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}],
                   "nodeInfo": {"kubeletVersion": "v1.33.0", "osImage": "Debian"},
                   "addresses": [{"type": "Hostname", "address": "cp"}, {"type": "InternalIP", "address": "192.168.1.2"}]}
    });
    assert_eq!(
        cell("", "nodes", node.clone(), "Status"),
        "Ready,SchedulingDisabled"
    );
    assert_eq!(
        cell("", "nodes", node.clone(), "Roles"),
        "control-plane,etcd,master"
    );
    assert_eq!(cell("", "nodes", node.clone(), "Version"), "v1.33.0");
    assert_eq!(
        cell("", "nodes", node.clone(), "Internal-IP"),
        "192.168.1.2"
    );
    assert_eq!(cell("", "nodes", node.clone(), "External-IP"), "<none>");
    assert_eq!(cell("", "nodes", node.clone(), "OS-Image"), "Debian");
    assert_eq!(cell("", "nodes", node, "Kernel-Version"), "<unknown>");
    let not_ready = json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}});
    assert_eq!(cell("", "nodes", not_ready, "Status"), "NotReady");
    assert_eq!(cell("", "nodes", json!({}), "Status"), "Unknown");
    assert_eq!(cell("", "nodes", json!({}), "Roles"), "<none>");
}

#[test]
fn events_both_apis() {
    let core = json!({
        "metadata": {"name": "web.17a"},
        "involvedObject": {"kind": "Pod", "name": "web", "fieldPath": "spec.containers{web}"},
        "reason": "BackOff", "type": "Warning", "message": " Back-off restarting \n",
        "source": {"component": "kubelet", "host": "n1"},
        "firstTimestamp": ago(3600), "lastTimestamp": ago(60), "count": 12
    });
    let t = table("", "events", &[core]);
    assert_eq!(t["columnDefinitions"][0]["name"], "Last Seen");
    assert_eq!(
        t["rows"][0]["cells"],
        json!([
            "60s",
            "Warning",
            "BackOff",
            "pod/web",
            "spec.containers{web}",
            "kubelet, n1",
            "Back-off restarting",
            "60m",
            12,
            "web.17a"
        ])
    );
    let new_api = json!({
        "metadata": {"name": "n1.17b"}, "eventTime": ago(90),
        "regarding": {"kind": "Node", "name": "n1"}, "reason": "Starting", "type": "Normal",
        "note": "Starting agent", "reportingController": "skiff-agent", "reportingInstance": "n1"
    });
    let t = table("events.k8s.io", "events", &[new_api]);
    assert_eq!(
        t["rows"][0]["cells"],
        json!([
            "90s",
            "Normal",
            "Starting",
            "node/n1",
            "",
            "skiff-agent, n1",
            "Starting agent",
            "90s",
            1,
            "n1.17b"
        ])
    );
    let series = json!({"involvedObject": {"kind": "Pod"}, "eventTime": ago(600),
                        "series": {"count": 4, "lastObservedTime": ago(10)}});
    assert_eq!(cell("", "events", series.clone(), "Last Seen"), "10s");
    assert_eq!(cell("", "events", series.clone(), "Count"), 4);
    assert_eq!(cell("", "events", series, "Object"), "pod");
}

#[test]
fn config_and_storage_tables() {
    let cm = json!({"data": {"a": "1", "b": "2"}, "binaryData": {"c": "AA=="}});
    assert_eq!(cell("", "configmaps", cm, "Data"), 3);
    let secret = json!({"type": "kubernetes.io/tls", "data": {"tls.crt": "", "tls.key": ""}});
    assert_eq!(
        cell("", "secrets", secret.clone(), "Type"),
        "kubernetes.io/tls"
    );
    assert_eq!(cell("", "secrets", secret, "Data"), 2);
    assert_eq!(
        cell(
            "",
            "serviceaccounts",
            json!({"secrets": [{"name": "t"}]}),
            "Secrets"
        ),
        1
    );
    assert_eq!(
        cell(
            "",
            "namespaces",
            json!({"status": {"phase": "Active"}}),
            "Status"
        ),
        "Active"
    );
    let pv = json!({"spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteMany", "ReadWriteOnce", "ReadWriteOnce"],
                             "persistentVolumeReclaimPolicy": "Retain", "claimRef": {"namespace": "ns", "name": "data"},
                             "storageClassName": "local-path"},
                    "status": {"phase": "Bound"}});
    assert_eq!(cell("", "persistentvolumes", pv.clone(), "Capacity"), "5Gi");
    assert_eq!(
        cell("", "persistentvolumes", pv.clone(), "Access Modes"),
        "RWO,RWX"
    );
    assert_eq!(
        cell("", "persistentvolumes", pv.clone(), "Claim"),
        "ns/data"
    );
    assert_eq!(
        cell("", "persistentvolumes", pv.clone(), "StorageClass"),
        "local-path"
    );
    assert_eq!(cell("", "persistentvolumes", pv, "VolumeMode"), "<unset>");
    let pending =
        json!({"spec": {"storageClassName": "local-path"}, "status": {"phase": "Pending"}});
    assert_eq!(
        cell("", "persistentvolumeclaims", pending.clone(), "Capacity"),
        ""
    );
    assert_eq!(
        cell("", "persistentvolumeclaims", pending, "Status"),
        "Pending"
    );
    let bound = json!({"metadata": {"deletionTimestamp": ago(1)}, "spec": {"volumeName": "pv1"},
                       "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]}});
    assert_eq!(
        cell("", "persistentvolumeclaims", bound.clone(), "Status"),
        "Terminating"
    );
    assert_eq!(
        cell("", "persistentvolumeclaims", bound.clone(), "Capacity"),
        "1Gi"
    );
    assert_eq!(
        cell("", "persistentvolumeclaims", bound, "Access Modes"),
        "RWO"
    );
    let sc = json!({"metadata": {"name": "local-path", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
                    "provisioner": "skiff.dev/local-path"});
    assert_eq!(
        cell("storage.k8s.io", "storageclasses", sc.clone(), "Name"),
        "local-path (default)"
    );
    assert_eq!(
        cell(
            "storage.k8s.io",
            "storageclasses",
            sc.clone(),
            "ReclaimPolicy"
        ),
        "Delete"
    );
    assert_eq!(
        cell(
            "storage.k8s.io",
            "storageclasses",
            sc,
            "AllowVolumeExpansion"
        ),
        false
    );
}

#[test]
fn cluster_tables() {
    let lease = json!({"spec": {"holderIdentity": "skiff-1"}});
    assert_eq!(
        cell("coordination.k8s.io", "leases", lease, "Holder"),
        "skiff-1"
    );
    let binding = json!({"roleRef": {"kind": "ClusterRole", "name": "view"},
                         "subjects": [{"kind": "User", "name": "ann"}, {"kind": "Group", "name": "devs"},
                                      {"kind": "ServiceAccount", "namespace": "ns", "name": "bot"},
                                      {"kind": "User", "name": "bob"}]});
    let rb = |column| {
        cell(
            "rbac.authorization.k8s.io",
            "rolebindings",
            binding.clone(),
            column,
        )
    };
    assert_eq!(rb("Role"), "ClusterRole/view");
    assert_eq!(rb("Users"), "ann, bob");
    assert_eq!(rb("Groups"), "devs");
    assert_eq!(rb("ServiceAccounts"), "ns/bot");
    let hooks = json!({"webhooks": [{}, {}]});
    assert_eq!(
        cell(
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            hooks,
            "Webhooks"
        ),
        2
    );
    let pc = json!({"value": 1000, "globalDefault": true});
    assert_eq!(
        cell("scheduling.k8s.io", "priorityclasses", pc.clone(), "Value"),
        1000
    );
    assert_eq!(
        cell("scheduling.k8s.io", "priorityclasses", pc, "Global-Default"),
        true
    );
    let pdb = json!({"spec": {"minAvailable": "50%"}, "status": {"disruptionsAllowed": 1}});
    assert_eq!(
        cell(
            "policy",
            "poddisruptionbudgets",
            pdb.clone(),
            "Min Available"
        ),
        "50%"
    );
    assert_eq!(
        cell("policy", "poddisruptionbudgets", pdb, "Max Unavailable"),
        "N/A"
    );
}

#[test]
fn default_table() {
    let widget =
        json!({"metadata": {"name": "w", "creationTimestamp": "2024-05-01T10:00:00.5+02:00"}});
    let t = table("example.com", "widgets", &[widget]);
    assert_eq!(t["columnDefinitions"][1]["name"], "Created At");
    assert_eq!(t["columnDefinitions"][1]["type"], "date");
    assert_eq!(t["rows"][0]["cells"], json!(["w", "2024-05-01T08:00:00Z"]));
    let t = table("rbac.authorization.k8s.io", "roles", &[json!({})]);
    assert_eq!(t["rows"][0]["cells"], json!(["", "0001-01-01T00:00:00Z"]));
}

#[test]
fn ages() {
    let ns = |created: Value| {
        cell(
            "",
            "namespaces",
            json!({"metadata": {"creationTimestamp": created}}),
            "Age",
        )
    };
    assert_eq!(ns(json!(ago(2 * 86400 + 3 * 3600))), "2d3h");
    assert_eq!(ns(json!(ago(-10))), "<invalid>");
    assert_eq!(ns(Value::Null), "<unknown>");
    assert_eq!(ns(json!("0001-01-01T00:00:00Z")), "<unknown>");
}
