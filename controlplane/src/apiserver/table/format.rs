//! Cell formatting shared by the printers: ages, label sets, selectors,
//! container lists, and "a,b,c + 2 more..." truncation, as upstream prints
//! them.

use jiff::{SignedDuration, Timestamp};

use super::value::Obj;
use crate::apiserver::selectors::LabelSelector;

/// Upstream's `duration.HumanDuration`: a short age with two or three
/// significant figures ("45s", "3m2s", "10m", "5h7m", "2d3h", "3y").
/// More than a second in the future is `<invalid>`; clock skew under two
/// seconds reads as "0s".
pub fn human_duration(d: SignedDuration) -> String {
    // Go's time.Duration saturates at about 292 years; so do ages upstream.
    const GO_MAX_SECONDS: i64 = i64::MAX / 1_000_000_000;
    let seconds = d.as_secs().clamp(-GO_MAX_SECONDS, GO_MAX_SECONDS);
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        return with_remainder(minutes, "m", seconds % 60, "s");
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        return with_remainder(hours, "h", minutes % 60, "m");
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return with_remainder(days, "d", hours % 24, "h");
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        return with_remainder(years, "y", days % 365, "d");
    }
    format!("{years}y")
}

/// "5m" when the remainder is zero, else "5m7s".
fn with_remainder(major: i64, major_unit: &str, minor: i64, minor_unit: &str) -> String {
    if minor == 0 {
        format!("{major}{major_unit}")
    } else {
        format!("{major}{major_unit}{minor}{minor_unit}")
    }
}

/// Time elapsed since `ts` as upstream's `translateTimestampSince`:
/// `<unknown>` for a missing (zero) timestamp.
pub(super) fn since(now: Timestamp, ts: Option<Timestamp>) -> String {
    match ts {
        Some(ts) => human_duration(now.duration_since(ts)),
        None => "<unknown>".into(),
    }
}

/// A label map as `k1=v1,k2=v2` sorted by key, `<none>` when empty
/// (upstream's `labels.FormatLabels`).
pub(super) fn format_labels(labels: Obj<'_>) -> String {
    let mut pairs: Vec<(&str, &str)> = labels
        .entries()
        .filter_map(|(k, v)| Some((k, v.opt_str()?)))
        .collect();
    pairs.sort_unstable();
    if pairs.is_empty() {
        return "<none>".into();
    }
    let joined: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    joined.join(",")
}

/// A metav1 `LabelSelector` as upstream's `FormatLabelSelector`: its string
/// form, `<none>` when it selects everything or nothing, `<error>` when it
/// is invalid.
pub(super) fn format_label_selector(selector: Obj<'_>) -> String {
    match LabelSelector::from_metav1_value(selector.value()) {
        Ok(s) if s.to_string().is_empty() => "<none>".into(),
        Ok(s) => s.to_string(),
        Err(_) => "<error>".into(),
    }
}

/// A metav1 `LabelSelector` as the Deployment printer shows it: the plain
/// string form (empty when it selects everything), `<invalid>` on error.
pub(super) fn selector_string(selector: Obj<'_>) -> String {
    LabelSelector::from_metav1_value(selector.value())
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "<invalid>".into())
}

/// Container names and images, each comma-joined, for the wide
/// CONTAINERS and IMAGES columns.
pub(super) fn container_cells(containers: Obj<'_>) -> (String, String) {
    let names: Vec<&str> = containers.items().map(|c| c.get("name").str()).collect();
    let images: Vec<&str> = containers.items().map(|c| c.get("image").str()).collect();
    (names.join(","), images.join(","))
}

/// Shows at most `max` entries of `items` (the full count is `total`), as
/// "a,b,c + 2 more..." when some were left out.
pub(super) fn list_with_more(items: &[String], total: usize, max: usize) -> String {
    let shown = items
        .iter()
        .take(max)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if total > max {
        format!("{shown} + {} more...", total - max)
    } else {
        shown
    }
}

/// `host:port`, bracketing IPv6 hosts as Go's `net.JoinHostPort`.
pub(super) fn join_host_port(host: &str, port: i64) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An `IntOrString` as its string form; `fallback` when absent.
pub(super) fn int_or_string(value: Obj<'_>, fallback: &str) -> String {
    if let Some(n) = value.opt_int() {
        n.to_string()
    } else if let Some(s) = value.opt_str() {
        s.to_string()
    } else {
        fallback.to_string()
    }
}

