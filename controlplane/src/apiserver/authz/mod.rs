//! RBAC authorization. Every authenticated request outside `system:masters`
//! is checked against the cluster's Roles, ClusterRoles and their bindings
//! and refused with 403 Forbidden unless a bound rule allows it, as
//! upstream's `--authorization-mode=RBAC`.
//!
//! The policy is held in memory and rebuilt from the store whenever an
//! object under `rbac.authorization.k8s.io` changes ([`start`]), so a check
//! costs no store read. `system:masters` (the admin kubeconfig and the
//! server's own components) skip the check entirely.
//!
//! Also served here, because they answer from the same policy:
//! `SelfSubjectAccessReview` (`kubectl auth can-i`) and
//! `SelfSubjectReview` (`kubectl auth whoami`).

pub mod bootstrap;
mod rules;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http::{Method, StatusCode};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef,
};
use serde_json::{Value, json};

use super::ApiState;
use super::authn::User;
use super::request::{BodyFormat, MAX_BODY_BYTES, decode_body};
use super::selectors::LabelSelector;
use super::status::{ApiError, Details};
use crate::storage::RangeRequest;
pub use rules::Attributes;

/// Where RBAC objects live in the store.
const RBAC_PREFIX: &str = "/registry/rbac.authorization.k8s.io/";
const ACCESS_REVIEW_PATH: &str = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
const SELF_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";

/// The current policy, swapped whole when RBAC objects change.
#[derive(Default)]
pub struct Authorizer {
    policy: RwLock<Arc<Policy>>,
}

/// Roles with their rules resolved (aggregation applied) and the bindings
/// that grant them.
#[derive(Default)]
struct Policy {
    cluster_roles: HashMap<String, Vec<PolicyRule>>,
    /// Keyed by (namespace, name).
    roles: HashMap<(String, String), Vec<PolicyRule>>,
    cluster_bindings: Vec<ClusterRoleBinding>,
    /// Keyed by namespace.
    bindings: HashMap<String, Vec<RoleBinding>>,
}

impl Authorizer {
    /// Whether `user` may do `request`.
    pub fn allows(&self, user: &User, request: &Attributes) -> bool {
        if is_master(user) {
            return true;
        }
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        policy.allows(user, request)
    }

    fn replace(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }
}

/// The middleware, inside authentication: answers the self-review
/// requests, then lets through what the policy allows and refuses the rest
/// with a Forbidden `Status`.
pub async fn authorize(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    // Public paths reach here without a user.
    let Some(user) = request.extensions().get::<User>().cloned() else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if request.method() == Method::POST && (path == ACCESS_REVIEW_PATH || path == SELF_REVIEW_PATH)
    {
        return match self_review(&state, &user, request).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
    }
    let attributes = attributes(request.method(), path, request.uri().query());
    if state.authorizer.allows(&user, &attributes) {
        next.run(request).await
    } else {
        tracing::debug!(user = %user.name, ?attributes, "forbidden");
        forbidden(&user, &attributes).into_response()
    }
}

/// Loads the policy, then keeps it current in the background: every change
/// seen by a store watch on the RBAC objects reloads it.
pub async fn start(state: Arc<ApiState>) -> Result<(), crate::storage::StoreError> {
    let revision = reload(&state).await?;
    tokio::spawn(async move {
        let mut revision = revision;
        loop {
            match follow(&state, revision).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "RBAC policy watch ended; reloading"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            match reload(&state).await {
                Ok(now) => revision = now,
                Err(e) => tracing::warn!(error = %e, "reloading the RBAC policy"),
            }
        }
    });
    Ok(())
}

/// Creates the bootstrap roles and bindings that are missing.
pub async fn create_bootstrap_policy(state: &ApiState) -> Result<(), ApiError> {
    for (plural, object) in bootstrap::objects() {
        let rt = super::resource(state, "rbac.authorization.k8s.io", plural)?;
        super::create_if_missing(state, rt, None, object).await?;
    }
    Ok(())
}

/// Reloads on every change after `revision`; returns when the store
/// closes the watch.
async fn follow(state: &ApiState, revision: i64) -> Result<(), crate::storage::StoreError> {
    let mut changes = state
        .store
        // `watch` is exclusive of `revision`: the next change is the first.
        .watch(RBAC_PREFIX.as_bytes(), revision)
        .await?;
    while let Some(change) = changes.next().await {
        change?;
        // Several changes usually come together (an apply of a role and
        // its binding); one reload covers everything already queued.
        while let Some(Some(more)) = changes.next().now_or_never() {
            more?;
        }
        reload(state).await?;
    }
    Ok(())
}

