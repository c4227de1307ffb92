//! The Kubernetes API server: REST semantics for the built-in kinds over
//! HTTPS, backed by the revisioned store.
//!
//! A request flows: TLS listener ([`tls`]) → authentication ([`authn`]) →
//! routing ([`request`]) → a verb handler ([`handlers`], [`watch`],
//! [`scale`]) → the store. Objects stay JSON bytes end to end ([`objects`]);
//! the `k8s-openapi` structs are used to type-check and find unknown fields.

pub mod apply;
pub mod authn;
pub mod authz;
pub mod client;
pub mod compaction;
pub mod conversion;
mod defaults;
pub mod discovery;
mod handlers;
mod list;
pub mod metrics;
pub mod node_join;
mod objects;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod protobuf;
mod proxy;
mod request;
pub mod resource_metrics;
pub mod resources;
pub mod sa_token;
mod scale;
pub mod selectors;
pub mod service_accounts;
mod services;
pub mod status;
mod strategy;
pub mod table;
pub mod tls;
mod validation;
mod watch;
mod yaml;

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use self::request::{MAX_BODY_BYTES, Query, Route};
use self::resources::{Registry, ResourceType};
use self::status::ApiError;
use crate::storage::Store;

pub use self::proxy::{KubeletClient, KubeletClientError};
pub use self::services::ServiceRanges;

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// The served kinds.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// Everything a request handler needs.
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub registry: &'static Registry,
    pub ranges: ServiceRanges,
    /// `host:port` clients are told to use (in `/api` discovery).
    pub advertise: String,
    pub metrics: metrics::Metrics,
    /// Reaches node agents for pod logs, exec, attach and port-forward;
    /// without one those answer 503.
    pub kubelet: Option<KubeletClient>,
    /// What `metrics.k8s.io` serves, kept current by
    /// [`resource_metrics::collect::run`].
    pub resource_metrics: Arc<resource_metrics::ResourceMetrics>,
    /// RBAC, kept current once [`authz::start`] runs; until that runs, only
    /// `system:masters` are allowed anything.
    pub authorizer: authz::Authorizer,
    /// Signs and verifies service-account tokens; without it TokenRequest
    /// answers 503 and no such token authenticates.
    pub service_account_keys: Option<Arc<sa_token::TokenKeys>>,
    /// The cluster DNS address pods are given; [`bootstrap`] reserves it
    /// with the `kube-system/kube-dns` Service.
    pub cluster_dns: Option<std::net::IpAddr>,
}

impl ApiState {
    pub fn new(store: Arc<dyn Store>, ranges: ServiceRanges, advertise: String) -> Self {
        ApiState {
            store,
            registry: registry(),
            ranges,
            advertise,
            metrics: metrics::Metrics::new(),
            kubelet: None,
            resource_metrics: Arc::default(),
            authorizer: authz::Authorizer::default(),
            service_account_keys: None,
            cluster_dns: None,
        }
    }
}

/// The whole HTTP surface of the API server, behind authentication.
pub fn router(state: Arc<ApiState>, auth: Arc<authn::Authenticator>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/version/", get(version))
        .route("/healthz", get(healthy))
        .route("/livez", get(healthy))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics::serve))
        .route("/api", get(api_root))
        .route("/api/", get(api_root))
        .route("/apis", get(apis_root))
        .route("/apis/", get(apis_root))
        .route("/openapi/v3", get(openapi_index))
        .route("/openapi/v3/", get(openapi_index))
        .route("/openapi/v3/{*path}", get(openapi_document))
        .route("/apis/metrics.k8s.io", get(resource_metrics_request))
        .route(
            "/apis/metrics.k8s.io/{*path}",
            get(resource_metrics_request),
        )
        .fallback(resource_request)
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authz::authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            authn::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(state, metrics::record))
}

async fn version() -> Response {
    json_response(StatusCode::OK, &discovery::version())
}

async fn healthy() -> &'static str {
    "ok"
}

