//! The directives a strategic merge patch embeds in its maps, and how a key of a
//! patch map is read.

use serde_json::{Map, Value};

use super::super::PatchError;
use super::location::Loc;

const PATCH: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ELEMENT_ORDER: &str = "$setElementOrder";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList";

/// The value of a `$patch` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Directive {
    /// In a map: the map becomes the patch's content. As a list item: the list
    /// becomes the patch's other items.
    Replace,
    /// In a map: the map is emptied. As a list item: the item with this merge key
    /// is removed.
    Delete,
    /// The default, spelled out. Upstream rejects it; accepting it is harmless.
    Merge,
}

/// What one key of a patch map asks for.
pub(super) enum Key<'a> {
    /// `$patch`: handled before the other keys.
    Patch,
    /// `$retainKeys`: drop the object's keys not listed.
    RetainKeys,
    /// `$setElementOrder/<field>`: the order of list `<field>` after the merge.
    SetElementOrder(&'a str),
    /// `$deleteFromPrimitiveList/<field>`: scalars to remove from list `<field>`.
    DeleteFromPrimitiveList(&'a str),
    /// An ordinary field.
    Field(&'a str),
}

/// The `$patch` directive of `map`, if it has one.
pub(super) fn directive_of(
    map: &Map<String, Value>,
    loc: &Loc,
) -> Result<Option<Directive>, PatchError> {
    let Some(value) = map.get(PATCH) else {
        return Ok(None);
    };
    match value.as_str() {
        Some("replace") => Ok(Some(Directive::Replace)),
        Some("delete") => Ok(Some(Directive::Delete)),
        Some("merge") => Ok(Some(Directive::Merge)),
        _ => Err(loc.bad_request(format!(
            "unknown patch type: {value} in map: {}",
            Value::Object(map.clone())
        ))),
    }
}

/// Whether `item` is a map carrying a `$patch` directive.
pub(super) fn has_directive(item: &Value) -> bool {
    item.as_object().is_some_and(|map| map.contains_key(PATCH))
}

/// Reads a key of a patch map. Keys that start like a parallel-list directive
/// but do not name a field are malformed, as upstream rules.
pub(super) fn classify<'k>(key: &'k str, loc: &Loc) -> Result<Key<'k>, PatchError> {
    if key == PATCH {
        return Ok(Key::Patch);
    }
    if key == RETAIN_KEYS {
        return Ok(Key::RetainKeys);
    }
    if key.starts_with(SET_ELEMENT_ORDER) {
        return field_after(key, SET_ELEMENT_ORDER)
            .map(Key::SetElementOrder)
            .ok_or_else(|| {
                loc.bad_request(format!(
                    "invalid patch format of setElementOrder list: key {key:?}"
                ))
            });
    }
    if key.starts_with(DELETE_FROM_PRIMITIVE_LIST) {
        return field_after(key, DELETE_FROM_PRIMITIVE_LIST)
            .map(Key::DeleteFromPrimitiveList)
            .ok_or_else(|| {
                loc.bad_request(format!(
                    "invalid patch format of primitive list: key {key:?}"
                ))
            });
    }
    Ok(Key::Field(key))
}

/// `<prefix>/<field>` → `<field>`, if `<field>` is not empty.
fn field_after<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    key.strip_prefix(prefix)?
        .strip_prefix('/')
        .filter(|field| !field.is_empty())
}
