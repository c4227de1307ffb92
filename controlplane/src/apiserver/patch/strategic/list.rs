//! Lists: merging by key, set union, replacement, `$setElementOrder`,
//! `$deleteFromPrimitiveList`, and the order of the merged list.

use std::collections::HashSet;
use std::mem;

use serde_json::{Map, Value};

use super::super::PatchError;
use super::super::schema::{Field, List, Type};
use super::directive::{Directive, directive_of, has_directive};
use super::identity::{IdKey, Identity, Positions};
use super::location::Loc;
use super::{build, json_kind, merge_object};

/// Merges the patch list `patch` into the object's list `original`.
pub(super) fn merge(
    original: Vec<Value>,
    patch: &[Value],
    strategy: List,
    loc: &Loc,
) -> Result<Vec<Value>, PatchError> {
    match strategy {
        List::Atomic => replace(patch, loc),
        List::Set => merge_set(original, patch, loc),
        List::Merge { key, item } => merge_by_key(original, patch, key, item, loc),
    }
}

/// `$setElementOrder/<name>`: merges list `name` and then orders it as `order`
/// says. Items the order does not name (the object's own) keep their relative
/// order and are interleaved as [`enforce_order`] describes.
pub(super) fn set_element_order(
    original: &mut Map<String, Value>,
    name: &str,
    order: &Value,
    patch: Option<&Value>,
    field: Option<Field>,
    loc: &Loc,
) -> Result<(), PatchError> {
    let Value::Array(order) = order else {
        return Err(loc.bad_request(
            "invalid patch format of setElementOrder list: the order must be a list",
        ));
    };
    let patch = match patch {
        None => None,
        Some(Value::Array(items)) => Some(items.as_slice()),
        Some(other) => {
            return Err(loc.bad_request(format!(
                "expected a list next to $setElementOrder, but the patch has {}",
                json_kind(other)
            )));
        }
    };
    let strategy = Field::list_strategy(field);
    let identity = Identity::of_strategy(strategy);
    check_order(patch, order, identity, loc)?;

    let existing = match original.remove(name) {
        None => None,
        Some(Value::Array(items)) => Some(items),
        Some(other) => {
            return Err(loc.invalid(format!(
                "$setElementOrder names a list, but the object has {}",
                json_kind(&other)
            )));
        }
    };
    let (server, merged) = match (existing, patch) {
        (None, None) => return Ok(()),
        (Some(items), None) => (identity.positions(&items), items),
        (None, Some(patch)) => (Positions::new(), merge(Vec::new(), patch, strategy, loc)?),
        (Some(items), Some(patch)) => (
            identity.positions(&items),
            merge(items, patch, strategy, loc)?,
        ),
    };
    let ordered = enforce_order(merged, &identity.positions(order), &server, identity);
    original.insert(name.to_owned(), Value::Array(ordered));
    Ok(())
}

/// `$deleteFromPrimitiveList/<name>`: removes the listed scalars from list `name`.
/// Like upstream, it works on any list of scalars, and a `null` removes the list.
pub(super) fn delete_from_primitive_list(
    original: &mut Map<String, Value>,
    name: &str,
    patch: &Value,
    loc: &Loc,
) -> Result<(), PatchError> {
    let doomed: HashSet<IdKey> = match patch {
        Value::Null => {
            original.remove(name);
            return Ok(());
        }
        Value::Array(items) if items.iter().all(is_scalar) => items.iter().map(IdKey::of).collect(),
        _ => {
            return Err(loc.bad_request(
                "invalid patch format of primitive list: $deleteFromPrimitiveList must be a list of scalars",
            ));
        }
    };
    let Some(Value::Array(items)) = original.get_mut(name) else {
        // Nothing to delete from.
        return Ok(());
    };
    if !items.iter().all(is_scalar) {
        return Err(loc.invalid("$deleteFromPrimitiveList names a list that does not hold scalars"));
    }
    items.retain(|item| !doomed.contains(&IdKey::of(item)));
    Ok(())
}