/// Ready when the store answers.
async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    match state.store.current_revision().await {
        Ok(_) => "ok".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("[-]etcd failed: {e}\nreadyz check failed"),
        )
            .into_response(),
    }
}

async fn api_root(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    match discovery::aggregated_wanted(&headers) {
        Some(media) => {
            aggregated_response(discovery::aggregated(state.registry, true, media), media)
        }
        None => json_response(StatusCode::OK, &discovery::api_versions(&state.advertise)),
    }
}

async fn apis_root(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    match discovery::aggregated_wanted(&headers) {
        Some(media) => {
            aggregated_response(discovery::aggregated(state.registry, false, media), media)
        }
        None => json_response(StatusCode::OK, &discovery::api_group_list(state.registry)),
    }
}

async fn resource_metrics_request(State(state): State<Arc<ApiState>>, uri: http::Uri) -> Response {
    let query = uri.query().map(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "labelSelector")
            .map(|(_, v)| v.into_owned())
    });
    let selector = query.flatten();
    resource_metrics::serve(&state.resource_metrics, uri.path(), selector.as_deref())
        .unwrap_or_else(IntoResponse::into_response)
}

async fn openapi_index() -> Response {
    json_response(StatusCode::OK, &openapi::documents().index())
}

async fn openapi_document(axum::extract::Path(path): axum::extract::Path<String>) -> Response {
    match openapi::documents().get(path.trim_matches('/')) {
        Some(body) => (
            StatusCode::OK,
            [(http::header::CONTENT_TYPE, "application/json")],
            body.to_owned(),
        )
            .into_response(),
        None => ApiError::no_route(&format!("/openapi/v3/{path}")).into_response(),
    }
}

/// Everything under `/api/v1/...` and `/apis/<group>/<version>/...`.
async fn resource_request(State(state): State<Arc<ApiState>>, request: Request<Body>) -> Response {
    match dispatch(state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn dispatch(state: Arc<ApiState>, request: Request<Body>) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let route = match parts.extensions.remove::<metrics::Routed>() {
        Some(metrics::Routed(target)) => Route::Resource(target),
        None => request::route(state.registry, &path)?.ok_or_else(|| ApiError::no_route(&path))?,
    };
    match route {
        Route::GroupVersion { group, version } => {
            if let Some(group_only) = group_document(state.registry, &path) {
                return Ok(json_response(StatusCode::OK, &group_only));
            }
            let list = discovery::api_resource_list(state.registry, &group, &version)
                .ok_or_else(|| ApiError::no_route(&path))?;
            Ok(json_response(StatusCode::OK, &list))
        }
        // Streams: the body is the stream (or empty) and must stay unread.
        Route::Resource(target) if proxy::serves(&target) => {
            proxy::serve(state, target, parts).await
        }
        Route::Resource(target) => {
            let body = read_body(body).await?;
            let query = Query::parse(parts.uri.query());
            handlers::serve(
                state.clone(),
                target,
                parts.method,
                &parts.headers,
                query,
                body,
            )
            .await
        }
    }
}

/// `/apis/<group>` (no version) is the APIGroup document.
fn group_document(registry: &Registry, path: &str) -> Option<Value> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["apis", group] => registry
            .group_versions()
            .into_iter()
            .find(|(g, _)| g == group)
            .map(|(g, v)| discovery::api_group(g, v)),
        _ => None,
    }
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::too_large(MAX_BODY_BYTES))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn aggregated_response(value: Value, media: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (http::header::CONTENT_TYPE, media),
            (http::header::VARY, "Accept"),
        ],
        value.to_string(),
    )
        .into_response()
}

/// The current time as Kubernetes writes timestamps (RFC 3339, seconds).
pub fn now() -> String {
    now_plus(0)
}

