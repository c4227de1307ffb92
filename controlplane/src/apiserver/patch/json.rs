//! RFC 6902 JSON patch and RFC 7386 JSON merge patch, through the `json-patch`
//! crate. Neither needs the object's schema.

use serde_json::Value;

use super::PatchError;

/// Upstream's cap on operations in one JSON patch, which bounds the work a single
/// request can ask for.
const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// Applies a parsed JSON patch body (a list of operations) to a copy of `current`.
/// All operations apply or none do: on failure the copy is dropped.
pub(super) fn apply_json_patch(current: &Value, body: Value) -> Result<Value, PatchError> {
    if !body.is_array() {
        return Err(PatchError::BadRequest(
            "a JSON patch must be a JSON list of operations".to_owned(),
        ));
    }
    let operations: json_patch::Patch = serde_json::from_value(body)
        .map_err(|e| PatchError::BadRequest(format!("invalid JSON patch: {e}")))?;
    if operations.0.len() > MAX_JSON_PATCH_OPERATIONS {
        return Err(PatchError::TooManyOperations {
            max: MAX_JSON_PATCH_OPERATIONS,
            got: operations.0.len(),
        });
    }
    let mut patched = current.clone();
    // Not `json_patch::patch`: its rollback of a failed patch can reach an
    // `unreachable!` (a failed `move` inside its own child, found by the property
    // tests). Working on a copy already gives all-or-nothing.
    json_patch::patch_unsafe(&mut patched, &operations.0)
        .map_err(|e| PatchError::Invalid(format!("the JSON patch cannot be applied: {e}")))?;
    Ok(patched)
}

/// Applies a JSON merge patch body (already checked to be an object) to a copy of
/// `current`: objects merge recursively, `null` deletes, anything else replaces.
pub(super) fn apply_merge_patch(current: &Value, body: &Value) -> Value {
    let mut patched = current.clone();
    json_patch::merge(&mut patched, body);
    patched
}
