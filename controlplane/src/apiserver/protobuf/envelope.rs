//! The outer layer of a body: the magic prefix and the `runtime.Unknown` envelope
//! (`typeMeta{apiVersion, kind}`, `raw`, `contentEncoding`, `contentType`).

use super::ProtobufError;
use super::wire::{Reader, WireError, WireType};

/// The first bytes of every Kubernetes protobuf object.
pub(super) const MAGIC: &[u8] = b"k8s\0";

pub(super) struct Envelope<'a> {
    pub(super) api_version: String,
    pub(super) kind: String,
    /// The object's own message.
    pub(super) raw: &'a [u8],
    pub(super) content_encoding: String,
    pub(super) content_type: String,
    /// Unknown field numbers, with the message (`Unknown` or `TypeMeta`) they were in.
    pub(super) unknown: Vec<(&'static str, u32)>,
}

pub(super) fn parse(body: &[u8]) -> Result<Envelope<'_>, ProtobufError> {
    let message = body.strip_prefix(MAGIC).ok_or(ProtobufError::NotProtobuf)?;
    let mut env = Envelope {
        api_version: String::new(),
        kind: String::new(),
        raw: &[],
        content_encoding: String::new(),
        content_type: String::new(),
        unknown: Vec::new(),
    };
    let mut r = Reader::new(message);
    while let Some((number, wire)) = r.key().map_err(|e| wire_error(e, "Unknown"))? {
        match number {
            1 => type_meta(len(&mut r, number, wire, "Unknown")?, &mut env)?,
            2 => env.raw = len(&mut r, number, wire, "Unknown")?,
            3 => env.content_encoding = string(&mut r, number, wire, "Unknown")?,
            4 => env.content_type = string(&mut r, number, wire, "Unknown")?,
            _ => skip(&mut r, number, wire, "Unknown", &mut env.unknown)?,
        }
    }
    Ok(env)
}

fn type_meta(bytes: &[u8], env: &mut Envelope<'_>) -> Result<(), ProtobufError> {
    let mut r = Reader::new(bytes);
    while let Some((number, wire)) = r.key().map_err(|e| wire_error(e, "TypeMeta"))? {
        match number {
            1 => env.api_version = string(&mut r, number, wire, "TypeMeta")?,
            2 => env.kind = string(&mut r, number, wire, "TypeMeta")?,
            _ => skip(&mut r, number, wire, "TypeMeta", &mut env.unknown)?,
        }
    }
    Ok(())
}

fn len<'a>(
    r: &mut Reader<'a>,
    number: u32,
    wire: WireType,
    message: &str,
) -> Result<&'a [u8], ProtobufError> {
    if wire != WireType::Len {
        return Err(malformed(format!(
            "field {number} of {message} has wire type {wire}, expected {}",
            WireType::Len
        )));
    }
    r.len_delimited().map_err(|e| wire_error(e, message))
}

fn string(
    r: &mut Reader<'_>,
    number: u32,
    wire: WireType,
    message: &str,
) -> Result<String, ProtobufError> {
    let bytes = len(r, number, wire, message)?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| malformed(format!("field {number} of {message} is not valid UTF-8")))
}

fn skip(
    r: &mut Reader<'_>,
    number: u32,
    wire: WireType,
    message: &'static str,
    unknown: &mut Vec<(&'static str, u32)>,
) -> Result<(), ProtobufError> {
    r.skip(number, wire).map_err(|e| wire_error(e, message))?;
    unknown.push((message, number));
    Ok(())
}

fn wire_error(e: WireError, message: &str) -> ProtobufError {
    malformed(format!("{e} in {message}"))
}

fn malformed(detail: String) -> ProtobufError {
    ProtobufError::Malformed {
        path: String::new(),
        detail,
    }
}
