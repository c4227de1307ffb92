//! Field selectors: the `?fieldSelector=` syntax (`f=v`, `f==v`, `f!=v`,
//! comma-separated, with `\,` `\=` `\\` escapes in values), parsed and
//! matched as upstream's `fields.ParseSelector`.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use super::SelectorError;
use super::fieldset::{check_field, field_value};

/// A conjunction of field terms. Empty matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

/// `field = value` or `field != value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldTerm {
    field: String,
    op: FieldOp,
    value: String,
}

/// Field selector operators; `=` and `==` are the same operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldOp {
    Equals,
    NotEquals,
}

impl FieldSelector {
    /// Matches every object.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Parses `?fieldSelector=`. Neither side is trimmed (upstream doesn't):
    /// `a = b` compares field `"a "` with `" b"`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut parts = split_terms(input);
        // Upstream sorts the raw terms, which fixes the term order.
        parts.sort_unstable();
        let mut terms = Vec::with_capacity(parts.len());
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            let Some((field, op, raw_value)) = split_term(part) else {
                return Err(SelectorError::Field(format!(
                    "invalid selector: '{input}'; can't understand '{part}'"
                )));
            };
            terms.push(FieldTerm {
                field: field.to_string(),
                op,
                value: unescape_value(raw_value)?,
            });
        }
        Ok(Self { terms })
    }

    /// True when the selector does not restrict anything.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The terms, in upstream's (sorted) order.
    pub fn terms(&self) -> &[FieldTerm] {
        &self.terms
    }

    /// Matches against field values given by `fields`. A field it returns
    /// `None` for has the empty value, as a missing entry in upstream's
    /// `fields.Set`.
    pub fn matches(&self, fields: impl Fn(&str) -> Option<String>) -> bool {
        self.terms.iter().all(|term| {
            let actual = fields(&term.field).unwrap_or_default();
            (actual == term.value) == (term.op == FieldOp::Equals)
        })
    }

    /// Rejects fields the resource does not support, with upstream's message
    /// (answer 400 BadRequest). Call once per request, before listing, so a
    /// bad selector fails even when there is nothing to list.
    pub fn validate_for(&self, group: &str, plural: &str) -> Result<(), SelectorError> {
        self.terms
            .iter()
            .try_for_each(|term| check_field(group, plural, &term.field))
    }

    /// Matches a stored object of resource `group`/`plural`. Fields the
    /// resource does not support never match; [`validate_for`](Self::validate_for)
    /// reports them.
    pub fn matches_object(&self, group: &str, plural: &str, object: &Value) -> bool {
        self.terms.iter().all(
            |term| match field_value(group, plural, object, &term.field) {
                Ok(actual) => {
                    (actual.unwrap_or_default() == term.value) == (term.op == FieldOp::Equals)
                }
                Err(_) => false,
            },
        )
    }

    /// The value `field` must equal for any object to match (an `=` term),
    /// as upstream's `RequiresExactMatch`; e.g. `metadata.name` or
    /// `spec.nodeName` for index lookups.
    pub fn requires_exact_match(&self, field: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|t| t.field == field && t.op == FieldOp::Equals)
            .map(|t| t.value.as_str())
    }
}

/// Upstream's `String()`: terms joined by `,`, values escaped, so the output
/// parses back to the same selector.
impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{term}")?;
        }
        Ok(())
    }
}

impl FromStr for FieldSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl FieldTerm {
    pub fn field(&self) -> &str {
        &self.field
    }

    pub fn op(&self) -> FieldOp {
        self.op
    }

    /// The unescaped value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for FieldTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            FieldOp::Equals => "=",
            FieldOp::NotEquals => "!=",
        };
        write!(f, "{}{op}{}", self.field, escape_value(&self.value))
    }
}

/// Splits on commas not preceded by a backslash; escapes stay in the terms.
fn split_terms(input: &str) -> Vec<&str> {
    if input.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in input.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            terms.push(&input[start..i]);
            start = i + 1;
        }
    }
    terms.push(&input[start..]);
    terms
}

/// Splits at the first operator; `!=` and `==` win over `=` at one position.
fn split_term(term: &str) -> Option<(&str, FieldOp, &str)> {
    const OPERATORS: [(&str, FieldOp); 3] = [
        ("!=", FieldOp::NotEquals),
        ("==", FieldOp::Equals),
        ("=", FieldOp::Equals),
    ];
    term.char_indices().find_map(|(i, _)| {
        let rest = &term[i..];
        OPERATORS
            .iter()
            .find(|(op, _)| rest.starts_with(op))
            .map(|(op, kind)| (&term[..i], *kind, &rest[op.len()..]))
    })
}

