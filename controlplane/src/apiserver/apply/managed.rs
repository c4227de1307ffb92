//! `metadata.managedFields`: one entry per manager, operation and subresource
//! (and API version for updates), each holding the set of fields it owns.
//!
//! Entries written by others are read leniently: an entry that cannot be parsed
//! is dropped with a warning rather than failing the write, as it can only have
//! come from a client editing managedFields by hand.

use serde_json::{Map, Value};

use super::fieldset::FieldSet;

/// Upstream keeps at most this many `Update` entries; older ones are folded
/// into one entry named [`ANCIENT_CHANGES`].
const MAX_UPDATE_MANAGERS: usize = 10;
const ANCIENT_CHANGES: &str = "ancient-changes";

/// The kind of write that gave a manager its fields. `Apply` sorts first, as
/// upstream lists entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// Who owns a set of fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Owner {
    pub(super) manager: String,
    pub(super) operation: Operation,
    pub(super) api_version: String,
    /// `""` for the main resource.
    pub(super) subresource: String,
}

impl Owner {
    /// Whether `self` and `other` are the same entry. An applier is one entry
    /// whatever API version it applies with; an updater is one per version.
    fn same_as(&self, other: &Owner) -> bool {
        self.manager == other.manager
            && self.operation == other.operation
            && self.subresource == other.subresource
            && (self.operation == Operation::Apply || self.api_version == other.api_version)
    }

    /// How upstream names an owner in conflict messages:
    /// `"kubectl"` for an applier, `"kube-controller-manager" using apps/v1` for
    /// an updater, with `with subresource "scale"` when it wrote a subresource.
    pub(super) fn describe(&self) -> String {
        let mut text = quote(&self.manager);
        if !self.subresource.is_empty() {
            text.push_str(&format!(" with subresource {}", quote(&self.subresource)));
        }
        if self.operation == Operation::Update {
            text.push_str(&format!(" using {}", self.api_version));
        }
        text
    }

    /// Order of entries in conflict messages (upstream sorts by identifier).
    pub(super) fn sort_key(&self) -> (&str, Operation, &str, &str) {
        (
            &self.manager,
            self.operation,
            &self.api_version,
            &self.subresource,
        )
    }
}

fn quote(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

/// One managedFields entry.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) owner: Owner,
    /// RFC 3339, as written; `None` when the entry had none.
    pub(super) time: Option<String>,
    pub(super) fields: FieldSet,
}

/// All entries of one object.
#[derive(Clone, Debug, Default)]
pub(super) struct Managed {
    pub(super) entries: Vec<Entry>,
}

impl Managed {
    /// Reads the entries of a stored object, dropping those that do not parse.
    pub(super) fn decode(list: Option<&Value>) -> Managed {
        let mut managed = Managed::default();
        let Some(Value::Array(items)) = list else {
            return managed;
        };
        for item in items {
            match decode_entry(item) {
                Ok(entry) => managed.add(entry),
                Err(e) => tracing::warn!(error = %e, "dropping an unreadable managedFields entry"),
            }
        }
        managed
    }

    /// Reads entries a client sent; any that does not parse makes the list
    /// unusable, and the caller falls back to the stored one.
    pub(super) fn try_decode(list: &Value) -> Result<Managed, String> {
        let Value::Array(items) = list else {
            return Err("metadata.managedFields must be a list".to_owned());
        };
        let mut managed = Managed::default();
        for item in items {
            managed.add(decode_entry(item)?);
        }
        Ok(managed)
    }

    /// Adds an entry; two entries of one owner become one.
    fn add(&mut self, entry: Entry) {
        match self
            .entries
            .iter_mut()
            .find(|e| e.owner.same_as(&entry.owner))
        {
            Some(existing) => {
                existing.fields.union_with(&entry.fields);
                if time_key(entry.time.as_deref()) > time_key(existing.time.as_deref()) {
                    existing.time = entry.time;
                }
            }
            None => self.entries.push(entry),
        }
    }

    /// Removes and returns the entry of `owner`.
    pub(super) fn take(&mut self, owner: &Owner) -> Option<Entry> {
        let at = self.entries.iter().position(|e| e.owner.same_as(owner))?;
        Some(self.entries.remove(at))
    }

    pub(super) fn push(&mut self, entry: Entry) {
        self.add(entry);
    }

