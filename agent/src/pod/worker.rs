//! One pod's worker: makes its sandbox and volumes, runs init containers
//! in order and then the containers, restarts them per `restartPolicy`
//! with back-off, acts on probe verdicts, terminates gracefully, tears
//! everything down when the pod goes, and writes the pod's status.
//!
//! What it started is recorded in the pod folder (`sandbox.json`,
//! `containers.json`), so a new agent re-adopts running containers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Lifecycle, LifecycleHandler, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::probe::{self, Kind, Probes};
use super::{Context, env, sa_token, service_env, status, volumes};
use crate::bundle::{self, BindMount, ContainerConfig};
use crate::image_source::ResolvedImage;
use crate::resources;
use crate::sandbox::{self, SandboxRecord};
use crate::shim::ShimSpec;

pub(crate) const CONTAINERS_RECORD: &str = "containers.json";
/// A container that ran this long without trouble starts its back-off over.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// Rotate CRI logs at this size, keeping this many files.
const MAX_LOG_BYTES: u64 = 10 * 1024 * 1024;
const MAX_LOG_FILES: u32 = 5;
const TERMINATION_MESSAGE_LIMIT: u64 = 4096;

/// How one run of a container ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Terminated {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub container_id: String,
}

/// One run of a container, as started through the runtime.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub attempt: u32,
    pub image: String,
    pub image_id: String,
    pub started_at: Timestamp,
    pub exit: Option<Terminated>,
}

/// A container (or init container) of the pod and its history.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ctr {
    pub name: String,
    pub init: bool,
    pub instance: Option<Instance>,
    pub restart_count: u32,
    pub last: Option<Terminated>,
    /// An init container that exited 0.
    pub done: bool,
    #[serde(skip)]
    pub waiting: Option<(String, String)>,
    #[serde(skip)]
    pub next_start: Option<Instant>,
    #[serde(skip)]
    pub backoff: Option<Duration>,
    #[serde(skip)]
    pub ready: bool,
    #[serde(skip)]
    pub started: bool,
    #[serde(skip)]
    probes: Option<Probes>,
}

impl Ctr {
    pub fn running(&self) -> bool {
        self.instance.as_ref().is_some_and(|i| i.exit.is_none())
    }
}

pub struct Worker {
    pub ctx: Arc<Context>,
    pub uid: String,
    pub dir: PathBuf,
    /// Shared with the pod cache: a pod is never copied per worker.
    pub pod: Option<Arc<Pod>>,
    pub sandbox: Option<SandboxRecord>,
    pub sandbox_error: Option<String>,
    pub containers: Vec<Ctr>,
    exits_tx: mpsc::UnboundedSender<String>,
    probes_tx: mpsc::Sender<probe::Report>,
    pub last_status: Option<serde_json::Value>,
    pub conditions: BTreeMap<String, (bool, Timestamp)>,
    /// The pod's own failure (an init container failed under `Never`).
    pub failed: bool,
    /// Records the pod's Events as the kubelet does (`Unhealthy`, `Killing`).
    recorder: Recorder,
    /// The cluster's Services, for the containers' Service variables.
    services: Store<Service>,
    /// Service-account tokens for projected volumes.
    tokens: sa_token::Tokens,
}