/// Reads every RBAC object and swaps in the policy they make; returns the
/// revision read at.
async fn reload(state: &ApiState) -> Result<i64, crate::storage::StoreError> {
    let read = state
        .store
        .range(RangeRequest {
            prefix: Bytes::from_static(RBAC_PREFIX.as_bytes()),
            ..RangeRequest::default()
        })
        .await?;
    let mut objects = Objects::default();
    for kv in &read.kvs {
        let key = String::from_utf8_lossy(&kv.key);
        let Some(rest) = key.strip_prefix(RBAC_PREFIX) else {
            continue;
        };
        let plural = rest.split('/').next().unwrap_or_default();
        let parsed = match plural {
            "clusterroles" => {
                serde_json::from_slice(&kv.value).map(|o| objects.cluster_roles.push(o))
            }
            "roles" => serde_json::from_slice(&kv.value).map(|o| objects.roles.push(o)),
            "clusterrolebindings" => {
                serde_json::from_slice(&kv.value).map(|o| objects.cluster_bindings.push(o))
            }
            "rolebindings" => serde_json::from_slice(&kv.value).map(|o| objects.bindings.push(o)),
            _ => Ok(()),
        };
        if let Err(e) = parsed {
            tracing::warn!(%key, error = %e, "unreadable RBAC object left out of the policy");
        }
    }
    state.authorizer.replace(Policy::build(objects));
    Ok(read.revision)
}

/// RBAC objects as read from the store.
#[derive(Default)]
struct Objects {
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    cluster_bindings: Vec<ClusterRoleBinding>,
    bindings: Vec<RoleBinding>,
}

impl Policy {
    fn build(objects: Objects) -> Policy {
        let mut cluster_roles = HashMap::new();
        for role in &objects.cluster_roles {
            let mut rules = role.rules.clone().unwrap_or_default();
            // Aggregation: the union of every ClusterRole a selector picks,
            // as upstream's aggregation controller writes into `rules`.
            for selector in role
                .aggregation_rule
                .iter()
                .flat_map(|a| a.cluster_role_selectors.iter().flatten())
            {
                let Ok(selector) = LabelSelector::from_metav1(selector) else {
                    continue;
                };
                for other in &objects.cluster_roles {
                    let picked = other.metadata.name != role.metadata.name
                        && selector.matches_map(
                            other
                                .metadata
                                .labels
                                .as_ref()
                                .unwrap_or(&Default::default()),
                        );
                    if picked {
                        rules.extend(other.rules.iter().flatten().cloned());
                    }
                }
            }
            cluster_roles.insert(role.metadata.name.clone().unwrap_or_default(), rules);
        }
        let roles = objects
            .roles
            .into_iter()
            .map(|role| {
                let key = (
                    role.metadata.namespace.unwrap_or_default(),
                    role.metadata.name.unwrap_or_default(),
                );
                (key, role.rules.unwrap_or_default())
            })
            .collect();
        let mut bindings: HashMap<String, Vec<RoleBinding>> = HashMap::new();
        for binding in objects.bindings {
            let namespace = binding.metadata.namespace.clone().unwrap_or_default();
            bindings.entry(namespace).or_default().push(binding);
        }
        Policy {
            cluster_roles,
            roles,
            cluster_bindings: objects.cluster_bindings,
            bindings,
        }
    }

    fn allows(&self, user: &User, request: &Attributes) -> bool {
        let granted = |rules: Option<&Vec<PolicyRule>>| {
            rules.is_some_and(|rules| rules.iter().any(|rule| rules::allows(rule, request)))
        };
        let cluster_wide = self.cluster_bindings.iter().any(|binding| {
            rules::names(binding.subjects.as_deref().unwrap_or_default(), "", user)
                && binding.role_ref.kind == "ClusterRole"
                && granted(self.cluster_roles.get(&binding.role_ref.name))
        });
        if cluster_wide {
            return true;
        }
        let namespace = request.namespace();
        if namespace.is_empty() {
            return false;
        }
        self.bindings.get(namespace).is_some_and(|bindings| {
            bindings.iter().any(|binding| {
                rules::names(
                    binding.subjects.as_deref().unwrap_or_default(),
                    namespace,
                    user,
                ) && granted(self.role_rules(namespace, &binding.role_ref))
            })
        })
    }

