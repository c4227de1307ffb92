//! How list items are named in paths, and the canonical JSON those names use.
//!
//! An item of an associative list is named by its key fields, an item of a set
//! by its value. Names must not depend on how a client spelled a number or
//! ordered an object's fields, so they are canonical JSON: object fields sorted,
//! no spaces, integral floats written as integers.

use std::fmt::Write as _;

use serde_json::{Number, Value};

use super::MAX_DEPTH;
use super::fieldset::PathElement;

/// Key fields that may be left out of an item because the schema defaults them
/// (`protocol` of container and service ports is `TCP`). Upstream names such an
/// item with the default filled in.
fn key_default(field: &str) -> Option<Value> {
    match field {
        "protocol" => Some(Value::String("TCP".to_owned())),
        _ => None,
    }
}

/// The path element naming `item` of an associative list keyed by `keys`.
pub(super) fn key_element(keys: &[&str], item: &Value) -> Result<PathElement, String> {
    let Value::Object(fields) = item else {
        return Err("associative list items must be objects".to_owned());
    };
    let mut sorted: Vec<(&str, Value)> = Vec::with_capacity(keys.len());
    for &key in keys {
        let value = match fields.get(key) {
            Some(value) if !value.is_null() => value.clone(),
            _ => key_default(key).ok_or_else(|| {
                format!(
                    "associative list with keys has an element that omits key field {key:?} \
                     (and doesn't have default value)"
                )
            })?,
        };
        if value.is_object() || value.is_array() {
            return Err(format!("key field {key:?} must be a scalar"));
        }
        sorted.push((key, value));
    }
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut text = String::from("{");
    for (index, (key, value)) in sorted.iter().enumerate() {
        if index > 0 {
            text.push(',');
        }
        text.push_str(&quote(key));
        text.push(':');
        write_canonical(&mut text, value, 0);
    }
    text.push('}');
    Ok(PathElement::Key(text))
}

/// The path element naming `item` of a set.
pub(super) fn value_element(item: &Value) -> Result<PathElement, String> {
    if item.is_object() || item.is_array() {
        return Err("set items must be scalars".to_owned());
    }
    Ok(PathElement::Value(canonical_json(item)))
}

/// Canonical compact JSON of `value`.
pub(super) fn canonical_json(value: &Value) -> String {
    let mut text = String::new();
    write_canonical(&mut text, value, 0);
    text
}

fn write_canonical(out: &mut String, value: &Value, depth: usize) {
    match value {
        // Beyond the depth bound the plain spelling is canonical enough: nothing
        // that deep is a key.
        _ if depth > MAX_DEPTH => out.push_str(&value.to_string()),
        Value::Number(number) => out.push_str(&canonical_number(number)),
        Value::String(text) => out.push_str(&quote(text)),
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(out, item, depth + 1);
            }
            out.push(']');
        }
        Value::Object(fields) => {
            let mut names: Vec<&String> = fields.keys().collect();
            names.sort();
            out.push('{');
            for (index, name) in names.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&quote(name));
                out.push(':');
                if let Some(field) = fields.get(name) {
                    write_canonical(out, field, depth + 1);
                }
            }
            out.push('}');
        }
        Value::Null | Value::Bool(_) => {
            let _ = write!(out, "{value}");
        }
    }
}

fn quote(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

/// Integers print exactly; a float with an integral value prints as that integer.
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

/// A scalar as upstream prints it inside a path: strings quoted, the rest bare.
pub(super) fn display_json(value: &Value) -> String {
    match value {
        Value::Number(number) => canonical_number(number),
        other => other.to_string(),
    }
}

/// JSON equality in which numbers compare by value (`80` equals `80.0`).
pub(super) fn json_equal(a: &Value, b: &Value) -> bool {
    equal_at(a, b, 0)
}

fn equal_at(a: &Value, b: &Value, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return a == b;
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || canonical_number(x) == canonical_number(y)
        }
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| equal_at(x, y, depth + 1))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(name, x)| ys.get(name).is_some_and(|y| equal_at(x, y, depth + 1)))
        }
        _ => a == b,
    }
}
