//! Server-side apply: field ownership (`metadata.managedFields`), conflicts, and
//! the merge of applied configurations, as upstream's structured-merge-diff
//! does them.
//!
//! Every write records who set which fields:
//!
//! - [`apply`] (`PATCH` with `application/apply-patch+yaml`): the configuration's
//!   fields become exactly its manager's `Apply` set. Values are merged into the
//!   live object; a field another manager owns and whose value would change is
//!   a conflict unless `force`; a field the manager applied before and left out
//!   now is removed unless someone else owns it too.
//! - [`record_update`] and [`record_subresource_update`] (create, update, the
//!   other patches): the writer's `Update` entry gains every field the write
//!   added or changed, and every other manager loses the fields whose values
//!   changed or that were removed.
//!
//! The kind's shape (which lists are keyed by what, which maps and structs are
//! atomic) comes from the `schema` module. Server-owned fields (`status` on the main
//! resource, `metadata.uid`, `resourceVersion`, …) are never owned by anyone.
//!
//! Objects without managedFields (written before tracking, or reset by a
//! client) have fields nobody owns: applying to them never conflicts.

mod compare;
mod extract;
mod fieldset;
mod items;
mod managed;
mod merge;
mod schema;

#[cfg(test)]
mod tests;

use serde_json::{Map, Value};

use self::compare::compare;
use self::fieldset::{FieldSet, PathElement, path_string};
use self::managed::{Entry, Managed, Operation, Owner};
use self::schema::Shape;

pub use crate::apiserver::patch::TypeRef as KindRef;

/// How deeply an applied configuration may nest; walks over stored objects
/// treat anything deeper as one value.
const MAX_DEPTH: usize = 100;

/// Upstream's limit on `fieldManager`.
const MAX_MANAGER_LENGTH: usize = 128;

/// The `reason` of each cause in a conflict `Status`.
pub const CONFLICT_CAUSE: &str = "FieldManagerConflict";

/// kubectl's client-side apply annotation. kubectl's own server-side apply
/// (manager `kubectl`) may take over fields it recorded, and keeps it current.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
const KUBECTL: &str = "kubectl";

/// Server-owned metadata: never owned by a manager, and never taken from an
/// applied configuration.
const SERVER_METADATA: &[&str] = &[
    "clusterName",
    "creationTimestamp",
    "deletionGracePeriodSeconds",
    "deletionTimestamp",
    "generation",
    "managedFields",
    "resourceVersion",
    "selfLink",
    "uid",
];

/// Metadata that identifies the object rather than being managed.
const IDENTITY_METADATA: &[&str] = &["name", "namespace"];

/// Which part of an object a write may own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The main resource and subresources that write the main resource's
    /// fields (`scale`): everything but the status and server-owned metadata.
    Main,
    /// The `status` subresource: only the status.
    Status,
}

/// Why an apply was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Fields owned by other managers would change (HTTP 409, reason `Conflict`,
    /// one cause per conflict with reason [`CONFLICT_CAUSE`]).
    #[error("{}", conflict_message(.conflicts))]
    Conflict { conflicts: Vec<Conflict> },
    /// The configuration does not fit the kind's schema: an associative list
    /// item without its key, a key twice (HTTP 422).
    #[error("{0}")]
    Invalid(String),
    /// The request is malformed: not an object, managedFields set, wrong kind,
    /// too deep, a bad `fieldManager` (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
}

impl ApplyError {
    pub fn status_code(&self) -> u16 {
        match self {
            ApplyError::Conflict { .. } => 409,
            ApplyError::Invalid(_) => 422,
            ApplyError::BadRequest(_) => 400,
        }
    }

    /// The `reason` of the `Status`.
    pub fn reason(&self) -> &'static str {
        match self {
            ApplyError::Conflict { .. } => "Conflict",
            ApplyError::Invalid(_) => "Invalid",
            ApplyError::BadRequest(_) => "BadRequest",
        }
    }
}

