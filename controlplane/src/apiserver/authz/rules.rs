//! RBAC's evaluation, as upstream's `rbac` authorizer does it: what a
//! request asks to do ([`Attributes`]), and whether one policy rule or one
//! binding's subjects cover it.

use k8s_openapi::api::rbac::v1::{PolicyRule, Subject};

use super::super::authn::User;

/// What a request asks to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attributes {
    /// A verb on a resource (or one of its subresources).
    Resource {
        verb: String,
        group: String,
        resource: String,
        subresource: String,
        namespace: String,
        name: String,
    },
    /// A verb (`get`, `post`, …) on a path outside the resource API.
    NonResource { verb: String, path: String },
}

impl Attributes {
    /// The request's namespace; empty for cluster-scoped and non-resource
    /// requests.
    pub fn namespace(&self) -> &str {
        match self {
            Attributes::Resource { namespace, .. } => namespace,
            Attributes::NonResource { .. } => "",
        }
    }

    /// Upstream's refusal text, e.g. `pods is forbidden: User "alice"
    /// cannot list resource "pods" in API group "" in the namespace "dev"`.
    pub fn forbidden_message(&self, user: &str) -> String {
        match self {
            Attributes::Resource {
                verb,
                group,
                resource,
                subresource,
                namespace,
                name,
            } => {
                let full = if subresource.is_empty() {
                    resource.clone()
                } else {
                    format!("{resource}/{subresource}")
                };
                let what = if name.is_empty() {
                    full.clone()
                } else {
                    format!("{full} \"{name}\"")
                };
                let scope = if namespace.is_empty() {
                    " at the cluster scope".to_owned()
                } else {
                    format!(" in the namespace \"{namespace}\"")
                };
                format!(
                    "{what} is forbidden: User \"{user}\" cannot {verb} resource \"{full}\" in API group \"{group}\"{scope}"
                )
            }
            Attributes::NonResource { verb, path } => {
                format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\"")
            }
        }
    }
}

/// Whether `rule` allows `request`.
pub fn allows(rule: &PolicyRule, request: &Attributes) -> bool {
    if !matches(&rule.verbs, request_verb(request)) {
        return false;
    }
    match request {
        Attributes::Resource {
            group,
            resource,
            subresource,
            name,
            ..
        } => {
            matches(rule.api_groups.as_deref().unwrap_or_default(), group)
                && resource_matches(
                    rule.resources.as_deref().unwrap_or_default(),
                    resource,
                    subresource,
                )
                && name_matches(rule.resource_names.as_deref().unwrap_or_default(), name)
        }
        Attributes::NonResource { path, .. } => {
            path_matches(rule.non_resource_urls.as_deref().unwrap_or_default(), path)
        }
    }
}

/// Whether one of a binding's subjects is `user`. A ServiceAccount subject
/// is the user `system:serviceaccount:<namespace>:<name>`; its namespace
/// defaults to the binding's own.
pub fn names(subjects: &[Subject], binding_namespace: &str, user: &User) -> bool {
    subjects.iter().any(|subject| match subject.kind.as_str() {
        "User" => subject.name == user.name,
        "Group" => user.groups.contains(&subject.name),
        "ServiceAccount" => {
            let namespace = subject
                .namespace
                .as_deref()
                .filter(|ns| !ns.is_empty())
                .unwrap_or(binding_namespace);
            user.name
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
                .is_some_and(|(ns, name)| ns == namespace && name == subject.name)
        }
        _ => false,
    })
}

fn request_verb(request: &Attributes) -> &str {
    match request {
        Attributes::Resource { verb, .. } | Attributes::NonResource { verb, .. } => verb,
    }
}

fn matches(allowed: &[String], wanted: &str) -> bool {
    allowed.iter().any(|a| a == "*" || a == wanted)
}

/// `*` covers everything, `pods` only the resource itself, `pods/log` that
/// subresource and `*/scale` the subresource of any resource.
fn resource_matches(allowed: &[String], resource: &str, subresource: &str) -> bool {
    allowed.iter().any(|a| {
        if a == "*" {
            return true;
        }
        if subresource.is_empty() {
            return a == resource;
        }
        match a.split_once('/') {
            Some((r, s)) => (r == resource || r == "*") && s == subresource,
            None => false,
        }
    })
}

/// An empty list names everything; otherwise the request must name one of
/// them (so a create or list, which names nothing, is not covered).
fn name_matches(allowed: &[String], name: &str) -> bool {
    allowed.is_empty() || allowed.iter().any(|a| a == name)
}

