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
use super::request::{Route, route};
use crate::storage::RangeRequest;

type Labels = Vec<(&'static str, String)>;

/// Upstream's request latency buckets (seconds).
const BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    durations: Family<Labels, Histogram>,
    objects: Family<Labels, Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let durations = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(BUCKETS.iter().copied())
        });
        let objects = Family::<Labels, Gauge>::default();
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

/// Middleware: counts and times every resource request.
pub async fn record(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let labels = classify(&state, &request);
    let started = Instant::now();
    let response = next.run(request).await;
    if let Some(labels) = labels {
        let elapsed = started.elapsed().as_secs_f64();
        state
            .metrics
            .durations
            .get_or_create(&labels)
            .observe(elapsed);
        let mut with_code = labels;
        with_code.push(("code", response.status().as_u16().to_string()));
        state.metrics.requests.get_or_create(&with_code).inc();
    }
    response
}

/// `GET /metrics`.
pub async fn serve(State(state): State<Arc<ApiState>>) -> Response {
    for rt in state.registry.all() {
        let request = RangeRequest {
            prefix: bytes::Bytes::from(rt.key_prefix(None)),
            limit: 1,
            ..RangeRequest::default()
        };
        if let Ok(range) = state.store.range(request).await {
            let labels = vec![("resource", rt.qualified())];
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

/// Upstream's labels for a request: verb, group, version, resource,
/// subresource, scope, component. Non-resource requests are not counted.
fn classify(state: &ApiState, request: &Request) -> Option<Labels> {
    let Ok(Some(Route::Resource(target))) = route(state.registry, request.uri().path()) else {
        return None;
    };
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
    Some(vec![
        ("verb", verb.to_owned()),
        ("group", target.rt.group.to_owned()),
        ("version", target.rt.version.to_owned()),
        ("resource", target.rt.plural.to_owned()),
        (
            "subresource",
            target
                .subresource
                .map(|s| s.name().to_owned())
                .unwrap_or_default(),
        ),
        ("scope", scope.to_owned()),
        ("component", "apiserver".to_owned()),
    ])
}
