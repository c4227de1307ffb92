//! A kube-rs `watcher` and `reflector` against the API server, in process
//! (the same router the HTTPS listener serves), staying in sync through
//! over 1,000 changes and a forced compaction that expires their watch.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use controlplane::apiserver::{self, ApiState, ServiceRanges, authn::Authenticator};
use controlplane::storage::Store;
use controlplane::storage::embedded::EmbeddedStore;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event, watcher};
use kube::runtime::{WatchStreamExt, reflector};

struct Cluster {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    client: kube::Client,
}

async fn cluster() -> anyhow::Result<Cluster> {
    let dir = tempfile::Builder::new()
        .prefix("skiff-test-kube-")
        .tempdir()?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("state.db"))?);
    let ranges = ServiceRanges {
        cidr: "10.43.0.0/16".parse()?,
        node_ports: 30000..=32767,
    };
    let state = Arc::new(ApiState::new(
        store.clone(),
        ranges,
        "127.0.0.1:6443".into(),
    ));
    apiserver::bootstrap(&state).await?;
    let router = apiserver::router(state, Arc::new(Authenticator::new()));
    let client = apiserver::client::in_process(router);
    Ok(Cluster {
        _dir: dir,
        store,
        client,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_stays_in_sync_through_changes_and_compaction() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let api: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), "default");
    let (reader, writer) = reflector::store();
    let (inits_tx, mut inits) = tokio::sync::mpsc::unbounded_channel();
    // The consumer can be paused so that the server-side watch falls
    // behind, which is what a compaction then expires.
    let (pause_tx, mut pause) = tokio::sync::watch::channel(false);
    let stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let consumer = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            while *pause.borrow_and_update() {
                if pause.changed().await.is_err() {
                    return;
                }
            }
            match stream.next().await {
                Some(Ok(Event::Init)) => {
                    let _ = inits_tx.send(());
                }
                Some(_) => {}
                None => return,
            }
        }
    });
    reader.wait_until_ready().await?;

    // 250 creates, 750 updates and 125 deletes: 1,125 changes.
    const N: usize = 250;
    let pp = PostParams::default();
    for i in 0..N {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("cm-{i}")}, "data": {"n": "0"}
        }))?;
        api.create(&pp, &cm).await?;
    }
    pause_tx.send(true)?;
    for round in 1..=3 {
        for i in 0..N {
            let patch = serde_json::json!({"data": {"n": round.to_string()}});
            api.patch(
                &format!("cm-{i}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        }
    }
    // Expire every watch position older than now.
    let now = cluster.store.current_revision().await?;
    cluster.store.compact(now).await?;
    pause_tx.send(false)?;
    for i in 0..N {
        if i % 2 == 0 {
            api.delete(&format!("cm-{i}"), &DeleteParams::default())
                .await?;
        }
    }

    // One Init at start, and another after the 410 made it re-list.
    let mut relists = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while relists < 2 {
        tokio::select! {
            _ = inits.recv() => relists += 1,
            _ = tokio::time::sleep_until(deadline) => anyhow::bail!("no re-list after compaction (saw {relists} inits)"),
        }
    }
    let expected = api.list(&ListParams::default()).await?;
    for _ in 0..300 {
        let cached = summary(reader.state().iter().map(|cm| cm.as_ref()));
        let live = summary(expected.items.iter());
        if cached == live {
            ensure!(
                live.len() == N / 2 && live.iter().all(|(_, n)| n == "3"),
                "{live:?}"
            );
            consumer.abort();
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("reflector never matched the server's list")
}

/// (name, data.n) of each ConfigMap, sorted.
fn summary<'a>(items: impl Iterator<Item = &'a ConfigMap>) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = items
        .map(|cm| {
            let n = cm
                .data
                .as_ref()
                .and_then(|d| d.get("n"))
                .cloned()
                .unwrap_or_default();
            (cm.metadata.name.clone().unwrap_or_default(), n)
        })
        .collect();
    pairs.sort();
    pairs
}

#[tokio::test]
async fn watch_from_a_compacted_revision_gets_410() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let api: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}}))?;
    let created = api.create(&PostParams::default(), &cm).await?;
    let old = created
        .metadata
        .resource_version
        .context("resourceVersion")?;
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"data": {"a": "b"}})),
    )
    .await?;
    let now = cluster.store.current_revision().await?;
    cluster.store.compact(now).await?;

    let mut events = api
        .watch(&kube::api::WatchParams::default(), &old)
        .await?
        .boxed();
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await? {
        Some(Ok(kube::api::WatchEvent::Error(status))) => {
            ensure!(status.code == 410, "{status:?}");
            ensure!(status.reason == "Expired", "{status:?}");
        }
        other => anyhow::bail!("expected a 410 ERROR event, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_watch_with_a_huge_timeout_still_streams() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    // More seconds than a deadline can hold: the server clamps them.
    let request = http::Request::get(
        "/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=9223372036854775807",
    )
    .body(Vec::new())?;
    let mut events = cluster
        .client
        .request_events::<ConfigMap>(request)
        .await?
        .boxed();
    let api: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "late"}}))?;
    api.create(&PostParams::default(), &cm).await?;
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await? {
        Some(Ok(kube::api::WatchEvent::Added(cm))) => {
            ensure!(cm.metadata.name.as_deref() == Some("late"), "{cm:?}");
        }
        other => anyhow::bail!("expected the ADDED event, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_service_creates_get_distinct_addresses_and_ports() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Service;
    let cluster = cluster().await?;
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let service: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("svc-{i}")},
                "spec": {"type": "NodePort", "selector": {"app": "x"},
                         "ports": [{"port": 80, "targetPort": 8080}]}
            }))?;
            anyhow::Ok(api.create(&PostParams::default(), &service).await?)
        }));
    }
    let mut ips = std::collections::HashSet::new();
    let mut ports = std::collections::HashSet::new();
    for task in tasks {
        let service = task.await??;
        let spec = service.spec.context("spec")?;
        let ip = spec.cluster_ip.context("clusterIP")?;
        ensure!(ip.starts_with("10.43."), "{ip}");
        ensure!(ips.insert(ip.clone()), "duplicate clusterIP {ip}");
        let node_port = spec.ports.context("ports")?[0]
            .node_port
            .context("nodePort")?;
        ensure!((30000..=32767).contains(&node_port), "{node_port}");
        ensure!(ports.insert(node_port), "duplicate nodePort {node_port}");
    }
    // A requested address already taken is refused; a free one is granted.
    let taken = ips.iter().next().context("an address")?.clone();
    let clash: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "clash"},
        "spec": {"clusterIP": taken, "ports": [{"port": 80}]}
    }))?;
    let err = api
        .create(&PostParams::default(), &clash)
        .await
        .err()
        .context("duplicate IP accepted")?;
    ensure!(err.to_string().contains("already allocated"), "{err}");
    // Deleting a Service frees its address for reuse.
    api.delete("svc-0", &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_watch_with_initial_events_and_bookmarks() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let api: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), "default");
    for i in 0..5 {
        let cm: ConfigMap =
            serde_json::from_value(serde_json::json!({"metadata": {"name": format!("s-{i}")}}))?;
        api.create(&PostParams::default(), &cm).await?;
    }
    // kube-rs's streaming lists use sendInitialEvents and wait for the
    // initial-events-end bookmark.
    let config = watcher::Config::default().streaming_lists();
    let mut stream = std::pin::pin!(watcher(api.clone(), config));
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await? {
            Some(Ok(Event::InitApply(cm))) => initial.push(cm.metadata.name.unwrap_or_default()),
            Some(Ok(Event::InitDone)) => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => anyhow::bail!("watch failed: {e}"),
            None => anyhow::bail!("watch ended"),
        }
    }
    initial.sort();
    ensure!(
        initial == ["s-0", "s-1", "s-2", "s-3", "s-4"],
        "{initial:?}"
    );
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "later"}}))?;
    api.create(&PostParams::default(), &cm).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await? {
            Some(Ok(Event::Apply(cm))) if cm.metadata.name.as_deref() == Some("later") => break,
            Some(Ok(_)) => {}
            other => anyhow::bail!("expected the later object, got {other:?}"),
        }
    }
    Ok(())
}
