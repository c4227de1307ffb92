//! Service ClusterIP and NodePort allocation. Each allocated address or
//! port is a key in the store (`/registry/ranges/...`), created with the
//! store's create-if-absent, so two concurrent creates can never get the
//! same one — also across several API servers sharing etcd.

use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use ipnet::Ipv4Net;
use serde_json::{Value, json};

use super::ApiState;
use super::resources::ResourceType;
use super::status::{ApiError, Cause};
use crate::storage::StoreError;

const IP_PREFIX: &str = "/registry/ranges/serviceips/";
const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";
/// Random probes before falling back to a scan of the allocated set.
const RANDOM_TRIES: usize = 32;

/// Where Service addresses and node ports come from.
#[derive(Clone, Debug)]
pub struct ServiceRanges {
    pub cidr: Ipv4Net,
    pub node_ports: std::ops::RangeInclusive<u16>,
}

impl ServiceRanges {
    /// The first address of the range, which the `kubernetes` Service takes.
    pub fn first_ip(&self) -> Ipv4Addr {
        let base = u32::from(self.cidr.network());
        Ipv4Addr::from(base + 1)
    }
}

/// What one write reserved and what it gave up; both are settled after
/// the write succeeds or fails.
#[derive(Default, Debug)]
pub struct Allocations {
    pub added: Vec<String>,
    pub dropped: Vec<String>,
}

/// Assigns a Service's ClusterIP and NodePorts on create (`old == None`)
/// or update, keeping what it already has.
pub async fn allocate(
    state: &ApiState,
    rt: &ResourceType,
    object: &mut Value,
    old: Option<&Value>,
    dry_run: bool,
) -> Result<Allocations, ApiError> {
    let mut allocations = Allocations::default();
    if !(rt.group.is_empty() && rt.plural == "services") {
        return Ok(allocations);
    }
    let owner = format!(
        "{}/{}",
        super::objects::meta_str(object, "namespace").unwrap_or(""),
        super::objects::name_of(object)
    );
    let name = super::objects::name_of(object).to_owned();
    let result = assign(state, object, old, dry_run, &owner, &mut allocations).await;
    if let Err(e) = result {
        release(state, &allocations).await;
        return Err(match e {
            Problem::Invalid(causes) => ApiError::invalid(rt, &name, causes),
            Problem::Api(e) => e,
        });
    }
    Ok(allocations)
}

/// Frees what a failed write had reserved.
pub async fn release(state: &ApiState, allocations: &Allocations) {
    for key in &allocations.added {
        free(state, key).await;
    }
}

/// Frees what a successful write gave up.
pub async fn settle(state: &ApiState, allocations: &Allocations) {
    for key in &allocations.dropped {
        free(state, key).await;
    }
}

/// Frees everything a deleted Service held.
pub async fn release_for(state: &ApiState, rt: &ResourceType, object: &Value) {
    if !(rt.group.is_empty() && rt.plural == "services") {
        return;
    }
    for key in held(object) {
        free(state, &key).await;
    }
}

enum Problem {
    Invalid(Vec<Cause>),
    Api(ApiError),
}

impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Self {
        Problem::Api(e)
    }
}

