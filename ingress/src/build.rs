//! Turns the watched objects into a routing table and a certificate table.
//! A pure function of the object snapshots (plus caches that only save
//! work), so every rebuild is a complete, consistent picture; problems in
//! one Ingress (a missing Service or Secret, a bad annotation) are
//! returned for events and leave every other route alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use kube::ResourceExt;
use rustls::sign::CertifiedKey;

use crate::annotations::{Protocol, Settings};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::route::{Backend, Canary, Endpoint, RateLimiter, Route};
use crate::table::{HostMatch, PathKind, Table, normalise_prefix};
use crate::tls::{self, Certs};

pub const CLASS_NAME: &str = "skiff";
pub const CONTROLLER: &str = "skiff.io/ingress";
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What requests are served from; swapped whole on every change.
pub struct Snapshot {
    pub table: Table<Arc<Route>>,
    pub certs: Certs,
}

/// Something wrong with one Ingress, reported as a Warning event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

pub struct Built {
    pub snapshot: Snapshot,
    /// The Ingresses this controller serves, with their problems.
    pub ours: Vec<(Arc<Ingress>, Vec<Problem>)>,
}

/// The watched objects at one moment.
pub struct Objects<'a> {
    pub ingresses: &'a [Arc<Ingress>],
    pub classes: &'a [Arc<IngressClass>],
    pub services: &'a [Arc<Service>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub secrets: &'a [Arc<Secret>],
}

/// State kept from one build to the next so that counters, rate limits and
/// parsed certificates survive a rebuild.
pub struct Builder {
    metrics: Arc<Metrics>,
    limiters: HashMap<(String, u32), Arc<RateLimiter>>,
    parsed: HashMap<(String, String), Result<Arc<CertifiedKey>, String>>,
    default_cert: Arc<CertifiedKey>,
    /// Upstream connection pools by endpoint, so a rebuild keeps them.
    pools: HashMap<SocketAddr, Arc<Pool>>,
}

type Key = (String, String);

fn key(ns: &str, name: &str) -> Key {
    (ns.to_owned(), name.to_owned())
}

impl Builder {
    pub fn new(metrics: Arc<Metrics>, default_cert: Arc<CertifiedKey>) -> Self {
        Builder {
            metrics,
            limiters: HashMap::new(),
            parsed: HashMap::new(),
            default_cert,
            pools: HashMap::new(),
        }
    }

