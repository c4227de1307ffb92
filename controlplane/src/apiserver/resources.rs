//! The kinds the API server serves: names, scope, verbs and subresources,
//! taken from the `k8s-openapi` types so that nothing is spelled twice.

use k8s_openapi::api::{
    apps, autoscaling, batch, coordination, core, discovery, events, networking, policy, rbac,
    storage,
};
use k8s_openapi::{ListableResource, NamespaceResourceScope, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::conversion::{EVENTS_AS_CORE, StoredAs};

/// Told where a typed decode skipped a field its type does not know.
pub type OnUnknown<'a> = dyn FnMut(serde_ignored::Path<'_>) + 'a;

/// One served resource (one kind in one group-version).
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    pub list_kind: &'static str,
    /// The plural, lower-case name used in URLs (`pods`).
    pub plural: &'static str,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub subresources: &'static [Subresource],
    /// Decodes a JSON object as this kind's typed struct and encodes it
    /// back: an error names the first field of the wrong type, and the
    /// result holds only fields the type knows (used to drop unknown ones).
    pub typed_round_trip: fn(&Value) -> Result<Value, serde_json::Error>,
    /// Decodes a JSON object as this kind's typed struct and drops it: an
    /// error names the first field of the wrong type, and `unknown` is
    /// called with the path of every field the type does not know. The
    /// check every write makes; cheaper than the round trip, which only
    /// a write that has unknown fields to drop then needs.
    pub typed_check: fn(&Value, &mut OnUnknown<'_>) -> Result<(), serde_json::Error>,
    /// The OpenAPI schema name (`io.k8s.api.core.v1.Pod`).
    pub schema_name: String,
    /// Adds the kind's schema (and everything it refers to) to a generator.
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    /// Set when another kind's storage holds this kind's objects.
    pub stored_as: Option<&'static StoredAs>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    Status,
    Scale,
    Binding,
    Log,
    Exec,
    Attach,
    PortForward,
    Eviction,
    Proxy,
    /// `namespaces/<name>/finalize`: changes only `spec.finalizers`.
    Finalize,
    /// `serviceaccounts/<name>/token`: a TokenRequest.
    Token,
}

impl Subresource {
    pub fn name(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
            Subresource::Binding => "binding",
            Subresource::Log => "log",
            Subresource::Exec => "exec",
            Subresource::Attach => "attach",
            Subresource::PortForward => "portforward",
            Subresource::Eviction => "eviction",
            Subresource::Proxy => "proxy",
            Subresource::Finalize => "finalize",
            Subresource::Token => "token",
        }
    }

    /// The kind a subresource request or response carries, and the verbs
    /// discovery lists for it.
    pub fn kind_and_verbs(self) -> (&'static str, &'static str, &'static [&'static str]) {
        match self {
            Subresource::Status => ("", "", &["get", "patch", "update"]),
            Subresource::Scale => ("autoscaling", "Scale", &["get", "patch", "update"]),
            Subresource::Binding => ("", "Binding", &["create"]),
            Subresource::Log => ("", "Pod", &["get"]),
            Subresource::Exec => ("", "PodExecOptions", &["create", "get"]),
            Subresource::Attach => ("", "PodAttachOptions", &["create", "get"]),
            Subresource::PortForward => ("", "PodPortForwardOptions", &["create", "get"]),
            Subresource::Eviction => ("policy", "Eviction", &["create"]),
            Subresource::Proxy => ("", "", &["create", "delete", "get", "patch", "update"]),
            Subresource::Finalize => ("", "", &["update"]),
            Subresource::Token => ("authentication.k8s.io", "TokenRequest", &["create"]),
        }
    }
}

/// The verbs every served resource supports.
pub const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

pub struct Registry {
    types: Vec<ResourceType>,
}