async fn assign(
    state: &ApiState,
    object: &mut Value,
    old: Option<&Value>,
    dry_run: bool,
    owner: &str,
    allocations: &mut Allocations,
) -> Result<(), Problem> {
    let kind = object
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_owned();
    let old_ip = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let wanted = object
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();

    // ClusterIP: immutable once set; none for ExternalName.
    let ip = if kind == "ExternalName" {
        if !wanted.is_empty() && wanted != "None" {
            return Err(Problem::Invalid(vec![Cause::forbidden(
                "spec.clusterIP",
                "may not be set for type ExternalName",
            )]));
        }
        None
    } else if let Some(old_ip) = old_ip.filter(|ip| !ip.is_empty()) {
        if !wanted.is_empty() && wanted != old_ip {
            return Err(Problem::Invalid(vec![Cause::invalid(
                "spec.clusterIP",
                &wanted,
                "field is immutable",
            )]));
        }
        Some(old_ip)
    } else if wanted == "None" {
        Some("None".to_owned())
    } else if wanted.is_empty() {
        let ip = pick_ip(state, owner, dry_run).await?;
        if !dry_run {
            allocations.added.push(ip_key(ip));
        }
        Some(ip.to_string())
    } else {
        let ip = parse_in_range(&state.ranges, &wanted)?;
        if !dry_run {
            claim(state, &ip_key(ip), owner)
                .await
                .map_err(|e| match e {
                    Some(e) => Problem::Api(e),
                    None => Problem::Invalid(vec![Cause::invalid(
                        "spec.clusterIP",
                        &wanted,
                        "provided IP is already allocated",
                    )]),
                })?;
            allocations.added.push(ip_key(ip));
        }
        Some(wanted.clone())
    };
    if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
        match &ip {
            Some(ip) => {
                spec.insert("clusterIP".into(), json!(ip));
                spec.insert("clusterIPs".into(), json!([ip]));
                if ip != "None" || spec.get("ipFamilies").is_none() {
                    spec.insert("ipFamilies".into(), json!(["IPv4"]));
                }
                spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
            }
            None => {
                spec.remove("clusterIP");
                spec.remove("clusterIPs");
            }
        }
    }

    // NodePorts: for NodePort and LoadBalancer Services, one per port.
    let needs_ports = kind == "NodePort" || kind == "LoadBalancer";
    let old_ports: Vec<(i64, String, i64)> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .map(|ports| ports.iter().filter_map(port_triple).collect())
        .unwrap_or_default();
    let mut kept: Vec<i64> = Vec::new();
    if let Some(Value::Array(ports)) = object.pointer_mut("/spec/ports") {
        for (i, port) in ports.iter_mut().enumerate() {
            let Some(map) = port.as_object_mut() else {
                continue;
            };
            if !needs_ports {
                map.remove("nodePort");
                continue;
            }
            let number = map.get("port").and_then(Value::as_i64).unwrap_or(0);
            let protocol = map
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("TCP")
                .to_owned();
            let requested = map
                .get("nodePort")
                .and_then(Value::as_i64)
                .filter(|p| *p != 0);
            let previous = old_ports
                .iter()
                .find(|(p, proto, _)| *p == number && *proto == protocol)
                .map(|(_, _, node_port)| *node_port);
            let node_port = match (requested, previous) {
                (Some(r), Some(p)) if r == p => r,
                (None, Some(p)) => p,
                (Some(r), _) => {
                    if !in_port_range(&state.ranges, r) {
                        return Err(Problem::Invalid(vec![Cause::invalid(
                            format!("spec.ports[{i}].nodePort"),
                            &r.to_string(),
                            format!(
                                "provided port is not in the valid range. The range of valid ports is {}-{}",
                                state.ranges.node_ports.start(),
                                state.ranges.node_ports.end()
                            ),
                        )]));
                    }
                    if !kept.contains(&r) && !dry_run {
                        claim(state, &port_key(r), owner)
                            .await
                            .map_err(|e| match e {
                                Some(e) => Problem::Api(e),
                                None => Problem::Invalid(vec![Cause::invalid(
                                    format!("spec.ports[{i}].nodePort"),
                                    &r.to_string(),
                                    "provided port is already allocated",
                                )]),
                            })?;
                        allocations.added.push(port_key(r));
                    }
                    r
                }
                (None, None) => {
                    let p = pick_port(state, owner, dry_run).await?;
                    if !dry_run {
                        allocations.added.push(port_key(p));
                    }
                    p
                }
            };
            kept.push(node_port);
            map.insert("nodePort".into(), json!(node_port));
        }
    }
    for (_, _, node_port) in &old_ports {
        if !kept.contains(node_port) {
            allocations.dropped.push(port_key(*node_port));
        }
    }
    if let Some(old_ip) = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str)
        && ip.as_deref() != Some(old_ip)
        && let Ok(addr) = old_ip.parse::<Ipv4Addr>()
    {
        allocations.dropped.push(ip_key(addr));
    }
    Ok(())
}

