//! OpenAPI v3: one document per group-version, generated from the
//! `k8s-openapi` types' schemas, with the paths and operations clients look
//! for — kubectl checks a PATCH operation's `fieldValidation` parameter to
//! decide that the server validates fields, `kubectl explain` finds schemas
//! by their `x-kubernetes-group-version-kind`, and `kubectl apply` reads
//! the patch strategies of lists from them.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::LazyLock;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, Patch, Status};
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use super::discovery::{MAJOR, MINOR};
use super::resources::{Registry, ResourceType, Subresource};

/// Generated documents, keyed by their path (`api/v1`, `apis/apps/v1`),
/// each with the hash clients use to cache it.
pub struct Documents {
    docs: BTreeMap<String, (String, String)>,
}

static DOCUMENTS: LazyLock<Documents> = LazyLock::new(|| Documents::build(super::registry()));

pub fn documents() -> &'static Documents {
    &DOCUMENTS
}

impl Documents {
    fn build(registry: &Registry) -> Self {
        let mut docs = BTreeMap::new();
        for (group, version) in registry.group_versions() {
            let path = if group.is_empty() {
                format!("api/{version}")
            } else {
                format!("apis/{group}/{version}")
            };
            let types: Vec<&ResourceType> = registry
                .all()
                .iter()
                .filter(|t| t.group == group && t.version == version)
                .collect();
            let body = group_version_document(&types).to_string();
            let mut hasher = DefaultHasher::new();
            body.hash(&mut hasher);
            let hash = format!("{:016X}", hasher.finish());
            docs.insert(path, (hash, body));
        }
        Documents { docs }
    }

    /// `/openapi/v3`: where each group-version's document is.
    pub fn index(&self) -> Value {
        let paths: Map<String, Value> = self
            .docs
            .iter()
            .map(|(path, (hash, _))| {
                (
                    path.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
                )
            })
            .collect();
        json!({"paths": paths})
    }

    /// The document at `path` (`apis/apps/v1`).
    pub fn get(&self, path: &str) -> Option<&str> {
        self.docs.get(path).map(|(_, body)| body.as_str())
    }
}

fn group_version_document(types: &[&ResourceType]) -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    for rt in types {
        (rt.schema)(&mut generator);
    }
    generator.subschema_for::<DeleteOptions>();
    generator.subschema_for::<Patch>();
    generator.subschema_for::<Status>();
    let mut schemas = generator.take_definitions(true);
    for schema in schemas.values_mut() {
        tidy(schema);
    }
    for rt in types {
        if let Some(Value::Object(schema)) = schemas.get_mut(&rt.schema_name) {
            schema.insert("x-kubernetes-group-version-kind".into(), gvk(rt));
        }
    }
    super::patch::annotate_openapi(
        &mut schemas,
        types
            .iter()
            .map(|t| (t.group, t.kind, t.schema_name.as_str())),
    );
    let mut paths = Map::new();
    for rt in types {
        add_paths(rt, &mut paths);
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{MAJOR}.{MINOR}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// k8s-openapi marks `metadata` required on every kind (its structs hold
/// it by value); upstream's schemas do not.
fn tidy(schema: &mut Value) {
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        required.retain(|r| r != "metadata");
        if required.is_empty()
            && let Some(map) = schema.as_object_mut()
        {
            map.remove("required");
        }
    }
}

fn gvk(rt: &ResourceType) -> Value {
    json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}])
}

