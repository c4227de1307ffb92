//! Where a pod's stream is served: the pod's node, that node's agent
//! endpoint, and the kubelet API path for the request, checked the way
//! upstream checks it before it dials anything.

use k8s_openapi::api::core::v1::{Node, Pod};
use serde::de::DeserializeOwned;

use super::super::resources::{ResourceType, Subresource};
use super::super::status::ApiError;
use super::super::{ApiState, handlers};
use super::kubelet::Endpoint;

/// kubelet's port when a Node does not report one, as upstream assumes.
const DEFAULT_KUBELET_PORT: u16 = 10250;

/// Address types tried in order, as k3s configures
/// `--kubelet-preferred-address-types`.
const PREFERRED_ADDRESSES: &[&str] = &["InternalIP", "ExternalIP", "Hostname"];

/// The query of a streaming request, in order and with repeats (`command`
/// repeats for exec).
pub struct Params(Vec<(String, String)>);

/// What serving the request takes.
pub enum Located {
    /// Forward to this agent, at this kubelet API path and query.
    Agent { endpoint: Endpoint, path: String },
    /// The pod has no node yet: upstream answers logs with no content.
    NoNode,
}

impl Params {
    pub fn parse(query: Option<&str>) -> Self {
        Params(
            query
                .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                .unwrap_or_default(),
        )
    }

    /// The last non-empty value, as Go's query decoding into options keeps.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Booleans as Go's `strconv.ParseBool` reads them.
    fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid value {other:?} for query parameter {name}: not a boolean"
            ))),
        }
    }

    fn number(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid value {v:?} for query parameter {name}: not an integer"
                    ))
                })
            })
            .transpose()
    }
}

/// Reads the pod and its node and builds the kubelet request path for
/// `sub` (one of log, exec, attach, portforward).
pub async fn locate(
    state: &ApiState,
    pods: &ResourceType,
    namespace: &str,
    name: &str,
    sub: Subresource,
    params: &Params,
) -> Result<Located, ApiError> {
    let pod: Pod = read_typed(state, pods, Some(namespace), name).await?;
    let path = kubelet_path(&pod, namespace, name, sub, params)?;
    let node = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.node_name.as_deref())
        .filter(|n| !n.is_empty());
    let Some(node) = node else {
        return match sub {
            Subresource::Log => Ok(Located::NoNode),
            _ => Err(ApiError::bad_request(format!(
                "pod {name} does not have a host assigned"
            ))),
        };
    };
    let endpoint = agent_endpoint(state, node).await?;
    Ok(Located::Agent { endpoint, path })
}

/// `/containerLogs/…`, `/exec/…`, `/attach/…` or `/portForward/…` with
/// the query upstream's API server sends the kubelet.
fn kubelet_path(
    pod: &Pod,
    namespace: &str,
    name: &str,
    sub: Subresource,
    params: &Params,
) -> Result<String, ApiError> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    let path = match sub {
        Subresource::Log => {
            let container = container_of(pod, name, params.get("container"))?;
            log_query(name, params, &mut query)?;
            format!(
                "/containerLogs/{}/{}/{}",
                segment(namespace),
                segment(name),
                segment(&container)
            )
        }
        Subresource::Exec | Subresource::Attach => {
            let container = container_of(pod, name, params.get("container"))?;
            // kubelet names the stream flags input/output/error.
            for (param, kubelet) in [
                ("stdin", "input"),
                ("stdout", "output"),
                ("stderr", "error"),
                ("tty", "tty"),
            ] {
                if params.flag(param)? {
                    query.append_pair(kubelet, "1");
                }
            }
            let verb = if sub == Subresource::Exec {
                for command in params.all("command") {
                    query.append_pair("command", command);
                }
                "exec"
            } else {
                "attach"
            };
            format!(
                "/{verb}/{}/{}/{}",
                segment(namespace),
                segment(name),
                segment(&container)
            )
        }
        Subresource::PortForward => {
            for port in params.all("ports") {
                let valid = port.parse::<u16>().is_ok_and(|p| p > 0);
                if !valid {
                    return Err(ApiError::bad_request(format!(
                        "invalid port {port:?}: ports must be in the range 1-65535"
                    )));
                }
                query.append_pair("port", port);
            }
            format!("/portForward/{}/{}", segment(namespace), segment(name))
        }
        other => {
            return Err(ApiError::internal(format!(
                "{} is not a streaming subresource",
                other.name()
            )));
        }
    };
    let query = query.finish();
    Ok(if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    })
}