    /// The rules a RoleBinding in `namespace` grants through its roleRef.
    fn role_rules(&self, namespace: &str, role: &RoleRef) -> Option<&Vec<PolicyRule>> {
        match role.kind.as_str() {
            "ClusterRole" => self.cluster_roles.get(&role.name),
            "Role" => self.roles.get(&(namespace.to_owned(), role.name.clone())),
            _ => None,
        }
    }
}

fn is_master(user: &User) -> bool {
    user.groups.iter().any(|g| g == "system:masters")
}

/// What a request asks to do, read from its method and path the way
/// upstream's request-info resolver does.
pub fn attributes(method: &Method, path: &str, query: Option<&str>) -> Attributes {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => return non_resource(method, path),
    };
    let (namespace, resource, name, subresource) = match rest {
        ["namespaces", ns, kind, more @ ..]
            if !matches!(*kind, "status" | "finalize") || !more.is_empty() =>
        {
            (*ns, *kind, more.first().copied(), more.get(1).copied())
        }
        // The Namespace itself: its name is also the request's namespace.
        ["namespaces", ns, more @ ..] => (*ns, "namespaces", Some(*ns), more.first().copied()),
        [kind, more @ ..] => ("", *kind, more.first().copied(), more.get(1).copied()),
        [] => return non_resource(method, path),
    };
    let subresource = subresource.unwrap_or_default();
    let watching = query.is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "watch=true" | "watch=1" | "watch"))
    });
    let verb = if matches!(subresource, "exec" | "attach" | "portforward") {
        // Streams opened by GET (WebSocket) still start a process or a
        // tunnel: upstream requires `create` for them too.
        "create"
    } else {
        match *method {
            Method::GET | Method::HEAD if watching => "watch",
            Method::GET | Method::HEAD if name.is_some() => "get",
            Method::GET | Method::HEAD => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE if name.is_some() => "delete",
            Method::DELETE => "deletecollection",
            _ => "unknown",
        }
    };
    Attributes::Resource {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource: resource.to_owned(),
        subresource: subresource.to_owned(),
        namespace: namespace.to_owned(),
        name: name.unwrap_or_default().to_owned(),
    }
}

fn non_resource(method: &Method, path: &str) -> Attributes {
    Attributes::NonResource {
        verb: method.as_str().to_ascii_lowercase(),
        path: path.to_owned(),
    }
}

fn forbidden(user: &User, attributes: &Attributes) -> ApiError {
    let mut error = ApiError::forbidden(attributes.forbidden_message(&user.name));
    if let Attributes::Resource {
        group,
        resource,
        name,
        ..
    } = attributes
    {
        error.details = Some(Box::new(Details {
            name: name.clone(),
            group: group.clone(),
            kind: resource.clone(),
            ..Details::default()
        }));
    }
    error
}