    pub fn build(&mut self, objects: &Objects<'_>) -> Built {
        let services: HashMap<Key, &Service> = objects
            .services
            .iter()
            .map(|s| (key(&s.namespace().unwrap_or_default(), &s.name_any()), &**s))
            .collect();
        let mut slices: HashMap<Key, Vec<&EndpointSlice>> = HashMap::new();
        for slice in objects.slices {
            if let Some(svc) = slice.labels().get(SERVICE_NAME_LABEL) {
                let ns = slice.namespace().unwrap_or_default();
                slices.entry(key(&ns, svc)).or_default().push(slice);
            }
        }
        let secrets: HashMap<Key, &Secret> = objects
            .secrets
            .iter()
            .map(|s| (key(&s.namespace().unwrap_or_default(), &s.name_any()), &**s))
            .collect();

        let mut ours: Vec<Arc<Ingress>> = objects
            .ingresses
            .iter()
            .filter(|i| is_ours(i, objects.classes))
            .cloned()
            .collect();
        ours.sort_by(|a, b| {
            let at = |i: &Ingress| i.metadata.creation_timestamp.as_ref().map(|t| t.0);
            (at(a), a.namespace(), a.name_any()).cmp(&(at(b), b.namespace(), b.name_any()))
        });

        let mut pools = std::mem::take(&mut self.pools);
        let mut ctx = Ctx {
            services: &services,
            slices: &slices,
            backends: HashMap::new(),
            pools: &mut pools,
            used: HashSet::new(),
        };
        let mut problems: Vec<Vec<Problem>> = vec![Vec::new(); ours.len()];
        let mut parsed_settings = Vec::with_capacity(ours.len());
        for (ing, problems) in ours.iter().zip(problems.iter_mut()) {
            let (settings, bad) = Settings::parse(ing.metadata.annotations.as_ref());
            problems.extend(bad.into_iter().map(|message| Problem {
                reason: "BadAnnotation",
                message,
            }));
            parsed_settings.push(Arc::new(settings));
        }

        // Canaries first, so that each primary route picks its canary up.
        let mut canaries: HashMap<(HostMatch, PathKind, String), Canary> = HashMap::new();
        for ((ing, settings), problems) in ours.iter().zip(&parsed_settings).zip(&mut problems) {
            let Some(weight) = settings.canary_weight else {
                continue;
            };
            let ns = ing.namespace().unwrap_or_default();
            for (host, kind, path, backend) in rule_paths(ing) {
                let Some(backend) = ctx.backend(&ns, backend, settings.protocol, problems) else {
                    continue;
                };
                canaries
                    .entry((host, kind, path))
                    .or_insert(Canary { weight, backend });
            }
        }

        let mut table = Table::default();
        let mut certs = Certs::new(self.default_cert.clone());
        for ((ing, settings), problems) in ours.iter().zip(&parsed_settings).zip(&mut problems) {
            if settings.canary_weight.is_some() {
                continue;
            }
            let ns = ing.namespace().unwrap_or_default();
            let name = format!("{ns}/{}", ing.name_any());
            let tls_hosts = self.add_certs(ing, &ns, &secrets, &mut certs, problems);
            let limiter = settings.limit_rps.map(|rps| {
                self.limiters
                    .entry((name.clone(), rps))
                    .or_insert_with(|| Arc::new(RateLimiter::new(rps)))
                    .clone()
            });
            for (host, kind, path, backend_ref) in rule_paths(ing) {
                let Some(backend) = ctx.backend(&ns, backend_ref, settings.protocol, problems)
                else {
                    continue;
                };
                let host_label = match &host {
                    HostMatch::Any => String::new(),
                    HostMatch::Exact(h) => h.clone(),
                    HostMatch::Wildcard(p) => format!("*.{p}"),
                };
                let redirect_https = settings.ssl_redirect
                    && host != HostMatch::Any
                    && tls_hosts.iter().any(|t| tls_covers(t, &host));
                let route = Route {
                    ingress: name.clone(),
                    backend,
                    canary: canaries.remove(&(host.clone(), kind, path.clone())),
                    settings: settings.clone(),
                    redirect_https,
                    limiter: limiter.clone(),
                    metrics: self.metrics.route(&name, &host_label, &path),
                };
                if !table.insert(&host, kind, &path, Arc::new(route)) {
                    tracing::debug!(ingress = %name, host = %host_label, %path, "an older Ingress has this path");
                }
            }
            let default = ing.spec.as_ref().and_then(|s| s.default_backend.as_ref());
            if let Some(backend_ref) = default
                && let Some(backend) = ctx.backend(&ns, backend_ref, settings.protocol, problems)
            {
                table.set_default(Arc::new(Route {
                    ingress: name.clone(),
                    backend,
                    canary: None,
                    settings: settings.clone(),
                    redirect_https: false,
                    limiter: limiter.clone(),
                    metrics: self.metrics.route(&name, "", ""),
                }));
            }
        }
        let used = std::mem::take(&mut ctx.used);
        pools.retain(|addr, _| used.contains(addr));
        self.pools = pools;
        // Forget parsed certificates of Secrets that changed or went away.
        let live: HashSet<Key> = objects.secrets.iter().map(|s| secret_version(s)).collect();
        self.parsed.retain(|k, _| live.contains(k));

        Built {
            snapshot: Snapshot { table, certs },
            ours: ours.into_iter().zip(problems).collect(),
        }
    }