pub fn now_plus(seconds: i64) -> String {
    let at = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(seconds))
        .unwrap_or_else(|_| jiff::Timestamp::now());
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A Table for `kubectl get`, honouring `includeObject`.
fn table_for(rt: &ResourceType, objects: &[Value], query: &Query) -> Result<Value, ApiError> {
    let include =
        table::IncludeObject::parse(query.get("includeObject")).map_err(ApiError::bad_request)?;
    Ok(table::render(
        rt.group,
        rt.plural,
        objects,
        jiff::Timestamp::now(),
        include,
    ))
}

/// Applies a PATCH body of `patch_type` to an object of kind `rt`.
fn patch_object(
    rt: &ResourceType,
    current: &Value,
    patch_type: patch::PatchType,
    body: &Bytes,
) -> Result<Value, ApiError> {
    patch_value(rt.group, rt.kind, current, patch_type, body)
}

fn patch_value(
    group: &str,
    kind: &str,
    current: &Value,
    patch_type: patch::PatchType,
    body: &Bytes,
) -> Result<Value, ApiError> {
    patch::apply(patch::TypeRef::new(group, kind), current, patch_type, body).map_err(|e| {
        let code = StatusCode::from_u16(e.status_code()).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(code, e.reason(), e.to_string())
    })
}

/// Objects every cluster has from the start: the four namespaces and the
/// `kubernetes` Service on the first Service address.
pub async fn bootstrap(state: &ApiState) -> Result<(), ApiError> {
    let namespaces = resource(state, "", "namespaces")?;
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        create_if_missing(state, namespaces, None, object).await?;
    }
    let services = resource(state, "", "services")?;
    let api_port = state
        .advertise
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .unwrap_or(6443);
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": state.ranges.first_ip().to_string(),
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": api_port}],
            "sessionAffinity": "None",
        },
    });
    create_if_missing(state, services, Some("default"), service).await?;
    if let Some(ip) = state.cluster_dns {
        // Not fatal: a Service created before this one may hold the address.
        if let Err(e) = create_if_missing(state, services, Some("kube-system"), kube_dns(ip)).await
        {
            tracing::warn!(%ip, error = %e.message, "cannot reserve the cluster DNS address with the kube-dns Service");
        }
    }
    let classes = resource(state, "storage.k8s.io", "storageclasses")?;
    create_if_missing(state, classes, None, local_path_class()).await?;
    authz::create_bootstrap_policy(state).await
}

/// The `kube-dns` Service, as k3s and kubeadm clusters have one: it holds
/// the cluster DNS address so that no other Service is given it, and it
/// names the DNS for tools that look for it. Every node serves that
/// address itself (on its loopback), so queries never reach a Service
/// endpoint; the Service has no selector.
fn kube_dns(ip: std::net::IpAddr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "kube-dns",
            "namespace": "kube-system",
            "labels": {"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip.to_string(),
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            ],
            "sessionAffinity": "None",
        },
    })
}

/// The default StorageClass, served by the local-path provisioner in the
/// controller manager, as k3s ships one.
fn local_path_class() -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": crate::controllers::volume::LOCAL_PATH_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": crate::controllers::volume::LOCAL_PATH_PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    })
}

fn resource(
    state: &ApiState,
    group: &str,
    plural: &str,
) -> Result<&'static ResourceType, ApiError> {
    state
        .registry
        .all()
        .iter()
        .find(|t| t.group == group && t.plural == plural)
        .ok_or_else(|| ApiError::internal(format!("{plural} are not served")))
}

async fn create_if_missing(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    object: Value,
) -> Result<(), ApiError> {
    let name = objects::name_of(&object).to_owned();
    if handlers::read(state, rt, ns, &name).await.is_ok() {
        return Ok(());
    }
    let body = Bytes::from(object.to_string());
    let path = match ns {
        Some(ns) => format!("namespaces/{ns}/{}", rt.plural),
        None => rt.plural.to_owned(),
    };
    let created = handlers::create_internal(state, rt, ns, body).await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.reason == "AlreadyExists" => Ok(()),
        Err(e) => Err(ApiError::internal(format!("creating {path}/{name}: {e}"))),
    }
}
