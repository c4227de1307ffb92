//! Validation shared by every kind: names, labels, annotations, metadata,
//! and fields the typed structs do not know. Kind-specific rules live in
//! [`super::strategy`].

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::status::Cause;

/// Which rule a kind's names follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// RFC 1123 subdomain: lower-case alphanumerics, '-' and '.', ≤ 253.
    Subdomain,
    /// RFC 1123 label: lower-case alphanumerics and '-', ≤ 63.
    Label,
    /// RFC 1035 label: as Label but starting with a letter (Services).
    Label1035,
    /// Any name usable in a path segment (e.g. RBAC roles).
    PathSegment,
}

pub fn check_name(rule: NameRule, name: &str) -> Option<String> {
    match rule {
        NameRule::Subdomain => dns1123_subdomain(name),
        NameRule::Label => dns1123_label(name),
        NameRule::Label1035 => dns1035_label(name),
        NameRule::PathSegment => {
            if name.contains('/') || name.contains('%') || name == "." || name == ".." {
                Some("may not contain '/' or '%' and may not be '.' or '..'".into())
            } else {
                None
            }
        }
    }
}

pub fn dns1123_label(value: &str) -> Option<String> {
    if value.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    if !is_label(value) {
        return Some("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into());
    }
    None
}

pub fn dns1035_label(value: &str) -> Option<String> {
    if value.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    if !is_label(value) || !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Some("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')".into());
    }
    None
}

pub fn dns1123_subdomain(value: &str) -> Option<String> {
    if value.len() > 253 {
        return Some("must be no more than 253 characters".into());
    }
    if value.is_empty() || !value.split('.').all(is_label) {
        return Some("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into());
    }
    None
}

fn is_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A label or annotation key: `[prefix/]name`, prefix a DNS subdomain,
/// name ≤ 63 of alphanumerics, '-', '_', '.', alphanumeric at both ends.
pub fn qualified_name(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && let Some(problem) = dns1123_subdomain(prefix)
    {
        return Some(format!("prefix part {problem}"));
    }
    if name.is_empty() || name.len() > 63 || !is_label_value(name) {
        return Some("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".into());
    }
    None
}

/// A label value: empty, or ≤ 63 of alphanumerics, '-', '_', '.',
/// alphanumeric at both ends.
pub fn label_value(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    if value.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    if !is_label_value(value) {
        return Some("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".into());
    }
    None
}

fn is_label_value(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Upstream's limit on all annotations of one object together.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// Checks `metadata`: name, labels, annotations, finalizers.
pub fn check_metadata(meta: &Map<String, Value>, rule: NameRule, causes: &mut Vec<Cause>) {
    match meta.get("name").and_then(Value::as_str) {
        None | Some("") => causes.push(Cause::required("metadata.name")),
        Some(name) => {
            if let Some(problem) = check_name(rule, name) {
                causes.push(Cause::invalid("metadata.name", name, problem));
            }
        }
    }
    if let Some(Value::Object(labels)) = meta.get("labels") {
        for (key, value) in labels {
            if let Some(problem) = qualified_name(key) {
                causes.push(Cause::invalid("metadata.labels", key, problem));
            }
            let value = value.as_str().unwrap_or_default();
            if let Some(problem) = label_value(value) {
                causes.push(Cause::invalid(
                    format!("metadata.labels.{key}"),
                    value,
                    problem,
                ));
            }
        }
    }
    if let Some(Value::Object(annotations)) = meta.get("annotations") {
        let mut total = 0;
        for (key, value) in annotations {
            if let Some(problem) = qualified_name(&key.to_ascii_lowercase()) {
                causes.push(Cause::invalid("metadata.annotations", key, problem));
            }
            total += key.len() + value.as_str().map_or(0, str::len);
        }
        if total > ANNOTATIONS_MAX_BYTES {
            causes.push(Cause {
                reason: "FieldValueTooLong",
                message: format!("Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes"),
                field: "metadata.annotations".into(),
            });
        }
    }
    if let Some(Value::Array(finalizers)) = meta.get("finalizers") {
        for (i, f) in finalizers.iter().enumerate() {
            let f = f.as_str().unwrap_or_default();
            if let Some(problem) = qualified_name(f) {
                causes.push(Cause::invalid(
                    format!("metadata.finalizers[{i}]"),
                    f,
                    problem,
                ));
            }
        }
    }
}

/// The field of `original` at `ignored` (where a typed decode skipped a
/// field it does not know), as upstream names it:
/// `spec.containers[0].bogus`. `None` for an explicit null or an empty
/// object, which clients send for fields they leave unset.
pub fn unknown_field(original: &Value, ignored: &serde_ignored::Path<'_>) -> Option<String> {
    let mut steps = Vec::new();
    let mut at = ignored;
    loop {
        at = match at {
            serde_ignored::Path::Root => break,
            serde_ignored::Path::Seq { parent, index } => {
                steps.push(Step::Index(*index));
                parent
            }
            serde_ignored::Path::Map { parent, key } => {
                steps.push(Step::Field(key));
                parent
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => parent,
        };
    }
    let mut value = original;
    let mut name = String::new();
    for step in steps.iter().rev() {
        value = match step {
            Step::Field(key) => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(key);
                value.get(key)?
            }
            Step::Index(index) => {
                let _ = write!(name, "[{index}]");
                value.get(index)?
            }
        };
    }
    let unset = value.is_null() || matches!(value, Value::Object(m) if m.is_empty());
    (!unset).then_some(name)
}

enum Step<'p> {
    Field(&'p str),
    Index(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        assert!(dns1123_subdomain("web-1.example").is_none());
        assert!(dns1123_subdomain("Web").is_some());
        assert!(dns1123_subdomain("a..b").is_some());
        assert!(dns1123_label("a.b").is_some());
        assert!(dns1035_label("1abc").is_some());
        assert!(dns1035_label("abc-1").is_none());
        assert!(qualified_name("app.kubernetes.io/name").is_none());
        assert!(qualified_name("-bad").is_some());
        assert!(label_value("").is_none());
        assert!(label_value("v1.2_x").is_none());
        assert!(label_value("has space").is_some());
    }

    #[test]
    fn finds_unknown_fields() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Spec {
            replicas: Option<i32>,
            template: Option<std::collections::BTreeMap<String, Value>>,
            list: Option<Vec<Item>>,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Item {
            a: i32,
        }
        let original = json!({"spec": {"replicas": 1, "bogus": 2, "unset": null, "empty": {}, "list": [{"a": 1, "b": [2]}]}});
        let mut found = Vec::new();
        let _: std::collections::BTreeMap<String, Spec> =
            serde_ignored::deserialize(&original, |path| {
                found.extend(unknown_field(&original, &path));
            })
            .unwrap();
        found.sort();
        assert_eq!(found, vec!["spec.bogus", "spec.list[0].b"]);
    }
}
