//! The schema-driven decoder: protobuf messages to JSON objects.
//!
//! Merging follows protobuf (and gogo-protobuf, which Kubernetes uses): a repeated
//! singular message merges into the first, repeated scalars append, a repeated singular
//! scalar replaces. Everything is decoded straight into the `serde_json` tree.

use serde_json::{Map, Number, Value};

use super::envelope;
use super::model::{Field, Kind, Message, MsgId, Special};
use super::schema::{KINDS, META_V1_DELETE_OPTIONS};
use super::special::{self, Raw};
use super::wire::{Reader, WireError, WireType};
use super::{CONTENT_TYPE, MAX_DEPTH, ProtobufError, UnknownField};

/// Unknown fields reported per body; the rest are skipped silently.
pub(super) const MAX_UNKNOWN_REPORTED: usize = 16;

pub(super) struct Decoder {
    /// Where we are, for error messages and unknown-field reports.
    path: Vec<Segment>,
    depth: usize,
    unknown: Vec<UnknownField>,
}

enum Segment {
    Field(&'static str),
    Index(usize),
    Key(String),
}

impl Decoder {
    pub(super) fn new() -> Self {
        Decoder {
            path: Vec::new(),
            depth: 0,
            unknown: Vec::new(),
        }
    }

    pub(super) fn into_unknown_fields(self) -> Vec<UnknownField> {
        self.unknown
    }

    /// A whole object: magic, envelope, then the message its typeMeta names.
    pub(super) fn object(&mut self, body: &[u8]) -> Result<Value, ProtobufError> {
        let env = envelope::parse(body)?;
        for (message, number) in &env.unknown {
            self.record_unknown(message, *number);
        }
        if !env.content_encoding.is_empty() {
            return Err(ProtobufError::ContentEncoding(env.content_encoding));
        }
        if !env.content_type.is_empty() && env.content_type != CONTENT_TYPE {
            return Err(ProtobufError::ContentType(env.content_type));
        }
        if env.api_version.is_empty() || env.kind.is_empty() {
            return Err(ProtobufError::MissingTypeMeta);
        }
        let id = served(&env.api_version, &env.kind).ok_or_else(|| ProtobufError::UnknownKind {
            api_version: env.api_version.clone(),
            kind: env.kind.clone(),
        })?;
        let mut object = Map::new();
        self.message_into(id.message(), env.raw, &mut object)?;
        // Protobuf objects carry no TypeMeta of their own; JSON ones do.
        object.insert("apiVersion".to_owned(), Value::String(env.api_version));
        object.insert("kind".to_owned(), Value::String(env.kind));
        Ok(Value::Object(object))
    }

    /// Decodes `bytes` as `msg`, merging its fields into `out`.
    fn message_into(
        &mut self,
        msg: &'static Message,
        bytes: &[u8],
        out: &mut Map<String, Value>,
    ) -> Result<(), ProtobufError> {
        self.enter()?;
        let mut r = Reader::new(bytes);
        while let Some((number, wire)) = r.key().map_err(|e| self.wire_error(e, msg))? {
            match msg.field(number) {
                Some(field) if field.inline => {
                    // An embedded Go struct: its fields land in this very object.
                    let bytes = self.len(msg, field, wire, &mut r)?;
                    let Kind::Message(id) = field.kind else {
                        return Err(self.malformed(format!(
                            "schema error: inline field {number} of {} is not a message",
                            msg.name
                        )));
                    };
                    self.message_into(id.message(), bytes, out)?;
                }
                Some(field) => {
                    self.path.push(Segment::Field(field.json));
                    self.field(msg, field, wire, &mut r, out)?;
                    self.path.pop();
                }
                None => {
                    r.skip(number, wire).map_err(|e| self.wire_error(e, msg))?;
                    self.record_unknown(msg.name, number);
                }
            }
        }
        self.leave();
        Ok(())
    }

    fn field(
        &mut self,
        msg: &'static Message,
        field: &'static Field,
        wire: WireType,
        r: &mut Reader<'_>,
        out: &mut Map<String, Value>,
    ) -> Result<(), ProtobufError> {
        match field.kind {
            Kind::Map(value_kind) => {
                let entry = self.len(msg, field, wire, r)?;
                let (key, value) = self.map_entry(msg, field, value_kind, entry)?;
                object_at(out, field.json)
                    .ok_or_else(|| self.clash(msg))?
                    .insert(key, value);
            }
            kind if field.repeated => {
                let items = array_at(out, field.json).ok_or_else(|| self.clash(msg))?;
                if wire == WireType::Len && packable(kind) {
                    // Packed scalars: one length-delimited run of values.
                    let mut packed = Reader::new(self.len(msg, field, wire, r)?);
                    while !packed.is_empty() {
                        items.push(self.scalar(msg, kind, &mut packed)?);
                    }
                } else {
                    self.path.push(Segment::Index(items.len()));
                    items.push(self.value(msg, field, kind, wire, r)?);
                    self.path.pop();
                }
            }
            Kind::Message(id) => {
                let bytes = self.len(msg, field, wire, r)?;
                let object = object_at(out, field.json).ok_or_else(|| self.clash(msg))?;
                self.message_into(id.message(), bytes, object)?;
            }
            kind => {
                let value = self.value(msg, field, kind, wire, r)?;
                if field.omit_zero && is_zero(&value) {
                    out.remove(field.json);
                } else {
                    out.insert(field.json.to_owned(), value);
                }
            }
        }
        Ok(())
    }

