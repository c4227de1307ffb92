//! JSON patch, JSON merge patch and strategic merge patch.
//!
//! A PATCH request carries one of four media types. Three are applied here to the
//! stored object, held as `serde_json::Value`:
//!
//! - `application/json-patch+json`: RFC 6902 operations (`kubectl patch --type=json`,
//!   `kubectl rollout undo` of a Deployment).
//! - `application/merge-patch+json`: RFC 7386 (`kubectl patch --type=merge`,
//!   `kubectl scale` on the scale subresource, most non-Go clients).
//! - `application/strategic-merge-patch+json`: the Kubernetes extension of merge
//!   patch that merges lists by key and understands `$patch` and friends. kubectl
//!   sends it for built-in kinds from `apply`, `edit`, `set`, `label`, `annotate`,
//!   `rollout`, `taint`, `cordon`. See the `strategic` and `schema` modules.
//!
//! The fourth, `application/apply-patch+yaml` (server-side apply), is handled by
//! the caller elsewhere; [`apply`] refuses it with [`PatchError::Unsupported`].
//!
//! Bodies must be JSON (kubectl converts YAML before sending). Each function here
//! is pure: the caller decodes the result into the typed object, validates it and
//! stores it.

mod error;
mod json;
mod openapi;
pub(crate) mod schema;
mod strategic;

#[cfg(test)]
mod tests;

use std::fmt;

use serde_json::Value;

pub use error::PatchError;
pub use openapi::annotate_openapi;

/// How deeply a patch body may nest. Built-in objects stay far below this; the
/// bound keeps recursion (ours and `json-patch`'s) off the stack's edge.
const MAX_DEPTH: usize = 100;

/// The patch media types the API server accepts on PATCH.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PatchType {
    /// RFC 6902 JSON patch: a list of operations.
    Json,
    /// RFC 7386 JSON merge patch.
    Merge,
    /// Kubernetes strategic merge patch.
    StrategicMerge,
    /// Server-side apply; not applied by this module.
    Apply,
}

impl PatchType {
    /// The patch type named by a `Content-Type` header value, ignoring parameters
    /// such as `; charset=utf-8` and the case of the media type.
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        [
            PatchType::Json,
            PatchType::Merge,
            PatchType::StrategicMerge,
            PatchType::Apply,
        ]
        .into_iter()
        .find(|patch_type| media_type.eq_ignore_ascii_case(patch_type.content_type()))
    }

    /// The media type that selects this patch type.
    pub fn content_type(self) -> &'static str {
        match self {
            PatchType::Json => "application/json-patch+json",
            PatchType::Merge => "application/merge-patch+json",
            PatchType::StrategicMerge => "application/strategic-merge-patch+json",
            PatchType::Apply => "application/apply-patch+yaml",
        }
    }
}

impl fmt::Display for PatchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.content_type())
    }
}

/// The kind of the object being patched, which selects the strategic merge patch
/// schema. `group` is the API group (`""` for the core group), `kind` the kind,
/// e.g. `TypeRef::new("apps", "Deployment")` or `TypeRef::new("", "Pod")`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TypeRef<'a> {
    pub group: &'a str,
    pub kind: &'a str,
}

impl<'a> TypeRef<'a> {
    pub const fn new(group: &'a str, kind: &'a str) -> TypeRef<'a> {
        TypeRef { group, kind }
    }
}

/// Applies `patch` (the request body) of type `patch_type` to `current`, the stored
/// object, and returns the patched object. `current` itself is not changed.
///
/// Strategic merge patches use the schema of `target`; a kind without a table
/// (see [`schema`]) still gets `metadata` merged as upstream does and every other
/// list replaced whole. The result is always a JSON object.
pub fn apply(
    target: TypeRef<'_>,
    current: &Value,
    patch_type: PatchType,
    patch: &[u8],
) -> Result<Value, PatchError> {
    let patched = match patch_type {
        PatchType::Apply => return Err(PatchError::Unsupported(PatchType::Apply)),
        PatchType::Json => json::apply_json_patch(current, parse_body(patch)?)?,
        PatchType::Merge => json::apply_merge_patch(current, &parse_object(patch, patch_type)?),
        PatchType::StrategicMerge => {
            let body = parse_object(patch, patch_type)?;
            let Value::Object(body) = &body else {
                return Err(not_an_object(patch_type));
            };
            strategic::apply(schema::root(target), current, body)?
        }
    };
    if patched.is_object() {
        Ok(patched)
    } else {
        Err(PatchError::Invalid(
            "the patched object is not a JSON object".to_owned(),
        ))
    }
}

/// Parses a patch body as JSON and bounds its nesting.
fn parse_body(body: &[u8]) -> Result<Value, PatchError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| PatchError::BadRequest(format!("the patch body is not valid JSON: {e}")))?;
    check_depth(&value)?;
    Ok(value)
}

/// Parses a merge or strategic merge patch body, which must be a JSON object.
fn parse_object(body: &[u8], patch_type: PatchType) -> Result<Value, PatchError> {
    let value = parse_body(body)?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(not_an_object(patch_type))
    }
}

fn not_an_object(patch_type: PatchType) -> PatchError {
    PatchError::BadRequest(format!("a {patch_type} body must be a JSON object"))
}

/// Rejects values nested deeper than [`MAX_DEPTH`].
fn check_depth(value: &Value) -> Result<(), PatchError> {
    if nesting(value) > MAX_DEPTH {
        return Err(PatchError::BadRequest(format!(
            "the patch is nested more than {MAX_DEPTH} levels deep"
        )));
    }
    Ok(())
}

/// How deep `value` nests: 0 for a scalar or an empty list or object, 1 for
/// one that holds only scalars.
/// Iterative, so a hostile body cannot exhaust the stack here.
fn nesting(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 0usize)];
    while let Some((value, depth)) = pending.pop() {
        deepest = deepest.max(depth);
        match value {
            Value::Array(items) => pending.extend(items.iter().map(|item| (item, depth + 1))),
            Value::Object(map) => pending.extend(map.values().map(|item| (item, depth + 1))),
            _ => {}
        }
    }
    deepest
}