    /// Adds the certificates of `spec.tls`; returns the hosts they cover.
    fn add_certs(
        &mut self,
        ing: &Ingress,
        ns: &str,
        secrets: &HashMap<Key, &Secret>,
        certs: &mut Certs,
        problems: &mut Vec<Problem>,
    ) -> Vec<HostMatch> {
        let mut covered = Vec::new();
        let Some(tls) = ing.spec.as_ref().and_then(|s| s.tls.as_ref()) else {
            return covered;
        };
        for entry in tls {
            let mut hosts: Vec<HostMatch> = entry
                .hosts
                .iter()
                .flatten()
                .map(|h| HostMatch::parse(Some(h)))
                .filter(|h| *h != HostMatch::Any)
                .collect();
            if hosts.is_empty() {
                // No hosts: the entry covers the Ingress's own rule hosts.
                hosts = rule_paths(ing)
                    .map(|(h, ..)| h)
                    .filter(|h| *h != HostMatch::Any)
                    .collect();
            }
            covered.extend(hosts.iter().cloned());
            let Some(secret_name) = entry.secret_name.as_deref() else {
                continue;
            };
            let Some(secret) = secrets.get(&key(ns, secret_name)) else {
                problems.push(Problem {
                    reason: "SecretNotFound",
                    message: format!("TLS Secret {ns}/{secret_name} not found"),
                });
                continue;
            };
            let parsed = self
                .parsed
                .entry(secret_version(secret))
                .or_insert_with(|| tls::certified_key(secret))
                .clone();
            match parsed {
                Ok(cert) => {
                    for host in hosts {
                        certs.insert(host, cert.clone());
                    }
                }
                Err(e) => problems.push(Problem {
                    reason: "BadSecret",
                    message: format!("TLS Secret {ns}/{secret_name}: {e}"),
                }),
            }
        }
        covered
    }
}

struct Ctx<'a> {
    services: &'a HashMap<Key, &'a Service>,
    slices: &'a HashMap<Key, Vec<&'a EndpointSlice>>,
    backends: HashMap<(String, String, String, Protocol), Arc<Backend>>,
    pools: &'a mut HashMap<SocketAddr, Arc<Pool>>,
    used: HashSet<SocketAddr>,
}

impl Ctx<'_> {
    /// The backend for a reference, shared by every route naming it. A
    /// missing Service or port still gives a backend (with no endpoints,
    /// so requests get 503) and a problem.
    fn backend(
        &mut self,
        ns: &str,
        backend: &IngressBackend,
        protocol: Protocol,
        problems: &mut Vec<Problem>,
    ) -> Option<Arc<Backend>> {
        let Some(svc) = &backend.service else {
            problems.push(Problem {
                reason: "UnsupportedBackend",
                message: "only Service backends are supported".into(),
            });
            return None;
        };
        let port = svc.port.as_ref();
        let port_key = match (
            port.and_then(|p| p.number),
            port.and_then(|p| p.name.as_ref()),
        ) {
            (Some(n), _) => n.to_string(),
            (None, Some(name)) => name.clone(),
            (None, None) => String::new(),
        };
        let cache_key = (ns.to_owned(), svc.name.clone(), port_key.clone(), protocol);
        if let Some(b) = self.backends.get(&cache_key) {
            return Some(b.clone());
        }
        let name = format!("{ns}/{}:{port_key}", svc.name);
        let endpoints = match self.endpoints(
            ns,
            &svc.name,
            port.and_then(|p| p.number),
            port.and_then(|p| p.name.as_deref()),
        ) {
            Ok(endpoints) => endpoints,
            Err(problem) => {
                problems.push(problem);
                Vec::new()
            }
        };
        let backend = Arc::new(Backend::new(name, endpoints, protocol));
        self.backends.insert(cache_key, backend.clone());
        Some(backend)
    }

    fn endpoints(
        &mut self,
        ns: &str,
        service: &str,
        number: Option<i32>,
        port_name: Option<&str>,
    ) -> Result<Vec<Endpoint>, Problem> {
        let Some(svc) = self.services.get(&key(ns, service)) else {
            return Err(Problem {
                reason: "ServiceNotFound",
                message: format!("Service {ns}/{service} not found"),
            });
        };
        let spec = svc.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            return Err(Problem {
                reason: "UnsupportedBackend",
                message: format!("Service {ns}/{service} is an ExternalName Service"),
            });
        }
        let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
        let found = ports.iter().find(|p| match (number, port_name) {
            (Some(n), _) => p.port == n,
            (None, Some(name)) => p.name.as_deref() == Some(name),
            (None, None) => ports.len() == 1,
        });
        let Some(service_port) = found else {
            return Err(Problem {
                reason: "PortNotFound",
                message: format!(
                    "Service {ns}/{service} has no port {}",
                    number.map_or_else(|| port_name.unwrap_or("").to_owned(), |n| n.to_string())
                ),
            });
        };
        let wanted = service_port.name.as_deref().unwrap_or("");
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for slice in self.slices.get(&key(ns, service)).into_iter().flatten() {
            if slice.address_type == "FQDN" {
                continue;
            }
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == wanted)
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for ep in &slice.endpoints {
                // Upstream: an unknown readiness counts as ready.
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for address in &ep.addresses {
                    let Ok(ip) = address.parse::<IpAddr>() else {
                        continue;
                    };
                    let addr = SocketAddr::new(ip, port);
                    let pool = self.pools.entry(addr).or_default().clone();
                    self.used.insert(addr);
                    if seen.insert(addr)
                        && let Some(e) = Endpoint::new(addr, pool)
                    {
                        out.push(e);
                    }
                }
            }
        }
        // A stable order, so round-robin is fair across rebuilds.
        out.sort_by_key(|e| e.addr);
        Ok(out)
    }
}