pub async fn run(
    ctx: Arc<Context>,
    services: Store<Service>,
    uid: String,
    mut pod_rx: watch::Receiver<Option<Arc<Pod>>>,
) {
    let dir = ctx.pods_dir().join(&uid);
    let (exits_tx, mut exits_rx) = mpsc::unbounded_channel();
    let (probes_tx, mut probes_rx) = mpsc::channel(64);
    let reporter = Reporter {
        controller: "kubelet".into(),
        instance: Some(ctx.config.node_name.clone()),
    };
    let mut worker = Worker {
        recorder: Recorder::new(ctx.client.clone(), reporter),
        services,
        ctx,
        uid,
        sandbox: sandbox::load(&dir),
        dir,
        pod: pod_rx.borrow_and_update().clone(),
        sandbox_error: None,
        containers: Vec::new(),
        exits_tx,
        probes_tx,
        last_status: None,
        conditions: BTreeMap::new(),
        failed: false,
        tokens: sa_token::Tokens::default(),
    };
    worker.load_containers();
    worker.adopt();
    loop {
        if worker.sync().await {
            return;
        }
        let next = worker
            .containers
            .iter()
            .filter_map(|c| c.next_start)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
            .min(Instant::now() + Duration::from_secs(1));
        tokio::select! {
            changed = pod_rx.changed() => {
                if changed.is_err() {
                    worker.pod = None;
                } else {
                    worker.pod = pod_rx.borrow_and_update().clone();
                }
            }
            Some(id) = exits_rx.recv() => worker.on_exit(&id),
            Some(report) = probes_rx.recv() => worker.on_probe(report).await,
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

impl Worker {
    fn load_containers(&mut self) {
        if let Ok(bytes) = std::fs::read(self.dir.join(CONTAINERS_RECORD))
            && let Ok(containers) = serde_json::from_slice::<Vec<Ctr>>(&bytes)
        {
            self.containers = containers;
        }
        let Some(pod) = &self.pod else { return };
        let Some(spec) = &pod.spec else { return };
        let wanted: Vec<(String, bool)> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| (c.name.clone(), true))
            .chain(spec.containers.iter().map(|c| (c.name.clone(), false)))
            .collect();
        for (name, init) in wanted {
            if !self.containers.iter().any(|c| c.name == name) {
                self.containers.push(Ctr {
                    name,
                    init,
                    ..Ctr::default()
                });
            }
        }
    }

    /// Containers that run (started by an earlier agent) get a waiter and
    /// their probes again; ones that ended while nobody watched get their
    /// exit recorded.
    fn adopt(&mut self) {
        let ids: Vec<String> = self
            .containers
            .iter()
            .filter(|c| c.running())
            .filter_map(|c| c.instance.as_ref().map(|i| i.id.clone()))
            .collect();
        for id in ids {
            let state_dir = self.state_dir(&id);
            if self.ctx.runtime.running(&state_dir) {
                tracing::info!(pod = %self.uid, container = %id, "re-adopted a running container");
                self.watch_exit(&id);
                if let Some(i) = self
                    .containers
                    .iter()
                    .position(|c| c.instance.as_ref().is_some_and(|x| x.id == id))
                {
                    self.start_probes(i);
                }
            } else {
                self.on_exit(&id);
            }
        }
    }

    /// One reconcile pass; true when the worker is finished.
    async fn sync(&mut self) -> bool {
        let Some(pod) = self.pod.clone() else {
            self.terminate_all(Duration::from_secs(0)).await;
            self.teardown().await;
            return true;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or_else(|| {
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds)
                })
                .unwrap_or(30);
            self.terminate_all(grace_period(grace)).await;
            self.write_status(&pod).await;
            self.teardown().await;
            let api: Api<Pod> = Api::namespaced(
                self.ctx.client.clone(),
                pod.metadata.namespace.as_deref().unwrap_or("default"),
            );
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            if let Err(e) = api
                .delete(pod.metadata.name.as_deref().unwrap_or(""), &params)
                .await
            {
                match e {
                    kube::Error::Api(ref s) if s.code == 404 || s.code == 409 => {}
                    e => {
                        tracing::warn!(pod = %self.uid, error = %e, "cannot remove the terminated pod")
                    }
                }
            }
            return true;
        }
        if self.containers.is_empty() {
            self.load_containers();
        }
        if self.ensure_sandbox(&pod).await {
            self.run_containers(&pod).await;
        }
        self.write_status(&pod).await;
        false
    }

    /// Sandbox and volumes; false while they cannot be made.
    async fn ensure_sandbox(&mut self, pod: &Pod) -> bool {
        if let Err(e) = std::fs::create_dir_all(self.dir.join("etc")) {
            self.sandbox_error = Some(format!("creating the pod folder: {e}"));
            return false;
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let mut record = self.sandbox.clone().unwrap_or_else(|| SandboxRecord {
            uid: self.uid.clone(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            host_network: spec.host_network.unwrap_or(false),
            cgroup: self.ctx.cgroups.pod_path(resources::qos(pod), &self.uid),
            created: Timestamp::now().to_string(),
            ..SandboxRecord::default()
        });
        let incomplete = record.ipc.is_none() || (!record.host_network && record.ip.is_none());
        if incomplete {
            if let Err(e) = crate::cgroups::create_pod(&record.cgroup, pod) {
                self.sandbox_error = Some(format!("creating the pod cgroup: {e}"));
                return false;
            }
            let hostname = crate::dns::hostname(pod);
            let result = sandbox::create(
                self.ctx.network(),
                &self.ctx.ns_dir(),
                &mut record,
                &hostname,
            )
            .await;
            // Whatever was made is recorded, so it is removed later even on failure.
            let _ = sandbox::save(&self.dir, &record);
            self.sandbox = Some(record.clone());
            if let Err(e) = result {
                self.sandbox_error = Some(e.to_string());
                return false;
            }
        }
        self.sandbox = Some(record.clone());
        self.sandbox_error = None;
        // The pod's name files.
        let ip = self.pod_ip();
        let ips: Vec<std::net::IpAddr> = ip.into_iter().collect();
        let files = [
            ("hosts", crate::dns::hosts(pod, &ips, &self.ctx.dns.domain)),
            ("resolv.conf", crate::dns::resolv_conf(pod, &self.ctx.dns)),
            ("hostname", format!("{}\n", crate::dns::hostname(pod))),
        ];
        for (name, content) in files {
            let path = self.dir.join("etc").join(name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(content.as_str())
                && let Err(e) = std::fs::write(&path, content)
            {
                self.sandbox_error = Some(format!("writing {}: {e}", path.display()));
                return false;
            }
        }
        true
    }

    fn pod_ip(&self) -> Option<std::net::IpAddr> {
        let record = self.sandbox.as_ref()?;
        if record.host_network {
            Some(self.ctx.config.node_ip)
        } else {
            record.ip
        }
    }

    async fn run_containers(&mut self, pod: &Pod) {
        let spec = pod.spec.clone().unwrap_or_default();
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        if let Err(e) = self.tokens.refresh(&self.ctx.client, pod).await {
            for c in self.containers.iter_mut().filter(|c| c.instance.is_none()) {
                c.waiting = Some(("ContainerCreating".into(), e.clone()));
            }
            return;
        }
        let volumes = match volumes::prepare(
            pod,
            &self.dir.join("volumes"),
            self.pod_ip().map(|ip| ip.to_string()).as_deref(),
            &self.ctx.config.node_ip.to_string(),
            &*self.ctx,
            &*self.ctx,
            &self.tokens,
        ) {
            Ok(v) => v,
            Err(e) => {
                for c in self.containers.iter_mut().filter(|c| c.instance.is_none()) {
                    c.waiting = Some(("ContainerCreating".into(), e.clone()));
                }
                return;
            }
        };
        if self.failed {
            return;
        }
        // Init containers, one at a time, in order.
        for init in spec.init_containers.iter().flatten() {
            let Some(i) = self.index(&init.name) else {
                continue;
            };
            if self.containers[i].done {
                continue;
            }
            if self.containers[i].running() {
                return;
            }
            if let Some(exit) = self.containers[i]
                .instance
                .as_ref()
                .and_then(|x| x.exit.clone())
            {
                if exit.exit_code == 0 {
                    self.containers[i].done = true;
                    self.save_containers();
                    continue;
                }
                if policy == "Never" {
                    self.failed = true;
                    return;
                }
                self.restart(i, pod, init, &volumes).await;
                return;
            }
            self.start(i, pod, init, &volumes).await;
            return;
        }
        for container in &spec.containers {
            let Some(i) = self.index(&container.name) else {
                continue;
            };
            if self.containers[i].running() {
                continue;
            }
            match self.containers[i]
                .instance
                .as_ref()
                .and_then(|x| x.exit.clone())
            {
                None => self.start(i, pod, container, &volumes).await,
                Some(exit) => {
                    let again = match policy.as_str() {
                        "Never" => false,
                        "OnFailure" => exit.exit_code != 0,
                        _ => true,
                    };
                    if again {
                        self.restart(i, pod, container, &volumes).await;
                    }
                }
            }
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.containers.iter().position(|c| c.name == name)
    }

    /// Restarts an exited container once its back-off has passed.
    async fn restart(
        &mut self,
        i: usize,
        pod: &Pod,
        container: &Container,
        volumes: &BTreeMap<String, volumes::Prepared>,
    ) {
        let now = Instant::now();
        let c = &mut self.containers[i];
        if c.next_start.is_none() {
            let exit = c.instance.as_ref().and_then(|x| x.exit.clone());
            let ran = exit
                .as_ref()
                .map(|e| e.finished_at.duration_since(e.started_at).unsigned_abs())
                .unwrap_or_default();
            let backoff = self.ctx.config.backoff;
            // The first restart is immediate; then 10 s doubling to 5 min,
            // starting over after a run of ten minutes.
            let delay = match c.backoff {
                _ if ran >= BACKOFF_RESET => Duration::ZERO,
                None => Duration::ZERO,
                Some(d) if d.is_zero() => backoff.initial,
                Some(d) => (d * 2).min(backoff.max),
            };
            c.backoff = Some(delay);
            let wait = delay;
            c.next_start = Some(now + wait);
            if !wait.is_zero() {
                c.waiting = Some((
                    "CrashLoopBackOff".into(),
                    format!(
                        "back-off {}s restarting failed container={} pod={}_{}({})",
                        wait.as_secs(),
                        c.name,
                        pod.metadata.name.as_deref().unwrap_or(""),
                        pod.metadata.namespace.as_deref().unwrap_or(""),
                        self.uid
                    ),
                ));
            }
        }
        if self.containers[i].next_start.is_some_and(|t| t > now) {
            return;
        }
        let old = self.containers[i].instance.take();
        if let Some(old) = old {
            self.remove_instance(&old.id).await;
            let c = &mut self.containers[i];
            c.last = old.exit;
            c.restart_count += 1;
        }
        self.containers[i].next_start = None;
        self.save_containers();
        self.start(i, pod, container, volumes).await;
    }

    async fn start(
        &mut self,
        i: usize,
        pod: &Pod,
        container: &Container,
        volumes: &BTreeMap<String, volumes::Prepared>,
    ) {
        let attempt = self.containers[i].restart_count;
        match self.create(pod, container, volumes, attempt).await {
            Ok(instance) => {
                let id = instance.id.clone();
                let c = &mut self.containers[i];
                c.instance = Some(instance);
                c.waiting = None;
                c.ready = false;
                c.started = false;
                self.save_containers();
                self.watch_exit(&id);
                self.start_probes(i);
            }
            Err((reason, message)) => {
                tracing::info!(pod = %self.uid, container = %container.name, %reason, %message, "container not started");
                let c = &mut self.containers[i];
                c.waiting = Some((reason, message));
                // Retry on a back-off, as for images that cannot be pulled.
                let delay = match c.backoff {
                    Some(d) if !d.is_zero() => (d * 2).min(self.ctx.config.backoff.max),
                    _ => self.ctx.config.backoff.initial,
                };
                c.backoff = Some(delay);
                c.next_start = Some(Instant::now() + delay);
            }
        }
    }

    /// Makes the bundle and starts the container; on failure the waiting
    /// reason and message.
    async fn create(
        &mut self,
        pod: &Pod,
        container: &Container,
        volumes: &BTreeMap<String, volumes::Prepared>,
        attempt: u32,
    ) -> Result<Instance, (String, String)> {
        let image_ref = container.image.clone().unwrap_or_default();
        let image = self.image(container, &image_ref)?;
        let failed = |m: String| ("CreateContainerConfigError".to_owned(), m);
        let pod_ip = self.pod_ip().map(|ip| ip.to_string());
        let services: Vec<Service> = self
            .services
            .state()
            .iter()
            .map(|s| (**s).clone())
            .collect();
        let env = env::build(
            pod,
            container,
            &image.env,
            &service_env::build(pod, &services),
            pod_ip.as_deref(),
            &self.ctx.config.node_ip.to_string(),
            &*self.ctx,
        )
        .map_err(failed)?;
        let lookup: BTreeMap<&str, &str> =
            env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let expand = |list: &Option<Vec<String>>| -> Result<Option<Vec<String>>, _> {
            list.as_ref()
                .map(|l| l.iter().map(|a| env::expand(a, &lookup)).collect())
                .transpose()
                .map_err(failed)
        };
        let args: Vec<String> = match (expand(&container.command)?, expand(&container.args)?) {
            (Some(cmd), args) => cmd.into_iter().chain(args.unwrap_or_default()).collect(),
            (None, Some(args)) => image.entrypoint.iter().cloned().chain(args).collect(),
            (None, None) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
        };
        if args.is_empty() {
            return Err(failed("no command specified".into()));
        }
        let id = format!("{}-{}-{attempt}", self.uid, container.name);
        let bundle_dir = self.dir.join("bundles").join(&id);
        let _ = bundle::remove(&bundle_dir);
        let rootfs = bundle::prepare_rootfs(&bundle_dir, &image.layers)
            .map_err(|e| ("CreateContainerError".to_owned(), e.to_string()))?;
        let (uid, gid) = user(pod, container, &image, &rootfs);
        let sandbox = self.sandbox.clone().unwrap_or_default();
        let mut mounts = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            let Some(v) = volumes.get(&m.name) else {
                return Err(failed(format!("volume {:?} not found", m.name)));
            };
            let mut source = v.path.clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                source = volumes::sub_path(&source, sub, !v.managed).map_err(failed)?;
            }
            mounts.push(BindMount {
                source,
                destination: m.mount_path.clone(),
                read_only: m.read_only.unwrap_or(false) || v.managed,
            });
        }
        for (file, dest) in [
            ("hosts", "/etc/hosts"),
            ("resolv.conf", "/etc/resolv.conf"),
            ("hostname", "/etc/hostname"),
        ] {
            if !mounts.iter().any(|m| m.destination == dest) {
                mounts.push(BindMount {
                    source: self.dir.join("etc").join(file),
                    destination: dest.into(),
                    read_only: false,
                });
            }
        }
        let termination_path = container
            .termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into());
        let termination_file = self.dir.join("termination").join(&id);
        if let Some(parent) = termination_file.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&termination_file, b"");
        mounts.push(BindMount {
            source: termination_file,
            destination: termination_path,
            read_only: false,
        });
        let security = container.security_context.clone().unwrap_or_default();
        let caps = security.capabilities.clone().unwrap_or_default();
        let cpu_request = resources::container_cpu_request(container);
        let config = ContainerConfig {
            args,
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: container
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| image.working_dir.clone()),
            uid,
            gid,
            additional_gids: pod
                .spec
                .as_ref()
                .and_then(|s| s.security_context.as_ref())
                .and_then(|s| s.supplemental_groups.clone())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|g| u32::try_from(g).ok())
                .collect(),
            tty: container.tty.unwrap_or(false),
            read_only_root: security.read_only_root_filesystem.unwrap_or(false),
            privileged: security.privileged.unwrap_or(false),
            caps_add: caps.add.unwrap_or_default(),
            caps_drop: caps.drop.unwrap_or_default(),
            no_new_privileges: !security.allow_privilege_escalation.unwrap_or(true),
            mounts,
            netns: sandbox.netns.clone(),
            ipcns: sandbox.ipc.clone(),
            utsns: sandbox.uts.clone(),
            cgroups_path: format!("{}/{id}", sandbox.cgroup),
            cpu_shares: resources::cpu_shares(cpu_request),
            cpu_quota: resources::limit(container, "cpu").map(|m| (m * 100).max(1000) as i64),
            memory_limit: resources::limit(container, "memory").map(|b| b as i64),
            annotations: [
                ("io.kubernetes.pod.uid".to_owned(), self.uid.clone()),
                (
                    "io.kubernetes.container.name".to_owned(),
                    container.name.clone(),
                ),
            ]
            .into_iter()
            .collect(),
        };
        bundle::write_config(&bundle_dir, &config)
            .map_err(|e| ("CreateContainerError".to_owned(), e.to_string()))?;
        let log_path = self.log_path(pod, &container.name, attempt);
        if let Some(parent) = log_path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let spec = self.shim_spec(&id, container, log_path);
        let started = self.ctx.runtime.start(&spec).await;
        if let Err(e) = started {
            let _ = self.ctx.runtime.delete(&spec).await;
            let _ = bundle::remove(&bundle_dir);
            return Err(("RunContainerError".to_owned(), e.to_string()));
        }
        Ok(Instance {
            id,
            attempt,
            image: image_ref,
            image_id: image.id.clone(),
            started_at: Timestamp::now(),
            exit: None,
        })
    }

    fn image(
        &self,
        container: &Container,
        reference: &str,
    ) -> Result<ResolvedImage, (String, String)> {
        let policy = container.image_pull_policy.as_deref().unwrap_or_else(|| {
            if reference.ends_with(":latest")
                || !reference.rsplit('/').next().unwrap_or("").contains(':')
            {
                "Always"
            } else {
                "IfNotPresent"
            }
        });
        let found = self.ctx.images.resolve(reference);
        match (policy, found) {
            ("Always", _) => Err((
                "ImagePullBackOff".into(),
                format!(
                    "Back-off pulling image \"{reference}\": this node has no registry to pull from \
                     (imagePullPolicy: Always); import the image with `skiff images import` and use IfNotPresent"
                ),
            )),
            (_, Some(image)) => Ok(image),
            ("Never", None) => Err((
                "ErrImageNeverPull".into(),
                format!("Container image \"{reference}\" is not present with pull policy of Never"),
            )),
            (_, None) => Err((
                "ImagePullBackOff".into(),
                format!(
                    "Back-off pulling image \"{reference}\": the image is not in this node's store and \
                     there is no registry to pull from; import it with `skiff images import`"
                ),
            )),
        }
    }

    fn log_path(&self, pod: &Pod, container: &str, attempt: u32) -> PathBuf {
        self.ctx
            .logs_dir()
            .join(format!(
                "{}_{}_{}",
                pod.metadata.namespace.as_deref().unwrap_or("default"),
                pod.metadata.name.as_deref().unwrap_or(""),
                self.uid
            ))
            .join(container)
            .join(format!("{attempt}.log"))
    }

    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.dir.join("shim").join(id)
    }

    fn shim_spec(&self, id: &str, container: &Container, log_path: PathBuf) -> ShimSpec {
        let runtime = self.ctx.runtime.config();
        ShimSpec {
            id: id.to_owned(),
            bundle: self.dir.join("bundles").join(id),
            runtime: runtime.binary.clone(),
            runtime_root: runtime.root.clone(),
            log_path,
            state_dir: self.state_dir(id),
            tty: container.tty.unwrap_or(false),
            stdin: container.stdin.unwrap_or(false),
            stdin_once: container.stdin_once.unwrap_or(false),
            max_log_bytes: MAX_LOG_BYTES,
            max_log_files: MAX_LOG_FILES,
        }
    }

    /// The spec the shim of `id` was started with (from its state folder).
    fn spec_of(&self, id: &str) -> ShimSpec {
        crate::shim::ShimSpec::load(&self.state_dir(id)).unwrap_or_else(|_| {
            let runtime = self.ctx.runtime.config();
            ShimSpec {
                id: id.to_owned(),
                bundle: self.dir.join("bundles").join(id),
                runtime: runtime.binary.clone(),
                runtime_root: runtime.root.clone(),
                log_path: PathBuf::new(),
                state_dir: self.state_dir(id),
                tty: false,
                stdin: false,
                stdin_once: false,
                max_log_bytes: 0,
                max_log_files: 0,
            }
        })
    }

    fn watch_exit(&self, id: &str) {
        let runtime = self.ctx.runtime.clone();
        let state_dir = self.state_dir(id);
        let tx = self.exits_tx.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = runtime.wait(&state_dir).await {
                tracing::debug!(container = %id, error = %e, "waiting for a container");
            }
            let _ = tx.send(id);
        });
    }

    fn start_probes(&mut self, i: usize) {
        let Some(pod) = &self.pod else { return };
        let Some(spec) = &pod.spec else { return };
        let c = &mut self.containers[i];
        let Some(instance) = &c.instance else { return };
        let Some(container) = spec.containers.iter().find(|x| x.name == c.name) else {
            // Init containers have no probes.
            return;
        };
        c.started = container.startup_probe.is_none();
        c.ready = container.readiness_probe.is_none() && c.started;
        let ip = self
            .sandbox
            .as_ref()
            .and_then(|s| {
                if s.host_network {
                    Some(self.ctx.config.node_ip)
                } else {
                    s.ip
                }
            })
            .unwrap_or(self.ctx.config.node_ip);
        if container.startup_probe.is_some()
            || container.liveness_probe.is_some()
            || container.readiness_probe.is_some()
        {
            c.probes = Some(probe::start(
                probe::Target {
                    container: container.clone(),
                    instance: instance.id.clone(),
                    ip,
                    runtime: self.ctx.runtime.clone(),
                },
                self.probes_tx.clone(),
            ));
        }
    }

    /// Records how the container `id` ended.
    fn on_exit(&mut self, id: &str) {
        let state_dir = self.state_dir(id);
        let exit = self.ctx.runtime.exit_status(&state_dir);
        let cgroup = self
            .sandbox
            .as_ref()
            .map(|s| format!("{}/{id}", s.cgroup))
            .unwrap_or_default();
        let termination = self.dir.join("termination").join(id);
        let Some(c) = self
            .containers
            .iter_mut()
            .find(|c| c.instance.as_ref().is_some_and(|x| x.id == id))
        else {
            return;
        };
        let Some(instance) = c.instance.as_mut() else {
            return;
        };
        if instance.exit.is_some() {
            return;
        }
        let now = Timestamp::now();
        let (code, signal, started, finished) = match exit {
            Some(e) => (e.code, e.signal, e.started_at, e.finished_at),
            None => (255, None, instance.started_at, now),
        };
        let oom = crate::cgroups::oom_kills(&cgroup) > 0;
        let reason = if oom && (signal == Some(9) || code == 137) {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let message = std::fs::read(&termination)
            .ok()
            .map(|b| {
                String::from_utf8_lossy(&b[..b.len().min(TERMINATION_MESSAGE_LIMIT as usize)])
                    .into_owned()
            })
            .filter(|m| !m.is_empty());
        instance.exit = Some(Terminated {
            exit_code: code,
            signal,
            reason: reason.into(),
            message,
            started_at: started,
            finished_at: finished,
            container_id: format!("{}://{id}", self.ctx.runtime.config().name),
        });
        c.ready = false;
        c.probes = None;
        self.save_containers();
    }

    async fn on_probe(&mut self, report: probe::Report) {
        let grace = self.grace();
        let Some(i) = self.containers.iter().position(|c| {
            c.name == report.container
                && c.instance
                    .as_ref()
                    .is_some_and(|x| x.id == report.instance && x.exit.is_none())
        }) else {
            return;
        };
        let what = match report.kind {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        };
        if !report.success {
            let note = format!("{what} probe failed: {}", report.message);
            self.event(&report.container, EventType::Warning, "Unhealthy", note)
                .await;
        }
        match (report.kind, report.success) {
            (Kind::Readiness, ok) => self.containers[i].ready = ok && self.containers[i].started,
            (Kind::Startup, true) => {
                self.containers[i].started = true;
                let has_readiness = self
                    .container_spec(i)
                    .is_some_and(|c| c.readiness_probe.is_some());
                self.containers[i].ready = !has_readiness;
            }
            (Kind::Liveness, true) => {}
            (_, false) => {
                tracing::info!(pod = %self.uid, container = %report.container, message = %report.message, "{what} probe failed; restarting the container");
                let note = format!(
                    "Container {} failed {} probe, will be restarted",
                    report.container,
                    what.to_lowercase()
                );
                self.event(&report.container, EventType::Normal, "Killing", note)
                    .await;
                self.stop_container(i, grace).await;
            }
        }
    }

    /// Publishes an Event about `container` of the pod.
    async fn event(&self, container: &str, type_: EventType, reason: &str, note: String) {
        let Some(pod) = &self.pod else { return };
        let mut reference = pod.object_ref(&());
        reference.field_path = Some(format!("spec.containers{{{container}}}"));
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::debug!(pod = %self.uid, error = %e, "cannot record an event");
        }
    }

    fn container_spec(&self, i: usize) -> Option<Container> {
        let spec = self.pod.as_ref()?.spec.as_ref()?;
        let name = &self.containers[i].name;
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| &c.name == name)
            .cloned()
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        grace_period(secs)
    }

    /// preStop, SIGTERM, the grace period, SIGKILL; returns when it exited.
    async fn stop_container(&mut self, i: usize, grace: Duration) {
        let Some(id) = self.containers[i]
            .instance
            .as_ref()
            .filter(|x| x.exit.is_none())
            .map(|x| x.id.clone())
        else {
            return;
        };
        self.containers[i].probes = None;
        let deadline = Instant::now() + grace;
        if let Some(hook) = self
            .container_spec(i)
            .and_then(|c| c.lifecycle)
            .and_then(|l: Lifecycle| l.pre_stop)
            && !grace.is_zero()
        {
            let _ = tokio::time::timeout(grace, self.run_hook(&id, &hook)).await;
        }
        let spec = self.spec_of(&id);
        let state_dir = self.state_dir(&id);
        let _ = self.ctx.runtime.kill(&spec, libc::SIGTERM).await;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let exited = tokio::time::timeout(remaining, self.ctx.runtime.wait(&state_dir)).await;
        if exited.is_err() {
            let _ = self.ctx.runtime.kill(&spec, libc::SIGKILL).await;
            let _ =
                tokio::time::timeout(Duration::from_secs(10), self.ctx.runtime.wait(&state_dir))
                    .await;
        }
        self.on_exit(&id);
    }

    async fn run_hook(&self, id: &str, hook: &LifecycleHandler) {
        if let Some(exec) = &hook.exec {
            let argv = exec.command.clone().unwrap_or_default();
            let _ = self
                .ctx
                .runtime
                .exec(id, &argv, Duration::from_secs(3600))
                .await;
        } else if let Some(http) = &hook.http_get {
            let probe = k8s_openapi::api::core::v1::Probe {
                http_get: Some(http.clone()),
                ..Default::default()
            };
            let container = self
                .containers
                .iter()
                .position(|c| c.instance.as_ref().is_some_and(|x| x.id == id))
                .and_then(|i| self.container_spec(i));
            if let Some(container) = container {
                let target = probe::Target {
                    container,
                    instance: id.to_owned(),
                    ip: self.pod_ip().unwrap_or(self.ctx.config.node_ip),
                    runtime: self.ctx.runtime.clone(),
                };
                let _ = probe::check(&probe, &target, Duration::from_secs(10)).await;
            }
        } else if let Some(sleep) = &hook.sleep {
            tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64)).await;
        }
    }

    async fn terminate_all(&mut self, grace: Duration) {
        let running: Vec<usize> = (0..self.containers.len())
            .filter(|&i| self.containers[i].running())
            .collect();
        // All containers get their signal at once, as upstream.
        let mut stops = Vec::new();
        for i in running {
            let id = self.containers[i]
                .instance
                .as_ref()
                .map(|x| x.id.clone())
                .unwrap_or_default();
            let hook = self
                .container_spec(i)
                .and_then(|c| c.lifecycle)
                .and_then(|l| l.pre_stop);
            self.containers[i].probes = None;
            stops.push((i, id, hook));
        }
        let deadline = Instant::now() + grace;
        let this = &*self;
        let futures = stops.iter().map(|(_, id, hook)| {
            let id = id.clone();
            let hook = hook.clone();
            async move {
                let self_ = this;
                if let Some(hook) = hook
                    && !grace.is_zero()
                {
                    let _ = tokio::time::timeout(grace, self_.run_hook(&id, &hook)).await;
                }
                let spec = self_.spec_of(&id);
                let state_dir = self_.state_dir(&id);
                let _ = self_.ctx.runtime.kill(&spec, libc::SIGTERM).await;
                let remaining = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(remaining, self_.ctx.runtime.wait(&state_dir))
                    .await
                    .is_err()
                {
                    let _ = self_.ctx.runtime.kill(&spec, libc::SIGKILL).await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        self_.ctx.runtime.wait(&state_dir),
                    )
                    .await;
                }
            }
        });
        futures::future::join_all(futures).await;
        for (_, id, _) in stops {
            self.on_exit(&id);
        }
    }

    async fn remove_instance(&self, id: &str) {
        let spec = self.spec_of(id);
        if let Err(e) = self.ctx.runtime.delete(&spec).await {
            tracing::warn!(container = %id, error = %e, "cannot remove a container");
        }
        if let Err(e) = bundle::remove(&self.dir.join("bundles").join(id)) {
            tracing::warn!(container = %id, error = %e, "cannot remove a bundle");
        }
        let _ = std::fs::remove_file(self.dir.join("termination").join(id));
    }

    /// Removes every trace of the pod from the node.
    async fn teardown(&mut self) {
        let ids: Vec<String> = self
            .containers
            .iter()
            .filter_map(|c| c.instance.as_ref().map(|x| x.id.clone()))
            .collect();
        for id in ids {
            self.remove_instance(&id).await;
        }
        // Containers a crash left behind without a record.
        for id in self.ctx.runtime.list().await {
            if id.starts_with(&self.uid) {
                self.remove_instance(&id).await;
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("bundles")) {
            for e in entries.flatten() {
                let _ = bundle::remove(&e.path());
            }
        }
        volumes::remove_all(&self.dir.join("volumes"));
        let record = self.sandbox.clone().unwrap_or_else(|| SandboxRecord {
            uid: self.uid.clone(),
            ..SandboxRecord::default()
        });
        if let Err(e) = sandbox::destroy(self.ctx.network(), &record).await {
            tracing::warn!(pod = %self.uid, error = %e, "cannot remove the pod sandbox");
        }
        for qos in [
            resources::Qos::Guaranteed,
            resources::Qos::Burstable,
            resources::Qos::BestEffort,
        ] {
            let path = self.ctx.cgroups.pod_path(qos, &self.uid);
            if let Err(e) = crate::cgroups::remove_pod(&path) {
                tracing::warn!(pod = %self.uid, error = %e, "cannot remove the pod cgroup");
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.ctx.logs_dir()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(&self.uid) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pod = %self.uid, error = %e, "cannot remove the pod folder");
        }
        tracing::info!(pod = %self.uid, "pod removed from the node");
    }

    fn save_containers(&self) {
        let Ok(json) = serde_json::to_vec(&self.containers) else {
            return;
        };
        let tmp = self.dir.join(".containers.json.tmp");
        if std::fs::create_dir_all(&self.dir).is_ok() && std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, self.dir.join(CONTAINERS_RECORD));
        }
    }

    async fn write_status(&mut self, pod: &Pod) {
        let status = status::build(self, pod);
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.ctx.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = pod.metadata.name.as_deref().unwrap_or("");
        match api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
        {
            Ok(_) => self.last_status = Some(status),
            Err(e) => tracing::debug!(pod = %self.uid, error = %e, "cannot write the pod status"),
        }
    }
}

