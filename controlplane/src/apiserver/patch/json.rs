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
    let mut growth = Growth {
        depth: super::nesting(&patched),
        copied: 0,
    };
    // Not `json_patch::patch`: its rollback of a failed patch can reach an
    // `unreachable!` (a failed `move` inside its own child, found by the property
    // tests). Working on a copy already gives all-or-nothing. One operation at a
    // time, so that each is checked against the object as the ones before left it.
    for (index, operation) in operations.0.iter().enumerate() {
        growth.admit(&patched, operation)?;
        json_patch::patch_unsafe(&mut patched, std::slice::from_ref(operation)).map_err(
            |mut e| {
                e.operation = index;
                PatchError::Invalid(format!("the JSON patch cannot be applied: {e}"))
            },
        )?;
    }
    Ok(patched)
}

/// Bounds what a JSON patch can grow the object to. `copy` and `move` place an
/// existing subtree elsewhere, so without a bound a few dozen operations could
/// double the object each time, or nest it deep enough that cloning or
/// dropping it overflows the stack.
struct Growth {
    /// An upper bound on the object's nesting so far.
    depth: usize,
    /// Serialized bytes that `copy` operations have duplicated so far.
    copied: usize,
}

impl Growth {
    fn admit(
        &mut self,
        object: &Value,
        operation: &json_patch::PatchOperation,
    ) -> Result<(), PatchError> {
        use json_patch::PatchOperation as Op;
        // How deep the placed value nests. A moved or copied subtree is at most
        // as deep as the object below its source, which needs no walk.
        let (path, placed) = match operation {
            Op::Add(op) => (&op.path, super::nesting(&op.value)),
            Op::Replace(op) => (&op.path, super::nesting(&op.value)),
            Op::Move(op) => (&op.path, self.depth.saturating_sub(op.from.count())),
            Op::Copy(op) => {
                // A missing source fails in the operation itself.
                if let Some(source) = object.pointer(op.from.as_str()) {
                    self.copied = self.copied.saturating_add(serialized_len(source));
                    if self.copied > MAX_COPIED_BYTES {
                        return Err(PatchError::Invalid(format!(
                            "the JSON patch's copy operations duplicate more than {MAX_COPIED_BYTES} bytes"
                        )));
                    }
                }
                (&op.path, self.depth.saturating_sub(op.from.count()))
            }
            Op::Remove(_) | Op::Test(_) => return Ok(()),
        };
        self.depth = self.depth.max(path.count() + placed);
        if self.depth > super::MAX_DEPTH {
            return Err(PatchError::Invalid(format!(
                "the JSON patch would nest the object more than {} levels deep",
                super::MAX_DEPTH
            )));
        }
        Ok(())
    }
}

/// What `copy` operations may duplicate in one patch, in serialized bytes: the
/// request body limit.
const MAX_COPIED_BYTES: usize = 3 * 1024 * 1024;

fn serialized_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and a Value always serializes.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Applies a JSON merge patch body (already checked to be an object) to a copy of
/// `current`: objects merge recursively, `null` deletes, anything else replaces.
pub(super) fn apply_merge_patch(current: &Value, body: &Value) -> Value {
    let mut patched = current.clone();
    json_patch::merge(&mut patched, body);
    patched
}
