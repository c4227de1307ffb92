//! The pod's status as the kubelet reports it: phase, conditions, IPs,
//! start time, QoS class and a status for every (init) container.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::worker::{Ctr, Terminated, Worker};
use crate::resources;

pub fn build(worker: &mut Worker, pod: &Pod) -> Value {
    let spec = pod.spec.clone().unwrap_or_default();
    let policy = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());
    let runtime = worker.ctx.runtime.config().name.clone();
    let init_names: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    let find = |name: &str| worker.containers.iter().find(|c| c.name == name);

    let initialized = init_names.iter().all(|n| find(n).is_some_and(|c| c.done));
    let mains: Vec<Option<&Ctr>> = names.iter().map(|n| find(n)).collect();
    let running = mains.iter().filter(|c| c.is_some_and(Ctr::running)).count();
    let exits: Vec<Option<&Terminated>> = mains
        .iter()
        .map(|c| {
            c.and_then(|c| c.instance.as_ref())
                .and_then(|i| i.exit.as_ref())
        })
        .collect();
    let all_exited = !exits.is_empty() && exits.iter().all(Option::is_some);
    let all_succeeded = all_exited && exits.iter().all(|e| e.is_some_and(|e| e.exit_code == 0));
    let restarted = mains
        .iter()
        .any(|c| c.is_some_and(|c| c.restart_count > 0 || c.last.is_some()));
    let phase = if worker.failed {
        "Failed"
    } else if !initialized {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if all_exited {
        match policy.as_str() {
            "Never" if all_succeeded => "Succeeded",
            "Never" => "Failed",
            "OnFailure" if all_succeeded => "Succeeded",
            _ => "Running",
        }
    } else if restarted {
        "Running"
    } else {
        "Pending"
    };
    let containers_ready = initialized
        && !mains.is_empty()
        && mains
            .iter()
            .all(|c| c.is_some_and(|c| c.running() && c.ready));
    let sandbox_ready = worker.sandbox_error.is_none() && worker.sandbox.is_some();
    let terminal = phase == "Succeeded" || phase == "Failed";
    let conditions = [
        ("PodReadyToStartContainers", sandbox_ready, None),
        (
            "Initialized",
            initialized,
            (!initialized).then_some("ContainersNotInitialized"),
        ),
        (
            "Ready",
            containers_ready,
            (!containers_ready).then_some(if terminal {
                "PodCompleted"
            } else {
                "ContainersNotReady"
            }),
        ),
        (
            "ContainersReady",
            containers_ready,
            (!containers_ready).then_some(if terminal {
                "PodCompleted"
            } else {
                "ContainersNotReady"
            }),
        ),
        ("PodScheduled", true, None),
    ];
    let now = Timestamp::now();
    let mut cond_json = Vec::new();
    for (kind, ok, reason) in conditions {
        let entry = worker
            .conditions
            .entry(kind.to_owned())
            .or_insert((ok, now));
        if entry.0 != ok {
            *entry = (ok, now);
        }
        let mut c = json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "lastProbeTime": null,
            "lastTransitionTime": entry.1.to_string(),
        });
        if let Some(reason) = reason {
            c["reason"] = json!(reason);
        }
        cond_json.push(c);
    }

    let container_status = |name: &str, image: &str, init: bool| -> Value {
        let Some(c) = find(name) else {
            return json!({"name": name, "image": image, "imageID": "", "ready": false, "restartCount": 0,
                "started": false, "state": {"waiting": {"reason": "PodInitializing"}}});
        };
        let state = match (&c.instance, &c.waiting) {
            (Some(i), _) if i.exit.is_none() => {
                json!({"running": {"startedAt": i.started_at.to_string()}})
            }
            (_, Some((reason, message))) => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            (Some(i), None) => terminated(i.exit.as_ref(), &runtime, &i.id),
            (None, None) => {
                let reason = if worker.sandbox_error.is_some() || !init && !initialized {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                };
                let mut w = json!({"reason": reason});
                if let Some(e) = &worker.sandbox_error {
                    w["message"] = json!(e);
                }
                json!({"waiting": w})
            }
        };
        let last = match &c.last {
            Some(t) => terminated(Some(t), &runtime, ""),
            None => json!({}),
        };
        let mut s = json!({
            "name": name,
            "image": c.instance.as_ref().map_or(image, |i| i.image.as_str()),
            "imageID": c.instance.as_ref().map(|i| i.image_id.clone()).unwrap_or_default(),
            "ready": c.running() && c.ready,
            "started": c.running() && c.started,
            "restartCount": c.restart_count,
            "state": state,
            "lastState": last,
        });
        if let Some(i) = &c.instance {
            s["containerID"] = json!(format!("{runtime}://{}", i.id));
        }
        if init {
            s["started"] = json!(c.running());
        }
        s
    };
    let statuses: Vec<Value> = spec
        .containers
        .iter()
        .map(|c| container_status(&c.name, c.image.as_deref().unwrap_or(""), false))
        .collect();
    let init_statuses: Vec<Value> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| container_status(&c.name, c.image.as_deref().unwrap_or(""), true))
        .collect();

    let host_ip = worker.ctx.config.node_ip.to_string();
    let pod_ip = worker
        .sandbox
        .as_ref()
        .and_then(|s| {
            if s.host_network {
                Some(worker.ctx.config.node_ip)
            } else {
                s.ip
            }
        })
        .map(|ip| ip.to_string());
    let start_time = worker
        .sandbox
        .as_ref()
        .map(|s| s.created.clone())
        .filter(|s| !s.is_empty());
    let mut status = json!({
        "phase": phase,
        "conditions": cond_json,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "qosClass": resources::qos(pod).as_str(),
        "containerStatuses": statuses,
    });
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] = json!(init_statuses);
    }
    if let Some(ip) = pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    if let Some(t) = start_time {
        status["startTime"] = json!(t);
    }
    status
}

fn terminated(t: Option<&Terminated>, runtime: &str, id: &str) -> Value {
    let Some(t) = t else {
        return json!({"terminated": {"exitCode": 0, "reason": "Unknown"}});
    };
    let mut inner = json!({
        "exitCode": t.exit_code,
        "reason": t.reason,
        "startedAt": t.started_at.to_string(),
        "finishedAt": t.finished_at.to_string(),
        "containerID": if t.container_id.is_empty() { format!("{runtime}://{id}") } else { t.container_id.clone() },
    });
    if let Some(sig) = t.signal {
        inner["signal"] = json!(sig);
    }
    if let Some(m) = &t.message {
        inner["message"] = json!(m);
    }
    json!({"terminated": inner})
}
