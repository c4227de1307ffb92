//! The roles and bindings every cluster starts with, after upstream's
//! bootstrap policy: `cluster-admin`, the user-facing `admin`, `edit` and
//! `view` (aggregated, so labelled ClusterRoles extend them), discovery and
//! self-review for every authenticated user, and a `system:node` role for
//! the node agents. Created when missing, never overwritten, so an
//! administrator's edits survive restarts (upstream's `autoupdate`
//! annotation is not honoured).

use serde_json::{Value, json};

/// Label upstream puts on its bootstrap objects.
const BOOTSTRAP: &str = "rbac-defaults";

/// (plural, object) of every bootstrap ClusterRole and ClusterRoleBinding.
pub fn objects() -> Vec<(&'static str, Value)> {
    let mut objects = vec![
        cluster_role(
            "cluster-admin",
            json!([
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ]),
        ),
        cluster_role(
            "system:discovery",
            json!([{"nonResourceURLs": [
                "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz",
                "/openapi", "/openapi/*", "/version", "/version/"
            ], "verbs": ["get"]}]),
        ),
        cluster_role(
            "system:public-info-viewer",
            json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"],
                    "verbs": ["get"]}]),
        ),
        cluster_role(
            "system:basic-user",
            json!([
                {"apiGroups": ["authorization.k8s.io"],
                 "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                 "verbs": ["create"]},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"],
                 "verbs": ["create"]},
            ]),
        ),
        cluster_role("system:node", node_rules()),
        binding("cluster-admin", "cluster-admin", "Group", "system:masters"),
        binding(
            "system:discovery",
            "system:discovery",
            "Group",
            "system:authenticated",
        ),
        binding(
            "system:basic-user",
            "system:basic-user",
            "Group",
            "system:authenticated",
        ),
        binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            "Group",
            "system:authenticated",
        ),
        // Upstream leaves nodes to its Node authorizer; Skiff grants the
        // same verbs by RBAC to the group every node credential carries.
        binding("system:node", "system:node", "Group", "system:nodes"),
    ];
    objects.extend(user_facing_roles());
    objects
}

