//! How objects are kept in the store and handed back.
//!
//! An object's `resourceVersion` is the store's `mod_revision`, known only
//! after the write, so it is never stored. Objects are stored as JSON that
//! starts with the metadata object (`{"metadata":{...},"apiVersion":...}`);
//! a response is then the stored bytes with `"resourceVersion":"N"` spliced
//! in after `{"metadata":{`. Gets, lists and watch events are thus served
//! without parsing the objects at all.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::resources::ResourceType;
use super::status::ApiError;

const METADATA_OPEN: &[u8] = b"{\"metadata\":{";

/// Encodes an object for the store: metadata first, without
/// `resourceVersion`.
pub fn encode(object: &Value) -> Result<Vec<u8>, ApiError> {
    let Value::Object(map) = object else {
        return Err(ApiError::bad_request("object is not a JSON object"));
    };
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"{\"metadata\":");
    match map.get("metadata") {
        // Member by member, leaving resourceVersion out, rather than
        // through a copy of the metadata (managedFields are most of it).
        Some(Value::Object(meta)) => {
            write_members(
                &mut out,
                meta.iter().filter(|(k, _)| *k != "resourceVersion"),
            )?;
        }
        _ => out.extend_from_slice(b"{}"),
    }
    for (key, value) in map.iter().filter(|(k, _)| *k != "metadata") {
        out.push(b',');
        write_member(&mut out, key, value)?;
    }
    out.push(b'}');
    // The store keeps these bytes for as long as the version lives: do not
    // keep the growth slack with them.
    out.shrink_to_fit();
    Ok(out)
}

/// Encodes an object of `rt` for the store, in the shape of the kind
/// whose storage holds it.
pub fn encode_for(rt: &ResourceType, object: &Value) -> Result<Vec<u8>, ApiError> {
    match rt.stored_as {
        Some(storage) => encode(&(storage.to_stored)(object.clone())),
        None => encode(object),
    }
}

/// Stored bytes in `rt`'s served shape: the same bytes unless another
/// kind's storage holds `rt`. Bytes that do not parse are passed on as
/// they are; every reader already handles those.
pub fn served(rt: &ResourceType, stored: Bytes) -> Bytes {
    let Some(storage) = rt.stored_as else {
        return stored;
    };
    match serde_json::from_slice(&stored) {
        Ok(object) => encode(&(storage.from_stored)(object)).map_or(stored, Bytes::from),
        Err(_) => stored,
    }
}

/// A store write's result as a response body of `rt`.
pub fn served_with_version(rt: &ResourceType, stored: Bytes, revision: i64) -> Vec<u8> {
    with_version(&served(rt, stored), revision)
}

/// Appends the stored object to `out` with its resourceVersion set.
pub fn write_with_version(out: &mut Vec<u8>, stored: &[u8], revision: i64) {
    if stored.starts_with(METADATA_OPEN) {
        out.extend_from_slice(METADATA_OPEN);
        out.extend_from_slice(b"\"resourceVersion\":\"");
        out.extend_from_slice(revision.to_string().as_bytes());
        out.push(b'"');
        let rest = &stored[METADATA_OPEN.len()..];
        if rest.first() != Some(&b'}') {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        return;
    }
    // Written by something else (e.g. another tool on a shared etcd):
    // take the slow path rather than refuse it.
    match decode(stored, revision) {
        Ok(value) => {
            if serde_json::to_writer(&mut *out, &value).is_err() {
                out.extend_from_slice(b"{}");
            }
        }
        Err(_) => out.extend_from_slice(b"{}"),
    }
}

/// The stored object as a JSON response body.
pub fn with_version(stored: &[u8], revision: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.len() + 32);
    write_with_version(&mut out, stored, revision);
    out
}

/// Parses a stored object and sets its resourceVersion.
pub fn decode(stored: &[u8], revision: i64) -> Result<Value, ApiError> {
    let mut value: Value = serde_json::from_slice(stored)
        .map_err(|e| ApiError::internal(format!("stored object is not valid JSON: {e}")))?;
    set_resource_version(&mut value, revision);
    Ok(value)
}

pub fn set_resource_version(object: &mut Value, revision: i64) {
    if let Some(meta) = metadata_mut(object) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
}

/// The metadata map, created if missing; `None` if `object` is no object.
pub fn metadata_mut(object: &mut Value) -> Option<&mut Map<String, Value>> {
    let map = object.as_object_mut()?;
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut()
}

/// The `PartialObjectMetadata` view of a stored object, appended to `out`.
/// Stored objects start with their metadata, so only that is scanned (to
/// find where it ends) and copied; the rest of the object is never parsed,
/// which is what makes metadata-only watchers (the garbage collector) cheap.
pub fn write_partial_metadata(
    out: &mut Vec<u8>,
    stored: &[u8],
    revision: i64,
) -> Result<(), ApiError> {
    out.extend_from_slice(PARTIAL_OPEN);
    out.extend_from_slice(b"\"resourceVersion\":\"");
    out.extend_from_slice(revision.to_string().as_bytes());
    out.push(b'"');
    let fields = match metadata_fields(stored) {
        Some(fields) => std::borrow::Cow::Borrowed(fields),
        // Written by something else: take the slow path.
        None => std::borrow::Cow::Owned(slow_metadata_fields(stored)?),
    };
    if !fields.is_empty() {
        out.push(b',');
        out.extend_from_slice(&fields);
    }
    out.extend_from_slice(b"}}");
    Ok(())
}