/// One field another manager owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager's name.
    pub manager: String,
    /// The manager as upstream prints it: `"kubectl-client-side-apply" using apps/v1`.
    pub owner: String,
    /// The field, as upstream prints paths: `.spec.replicas`,
    /// `.spec.template.spec.containers[name="app"].image`.
    pub field: String,
}

impl Conflict {
    /// The `message` of this conflict's cause.
    pub fn message(&self) -> String {
        format!("conflict with {}", self.owner)
    }
}

/// Merges the applied configuration `applied` (the parsed request body) into
/// `live` and records `manager`'s ownership; `live` is `None` when the apply
/// creates the object. `now` is the RFC 3339 time of the write.
///
/// The result carries `live`'s status and server-owned metadata, whatever the
/// configuration says; the caller still defaults, validates and stores it, and
/// checks `metadata.name` and `resourceVersion` preconditions against
/// `applied`. An apply that changes nothing returns `live` unchanged.
pub fn apply(
    kind: KindRef<'_>,
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, ApplyError> {
    validate_manager(manager, true)?;
    let shape = schema::root(kind);
    let config = configuration(kind, live, applied)?;
    let api_version = string_at(&config, "apiVersion").to_owned();
    let applied_set =
        extract::applied_fields(&tracked(&config, Scope::Main), shape).map_err(|e| {
            ApplyError::Invalid(format!(
                "failed to create typed patch object ({}): {e}",
                describe_object(&config, kind)
            ))
        })?;
    let me = Owner {
        manager: manager.to_owned(),
        operation: Operation::Apply,
        api_version: api_version.clone(),
        subresource: String::new(),
    };

    let Some(live) = live else {
        let mut created = config;
        let mut managed = Managed::default();
        managed.push(Entry {
            owner: me,
            time: Some(now.to_owned()),
            fields: applied_set,
        });
        set_managed_fields(&mut created, managed.encode());
        return Ok(created);
    };

    let mut managed = Managed::decode(managed_fields(live));
    let mut live_body = live.clone();
    set_managed_fields(&mut live_body, None);
    let previous = managed.take(&me);

    let mut merged = merge::merge(&live_body, &config, shape);
    if let Some(previous) = &previous {
        let mut last = previous.fields.clone();
        untrack(&mut last);
        let mut owned = applied_set.clone();
        for entry in &managed.entries {
            owned.union_with(&entry.fields);
        }
        merge::prune(&mut merged, shape, &last, &owned);
    }

    let live_view = tracked(&live_body, Scope::Main);
    let comparison = compare(&live_view, &tracked(&merged, Scope::Main), shape);
    settle_conflicts(
        &mut managed,
        &comparison,
        force,
        manager,
        &live_body,
        &live_view,
        shape,
    )?;

    let object_changed = !items::json_equal(&live_body, &merged);
    let time = match previous {
        Some(previous) if !object_changed => previous.time,
        _ => Some(now.to_owned()),
    };
    managed.push(Entry {
        owner: me,
        time,
        fields: applied_set,
    });
    if manager == KUBECTL {
        refresh_last_applied(&mut merged, applied);
    }
    set_managed_fields(&mut merged, managed.encode());
    Ok(merged)
}

/// Records a create (`old` is `None`), update or non-apply patch of the main
/// resource by `manager` in `new`'s managedFields.
///
/// `new` is the object about to be stored. managedFields it carries replace the
/// stored ones when they parse (clients may edit them); a single empty entry
/// (`[{}]`) clears them. Without any, `old`'s are kept.
pub fn record_update(
    kind: KindRef<'_>,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    now: &str,
) {
    record(kind, "", old, new, manager, now);
}

/// Records a write of a subresource (`status`, `scale`, …) by `manager`. For
/// `status` only the status is tracked; for others (a scale writes
/// `spec.replicas` of the parent) everything but the status is. Entries carry
/// the subresource, and managedFields in `new` are ignored as upstream does.
pub fn record_subresource_update(
    kind: KindRef<'_>,
    subresource: &str,
    old: &Value,
    new: &mut Value,
    manager: &str,
    now: &str,
) {
    record(kind, subresource, Some(old), new, manager, now);
}

/// Upstream's manager name for a write without `fieldManager`: the User-Agent up
/// to its first `/` (`kubectl/v1.33.0 (linux/amd64) …` gives `kubectl`), without
/// non-printable characters, at most 128 bytes.
pub fn default_manager(user_agent: Option<&str>) -> String {
    let prefix = user_agent.unwrap_or("").split('/').next().unwrap_or("");
    let mut manager = String::new();
    for c in prefix.chars().filter(|c| is_printable(*c)) {
        if manager.len() + c.len_utf8() > MAX_MANAGER_LENGTH {
            break;
        }
        manager.push(c);
    }
    manager
}

/// Checks a `fieldManager` as upstream does: required for apply, at most 128
/// bytes, printable.
pub fn validate_manager(manager: &str, apply: bool) -> Result<(), ApplyError> {
    if apply && manager.is_empty() {
        return Err(ApplyError::BadRequest(
            "fieldManager: Required value: is required for apply patch".to_owned(),
        ));
    }
    if manager.len() > MAX_MANAGER_LENGTH {
        return Err(ApplyError::BadRequest(format!(
            "fieldManager: Too long: may not be more than {MAX_MANAGER_LENGTH} bytes"
        )));
    }
    if !manager.chars().all(is_printable) {
        return Err(ApplyError::BadRequest(format!(
            "fieldManager: Invalid value: {}: may not contain non-printable characters",
            Value::String(manager.to_owned())
        )));
    }
    Ok(())
}

fn is_printable(c: char) -> bool {
    c == ' ' || !(c.is_control() || c.is_whitespace())
}

/// Records an `Update` of `subresource` (`""` for the main resource): the
/// writer gains what it added or changed, everyone loses what it changed or
/// removed.
fn record(
    kind: KindRef<'_>,
    subresource: &str,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    now: &str,
) {
    if !new.is_object() {
        return;
    }
    let scope = if subresource == "status" {
        Scope::Status
    } else {
        Scope::Main
    };
    let shape = schema::root(kind);
    let mut managed = chosen_managed_fields(subresource, old, new);
    set_managed_fields(new, None);
    let api_version = match string_at(new, "apiVersion") {
        "" => old.map_or("", |old| string_at(old, "apiVersion")),
        version => version,
    };
    let me = Owner {
        manager: manager.to_owned(),
        operation: Operation::Update,
        api_version: api_version.to_owned(),
        subresource: subresource.to_owned(),
    };
    // The tracked part leaves managedFields out, so `old` needs no copy
    // without them, nor does either object need one for its tracked part.
    let keep = move |parent: &[PathElement], name: &str| is_tracked(scope, parent, name);
    let skeleton;
    let before = match old {
        Some(old) => old,
        // A create whose client sent no managedFields: the writer is the
        // only owner, of everything it set.
        None if managed.entries.is_empty() => {
            let fields = compare::changed_fields_v1(&schema::skeleton(kind), new, shape, &keep);
            let entry = (!fields.is_empty())
                .then(|| managed::entry_json(&me, Some(now), Value::Object(fields)));
            set_managed_fields(new, entry.map(|entry| Value::Array(vec![entry])));
            return;
        }
        None => {
            skeleton = schema::skeleton(kind);
            &skeleton
        }
    };
    let compare::Comparison {
        added: mut changed,
        modified,
        removed,
    } = compare::compare_where(before, new, shape, &keep);
    changed.union_with(&modified);
    let previous = managed.take(&me);
    for entry in &mut managed.entries {
        entry.fields.remove_all(&changed);
        entry.fields.remove_all(&removed);
    }
    let (fields, time) = match previous {
        Some(mut previous) => {
            previous.fields.remove_all(&removed);
            if changed.is_empty() {
                (previous.fields, previous.time)
            } else {
                previous.fields.union_with(&changed);
                (previous.fields, Some(now.to_owned()))
            }
        }
        // A first write owns what it set (nothing was there to remove);
        // only a write that set something has a time.
        None if changed.is_empty() => (FieldSet::default(), None),
        None => (changed, Some(now.to_owned())),
    };
    managed.push(Entry {
        owner: me,
        time,
        fields,
    });
    set_managed_fields(new, managed.encode());
}

/// Checks the fields this apply changes against the other managers' sets and,
/// unless refused, moves them to the applier: other managers lose the fields
/// whose values change and the fields that are removed.
fn settle_conflicts(
    managed: &mut Managed,
    comparison: &compare::Comparison,
    force: bool,
    manager: &str,
    live_body: &Value,
    live_view: &Value,
    shape: Shape,
) -> Result<(), ApplyError> {
    let changed = comparison.changed();
    let conflicts: Vec<(usize, FieldSet)> = managed
        .entries
        .iter()
        .enumerate()
        .map(|(at, entry)| (at, entry.fields.intersection(&changed)))
        .filter(|(_, common)| !common.is_empty())
        .collect();
    if !force && !conflicts.is_empty() {
        let mut refused = conflicts.clone();
        if manager == KUBECTL
            && let Some(allowed) = allowed_by_last_applied(live_body, live_view, shape)
        {
            // Fields kubectl's client-side apply recorded with their live values
            // are being upgraded to server-side apply, not taken from someone:
            // those conflicts are resolved as if forced.
            for (_, common) in &mut refused {
                common.remove_all(&allowed);
            }
            refused.retain(|(_, common)| !common.is_empty());
        }
        if !refused.is_empty() {
            return Err(conflict_error(managed, &refused));
        }
    }
    for (at, common) in &conflicts {
        if let Some(entry) = managed.entries.get_mut(*at) {
            entry.fields.remove_all(common);
        }
    }
    for entry in &mut managed.entries {
        entry.fields.remove_all(&comparison.removed);
    }
    Ok(())
}

/// The entries an update starts from: the client's, when it sent a readable
/// non-empty list (or `[{}]` to clear them), else the stored ones.
/// Subresource writes cannot change managedFields.
fn chosen_managed_fields(subresource: &str, old: Option<&Value>, new: &Value) -> Managed {
    let stored = || Managed::decode(old.and_then(managed_fields));
    if !subresource.is_empty() {
        return stored();
    }
    match managed_fields(new) {
        Some(Value::Array(entries))
            if entries.len() == 1 && entries[0].as_object().is_some_and(Map::is_empty) =>
        {
            Managed::default()
        }
        Some(sent) => match Managed::try_decode(sent) {
            Ok(managed) if !managed.entries.is_empty() => managed,
            _ => stored(),
        },
        None => stored(),
    }
}

/// Checks and cleans an applied configuration: an object of the right kind
/// without managedFields; `null`s dropped (they set nothing), status and
/// server-owned metadata dropped (apply does not write them).
fn configuration(
    kind: KindRef<'_>,
    live: Option<&Value>,
    applied: &Value,
) -> Result<Value, ApplyError> {
    if !applied.is_object() {
        return Err(ApplyError::BadRequest(
            "the apply patch must be an object".to_owned(),
        ));
    }
    if depth_exceeds(applied, MAX_DEPTH) {
        return Err(ApplyError::BadRequest(format!(
            "the apply patch is nested more than {MAX_DEPTH} levels deep"
        )));
    }
    if applied
        .pointer("/metadata/managedFields")
        .is_some_and(|v| !v.is_null())
    {
        return Err(ApplyError::BadRequest(
            "metadata.managedFields must be nil".to_owned(),
        ));
    }
    let version = string_at(applied, "apiVersion");
    let expected_version = live.map(|live| string_at(live, "apiVersion"));
    let group_matches = match version.rsplit_once('/') {
        Some((group, _)) => group == kind.group,
        None => !version.is_empty() && (kind.group.is_empty() || kind.group == "core"),
    };
    if !group_matches || expected_version.is_some_and(|v| !v.is_empty() && v != version) {
        let expected = match expected_version {
            Some(v) if !v.is_empty() => v.to_owned(),
            _ if kind.group.is_empty() || kind.group == "core" => "v1".to_owned(),
            _ => format!("{}/<version>", kind.group),
        };
        return Err(ApplyError::BadRequest(format!(
            "Incorrect version specified in apply patch. Specified patch version: {version}, expected: {expected}"
        )));
    }
    let specified_kind = string_at(applied, "kind");
    if specified_kind != kind.kind {
        return Err(ApplyError::BadRequest(format!(
            "Incorrect kind specified in apply patch. Specified patch kind: {specified_kind}, expected: {}",
            kind.kind
        )));
    }
    let mut config = applied.clone();
    drop_nulls(&mut config);
    if let Value::Object(fields) = &mut config {
        fields.remove("status");
        if let Some(Value::Object(meta)) = fields.get_mut("metadata") {
            for name in SERVER_METADATA {
                meta.remove(*name);
            }
        }
    }
    Ok(config)
}

/// Whether the field `name` under `parent` is in the part of an object a
/// write in `scope` may own (see [`tracked`]).
fn is_tracked(scope: Scope, parent: &[PathElement], name: &str) -> bool {
    match parent {
        [] => match scope {
            Scope::Status => name == "status",
            Scope::Main => !matches!(name, "apiVersion" | "kind" | "status"),
        },
        [PathElement::Field(field)] if field == "metadata" => !SERVER_METADATA
            .iter()
            .chain(IDENTITY_METADATA)
            .any(|server| *server == name),
        _ => true,
    }
}

/// The part of `object` a write in `scope` may own. Fields outside it are
/// neither compared nor owned.
fn tracked(object: &Value, scope: Scope) -> Value {
    let Value::Object(fields) = object else {
        return Value::Object(Map::new());
    };
    let metadata = [PathElement::Field("metadata".to_owned())];
    let mut view = Map::new();
    for (name, value) in fields
        .iter()
        .filter(|(name, _)| is_tracked(scope, &[], name))
    {
        let value = match value {
            Value::Object(meta) if name == "metadata" => Value::Object(
                meta.iter()
                    .filter(|(name, _)| is_tracked(scope, &metadata, name))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect(),
            ),
            value => value.clone(),
        };
        view.insert(name.clone(), value);
    }
    Value::Object(view)
}

/// Drops from an applier's set what [`tracked`] leaves out of the main
/// resource, so that a hand-edited entry cannot make apply prune the status or
/// the object's name.
fn untrack(set: &mut FieldSet) {
    let field = |name: &str| PathElement::Field(name.to_owned());
    for name in ["apiVersion", "kind", "status"] {
        set.remove_subtree(&[field(name)]);
    }
    for name in SERVER_METADATA.iter().chain(IDENTITY_METADATA) {
        set.remove_subtree(&[field("metadata"), field(name)]);
    }
}

/// Fields recorded in kubectl's last-applied annotation whose values are still
/// live: kubectl may take them over from client-side apply without conflict.
fn allowed_by_last_applied(live: &Value, live_view: &Value, shape: Shape) -> Option<FieldSet> {
    let text = live
        .pointer("/metadata/annotations")?
        .get(LAST_APPLIED)?
        .as_str()?;
    let mut last_applied: Value = serde_json::from_str(text).ok()?;
    if !last_applied.is_object() || depth_exceeds(&last_applied, MAX_DEPTH) {
        return None;
    }
    drop_nulls(&mut last_applied);
    let view = tracked(&last_applied, Scope::Main);
    let mut allowed = extract::applied_fields(&view, shape).ok()?;
    allowed.remove_all(&compare(&view, live_view, shape).modified);
    Some(allowed)
}

/// kubectl's server-side apply keeps an existing last-applied annotation equal
/// to what it applied, so a later client-side apply diffs against the truth.
fn refresh_last_applied(object: &mut Value, applied: &Value) {
    let Some(Value::Object(annotations)) = object.pointer_mut("/metadata/annotations") else {
        return;
    };
    let present = annotations
        .get(LAST_APPLIED)
        .and_then(Value::as_str)
        .is_some_and(|text| !text.is_empty());
    if !present {
        return;
    }
    let mut recorded = applied.clone();
    if let Some(Value::Object(theirs)) = recorded.pointer_mut("/metadata/annotations") {
        theirs.remove(LAST_APPLIED);
    }
    // kubectl writes the annotation as one line of JSON with a newline.
    annotations.insert(
        LAST_APPLIED.to_owned(),
        Value::String(format!("{recorded}\n")),
    );
}

fn conflict_error(managed: &Managed, conflicts: &[(usize, FieldSet)]) -> ApplyError {
    let mut by_owner: Vec<(&Owner, &FieldSet)> = conflicts
        .iter()
        .filter_map(|(at, set)| managed.entries.get(*at).map(|e| (&e.owner, set)))
        .collect();
    by_owner.sort_by(|a, b| a.0.sort_key().cmp(&b.0.sort_key()));
    let conflicts = by_owner
        .into_iter()
        .flat_map(|(owner, set)| {
            set.paths().into_iter().map(move |path| Conflict {
                manager: owner.manager.clone(),
                owner: owner.describe(),
                field: path_string(&path),
            })
        })
        .collect();
    ApplyError::Conflict { conflicts }
}

/// Upstream's message: one conflict inline, several grouped by manager.
fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [one] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            one.owner, one.field
        );
    }
    let mut lines = Vec::new();
    let mut current: Option<&str> = None;
    for conflict in conflicts {
        if current != Some(conflict.owner.as_str()) {
            lines.push(format!("conflicts with {}:", conflict.owner));
            current = Some(&conflict.owner);
        }
        lines.push(format!("- {}", conflict.field));
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

/// `namespace/name; apps/v1, Kind=Deployment`, as upstream names the object in
/// apply errors.
fn describe_object(config: &Value, kind: KindRef<'_>) -> String {
    let name = config
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let namespaced = match config
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_owned(),
    };
    format!(
        "{namespaced}; {}, Kind={}",
        string_at(config, "apiVersion"),
        kind.kind
    )
}

