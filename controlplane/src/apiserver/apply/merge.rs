//! Merging an applied configuration into the live object, and removing what
//! its manager stopped applying.
//!
//! Merge: the configuration's values win; structs and granular maps merge field
//! by field; associative lists and sets merge item by item; everything else is
//! replaced. Items of a merged list keep upstream's order: items the
//! configuration names come in its order, and live items it does not name stay
//! where they were relative to them.
//!
//! Prune: a field the manager applied last time and no longer applies is
//! removed, unless some manager (including this apply) still owns it. A struct
//! the manager used to set fields in, and in which nobody owns anything any
//! more, goes as a whole, as upstream removes it; a map or list left empty by
//! the removal goes too. Top-level fields are never removed whole: `metadata`
//! and `spec` always stay.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::MAX_DEPTH;
use super::fieldset::{FieldSet, PathElement};
use super::items;
use super::schema::Shape;

/// `live` with `config` merged in; both are whole objects of shape `shape`.
pub(super) fn merge(live: &Value, config: &Value, shape: Shape) -> Value {
    merged(live, config, shape, 0)
}

fn merged(live: &Value, config: &Value, shape: Shape, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return config.clone();
    }
    match (shape, live, config) {
        (Shape::Struct(_) | Shape::Map, Value::Object(ours), Value::Object(theirs))
            if !(ours.is_empty() && theirs.is_empty()) =>
        {
            let mut out = ours.clone();
            for (name, value) in theirs {
                let field = match ours.get(name) {
                    Some(existing) => merged(existing, value, shape.child(name), depth + 1),
                    None => value.clone(),
                };
                out.insert(name.clone(), field);
            }
            Value::Object(out)
        }
        (Shape::ListMap(list), Value::Array(ours), Value::Array(theirs)) => {
            let name = |item: &Value| items::key_element(list.keys(), item).ok();
            merge_items(ours, theirs, name, list.item(), depth).unwrap_or_else(|| config.clone())
        }
        (Shape::Set, Value::Array(ours), Value::Array(theirs)) => {
            let name = |item: &Value| items::value_element(item).ok();
            merge_items(ours, theirs, name, Shape::Atomic, depth).unwrap_or_else(|| config.clone())
        }
        _ => config.clone(),
    }
}

/// Merges two lists item by item; `None` when the live list cannot be keyed
/// (an item without its key, or a key twice), in which case the configuration
/// replaces it whole.
fn merge_items(
    ours: &[Value],
    theirs: &[Value],
    name: impl Fn(&Value) -> Option<PathElement>,
    item_shape: Shape,
    depth: usize,
) -> Option<Value> {
    if ours.is_empty() && theirs.is_empty() {
        return Some(Value::Array(theirs.to_vec()));
    }
    let ours_named = named(ours, &name)?;
    let theirs_named = named(theirs, &name)?;
    let ours_at: HashMap<&PathElement, usize> =
        ours_named.iter().enumerate().map(|(i, n)| (n, i)).collect();
    let theirs_at: HashMap<&PathElement, usize> = theirs_named
        .iter()
        .enumerate()
        .map(|(i, n)| (n, i))
        .collect();

    // Items in both lists, in the configuration's order: each is placed when
    // its turn comes, so live items before it keep their place.
    let mut shared = theirs_named.iter().filter(|n| ours_at.contains_key(n));
    let mut next_shared = shared.next();
    let mut placed = vec![false; theirs.len()];
    let mut out = Vec::with_capacity(ours.len().max(theirs.len()));
    let (mut i, mut j) = (0, 0);
    while i < ours.len() || j < theirs.len() {
        if i < ours.len() && j < theirs.len() {
            if ours_named[i] == theirs_named[j] {
                out.push(merged(&ours[i], &theirs[j], item_shape, depth + 1));
                placed[j] = true;
                i += 1;
                j += 1;
                next_shared = shared.next();
                continue;
            }
            let waiting = next_shared.is_some_and(|n| *n != ours_named[i]);
            if theirs_at.contains_key(&ours_named[i]) && waiting {
                // Shared, but another shared item comes first in the configuration.
                i += 1;
                continue;
            }
        }
        if i < ours.len() {
            match theirs_at.get(&ours_named[i]) {
                None => {
                    out.push(ours[i].clone());
                    i += 1;
                    continue;
                }
                Some(&at) if placed[at] => {
                    i += 1;
                    continue;
                }
                Some(_) if j >= theirs.len() => {
                    // Unreachable in practice (every shared item is placed by
                    // then); stepping on keeps the loop finite regardless.
                    i += 1;
                    continue;
                }
                Some(_) => {}
            }
        }
        if j < theirs.len() {
            let item = match ours_at.get(&theirs_named[j]) {
                Some(&at) => merged(&ours[at], &theirs[j], item_shape, depth + 1),
                None => theirs[j].clone(),
            };
            out.push(item);
            placed[j] = true;
            if next_shared.is_some_and(|n| *n == theirs_named[j]) {
                next_shared = shared.next();
            }
            j += 1;
        }
    }
    Some(Value::Array(out))
}

