//! From Kubernetes objects to DNS records, per the Kubernetes DNS
//! specification (kubernetes/dns docs/specification.md, schema 1.1.0).
//! The objects are first reduced to the few fields DNS needs, so the
//! watch state stays small.

use std::net::IpAddr;

use hickory_proto::rr::Name;
use kube::ResourceExt;

use crate::objects::{EndpointSlice, Pod, Port, Service};
use crate::zone::{Data, Rec, child};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub kind: ServiceKind,
    pub ports: Vec<PortInfo>,
    pub publish_not_ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    ClusterIp(Vec<IpAddr>),
    Headless,
    ExternalName(String),
}

/// A named port; unnamed ports have no SRV record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    /// Lowercased: `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: String,
    pub ports: Vec<PortInfo>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    pub hostname: Option<String>,
    pub ready: bool,
}

/// A pod that asks for a DNS name: `<hostname>.<subdomain>.<ns>.svc.<zone>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub hostname: String,
    pub subdomain: String,
    pub ips: Vec<IpAddr>,
    pub ready: bool,
}

impl ServiceInfo {
    pub fn from_service(svc: &Service) -> Option<Self> {
        let spec = svc.spec.as_ref()?;
        let kind = if spec.type_.as_deref() == Some("ExternalName") {
            ServiceKind::ExternalName(spec.external_name.clone()?)
        } else if spec.cluster_ip.as_deref() == Some("None") {
            ServiceKind::Headless
        } else {
            let mut ips: Vec<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            ips.sort();
            ips.dedup();
            if ips.is_empty() {
                return None;
            }
            ServiceKind::ClusterIp(ips)
        };
        let ports = PortInfo::named(spec.ports.as_deref());
        Some(ServiceInfo {
            kind,
            ports,
            publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        })
    }
}

impl PortInfo {
    /// The named ones of `ports`, as SRV records need them.
    fn named(ports: Option<&[Port]>) -> Vec<PortInfo> {
        ports
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(PortInfo {
                    name: p.name.clone().filter(|n| !n.is_empty())?,
                    protocol: p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
                    port: u16::try_from(p.port?).ok()?,
                })
            })
            .collect()
    }
}

impl SliceInfo {
    pub fn from_slice(slice: &EndpointSlice) -> Option<Self> {
        let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
        let ports = PortInfo::named(slice.ports.as_deref());
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .map(|ep| EndpointInfo {
                addresses: ep
                    .addresses
                    .iter()
                    .flatten()
                    .filter_map(|a| a.parse().ok())
                    .collect(),
                hostname: ep.hostname.clone().filter(|h| !h.is_empty()),
                // An unknown readiness counts as ready (the API's rule).
                ready: ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            })
            .collect();
        Some(SliceInfo {
            service,
            ports,
            endpoints,
        })
    }
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        let hostname = spec.hostname.clone().filter(|h| !h.is_empty())?;
        let subdomain = spec.subdomain.clone().filter(|s| !s.is_empty())?;
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.as_deref()?.parse().ok())
            .chain(
                status
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|ip| ip.parse().ok()),
            )
            .collect();
        ips.sort();
        ips.dedup();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_.as_deref() == Some("Ready") && c.status.as_deref() == Some("True"));
        Some(PodInfo {
            hostname,
            subdomain,
            ips,
            ready,
        })
    }
}

/// Every record of Service `name` in namespace `ns`, given its slices and
/// the pods whose subdomain names it.
pub fn service_records<'a>(
    apex: &Name,
    ns: &str,
    name: &str,
    svc: &ServiceInfo,
    slices: impl Iterator<Item = &'a SliceInfo>,
    pods: impl Iterator<Item = &'a PodInfo>,
) -> Vec<Rec> {
    let Some(svc_name) = child(apex, &[name, ns, "svc"]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    match &svc.kind {
        ServiceKind::ExternalName(target) => {
            if let Ok(target) = Name::from_ascii(target) {
                let mut target = target.to_lowercase();
                target.set_fqdn(true);
                out.push(rec(&svc_name, Data::Cname(target)));
            }
        }
        ServiceKind::ClusterIp(ips) => {
            for ip in ips {
                out.push(rec(&svc_name, Data::address(*ip)));
                out.push(rec(&Name::from(*ip), Data::Ptr(svc_name.clone())));
            }
            for port in &svc.ports {
                if let Some(srv) = srv_name(&svc_name, port) {
                    out.push(rec(&srv, srv_data(port.port, 100, &svc_name)));
                }
            }
        }
        ServiceKind::Headless => {
            headless_records(&svc_name, svc, slices, pods, &mut out);
        }
    }
    out
}

fn headless_records<'a>(
    svc_name: &Name,
    svc: &ServiceInfo,
    slices: impl Iterator<Item = &'a SliceInfo>,
    pods: impl Iterator<Item = &'a PodInfo>,
    out: &mut Vec<Rec>,
) {
    // (hostname, address, ports) of every endpoint that is served.
    let mut served: Vec<(Name, IpAddr, &[PortInfo])> = Vec::new();
    for slice in slices {
        for ep in &slice.endpoints {
            if !(ep.ready || svc.publish_not_ready) {
                continue;
            }
            for ip in &ep.addresses {
                let label = ep.hostname.clone().unwrap_or_else(|| dashed(*ip));
                if let Some(host) = child(svc_name, &[&label]) {
                    served.push((host, *ip, &slice.ports));
                }
            }
        }
    }
    let srv_targets = served.len().max(1) as u16;
    for (host, ip, ports) in &served {
        out.push(rec(svc_name, Data::address(*ip)));
        out.push(rec(host, Data::address(*ip)));
        out.push(rec(&Name::from(*ip), Data::Ptr(host.clone())));
        for port in ports.iter() {
            if let Some(srv) = srv_name(svc_name, port) {
                out.push(rec(&srv, srv_data(port.port, 100 / srv_targets, host)));
            }
        }
    }
    for pod in pods {
        if !(pod.ready || svc.publish_not_ready) {
            continue;
        }
        if let Some(host) = child(svc_name, &[&pod.hostname]) {
            for ip in &pod.ips {
                out.push(rec(&host, Data::address(*ip)));
            }
        }
    }
    out.sort();
    out.dedup();
}

fn rec(name: &Name, data: Data) -> Rec {
    Rec {
        name: name.clone(),
        data,
    }
}

fn srv_name(svc_name: &Name, port: &PortInfo) -> Option<Name> {
    child(
        svc_name,
        &[&format!("_{}", port.name), &format!("_{}", port.protocol)],
    )
}

fn srv_data(port: u16, weight: u16, target: &Name) -> Data {
    Data::Srv {
        priority: 0,
        weight: weight.max(1),
        port,
        target: target.clone(),
    }
}

/// The system-assigned hostname of an endpoint without one: its address
/// with dashes, as CoreDNS does (`10-42-0-5`, `fd00--5`).
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}