const PARTIAL_OPEN: &[u8] =
    b"{\"kind\":\"PartialObjectMetadata\",\"apiVersion\":\"meta.k8s.io/v1\",\"metadata\":{";

/// The members of the stored metadata object, between its braces, when the
/// object is in the stored shape (metadata first).
fn metadata_fields(stored: &[u8]) -> Option<&[u8]> {
    if !stored.starts_with(METADATA_OPEN) {
        return None;
    }
    let from = METADATA_OPEN.len() - 1;
    let rest = stored.get(from..)?;
    let mut values =
        serde_json::Deserializer::from_slice(rest).into_iter::<serde::de::IgnoredAny>();
    values.next()?.ok()?;
    let end = values.byte_offset();
    // `rest[..end]` is `{...}`: the members are what is inside.
    rest.get(1..end.checked_sub(1)?)
}

fn slow_metadata_fields(stored: &[u8]) -> Result<Vec<u8>, ApiError> {
    #[derive(serde::Deserialize)]
    struct MetadataOnly {
        #[serde(default)]
        metadata: Map<String, Value>,
    }
    let mut only: MetadataOnly = serde_json::from_slice(stored)
        .map_err(|e| ApiError::internal(format!("stored object is not valid JSON: {e}")))?;
    only.metadata.remove("resourceVersion");
    let mut object = Vec::new();
    write_json(&mut object, &Value::Object(only.metadata))?;
    Ok(object
        .get(1..object.len().saturating_sub(1))
        .unwrap_or_default()
        .to_vec())
}

pub fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

pub fn name_of(object: &Value) -> &str {
    meta_str(object, "name").unwrap_or("")
}

fn write_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) -> Result<(), ApiError> {
    serde_json::to_writer(out, value)
        .map_err(|e| ApiError::internal(format!("encoding object: {e}")))
}

/// `{"k":v,...}`.
fn write_members<'a>(
    out: &mut Vec<u8>,
    members: impl Iterator<Item = (&'a String, &'a Value)>,
) -> Result<(), ApiError> {
    out.push(b'{');
    for (i, (key, value)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_member(out, key, value)?;
    }
    out.push(b'}');
    Ok(())
}

/// `"k":v`.
fn write_member(out: &mut Vec<u8>, key: &str, value: &Value) -> Result<(), ApiError> {
    write_json(out, key)?;
    out.push(b':');
    write_json(out, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splices_resource_version_into_stored_bytes() {
        let object = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "x", "resourceVersion": "99"},
            "data": {"a": "b"}
        });
        let stored = encode(&object).unwrap();
        assert!(stored.starts_with(METADATA_OPEN));
        let served: Value = serde_json::from_slice(&with_version(&stored, 42)).unwrap();
        assert_eq!(served["metadata"]["resourceVersion"], "42");
        assert_eq!(served["metadata"]["name"], "x");
        assert_eq!(served["data"]["a"], "b");
        assert_eq!(served["kind"], "ConfigMap");
    }

    #[test]
    fn empty_metadata_and_foreign_bytes() {
        let stored = encode(&json!({"kind": "X"})).unwrap();
        let served: Value = serde_json::from_slice(&with_version(&stored, 7)).unwrap();
        assert_eq!(served["metadata"]["resourceVersion"], "7");
        let foreign = br#"{"kind":"X","metadata":{"name":"y"}}"#;
        let served: Value = serde_json::from_slice(&with_version(foreign, 8)).unwrap();
        assert_eq!(served["metadata"]["resourceVersion"], "8");
        assert_eq!(served["metadata"]["name"], "y");
    }

    #[test]
    fn partial_metadata_copies_only_the_metadata() {
        let partial = |stored: &[u8]| -> Value {
            let mut out = Vec::new();
            write_partial_metadata(&mut out, stored, 9).unwrap();
            serde_json::from_slice(&out).unwrap()
        };
        let object = json!({
            "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "}{\""}, "resourceVersion": "3"},
            "spec": {"containers": [{"name": "c"}]}
        });
        let expected = json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"name": "p", "labels": {"a": "}{\""}, "resourceVersion": "9"}
        });
        assert_eq!(partial(&encode(&object).unwrap()), expected);
        let foreign = br#"{"kind":"Pod","metadata":{"name":"p","labels":{"a":"}{\""},"resourceVersion":"3"}}"#;
        assert_eq!(partial(foreign), expected);
        let empty = partial(&encode(&json!({"kind": "X"})).unwrap());
        assert_eq!(empty["metadata"], json!({"resourceVersion": "9"}));
        let mut out = Vec::new();
        assert!(write_partial_metadata(&mut out, b"{\"metadata\":{\"name\":", 1).is_err());
    }
}
