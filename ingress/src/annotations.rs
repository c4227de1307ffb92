//! The `skiff.io/` annotations an Ingress may carry (see the crate docs for
//! the user-facing list). Parsed once per table build; a value that does
//! not parse is reported and the default kept.

use std::collections::BTreeMap;
use std::time::Duration;

pub const REWRITE_TARGET: &str = "skiff.io/rewrite-target";
pub const SSL_REDIRECT: &str = "skiff.io/ssl-redirect";
pub const BACKEND_PROTOCOL: &str = "skiff.io/backend-protocol";
pub const PROXY_READ_TIMEOUT: &str = "skiff.io/proxy-read-timeout";
pub const LIMIT_RPS: &str = "skiff.io/limit-rps";
pub const CANARY: &str = "skiff.io/canary";
pub const CANARY_WEIGHT: &str = "skiff.io/canary-weight";

/// How the proxy talks to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// HTTP/2 cleartext with prior knowledge.
    H2c,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub rewrite_target: Option<String>,
    pub ssl_redirect: bool,
    pub protocol: Protocol,
    /// Time allowed for the backend to answer with its response head, and
    /// the longest pause within a request or response body.
    pub read_timeout: Duration,
    /// Requests per second allowed per client address (burst of the same).
    pub limit_rps: Option<u32>,
    /// `Some(weight in percent)` for a canary Ingress.
    pub canary_weight: Option<u32>,
}

pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest read timeout an annotation may ask for: the proxy adds it to
/// the current instant, which a value near `u64::MAX` seconds would overflow.
const MAX_READ_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rewrite_target: None,
            ssl_redirect: true,
            protocol: Protocol::Http1,
            read_timeout: DEFAULT_READ_TIMEOUT,
            limit_rps: None,
            canary_weight: None,
        }
    }
}

impl Settings {
    /// Reads the annotations; returns the settings and a message for each
    /// value that was not understood.
    pub fn parse(annotations: Option<&BTreeMap<String, String>>) -> (Settings, Vec<String>) {
        let mut s = Settings::default();
        let mut problems = Vec::new();
        let Some(annotations) = annotations else {
            return (s, problems);
        };
        let mut bad = |key: &str, value: &str, want: &str| {
            problems.push(format!(
                "annotation {key}={value:?} ignored: expected {want}"
            ));
        };
        if let Some(v) = annotations.get(REWRITE_TARGET) {
            if v.starts_with('/') && !v.contains(['?', '#', ' ']) {
                s.rewrite_target = Some(v.clone());
            } else {
                bad(REWRITE_TARGET, v, "a path starting with /");
            }
        }
        if let Some(v) = annotations.get(SSL_REDIRECT) {
            match v.as_str() {
                "true" => s.ssl_redirect = true,
                "false" => s.ssl_redirect = false,
                _ => bad(SSL_REDIRECT, v, "true or false"),
            }
        }
        if let Some(v) = annotations.get(BACKEND_PROTOCOL) {
            match v.to_ascii_uppercase().as_str() {
                "HTTP" => s.protocol = Protocol::Http1,
                "H2C" | "GRPC" => s.protocol = Protocol::H2c,
                _ => bad(BACKEND_PROTOCOL, v, "HTTP or H2C"),
            }
        }
        if let Some(v) = annotations.get(PROXY_READ_TIMEOUT) {
            match v.trim_end_matches('s').parse::<u64>() {
                Ok(secs) if secs > 0 && secs <= MAX_READ_TIMEOUT_SECS => {
                    s.read_timeout = Duration::from_secs(secs)
                }
                _ => bad(
                    PROXY_READ_TIMEOUT,
                    v,
                    "a positive number of seconds, at most a year",
                ),
            }
        }
        if let Some(v) = annotations.get(LIMIT_RPS) {
            match v.parse::<u32>() {
                Ok(n) if n > 0 => s.limit_rps = Some(n),
                _ => bad(LIMIT_RPS, v, "a positive integer"),
            }
        }
        if annotations.get(CANARY).map(String::as_str) == Some("true") {
            let weight = annotations.get(CANARY_WEIGHT);
            match weight.map(|w| w.parse::<u32>()) {
                None => s.canary_weight = Some(0),
                Some(Ok(w)) if w <= 100 => s.canary_weight = Some(w),
                _ => {
                    bad(CANARY_WEIGHT, weight.map_or("", String::as_str), "0 to 100");
                    s.canary_weight = Some(0);
                }
            }
        }
        (s, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (Settings, Vec<String>) {
        let map = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::parse(Some(&map))
    }

    #[test]
    fn defaults_without_annotations() {
        assert_eq!(Settings::parse(None).0, Settings::default());
    }

    #[test]
    fn reads_every_annotation() {
        let (s, problems) = parse(&[
            (REWRITE_TARGET, "/"),
            (SSL_REDIRECT, "false"),
            (BACKEND_PROTOCOL, "h2c"),
            (PROXY_READ_TIMEOUT, "5"),
            (LIMIT_RPS, "10"),
            (CANARY, "true"),
            (CANARY_WEIGHT, "20"),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.rewrite_target.as_deref(), Some("/"));
        assert!(!s.ssl_redirect);
        assert_eq!(s.protocol, Protocol::H2c);
        assert_eq!(s.read_timeout, Duration::from_secs(5));
        assert_eq!(s.limit_rps, Some(10));
        assert_eq!(s.canary_weight, Some(20));
    }

    #[test]
    fn bad_values_are_reported_and_ignored() {
        let (s, problems) = parse(&[
            (REWRITE_TARGET, "no-slash"),
            (PROXY_READ_TIMEOUT, "soon"),
            (CANARY, "true"),
            (CANARY_WEIGHT, "150"),
        ]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(s.rewrite_target, None);
        assert_eq!(s.read_timeout, DEFAULT_READ_TIMEOUT);
        assert_eq!(s.canary_weight, Some(0));
    }

    #[test]
    fn read_timeouts_beyond_a_year_are_refused() {
        let (s, problems) = parse(&[(PROXY_READ_TIMEOUT, "31536000")]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.read_timeout, Duration::from_secs(31_536_000));
        let (s, problems) = parse(&[(PROXY_READ_TIMEOUT, "9999999999999999999")]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(s.read_timeout, DEFAULT_READ_TIMEOUT);
    }
}
