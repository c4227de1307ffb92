//! Turns a Service and its EndpointSlices into a `ServiceSpec`, as
//! kube-proxy reads them: ports matched to slice ports by name and protocol
//! (so a named `targetPort` resolves per endpoint, as the EndpointSlice
//! controller wrote it), IPv4 only, conditions defaulted as the API says.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use thiserror::Error;

use super::model::{Backend, Protocol, ServiceKey, ServicePort, ServiceSpec};

/// Upstream's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error("service has no {0}")]
    MissingMetadata(&'static str),
    #[error("service {service}: cluster IP {ip:?} is not an address")]
    BadClusterIp { service: ServiceKey, ip: String },
    #[error("service {service}: port {port} out of range")]
    BadPort { service: ServiceKey, port: i32 },
}

/// The Service's translation, or `None` when the data plane has nothing to
/// do for it: headless (`clusterIP: None`), ExternalName, no IPv4 cluster IP
/// yet. `slices` are the EndpointSlices labelled with the Service's name.
pub fn translate(
    service: &Service,
    slices: &[EndpointSlice],
) -> Result<Option<ServiceSpec>, TranslateError> {
    let key = ServiceKey::new(
        service
            .metadata
            .namespace
            .clone()
            .ok_or(TranslateError::MissingMetadata("namespace"))?,
        service
            .metadata
            .name
            .clone()
            .ok_or(TranslateError::MissingMetadata("name"))?,
    );
    let Some(spec) = &service.spec else {
        return Ok(None);
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Ok(None);
    }
    let cluster_ips = cluster_ips(&key, spec)?;
    if cluster_ips.is_empty() {
        return Ok(None);
    }
    let node_facing = matches!(kind, "NodePort" | "LoadBalancer");
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(protocol) = protocol(port.protocol.as_deref()) else {
            continue; // SCTP: not balanced here.
        };
        let number = port_number(&key, port.port)?;
        let node_port = match port.node_port {
            Some(n) if node_facing && n != 0 => Some(port_number(&key, n)?),
            _ => None,
        };
        let name = port.name.clone().unwrap_or_default();
        let backends = backends(slices, &name, protocol);
        ports.push(ServicePort {
            name,
            protocol,
            port: number,
            node_port,
            backends,
        });
    }
    let affinity_timeout_secs = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS)
    });
    Ok(Some(ServiceSpec {
        key,
        cluster_ips,
        ports,
        load_balancer: kind == "LoadBalancer",
        external_local: node_facing && spec.external_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout_secs,
    }))
}

fn cluster_ips(
    key: &ServiceKey,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<Vec<Ipv4Addr>, TranslateError> {
    let listed = spec
        .cluster_ips
        .clone()
        .filter(|ips| !ips.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    let mut out = Vec::new();
    for ip in listed {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => out.push(v4),
            Ok(std::net::IpAddr::V6(_)) => {} // IPv6 is not served yet.
            Err(_) => {
                return Err(TranslateError::BadClusterIp {
                    service: key.clone(),
                    ip,
                });
            }
        }
    }
    Ok(out)
}

fn protocol(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn port_number(key: &ServiceKey, port: i32) -> Result<u16, TranslateError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| TranslateError::BadPort {
            service: key.clone(),
            port,
        })
}

