//! Discovery: what groups, versions and resources the server has, in the
//! legacy form (`/api`, `/apis`, `/api/v1`, `/apis/<g>/<v>`) and the
//! aggregated v2 form (one document for all, asked for by `Accept`), plus
//! `/version`.

use http::HeaderMap;
use serde_json::{Value, json};

use super::resource_metrics;
use super::resources::{Registry, ResourceType, VERBS};

/// Media type of aggregated discovery documents; clients check the
/// response's Content-Type against it exactly.
pub const AGGREGATED_V2: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
pub const AGGREGATED_V2BETA1: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList";

/// The Kubernetes minor this server speaks (k8s-openapi's `v1_33`).
pub const MAJOR: &str = "1";
pub const MINOR: &str = "33";

/// Which aggregated form the client accepts, if any.
pub fn aggregated_wanted(headers: &HeaderMap) -> Option<&'static str> {
    let accept = headers.get(http::header::ACCEPT)?.to_str().ok()?;
    for option in accept.split(',') {
        let compact: String = option.chars().filter(|c| !c.is_whitespace()).collect();
        if !compact.contains("as=APIGroupDiscoveryList") {
            continue;
        }
        if compact.contains("v=v2beta1") {
            return Some(AGGREGATED_V2BETA1);
        }
        if compact.contains("v=v2") {
            return Some(AGGREGATED_V2);
        }
    }
    None
}

pub fn version() -> Value {
    json!({
        "major": MAJOR,
        "minor": MINOR,
        "emulationMajor": MAJOR,
        "emulationMinor": MINOR,
        "minCompatibilityMajor": MAJOR,
        "minCompatibilityMinor": "32",
        "gitVersion": format!("v{MAJOR}.{MINOR}.0-skiff.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "rustc",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, goarch()),
    })
}

/// `/api`: the legacy core group's versions.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `/apis`: every named group with its one served version.
pub fn api_group_list(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .group_versions()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(group, version)| api_group(group, version))
        .chain([api_group(
            resource_metrics::GROUP,
            resource_metrics::VERSION,
        )])
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [gv.clone()],
        "preferredVersion": gv,
    })
}

/// `/api/v1` or `/apis/<g>/<v>`: the resources of one group-version.
pub fn api_resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = registry
        .all()
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in types {
        let mut entry = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": VERBS,
        });
        if !t.short_names.is_empty() {
            entry["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            entry["categories"] = json!(t.categories);
        }
        resources.push(entry);
        for sub in t.subresources {
            let (sub_group, sub_kind, verbs) = sub.kind_and_verbs();
            let mut entry = json!({
                "name": format!("{}/{}", t.plural, sub.name()),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": if sub_kind.is_empty() { t.kind } else { sub_kind },
                "verbs": verbs,
            });
            if !sub_group.is_empty() {
                entry["group"] = json!(sub_group);
                entry["version"] = json!("v1");
            }
            resources.push(entry);
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// The aggregated document for `/api` (`legacy == true`) or `/apis`.
pub fn aggregated(registry: &Registry, legacy: bool, media: &str) -> Value {
    let api_version = if media == AGGREGATED_V2BETA1 {
        "apidiscovery.k8s.io/v2beta1"
    } else {
        "apidiscovery.k8s.io/v2"
    };
    let mut items: Vec<Value> = registry
        .group_versions()
        .into_iter()
        .filter(|(g, _)| g.is_empty() == legacy)
        .map(|(group, version)| {
            let resources: Vec<Value> = registry
                .all()
                .iter()
                .filter(|t| t.group == group && t.version == version)
                .map(aggregated_resource)
                .collect();
            json!({
                "metadata": {"name": group, "creationTimestamp": null},
                "versions": [{"version": version, "resources": resources, "freshness": "Current"}],
            })
        })
        .collect();
    if !legacy {
        items.push(resource_metrics::aggregated_group());
    }
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": api_version,
        "metadata": {},
        "items": items,
    })
}

fn aggregated_resource(t: &ResourceType) -> Value {
    let mut entry = json!({
        "resource": t.plural,
        "responseKind": {"group": t.group, "version": t.version, "kind": t.kind},
        "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": t.singular,
        "verbs": VERBS,
    });
    if !t.short_names.is_empty() {
        entry["shortNames"] = json!(t.short_names);
    }
    if !t.categories.is_empty() {
        entry["categories"] = json!(t.categories);
    }
    if !t.subresources.is_empty() {
        let subs: Vec<Value> = t
            .subresources
            .iter()
            .map(|sub| {
                let (group, kind, verbs) = sub.kind_and_verbs();
                let (group, version, kind) = if kind.is_empty() {
                    (t.group, t.version, t.kind)
                } else {
                    (group, "v1", kind)
                };
                json!({
                    "subresource": sub.name(),
                    "responseKind": {"group": group, "version": version, "kind": kind},
                    "verbs": verbs,
                })
            })
            .collect();
        entry["subresources"] = json!(subs);
    }
    entry
}

fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
