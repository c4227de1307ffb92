//! The pod table: READY, STATUS and RESTARTS summarise container states the
//! way upstream's printer does, which users read to debug their pods.

use jiff::Timestamp;
use serde_json::{Value, json};

use super::value::Obj;
use super::{AGE, Column, Ctx, NAME, Printer};

pub(super) static PODS: Printer = Printer {
    columns: &[
        NAME,
        Column::new(
            "Ready",
            "string",
            "Ready containers out of all containers (including sidecars).",
        ),
        Column::new(
            "Status",
            "string",
            "The pod's phase, or the reason its containers are not running.",
        ),
        Column::new(
            "Restarts",
            "string",
            "Container restarts, and how long ago the last one was.",
        ),
        AGE,
        Column::new("IP", "string", "The pod's first IP address.").wide(),
        Column::new("Node", "string", "The node the pod is bound to.").wide(),
        Column::new(
            "Nominated Node",
            "string",
            "The node preemption made room on, before binding.",
        )
        .wide(),
        Column::new(
            "Readiness Gates",
            "string",
            "Readiness gate conditions that are true, out of all gates.",
        )
        .wide(),
    ],
    cells,
    conditions: Some(conditions),
};

fn cells(pod: Obj<'_>, ctx: &Ctx) -> Vec<Value> {
    let summary = Summary::of(pod);
    let restarts = match summary.restarts {
        Restarts {
            count,
            last: Some(last),
        } if count != 0 => format!("{count} ({} ago)", ctx.since(Some(last))),
        Restarts { count, .. } => count.to_string(),
    };
    let first_ip = pod
        .at("status.podIPs")
        .items()
        .next()
        .map(|ip| ip.get("ip").str())
        .unwrap_or_else(|| pod.at("status.podIP").str());
    cells![
        pod.at("metadata.name").str(),
        format!("{}/{}", summary.ready, summary.total),
        summary.status,
        restarts,
        ctx.age(pod),
        or_none(first_ip),
        or_none(pod.at("spec.nodeName").str()),
        or_none(pod.at("status.nominatedNodeName").str()),
        readiness_gates(pod),
    ]
}

/// Finished pods are marked so clients can dim them.
fn conditions(pod: Obj<'_>) -> Option<Value> {
    let (reason, message) = match pod.at("status.phase").str() {
        "Succeeded" => (
            "Succeeded",
            "All containers in the pod terminated successfully.",
        ),
        "Failed" => ("Failed", "The pod terminated in failure."),
        _ => return None,
    };
    Some(json!([{
        "type": "Completed",
        "status": "True",
        "reason": reason,
        "message": message,
    }]))
}

/// The READY, STATUS and RESTARTS figures.
struct Summary {
    ready: i64,
    total: usize,
    status: String,
    restarts: Restarts,
}

impl Summary {
    /// Computed in upstream's order: the pod's phase or reason, then init
    /// containers (the first unfinished one decides the status), then —
    /// once initialized — the app containers, and deletion last.
    fn of(pod: Obj<'_>) -> Self {
        let sidecars = pod
            .at("spec.initContainers")
            .items()
            .filter(|c| is_sidecar(*c))
            .count();
        let mut summary = Summary {
            ready: 0,
            total: pod.at("spec.containers").len() + sidecars,
            status: initial_status(pod),
            restarts: Restarts::default(),
        };
        let (sidecar_restarts, initializing) = summary.scan_init_containers(pod);
        if !initializing || first_condition_true(pod, "Initialized") {
            // Once initialized, restarts of finished init containers no
            // longer count; sidecar restarts still do.
            summary.restarts = sidecar_restarts;
            summary.scan_containers(pod);
        }
        if pod.at("metadata.deletionTimestamp").is_set() {
            let phase = pod.at("status.phase").str();
            if pod.at("status.reason").str() == "NodeLost" {
                summary.status = "Unknown".into();
            } else if phase != "Succeeded" && phase != "Failed" {
                summary.status = "Terminating".into();
            }
        }
        summary
    }