/// A pod's grace period from its seconds (negative: none). At most a year:
/// the deadline is the current instant plus the period, which a value near
/// `i64::MAX` seconds would overflow (the API accepts any, as upstream's does).
fn grace_period(seconds: i64) -> Duration {
    const MAX_GRACE_SECS: i64 = 365 * 24 * 3600;
    Duration::from_secs(seconds.clamp(0, MAX_GRACE_SECS) as u64)
}

/// The user and group the container runs as: securityContext first, the
/// image's `User` next (numeric, or a name looked up in the image's
/// /etc/passwd), root otherwise.
fn user(pod: &Pod, container: &Container, image: &ResolvedImage, rootfs: &Path) -> (u32, u32) {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or_else(|| pod_sc.and_then(|s| s.run_as_user));
    let run_as_group = sc
        .and_then(|s| s.run_as_group)
        .or_else(|| pod_sc.and_then(|s| s.run_as_group));
    let (mut uid, mut gid) = (0u32, 0u32);
    if !image.user.is_empty() {
        let (u, g) = image
            .user
            .split_once(':')
            .unwrap_or((image.user.as_str(), ""));
        match u.parse::<u32>() {
            Ok(n) => uid = n,
            Err(_) => {
                if let Some((pu, pg)) = passwd_lookup(rootfs, u) {
                    uid = pu;
                    gid = pg;
                }
            }
        }
        if let Ok(n) = g.parse::<u32>() {
            gid = n;
        }
    }
    if let Some(u) = run_as_user.and_then(|u| u32::try_from(u).ok()) {
        uid = u;
    }
    if let Some(g) = run_as_group.and_then(|g| u32::try_from(g).ok()) {
        gid = g;
    }
    (uid, gid)
}