/// The name of every item, or `None` if one has no name or two share one.
fn named(
    entries: &[Value],
    name: &impl Fn(&Value) -> Option<PathElement>,
) -> Option<Vec<PathElement>> {
    let names: Vec<PathElement> = entries.iter().map(name).collect::<Option<_>>()?;
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    names.iter().all(|n| seen.insert(n)).then_some(names)
}

/// Removes from `object` what `last` (the manager's previous applied set) has
/// and `owned` (every manager's set after this apply) does not.
pub(super) fn prune(object: &mut Value, shape: Shape, last: &FieldSet, owned: &FieldSet) {
    prune_value(object, shape, last, Some(owned), &[], 0, true);
}

fn prune_value(
    value: &mut Value,
    shape: Shape,
    last: &FieldSet,
    owned: Option<&FieldSet>,
    keys: &[&str],
    depth: usize,
    top: bool,
) {
    if depth > MAX_DEPTH {
        return;
    }
    match (shape, value) {
        (Shape::Struct(_) | Shape::Map, Value::Object(fields)) => {
            prune_fields(fields, shape, last, owned, keys, depth, top);
        }
        (Shape::ListMap(list), Value::Array(entries)) => {
            let name = |item: &Value| items::key_element(list.keys(), item).ok();
            prune_items(entries, name, list.item(), list.keys(), last, owned, depth);
        }
        (Shape::Set, Value::Array(entries)) => {
            let name = |item: &Value| items::value_element(item).ok();
            prune_items(entries, name, Shape::Atomic, &[], last, owned, depth);
        }
        _ => {}
    }
}

#[allow(clippy::too_many_arguments)]
fn prune_fields(
    fields: &mut Map<String, Value>,
    shape: Shape,
    last: &FieldSet,
    owned: Option<&FieldSet>,
    keys: &[&str],
    depth: usize,
    top: bool,
) {
    for (element, lost) in last.children() {
        let PathElement::Field(name) = element else {
            continue;
        };
        // An item's key fields name it; they go only with the item.
        if keys.contains(&name.as_str()) {
            continue;
        }
        let Some(value) = fields.get_mut(name) else {
            continue;
        };
        let kept = owned.and_then(|o| o.child(element));
        let field_shape = shape.child(name);
        let remove = if lost.is_member() && !kept.is_some_and(FieldSet::is_member) {
            true
        } else if !lost.has_children() {
            false
        } else if !top
            && matches!(field_shape, Shape::Struct(_))
            && value.is_object()
            && kept.is_none_or(FieldSet::is_empty)
        {
            true
        } else {
            let was_empty = is_empty_container(value);
            prune_value(value, field_shape, lost, kept, &[], depth + 1, false);
            !was_empty && is_empty_container(value)
        };
        if remove {
            fields.remove(name);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn prune_items(
    entries: &mut Vec<Value>,
    name: impl Fn(&Value) -> Option<PathElement>,
    item_shape: Shape,
    keys: &[&str],
    last: &FieldSet,
    owned: Option<&FieldSet>,
    depth: usize,
) {
    entries.retain_mut(|item| {
        let Some(element) = name(item) else {
            return true;
        };
        let Some(lost) = last.child(&element) else {
            return true;
        };
        let kept = owned.and_then(|o| o.child(&element));
        if lost.is_member() && !kept.is_some_and(FieldSet::is_member) {
            return false;
        }
        if lost.has_children() {
            prune_value(item, item_shape, lost, kept, keys, depth + 1, false);
        }
        true
    });
}

fn is_empty_container(value: &Value) -> bool {
    match value {
        Value::Object(fields) => fields.is_empty(),
        Value::Array(entries) => entries.is_empty(),
        _ => false,
    }
}
