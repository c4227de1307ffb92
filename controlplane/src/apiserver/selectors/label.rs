//! Label selectors: the `?labelSelector=` string syntax and metav1
//! `LabelSelector` objects, parsed, validated and matched as upstream's
//! `labels.Parse` and `metav1.LabelSelectorAsSelector` do.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
use serde_json::Value;

use super::SelectorError;
use super::validation::{go_quote, label_value_errors, qualified_name_errors};

/// A set of requirements that must all hold (logical AND).
///
/// Three kinds of selector exist, as upstream:
/// - *everything*: no requirements, matches every object (an empty
///   `?labelSelector=`, or a metav1 selector with no `matchLabels` and no
///   `matchExpressions`);
/// - *nothing*: matches no object; this is what an **absent** metav1 selector
///   means (`LabelSelectorAsSelector(nil)`), see [`LabelSelector::from_metav1_opt`];
/// - a list of [`Requirement`]s, sorted by key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
    nothing: bool,
}

/// One `key <op> values` clause of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    operator: Operator,
    values: Vec<String>,
}

/// Operators of a [`Requirement`]; `Gt`/`Lt` compare integers and exist only
/// in the string syntax, as upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    In,
    NotIn,
    Equals,
    DoubleEquals,
    NotEquals,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

impl LabelSelector {
    /// Matches every object.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Matches no object.
    pub fn nothing() -> Self {
        Self {
            requirements: Vec::new(),
            nothing: true,
        }
    }

    /// Parses the `?labelSelector=` syntax: comma-separated `k=v`, `k==v`,
    /// `k!=v`, `k in (a,b)`, `k notin (a)`, `k`, `!k`, `k>1`, `k<1`.
    /// The empty string selects everything.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut requirements = Parser::new(input).parse()?;
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Self {
            requirements,
            nothing: false,
        })
    }

    /// Builds a selector from a present metav1 `LabelSelector`. An empty one
    /// (no `matchLabels`, no `matchExpressions`) selects everything.
    pub fn from_metav1(selector: &metav1::LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::new(
                key,
                Operator::Equals,
                vec![value.clone()],
                false,
            )?);
        }
        for expr in selector.match_expressions.iter().flatten() {
            let operator = match expr.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(SelectorError::Label(format!(
                        "{} is not a valid label selector operator",
                        go_quote(other)
                    )));
                }
            };
            let values = expr.values.clone().unwrap_or_default();
            requirements.push(Requirement::new(&expr.key, operator, values, false)?);
        }
        // Stable, so requirements on one key keep their written order.
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Self {
            requirements,
            nothing: false,
        })
    }

    /// Like [`from_metav1`](Self::from_metav1), but an absent selector
    /// (`None`) selects *nothing*: upstream's `LabelSelectorAsSelector(nil)`,
    /// so a workload without a selector never adopts every pod. Callers that
    /// want "absent means everything" pass `Some(&Default::default())`.
    pub fn from_metav1_opt(
        selector: Option<&metav1::LabelSelector>,
    ) -> Result<Self, SelectorError> {
        match selector {
            Some(selector) => Self::from_metav1(selector),
            None => Ok(Self::nothing()),
        }
    }

    /// Builds a selector from a metav1 `LabelSelector` still in JSON form, as
    /// stored objects hold it. `null` or absent (`None`) selects nothing.
    pub fn from_metav1_value(selector: Option<&Value>) -> Result<Self, SelectorError> {
        match selector {
            None | Some(Value::Null) => Ok(Self::nothing()),
            Some(value) => {
                let parsed: metav1::LabelSelector = serde_json::from_value(value.clone())
                    .map_err(|e| SelectorError::Label(format!("invalid label selector: {e}")))?;
                Self::from_metav1(&parsed)
            }
        }
    }

    /// True when the selector does not restrict anything (matches everything).
    pub fn is_empty(&self) -> bool {
        !self.nothing && self.requirements.is_empty()
    }

    /// True for the selector that matches no object.
    pub fn matches_nothing(&self) -> bool {
        self.nothing
    }

    /// The requirements, sorted by key.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Matches an object's `metadata.labels` JSON value. Absent, `null` or
    /// non-object labels count as no labels; a label whose value is not a
    /// string counts as absent (such objects are invalid, and must not make
    /// the server fail).
    pub fn matches(&self, labels: &Value) -> bool {
        let map = labels.as_object();
        self.matches_with(|key| map.and_then(|m| m.get(key)).and_then(Value::as_str))
    }

    /// Matches a label map.
    pub fn matches_map(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_with(|key| labels.get(key).map(String::as_str))
    }

    /// Matches labels given as a lookup function from key to value.
    pub fn matches_with<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> bool {
        !self.nothing && self.requirements.iter().all(|r| r.matches(&lookup))
    }

    /// The value `key` must equal for any object to match, when the selector
    /// pins it (`k=v`, `k==v` or `k in (v)`), as upstream's
    /// `RequiresExactMatch`; useful for index lookups.
    pub fn requires_exact_match(&self, key: &str) -> Option<&str> {
        let requirement = self.requirements.iter().find(|r| r.key == key)?;
        match (requirement.operator, requirement.values.as_slice()) {
            (Operator::Equals | Operator::DoubleEquals | Operator::In, [value]) => Some(value),
            _ => None,
        }
    }
}

