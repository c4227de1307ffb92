//! `/metrics` in Prometheus text format, with upstream's metric names so
//! existing dashboards and alerts work: `apiserver_request_total`,
//! `apiserver_request_duration_seconds`, `apiserver_storage_objects`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{Method, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::ApiState;
use super::request::{Route, Target, route};
use crate::storage::RangeRequest;

/// verb, group, version, resource, subresource, scope, component: all
/// static strings, so a request's labels cost no allocation.
type Labels = [(&'static str, &'static str); 7];
/// The same with the response code.
type CodeLabels = (Labels, [(&'static str, u16); 1]);

/// Upstream's request latency buckets (seconds).
const BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

pub struct Metrics {
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    durations: Family<Labels, Histogram>,
    objects: Family<[(&'static str, String); 1], Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<CodeLabels, Counter>::default();
        let durations = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(BUCKETS.iter().copied())
        });
        let objects = Family::<[(&'static str, String); 1], Gauge>::default();
        registry.register(
            "apiserver_request",
            "Counter of apiserver requests broken out for each verb, dry run value, group, version, resource, scope, component, and HTTP response code.",
            requests.clone(),
        );
        registry.register(
            "apiserver_request_duration_seconds",
            "Response latency distribution in seconds for each verb, dry run value, group, version, resource, subresource, scope and component.",
            durations.clone(),
        );
        registry.register(
            "apiserver_storage_objects",
            "Number of stored objects at the time of last check split by kind.",
            objects.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
            objects,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Middleware: counts and times every resource request. The resource
/// path it parses is handed on with the request ([`Routed`]), so the
/// handler does not parse it again.
pub async fn record(
    State(state): State<Arc<ApiState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let labels = match route(state.registry, request.uri().path()) {
        Ok(Some(Route::Resource(target))) => {
            let labels = classify(&request, &target);
            request.extensions_mut().insert(Routed(target));
            Some(labels)
        }
        _ => None,
    };
    let started = Instant::now();
    let response = next.run(request).await;
    if let Some(labels) = labels {
        let elapsed = started.elapsed().as_secs_f64();
        state
            .metrics
            .durations
            .get_or_create(&labels)
            .observe(elapsed);
        let code = [("code", response.status().as_u16())];
        state.metrics.requests.get_or_create(&(labels, code)).inc();
    }
    response
}

/// A request's resource path, as [`record`] parsed it.
#[derive(Clone)]
pub struct Routed(pub Target);

/// `GET /metrics`.
pub async fn serve(State(state): State<Arc<ApiState>>) -> Response {
    for rt in state.registry.all() {
        let request = RangeRequest {
            prefix: bytes::Bytes::from(rt.key_prefix(None)),
            limit: 1,
            ..RangeRequest::default()
        };
        if let Ok(range) = state.store.range(request).await {
            let labels = [("resource", rt.qualified())];
            state
                .metrics
                .objects
                .get_or_create(&labels)
                .set(i64::try_from(range.count).unwrap_or(i64::MAX));
        }
    }
    let mut text = String::new();
    match encode(&mut text, &state.metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Upstream's labels for a request to `target`: verb, group, version,
/// resource, subresource, scope, component.
fn classify(request: &Request, target: &Target) -> Labels {
    let query = request.uri().query().unwrap_or("");
    let watching = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let verb = match (request.method(), &target.name) {
        (&Method::GET, None) if watching => "WATCH",
        (&Method::GET, None) => "LIST",
        (&Method::GET, Some(_)) => "GET",
        (&Method::POST, _) => "POST",
        (&Method::PUT, _) => "PUT",
        (&Method::PATCH, _) => "PATCH",
        (&Method::DELETE, None) => "DELETECOLLECTION",
        (&Method::DELETE, Some(_)) => "DELETE",
        _ => "OTHER",
    };
    let scope = match (&target.namespace, &target.name) {
        (_, Some(_)) => "resource",
        (Some(_), None) => "namespace",
        (None, None) => "cluster",
    };
    [
        ("verb", verb),
        ("group", target.rt.group),
        ("version", target.rt.version),
        ("resource", target.rt.plural),
        ("subresource", target.subresource.map_or("", |s| s.name())),
        ("scope", scope),
        ("component", "apiserver"),
    ]
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};

    use crate::apiserver;

    #[tokio::test]
    async fn counts_resource_requests_by_verb_resource_and_code() {
        let dir = tempfile::tempdir().unwrap();
        let client = apiserver::client::test_server(dir.path()).await;
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let map = serde_json::from_value(serde_json::json!({"metadata": {"name": "m"}})).unwrap();
        maps.create(&PostParams::default(), &map).await.unwrap();
        maps.get("m").await.unwrap();
        maps.get("m").await.unwrap();
        assert!(maps.get("missing").await.is_err());

        let text = client
            .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
            .await
            .unwrap();
        let count = |verb: &str, code: u16| {
            let line = format!(
                "apiserver_request_total{{verb=\"{verb}\",group=\"\",version=\"v1\",resource=\"configmaps\",subresource=\"\",scope=\"{}\",component=\"apiserver\",code=\"{code}\"}} ",
                if verb == "POST" {
                    "namespace"
                } else {
                    "resource"
                }
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&line))
                .unwrap_or_else(|| panic!("no {line:?} in\n{text}"))
                .to_owned()
        };
        assert_eq!(count("POST", 201), "1");
        assert_eq!(count("GET", 200), "2");
        assert_eq!(count("GET", 404), "1");
        assert!(text.contains(
            "apiserver_request_duration_seconds_count{verb=\"GET\",group=\"\",version=\"v1\",resource=\"configmaps\",subresource=\"\",scope=\"resource\",component=\"apiserver\"} 3"
        ), "{text}");
    }
}