/// `SelfSubjectAccessReview` and `SelfSubjectReview`: answered for the
/// caller from the policy, never stored.
async fn self_review(
    state: &ApiState,
    user: &User,
    request: Request,
) -> Result<Response, ApiError> {
    let access = request.uri().path() == ACCESS_REVIEW_PATH;
    let (resource, group) = if access {
        ("selfsubjectaccessreviews", "authorization.k8s.io")
    } else {
        ("selfsubjectreviews", "authentication.k8s.io")
    };
    let creating = Attributes::Resource {
        verb: "create".into(),
        group: group.into(),
        resource: resource.into(),
        subresource: String::new(),
        namespace: String::new(),
        name: String::new(),
    };
    if !state.authorizer.allows(user, &creating) {
        return Err(forbidden(user, &creating));
    }
    let format = BodyFormat::of(request.headers())?;
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
    let (mut review, status) = if access {
        let review = decode_body(format, &body)?;
        let asked = asked_attributes(review.get("spec"))?;
        let allowed = state.authorizer.allows(user, &asked);
        let mut status = json!({"allowed": allowed});
        if allowed {
            status["reason"] = json!(if is_master(user) {
                "allowed as a member of system:masters"
            } else {
                "allowed by an RBAC binding"
            });
        }
        (review, status)
    } else {
        // The request carries nothing but its type.
        let review = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {}});
        let status = json!({"userInfo": {"username": user.name, "groups": user.groups}});
        (review, status)
    };
    review["status"] = status;
    let body = Body::from(review.to_string());
    Ok((
        StatusCode::CREATED,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// The attributes a SelfSubjectAccessReview's spec asks about.
fn asked_attributes(spec: Option<&Value>) -> Result<Attributes, ApiError> {
    let text = |object: &Value, field: &str| {
        object
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let spec = spec.ok_or_else(|| ApiError::bad_request("spec: Required value"))?;
    if let Some(asked) = spec.get("resourceAttributes") {
        return Ok(Attributes::Resource {
            verb: text(asked, "verb"),
            group: text(asked, "group"),
            resource: text(asked, "resource"),
            subresource: text(asked, "subresource"),
            namespace: text(asked, "namespace"),
            name: text(asked, "name"),
        });
    }
    if let Some(asked) = spec.get("nonResourceAttributes") {
        return Ok(Attributes::NonResource {
            verb: text(asked, "verb"),
            path: text(asked, "path"),
        });
    }
    Err(ApiError::bad_request(
        "spec: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(
        method: Method,
        path: &str,
        query: Option<&str>,
    ) -> (String, String, String, String, String, String) {
        match attributes(&method, path, query) {
            Attributes::Resource {
                verb,
                group,
                resource,
                subresource,
                namespace,
                name,
            } => (verb, group, resource, subresource, namespace, name),
            Attributes::NonResource { verb, path } => (
                verb,
                "<url>".into(),
                path,
                String::new(),
                String::new(),
                String::new(),
            ),
        }
    }

    fn t(v: [&str; 6]) -> (String, String, String, String, String, String) {
        (
            v[0].into(),
            v[1].into(),
            v[2].into(),
            v[3].into(),
            v[4].into(),
            v[5].into(),
        )
    }

    #[test]
    fn requests_resolve_like_upstream() {
        assert_eq!(
            attrs(Method::GET, "/api/v1/namespaces/dev/pods", None),
            t(["list", "", "pods", "", "dev", ""])
        );
        assert_eq!(
            attrs(
                Method::GET,
                "/api/v1/namespaces/dev/pods",
                Some("watch=true&resourceVersion=5")
            ),
            t(["watch", "", "pods", "", "dev", ""])
        );
        assert_eq!(
            attrs(Method::GET, "/api/v1/namespaces/dev/pods/web/log", None),
            t(["get", "", "pods", "log", "dev", "web"])
        );
        assert_eq!(
            attrs(
                Method::GET,
                "/api/v1/namespaces/dev/pods/web/exec",
                Some("command=sh")
            ),
            t(["create", "", "pods", "exec", "dev", "web"])
        );
        assert_eq!(
            attrs(
                Method::PATCH,
                "/apis/apps/v1/namespaces/dev/deployments/web/scale",
                None
            ),
            t(["patch", "apps", "deployments", "scale", "dev", "web"])
        );
        assert_eq!(
            attrs(Method::DELETE, "/api/v1/namespaces/dev/configmaps", None),
            t(["deletecollection", "", "configmaps", "", "dev", ""])
        );
        assert_eq!(
            attrs(Method::GET, "/api/v1/namespaces/dev", None),
            t(["get", "", "namespaces", "", "dev", "dev"])
        );
        assert_eq!(
            attrs(Method::PUT, "/api/v1/namespaces/dev/finalize", None),
            t(["update", "", "namespaces", "finalize", "dev", "dev"])
        );
        assert_eq!(
            attrs(Method::POST, "/api/v1/nodes", None),
            t(["create", "", "nodes", "", "", ""])
        );
        assert_eq!(
            attrs(
                Method::GET,
                "/apis/metrics.k8s.io/v1beta1/namespaces/dev/pods",
                None
            ),
            t(["list", "metrics.k8s.io", "pods", "", "dev", ""])
        );
        assert_eq!(
            attrs(Method::GET, "/apis/apps/v1", None),
            t(["get", "<url>", "/apis/apps/v1", "", "", ""])
        );
        assert_eq!(
            attrs(Method::GET, "/metrics", None),
            t(["get", "<url>", "/metrics", "", "", ""])
        );
    }

    fn policy(objects: Value) -> Policy {
        let mut parsed = Objects::default();
        for object in objects.as_array().into_iter().flatten() {
            match object["kind"].as_str() {
                Some("ClusterRole") => parsed
                    .cluster_roles
                    .push(serde_json::from_value(object.clone()).unwrap_or_default()),
                Some("Role") => parsed
                    .roles
                    .push(serde_json::from_value(object.clone()).unwrap_or_default()),
                Some("ClusterRoleBinding") => parsed
                    .cluster_bindings
                    .push(serde_json::from_value(object.clone()).unwrap_or_default()),
                Some("RoleBinding") => parsed
                    .bindings
                    .push(serde_json::from_value(object.clone()).unwrap_or_default()),
                _ => {}
            }
        }
        Policy::build(parsed)
    }

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    #[test]
    fn bootstrap_policy_grants_what_upstream_does() {
        let objects: Vec<Value> = bootstrap::objects().into_iter().map(|(_, o)| o).collect();
        let policy = policy(Value::Array(objects));
        let alice = user("alice", &["system:authenticated"]);
        let get = |path: &str| attributes(&Method::GET, path, None);
        // Discovery and self-review for everyone, nothing else.
        assert!(policy.allows(&alice, &get("/apis/apps/v1")));
        assert!(policy.allows(&alice, &get("/version")));
        assert!(!policy.allows(&alice, &get("/metrics")));
        assert!(!policy.allows(&alice, &get("/api/v1/namespaces/dev/pods")));
        assert!(policy.allows(&alice, &attributes(&Method::POST, ACCESS_REVIEW_PATH, None)));
        // Nodes read everything and write their own kinds, not workloads.
        let node = user("system:node:n1", &["system:nodes", "system:authenticated"]);
        assert!(policy.allows(&node, &get("/api/v1/namespaces/dev/secrets/s")));
        // What a node's cluster DNS lists and watches, in every namespace.
        for path in [
            "/api/v1/services",
            "/api/v1/pods",
            "/apis/discovery.k8s.io/v1/endpointslices",
        ] {
            for query in [None, Some("watch=true")] {
                assert!(
                    policy.allows(&node, &attributes(&Method::GET, path, query)),
                    "{path} {query:?}"
                );
            }
        }
        assert!(policy.allows(
            &node,
            &attributes(
                &Method::PATCH,
                "/api/v1/namespaces/dev/pods/web/status",
                None
            )
        ));
        assert!(policy.allows(
            &node,
            &attributes(
                &Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1",
                None
            )
        ));
        assert!(!policy.allows(
            &node,
            &attributes(
                &Method::POST,
                "/apis/apps/v1/namespaces/dev/deployments",
                None
            )
        ));
    }

    #[test]
    fn role_bindings_grant_within_their_namespace_and_aggregation_extends_roles() {
        let policy = policy(json!([
            {"kind": "Role", "metadata": {"name": "reader", "namespace": "dev"},
             "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
            {"kind": "RoleBinding", "metadata": {"name": "alice-reads", "namespace": "dev"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
             "subjects": [{"kind": "User", "name": "alice"}]},
            {"kind": "ClusterRole", "metadata": {"name": "view"},
             "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "view"}}]}},
            {"kind": "ClusterRole", "metadata": {"name": "widgets", "labels": {"agg": "view"}},
             "rules": [{"apiGroups": ["example.com"], "resources": ["widgets"], "verbs": ["get"]}]},
            {"kind": "RoleBinding", "metadata": {"name": "bob-views", "namespace": "prod"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
             "subjects": [{"kind": "ServiceAccount", "name": "bob"}]},
        ]));
        let alice = user("alice", &[]);
        let get = |path: &str| attributes(&Method::GET, path, None);
        assert!(policy.allows(&alice, &get("/api/v1/namespaces/dev/pods/web")));
        assert!(!policy.allows(&alice, &get("/api/v1/namespaces/prod/pods/web")));
        assert!(!policy.allows(&alice, &get("/api/v1/pods")));
        assert!(!policy.allows(
            &alice,
            &attributes(&Method::DELETE, "/api/v1/namespaces/dev/pods/web", None)
        ));
        let bob = user("system:serviceaccount:prod:bob", &[]);
        assert!(policy.allows(&bob, &get("/apis/example.com/v1/namespaces/prod/widgets/w")));
        assert!(!policy.allows(&bob, &get("/apis/example.com/v1/namespaces/dev/widgets/w")));
    }
}