/// A resource quantity as stored. Upstream prints the canonical form
/// (`1024Mi` as `1Gi`); stored quantities are usually canonical already.
/// A missing quantity is Go's zero `Quantity`, "0".
pub(super) fn quantity(value: Obj<'_>) -> String {
    match (value.opt_str(), value.opt_int()) {
        (Some(s), _) => s.to_string(),
        (None, Some(n)) => n.to_string(),
        (None, None) => "0".into(),
    }
}

/// Go's `%t`-like rendering used by `printBoolPtr`: `True`, `False`,
/// `<unset>`.
pub(super) fn bool_ptr(value: Obj<'_>) -> String {
    match value.opt_bool() {
        Some(true) => "True".into(),
        Some(false) => "False".into(),
        None => "<unset>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn human(secs: i64) -> String {
        human_duration(SignedDuration::from_secs(secs))
    }

    #[test]
    fn human_duration_boundaries() {
        const M: i64 = 60;
        const H: i64 = 60 * M;
        const D: i64 = 24 * H;
        const Y: i64 = 365 * D;
        let cases = [
            (-2, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (182, "3m2s"),
            (10 * M - 1, "9m59s"),
            (10 * M, "10m"),
            (3 * H - 1, "179m"),
            (3 * H, "3h"),
            (5 * H + 7 * M, "5h7m"),
            (8 * H - 1, "7h59m"),
            (8 * H, "8h"),
            (48 * H - 1, "47h"),
            (48 * H, "2d"),
            (2 * D + 3 * H, "2d3h"),
            (8 * D - 1, "7d23h"),
            (8 * D, "8d"),
            (2 * Y - 1, "729d"),
            (2 * Y, "2y"),
            (3 * Y + 10 * D, "3y10d"),
            (8 * Y - 1, "7y364d"),
            (8 * Y, "8y"),
            (500 * Y, "292y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human(secs), want, "{secs}s");
        }
        // Sub-second remainders don't count, as Go's int conversions.
        assert_eq!(human_duration(SignedDuration::from_millis(1999)), "1s");
        assert_eq!(human_duration(SignedDuration::from_millis(-1999)), "0s");
    }

    #[test]
    fn since_handles_missing() {
        let now: Timestamp = "2024-01-01T00:10:00Z".parse().expect("valid");
        let then: Timestamp = "2024-01-01T00:00:00Z".parse().expect("valid");
        assert_eq!(since(now, Some(then)), "10m");
        assert_eq!(since(now, None), "<unknown>");
    }

    #[test]
    fn labels_and_selectors() {
        let v = json!({"labels": {"b": "2", "a": "1", "bad": 3}, "empty": {},
                       "sel": {"matchLabels": {"app": "x"}}, "bad_sel": {"matchLabels": {"-": "x"}}});
        let o = Obj::new(&v);
        assert_eq!(format_labels(o.get("labels")), "a=1,b=2");
        assert_eq!(format_labels(o.get("empty")), "<none>");
        assert_eq!(format_labels(o.get("missing")), "<none>");
        assert_eq!(format_label_selector(o.get("sel")), "app=x");
        assert_eq!(format_label_selector(o.get("empty")), "<none>");
        assert_eq!(format_label_selector(o.get("missing")), "<none>");
        assert_eq!(format_label_selector(o.get("bad_sel")), "<error>");
        assert_eq!(format_label_selector(o.at("labels.bad")), "<error>");
        assert_eq!(selector_string(o.get("empty")), "");
        assert_eq!(selector_string(o.get("bad_sel")), "<invalid>");
    }

    #[test]
    fn small_helpers() {
        let items: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(list_with_more(&items, 4, 3), "a,b,c + 1 more...");
        assert_eq!(list_with_more(&items[..2], 2, 3), "a,b");
        assert_eq!(join_host_port("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(join_host_port("fd00::1", 80), "[fd00::1]:80");
        let v = json!({"n": 1, "s": "25%", "q": "1Gi", "t": true});
        let o = Obj::new(&v);
        assert_eq!(int_or_string(o.get("n"), "N/A"), "1");
        assert_eq!(int_or_string(o.get("s"), "N/A"), "25%");
        assert_eq!(int_or_string(o.get("x"), "N/A"), "N/A");
        assert_eq!(quantity(o.get("q")), "1Gi");
        assert_eq!(quantity(o.get("x")), "0");
        assert_eq!(bool_ptr(o.get("t")), "True");
        assert_eq!(bool_ptr(o.get("x")), "<unset>");
    }
}