/// `admin` ⊃ `edit` ⊃ `view`, each aggregating the ClusterRoles labelled
/// for it, with the rules upstream puts in its `aggregate-to-*` parts.
fn user_facing_roles() -> Vec<(&'static str, Value)> {
    let read = ["get", "list", "watch"];
    let write = ["create", "delete", "deletecollection", "patch", "update"];
    let view_rules = json!([
        {"apiGroups": [""], "verbs": read, "resources": [
            "configmaps", "endpoints", "persistentvolumeclaims", "persistentvolumeclaims/status",
            "pods", "pods/log", "pods/status", "replicationcontrollers", "replicationcontrollers/scale",
            "replicationcontrollers/status", "resourcequotas", "resourcequotas/status",
            "serviceaccounts", "services", "services/status", "bindings", "events", "limitranges",
            "namespaces", "namespaces/status"]},
        {"apiGroups": ["apps"], "verbs": read, "resources": [
            "controllerrevisions", "daemonsets", "daemonsets/status", "deployments",
            "deployments/scale", "deployments/status", "replicasets", "replicasets/scale",
            "replicasets/status", "statefulsets", "statefulsets/scale", "statefulsets/status"]},
        {"apiGroups": ["autoscaling"], "verbs": read,
         "resources": ["horizontalpodautoscalers", "horizontalpodautoscalers/status"]},
        {"apiGroups": ["batch"], "verbs": read,
         "resources": ["cronjobs", "cronjobs/status", "jobs", "jobs/status"]},
        {"apiGroups": ["policy"], "verbs": read,
         "resources": ["poddisruptionbudgets", "poddisruptionbudgets/status"]},
        {"apiGroups": ["networking.k8s.io"], "verbs": read,
         "resources": ["ingresses", "ingresses/status", "networkpolicies"]},
        {"apiGroups": ["discovery.k8s.io"], "verbs": read, "resources": ["endpointslices"]},
        {"apiGroups": ["events.k8s.io"], "verbs": read, "resources": ["events"]},
    ]);
    let edit_rules = json!([
        {"apiGroups": [""], "verbs": ["create", "get"], "resources": [
            "pods/attach", "pods/exec", "pods/portforward", "pods/proxy", "services/proxy"]},
        {"apiGroups": [""], "verbs": ["create"], "resources": ["pods/eviction"]},
        {"apiGroups": [""], "verbs": write, "resources": [
            "pods", "configmaps", "endpoints", "persistentvolumeclaims", "replicationcontrollers",
            "replicationcontrollers/scale", "secrets", "serviceaccounts", "services"]},
        {"apiGroups": [""], "verbs": read, "resources": ["secrets"]},
        {"apiGroups": [""], "verbs": ["impersonate"], "resources": ["serviceaccounts"]},
        {"apiGroups": [""], "verbs": ["create"], "resources": ["serviceaccounts/token"]},
        {"apiGroups": ["apps"], "verbs": write, "resources": [
            "daemonsets", "deployments", "deployments/rollback", "deployments/scale",
            "replicasets", "replicasets/scale", "statefulsets", "statefulsets/scale"]},
        {"apiGroups": ["autoscaling"], "verbs": write, "resources": ["horizontalpodautoscalers"]},
        {"apiGroups": ["batch"], "verbs": write, "resources": ["cronjobs", "jobs"]},
        {"apiGroups": ["policy"], "verbs": write, "resources": ["poddisruptionbudgets"]},
        {"apiGroups": ["networking.k8s.io"], "verbs": write,
         "resources": ["ingresses", "networkpolicies"]},
        {"apiGroups": ["discovery.k8s.io"], "verbs": write, "resources": ["endpointslices"]},
    ]);
    let admin_rules = json!([
        {"apiGroups": ["authorization.k8s.io"], "verbs": ["create"],
         "resources": ["localsubjectaccessreviews"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "verbs": read.iter().chain(&write).collect::<Vec<_>>(),
         "resources": ["rolebindings", "roles"]},
    ]);
    vec![
        aggregated("admin"),
        aggregated("edit"),
        aggregated("view"),
        aggregate_part("system:aggregate-to-admin", &["admin"], admin_rules),
        aggregate_part("system:aggregate-to-edit", &["admin", "edit"], edit_rules),
        aggregate_part(
            "system:aggregate-to-view",
            &["admin", "edit", "view"],
            view_rules,
        ),
    ]
}

/// What a node agent reads and writes: its Node and Lease, its pods'
/// status, events, the objects its pods' volumes and environment name,
/// service-account tokens for its pods, and what its data plane and DNS
/// watch.
fn node_rules() -> Value {
    json!([
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes", "nodes/status"],
         "verbs": ["create", "update", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "delete"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["update", "patch"]},
        {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
         "verbs": ["create", "update", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": ["create", "update", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["persistentvolumes", "persistentvolumeclaims/status"],
         "verbs": ["update", "patch"]},
    ])
}

fn cluster_role(name: &str, rules: Value) -> (&'static str, Value) {
    (
        "clusterroles",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": BOOTSTRAP}},
            "rules": rules,
        }),
    )
}

/// A role whose rules are the union of the ClusterRoles labelled
/// `rbac.authorization.k8s.io/aggregate-to-<name>: "true"`.
fn aggregated(name: &str) -> (&'static str, Value) {
    let label = format!("rbac.authorization.k8s.io/aggregate-to-{name}");
    (
        "clusterroles",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": BOOTSTRAP}},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {label: "true"}}]},
            "rules": [],
        }),
    )
}

fn aggregate_part(name: &str, into: &[&str], rules: Value) -> (&'static str, Value) {
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/bootstrapping".into(), json!(BOOTSTRAP));
    for role in into {
        labels.insert(
            format!("rbac.authorization.k8s.io/aggregate-to-{role}"),
            json!("true"),
        );
    }
    (
        "clusterroles",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels},
            "rules": rules,
        }),
    )
}

fn binding(name: &str, role: &str, kind: &str, subject: &str) -> (&'static str, Value) {
    (
        "clusterrolebindings",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": BOOTSTRAP}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}],
        }),
    )
}
