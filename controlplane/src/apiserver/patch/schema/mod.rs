//! The patch strategies of the built-in kinds, as a data table.
//!
//! Upstream reads them from Go struct tags (`patchStrategy:"merge"
//! patchMergeKey:"name"`, `patchStrategy:"retainKeys"`). Here each Go struct that
//! matters is a [`Type`]: the fields whose strategy differs from plain merging,
//! plus the structs on the way down to them. A field missing from its table is
//! patched plainly: an object merges key by key with no further strategies, a
//! list is replaced whole. That is exactly what upstream does for a field without
//! tags, so the tables only list what changes the outcome (and a few atomic lists
//! and maps, so a patch giving them the wrong JSON shape is caught early).
//!
//! Tags were checked against `k8s.io/api` (core/v1, apps/v1, batch/v1,
//! autoscaling/v2, policy/v1 `types.go`) as of Kubernetes 1.33.

mod core_v1;
mod other;
mod workloads;

use super::TypeRef;

/// A Go struct (or map) as strategic merge patch sees it.
#[derive(Debug)]
pub(crate) struct Type {
    /// The Go type name, for documentation and debugging.
    pub name: &'static str,
    /// Fields with a strategy, or leading to fields with one.
    pub fields: &'static [(&'static str, Field)],
    /// The field holding this type is tagged `retainKeys`: clients send a
    /// `$retainKeys` directive with it. Applying needs nothing more than the
    /// directive; the flag records upstream's tag.
    pub retain_keys: bool,
}

/// How one field is patched.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Field {
    /// A nested struct, merged field by field with its own table.
    Struct(&'static Type),
    /// A `map[string]T` of scalars (labels, data, resource lists): merged key by key.
    Map,
    /// A list, merged as its strategy says.
    List(List),
}

/// The strategy of a list field.
#[derive(Clone, Copy, Debug)]
pub(crate) enum List {
    /// No patch strategy: a patch replaces the whole list.
    Atomic,
    /// `patchStrategy:"merge"` on a list of scalars: a set union; items leave only
    /// through `$deleteFromPrimitiveList`.
    Set,
    /// `patchStrategy:"merge" patchMergeKey:key`: items are maps matched by `key`.
    Merge {
        key: &'static str,
        item: &'static Type,
    },
}

/// An object with no strategies anywhere below it.
pub(crate) static PLAIN: Type = Type::new("object", &[]);

/// Kinds without a table of their own still carry standard object metadata.
static GENERIC_OBJECT: Type = Type::new(
    "object",
    &[("metadata", Field::Struct(&core_v1::OBJECT_META))],
);

impl Type {
    pub(crate) const fn new(name: &'static str, fields: &'static [(&'static str, Field)]) -> Type {
        Type {
            name,
            fields,
            retain_keys: false,
        }
    }

    /// A type whose field carries `patchStrategy:"retainKeys"`.
    pub(crate) const fn retaining_keys(
        name: &'static str,
        fields: &'static [(&'static str, Field)],
    ) -> Type {
        Type {
            name,
            fields,
            retain_keys: true,
        }
    }

    /// The strategy of field `name`, if it has one.
    pub(crate) fn field(&self, name: &str) -> Option<Field> {
        self.fields
            .iter()
            .find(|(field, _)| *field == name)
            .map(|(_, field)| *field)
    }
}

impl Field {
    /// Whether the field holds a JSON list (as opposed to an object).
    pub(crate) fn is_list(self) -> bool {
        matches!(self, Field::List(_))
    }

    /// The table for the object held by `field`; plain if the field is unknown.
    pub(crate) fn object_type(field: Option<Field>) -> &'static Type {
        match field {
            Some(Field::Struct(ty)) => ty,
            _ => &PLAIN,
        }
    }

    /// The strategy for the list held by `field`; atomic if the field is unknown.
    pub(crate) fn list_strategy(field: Option<Field>) -> List {
        match field {
            Some(Field::List(list)) => list,
            _ => List::Atomic,
        }
    }
}

/// Shorthand for the tables: a list merged by `key`.
pub(crate) const fn merge_by(key: &'static str, item: &'static Type) -> Field {
    Field::List(List::Merge { key, item })
}

/// Shorthand for the tables: a list without a strategy.
pub(crate) const ATOMIC: Field = Field::List(List::Atomic);

/// The table for the top level of an object of kind `target`.
pub(crate) fn root(target: TypeRef<'_>) -> &'static Type {
    core_v1::root(target.kind)
        .filter(|_| target.group.is_empty() || target.group == "core")
        .or_else(|| workloads::root(target.group, target.kind))
        .or_else(|| other::root(target.group, target.kind))
        .unwrap_or(&GENERIC_OBJECT)
}
