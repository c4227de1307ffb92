//! The routing table: host and path matching exactly as the
//! `networking.k8s.io/v1` Ingress specification says. Pure data and
//! lookups, generic over what a route carries, so it is tested on its own.
//!
//! Lookup order: the exact host's rules, then the wildcard host's
//! (`*.example.com` covers exactly one more label), then the rules without
//! a host; within one host the longest matching path wins and an `Exact`
//! path beats a `Prefix` of the same length. When nothing matches, the
//! default backend (if any Ingress has one) answers.

use std::collections::HashMap;

/// How a rule's path matches, as in `spec.rules[].http.paths[].pathType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    Exact,
    /// Element-wise prefix on `/`; `ImplementationSpecific` is treated so too.
    Prefix,
}

/// Where a rule applies.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com`, stored as `example.com`.
    Wildcard(String),
}

impl HostMatch {
    /// Parses a rule's `host` (already validated by the API): empty means any.
    pub fn parse(host: Option<&str>) -> Self {
        match host.map(str::trim).filter(|h| !h.is_empty()) {
            None => HostMatch::Any,
            Some(h) => match h.strip_prefix("*.") {
                Some(parent) => HostMatch::Wildcard(parent.to_ascii_lowercase()),
                None => HostMatch::Exact(h.to_ascii_lowercase()),
            },
        }
    }

    /// Whether a request for `host` (lower-case, no port) falls under this.
    pub fn covers(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h == host,
            HostMatch::Wildcard(parent) => parent_of(host) == Some(parent.as_str()),
        }
    }
}

/// A route found for a request, with what rewriting needs to know.
#[derive(Debug)]
pub struct Matched<'a, R> {
    pub route: &'a R,
    /// Length of the request path prefix the rule matched (0 for `/`).
    pub matched_len: usize,
}

#[derive(Debug)]
pub struct Table<R> {
    exact_hosts: HashMap<String, HostRules<R>>,
    wildcard_hosts: HashMap<String, HostRules<R>>,
    any_host: HostRules<R>,
    default_backend: Option<R>,
}

#[derive(Debug)]
struct HostRules<R> {
    exact: HashMap<String, R>,
    /// Normalised prefixes (no trailing `/` except the root), longest first.
    prefixes: Vec<(String, R)>,
}

impl<R> Default for HostRules<R> {
    fn default() -> Self {
        HostRules {
            exact: HashMap::new(),
            prefixes: Vec::new(),
        }
    }
}

impl<R> Default for Table<R> {
    fn default() -> Self {
        Table {
            exact_hosts: HashMap::new(),
            wildcard_hosts: HashMap::new(),
            any_host: HostRules::default(),
            default_backend: None,
        }
    }
}

impl<R> Table<R> {
    /// Adds a rule. Returns `false` (and keeps the older rule) when the same
    /// host, path and kind is already taken: the caller adds Ingresses
    /// oldest first, so the oldest wins, as in other controllers.
    pub fn insert(&mut self, host: &HostMatch, kind: PathKind, path: &str, route: R) -> bool {
        let rules = match host {
            HostMatch::Any => &mut self.any_host,
            HostMatch::Exact(h) => self.exact_hosts.entry(h.clone()).or_default(),
            HostMatch::Wildcard(p) => self.wildcard_hosts.entry(p.clone()).or_default(),
        };
        match kind {
            PathKind::Exact => {
                if rules.exact.contains_key(path) {
                    return false;
                }
                rules.exact.insert(path.to_owned(), route);
            }
            PathKind::Prefix => {
                let prefix = normalise_prefix(path);
                if rules.prefixes.iter().any(|(p, _)| p == prefix) {
                    return false;
                }
                let at = rules
                    .prefixes
                    .iter()
                    .position(|(p, _)| p.len() < prefix.len())
                    .unwrap_or(rules.prefixes.len());
                rules.prefixes.insert(at, (prefix.to_owned(), route));
            }
        }
        true
    }

    /// Sets the default backend unless one is already set (oldest wins).
    pub fn set_default(&mut self, route: R) -> bool {
        if self.default_backend.is_some() {
            return false;
        }
        self.default_backend = Some(route);
        true
    }

    /// Finds the route for `host` (lower-case, without port) and `path`.
    pub fn lookup(&self, host: &str, path: &str) -> Option<Matched<'_, R>> {
        if let Some(m) = self.exact_hosts.get(host).and_then(|r| r.lookup(path)) {
            return Some(m);
        }
        if let Some(m) = parent_of(host)
            .and_then(|p| self.wildcard_hosts.get(p))
            .and_then(|r| r.lookup(path))
        {
            return Some(m);
        }
        if let Some(m) = self.any_host.lookup(path) {
            return Some(m);
        }
        self.default_backend.as_ref().map(|route| Matched {
            route,
            matched_len: 0,
        })
    }
}

