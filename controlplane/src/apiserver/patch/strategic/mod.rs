//! Strategic merge patch, applied the way upstream's API server applies it
//! (`k8s.io/apimachinery/pkg/util/strategicpatch` with parallel lists merged and
//! unmatched nulls ignored).
//!
//! It is JSON merge patch with three additions:
//!
//! - Field strategies from the schema: lists of maps merge item by item on a
//!   merge key, lists of scalars tagged `merge` are sets, other lists are
//!   replaced whole.
//! - Directives inside the patch: `$patch: replace | delete | merge` in a map or
//!   as a list item, `$retainKeys`, `$setElementOrder/<list>` and
//!   `$deleteFromPrimitiveList/<list>`. None of them survives into the result.
//! - List order: items named by the patch come in the patch's order (or the
//!   `$setElementOrder` order), interleaved with the object's other items so
//!   that items present in both keep the object's relative order.
//!
//! A value the object does not have yet is merged into nothing, so directives
//! inside it are applied rather than stored. Upstream instead drops every map
//! carrying `$patch` from new values; the results agree except that a new map
//! with `$patch: replace` keeps its content here.

mod directive;
mod identity;
mod list;
mod location;

use std::mem;

use serde_json::{Map, Value};

use super::PatchError;
use super::schema::{Field, PLAIN, Type};
use directive::{Directive, Key, classify, directive_of};
use location::Loc;

/// Applies the strategic merge patch `patch` to `current` (the stored object),
/// whose top level is described by `ty`.
pub(super) fn apply(
    ty: &'static Type,
    current: &Value,
    patch: &Map<String, Value>,
) -> Result<Value, PatchError> {
    let Value::Object(original) = current else {
        return Err(PatchError::Invalid(
            "the stored object is not a JSON object".to_owned(),
        ));
    };
    let root = Loc::root();
    if directive_of(patch, &root)? == Some(Directive::Delete) {
        return Err(PatchError::Invalid(
            "a strategic merge patch cannot delete the whole object".to_owned(),
        ));
    }
    merge_object(original.clone(), patch, ty, &root).map(Value::Object)
}

