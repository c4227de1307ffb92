//! Service networking: Services, Endpoints, EndpointSlices, Ingresses,
//! IngressClasses and NetworkPolicies.

use std::collections::BTreeSet;

use super::format::{format_label_selector, format_labels, join_host_port, list_with_more};
use super::value::Obj;
use super::{AGE, Column, NAME, Printer};

/// At most this many endpoints, ports or hosts are listed in one cell.
const MAX_LISTED: usize = 3;

pub(super) static SERVICES: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Type",
            "string",
            "How the service is exposed: ClusterIP, NodePort, LoadBalancer or ExternalName.",
        ),
        Column::new(
            "Cluster-IP",
            "string",
            "The service's virtual IP inside the cluster.",
        ),
        Column::new(
            "External-IP",
            "string",
            "Addresses the service is reachable at from outside the cluster.",
        ),
        Column::new(
            "Port(s)",
            "string",
            "Service ports as port[:nodePort]/protocol.",
        ),
        AGE,
        Column::new(
            "Selector",
            "string",
            "Labels of the pods that back the service.",
        )
        .wide(),
    ],
    |svc, ctx| {
        let cluster_ip = svc
            .at("spec.clusterIPs")
            .items()
            .next()
            .map(|ip| ip.str())
            .or_else(|| {
                svc.at("spec.clusterIP")
                    .opt_str()
                    .filter(|ip| !ip.is_empty())
            })
            .unwrap_or("<none>");
        let ports = service_ports(svc.at("spec.ports"));
        cells![
            svc.at("metadata.name").str(),
            service_type(svc),
            cluster_ip,
            external_ip(svc),
            if ports.is_empty() {
                "<none>".into()
            } else {
                ports
            },
            ctx.age(svc),
            format_labels(svc.at("spec.selector")),
        ]
    },
);

pub(super) static ENDPOINTS: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Endpoints",
            "string",
            "Ready addresses and ports behind the service.",
        ),
        AGE,
    ],
    |ep, ctx| {
        cells![
            ep.at("metadata.name").str(),
            endpoints(ep.get("subsets")),
            ctx.age(ep)
        ]
    },
);

pub(super) static ENDPOINT_SLICES: Printer = Printer::new(
    &[
        NAME,
        Column::new("AddressType", "string", "IPv4, IPv6 or FQDN."),
        Column::new("Ports", "string", "Ports of the endpoints."),
        Column::new("Endpoints", "string", "Addresses of the endpoints."),
        AGE,
    ],
    |slice, ctx| {
        let ports: Vec<String> = slice
            .get("ports")
            .items()
            .map(|p| {
                if let Some(port) = p.get("port").opt_int() {
                    port.to_string()
                } else if let Some(name) = p.get("name").opt_str() {
                    name.to_string()
                } else {
                    "*".to_string()
                }
            })
            .collect();
        let addresses: Vec<String> = slice
            .get("endpoints")
            .items()
            .flat_map(|e| e.get("addresses").items())
            .map(|a| a.str().to_string())
            .collect();
        cells![
            slice.at("metadata.name").str(),
            slice.get("addressType").str(),
            or_unset(list_with_more(&ports, ports.len(), MAX_LISTED)),
            or_unset(list_with_more(&addresses, addresses.len(), MAX_LISTED)),
            ctx.age(slice),
        ]
    },
);

pub(super) static INGRESSES: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Class",
            "string",
            "The IngressClass that implements this ingress.",
        ),
        Column::new("Hosts", "string", "Host names the rules match."),
        Column::new(
            "Address",
            "string",
            "Addresses the ingress is reachable at.",
        ),
        Column::new("Ports", "string", "Ports the ingress listens on."),
        AGE,
    ],
    |ing, ctx| {
        let ports = if ing.at("spec.tls").len() > 0 {
            "80, 443"
        } else {
            "80"
        };
        cells![
            ing.at("metadata.name").str(),
            ing.at("spec.ingressClassName")
                .opt_str()
                .unwrap_or("<none>"),
            ingress_hosts(ing.at("spec.rules")),
            load_balancer_addresses(ing.at("status.loadBalancer.ingress")),
            ports,
            ctx.age(ing),
        ]
    },
);

pub(super) static INGRESS_CLASSES: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Controller",
            "string",
            "The controller that implements this class.",
        ),
        Column::new(
            "Parameters",
            "string",
            "Resource with the controller's parameters.",
        ),
        AGE,
    ],
    |class, ctx| {
        let params = class.at("spec.parameters");
        let parameters = if params.is_set() {
            let kind = params.get("kind").str();
            let name = params.get("name").str();
            match params.get("apiGroup").opt_str() {
                Some(group) => format!("{kind}.{group}/{name}"),
                None => format!("{kind}/{name}"),
            }
        } else {
            "<none>".into()
        };
        cells![
            class.at("metadata.name").str(),
            class.at("spec.controller").str(),
            parameters,
            ctx.age(class),
        ]
    },
);

