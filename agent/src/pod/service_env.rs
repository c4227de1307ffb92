//! The Service environment variables the kubelet gives every container:
//! `{NAME}_SERVICE_HOST`/`_PORT` and the Docker-link style `{NAME}_PORT…`
//! variables, for the Services of the pod's namespace that exist when the
//! container starts (with `enableServiceLinks`, the default), and always
//! for the API server's `kubernetes` Service in `default`.

use k8s_openapi::api::core::v1::{Pod, Service};

/// The variables for `services` (any namespaces; the ones that apply are
/// picked here), sorted by Service name as upstream does.
pub fn build(pod: &Pod, services: &[Service]) -> Vec<(String, String)> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    let mut chosen: Vec<&Service> = services
        .iter()
        .filter(|s| {
            let ns = s.metadata.namespace.as_deref().unwrap_or("default");
            let name = s.metadata.name.as_deref().unwrap_or("");
            (links && ns == namespace) || (ns == "default" && name == "kubernetes")
        })
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|s| s.cluster_ip.as_deref())
                .is_some_and(|ip| !ip.is_empty() && ip != "None")
        })
        .collect();
    chosen.sort_by_key(|s| s.metadata.name.clone());
    // The pod's own namespace wins over `default` for `kubernetes`.
    chosen.dedup_by_key(|s| s.metadata.name.clone());
    let mut vars = Vec::new();
    for service in chosen {
        let Some(spec) = &service.spec else { continue };
        let ip = spec.cluster_ip.clone().unwrap_or_default();
        let prefix = service
            .metadata
            .name
            .as_deref()
            .unwrap_or("")
            .to_uppercase()
            .replace('-', "_");
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        vars.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
        vars.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for port in ports {
            if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                vars.push((
                    format!(
                        "{prefix}_SERVICE_PORT_{}",
                        name.to_uppercase().replace('-', "_")
                    ),
                    port.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.clone().unwrap_or_else(|| "TCP".into())
        };
        vars.push((
            format!("{prefix}_PORT"),
            format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
        ));
        for port in ports {
            let protocol = proto(port);
            let base = format!("{prefix}_PORT_{}_{}", port.port, protocol.to_uppercase());
            vars.push((
                base.clone(),
                format!("{}://{ip}:{}", protocol.to_lowercase(), port.port),
            ));
            vars.push((format!("{base}_PROTO"), protocol.to_lowercase()));
            vars.push((format!("{base}_PORT"), port.port.to_string()));
            vars.push((format!("{base}_ADDR"), ip.clone()));
        }
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: &str, name: &str, ip: &str, ports: serde_json::Value) -> Service {
        let value = serde_json::json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "ports": ports},
        });
        serde_json::from_value(value).unwrap_or_default()
    }

    fn pod(links: Option<bool>) -> Pod {
        let value = serde_json::json!({
            "metadata": {"name": "p", "namespace": "apps"},
            "spec": {"containers": [], "enableServiceLinks": links},
        });
        serde_json::from_value(value).unwrap_or_default()
    }

    #[test]
    fn variables_for_the_namespace_and_the_api_server() {
        let services = [
            service(
                "apps",
                "my-db",
                "10.43.0.7",
                serde_json::json!([
                    {"name": "sql", "port": 5432},
                    {"name": "metrics", "port": 9100, "protocol": "UDP"},
                ]),
            ),
            service(
                "apps",
                "headless",
                "None",
                serde_json::json!([{"port": 80}]),
            ),
            service(
                "other",
                "elsewhere",
                "10.43.0.9",
                serde_json::json!([{"port": 80}]),
            ),
            service(
                "default",
                "kubernetes",
                "10.43.0.1",
                serde_json::json!([{"name": "https", "port": 443}]),
            ),
        ];
        let vars = build(&pod(None), &services);
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MY_DB_SERVICE_HOST"), Some("10.43.0.7"));
        assert_eq!(get("MY_DB_SERVICE_PORT"), Some("5432"));
        assert_eq!(get("MY_DB_SERVICE_PORT_SQL"), Some("5432"));
        assert_eq!(get("MY_DB_SERVICE_PORT_METRICS"), Some("9100"));
        assert_eq!(get("MY_DB_PORT"), Some("tcp://10.43.0.7:5432"));
        assert_eq!(get("MY_DB_PORT_9100_UDP"), Some("udp://10.43.0.7:9100"));
        assert_eq!(get("MY_DB_PORT_5432_TCP_PROTO"), Some("tcp"));
        assert_eq!(get("MY_DB_PORT_5432_TCP_PORT"), Some("5432"));
        assert_eq!(get("MY_DB_PORT_5432_TCP_ADDR"), Some("10.43.0.7"));
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.43.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("HEADLESS_SERVICE_HOST"), None);
        assert_eq!(get("ELSEWHERE_SERVICE_HOST"), None);
        // Without service links only the API server's remain.
        let vars = build(&pod(Some(false)), &services);
        assert!(
            vars.iter().all(|(n, _)| n.starts_with("KUBERNETES_")),
            "{vars:?}"
        );
        assert!(!vars.is_empty());
    }
}