/// Upstream's `Selector.String()`: requirements joined by `,`, so the output
/// parses back to the same selector. `nothing` prints as the empty string,
/// as upstream does.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

impl FromStr for LabelSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Requirement {
    /// Validates and builds a requirement as upstream's `NewRequirement`.
    /// `from_string` selects the error framing of the string parser.
    fn new(
        key: &str,
        operator: Operator,
        values: Vec<String>,
        from_string: bool,
    ) -> Result<Self, SelectorError> {
        let mut errs = Vec::new();
        let key_errs = qualified_name_errors(key);
        if !key_errs.is_empty() {
            errs.push(invalid("key", &go_quote(key), &key_errs.join("; ")));
        }
        let values_shown = || go_string_slice(&values);
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => errs.push(invalid(
                "values",
                &values_shown(),
                "for 'in', 'notin' operators, values set can't be empty",
            )),
            Operator::Equals | Operator::DoubleEquals | Operator::NotEquals
                if values.len() != 1 =>
            {
                errs.push(invalid(
                    "values",
                    &values_shown(),
                    "exact-match compatibility requires one single value",
                ))
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => errs.push(invalid(
                "values",
                &values_shown(),
                "values set must be empty for exists and does not exist",
            )),
            Operator::GreaterThan | Operator::LessThan => {
                if values.len() != 1 {
                    errs.push(invalid(
                        "values",
                        &values_shown(),
                        "for 'Gt', 'Lt' operators, exactly one value is required",
                    ));
                }
                for (i, value) in values.iter().enumerate() {
                    if value.parse::<i64>().is_err() {
                        errs.push(invalid(
                            &format!("values[{i}]"),
                            &go_quote(value),
                            "for 'Gt', 'Lt' operators, the value must be an integer",
                        ));
                    }
                }
            }
            _ => {}
        }
        for (i, value) in values.iter().enumerate() {
            let value_errs = label_value_errors(value);
            if !value_errs.is_empty() {
                errs.push(invalid(
                    &format!("values[{i}][{key}]"),
                    &go_quote(value),
                    &value_errs.join("; "),
                ));
            }
        }
        if errs.is_empty() {
            return Ok(Self {
                key: key.to_string(),
                operator,
                values,
            });
        }
        // Upstream aggregates several errors as "[a, b]".
        let message = if errs.len() == 1 {
            errs.remove(0)
        } else {
            format!("[{}]", errs.join(", "))
        };
        Err(SelectorError::Label(if from_string {
            format!("unable to parse requirement: {message}")
        } else {
            message
        }))
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn operator(&self) -> Operator {
        self.operator
    }

    /// The values, as written (string syntax: sorted and de-duplicated).
    pub fn values(&self) -> &[String] {
        &self.values
    }

    fn matches<'a>(&self, lookup: &impl Fn(&str) -> Option<&'a str>) -> bool {
        let has = |v: &str| self.values.iter().any(|x| x == v);
        match self.operator {
            Operator::In | Operator::Equals | Operator::DoubleEquals => {
                lookup(&self.key).is_some_and(has)
            }
            Operator::NotIn | Operator::NotEquals => !lookup(&self.key).is_some_and(has),
            Operator::Exists => lookup(&self.key).is_some(),
            Operator::DoesNotExist => lookup(&self.key).is_none(),
            Operator::GreaterThan | Operator::LessThan => {
                let Some(actual) = lookup(&self.key).and_then(|v| v.parse::<i64>().ok()) else {
                    return false;
                };
                let Some(bound) = self.values.first().and_then(|v| v.parse::<i64>().ok()) else {
                    return false;
                };
                if self.operator == Operator::GreaterThan {
                    actual > bound
                } else {
                    actual < bound
                }
            }
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.operator == Operator::DoesNotExist {
            f.write_str("!")?;
        }
        f.write_str(&self.key)?;
        let op = match self.operator {
            Operator::Exists | Operator::DoesNotExist => return Ok(()),
            Operator::Equals => "=",
            Operator::DoubleEquals => "==",
            Operator::NotEquals => "!=",
            Operator::In => " in ",
            Operator::NotIn => " notin ",
            Operator::GreaterThan => ">",
            Operator::LessThan => "<",
        };
        f.write_str(op)?;
        let mut values: Vec<&str> = self.values.iter().map(String::as_str).collect();
        values.sort_unstable();
        let set = matches!(self.operator, Operator::In | Operator::NotIn);
        if set {
            f.write_str("(")?;
        }
        f.write_str(&values.join(","))?;
        if set {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// Upstream's `field.Invalid(...).Error()` shape.
fn invalid(field: &str, shown_value: &str, detail: &str) -> String {
    format!("{field}: Invalid value: {shown_value}: {detail}")
}

/// Go's `%#v` of a `[]string`, which upstream prints for bad value sets.
fn go_string_slice(values: &[String]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| go_quote(v)).collect();
    format!("[]string{{{}}}", quoted.join(", "))
}

// ---- the string syntax -------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    EndOfString,
    ClosedPar,
    Comma,
    DoesNotExist,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier,
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

/// Where a token is read: `in`/`notin` are operators only right after a key;
/// everywhere else they are plain identifiers (`x in (in)` is valid).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    KeyAndOperator,
    Values,
}

/// The binary operators as upstream lists them in "expected:" messages.
const BINARY_OPERATORS: &str = "in, notin, =, ==, !=, gt, lt";

struct Parser {
    tokens: Vec<(Token, String)>,
    position: usize,
}

impl Parser {
    fn new(input: &str) -> Self {
        Self {
            tokens: lex(input),
            position: 0,
        }
    }

    fn lookahead(&self, context: Context) -> (Token, &str) {
        // `lex` always ends with EndOfString and nothing reads past it.
        let (token, literal) = self
            .tokens
            .get(self.position)
            .map(|(t, l)| (*t, l.as_str()))
            .unwrap_or((Token::EndOfString, ""));
        (contextual(token, context), literal)
    }

    fn consume(&mut self, context: Context) -> (Token, String) {
        let (token, literal) = self.lookahead(context);
        let literal = literal.to_string();
        if self.position < self.tokens.len() {
            self.position += 1;
        }
        (token, literal)
    }

    fn parse(mut self) -> Result<Vec<Requirement>, SelectorError> {
        let mut requirements = Vec::new();
        loop {
            let (token, literal) = self.lookahead(Context::Values);
            match token {
                Token::Identifier | Token::DoesNotExist => {
                    requirements.push(self.parse_requirement()?);
                    let (token, literal) = self.consume(Context::Values);
                    match token {
                        Token::EndOfString => return Ok(requirements),
                        Token::Comma => {
                            let (next, literal) = self.lookahead(Context::Values);
                            if next != Token::Identifier && next != Token::DoesNotExist {
                                return Err(syntax(format!(
                                    "found '{literal}', expected: identifier after ','"
                                )));
                            }
                        }
                        _ => {
                            return Err(syntax(format!(
                                "found '{literal}', expected: ',' or 'end of string'"
                            )));
                        }
                    }
                }
                Token::EndOfString => return Ok(requirements),
                _ => {
                    return Err(syntax(format!(
                        "found '{literal}', expected: !, identifier, or 'end of string'"
                    )));
                }
            }
        }
    }

    fn parse_requirement(&mut self) -> Result<Requirement, SelectorError> {
        let (key, unary) = self.parse_key_and_infer_operator()?;
        if let Some(operator) = unary {
            return Requirement::new(&key, operator, Vec::new(), true);
        }
        let operator = self.parse_operator()?;
        let values = match operator {
            Operator::In | Operator::NotIn => self.parse_values()?,
            _ => self.parse_exact_value()?,
        };
        Requirement::new(&key, operator, values, true)
    }

    /// Reads `[!]key`; returns the unary operator when the requirement ends
    /// there (`!key` always does, `key` does before `,` or the end).
    fn parse_key_and_infer_operator(
        &mut self,
    ) -> Result<(String, Option<Operator>), SelectorError> {
        let (mut token, mut literal) = self.consume(Context::Values);
        let negated = token == Token::DoesNotExist;
        if negated {
            (token, literal) = self.consume(Context::Values);
        }
        if token != Token::Identifier {
            return Err(requirement_error(format!(
                "found '{literal}', expected: identifier"
            )));
        }
        let key_errs = qualified_name_errors(&literal);
        if !key_errs.is_empty() {
            return Err(requirement_error(invalid(
                "<nil>",
                &go_quote(&literal),
                &key_errs.join("; "),
            )));
        }
        if negated {
            return Ok((literal, Some(Operator::DoesNotExist)));
        }
        let (next, _) = self.lookahead(Context::Values);
        let unary = matches!(next, Token::EndOfString | Token::Comma).then_some(Operator::Exists);
        Ok((literal, unary))
    }

    fn parse_operator(&mut self) -> Result<Operator, SelectorError> {
        let (token, literal) = self.consume(Context::KeyAndOperator);
        Ok(match token {
            Token::In => Operator::In,
            Token::NotIn => Operator::NotIn,
            Token::Equals => Operator::Equals,
            Token::DoubleEquals => Operator::DoubleEquals,
            Token::NotEquals => Operator::NotEquals,
            Token::GreaterThan => Operator::GreaterThan,
            Token::LessThan => Operator::LessThan,
            _ => {
                return Err(requirement_error(format!(
                    "found '{literal}', expected: {BINARY_OPERATORS}"
                )));
            }
        })
    }

    /// `( v1, v2, ... )`; empty entries mean the empty value. The result is
    /// sorted and de-duplicated, as upstream keeps a set.
    fn parse_values(&mut self) -> Result<Vec<String>, SelectorError> {
        let (token, literal) = self.consume(Context::Values);
        if token != Token::OpenPar {
            return Err(requirement_error(format!(
                "found '{literal}' expected: '('"
            )));
        }
        let (token, literal) = self.lookahead(Context::Values);
        let literal = literal.to_string();
        let mut values = match token {
            Token::Identifier | Token::Comma => {
                let values = self.parse_identifier_list()?;
                let (token, _) = self.consume(Context::Values);
                if token != Token::ClosedPar {
                    return Err(requirement_error(format!(
                        "found '{literal}', expected: ')'"
                    )));
                }
                values
            }
            Token::ClosedPar => {
                self.consume(Context::Values);
                vec![String::new()]
            }
            _ => {
                return Err(requirement_error(format!(
                    "found '{literal}', expected: ',', ')' or identifier"
                )));
            }
        };
        values.sort();
        values.dedup();
        Ok(values)
    }

    fn parse_identifier_list(&mut self) -> Result<Vec<String>, SelectorError> {
        let mut values = Vec::new();
        loop {
            let (token, literal) = self.consume(Context::Values);
            match token {
                Token::Identifier => {
                    values.push(literal);
                    let (next, literal) = self.lookahead(Context::Values);
                    match next {
                        Token::Comma => continue,
                        Token::ClosedPar => return Ok(values),
                        _ => {
                            return Err(requirement_error(format!(
                                "found '{literal}', expected: ',' or ')'"
                            )));
                        }
                    }
                }
                Token::Comma => {
                    // A comma with nothing before it, after it, or between
                    // two commas stands for the empty value.
                    if values.is_empty() {
                        values.push(String::new());
                    }
                    let (next, _) = self.lookahead(Context::Values);
                    if next == Token::ClosedPar {
                        values.push(String::new());
                        return Ok(values);
                    }
                    if next == Token::Comma {
                        values.push(String::new());
                    }
                }
                _ => {
                    return Err(requirement_error(format!(
                        "found '{literal}', expected: ',', or identifier"
                    )));
                }
            }
        }
    }

    fn parse_exact_value(&mut self) -> Result<Vec<String>, SelectorError> {
        let (token, _) = self.lookahead(Context::Values);
        if matches!(token, Token::EndOfString | Token::Comma) {
            return Ok(vec![String::new()]);
        }
        let (token, literal) = self.consume(Context::Values);
        if token == Token::Identifier {
            return Ok(vec![literal]);
        }
        Err(requirement_error(format!(
            "found '{literal}', expected: identifier"
        )))
    }
}

fn contextual(token: Token, context: Context) -> Token {
    match (token, context) {
        (Token::In | Token::NotIn, Context::Values) => Token::Identifier,
        (token, _) => token,
    }
}

fn syntax(message: String) -> SelectorError {
    SelectorError::Label(message)
}

fn requirement_error(message: String) -> SelectorError {
    SelectorError::Label(format!("unable to parse requirement: {message}"))
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

fn is_special(c: char) -> bool {
    matches!(c, '=' | '!' | '(' | ')' | ',' | '>' | '<')
}

/// Splits the input into tokens, always ending with `EndOfString`.
/// Identifiers run until whitespace or a special character; the only
/// two-character operators are `!=` and `==`.
fn lex(input: &str) -> Vec<(Token, String)> {
    let mut tokens = Vec::new();
    let mut rest = input;
    loop {
        rest = rest.trim_start_matches(is_whitespace);
        let Some(first) = rest.chars().next() else {
            tokens.push((Token::EndOfString, String::new()));
            return tokens;
        };
        if is_special(first) {
            let (token, len) = if rest.starts_with("!=") {
                (Token::NotEquals, 2)
            } else if rest.starts_with("==") {
                (Token::DoubleEquals, 2)
            } else {
                let token = match first {
                    '=' => Token::Equals,
                    '!' => Token::DoesNotExist,
                    '(' => Token::OpenPar,
                    ')' => Token::ClosedPar,
                    ',' => Token::Comma,
                    '>' => Token::GreaterThan,
                    _ => Token::LessThan,
                };
                (token, 1)
            };
            tokens.push((token, rest[..len].to_string()));
            rest = &rest[len..];
        } else {
            let end = rest
                .find(|c| is_special(c) || is_whitespace(c))
                .unwrap_or(rest.len());
            let word = &rest[..end];
            let token = match word {
                "in" => Token::In,
                "notin" => Token::NotIn,
                _ => Token::Identifier,
            };
            tokens.push((token, word.to_string()));
            rest = &rest[end..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match LabelSelector::parse(s) {
            Ok(parsed) => panic!("{s:?} parsed as {parsed:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_every_operator() {
        let labels = json!({"app": "web", "tier": "front", "n": "5"});
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app in (web,db)", true),
            ("app in (db)", false),
            ("app notin (db)", true),
            ("app notin (web)", false),
            ("missing notin (web)", true),
            ("app", true),
            ("missing", false),
            ("!missing", true),
            ("!app", false),
            ("n>4", true),
            ("n>5", false),
            ("n<6", true),
            ("app>1", false),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("  app = web ,\ttier in ( front , back )  ", true),
        ];
        for (input, want) in cases {
            assert_eq!(sel(input).matches(&labels), want, "{input:?}");
        }
    }

    #[test]
    fn empty_values() {
        let labels = json!({"a": ""});
        assert!(sel("a=").matches(&labels));
        assert!(sel("a in ()").matches(&labels));
        assert!(sel("a in (,x)").matches(&labels));
        assert!(sel("a in (x,)").matches(&labels));
        assert!(sel("a in (x,,y)").matches(&labels));
        assert!(!sel("a in (x,y)").matches(&labels));
        assert_eq!(
            sel("a in (x,,y)").requirements()[0].values(),
            ["", "x", "y"]
        );
    }

    #[test]
    fn keywords_are_identifiers_in_value_position() {
        let labels = json!({"in": "notin"});
        assert!(sel("in=notin").matches(&labels));
        assert!(sel("in in (notin)").matches(&labels));
    }

    #[test]
    fn labels_absent_or_odd() {
        let s = sel("a!=b");
        assert!(s.matches(&Value::Null));
        assert!(s.matches(&json!("garbage")));
        assert!(!sel("a").matches(&json!({"a": 5})));
        assert!(sel("a").matches_map(&BTreeMap::from([("a".into(), "x".into())])));
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(err("a,"), "found '', expected: identifier after ','");
        assert_eq!(
            err(",a"),
            "found ',', expected: !, identifier, or 'end of string'"
        );
        assert_eq!(
            err("a b"),
            "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt"
        );
        assert_eq!(
            err("a in b"),
            "unable to parse requirement: found 'b' expected: '('"
        );
        assert_eq!(
            err("a in (b"),
            "unable to parse requirement: found '', expected: ',' or ')'"
        );
        assert_eq!(
            err("a===b"),
            "unable to parse requirement: found '=', expected: identifier"
        );
        assert_eq!(err("!a=b"), "found '=', expected: ',' or 'end of string'");
        assert_eq!(err("a=b c"), "found 'c', expected: ',' or 'end of string'");
        assert_eq!(
            err("!"),
            "unable to parse requirement: found '', expected: identifier"
        );
    }

    #[test]
    fn validation_errors() {
        assert!(err("a/b/c=d").starts_with(
            "unable to parse requirement: <nil>: Invalid value: \"a/b/c\": a qualified name must consist"
        ));
        assert!(err("a=-b").starts_with(
            "unable to parse requirement: values[0][a]: Invalid value: \"-b\": a valid label must be"
        ));
        assert!(
            err(&format!("a={}", "v".repeat(64))).ends_with("must be no more than 63 characters")
        );
        assert_eq!(
            err("a>b"),
            "unable to parse requirement: values[0]: Invalid value: \"b\": for 'Gt', 'Lt' operators, the value must be an integer"
        );
    }

    #[test]
    fn display_round_trips_like_upstream() {
        let s = sel("z in (b,a), !y, x, w!=1, v==2, u=3, t notin (c), s>4, r<5");
        assert_eq!(
            s.to_string(),
            "r<5,s>4,t notin (c),u=3,v==2,w!=1,x,!y,z in (a,b)"
        );
        assert_eq!(sel(&s.to_string()), s);
        assert_eq!(LabelSelector::nothing().to_string(), "");
    }

    #[test]
    fn exact_match() {
        let s = sel("a=1,b in (2),c in (3,4),d!=5");
        assert_eq!(s.requires_exact_match("a"), Some("1"));
        assert_eq!(s.requires_exact_match("b"), Some("2"));
        assert_eq!(s.requires_exact_match("c"), None);
        assert_eq!(s.requires_exact_match("d"), None);
        assert_eq!(s.requires_exact_match("e"), None);
    }

    fn metav1_selector(v: Value) -> Result<LabelSelector, SelectorError> {
        let parsed: metav1::LabelSelector = serde_json::from_value(v).expect("metav1 selector");
        LabelSelector::from_metav1(&parsed)
    }

    #[test]
    fn metav1_selectors() {
        let s = metav1_selector(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front", "edge"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "Exists"},
                {"key": "env", "operator": "NotIn", "values": ["dev"]}
            ]
        }))
        .expect("valid");
        assert_eq!(
            s.to_string(),
            "app=web,!canary,env notin (dev),tier in (edge,front),zone"
        );
        assert!(s.matches(&json!({"app": "web", "tier": "edge", "zone": "a"})));
        assert!(!s.matches(&json!({"app": "web", "tier": "edge", "zone": "a", "canary": ""})));
        assert!(!s.matches(&json!({"app": "web", "tier": "edge", "zone": "a", "env": "dev"})));
        assert!(!s.matches(&json!({"app": "web", "tier": "edge"})));
    }

    #[test]
    fn metav1_empty_versus_absent() {
        let empty = metav1_selector(json!({})).expect("valid");
        assert!(empty.is_empty());
        assert!(empty.matches(&json!({})));
        let absent = LabelSelector::from_metav1_opt(None).expect("valid");
        assert!(!absent.is_empty());
        assert!(absent.matches_nothing());
        assert!(!absent.matches(&json!({"a": "b"})));
        assert!(
            LabelSelector::from_metav1_value(Some(&Value::Null))
                .expect("valid")
                .matches_nothing()
        );
        assert!(LabelSelector::from_metav1_value(Some(&json!(7))).is_err());
    }

    #[test]
    fn metav1_validation() {
        let in_without_values = metav1_selector(json!({
            "matchExpressions": [{"key": "a", "operator": "In"}]
        }));
        assert_eq!(
            in_without_values.map_err(|e| e.to_string()),
            Err("values: Invalid value: []string{}: for 'in', 'notin' operators, values set can't be empty".into())
        );
        let exists_with_values = metav1_selector(json!({
            "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
        }));
        assert_eq!(
            exists_with_values.map_err(|e| e.to_string()),
            Err("values: Invalid value: []string{\"x\"}: values set must be empty for exists and does not exist".into())
        );
        let bad_operator = metav1_selector(json!({
            "matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]
        }));
        assert_eq!(
            bad_operator.map_err(|e| e.to_string()),
            Err("\"Gt\" is not a valid label selector operator".into())
        );
        let bad_key = metav1_selector(json!({"matchLabels": {"a b": "c"}}));
        assert!(bad_key.is_err_and(|e| e.to_string().starts_with("key: Invalid value: \"a b\"")));
    }
}