fn add_paths(rt: &ResourceType, paths: &mut Map<String, Value>) {
    let root = if rt.group.is_empty() {
        format!("/api/{}", rt.version)
    } else {
        format!("/apis/{}/{}", rt.group, rt.version)
    };
    let scope = if rt.namespaced {
        "/namespaces/{namespace}"
    } else {
        ""
    };
    let kind_ref = json!({"$ref": format!("#/components/schemas/{}", rt.schema_name)});
    let collection = format!("{root}{scope}/{}", rt.plural);
    let item = format!("{collection}/{{name}}");
    let mut path_params = vec![];
    if rt.namespaced {
        path_params.push(path_param("namespace"));
    }
    paths.insert(
        collection,
        json!({
            "get": operation(rt, "list", &kind_ref, &["labelSelector", "fieldSelector", "limit", "continue", "resourceVersion", "resourceVersionMatch", "watch", "allowWatchBookmarks", "sendInitialEvents", "timeoutSeconds"]),
            "post": with_body(operation(rt, "post", &kind_ref, &["dryRun", "fieldManager", "fieldValidation"]), &kind_ref),
            "delete": operation(rt, "deletecollection", &kind_ref, &["labelSelector", "fieldSelector", "dryRun", "gracePeriodSeconds", "propagationPolicy"]),
            "parameters": path_params.clone(),
        }),
    );
    let mut item_params = path_params.clone();
    item_params.push(path_param("name"));
    paths.insert(
        item.clone(),
        item_operations(rt, &kind_ref, &item_params, true),
    );
    if rt.has(Subresource::Status) {
        paths.insert(
            format!("{item}/status"),
            item_operations(rt, &kind_ref, &item_params, false),
        );
    }
    if rt.has(Subresource::Scale) {
        let scale_ref = json!({"$ref": "#/components/schemas/io.k8s.api.autoscaling.v1.Scale"});
        paths.insert(
            format!("{item}/scale"),
            item_operations(rt, &scale_ref, &item_params, false),
        );
    }
}

fn item_operations(rt: &ResourceType, schema: &Value, params: &[Value], delete: bool) -> Value {
    let mut ops = json!({
        "get": operation(rt, "get", schema, &[]),
        "put": with_body(operation(rt, "put", schema, &["dryRun", "fieldManager", "fieldValidation"]), schema),
        "patch": patch_operation(rt, schema),
        "parameters": params,
    });
    if delete {
        ops["delete"] = operation(
            rt,
            "delete",
            schema,
            &["dryRun", "gracePeriodSeconds", "propagationPolicy"],
        );
    }
    ops
}

fn operation(rt: &ResourceType, action: &str, schema: &Value, query: &[&str]) -> Value {
    let parameters: Vec<Value> = query
        .iter()
        .map(|name| {
            json!({"name": name, "in": "query", "schema": {"type": query_type(name)}, "uniqueItems": true})
        })
        .collect();
    json!({
        "operationId": format!("{action}{}", rt.kind),
        "parameters": parameters,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
            "401": {"description": "Unauthorized"},
        },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
    })
}

fn patch_operation(rt: &ResourceType, schema: &Value) -> Value {
    let mut op = operation(
        rt,
        "patch",
        schema,
        &["dryRun", "fieldManager", "fieldValidation", "force"],
    );
    let patch_ref =
        json!({"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Patch"});
    op["requestBody"] = json!({
        "content": {
            "application/json-patch+json": {"schema": patch_ref},
            "application/merge-patch+json": {"schema": patch_ref},
            "application/strategic-merge-patch+json": {"schema": patch_ref},
            "application/apply-patch+yaml": {"schema": patch_ref},
        },
        "required": true,
    });
    op
}

fn with_body(mut op: Value, schema: &Value) -> Value {
    op["requestBody"] = json!({"content": {"*/*": {"schema": schema}}, "required": true});
    op
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}})
}

fn query_type(name: &str) -> &'static str {
    match name {
        "limit" | "timeoutSeconds" | "gracePeriodSeconds" => "integer",
        "watch" | "allowWatchBookmarks" | "sendInitialEvents" | "force" => "boolean",
        _ => "string",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_carry_kinds_and_field_validation() {
        let docs = documents();
        let index = docs.index();
        let url = index["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("/openapi/v3/apis/apps/v1?hash="));
        let doc: Value = serde_json::from_str(docs.get("apis/apps/v1").unwrap()).unwrap();
        let deployment = &doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            deployment["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        let params = patch["parameters"].as_array().unwrap();
        assert!(params.iter().any(|p| p["name"] == "fieldValidation"));
        assert!(
            doc["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"]
                .is_object()
        );
    }
}
