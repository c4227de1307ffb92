//! The fields an applied configuration sets: exactly the set its manager owns
//! after the apply.
//!
//! Leaves are scalars and atomic values; an item of an associative list or a set
//! is owned itself (so that dropping it from the configuration deletes it) and,
//! for list maps, field by field. A struct or granular map is not owned for
//! merely containing something, so `resources: {}` owns nothing.
//!
//! The configuration comes from the client, so malformed lists are errors here
//! (upstream refuses them the same way) rather than being treated as atomic.

use std::collections::HashSet;

use serde_json::Value;

use super::MAX_DEPTH;
use super::fieldset::{FieldSet, Path, PathElement, element_string, path_string};
use super::items;
use super::schema::Shape;

/// The set of fields `config` (a whole object of shape `shape`) sets.
pub(super) fn applied_fields(config: &Value, shape: Shape) -> Result<FieldSet, String> {
    let mut set = FieldSet::default();
    collect(config, shape, &mut Vec::new(), &mut set, 0)?;
    Ok(set)
}

fn collect(
    value: &Value,
    shape: Shape,
    path: &mut Path,
    set: &mut FieldSet,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "{}: nested more than {MAX_DEPTH} levels deep",
            path_string(path)
        ));
    }
    match (shape, value) {
        (Shape::Struct(_), Value::Object(fields)) => {
            for (name, field) in fields {
                path.push(PathElement::Field(name.clone()));
                collect(field, shape.child(name), path, set, depth + 1)?;
                path.pop();
            }
        }
        (Shape::Map, Value::Object(entries)) => {
            for name in entries.keys() {
                path.push(PathElement::Field(name.clone()));
                set.insert(path);
                path.pop();
            }
        }
        (Shape::ListMap(list), Value::Array(entries)) => {
            let name = |item: &Value| items::key_element(list.keys(), item);
            collect_items(entries, name, list.item(), path, set, depth)?;
        }
        (Shape::Set, Value::Array(entries)) => {
            collect_items(
                entries,
                items::value_element,
                Shape::Atomic,
                path,
                set,
                depth,
            )?;
        }
        _ => set.insert(path),
    }
    Ok(())
}

/// Owns each item of a list and, for structs, its fields.
fn collect_items(
    entries: &[Value],
    name: impl Fn(&Value) -> Result<PathElement, String>,
    item_shape: Shape,
    path: &mut Path,
    set: &mut FieldSet,
    depth: usize,
) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (index, item) in entries.iter().enumerate() {
        let element =
            name(item).map_err(|e| format!("{}: element {index}: {e}", path_string(path)))?;
        if !seen.insert(element.clone()) {
            return Err(format!(
                "{}: duplicate entries for key {}",
                path_string(path),
                element_string(&element)
            ));
        }
        path.push(element);
        set.insert(path);
        if let Shape::Struct(_) = item_shape {
            collect(item, item_shape, path, set, depth + 1)?;
        }
        path.pop();
    }
    Ok(())
}