/// The endpoints of one Service port across all slices, each with the
/// number its slice gives the port of that name. An address listed twice
/// keeps its readiest entry.
fn backends(slices: &[EndpointSlice], port_name: &str, protocol: Protocol) -> Vec<Backend> {
    let mut found: BTreeMap<(Ipv4Addr, u16), Backend> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(number) = slice.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or("") == port_name;
            let same_protocol = self::protocol(p.protocol.as_deref()) == Some(protocol);
            (same_name && same_protocol)
                .then_some(p.port)
                .flatten()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
        }) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // Upstream uses the first address; the rest are "fungible".
            let Some(addr) = endpoint.addresses.first().and_then(|a| a.parse().ok()) else {
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let backend = Backend {
                addr,
                port: number,
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                node: endpoint.node_name.clone(),
            };
            found
                .entry((addr, number))
                .and_modify(|b| {
                    if backend.ready && !b.ready {
                        *b = backend.clone();
                    }
                })
                .or_insert(backend);
        }
    }
    found.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "web"},
            "spec": spec,
        }))
        .expect("service json")
    }

    fn slice(ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "web-abc"},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .expect("slice json")
    }

    #[test]
    fn named_target_ports_resolve_per_endpoint() {
        let svc = service(json!({
            "clusterIP": "10.43.0.20",
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            ],
        }));
        let slices = [
            slice(
                json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                       {"name": "dns", "port": 5353, "protocol": "UDP"}]),
                json!([{"addresses": ["10.42.0.5"], "conditions": {"ready": true}, "nodeName": "a"}]),
            ),
            slice(
                json!([{"name": "http", "port": 9090, "protocol": "TCP"}]),
                json!([{"addresses": ["10.42.1.7"], "conditions": {"ready": false, "serving": true, "terminating": true}}]),
            ),
        ];
        let spec = translate(&svc, &slices).expect("valid").expect("served");
        assert_eq!(spec.cluster_ips, vec![Ipv4Addr::new(10, 43, 0, 20)]);
        let http = &spec.ports[0];
        assert_eq!((http.protocol, http.port), (Protocol::Tcp, 80));
        let got: Vec<_> = http
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.port))
            .collect();
        assert_eq!(
            got,
            [("10.42.0.5".into(), 8080), ("10.42.1.7".to_string(), 9090)]
        );
        assert_eq!(http.backends[0].node.as_deref(), Some("a"));
        assert!(
            http.backends[1].terminating && http.backends[1].serving && !http.backends[1].ready
        );
        let dns = &spec.ports[1];
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.backends.len(), 1, "the second slice has no dns port");
        assert_eq!(dns.backends[0].port, 5353);
    }

    #[test]
    fn headless_and_external_name_are_not_served() {
        let headless = service(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        assert_eq!(translate(&headless, &[]), Ok(None));
        let external = service(json!({"type": "ExternalName", "externalName": "example.com"}));
        assert_eq!(translate(&external, &[]), Ok(None));
    }

    #[test]
    fn node_port_policy_and_affinity() {
        let svc = service(json!({
            "type": "NodePort",
            "clusterIPs": ["10.43.0.9", "fd00::9"],
            "externalTrafficPolicy": "Local",
            "sessionAffinity": "ClientIP",
            "ports": [{"port": 80, "nodePort": 30080}],
        }));
        let spec = translate(&svc, &[]).expect("valid").expect("served");
        assert_eq!(spec.cluster_ips, vec![Ipv4Addr::new(10, 43, 0, 9)]);
        assert_eq!(spec.ports[0].node_port, Some(30080));
        assert!(spec.external_local && !spec.load_balancer);
        assert_eq!(
            spec.affinity_timeout_secs,
            Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
        );
    }

    #[test]
    fn conditions_default_as_the_api_says() {
        let svc = service(json!({"clusterIP": "10.43.0.1", "ports": [{"port": 80}]}));
        let slices = [slice(
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.42.0.9"]}, {"addresses": ["not-an-ip"]}]),
        )];
        let spec = translate(&svc, &slices).expect("valid").expect("served");
        let b = &spec.ports[0].backends;
        assert_eq!(b.len(), 1);
        assert!(b[0].ready && b[0].serving && !b[0].terminating);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let svc = service(json!({"clusterIP": "10.43.0.300", "ports": [{"port": 80}]}));
        assert!(matches!(
            translate(&svc, &[]),
            Err(TranslateError::BadClusterIp { .. })
        ));
        let svc = service(json!({"clusterIP": "10.43.0.3", "ports": [{"port": 70000}]}));
        assert!(matches!(
            translate(&svc, &[]),
            Err(TranslateError::BadPort { .. })
        ));
        let nameless: Service = serde_json::from_value(json!({"spec": {}})).expect("json");
        assert!(matches!(
            translate(&nameless, &[]),
            Err(TranslateError::MissingMetadata(_))
        ));
    }
}
