//! The kubelet API as this agent serves it: [`streaming`] on the kubelet
//! port with the node's serving certificate, finding containers through
//! what the pod workers keep on disk (the sandbox record, the containers
//! record and each shim's spec), and resource usage read from the pods'
//! cgroups for `/metrics/resource`.
//!
//! Pods are looked up by name in the pod workers' cache of the pods bound
//! to this node (one watch for both), so a pod recreated under the same
//! name is never confused with the one before it (their folders are by
//! uid).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::streaming::{self, ContainerRef, Containers, StreamError};
use crate::{AgentConfig, cgroups, sandbox, shim};

/// How long to wait before trying to bind the kubelet port again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Serves the kubelet API until the process stops. Without TLS material
/// nothing is served: the API must only ever answer the API server.
pub async fn run(pods: Store<Pod>, config: Arc<AgentConfig>) {
    let Some(material) = &config.tls else {
        tracing::info!("no serving certificate: the kubelet API is not served");
        return;
    };
    let tls = match streaming::tls_config(
        material.cert_pem.as_bytes(),
        material.key_pem.as_bytes(),
        material.client_ca_pem.as_bytes(),
    ) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(error = %e, "the kubelet API cannot be served");
            return;
        }
    };
    let pods = NodePods {
        pods,
        pods_dir: config.data_dir.join("pods"),
        logs_dir: config.data_dir.join("logs"),
        runtime: config.runtime.binary.clone(),
        runtime_root: config.runtime.root.clone(),
    };
    let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), config.kubelet_port);
    let listener = loop {
        match tokio::net::TcpListener::bind(bind).await {
            Ok(listener) => break listener,
            Err(e) => {
                tracing::warn!(%bind, error = %e, "cannot listen for the kubelet API; retrying");
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    tracing::info!(%bind, "kubelet API listening");
    streaming::serve(listener, tls, Arc::new(pods)).await;
}

/// This node's pods as the kubelet API sees them.
pub struct NodePods {
    pub pods: Store<Pod>,
    /// `DATA_DIR/agent/pods`: one folder per pod uid.
    pub pods_dir: PathBuf,
    /// `DATA_DIR/agent/logs`: `<namespace>_<pod>_<uid>/<container>/<attempt>.log`.
    pub logs_dir: PathBuf,
    /// The runtime, for containers whose shim spec cannot be read.
    pub runtime: PathBuf,
    pub runtime_root: PathBuf,
}

/// The part of a pod worker's containers record read here.
#[derive(Debug, Deserialize)]
struct Record {
    name: String,
    #[serde(default)]
    instance: Option<Instance>,
    #[serde(default)]
    restart_count: u32,
}

#[derive(Debug, Deserialize)]
struct Instance {
    id: String,
    attempt: u32,
    #[serde(default)]
    exit: Option<IgnoredAny>,
}

impl NodePods {
    fn pod(&self, namespace: &str, name: &str) -> Result<Arc<Pod>, StreamError> {
        self.pods
            .get(&ObjectRef::new(name).within(namespace))
            .ok_or_else(|| StreamError::NotFound(format!("pod \"{name}\" not found on this node")))
    }

    /// Where the pod worker keeps the container's logs, one file per run
    /// named after its attempt.
    fn log_dir(&self, pod: &Pod, namespace: &str, name: &str, container: &str) -> PathBuf {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        self.logs_dir
            .join(format!("{namespace}_{name}_{uid}"))
            .join(container)
    }

    fn pod_dir(&self, pod: &Pod) -> Option<PathBuf> {
        let uid = pod.metadata.uid.as_deref().filter(|u| !u.is_empty())?;
        // A uid is a UUID; anything else must not name a path.
        if uid.contains('/') || uid.starts_with('.') {
            return None;
        }
        Some(self.pods_dir.join(uid))
    }
}

impl Containers for NodePods {
    fn find(
        &self,
        namespace: &str,
        pod_name: &str,
        container: Option<&str>,
    ) -> Result<ContainerRef, StreamError> {
        let pod = self.pod(namespace, pod_name)?;
        let names = container_names(&pod);
        let name = match container {
            Some(name) => name.to_owned(),
            None if names.len() == 1 => names[0].clone(),
            None => {
                return Err(StreamError::BadRequest(format!(
                    "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                    names.join(" ")
                )));
            }
        };
        if !names.contains(&name) {
            return Err(StreamError::NotFound(format!(
                "container {name} is not valid for pod {pod_name}"
            )));
        }
        let waiting = || {
            StreamError::BadRequest(format!(
                "container \"{name}\" in pod \"{pod_name}\" is waiting to start: ContainerCreating"
            ))
        };
        let dir = self.pod_dir(&pod).ok_or_else(waiting)?;
        let record = records(&dir)
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(waiting)?;
        let log_dir = self.log_dir(&pod, namespace, pod_name, &name);
        let netns = sandbox::load(&dir).and_then(|r| r.netns);
        let Some(instance) = record.instance else {
            // Between two runs (the old one removed, the next not yet
            // created) the last run's log is the current one.
            let last = record.restart_count.checked_sub(1).ok_or_else(waiting)?;
            return Ok(ContainerRef {
                id: String::new(),
                runtime: self.runtime.clone(),
                runtime_root: self.runtime_root.clone(),
                log_path: log_dir.join(format!("{last}.log")),
                previous_log_path: previous_log(&log_dir, last),
                state_dir: dir.join("shim").join("none"),
                netns,
                tty: false,
                stdin: false,
                running: false,
            });
        };
        let state_dir = dir.join("shim").join(&instance.id);
        let spec = shim::ShimSpec::load(&state_dir).ok();
        let log_path = spec
            .as_ref()
            .map(|s| s.log_path.clone())
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| log_dir.join(format!("{}.log", instance.attempt)));
        let running = instance.exit.is_none() && shim::running(&state_dir);
        Ok(ContainerRef {
            runtime: spec
                .as_ref()
                .map_or_else(|| self.runtime.clone(), |s| s.runtime.clone()),
            runtime_root: spec
                .as_ref()
                .map_or_else(|| self.runtime_root.clone(), |s| s.runtime_root.clone()),
            tty: spec.as_ref().is_some_and(|s| s.tty),
            stdin: spec.as_ref().is_some_and(|s| s.stdin),
            id: instance.id,
            previous_log_path: previous_log(&log_dir, instance.attempt),
            log_path,
            state_dir,
            netns,
            running,
        })
    }

    fn netns(&self, namespace: &str, pod_name: &str) -> Result<Option<PathBuf>, StreamError> {
        let pod = self.pod(namespace, pod_name)?;
        let record = self.pod_dir(&pod).and_then(|dir| sandbox::load(&dir));
        match record {
            Some(record) if record.host_network => Ok(None),
            Some(record) if record.netns.is_some() => Ok(record.netns),
            _ => Err(StreamError::BadRequest(format!(
                "pod \"{pod_name}\" has no network namespace yet"
            ))),
        }
    }

    fn resource_metrics(&self) -> Option<String> {
        let mut samples = Samples::default();
        if let Some((cpu_ns, memory)) = cgroups::usage("/") {
            samples.node = Some(Usage { cpu_ns, memory });
        }
        for pod in self.pods.state() {
            let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name)
            else {
                continue;
            };
            let Some(dir) = self.pod_dir(&pod) else {
                continue;
            };
            let Some(record) = sandbox::load(&dir) else {
                continue;
            };
            if let Some((cpu_ns, memory)) = cgroups::usage(&record.cgroup) {
                samples
                    .pods
                    .push((namespace.clone(), name.clone(), Usage { cpu_ns, memory }));
            }
            for container in records(&dir) {
                let Some(instance) = container.instance.filter(|i| i.exit.is_none()) else {
                    continue;
                };
                let path = format!("{}/{}", record.cgroup, instance.id);
                if let Some((cpu_ns, memory)) = cgroups::usage(&path) {
                    samples.containers.push((
                        namespace.clone(),
                        name.clone(),
                        container.name,
                        Usage { cpu_ns, memory },
                    ));
                }
            }
        }
        Some(samples.render(jiff::Timestamp::now().as_millisecond()))
    }
}