    /// One value of `kind` read at the reader.
    fn value(
        &mut self,
        msg: &'static Message,
        field: &Field,
        kind: Kind,
        wire: WireType,
        r: &mut Reader<'_>,
    ) -> Result<Value, ProtobufError> {
        let expected = wire_type(kind);
        if wire != expected {
            return Err(self.malformed(format!(
                "field {} of {} has wire type {wire}, expected {expected}",
                field.number, msg.name
            )));
        }
        if expected == WireType::Len {
            let bytes = r.len_delimited().map_err(|e| self.wire_error(e, msg))?;
            self.len_value(msg, field.number, kind, bytes)
        } else {
            self.scalar(msg, kind, r)
        }
    }

    /// A varint or fixed-width scalar.
    fn scalar(
        &self,
        msg: &'static Message,
        kind: Kind,
        r: &mut Reader<'_>,
    ) -> Result<Value, ProtobufError> {
        let wire = |e| self.wire_error(e, msg);
        Ok(match kind {
            Kind::Bool => Value::Bool(r.varint().map_err(wire)? != 0),
            // int32 travels as a sign-extended varint; truncating is what Go does.
            Kind::Int32 => Value::from(r.varint().map_err(wire)? as i32),
            Kind::Int64 => Value::from(r.varint().map_err(wire)? as i64),
            Kind::Double => {
                let x = f64::from_bits(r.fixed64().map_err(wire)?);
                Value::Number(Number::from_f64(x).ok_or_else(|| {
                    self.malformed(format!("{x} in {} is not a JSON number", msg.name))
                })?)
            }
            _ => {
                return Err(self.malformed(format!(
                    "schema error: {kind:?} in {} is not a scalar",
                    msg.name
                )));
            }
        })
    }

    /// A length-delimited value: string, bytes, message or special type.
    fn len_value(
        &mut self,
        msg: &'static Message,
        number: u32,
        kind: Kind,
        bytes: &[u8],
    ) -> Result<Value, ProtobufError> {
        match kind {
            Kind::String => std::str::from_utf8(bytes)
                .map(|s| Value::String(s.to_owned()))
                .map_err(|_| {
                    self.malformed(format!("field {number} of {} is not valid UTF-8", msg.name))
                }),
            Kind::Bytes => Ok(Value::String(special::base64(bytes))),
            Kind::Message(id) => {
                let mut object = Map::new();
                self.message_into(id.message(), bytes, &mut object)?;
                Ok(Value::Object(object))
            }
            Kind::Special(s) => self.special(s, bytes),
            _ => Err(self.malformed(format!(
                "schema error: {kind:?} in {} is not length-delimited",
                msg.name
            ))),
        }
    }

    fn special(&mut self, s: Special, bytes: &[u8]) -> Result<Value, ProtobufError> {
        self.enter()?;
        let mut unknown = Vec::new();
        let decoded = match s {
            Special::Time => special::time(bytes, &mut unknown),
            Special::MicroTime => special::micro_time(bytes, &mut unknown),
            Special::Duration => special::duration(bytes, &mut unknown),
            Special::FieldsV1 => special::fields_v1(bytes, &mut unknown),
            Special::IntOrString => special::int_or_string(bytes, &mut unknown),
            Special::Quantity => special::quantity(bytes, &mut unknown),
            Special::RawExtension => match special::raw_extension(bytes, &mut unknown) {
                Ok(Raw::Json(value)) => Ok(value),
                Ok(Raw::Protobuf(nested)) => Ok(self.object(nested)?),
                Err(detail) => Err(detail),
            },
        };
        let value = decoded.map_err(|detail| self.malformed(detail))?;
        for number in unknown {
            self.record_unknown(special_name(s), number);
        }
        self.leave();
        Ok(value)
    }