fn unescape_value(raw: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped @ ('\\' | ',' | '=')) => out.push(escaped),
                Some(other) => {
                    return Err(SelectorError::Field(format!(
                        "invalid field selector: invalid escape sequence: \\{other}"
                    )));
                }
                None => {
                    return Err(SelectorError::Field(
                        "invalid field selector: invalid escape sequence: \\".into(),
                    ));
                }
            },
            ',' | '=' => {
                return Err(SelectorError::Field(format!(
                    "invalid field selector: unescaped character in value: {c}"
                )));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn escape_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace('=', "\\=")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |f: &str| owned.iter().find(|(k, _)| k == f).map(|(_, v)| v.clone())
    }

    #[test]
    fn parses_and_matches() {
        let pod = fields(&[("metadata.name", "web"), ("status.phase", "Running")]);
        let cases = [
            ("", true),
            ("metadata.name=web", true),
            ("metadata.name==web", true),
            ("metadata.name!=web", false),
            ("metadata.name=web,status.phase=Running", true),
            ("metadata.name=web,status.phase!=Running", false),
            ("spec.nodeName=", true),
            ("spec.nodeName!=", false),
            ("metadata.name=web,", true),
        ];
        for (input, want) in cases {
            let s = FieldSelector::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(s.matches(&pod), want, "{input}");
        }
    }

    #[test]
    fn escapes() {
        let s = FieldSelector::parse(r"a=x\,y\=z\\w,b!=1").expect("valid");
        assert_eq!(s.terms().len(), 2);
        assert_eq!(s.terms()[0].value(), r"x,y=z\w");
        assert_eq!(s.terms()[1].op(), FieldOp::NotEquals);
        assert_eq!(s.to_string(), r"a=x\,y\=z\\w,b!=1");
        assert_eq!(FieldSelector::parse(&s.to_string()).expect("round trip"), s);
        assert!(s.matches(fields(&[("a", r"x,y=z\w"), ("b", "2")])));
    }

    #[test]
    fn errors() {
        let err = |s: &str| FieldSelector::parse(s).expect_err(s).to_string();
        assert_eq!(
            err("abc"),
            "invalid selector: 'abc'; can't understand 'abc'"
        );
        assert_eq!(
            err("a=b=c"),
            "invalid field selector: unescaped character in value: ="
        );
        assert_eq!(
            err(r"a=b\x"),
            r"invalid field selector: invalid escape sequence: \x"
        );
        assert_eq!(
            err(r"a=b\"),
            r"invalid field selector: invalid escape sequence: \"
        );
        assert_eq!(
            err("a>b"),
            "invalid selector: 'a>b'; can't understand 'a>b'"
        );
    }

    #[test]
    fn no_trimming_and_first_operator_wins() {
        let s = FieldSelector::parse("a = b").expect("valid");
        assert_eq!(s.terms()[0].field(), "a ");
        assert_eq!(s.terms()[0].value(), " b");
        let s = FieldSelector::parse("a!==b").expect_err("= in value");
        assert!(s.to_string().contains("unescaped"));
    }

    #[test]
    fn exact_match() {
        let s = FieldSelector::parse("spec.nodeName=n1,metadata.name!=x").expect("valid");
        assert_eq!(s.requires_exact_match("spec.nodeName"), Some("n1"));
        assert_eq!(s.requires_exact_match("metadata.name"), None);
    }

    #[test]
    fn objects_and_validation() {
        let pod = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running"}
        });
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase=Running").expect("valid");
        assert!(s.validate_for("", "pods").is_ok());
        assert!(s.matches_object("", "pods", &pod));
        let s = FieldSelector::parse("spec.hostNetwork=false,spec.host=n1").expect("valid");
        assert!(s.matches_object("", "pods", &pod));
        let s = FieldSelector::parse("spec.bogus=x").expect("valid");
        assert_eq!(
            s.validate_for("", "pods")
                .expect_err("unsupported")
                .to_string(),
            "field label not supported: spec.bogus"
        );
        assert!(!s.matches_object("", "pods", &pod));
    }
}