    /// Counts init container restarts and ready sidecars, and sets the
    /// status from the first init container that has not finished. Returns
    /// the sidecars' restarts and whether the pod is still initializing.
    fn scan_init_containers(&mut self, pod: Obj<'_>) -> (Restarts, bool) {
        let specs = pod.at("spec.initContainers");
        let mut sidecar_restarts = Restarts::default();
        for (i, c) in pod.at("status.initContainerStatuses").items().enumerate() {
            self.restarts.add(c);
            let name = c.get("name").str();
            let sidecar = specs
                .items()
                .any(|spec| spec.get("name").str() == name && is_sidecar(spec));
            if sidecar {
                sidecar_restarts.add(c);
            }
            let terminated = c.at("state.terminated");
            if terminated.is_set() && terminated.get("exitCode").int() == 0 {
                continue;
            }
            if sidecar && c.get("started").bool() {
                if c.get("ready").bool() {
                    self.ready += 1;
                }
                continue;
            }
            let waiting_reason = c.at("state.waiting.reason").str();
            self.status = if terminated.is_set() {
                format!("Init:{}", exit_reason(terminated))
            } else if !waiting_reason.is_empty() && waiting_reason != "PodInitializing" {
                format!("Init:{waiting_reason}")
            } else {
                format!("Init:{i}/{}", specs.len())
            };
            return (sidecar_restarts, true);
        }
        (sidecar_restarts, false)
    }

    /// Counts app container restarts and ready containers; the first
    /// listed container that is waiting or terminated decides the status.
    fn scan_containers(&mut self, pod: Obj<'_>) {
        let mut has_running = false;
        for c in pod.at("status.containerStatuses").items().rev() {
            self.restarts.add(c);
            let waiting_reason = c.at("state.waiting.reason").str();
            let terminated = c.at("state.terminated");
            if !waiting_reason.is_empty() {
                self.status = waiting_reason.to_string();
            } else if terminated.is_set() {
                self.status = exit_reason(terminated);
            } else if c.get("ready").bool() && c.at("state.running").is_set() {
                has_running = true;
                self.ready += 1;
            }
        }
        // A completed container does not make the pod "Completed" while
        // another one still runs.
        if self.status == "Completed" && has_running {
            let ready = pod
                .at("status.conditions")
                .items()
                .any(|c| c.get("type").str() == "Ready" && c.get("status").str() == "True");
            self.status = if ready { "Running" } else { "NotReady" }.into();
        }
    }
}

/// `status.reason` if set, else the phase; `SchedulingGated` while the
/// scheduler is held back by scheduling gates.
fn initial_status(pod: Obj<'_>) -> String {
    let gated = pod.at("status.conditions").items().any(|c| {
        c.get("type").str() == "PodScheduled" && c.get("reason").str() == "SchedulingGated"
    });
    if gated {
        return "SchedulingGated".into();
    }
    match pod.at("status.reason").str() {
        "" => pod.at("status.phase").str().into(),
        reason => reason.into(),
    }
}

/// An init container that keeps running beside the app (a sidecar); it
/// counts as a container of the pod.
fn is_sidecar(spec: Obj<'_>) -> bool {
    spec.get("restartPolicy").str() == "Always"
}

/// Restart count and the latest restart time among some containers.
#[derive(Default)]
struct Restarts {
    count: i64,
    last: Option<Timestamp>,
}

impl Restarts {
    fn add(&mut self, status: Obj<'_>) {
        self.count += status.get("restartCount").int();
        let finished = status.at("lastState.terminated.finishedAt").time();
        if finished > self.last {
            self.last = finished;
        }
    }
}

/// A terminated container's reason, else its signal or exit code.
fn exit_reason(terminated: Obj<'_>) -> String {
    let reason = terminated.get("reason").str();
    if !reason.is_empty() {
        return reason.to_string();
    }
    match terminated.get("signal").int() {
        0 => format!("ExitCode:{}", terminated.get("exitCode").int()),
        signal => format!("Signal:{signal}"),
    }
}

/// Whether the pod's first condition of `kind` is true.
fn first_condition_true(pod: Obj<'_>, kind: &str) -> bool {
    pod.at("status.conditions")
        .items()
        .find(|c| c.get("type").str() == kind)
        .is_some_and(|c| c.get("status").str() == "True")
}

/// "true gates/all gates", `<none>` without gates.
fn readiness_gates(pod: Obj<'_>) -> String {
    let gates = pod.at("spec.readinessGates");
    if gates.len() == 0 {
        return "<none>".into();
    }
    let passing = gates
        .items()
        .filter(|gate| first_condition_true(pod, gate.get("conditionType").str()))
        .count();
    format!("{passing}/{}", gates.len())
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s.into()
    }
}