impl<R> HostRules<R> {
    fn lookup(&self, path: &str) -> Option<Matched<'_, R>> {
        // An exact match is as long as a match can be, and wins ties.
        if let Some(route) = self.exact.get(path) {
            return Some(Matched {
                route,
                matched_len: path.len(),
            });
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|(prefix, route)| Matched {
                route,
                matched_len: if prefix == "/" { 0 } else { prefix.len() },
            })
    }
}

/// `/foo/` and `/foo` are the same prefix; `/` stays `/`.
pub fn normalise_prefix(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() { "/" } else { trimmed }
}

/// Element-wise: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// `a.example.com` → `example.com`; a wildcard covers exactly one label.
fn parent_of(host: &str) -> Option<&str> {
    let (first, rest) = host.split_once('.')?;
    (!first.is_empty() && !rest.is_empty()).then_some(rest)
}

/// The path sent upstream when `skiff.io/rewrite-target` is set: the part
/// of the path the rule matched is replaced by the target, the rest (and
/// the query) kept. `/foo` → `/` turns `/foo/bar?x` into `/bar?x`.
pub fn rewrite(path: &str, query: Option<&str>, matched_len: usize, target: &str) -> String {
    let rest = path.get(matched_len..).unwrap_or("");
    let mut out = String::with_capacity(target.len() + rest.len() + 1);
    if rest.is_empty() {
        out.push_str(target);
    } else {
        out.push_str(target.trim_end_matches('/'));
        if !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(paths: &[(PathKind, &str)]) -> Table<String> {
        let mut t = Table::default();
        for (kind, path) in paths {
            t.insert(&HostMatch::Any, *kind, path, format!("{kind:?} {path}"));
        }
        t
    }

    fn hit(t: &Table<String>, host: &str, path: &str) -> Option<String> {
        t.lookup(host, path).map(|m| m.route.clone())
    }

    use PathKind::{Exact, Prefix};

    /// The "Examples" table of the Ingress specification, row by row.
    #[test]
    fn spec_path_examples() {
        // (rule paths, request path, the rule that should answer)
        type Row = (
            &'static [(PathKind, &'static str)],
            &'static str,
            Option<&'static str>,
        );
        let rows: &[Row] = &[
            (&[(Prefix, "/")], "/anything/at/all", Some("Prefix /")),
            (&[(Exact, "/foo")], "/foo", Some("Exact /foo")),
            (&[(Exact, "/foo")], "/bar", None),
            (&[(Exact, "/foo")], "/foo/", None),
            (&[(Exact, "/foo/")], "/foo", None),
            (&[(Prefix, "/foo")], "/foo", Some("Prefix /foo")),
            (&[(Prefix, "/foo")], "/foo/", Some("Prefix /foo")),
            (&[(Prefix, "/foo/")], "/foo", Some("Prefix /foo/")),
            (&[(Prefix, "/foo/")], "/foo/", Some("Prefix /foo/")),
            (&[(Prefix, "/aaa/bb")], "/aaa/bbb", None),
            (&[(Prefix, "/aaa/bbb")], "/aaa/bbb", Some("Prefix /aaa/bbb")),
            (
                &[(Prefix, "/aaa/bbb/")],
                "/aaa/bbb",
                Some("Prefix /aaa/bbb/"),
            ),
            (
                &[(Prefix, "/aaa/bbb")],
                "/aaa/bbb/",
                Some("Prefix /aaa/bbb"),
            ),
            (
                &[(Prefix, "/aaa/bbb")],
                "/aaa/bbb/ccc",
                Some("Prefix /aaa/bbb"),
            ),
            (&[(Prefix, "/aaa/bbb")], "/aaa/bbbxyz", None),
            (
                &[(Prefix, "/"), (Prefix, "/aaa")],
                "/aaa/ccc",
                Some("Prefix /aaa"),
            ),
            (
                &[(Prefix, "/"), (Prefix, "/aaa"), (Prefix, "/aaa/bbb")],
                "/aaa/bbb",
                Some("Prefix /aaa/bbb"),
            ),
            (
                &[(Prefix, "/"), (Prefix, "/aaa"), (Prefix, "/aaa/bbb")],
                "/ccc",
                Some("Prefix /"),
            ),
            (&[(Prefix, "/aaa")], "/ccc", None),
            (
                &[(Prefix, "/foo"), (Exact, "/foo")],
                "/foo",
                Some("Exact /foo"),
            ),
            (
                &[(Exact, "/foo"), (Prefix, "/foo")],
                "/foo",
                Some("Exact /foo"),
            ),
        ];
        for (paths, request, want) in rows {
            let t = table(paths);
            assert_eq!(
                hit(&t, "x", request).as_deref(),
                *want,
                "paths {paths:?}, request {request}"
            );
        }
    }

    #[test]
    fn longest_prefix_wins_regardless_of_insert_order() {
        let t = table(&[(Prefix, "/a/b/c"), (Prefix, "/"), (Prefix, "/a")]);
        assert_eq!(hit(&t, "h", "/a/b/c/d").as_deref(), Some("Prefix /a/b/c"));
        assert_eq!(hit(&t, "h", "/a/b").as_deref(), Some("Prefix /a"));
        assert_eq!(hit(&t, "h", "/b").as_deref(), Some("Prefix /"));
    }

    /// The spec's host examples: exact, `*.foo.com` with one label only.
    #[test]
    fn wildcard_hosts_cover_exactly_one_label() {
        let mut t = Table::default();
        t.insert(
            &HostMatch::parse(Some("foo.bar.com")),
            Prefix,
            "/",
            "exact".to_owned(),
        );
        t.insert(
            &HostMatch::parse(Some("*.foo.com")),
            Prefix,
            "/",
            "wild".to_owned(),
        );
        assert_eq!(hit(&t, "foo.bar.com", "/").as_deref(), Some("exact"));
        assert_eq!(hit(&t, "bar.foo.com", "/").as_deref(), Some("wild"));
        assert_eq!(hit(&t, "baz.bar.foo.com", "/"), None);
        assert_eq!(hit(&t, "foo.com", "/"), None);
        assert_eq!(hit(&t, "other.com", "/"), None);
        assert!(HostMatch::parse(Some("*.foo.com")).covers("a.foo.com"));
        assert!(!HostMatch::parse(Some("*.foo.com")).covers("a.b.foo.com"));
        assert_eq!(HostMatch::parse(Some("")), HostMatch::Any);
        assert_eq!(
            HostMatch::parse(Some("Foo.Example.COM")),
            HostMatch::Exact("foo.example.com".into())
        );
    }

    #[test]
    fn host_rules_before_hostless_before_default() {
        let mut t = Table::default();
        t.insert(
            &HostMatch::parse(Some("a.com")),
            Prefix,
            "/api",
            "a-api".to_owned(),
        );
        t.insert(
            &HostMatch::parse(Some("*.a.com")),
            Prefix,
            "/",
            "wild".to_owned(),
        );
        t.insert(&HostMatch::Any, Prefix, "/", "any".to_owned());
        assert_eq!(hit(&t, "a.com", "/api/x").as_deref(), Some("a-api"));
        // The host's rules have no match for this path: hostless rules answer.
        assert_eq!(hit(&t, "a.com", "/other").as_deref(), Some("any"));
        assert_eq!(hit(&t, "x.a.com", "/api").as_deref(), Some("wild"));
        assert_eq!(hit(&t, "b.com", "/").as_deref(), Some("any"));
        let mut t = table(&[(Exact, "/only")]);
        assert_eq!(hit(&t, "h", "/nope"), None);
        assert!(t.set_default("default".to_owned()));
        assert!(!t.set_default("younger".to_owned()));
        assert_eq!(hit(&t, "h", "/nope").as_deref(), Some("default"));
        assert_eq!(hit(&t, "h", "/only").as_deref(), Some("Exact /only"));
    }

    #[test]
    fn oldest_rule_keeps_a_duplicate_path() {
        let mut t = Table::default();
        assert!(t.insert(&HostMatch::Any, Prefix, "/x/", "old".to_owned()));
        assert!(!t.insert(&HostMatch::Any, Prefix, "/x", "new".to_owned()));
        assert_eq!(hit(&t, "h", "/x").as_deref(), Some("old"));
    }

    #[test]
    fn rewrite_replaces_the_matched_part() {
        let t = table(&[(Prefix, "/foo")]);
        let m = t.lookup("h", "/foo/bar").unwrap();
        assert_eq!(
            rewrite("/foo/bar", Some("q=1"), m.matched_len, "/"),
            "/bar?q=1"
        );
        assert_eq!(rewrite("/foo", None, 4, "/"), "/");
        assert_eq!(rewrite("/foo/bar", None, 4, "/api"), "/api/bar");
        assert_eq!(rewrite("/foo/bar", None, 4, "/api/"), "/api/bar");
        assert_eq!(rewrite("/foo", None, 4, "/api/"), "/api/");
        // A root prefix keeps the whole path under the target.
        assert_eq!(rewrite("/x/y", None, 0, "/base"), "/base/x/y");
        assert_eq!(rewrite("/exact", None, 6, "/new"), "/new");
    }
}