/// The uid and gid of `name` in the image's /etc/passwd. The file is the
/// image's, read on the host: read only as a plain file under a plain
/// folder (an image could make either a link to a host file, or the file
/// a FIFO that blocks the read), and at most 1 MiB of it.
fn passwd_lookup(rootfs: &Path, name: &str) -> Option<(u32, u32)> {
    use std::io::Read;
    let etc = rootfs.join("etc");
    let passwd = etc.join("passwd");
    let plain = |path: &Path, dir: bool| {
        std::fs::symlink_metadata(path).is_ok_and(|m| if dir { m.is_dir() } else { m.is_file() })
    };
    if !plain(&etc, true) || !plain(&passwd, false) {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(&passwd)
        .ok()?
        .take(1 << 20)
        .read_to_string(&mut text)
        .ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_is_read_only_as_a_plain_file_of_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path();
        std::fs::create_dir(rootfs.join("etc")).unwrap();
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(passwd_lookup(rootfs, "app"), Some((1000, 1001)));
        assert_eq!(passwd_lookup(rootfs, "nobody"), None);
        // A link to a file outside the image is not followed.
        std::fs::remove_file(rootfs.join("etc/passwd")).unwrap();
        let host = dir.path().join("host-passwd");
        std::fs::write(&host, "app:x:7:7::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&host, rootfs.join("etc/passwd")).unwrap();
        assert_eq!(passwd_lookup(rootfs, "app"), None);
    }

    #[test]
    fn grace_periods_are_clamped_to_what_a_deadline_can_hold() {
        assert_eq!(grace_period(30), Duration::from_secs(30));
        assert_eq!(grace_period(-5), Duration::ZERO);
        let longest = grace_period(i64::MAX);
        assert_eq!(longest, Duration::from_secs(365 * 24 * 3600));
        // What the worker does with it must not overflow.
        let _ = Instant::now() + longest;
    }
}
