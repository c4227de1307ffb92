//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`), decoded to JSON.
//!
//! kubectl's typed clients send protobuf for `kubectl create configmap|secret|namespace|
//! deployment` and similar calls: the bytes `k8s\0`, then a `runtime.Unknown` envelope whose
//! `typeMeta` names the kind and whose `raw` holds the object's own message. [`decode`] turns
//! such a body into the JSON object the same client would have sent as JSON, so the rest of
//! the API server only ever handles JSON.
//!
//! The decoder is generic: it walks the wire format with a table of every served message
//! (field number → JSON name, type, repeated, and how Go's JSON encoder treats the field),
//! in the generated `schema.rs`. A handful of types with their own JSON form (timestamps,
//! quantities, int-or-string, embedded JSON) live in `special.rs`.
//!
//! Regenerate the table with `python3 tools/protobuf-schema/gen.py` (inputs: k8s-pb and
//! k8s-openapi from the cargo registry, `tools/protobuf-schema/go_fields.tsv`). When moving to
//! another Kubernetes minor, first refresh the Go facts from that kubectl:
//! `python3 tools/protobuf-schema/extract_go_fields.py PATH/TO/kubectl > tools/protobuf-schema/go_fields.tsv`.

mod envelope;
mod message;
mod model;
mod schema;
mod special;
mod wire;

use std::fmt;

use serde_json::Value;

/// The `Content-Type` of a protobuf request body.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// Objects nest at most this many messages deep (counting embedded objects in
/// RawExtensions); deeper bodies are refused rather than risking the stack.
pub const MAX_DEPTH: usize = 64;

/// A decoded body.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The object as JSON, with `apiVersion` and `kind` from the envelope.
    pub object: Value,
    /// Fields the schema does not know, skipped; the caller may warn or refuse.
    pub unknown_fields: Vec<UnknownField>,
}

/// A field number that was skipped because the schema does not know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownField {
    /// JSON path of the object that held it (`spec.template.spec.containers[0]`);
    /// empty for the top level.
    pub path: String,
    /// The protobuf message it appeared in.
    pub message: &'static str,
    pub number: u32,
}

impl fmt::Display for UnknownField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "unknown field {} of {}", self.number, self.message)
    }
}

/// Why a body could not be decoded; each message suits a 400 Bad Request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtobufError {
    #[error("protobuf body: does not start with the magic bytes \"k8s\\0\"")]
    NotProtobuf,
    #[error("protobuf body: the envelope names no apiVersion and kind")]
    MissingTypeMeta,
    #[error("protobuf body: kind {kind:?} of apiVersion {api_version:?} is not served")]
    UnknownKind { api_version: String, kind: String },
    #[error("protobuf body: contentEncoding {0:?} is not supported")]
    ContentEncoding(String),
    #[error("protobuf body: contentType {0:?} is not supported")]
    ContentType(String),
    #[error("protobuf body: nested deeper than {MAX_DEPTH} levels{}", at(.path))]
    TooDeep { path: String },
    #[error("protobuf body: {detail}{}", at(.path))]
    Malformed { path: String, detail: String },
}

fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" (at {path})")
    }
}

/// Decodes a protobuf request body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Decoded, ProtobufError> {
    let mut decoder = message::Decoder::new();
    let object = decoder.object(body)?;
    Ok(Decoded {
        object,
        unknown_fields: decoder.into_unknown_fields(),
    })
}

#[cfg(test)]
mod tests;