async fn pick_ip(state: &ApiState, owner: &str, dry_run: bool) -> Result<Ipv4Addr, Problem> {
    let net = state.ranges.cidr;
    let base = u32::from(net.network());
    // Skip the network address, the first address (the `kubernetes`
    // Service asks for it by name) and the broadcast address.
    let size = 1u64 << (32 - net.prefix_len());
    if size < 8 {
        return Err(Problem::Api(ApiError::internal(
            "service CIDR is too small",
        )));
    }
    let usable = (size - 3) as u32;
    for _ in 0..RANDOM_TRIES {
        let ip = Ipv4Addr::from(base + 2 + random_u32() % usable);
        if dry_run {
            return Ok(ip);
        }
        match claim(state, &ip_key(ip), owner).await {
            Ok(()) => return Ok(ip),
            Err(None) => continue,
            Err(Some(e)) => return Err(e.into()),
        }
    }
    for offset in 0..usable {
        let ip = Ipv4Addr::from(base + 2 + offset);
        match claim(state, &ip_key(ip), owner).await {
            Ok(()) => return Ok(ip),
            Err(None) => continue,
            Err(Some(e)) => return Err(e.into()),
        }
    }
    Err(Problem::Api(ApiError::internal(
        "failed to allocate a serviceIP: range is full",
    )))
}

async fn pick_port(state: &ApiState, owner: &str, dry_run: bool) -> Result<i64, Problem> {
    let start = i64::from(*state.ranges.node_ports.start());
    let count = i64::from(*state.ranges.node_ports.end()) - start + 1;
    for _ in 0..RANDOM_TRIES {
        let port = start + i64::from(random_u32()) % count;
        if dry_run {
            return Ok(port);
        }
        match claim(state, &port_key(port), owner).await {
            Ok(()) => return Ok(port),
            Err(None) => continue,
            Err(Some(e)) => return Err(e.into()),
        }
    }
    for port in start..start + count {
        match claim(state, &port_key(port), owner).await {
            Ok(()) => return Ok(port),
            Err(None) => continue,
            Err(Some(e)) => return Err(e.into()),
        }
    }
    Err(Problem::Api(ApiError::internal(
        "failed to allocate a nodePort: range is full",
    )))
}

/// Reserves `key`; `Err(None)` when it is taken.
async fn claim(state: &ApiState, key: &str, owner: &str) -> Result<(), Option<ApiError>> {
    match state
        .store
        .create(key.as_bytes(), Bytes::copy_from_slice(owner.as_bytes()))
        .await
    {
        Ok(_) => Ok(()),
        Err(StoreError::AlreadyExists { .. }) => Err(None),
        Err(StoreError::Unavailable(m)) => Err(Some(ApiError::unavailable(m))),
        Err(e) => Err(Some(ApiError::internal(e.to_string()))),
    }
}

async fn free(state: &ApiState, key: &str) {
    match state.store.delete(key.as_bytes(), None).await {
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(key, error = %e, "could not release a service allocation"),
    }
}

/// Allocation keys a stored Service holds.
fn held(object: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(ip) = object
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
    {
        keys.push(ip_key(ip));
    }
    if let Some(ports) = object.pointer("/spec/ports").and_then(Value::as_array) {
        for (_, _, node_port) in ports.iter().filter_map(port_triple) {
            keys.push(port_key(node_port));
        }
    }
    keys
}

fn port_triple(port: &Value) -> Option<(i64, String, i64)> {
    let number = port.get("port")?.as_i64()?;
    let protocol = port
        .get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP")
        .to_owned();
    let node_port = port.get("nodePort")?.as_i64()?;
    Some((number, protocol, node_port))
}

fn parse_in_range(ranges: &ServiceRanges, wanted: &str) -> Result<Ipv4Addr, Problem> {
    let invalid = |why: &str| Problem::Invalid(vec![Cause::invalid("spec.clusterIP", wanted, why)]);
    match wanted.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) if ranges.cidr.contains(&ip) => Ok(ip),
        Ok(IpAddr::V4(_)) => Err(invalid(&format!(
            "provided IP is not in the valid range. The range of valid IPs is {}",
            ranges.cidr
        ))),
        Ok(IpAddr::V6(_)) => Err(invalid("IPv6 is not supported by this cluster")),
        Err(_) => Err(invalid(
            "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
        )),
    }
}

fn in_port_range(ranges: &ServiceRanges, port: i64) -> bool {
    u16::try_from(port).is_ok_and(|p| ranges.node_ports.contains(&p))
}

fn ip_key(ip: Ipv4Addr) -> String {
    format!("{IP_PREFIX}{ip}")
}

fn port_key(port: i64) -> String {
    format!("{PORT_PREFIX}{port}")
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        let uuid = uuid::Uuid::new_v4();
        bytes.copy_from_slice(&uuid.as_bytes()[..4]);
    }
    u32::from_le_bytes(bytes)
}
