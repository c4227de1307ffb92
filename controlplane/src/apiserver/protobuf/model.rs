//! The shape of the generated schema table (`schema.rs`): what the decoder knows about
//! each message and field.

use super::schema::MESSAGES;

/// Index of a message in [`MESSAGES`]. Only the generated constants create them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MsgId(pub(super) u16);

impl MsgId {
    pub(super) fn message(self) -> &'static Message {
        // The generator only emits ids of messages it also emits (a unit test checks).
        &MESSAGES[usize::from(self.0)]
    }
}

pub(super) struct Message {
    /// Go/protobuf type name, for error messages.
    pub(super) name: &'static str,
    /// Sorted by `number`.
    pub(super) fields: &'static [Field],
}

impl Message {
    pub(super) fn field(&self, number: u32) -> Option<&'static Field> {
        let fields = self.fields;
        fields
            .binary_search_by_key(&number, |f| f.number)
            .ok()
            .map(|i| &fields[i])
    }
}

pub(super) struct Field {
    pub(super) number: u32,
    /// JSON property name (unused when `inline`).
    pub(super) json: &'static str,
    pub(super) kind: Kind,
    pub(super) repeated: bool,
    /// Go writes this non-pointer, `omitempty` scalar to protobuf even when it is the
    /// zero value, and drops it from JSON; so do we, or `namespace: ""` and friends
    /// would appear in objects that never set them.
    pub(super) omit_zero: bool,
    /// An embedded Go struct (`json:",inline"`): its fields belong to the parent object.
    pub(super) inline: bool,
}

impl Field {
    pub(super) const fn new(number: u32, json: &'static str, kind: Kind) -> Field {
        Field {
            number,
            json,
            kind,
            repeated: false,
            omit_zero: false,
            inline: false,
        }
    }

    pub(super) const fn repeated(self) -> Field {
        Field {
            repeated: true,
            ..self
        }
    }

    pub(super) const fn omit_zero(self) -> Field {
        Field {
            omit_zero: true,
            ..self
        }
    }

    pub(super) const fn inline(self) -> Field {
        Field {
            inline: true,
            ..self
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    String,
    Bool,
    Int32,
    Int64,
    #[allow(
        dead_code,
        reason = "no served 1.33 kind has a double field; kept so one that does decodes right"
    )]
    Double,
    /// JSON: base64.
    Bytes,
    Message(MsgId),
    /// A type with its own JSON form (see `special.rs`).
    Special(Special),
    /// `map<string, V>`; the value kind is never a map.
    Map(&'static Kind),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Special {
    Time,
    MicroTime,
    #[allow(
        dead_code,
        reason = "no served 1.33 kind has a Duration field; kept so one that does decodes right"
    )]
    Duration,
    FieldsV1,
    IntOrString,
    Quantity,
    RawExtension,
}