fn container_names(pod: &Pod) -> Vec<String> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .map(|c| c.name.clone())
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .map(|c| c.name.clone()),
        )
        .collect()
}

fn records(pod_dir: &Path) -> Vec<Record> {
    std::fs::read(pod_dir.join(crate::pod::CONTAINERS_RECORD))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// The log of the run before `attempt` in `log_dir`, if it is there.
fn previous_log(log_dir: &Path, attempt: u32) -> Option<PathBuf> {
    let previous = attempt.checked_sub(1)?;
    let path = log_dir.join(format!("{previous}.log"));
    path.exists().then_some(path)
}

/// One cgroup's cumulative CPU time and memory working set.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Usage {
    cpu_ns: u64,
    memory: u64,
}

/// One scrape's readings, rendered as the kubelet's `/metrics/resource`.
#[derive(Debug, Default)]
struct Samples {
    node: Option<Usage>,
    /// (namespace, pod, usage)
    pods: Vec<(String, String, Usage)>,
    /// (namespace, pod, container, usage)
    containers: Vec<(String, String, String, Usage)>,
}

impl Samples {
    fn render(&self, at_ms: i64) -> String {
        let mut out = String::new();
        let seconds = |u: &Usage| u.cpu_ns as f64 / 1e9;
        if let Some(node) = &self.node {
            family(
                &mut out,
                "node_cpu_usage_seconds_total",
                "counter",
                "Cumulative cpu time consumed by the node in core-seconds",
            );
            let _ = writeln!(
                out,
                "node_cpu_usage_seconds_total {} {at_ms}",
                seconds(node)
            );
            family(
                &mut out,
                "node_memory_working_set_bytes",
                "gauge",
                "Current working set of the node in bytes",
            );
            let _ = writeln!(out, "node_memory_working_set_bytes {} {at_ms}", node.memory);
        }
        let pod_labels =
            |ns: &str, pod: &str| format!("namespace=\"{}\",pod=\"{}\"", escape(ns), escape(pod));
        let container_labels = |ns: &str, pod: &str, container: &str| {
            format!(
                "container=\"{}\",{}",
                escape(container),
                pod_labels(ns, pod)
            )
        };
        family(
            &mut out,
            "container_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed by the container in core-seconds",
        );
        for (ns, pod, container, usage) in &self.containers {
            let _ = writeln!(
                out,
                "container_cpu_usage_seconds_total{{{}}} {} {at_ms}",
                container_labels(ns, pod, container),
                seconds(usage)
            );
        }
        family(
            &mut out,
            "container_memory_working_set_bytes",
            "gauge",
            "Current working set of the container in bytes",
        );
        for (ns, pod, container, usage) in &self.containers {
            let _ = writeln!(
                out,
                "container_memory_working_set_bytes{{{}}} {} {at_ms}",
                container_labels(ns, pod, container),
                usage.memory
            );
        }
        family(
            &mut out,
            "pod_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed by the pod in core-seconds",
        );
        for (ns, pod, usage) in &self.pods {
            let _ = writeln!(
                out,
                "pod_cpu_usage_seconds_total{{{}}} {} {at_ms}",
                pod_labels(ns, pod),
                seconds(usage)
            );
        }
        family(
            &mut out,
            "pod_memory_working_set_bytes",
            "gauge",
            "Current working set of the pod in bytes",
        );
        for (ns, pod, usage) in &self.pods {
            let _ = writeln!(
                out,
                "pod_memory_working_set_bytes{{{}}} {} {at_ms}",
                pod_labels(ns, pod),
                usage.memory
            );
        }
        family(
            &mut out,
            "scrape_error",
            "gauge",
            "1 if there was an error while getting container metrics, 0 otherwise",
        );
        out.push_str("scrape_error 0\n");
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} [STABLE] {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_kubelet_s_resource_metrics() {
        let samples = Samples {
            node: Some(Usage {
                cpu_ns: 12_500_000_000,
                memory: 2048,
            }),
            pods: vec![(
                "default".into(),
                "web".into(),
                Usage {
                    cpu_ns: 1_500_000_000,
                    memory: 4096,
                },
            )],
            containers: vec![(
                "default".into(),
                "web".into(),
                "app".into(),
                Usage {
                    cpu_ns: 1_000_000_000,
                    memory: 1024,
                },
            )],
        };
        let text = samples.render(1_700_000_000_000);
        for line in [
            "node_cpu_usage_seconds_total 12.5 1700000000000",
            "node_memory_working_set_bytes 2048 1700000000000",
            r#"container_cpu_usage_seconds_total{container="app",namespace="default",pod="web"} 1 1700000000000"#,
            r#"container_memory_working_set_bytes{container="app",namespace="default",pod="web"} 1024 1700000000000"#,
            r#"pod_cpu_usage_seconds_total{namespace="default",pod="web"} 1.5 1700000000000"#,
            r#"pod_memory_working_set_bytes{namespace="default",pod="web"} 4096 1700000000000"#,
            "# TYPE container_cpu_usage_seconds_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn previous_log_is_the_attempt_before() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(previous_log(tmp.path(), 2), None);
        std::fs::write(tmp.path().join("1.log"), "").unwrap();
        assert_eq!(previous_log(tmp.path(), 2), Some(tmp.path().join("1.log")));
        assert_eq!(previous_log(tmp.path(), 0), None);
    }

    #[test]
    fn reads_the_workers_containers_record() {
        let tmp = tempfile::tempdir().unwrap();
        let record = r#"[{"name":"app","init":false,"instance":{"id":"u-app-1","attempt":1,
            "image":"i","image_id":"sha256:x","started_at":"2026-01-01T00:00:00Z",
            "exit":null},"restart_count":1,"last":null,"done":false},
            {"name":"old","instance":{"id":"u-old-0","attempt":0,"exit":{"exit_code":0}}},
            {"name":"new"}]"#;
        std::fs::write(tmp.path().join(crate::pod::CONTAINERS_RECORD), record).unwrap();
        let records = records(tmp.path());
        assert_eq!(records.len(), 3);
        let app = records[0].instance.as_ref().unwrap();
        assert_eq!((app.id.as_str(), app.attempt), ("u-app-1", 1));
        assert!(app.exit.is_none());
        assert!(records[1].instance.as_ref().unwrap().exit.is_some());
        assert!(records[2].instance.is_none());
    }
}