pub(super) static NETWORK_POLICIES: Printer = Printer::new(
    &[
        NAME,
        Column::new("Pod-Selector", "string", "Pods the policy applies to."),
        AGE,
    ],
    |np, ctx| {
        cells![
            np.at("metadata.name").str(),
            format_label_selector(np.at("spec.podSelector")),
            ctx.age(np),
        ]
    },
);

/// `spec.type`, which the API server defaults to ClusterIP.
fn service_type(svc: Obj<'_>) -> &str {
    svc.at("spec.type").opt_str().unwrap_or("ClusterIP")
}

/// The EXTERNAL-IP cell: external IPs, load-balancer addresses (or
/// `<pending>` until there are some), or the external name.
fn external_ip(svc: Obj<'_>) -> String {
    let external: Vec<&str> = svc
        .at("spec.externalIPs")
        .items()
        .map(|ip| ip.str())
        .collect();
    match service_type(svc) {
        "ClusterIP" | "NodePort" if external.is_empty() => "<none>".into(),
        "ClusterIP" | "NodePort" => external.join(","),
        "LoadBalancer" => {
            let lb = load_balancer_addresses(svc.at("status.loadBalancer.ingress"));
            match (lb.is_empty(), external.is_empty()) {
                (_, false) => {
                    let mut all: Vec<&str> = lb.split(',').filter(|s| !s.is_empty()).collect();
                    all.extend(external);
                    all.join(",")
                }
                (false, true) => lb,
                (true, true) => "<pending>".into(),
            }
        }
        "ExternalName" => svc.at("spec.externalName").str().into(),
        _ => "<unknown>".into(),
    }
}

/// Load-balancer ingress points (IP, else hostname), sorted and unique.
/// The server always renders wide rows, so they are never shortened.
fn load_balancer_addresses(ingress: Obj<'_>) -> String {
    let addresses: BTreeSet<&str> = ingress
        .items()
        .filter_map(|i| {
            let ip = i.get("ip").str();
            let host = i.get("hostname").str();
            [ip, host].into_iter().find(|s| !s.is_empty())
        })
        .collect();
    addresses.into_iter().collect::<Vec<_>>().join(",")
}

/// `80/TCP`, or `80:30080/TCP` with a node port, comma-joined.
fn service_ports(ports: Obj<'_>) -> String {
    let pieces: Vec<String> = ports
        .items()
        .map(|p| {
            let port = p.get("port").int();
            // The API server defaults the protocol to TCP.
            let protocol = p.get("protocol").opt_str().unwrap_or("TCP");
            match p.get("nodePort").int() {
                node_port if node_port > 0 => format!("{port}:{node_port}/{protocol}"),
                _ => format!("{port}/{protocol}"),
            }
        })
        .collect();
    pieces.join(",")
}

/// The ENDPOINTS cell of an Endpoints object: `ip:port` for every address
/// and port (bare IPs for port-less headless services), first three shown.
fn endpoints(subsets: Obj<'_>) -> String {
    if subsets.len() == 0 {
        return "<none>".into();
    }
    let mut shown = Vec::new();
    let mut total = 0;
    for subset in subsets.items() {
        let addresses = subset.get("addresses");
        let ips = || addresses.items().map(|a| a.get("ip").str());
        if subset.get("ports").len() == 0 {
            total += addresses.len();
            shown.extend(ips().map(String::from));
            continue;
        }
        for port in subset.get("ports").items() {
            let port = port.get("port").int();
            total += addresses.len();
            shown.extend(ips().map(|ip| join_host_port(ip, port)));
        }
    }
    list_with_more(&shown, total, MAX_LISTED)
}

/// Rule hosts, `*` when no rule names one, first three shown.
fn ingress_hosts(rules: Obj<'_>) -> String {
    let mut hosts = Vec::new();
    let mut more = false;
    for rule in rules.items() {
        // Upstream stops collecting at three hosts, then counts every rule
        // beyond the third as "more", with a host or not.
        if hosts.len() == MAX_LISTED {
            more = true;
        }
        let host = rule.get("host").str();
        if !more && !host.is_empty() {
            hosts.push(host);
        }
    }
    if hosts.is_empty() {
        return "*".into();
    }
    let joined = hosts.join(",");
    if more {
        format!("{joined} + {} more...", rules.len() - MAX_LISTED)
    } else {
        joined
    }
}

fn or_unset(s: String) -> String {
    if s.is_empty() { "<unset>".into() } else { s }
}
