//! The strategy tables, published in OpenAPI v3 as upstream's
//! `x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key`
//! extensions. `kubectl apply` computes its three-way strategic patch from
//! them: without them it would send whole lists that this server then
//! merges by key, and a removed list item would never go away.

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use super::TypeRef;
use super::schema::{self, Field, List, Type};

const REF_PREFIX: &str = "#/components/schemas/";

/// Annotates the component schemas reachable from each kind
/// `(group, kind, schema name)`.
pub fn annotate_openapi<'a>(
    schemas: &mut Map<String, Value>,
    kinds: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
) {
    let mut visited = HashSet::new();
    for (group, kind, schema_name) in kinds {
        let root = schema::root(TypeRef::new(group, kind));
        walk(schemas, schema_name, root, &mut visited);
    }
}

fn walk(
    schemas: &mut Map<String, Value>,
    schema_name: &str,
    ty: &'static Type,
    visited: &mut HashSet<(String, usize)>,
) {
    if !visited.insert((schema_name.to_owned(), ty as *const Type as usize)) {
        return;
    }
    for (field, strategy) in ty.fields {
        let Some(property) = schemas
            .get_mut(schema_name)
            .and_then(|s| s.get_mut("properties"))
            .and_then(|p| p.get_mut(*field))
        else {
            continue;
        };
        match strategy {
            Field::Struct(child) => {
                if child.retain_keys {
                    property["x-kubernetes-patch-strategy"] = json!("retainKeys");
                }
                if let Some(target) = referenced(property) {
                    walk(schemas, &target, child, visited);
                }
            }
            Field::List(List::Merge { key, item }) => {
                let strategy = if item.retain_keys {
                    "merge,retainKeys"
                } else {
                    "merge"
                };
                property["x-kubernetes-patch-strategy"] = json!(strategy);
                property["x-kubernetes-patch-merge-key"] = json!(key);
                if let Some(target) = property.get("items").and_then(referenced) {
                    walk(schemas, &target, item, visited);
                }
            }
            Field::List(List::Set) => {
                property["x-kubernetes-patch-strategy"] = json!("merge");
            }
            Field::List(List::Atomic) | Field::Map => {}
        }
    }
}

/// The component a property refers to, directly or through `allOf`.
fn referenced(property: &Value) -> Option<String> {
    let reference = property.get("$ref").or_else(|| {
        property
            .get("allOf")?
            .as_array()?
            .iter()
            .find_map(|s| s.get("$ref"))
    })?;
    reference
        .as_str()?
        .strip_prefix(REF_PREFIX)
        .map(str::to_owned)
}