/// A list without a strategy: the patch's items, with their directives applied.
fn replace(patch: &[Value], loc: &Loc) -> Result<Vec<Value>, PatchError> {
    let mut items = Vec::with_capacity(patch.len());
    for (index, item) in patch.iter().enumerate() {
        if item.is_null() {
            // A null item is data, not a deletion.
            items.push(Value::Null);
        } else if let Some(item) = build(item, None, &loc.index(index)?)? {
            items.push(item);
        }
    }
    Ok(items)
}

/// A list of scalars tagged `merge`: the union, without duplicates.
fn merge_set(original: Vec<Value>, patch: &[Value], loc: &Loc) -> Result<Vec<Value>, PatchError> {
    check_set_items(&original, patch, loc)?;
    let server = Identity::Value.positions(&original);
    let mut seen = HashSet::new();
    let mut merged: Vec<Value> = Vec::with_capacity(original.len() + patch.len());
    for item in original.into_iter().chain(patch.iter().cloned()) {
        if seen.insert(IdKey::of(&item)) {
            merged.push(item);
        }
    }
    Ok(enforce_order(
        merged,
        &Identity::Value.positions(patch),
        &server,
        Identity::Value,
    ))
}

/// A list of maps tagged `merge` with merge key `key`: patch items update the
/// object's item with the same key or are added; `$patch` items delete an item or
/// replace the whole list.
fn merge_by_key(
    mut original: Vec<Value>,
    patch: &[Value],
    key: &'static str,
    item_type: &'static Type,
    loc: &Loc,
) -> Result<Vec<Value>, PatchError> {
    let identity = Identity::Key(key);
    let mut updates = Vec::with_capacity(patch.len());
    let mut deleted = HashSet::new();
    let mut replace_all = false;
    for item in patch {
        let Value::Object(map) = item else {
            return Err(loc.bad_request(format!(
                "expected a map, but received {} (items are merged by key {key:?})",
                json_kind(item)
            )));
        };
        match directive_of(map, loc)? {
            Some(Directive::Delete) => {
                deleted.insert(IdKey::of(merge_key(map, key, loc)?));
            }
            Some(Directive::Replace) => replace_all = true,
            // A bare `{"$patch": "merge"}` says nothing more than the default.
            Some(Directive::Merge) if map.len() == 1 => {}
            Some(Directive::Merge) | None => updates.push(map),
        }
    }

    // Deletions apply before the updates, so a patch may delete and re-add.
    if !deleted.is_empty() {
        original.retain(|kept| {
            identity
                .key(kept)
                .is_none_or(|kept| !deleted.contains(&kept))
        });
    }

    if replace_all {
        // The list becomes the other items, as given: no merge-key checks, no
        // reordering.
        return updates
            .iter()
            .enumerate()
            .map(|(index, map)| {
                merge_object(Map::new(), map, item_type, &loc.index(index)?).map(Value::Object)
            })
            .collect();
    }

    let server = identity.positions(&original);
    // Where each key sits in `original`, including items appended below.
    let mut index = server.clone();
    let mut patch_order = Positions::new();
    for map in updates {
        let id = merge_key(map, key, loc)?;
        let item_loc = loc.item(key, id)?;
        let id = IdKey::of(id);
        match index.get(&id) {
            Some(&position) => {
                if let Some(slot) = original.get_mut(position) {
                    let existing = match mem::take(slot) {
                        Value::Object(existing) => existing,
                        _ => Map::new(),
                    };
                    *slot = Value::Object(merge_object(existing, map, item_type, &item_loc)?);
                }
            }
            None => {
                index.insert(id.clone(), original.len());
                original.push(Value::Object(merge_object(
                    Map::new(),
                    map,
                    item_type,
                    &item_loc,
                )?));
            }
        }
        let next = patch_order.len();
        patch_order.entry(id).or_insert(next);
    }
    Ok(enforce_order(original, &patch_order, &server, identity))
}

/// The merge key of a patch item, which it must have.
fn merge_key<'m>(
    map: &'m Map<String, Value>,
    key: &str,
    loc: &Loc,
) -> Result<&'m Value, PatchError> {
    map.get(key).ok_or_else(|| {
        loc.bad_request(format!(
            "map: {} does not contain declared merge key: {key}",
            Value::Object(map.clone())
        ))
    })
}

