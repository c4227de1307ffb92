//! How list items are told apart, in a hashable form so that merging and ordering
//! long lists stays linear rather than quadratic.

use std::collections::HashMap;

use serde_json::{Number, Value};

use super::super::schema::List;

/// What identifies an item of a list.
#[derive(Clone, Copy, Debug)]
pub(super) enum Identity {
    /// Maps, by the value of their merge key.
    Key(&'static str),
    /// Scalars (and items of lists without a strategy), by value.
    Value,
}

/// An item's identity in hashable form. Two keys are equal when the values are
/// equal JSON, except that numbers compare by value, so a port sent as `80.0`
/// matches `80`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct IdKey(String);

/// The position of each identity's first occurrence in a list.
pub(super) type Positions = HashMap<IdKey, usize>;

impl Identity {
    pub(super) fn of_strategy(strategy: List) -> Identity {
        match strategy {
            List::Merge { key, .. } => Identity::Key(key),
            List::Set | List::Atomic => Identity::Value,
        }
    }

    /// The identifying value of `item`; `None` for a map without its merge key.
    pub(super) fn id(self, item: &Value) -> Option<&Value> {
        match self {
            Identity::Key(key) => item.as_object().and_then(|map| map.get(key)),
            Identity::Value => Some(item),
        }
    }

    pub(super) fn key(self, item: &Value) -> Option<IdKey> {
        self.id(item).map(IdKey::of)
    }

    /// Where each identity first occurs in `items`.
    pub(super) fn positions<'v>(self, items: impl IntoIterator<Item = &'v Value>) -> Positions {
        let mut positions = Positions::new();
        for (position, item) in items.into_iter().enumerate() {
            if let Some(key) = self.key(item) {
                positions.entry(key).or_insert(position);
            }
        }
        positions
    }
}

impl IdKey {
    pub(super) fn of(value: &Value) -> IdKey {
        IdKey(match value {
            Value::Number(number) => format!("n{}", canonical_number(number)),
            Value::String(text) => format!("s{text}"),
            other => format!("j{other}"),
        })
    }
}

/// Integers print exactly; a float with an integral value prints as that
/// integer, so that it meets its integer spelling.
fn canonical_number(number: &Number) -> String {
    if let Some(integer) = number.as_i64() {
        return integer.to_string();
    }
    if let Some(integer) = number.as_u64() {
        return integer.to_string();
    }
    match number.as_f64() {
        #[allow(clippy::cast_possible_truncation)] // Exact: integral and in range.
        Some(float) if float.fract() == 0.0 && float.abs() < 9.0e18 => (float as i64).to_string(),
        _ => number.to_string(),
    }
}
