//! The client Skiff's node components use to reach a remote API server:
//! every request and watch of the process rides one HTTP/2 connection
//! (ALPN `h2`, with HTTP/1.1 as the fallback a server may choose).
//!
//! `kube::Client::try_from(Config)` speaks HTTP/1.1 only, so each request
//! in flight holds a TLS connection of its own, and the pool keeps them
//! afterwards: a joined agent that had just started 50 pods held 57
//! connections to the API server, each with its TLS and HTTP buffers and a
//! task. kube-apiserver's own clients (the kubelet, kube-proxy) multiplex
//! on HTTP/2 the same way.
//!
//! Upgrades (exec, attach, port-forward through `kube`'s `connect`) need
//! HTTP/1.1; no node component makes them.

use std::time::Duration;

use anyhow::Context;
use hyper_util::client::legacy::{Client as HttpClient, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// A connection that sends nothing for this long is pinged; one whose
/// ping goes unanswered for `PING_TIMEOUT` is dropped and its watches
/// start over on a new one. This replaces a read timeout, which a quiet
/// watch would trip.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for `config`'s server that multiplexes on one connection.
pub fn multiplexed(config: kube::Config) -> anyhow::Result<kube::Client> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(config.connect_timeout);
    let tls = config
        .rustls_client_config()
        .context("the API client's TLS settings")?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(tcp);
    let http = HttpClient::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_INTERVAL)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    // The same layers as kube's default stack, minus tracing spans.
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(
            config
                .auth_layer()
                .context("the API client's credentials")?,
        )
        .layer(
            config
                .extra_headers_layer()
                .context("the API client's extra headers")?,
        )
        .map_err(BoxError::from)
        .service(http);
    Ok(kube::Client::new(service, config.default_namespace))
}