    /// A `map<string, V>` entry: key is field 1, value field 2, either may be absent.
    fn map_entry(
        &mut self,
        msg: &'static Message,
        field: &Field,
        value_kind: &'static Kind,
        entry: &[u8],
    ) -> Result<(String, Value), ProtobufError> {
        let (mut key, mut value) = (None, None);
        let mut r = Reader::new(entry);
        while let Some((number, wire)) = r.key().map_err(|e| self.wire_error(e, msg))? {
            let slot = match number {
                1 => &mut key,
                2 => &mut value,
                _ => {
                    r.skip(number, wire).map_err(|e| self.wire_error(e, msg))?;
                    self.record_unknown("map entry", number);
                    continue;
                }
            };
            if wire != WireType::Len {
                return Err(self.malformed(format!(
                    "map entry of field {} of {} has wire type {wire} in field {number}, expected {}",
                    field.number,
                    msg.name,
                    WireType::Len
                )));
            }
            *slot = Some(r.len_delimited().map_err(|e| self.wire_error(e, msg))?);
        }
        let key = match self.len_value(msg, field.number, Kind::String, key.unwrap_or_default())? {
            Value::String(key) => key,
            _ => String::new(),
        };
        if wire_type(*value_kind) != WireType::Len {
            return Err(self.malformed(format!(
                "schema error: map values of field {} of {} are not length-delimited",
                field.number, msg.name
            )));
        }
        // An absent value is the type's zero value, which its empty encoding gives.
        // The key goes on the path for the value's errors and comes back after: on
        // success every push below it has been popped again.
        self.path.push(Segment::Key(key));
        let value = self.len_value(msg, field.number, *value_kind, value.unwrap_or_default());
        let key = match self.path.pop() {
            Some(Segment::Key(key)) => key,
            _ => String::new(),
        };
        Ok((key, value?))
    }

    fn len<'a>(
        &self,
        msg: &'static Message,
        field: &Field,
        wire: WireType,
        r: &mut Reader<'a>,
    ) -> Result<&'a [u8], ProtobufError> {
        if wire != WireType::Len {
            return Err(self.malformed(format!(
                "field {} of {} has wire type {wire}, expected {}",
                field.number,
                msg.name,
                WireType::Len
            )));
        }
        r.len_delimited().map_err(|e| self.wire_error(e, msg))
    }

    fn enter(&mut self) -> Result<(), ProtobufError> {
        if self.depth >= MAX_DEPTH {
            return Err(ProtobufError::TooDeep {
                path: self.path_string(),
            });
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn record_unknown(&mut self, message: &'static str, number: u32) {
        // Each report carries its whole path, map keys included: a body of
        // many unknown fields under one long map key would otherwise cost
        // their product in memory. The first few say enough.
        if self.unknown.len() >= MAX_UNKNOWN_REPORTED {
            return;
        }
        self.unknown.push(UnknownField {
            path: self.path_string(),
            message,
            number,
        });
    }

    fn clash(&self, msg: &Message) -> ProtobufError {
        self.malformed(format!(
            "schema error: two fields of {} share a JSON name",
            msg.name
        ))
    }

    fn wire_error(&self, e: WireError, msg: &Message) -> ProtobufError {
        self.malformed(format!("{e} in {}", msg.name))
    }

    fn malformed(&self, detail: String) -> ProtobufError {
        ProtobufError::Malformed {
            path: self.path_string(),
            detail,
        }
    }

    fn path_string(&self) -> String {
        let mut out = String::new();
        for segment in &self.path {
            match segment {
                Segment::Field(name) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(name);
                }
                Segment::Index(i) => out.push_str(&format!("[{i}]")),
                Segment::Key(key) => out.push_str(&format!("[{key}]")),
            }
        }
        out
    }
}

/// The message of a served kind. DeleteOptions is registered in every group version.
fn served(api_version: &str, kind: &str) -> Option<MsgId> {
    if let Some((_, _, id)) = KINDS
        .iter()
        .find(|(av, k, _)| *av == api_version && *k == kind)
    {
        return Some(*id);
    }
    let known_group_version = KINDS.iter().any(|(av, _, _)| *av == api_version);
    (kind == "DeleteOptions" && known_group_version).then_some(META_V1_DELETE_OPTIONS)
}

fn wire_type(kind: Kind) -> WireType {
    match kind {
        Kind::Bool | Kind::Int32 | Kind::Int64 => WireType::Varint,
        Kind::Double => WireType::Fixed64,
        Kind::String | Kind::Bytes | Kind::Message(_) | Kind::Special(_) | Kind::Map(_) => {
            WireType::Len
        }
    }
}

fn packable(kind: Kind) -> bool {
    wire_type(kind) != WireType::Len
}

fn is_zero(value: &Value) -> bool {
    match value {
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

fn special_name(s: Special) -> &'static str {
    match s {
        Special::Time => "Time",
        Special::MicroTime => "MicroTime",
        Special::Duration => "Duration",
        Special::FieldsV1 => "FieldsV1",
        Special::IntOrString => "IntOrString",
        Special::Quantity => "Quantity",
        Special::RawExtension => "RawExtension",
    }
}

/// The object at `key`, created as needed. `None` only if the key already holds
/// something else, which the schema rules out (Go forbids duplicate JSON names).
fn object_at<'m>(out: &'m mut Map<String, Value>, key: &str) -> Option<&'m mut Map<String, Value>> {
    out.entry(key)
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
}

/// The array at `key`, created as needed; `None` as for [`object_at`].
fn array_at<'m>(out: &'m mut Map<String, Value>, key: &str) -> Option<&'m mut Vec<Value>> {
    out.entry(key)
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
}
