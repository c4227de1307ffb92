//! The few samples the resource metrics API needs from a node agent's
//! `/metrics/resource` (Prometheus text format, as the kubelet serves it):
//! cumulative CPU seconds and working-set bytes, per container and for
//! the node.

use std::collections::HashMap;

/// One container's readings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerSample {
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<f64>,
}

/// Everything one scrape said.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    pub node_cpu_seconds: Option<f64>,
    pub node_memory_bytes: Option<f64>,
    /// By (namespace, pod, container).
    pub containers: HashMap<(String, String, String), ContainerSample>,
}

/// Reads the samples Skiff uses and skips every other line; a malformed
/// line is skipped too (one bad series must not hide a whole node).
pub fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else {
            continue;
        };
        match name {
            "node_cpu_usage_seconds_total" => scrape.node_cpu_seconds = Some(value),
            "node_memory_working_set_bytes" => scrape.node_memory_bytes = Some(value),
            "container_cpu_usage_seconds_total" | "container_memory_working_set_bytes" => {
                let (Some(ns), Some(pod), Some(container)) = (
                    label(labels, "namespace"),
                    label(labels, "pod"),
                    label(labels, "container"),
                ) else {
                    continue;
                };
                let sample = scrape.containers.entry((ns, pod, container)).or_default();
                if name == "container_cpu_usage_seconds_total" {
                    sample.cpu_seconds = Some(value);
                } else {
                    sample.memory_bytes = Some(value);
                }
            }
            _ => {}
        }
    }
    scrape
}

/// `name{labels} value [timestamp]` → (name, labels text, value).
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line[open..].rfind('}')? + open;
            (&line[..open], &line[open + 1..close], &line[close + 1..])
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], "", &line[space..])
        }
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    value.is_finite().then_some((name.trim(), labels, value))
}

/// The value of label `key` in `a="x",b="y"` (with `\"`, `\\`, `\n` escapes).
fn label(labels: &str, key: &str) -> Option<String> {
    let mut rest = labels;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        if name == key {
            return Some(value);
        }
        rest = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_node_and_container_samples() {
        let text = r#"# HELP container_cpu_usage_seconds_total [STABLE] Cumulative cpu time
# TYPE container_cpu_usage_seconds_total counter
container_cpu_usage_seconds_total{container="app",namespace="default",pod="web-1"} 12.5 1700000000000
container_memory_working_set_bytes{container="app",namespace="default",pod="web-1"} 1.048576e+07 1700000000000
container_memory_working_set_bytes{container="odd \"one\"",namespace="x",pod="p"} 5
node_cpu_usage_seconds_total 300.25 1700000000000
node_memory_working_set_bytes 2e9
scrape_error 0
broken{container="a" 1
container_cpu_usage_seconds_total{namespace="default",pod="no-container"} 1
"#;
        let scrape = parse(text);
        assert_eq!(scrape.node_cpu_seconds, Some(300.25));
        assert_eq!(scrape.node_memory_bytes, Some(2e9));
        let key = |ns: &str, pod: &str, c: &str| (ns.to_owned(), pod.to_owned(), c.to_owned());
        assert_eq!(
            scrape.containers[&key("default", "web-1", "app")],
            ContainerSample {
                cpu_seconds: Some(12.5),
                memory_bytes: Some(10_485_760.0)
            }
        );
        assert_eq!(
            scrape.containers[&key("x", "p", "odd \"one\"")].memory_bytes,
            Some(5.0)
        );
        assert_eq!(scrape.containers.len(), 2);
    }
}