/// Checks that `order` and the patch list agree, as upstream does: for keyed
/// lists every order entry names its key, and the patch's ordinary items appear
/// in the order given.
fn check_order(
    patch: Option<&[Value]>,
    order: &[Value],
    identity: Identity,
    loc: &Loc,
) -> Result<(), PatchError> {
    if let Identity::Key(key) = identity {
        for entry in order {
            match entry {
                Value::Object(map) => {
                    merge_key(map, key, loc)?;
                }
                other => {
                    return Err(loc.bad_request(format!(
                        "invalid patch format of setElementOrder list: expected a map, but received {}",
                        json_kind(other)
                    )));
                }
            }
        }
    }
    let Some(patch) = patch else {
        return Ok(());
    };
    if order.is_empty() {
        return Ok(());
    }
    let mut remaining = order.iter();
    for item in patch.iter().filter(|item| !has_directive(item)) {
        let Some(id) = identity.id(item) else {
            return Err(loc.bad_request(format!(
                "expected a map with the merge key, but received {}",
                json_kind(item)
            )));
        };
        let key = IdKey::of(id);
        if !remaining.any(|entry| identity.key(entry).as_ref() == Some(&key)) {
            // Name the item, not the lists: they can be long.
            return Err(loc.bad_request(format!(
                "the order in the patch list doesn't match the $setElementOrder list: \
                 {id} is missing from it or out of its order"
            )));
        }
    }
    Ok(())
}

/// Lists of scalars merge as sets only when all items are scalars of one JSON
/// type; upstream rejects anything else.
fn check_set_items(original: &[Value], patch: &[Value], loc: &Loc) -> Result<(), PatchError> {
    let all = || original.iter().chain(patch);
    if all().any(Value::is_array) {
        return Err(loc.invalid("lists of lists are not supported"));
    }
    if patch.iter().any(Value::is_object) {
        return Err(loc.bad_request("cannot merge lists of maps without a merge key"));
    }
    let mut kinds = all().map(json_kind);
    if let Some(first) = kinds.next()
        && kinds.any(|kind| kind != first)
    {
        return Err(loc.invalid("list element types are not identical"));
    }
    Ok(())
}

/// Orders a merged list the way upstream does.
///
/// The items named in `patch_order` come in that order; the others
/// ("server-only") keep the order they had in the object (`server`). The two
/// runs are then interleaved: a server-only item goes before the next patch item
/// only if both were in the object and it came first there. So new items come
/// before the server-only items that follow them, and items present on both
/// sides keep the object's relative order.
fn enforce_order(
    merged: Vec<Value>,
    patch_order: &Positions,
    server: &Positions,
    identity: Identity,
) -> Vec<Value> {
    struct Placed {
        item: Value,
        in_patch: Option<usize>,
        in_server: Option<usize>,
    }
    let (mut from_patch, mut server_only): (Vec<Placed>, Vec<Placed>) = merged
        .into_iter()
        .map(|item| {
            let key = identity.key(&item);
            let position =
                |positions: &Positions| key.as_ref().and_then(|key| positions.get(key).copied());
            Placed {
                in_patch: position(patch_order),
                in_server: position(server),
                item,
            }
        })
        .partition(|placed| placed.in_patch.is_some());
    // Stable sorts: ties (unknown positions) keep their current order.
    from_patch.sort_by_key(|placed| placed.in_patch);
    server_only.sort_by_key(|placed| placed.in_server.unwrap_or(usize::MAX));

    let mut ordered = Vec::with_capacity(from_patch.len() + server_only.len());
    let mut from_patch = from_patch.into_iter().peekable();
    let mut server_only = server_only.into_iter().peekable();
    loop {
        let server_first = match (server_only.peek(), from_patch.peek()) {
            (Some(server), Some(patched)) => {
                matches!((server.in_server, patched.in_server), (Some(s), Some(p)) if s < p)
            }
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let next = if server_first {
            server_only.next()
        } else {
            from_patch.next()
        };
        ordered.extend(next.map(|placed| placed.item));
    }
    ordered
}

fn is_scalar(value: &Value) -> bool {
    !(value.is_array() || value.is_object())
}