    /// The list to store: entries that own nothing dropped, old updaters folded
    /// together, sorted as upstream sorts them. `None` when nothing is left.
    pub(super) fn encode(mut self) -> Option<Value> {
        self.entries.retain(|e| !e.fields.is_empty());
        self.cap_updaters();
        if self.entries.is_empty() {
            return None;
        }
        self.entries.sort_by(|a, b| {
            (a.owner.operation, time_key(a.time.as_deref()))
                .cmp(&(b.owner.operation, time_key(b.time.as_deref())))
                .then_with(|| a.owner.manager.cmp(&b.owner.manager))
                .then_with(|| a.owner.api_version.cmp(&b.owner.api_version))
                .then_with(|| a.owner.subresource.cmp(&b.owner.subresource))
        });
        Some(Value::Array(
            self.entries.iter().map(encode_entry).collect(),
        ))
    }

    /// Folds the oldest `Update` entries into [`ANCIENT_CHANGES`] (one per API
    /// version) until at most [`MAX_UPDATE_MANAGERS`] remain, so that an object
    /// written by many clients does not grow without bound.
    fn cap_updaters(&mut self) {
        let mut updaters: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].owner.operation == Operation::Update)
            .collect();
        if updaters.len() <= MAX_UPDATE_MANAGERS {
            return;
        }
        updaters.sort_by_key(|&i| time_key(self.entries[i].time.as_deref()));
        let excess = updaters.len() - MAX_UPDATE_MANAGERS + 1;
        let mut folded: Vec<usize> = updaters.into_iter().take(excess).collect();
        folded.sort_unstable();
        let mut buckets = Managed::default();
        for &i in folded.iter().rev() {
            let old = self.entries.remove(i);
            buckets.add(Entry {
                owner: Owner {
                    manager: ANCIENT_CHANGES.to_owned(),
                    operation: Operation::Update,
                    api_version: old.owner.api_version,
                    subresource: String::new(),
                },
                time: old.time,
                fields: old.fields,
            });
        }
        for bucket in buckets.entries {
            self.add(bucket);
        }
    }
}

/// Seconds since the epoch of an RFC 3339 time, for ordering; entries without a
/// readable time sort first, as upstream's zero time does.
fn time_key(time: Option<&str>) -> i64 {
    time.and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map_or(i64::MIN, |t| t.as_second())
}

fn decode_entry(item: &Value) -> Result<Entry, String> {
    let Value::Object(fields) = item else {
        return Err("a managedFields entry must be an object".to_owned());
    };
    let text = |name: &str| -> Result<String, String> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(text)) => Ok(text.clone()),
            Some(_) => Err(format!("managedFields {name} must be a string")),
        }
    };
    let operation = match text("operation")?.as_str() {
        "Apply" => Operation::Apply,
        "Update" => Operation::Update,
        other => return Err(format!("unknown managedFields operation {other:?}")),
    };
    let fields_type = text("fieldsType")?;
    if !fields_type.is_empty() && fields_type != "FieldsV1" {
        return Err(format!("unknown managedFields fieldsType {fields_type:?}"));
    }
    let set = match fields.get("fieldsV1") {
        None | Some(Value::Null) => FieldSet::default(),
        Some(value) => FieldSet::from_fields_v1(value)?,
    };
    let time = text("time")?;
    Ok(Entry {
        owner: Owner {
            manager: text("manager")?,
            operation,
            api_version: text("apiVersion")?,
            subresource: text("subresource")?,
        },
        time: (!time.is_empty()).then_some(time),
        fields: set,
    })
}

fn encode_entry(entry: &Entry) -> Value {
    entry_json(
        &entry.owner,
        entry.time.as_deref(),
        entry.fields.to_fields_v1(),
    )
}

/// One managedFields entry: `owner`'s, written at `time`, owning `fields_v1`.
pub(super) fn entry_json(owner: &Owner, time: Option<&str>, fields_v1: Value) -> Value {
    let mut out = Map::new();
    out.insert("manager".into(), Value::String(owner.manager.clone()));
    out.insert(
        "operation".into(),
        Value::String(owner.operation.as_str().to_owned()),
    );
    out.insert(
        "apiVersion".into(),
        Value::String(owner.api_version.clone()),
    );
    if let Some(time) = time {
        out.insert("time".into(), Value::String(time.to_owned()));
    }
    out.insert("fieldsType".into(), Value::String("FieldsV1".to_owned()));
    out.insert("fieldsV1".into(), fields_v1);
    if !owner.subresource.is_empty() {
        out.insert(
            "subresource".into(),
            Value::String(owner.subresource.clone()),
        );
    }
    Value::Object(out)
}