/// Every (host, pathType, path, backend) of an Ingress's rules.
fn rule_paths(
    ing: &Ingress,
) -> impl Iterator<Item = (HostMatch, PathKind, String, &IngressBackend)> {
    let rules = ing
        .spec
        .as_ref()
        .and_then(|s| s.rules.as_deref())
        .unwrap_or_default();
    rules.iter().flat_map(|rule| {
        let host = HostMatch::parse(rule.host.as_deref());
        let paths = rule
            .http
            .as_ref()
            .map(|h| h.paths.as_slice())
            .unwrap_or_default();
        paths.iter().map(move |p| {
            let kind = if p.path_type == "Exact" {
                PathKind::Exact
            } else {
                PathKind::Prefix
            };
            let path = p
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into());
            let path = match kind {
                PathKind::Exact => path,
                PathKind::Prefix => normalise_prefix(&path).to_owned(),
            };
            (host.clone(), kind, path, &p.backend)
        })
    })
}

/// Whether a TLS entry's host covers a rule's host.
fn tls_covers(tls: &HostMatch, rule: &HostMatch) -> bool {
    match rule {
        HostMatch::Exact(h) => tls.covers(h),
        other => tls == other,
    }
}

fn secret_version(s: &Secret) -> Key {
    (
        format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
        s.resource_version().unwrap_or_default(),
    )
}

/// Whether this controller serves an Ingress: its class is one of ours, or
/// it names no class and one of ours is the default.
pub fn is_ours(ing: &Ingress, classes: &[Arc<IngressClass>]) -> bool {
    let ours = |name: &str| {
        classes
            .iter()
            .any(|c| c.name_any() == name && is_our_class(c))
    };
    let named = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .or_else(|| {
            ing.annotations()
                .get(LEGACY_CLASS_ANNOTATION)
                .map(String::as_str)
        });
    match named {
        Some(name) => {
            ours(name)
                || (name == CLASS_NAME && !classes.iter().any(|c| c.name_any() == CLASS_NAME))
        }
        None => classes
            .iter()
            .any(|c| is_our_class(c) && is_default(c.annotations())),
    }
}

fn is_our_class(class: &IngressClass) -> bool {
    class.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER)
}

fn is_default(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(DEFAULT_CLASS_ANNOTATION)
        .map(String::as_str)
        == Some("true")
}

#[cfg(test)]
mod tests;
