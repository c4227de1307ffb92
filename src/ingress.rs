//! Wiring of the Ingress controller: inside `skiff server`, or alone
//! (`skiff ingress`) against any cluster's kubeconfig.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Context;

use crate::cli::{IngressArgs, ServerArgs};

/// The server's controller on all addresses; a failure (say, the port is
/// taken) is logged and the rest of the server keeps running.
pub fn spawn_in_server(
    client: kube::Client,
    args: &ServerArgs,
    node_ip: IpAddr,
) -> impl Future<Output = ()> + use<> {
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let mut config = ingress::IngressConfig::new(
        SocketAddr::new(any, args.ingress_http_port),
        SocketAddr::new(any, args.ingress_https_port),
        vec![node_ip],
    );
    if args.ingress_metrics_port != 0 {
        config.metrics = Some(SocketAddr::new(any, args.ingress_metrics_port));
    }
    async move {
        if let Err(e) = ingress::run(client, config).await {
            tracing::error!(error = %e, "the ingress controller stopped; the rest of the server keeps running");
        }
    }
}

pub async fn run(args: IngressArgs) -> anyhow::Result<()> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .context("loading the kubeconfig")?;
    let client = crate::api_client::multiplexed(config).context("building the client")?;
    let mut config = ingress::IngressConfig::new(args.http, args.https, args.node_addresses);
    config.metrics = args.metrics;
    config.access_log = !args.no_access_log;
    config.tls_resumption = !args.no_tls_resumption;
    ingress::run(client, config)
        .await
        .context("running the ingress controller")
}