impl Registry {
    pub fn new() -> Self {
        use Subresource::*;
        const ALL: &[&str] = &["all"];
        let types = vec![
            of::<core::v1::Namespace>(&["ns"], &[], &[Status, Finalize]),
            of::<core::v1::Pod>(
                &["po"],
                ALL,
                &[
                    Status,
                    Binding,
                    Log,
                    Exec,
                    Attach,
                    PortForward,
                    Eviction,
                    Proxy,
                ],
            ),
            of::<core::v1::Service>(&["svc"], ALL, &[Status, Proxy]),
            of::<core::v1::Endpoints>(&["ep"], &[], &[]),
            of::<core::v1::ConfigMap>(&["cm"], &[], &[]),
            of::<core::v1::Secret>(&[], &[], &[]),
            of::<core::v1::Node>(&["no"], &[], &[Status, Proxy]),
            of::<core::v1::Event>(&["ev"], &[], &[]),
            of::<core::v1::ServiceAccount>(&["sa"], &[], &[Token]),
            of::<core::v1::PersistentVolume>(&["pv"], &[], &[Status]),
            of::<core::v1::PersistentVolumeClaim>(&["pvc"], &[], &[Status]),
            of::<core::v1::PodTemplate>(&[], &[], &[]),
            of::<core::v1::ReplicationController>(&["rc"], ALL, &[Status, Scale]),
            of::<core::v1::LimitRange>(&["limits"], &[], &[]),
            of::<core::v1::ResourceQuota>(&["quota"], &[], &[Status]),
            of::<apps::v1::Deployment>(&["deploy"], ALL, &[Status, Scale]),
            of::<apps::v1::ReplicaSet>(&["rs"], ALL, &[Status, Scale]),
            of::<apps::v1::StatefulSet>(&["sts"], ALL, &[Status, Scale]),
            of::<apps::v1::DaemonSet>(&["ds"], ALL, &[Status]),
            of::<apps::v1::ControllerRevision>(&[], &[], &[]),
            of::<networking::v1::Ingress>(&["ing"], &[], &[Status]),
            of::<networking::v1::IngressClass>(&[], &[], &[]),
            of::<networking::v1::NetworkPolicy>(&["netpol"], &[], &[]),
            of::<discovery::v1::EndpointSlice>(&[], &[], &[]),
            of::<coordination::v1::Lease>(&[], &[], &[]),
            of::<autoscaling::v2::HorizontalPodAutoscaler>(&["hpa"], ALL, &[Status]),
            of::<batch::v1::Job>(&[], ALL, &[Status]),
            of::<batch::v1::CronJob>(&["cj"], ALL, &[Status]),
            of::<events::v1::Event>(&["ev"], &[], &[]).stored_as(&EVENTS_AS_CORE),
            of::<policy::v1::PodDisruptionBudget>(&["pdb"], &[], &[Status]),
            of::<rbac::v1::Role>(&[], &[], &[]),
            of::<rbac::v1::RoleBinding>(&[], &[], &[]),
            of::<rbac::v1::ClusterRole>(&[], &[], &[]),
            of::<rbac::v1::ClusterRoleBinding>(&[], &[], &[]),
            of::<storage::v1::StorageClass>(&["sc"], &[], &[]),
        ];
        Registry { types }
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.plural == plural && t.group == group && t.version == version)
    }

    pub fn by_kind(&self, group: &str, kind: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.kind == kind)
    }

    pub fn all(&self) -> &[ResourceType] {
        &self.types
    }

    /// The served group-versions, core ("" / "v1") first, then groups in
    /// the order of first appearance.
    pub fn group_versions(&self) -> Vec<(&'static str, &'static str)> {
        let mut seen: Vec<(&'static str, &'static str)> = Vec::new();
        for t in &self.types {
            if !seen.contains(&(t.group, t.version)) {
                seen.push((t.group, t.version));
            }
        }
        seen
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl ResourceType {
    pub fn has(&self, sub: Subresource) -> bool {
        self.subresources.contains(&sub)
    }

    /// The store key prefix holding every object of this resource, or of
    /// one namespace: `/registry/<group>/<plural>/[<namespace>/]`.
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        let (group, plural) = match self.stored_as {
            Some(storage) => (storage.group, storage.plural),
            None => (self.group, self.plural),
        };
        let group = if group.is_empty() { "core" } else { group };
        match namespace {
            Some(ns) if self.namespaced => format!("/registry/{group}/{plural}/{ns}/"),
            _ => format!("/registry/{group}/{plural}/"),
        }
    }

    fn stored_as(mut self, storage: &'static StoredAs) -> Self {
        self.stored_as = Some(storage);
        self
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        let mut key = self.key_prefix(namespace);
        key.push_str(name);
        key
    }

    /// `group/resource` as upstream names it in messages (`deployments.apps`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

fn of<T>(
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
    subresources: &'static [Subresource],
) -> ResourceType
where
    T: Resource + ListableResource + DeserializeOwned + Serialize + schemars::JsonSchema + 'static,
{
    ResourceType {
        group: T::GROUP,
        version: T::VERSION,
        api_version: T::API_VERSION,
        kind: T::KIND,
        list_kind: T::LIST_KIND,
        plural: T::URL_PATH_SEGMENT,
        singular: T::KIND.to_ascii_lowercase(),
        namespaced: std::any::TypeId::of::<T::Scope>()
            == std::any::TypeId::of::<NamespaceResourceScope>(),
        short_names,
        categories,
        subresources,
        typed_round_trip: round_trip::<T>,
        typed_check: check::<T>,
        schema_name: T::schema_name().into_owned(),
        schema: |generator| generator.subschema_for::<T>(),
        stored_as: None,
    }
}

fn check<T: DeserializeOwned>(
    value: &Value,
    unknown: &mut OnUnknown<'_>,
) -> Result<(), serde_json::Error> {
    let _typed: T = serde_ignored::deserialize(value, unknown)?;
    Ok(())
}

fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, serde_json::Error> {
    // From the borrowed tree: no copy of the whole object first.
    let typed = T::deserialize(value)?;
    serde_json::to_value(typed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_knows_scope_and_names() {
        let registry = Registry::new();
        let pods = registry.get("", "v1", "pods").unwrap();
        assert!(pods.namespaced);
        assert_eq!(pods.kind, "Pod");
        assert_eq!(pods.list_kind, "PodList");
        assert_eq!(
            pods.key(Some("default"), "web"),
            "/registry/core/pods/default/web"
        );
        let nodes = registry.get("", "v1", "nodes").unwrap();
        assert!(!nodes.namespaced);
        assert_eq!(nodes.key(None, "n1"), "/registry/core/nodes/n1");
        let deploy = registry.by_kind("apps", "Deployment").unwrap();
        assert_eq!(deploy.qualified(), "deployments.apps");
        assert!(deploy.has(Subresource::Scale));
    }
}
