//! Resource requests and limits: quantities, QoS classes and the sums a
//! pod cgroup is given, as upstream computes them.

use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Upstream's QoS classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
}

/// Sums over a pod's containers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodTotals {
    pub cpu_request_millis: u64,
    /// Only when every container has one.
    pub cpu_limit_millis: Option<u64>,
    pub memory_limit: Option<u64>,
}

/// The QoS class: Guaranteed when every container has equal CPU and
/// memory requests and limits, BestEffort when none has any, else
/// Burstable.
pub fn qos(pod: &Pod) -> Qos {
    let Some(spec) = &pod.spec else {
        return Qos::BestEffort;
    };
    let all = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let mut any = false;
    let mut guaranteed = true;
    for c in all {
        let (requests, limits) = requests_limits(c);
        for resource in ["cpu", "memory"] {
            let request = requests.and_then(|r| r.get(resource));
            let limit = limits.and_then(|l| l.get(resource));
            if request.is_some() || limit.is_some() {
                any = true;
            }
            // A request defaults to the limit when only the limit is set.
            let request = request.or(limit);
            match (request, limit) {
                (Some(r), Some(l)) if parse(r, resource) == parse(l, resource) => {}
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        Qos::BestEffort
    } else if guaranteed {
        Qos::Guaranteed
    } else {
        Qos::Burstable
    }
}

pub fn pod_totals(pod: &Pod) -> PodTotals {
    let Some(spec) = &pod.spec else {
        return PodTotals::default();
    };
    let mut totals = PodTotals {
        cpu_request_millis: 0,
        cpu_limit_millis: Some(0),
        memory_limit: Some(0),
    };
    for c in &spec.containers {
        totals.cpu_request_millis += container_cpu_request(c);
        let limit = |name: &str| limit(c, name);
        totals.cpu_limit_millis = totals
            .cpu_limit_millis
            .zip(limit("cpu"))
            .map(|(a, b)| a + b);
        totals.memory_limit = totals.memory_limit.zip(limit("memory")).map(|(a, b)| a + b);
    }
    totals
}

/// A container's CPU request in millicores (the limit when only that is set).
pub fn container_cpu_request(c: &Container) -> u64 {
    let (requests, limits) = requests_limits(c);
    requests
        .and_then(|r| r.get("cpu"))
        .or_else(|| limits.and_then(|l| l.get("cpu")))
        .and_then(|q| parse(q, "cpu"))
        .unwrap_or(0)
}

/// A container's limit: millicores for `cpu`, bytes otherwise.
pub fn limit(c: &Container, resource: &str) -> Option<u64> {
    let (_, limits) = requests_limits(c);
    limits
        .and_then(|l| l.get(resource))
        .and_then(|q| parse(q, resource))
}

/// A container's request: millicores for `cpu`, bytes otherwise.
pub fn request(c: &Container, resource: &str) -> Option<u64> {
    let (requests, limits) = requests_limits(c);
    requests
        .and_then(|r| r.get(resource))
        .or_else(|| limits.and_then(|l| l.get(resource)))
        .and_then(|q| parse(q, resource))
}

/// cgroup v1 `cpu.shares` for a request, as upstream maps it (min 2).
pub fn cpu_shares(millis: u64) -> u64 {
    (millis * 1024 / 1000).max(2)
}

/// A container's requests or limits.
type Amounts<'a> = Option<&'a std::collections::BTreeMap<String, Quantity>>;

fn requests_limits(c: &Container) -> (Amounts<'_>, Amounts<'_>) {
    let r: Option<&ResourceRequirements> = c.resources.as_ref();
    (
        r.and_then(|r| r.requests.as_ref()),
        r.and_then(|r| r.limits.as_ref()),
    )
}

/// Millicores for `cpu`, whole units (bytes) for anything else.
pub fn parse(q: &Quantity, resource: &str) -> Option<u64> {
    let value = parse_quantity(&q.0)?;
    let scaled = if resource == "cpu" {
        value * 1000.0
    } else {
        value
    };
    (scaled >= 0.0).then(|| scaled.ceil() as u64)
}

/// A Kubernetes quantity (`100m`, `1.5`, `64Mi`, `1G`, `1e3`) as a number.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse() {
        assert_eq!(parse(&Quantity("100m".into()), "cpu"), Some(100));
        assert_eq!(parse(&Quantity("1.5".into()), "cpu"), Some(1500));
        assert_eq!(parse(&Quantity("64Mi".into()), "memory"), Some(64 << 20));
        assert_eq!(parse(&Quantity("1G".into()), "memory"), Some(1_000_000_000));
        assert_eq!(parse(&Quantity("1e3".into()), "memory"), Some(1000));
        assert_eq!(parse(&Quantity("lots".into()), "memory"), None);
        assert_eq!(cpu_shares(0), 2);
        assert_eq!(cpu_shares(1000), 1024);
    }

    #[test]
    fn qos_classes() {
        let pod = |resources: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "spec": {"containers": [{"name": "c", "resources": resources}]}
            }))
            .unwrap()
        };
        assert_eq!(qos(&pod(serde_json::json!({}))), Qos::BestEffort);
        assert_eq!(
            qos(&pod(
                serde_json::json!({"limits": {"cpu": "1", "memory": "1Gi"}})
            )),
            Qos::Guaranteed
        );
        assert_eq!(
            qos(&pod(serde_json::json!({"requests": {"cpu": "100m"}}))),
            Qos::Burstable
        );
    }
}