/// `PodLogOptions` from the query, checked as upstream validates them, in
/// the form kubelet reads.
fn log_query(
    name: &str,
    params: &Params,
    query: &mut form_urlencoded::Serializer<'_, String>,
) -> Result<(), ApiError> {
    for flag in ["follow", "previous", "timestamps"] {
        if params.flag(flag)? {
            query.append_pair(flag, "true");
        }
    }
    let since_seconds = params.number("sinceSeconds")?;
    let since_time = params.get("sinceTime");
    let tail_lines = params.number("tailLines")?;
    let limit_bytes = params.number("limitBytes")?;
    let mut problems = Vec::new();
    if since_seconds.is_some_and(|s| s < 1) {
        problems.push("sinceSeconds: Invalid value: must be greater than 0");
    }
    if since_seconds.is_some() && since_time.is_some() {
        problems.push("sinceSeconds: Forbidden: at most one of `sinceTime` or `sinceSeconds` may be specified");
    }
    if tail_lines.is_some_and(|t| t < 0) {
        problems.push("tailLines: Invalid value: must be greater than or equal to 0");
    }
    if limit_bytes.is_some_and(|l| l < 1) {
        problems.push("limitBytes: Invalid value: must be greater than 0");
    }
    if !problems.is_empty() {
        let summary = match problems.as_slice() {
            [one] => (*one).to_owned(),
            many => format!("[{}]", many.join(", ")),
        };
        return Err(ApiError::new(
            http::StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("PodLogOptions {name:?} is invalid: {summary}"),
        ));
    }
    if let Some(seconds) = since_seconds {
        query.append_pair("sinceSeconds", &seconds.to_string());
    }
    if let Some(time) = since_time {
        query.append_pair("sinceTime", time);
    }
    if let Some(lines) = tail_lines {
        query.append_pair("tailLines", &lines.to_string());
    }
    if let Some(bytes) = limit_bytes {
        query.append_pair("limitBytes", &bytes.to_string());
    }
    if let Some(stream) = params.get("stream") {
        query.append_pair("stream", stream);
    }
    Ok(())
}

/// The container a request is for: the named one, which must exist, or the
/// only one. Upstream refuses to guess between several.
fn container_of(pod: &Pod, name: &str, requested: Option<&str>) -> Result<String, ApiError> {
    let spec = pod.spec.as_ref();
    let regular: Vec<&str> = spec
        .map(|s| s.containers.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    let init = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|c| c.name.as_str());
    let ephemeral = spec
        .and_then(|s| s.ephemeral_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|c| c.name.as_str());
    let all: Vec<&str> = init
        .chain(regular.iter().copied())
        .chain(ephemeral)
        .collect();
    match requested {
        Some(container) if all.contains(&container) => Ok(container.to_owned()),
        Some(container) => Err(ApiError::bad_request(format!(
            "container {container} is not valid for pod {name}"
        ))),
        None => match regular.as_slice() {
            [only] => Ok((*only).to_owned()),
            [] => Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}"
            ))),
            _ => Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                all.join(" ")
            ))),
        },
    }
}

/// The agent endpoint a Node reports: its preferred address and
/// `status.daemonEndpoints.kubeletEndpoint.Port`.
async fn agent_endpoint(state: &ApiState, node_name: &str) -> Result<Endpoint, ApiError> {
    let nodes = super::super::resource(state, "", "nodes")?;
    let node: Node = read_typed(state, nodes, None, node_name).await?;
    endpoint_of(node_name, node)
}

/// Where the agent of `node` listens.
pub(super) fn endpoint_of(node_name: &str, node: Node) -> Result<Endpoint, ApiError> {
    let status = node.status.unwrap_or_default();
    let addresses = status.addresses.unwrap_or_default();
    let host = PREFERRED_ADDRESSES
        .iter()
        .find_map(|kind| {
            addresses
                .iter()
                .find(|a| a.type_ == *kind && !a.address.is_empty())
        })
        .map(|a| a.address.clone())
        .ok_or_else(|| {
            let known: Vec<String> = addresses
                .iter()
                .map(|a| format!("{}={}", a.type_, a.address))
                .collect();
            ApiError::unavailable(format!(
                "node {node_name:?} has no preferred address ({}); known addresses: [{}]",
                PREFERRED_ADDRESSES.join(", "),
                known.join(" ")
            ))
        })?;
    let port = status
        .daemon_endpoints
        .and_then(|d| d.kubelet_endpoint)
        .and_then(|e| u16::try_from(e.port).ok())
        .filter(|p| *p > 0)
        .unwrap_or(DEFAULT_KUBELET_PORT);
    Ok(Endpoint {
        node: node_name.to_owned(),
        host,
        port,
    })
}

