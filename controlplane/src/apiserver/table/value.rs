//! Forgiving reads from stored JSON objects.
//!
//! Objects come from users: any field may be missing, `null` or of the wrong
//! type. Printers read through [`Obj`], which yields Go's zero value (`""`,
//! `0`, `false`, empty list) wherever the data is not what the schema says,
//! so a row always renders and nothing panics.

use jiff::Timestamp;
use serde_json::Value;

/// A possibly-missing JSON value.
#[derive(Debug, Clone, Copy)]
pub(super) struct Obj<'a>(Option<&'a Value>);

/// Seconds from the Unix epoch to 0001-01-01T00:00:00Z, Go's zero
/// `time.Time`, which upstream prints as `<unknown>`.
const GO_ZERO_TIME_SECONDS: i64 = -62_135_596_800;

impl<'a> Obj<'a> {
    pub(super) fn new(value: &'a Value) -> Self {
        Self(Some(value))
    }

    /// A field of an object (with a key that may contain dots).
    pub(super) fn get(self, key: &str) -> Obj<'a> {
        Obj(self.0.and_then(|v| v.get(key)))
    }

    /// A nested field by dot-separated path, for fixed schema paths.
    pub(super) fn at(self, path: &str) -> Obj<'a> {
        path.split('.').fold(self, |o, key| o.get(key))
    }

    /// The raw value, when present and not `null`.
    pub(super) fn value(self) -> Option<&'a Value> {
        self.0.filter(|v| !v.is_null())
    }

    /// Present and not `null`: what a non-nil pointer is in Go.
    pub(super) fn is_set(self) -> bool {
        self.value().is_some()
    }

    pub(super) fn opt_str(self) -> Option<&'a str> {
        self.0.and_then(Value::as_str)
    }

    pub(super) fn str(self) -> &'a str {
        self.opt_str().unwrap_or("")
    }

    pub(super) fn opt_int(self) -> Option<i64> {
        self.0.and_then(Value::as_i64)
    }

    pub(super) fn int(self) -> i64 {
        self.opt_int().unwrap_or(0)
    }

    pub(super) fn opt_bool(self) -> Option<bool> {
        self.0.and_then(Value::as_bool)
    }

    pub(super) fn bool(self) -> bool {
        self.opt_bool().unwrap_or(false)
    }

    /// Elements of an array; nothing for anything else.
    pub(super) fn items(self) -> impl DoubleEndedIterator<Item = Obj<'a>> + ExactSizeIterator {
        self.0
            .and_then(Value::as_array)
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|v| Obj(Some(v)))
    }

    /// Entries of an object; nothing for anything else.
    pub(super) fn entries(self) -> impl Iterator<Item = (&'a str, Obj<'a>)> {
        self.0
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), Obj(Some(v))))
    }

    /// Length of an array or object (Go's `len` of a slice or map).
    pub(super) fn len(self) -> usize {
        match self.0 {
            Some(Value::Array(a)) => a.len(),
            Some(Value::Object(m)) => m.len(),
            _ => 0,
        }
    }

    /// A `metav1.Time`/`MicroTime`; `None` for Go's zero time, which is
    /// also what a missing or unparsable timestamp reads as.
    pub(super) fn time(self) -> Option<Timestamp> {
        let ts: Timestamp = self.opt_str()?.parse().ok()?;
        let zero = ts.as_second() == GO_ZERO_TIME_SECONDS && ts.subsec_nanosecond() == 0;
        (!zero).then_some(ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn zero_values_for_missing_or_mistyped() {
        let v = json!({"a": {"b": "x", "n": 3, "t": true, "l": [1, 2], "null": null}, "s": 5});
        let o = Obj::new(&v);
        assert_eq!(o.at("a.b").str(), "x");
        assert_eq!(o.at("a.n").int(), 3);
        assert!(o.at("a.t").bool());
        assert_eq!(o.at("a.l").items().len(), 2);
        assert_eq!(o.at("a.l").len(), 2);
        assert_eq!(o.get("a").len(), 5);
        assert_eq!(o.at("a.missing.deeper").str(), "");
        assert_eq!(o.get("s").str(), "");
        assert_eq!(o.at("a.b").int(), 0);
        assert_eq!(o.at("a.b").items().len(), 0);
        assert!(!o.at("a.null").is_set());
        assert!(o.at("a.n").is_set());
        assert_eq!(Obj::new(&json!("text")).at("x.y").len(), 0);
    }

    #[test]
    fn times() {
        let v = json!({"ok": "2024-05-01T10:00:00Z", "zero": "0001-01-01T00:00:00Z", "bad": "yesterday", "micro": "2024-05-01T10:00:00.123456Z"});
        let o = Obj::new(&v);
        assert!(o.get("ok").time().is_some());
        assert!(o.get("micro").time().is_some());
        assert!(o.get("zero").time().is_none());
        assert!(o.get("bad").time().is_none());
        assert!(o.get("missing").time().is_none());
    }
}
