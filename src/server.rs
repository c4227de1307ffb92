//! `skiff server`: opens the store, prepares the cluster's certificates and
//! kubeconfig, and serves the Kubernetes API over HTTPS until stopped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};
use controlplane::apiserver::authn::{Authenticator, User};
use controlplane::apiserver::pki::{Pki, ServerNames};
use controlplane::apiserver::sa_token::TokenKeys;
use controlplane::apiserver::{self, ApiState, KubeletClient, ServiceRanges, tls};
use controlplane::controllers;
use controlplane::leader;
use controlplane::storage::Store;
use controlplane::storage::embedded::EmbeddedStore;
use controlplane::storage::encrypted::{self, EncryptedStore};
use controlplane::storage::etcd::EtcdStore;
use ipnet::IpNet;

use crate::cli::{Component, ServerArgs};

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    // Turned off before `main` (see `no_thp` there); asked again here only
    // to report a refusal.
    if let Err(e) = agent::shim::disable_own_thp() {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off for the server");
    }
    let data_dir = &args.node.data_dir;
    let server_dir = data_dir.join("server");
    std::fs::create_dir_all(&server_dir)
        .with_context(|| format!("creating {}", server_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(
        EncryptedStore::open(
            open_store(&args).await?,
            &server_dir.join("encryption-key"),
            vec![encrypted::SECRETS_PREFIX],
        )
        .context("preparing the key that encrypts Secrets at rest")?,
    );

    let ranges = service_ranges(args.service_cidr)?;
    let node_ip = args.node.node_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let hostname = hostname();
    let names = ServerNames::new(
        &[node_ip],
        &hostname,
        IpAddr::V4(ranges.first_ip()),
        &args.cluster_domain,
    );
    let mut pki = Pki::load_or_create(&server_dir.join("tls"), &names)
        .context("preparing the cluster certificates")?;
    pki.load_or_create_token(&server_dir.join("token"), args.token.as_deref())
        .context("preparing the node join token")?;
    let local_url = format!("https://127.0.0.1:{}", args.https_listen_port);
    pki.write_kubeconfig(&data_dir.join("kubeconfig.yaml"), &local_url)
        .context("writing the admin kubeconfig")?;
    if let Some(path) = &args.write_kubeconfig {
        pki.write_kubeconfig(path, &local_url)
            .with_context(|| format!("writing the kubeconfig to {}", path.display()))?;
    }

    let pki = Arc::new(pki);
    let mut authenticator = Authenticator::new();
    authenticator
        .load_token_file(&server_dir.join("tokens.csv"))
        .map_err(anyhow::Error::msg)
        .context("reading the static token file")?;
    if let Some(token) = pki.token() {
        // Nodes joining with the token act as bootstrappers, as in k3s.
        let bootstrap = User {
            name: "system:node-bootstrap".into(),
            groups: vec!["system:bootstrappers".into(), "system:nodes".into()],
        };
        authenticator.add_token(&token.to_string(), bootstrap.clone());
        authenticator.add_token(token.secret(), bootstrap);
    }

    let advertise = SocketAddr::new(node_ip, args.https_listen_port).to_string();
    let mut state = ApiState::new(store, ranges, advertise);
    let service_key = server_dir.join("tls").join("service.key");
    let service_keys = TokenKeys::load_or_create(&service_key)
        .context("preparing the service-account token signing key")?;
    state.service_account_keys = Some(Arc::new(service_keys));
    let kubelet =
        KubeletClient::for_cluster(&pki).context("preparing the client for node agents")?;
    state.kubelet = Some(kubelet.clone());
    state.cluster_dns = Some(args.cluster_dns);
    let state = Arc::new(state);
    authenticator.accept_service_account_tokens(state.clone());
    apiserver::bootstrap(&state)
        .await
        .context("creating the default namespaces and the kubernetes Service")?;
    apiserver::authz::start(state.clone())
        .await
        .context("loading the RBAC policy")?;
    let router = apiserver::router(state.clone(), Arc::new(authenticator));
    tokio::spawn(apiserver::compaction::run(
        state.store.clone(),
        apiserver::compaction::INTERVAL,
    ));
    let client = apiserver::client::in_process(router.clone());
    if !args.disable.contains(&Component::MetricsServer) {
        tokio::spawn(apiserver::resource_metrics::collect::run(
            client.clone(),
            kubelet,
            state.resource_metrics.clone(),
            args.metric_resolution,
        ));
    }
    let settings = controllers::Settings {
        cluster_cidr: args.cluster_cidr,
        api_endpoint: SocketAddr::new(node_ip, args.https_listen_port),
        node_monitor_grace: args.node_monitor_grace_period,
        storage_dir: args.node.data_dir.join("storage"),
        autoscaler_sync: args.horizontal_pod_autoscaler_sync_period,
        root_ca: pki.server_ca_pem().to_owned(),
    };
    if !args.disable_scheduler {
        tokio::spawn(leader::run_while_leader(
            client.clone(),
            "kube-scheduler",
            leader::identity(&hostname),
            {
                let client = client.clone();
                move || controlplane::scheduler::run(client.clone())
            },
        ));
    }
    if !args.disable_controller_manager {
        tokio::spawn(leader::run_while_leader(
            client.clone(),
            "kube-controller-manager",
            leader::identity(&hostname),
            {
                let client = client.clone();
                move || controllers::run(client.clone(), settings.clone())
            },
        ));
    }

    if !args.disable.contains(&Component::Agent) {
        crate::node_agent::spawn_local(
            client.clone(),
            &pki,
            &args.node,
            node_ip,
            args.cluster_dns,
            &args.cluster_domain,
        )?;
    }
    if !args.disable.contains(&Component::Network) {
        tokio::spawn(crate::dataplane::run_for_server(
            client.clone(),
            &args,
            &hostname,
        ));
    }
    if !args.disable.contains(&Component::Dns) {
        tokio::spawn(crate::dns::serve_for_server(client.clone(), &args));
    }
    if !args.disable.contains(&Component::Ingress) {
        tokio::spawn(crate::ingress::spawn_in_server(client, &args, node_ip));
    }

    let tls_config = tls::server_config(&pki).context("configuring TLS")?;
    let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), args.https_listen_port);
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("listening on {bind}"))?;
    tracing::info!(%bind, kubeconfig = %data_dir.join("kubeconfig.yaml").display(), "API server listening");
    // Joining nodes present the token to routes outside the API's authentication.
    // They also learn the cluster settings their pods and data plane share.
    let cluster = apiserver::node_join::ClusterSettings {
        cluster_dns: Some(args.cluster_dns),
        cluster_domain: Some(args.cluster_domain.clone()),
        service_cidr: Some(args.service_cidr),
        cluster_cidr: Some(args.cluster_cidr),
    };
    let router = router.merge(apiserver::node_join::routes(pki.clone(), cluster));
    tls::serve(listener, tls_config, router, async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot wait for the stop signal");
        }
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// The embedded store under `DATA_DIR/server/db/` (where k3s keeps its
/// own), or etcd when `--datastore-endpoint` names it.
async fn open_store(args: &ServerArgs) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(spec) = &args.datastore_endpoint {
        let endpoints = EtcdStore::parse_endpoints(spec).context("--datastore-endpoint")?;
        let store = EtcdStore::connect(&endpoints)
            .await
            .with_context(|| format!("connecting to etcd at {spec}"))?;
        return Ok(Arc::new(store));
    }
    let dir = args.node.data_dir.join("server").join("db");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("state.db");
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
        .await
        .context("opening the embedded store")?
        .context("opening the embedded store")?;
    Ok(Arc::new(store))
}

fn service_ranges(cidr: IpNet) -> anyhow::Result<ServiceRanges> {
    let IpNet::V4(cidr) = cidr else {
        bail!("--service-cidr {cidr}: only IPv4 service ranges are supported");
    };
    if cidr.prefix_len() > 29 {
        bail!("--service-cidr {cidr} is too small");
    }
    Ok(ServiceRanges {
        cidr,
        node_ports: 30000..=32767,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}