async fn read_typed<T: DeserializeOwned>(
    state: &ApiState,
    rt: &ResourceType,
    namespace: Option<&str>,
    name: &str,
) -> Result<T, ApiError> {
    let kv = handlers::read(state, rt, namespace, name).await?;
    serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal(format!(
            "stored {} {name:?} does not decode: {e}",
            rt.qualified()
        ))
    })
}

/// Percent-encodes a path segment. Object and container names are DNS
/// names and pass unchanged; this keeps anything else from reshaping the
/// kubelet path.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    #[test]
    fn container_defaults_to_the_only_one() {
        let p = pod(json!({"containers": [{"name": "app"}]}));
        assert_eq!(container_of(&p, "p", None).unwrap(), "app");
        assert_eq!(container_of(&p, "p", Some("app")).unwrap(), "app");
        let e = container_of(&p, "p", Some("nope")).unwrap_err();
        assert_eq!(e.message, "container nope is not valid for pod p");
    }

    #[test]
    fn several_containers_need_a_name() {
        let p = pod(json!({
            "initContainers": [{"name": "init"}],
            "containers": [{"name": "a"}, {"name": "b"}],
        }));
        let e = container_of(&p, "p", None).unwrap_err();
        assert_eq!(e.code, http::StatusCode::BAD_REQUEST);
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [init a b]"
        );
        assert_eq!(container_of(&p, "p", Some("init")).unwrap(), "init");
    }

    #[test]
    fn log_path_carries_the_options() {
        let p = pod(json!({"containers": [{"name": "app"}]}));
        let params = Params::parse(Some(
            "follow=true&tailLines=10&timestamps=1&limitBytes=5&container=app",
        ));
        let path = kubelet_path(&p, "default", "p", Subresource::Log, &params).unwrap();
        assert_eq!(
            path,
            "/containerLogs/default/p/app?follow=true&timestamps=true&tailLines=10&limitBytes=5"
        );
        let bad = Params::parse(Some("tailLines=-1"));
        let e = kubelet_path(&p, "default", "p", Subresource::Log, &bad).unwrap_err();
        assert_eq!(e.code, http::StatusCode::UNPROCESSABLE_ENTITY);
        let bad = Params::parse(Some("follow=maybe"));
        let e = kubelet_path(&p, "default", "p", Subresource::Log, &bad).unwrap_err();
        assert_eq!(e.code, http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn exec_path_uses_kubelet_names_and_keeps_every_command_word() {
        let p = pod(json!({"containers": [{"name": "app"}]}));
        let params = Params::parse(Some(
            "command=sh&command=-c&command=echo+a%26b&stdout=true&stderr=true&stdin=false",
        ));
        let path = kubelet_path(&p, "ns", "p", Subresource::Exec, &params).unwrap();
        assert_eq!(
            path,
            "/exec/ns/p/app?output=1&error=1&command=sh&command=-c&command=echo+a%26b"
        );
        let attach = Params::parse(Some("stdin=1&tty=1&container=app"));
        let path = kubelet_path(&p, "ns", "p", Subresource::Attach, &attach).unwrap();
        assert_eq!(path, "/attach/ns/p/app?input=1&tty=1");
    }

    #[test]
    fn port_forward_path() {
        let p = pod(json!({"containers": [{"name": "a"}, {"name": "b"}]}));
        let none = Params::parse(None);
        let path = kubelet_path(&p, "ns", "p", Subresource::PortForward, &none).unwrap();
        assert_eq!(path, "/portForward/ns/p");
        let ports = Params::parse(Some("ports=8080&ports=9090"));
        let path = kubelet_path(&p, "ns", "p", Subresource::PortForward, &ports).unwrap();
        assert_eq!(path, "/portForward/ns/p?port=8080&port=9090");
        let bad = Params::parse(Some("ports=70000"));
        assert!(kubelet_path(&p, "ns", "p", Subresource::PortForward, &bad).is_err());
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(segment("web-1.a"), "web-1.a");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