/// Merges the patch map `patch` into the object map `original`, field by field as
/// the table `ty` says.
fn merge_object(
    mut original: Map<String, Value>,
    patch: &Map<String, Value>,
    ty: &'static Type,
    loc: &Loc,
) -> Result<Map<String, Value>, PatchError> {
    match directive_of(patch, loc)? {
        Some(Directive::Delete) => return Ok(Map::new()),
        // Replacing is merging into nothing: the result is the patch's content,
        // with its own directives applied.
        Some(Directive::Replace) => original = Map::new(),
        Some(Directive::Merge) | None => {}
    }

    let mut retain_keys = None;
    let mut orders = Vec::new();
    let mut deletions = Vec::new();
    let mut fields = Vec::new();
    for (key, value) in patch {
        match classify(key, loc)? {
            Key::Patch => {}
            Key::RetainKeys => retain_keys = Some(value),
            Key::SetElementOrder(name) => orders.push((name, value)),
            Key::DeleteFromPrimitiveList(name) => deletions.push((name, value)),
            Key::Field(name) => fields.push((name, value)),
        }
    }

    // Upstream's order: retainKeys prunes first, then each ordered list is merged
    // together with its order, then the remaining fields, then the deletions.
    if let Some(keys) = retain_keys {
        if !ty.retain_keys && !std::ptr::eq(ty, &PLAIN) {
            // Not an error (upstream applies it anywhere), but a sign of a client
            // built against other types than ours.
            tracing::debug!(at = %loc, r#type = ty.name, "$retainKeys on a field not tagged retainKeys");
        }
        apply_retain_keys(&mut original, keys, &fields, loc)?;
    }
    for &(name, order) in &orders {
        let field_loc = loc.field(name)?;
        list::set_element_order(
            &mut original,
            name,
            order,
            patch.get(name),
            ty.field(name),
            &field_loc,
        )?;
    }
    for (name, value) in fields {
        if orders.iter().any(|(ordered, _)| *ordered == name) {
            continue;
        }
        merge_field(&mut original, name, value, ty, &loc.field(name)?)?;
    }
    for (name, value) in deletions {
        list::delete_from_primitive_list(&mut original, name, value, &loc.field(name)?)?;
    }
    Ok(original)
}

/// Merges the patch value of field `name` of an object of type `ty` into
/// `original`.
fn merge_field(
    original: &mut Map<String, Value>,
    name: &str,
    patch: &Value,
    ty: &'static Type,
    loc: &Loc,
) -> Result<(), PatchError> {
    let field = ty.field(name);
    check_shape(ty, name, patch, loc)?;
    if patch.is_null() {
        original.remove(name);
        return Ok(());
    }
    let merged = match original.get_mut(name) {
        Some(slot) => match (mem::take(slot), patch) {
            (Value::Object(object), Value::Object(patch)) => Some(Value::Object(merge_object(
                object,
                patch,
                Field::object_type(field),
                loc,
            )?)),
            (Value::Array(items), Value::Array(patch)) => Some(Value::Array(list::merge(
                items,
                patch,
                Field::list_strategy(field),
                loc,
            )?)),
            // A scalar, or a change of JSON type: the patch value wins.
            _ => build(patch, field, loc)?,
        },
        None => build(patch, field, loc)?,
    };
    match merged {
        Some(value) => {
            original.insert(name.to_owned(), value);
        }
        None => {
            original.remove(name);
        }
    }
    Ok(())
}

/// The value a patch value produces where the object has none: the patch merged
/// into nothing. `None` means the field stays absent (`null`, or a map carrying
/// `$patch: delete`).
fn build(patch: &Value, field: Option<Field>, loc: &Loc) -> Result<Option<Value>, PatchError> {
    Ok(match patch {
        Value::Null => None,
        Value::Object(patch) => {
            if directive_of(patch, loc)? == Some(Directive::Delete) {
                None
            } else {
                Some(Value::Object(merge_object(
                    Map::new(),
                    patch,
                    Field::object_type(field),
                    loc,
                )?))
            }
        }
        Value::Array(patch) => Some(Value::Array(list::merge(
            Vec::new(),
            patch,
            Field::list_strategy(field),
            loc,
        )?)),
        scalar => Some(scalar.clone()),
    })
}

/// `$retainKeys`: the object keeps only the listed keys. Every field the patch
/// sets must be listed, or the patch contradicts itself.
fn apply_retain_keys(
    original: &mut Map<String, Value>,
    keys: &Value,
    fields: &[(&str, &Value)],
    loc: &Loc,
) -> Result<(), PatchError> {
    let Value::Array(keys) = keys else {
        return Err(
            loc.bad_request("invalid patch format of retainKeys: $retainKeys must be a list")
        );
    };
    let retained = |name: &str| keys.iter().any(|key| key.as_str() == Some(name));
    if let Some((name, _)) = fields
        .iter()
        .find(|(name, value)| !value.is_null() && !retained(name))
    {
        return Err(loc.bad_request(format!(
            "invalid patch format of retainKeys: the patch sets {name:?}, which $retainKeys does not list"
        )));
    }
    original.retain(|name, _| retained(name));
    Ok(())
}

/// A field the schema knows must get a value of the right JSON shape (or
/// `null`). Upstream finds out when decoding the result into the typed object
/// and answers 422; the path here is more precise.
fn check_shape(ty: &Type, name: &str, patch: &Value, loc: &Loc) -> Result<(), PatchError> {
    let Some(field) = ty.field(name) else {
        return Ok(());
    };
    let fits = match patch {
        Value::Null => true,
        Value::Array(_) => field.is_list(),
        Value::Object(_) => !field.is_list(),
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        let expected = if field.is_list() {
            "a list"
        } else {
            "an object"
        };
        Err(loc.invalid(format!(
            "{}.{name} is {expected}, but the patch has {}",
            ty.name,
            json_kind(patch)
        )))
    }
}

/// The JSON type of `value`, for messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