/// Exact paths, or prefixes written with a trailing `*`.
fn path_matches(allowed: &[String], path: &str) -> bool {
    allowed.iter().any(|a| match a.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => a == path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(verbs: &[&str], groups: &[&str], resources: &[&str], names: &[&str]) -> PolicyRule {
        let owned = |v: &[&str]| Some(v.iter().map(|s| (*s).to_owned()).collect());
        PolicyRule {
            verbs: verbs.iter().map(|s| (*s).to_owned()).collect(),
            api_groups: owned(groups),
            resources: owned(resources),
            resource_names: owned(names),
            non_resource_urls: None,
        }
    }

    fn request(verb: &str, group: &str, resource: &str, sub: &str, name: &str) -> Attributes {
        Attributes::Resource {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: "dev".into(),
            name: name.into(),
        }
    }

    #[test]
    fn resource_rules_match_verbs_groups_resources_and_names() {
        let read_pods = rule(&["get", "list"], &[""], &["pods"], &[]);
        assert!(allows(&read_pods, &request("get", "", "pods", "", "web")));
        assert!(allows(&read_pods, &request("list", "", "pods", "", "")));
        assert!(!allows(
            &read_pods,
            &request("delete", "", "pods", "", "web")
        ));
        assert!(!allows(
            &read_pods,
            &request("get", "apps", "pods", "", "web")
        ));
        // A subresource needs its own entry.
        assert!(!allows(
            &read_pods,
            &request("get", "", "pods", "log", "web")
        ));
        let logs = rule(&["get"], &[""], &["pods/log"], &[]);
        assert!(allows(&logs, &request("get", "", "pods", "log", "web")));
        assert!(!allows(&logs, &request("get", "", "pods", "", "web")));
        let any_scale = rule(&["update"], &["*"], &["*/scale"], &[]);
        assert!(allows(
            &any_scale,
            &request("update", "apps", "deployments", "scale", "web")
        ));
        assert!(!allows(
            &any_scale,
            &request("update", "apps", "deployments", "", "web")
        ));
        let one = rule(&["get", "list"], &[""], &["configmaps"], &["settings"]);
        assert!(allows(
            &one,
            &request("get", "", "configmaps", "", "settings")
        ));
        assert!(!allows(
            &one,
            &request("get", "", "configmaps", "", "other")
        ));
        assert!(!allows(&one, &request("list", "", "configmaps", "", "")));
        let all = rule(&["*"], &["*"], &["*"], &[]);
        assert!(allows(
            &all,
            &request("patch", "x.io", "things", "status", "a")
        ));
    }

    #[test]
    fn non_resource_rules_match_paths_and_prefixes() {
        let discovery = PolicyRule {
            verbs: vec!["get".into()],
            non_resource_urls: Some(vec!["/api".into(), "/apis/*".into()]),
            ..PolicyRule::default()
        };
        let get = |path: &str| Attributes::NonResource {
            verb: "get".into(),
            path: path.into(),
        };
        assert!(allows(&discovery, &get("/api")));
        assert!(allows(&discovery, &get("/apis/apps/v1")));
        assert!(!allows(&discovery, &get("/api/v1")));
        assert!(!allows(&discovery, &get("/metrics")));
        // A resource request never matches a URL rule.
        assert!(!allows(&discovery, &request("get", "", "pods", "", "")));
    }

    #[test]
    fn subjects_name_users_groups_and_service_accounts() {
        let user = User {
            name: "system:serviceaccount:dev:builder".into(),
            groups: vec!["system:serviceaccounts".into()],
        };
        let subject = |kind: &str, name: &str, ns: Option<&str>| Subject {
            kind: kind.into(),
            name: name.into(),
            namespace: ns.map(str::to_owned),
            api_group: None,
        };
        assert!(names(
            &[subject("ServiceAccount", "builder", None)],
            "dev",
            &user
        ));
        assert!(!names(
            &[subject("ServiceAccount", "builder", None)],
            "prod",
            &user
        ));
        assert!(names(
            &[subject("ServiceAccount", "builder", Some("dev"))],
            "prod",
            &user
        ));
        assert!(names(
            &[subject("Group", "system:serviceaccounts", None)],
            "",
            &user
        ));
        assert!(!names(&[subject("User", "builder", None)], "", &user));
    }

    #[test]
    fn refusals_read_like_upstream() {
        let message = request("list", "", "pods", "", "").forbidden_message("alice");
        assert_eq!(
            message,
            "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"dev\""
        );
    }
}