fn managed_fields(object: &Value) -> Option<&Value> {
    object
        .pointer("/metadata/managedFields")
        .filter(|v| !v.is_null())
}

/// Stores `entries` as `metadata.managedFields`, or removes the field for `None`.
fn set_managed_fields(object: &mut Value, entries: Option<Value>) {
    let Value::Object(fields) = object else {
        return;
    };
    match entries {
        Some(entries) => {
            let meta = fields
                .entry("metadata")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(meta) = meta {
                meta.insert("managedFields".to_owned(), entries);
            }
        }
        None => {
            if let Some(Value::Object(meta)) = fields.get_mut("metadata") {
                meta.remove("managedFields");
            }
        }
    }
}

fn string_at<'v>(object: &'v Value, field: &str) -> &'v str {
    object.get(field).and_then(Value::as_str).unwrap_or("")
}

/// Removes fields whose value is `null`, at every depth.
fn drop_nulls(value: &mut Value) {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Object(fields) => {
                fields.retain(|_, v| !v.is_null());
                pending.extend(fields.values_mut());
            }
            Value::Array(entries) => pending.extend(entries.iter_mut()),
            _ => {}
        }
    }
}

/// Whether `value` nests deeper than `limit`. Iterative, so a hostile body
/// cannot exhaust the stack here.
fn depth_exceeds(value: &Value, limit: usize) -> bool {
    let mut pending = vec![(value, 0usize)];
    while let Some((value, depth)) = pending.pop() {
        if depth > limit {
            return true;
        }
        match value {
            Value::Array(entries) => pending.extend(entries.iter().map(|v| (v, depth + 1))),
            Value::Object(fields) => pending.extend(fields.values().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
    false
}
