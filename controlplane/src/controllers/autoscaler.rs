//! HorizontalPodAutoscaler (autoscaling/v2) for resource metrics, as
//! kube-controller-manager's: every sync period each autoscaler reads its
//! target's `scale` subresource, the usage of the pods its selector picks
//! from `metrics.k8s.io`, and their requests; proposes
//! `ceil(ready pods × usage / target)` unless within the 10 % tolerance
//! (treating pods without metrics or not yet ready conservatively, as
//! upstream does); stabilises proposals over `behavior`'s windows (300 s for
//! scale-down by default), limits the step by its policies, clamps to
//! `[minReplicas, maxReplicas]`, and writes the new scale and the status.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::{
    HPAScalingRules, HorizontalPodAutoscaler, MetricSpec, MetricTarget,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::scheduler::quantity::Quantity;

/// Upstream's `--horizontal-pod-autoscaler-tolerance`.
const TOLERANCE: f64 = 0.1;
/// Default `behavior.scaleDown.stabilizationWindowSeconds`.
const SCALE_DOWN_WINDOW: i32 = 300;
const MANAGER: &str = "horizontal-pod-autoscaler";

/// What one evaluation found for one metric.
struct Proposal {
    replicas: i32,
    /// For `status.currentMetrics`.
    current: Value,
    /// "cpu resource utilization (percentage of request)" and the like.
    description: String,
}

/// Runs until the process ends.
pub async fn run(client: kube::Client, sync: Duration) {
    let recorder = Recorder::new(client.clone(), Reporter::from(MANAGER));
    // Recent proposals per autoscaler, for stabilisation.
    let mut history: HashMap<String, Vec<(Instant, i32)>> = HashMap::new();
    let mut tick = tokio::time::interval(sync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let all: Api<HorizontalPodAutoscaler> = Api::all(client.clone());
    loop {
        tick.tick().await;
        let list = match all.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::debug!(error = %e, "autoscaler: listing HorizontalPodAutoscalers");
                continue;
            }
        };
        history.retain(|uid, _| list.iter().any(|h| h.uid().as_deref() == Some(uid)));
        for hpa in list {
            let uid = hpa.uid().unwrap_or_default();
            let recent = history.entry(uid).or_default();
            if let Err(message) = reconcile(&client, &recorder, &hpa, recent).await {
                tracing::debug!(hpa = %hpa.name_any(), %message, "autoscaler");
            }
        }
    }
}

async fn reconcile(
    client: &kube::Client,
    recorder: &Recorder,
    hpa: &HorizontalPodAutoscaler,
    recent: &mut Vec<(Instant, i32)>,
) -> Result<(), String> {
    let namespace = hpa.namespace().unwrap_or_default();
    let spec = hpa.spec.clone().unwrap_or_default();
    let target = &spec.scale_target_ref;
    let Some(resource) = scalable(
        &target.api_version.clone().unwrap_or_default(),
        &target.kind,
    ) else {
        let message = format!("the HPA controller cannot scale a {}", target.kind);
        return fail(
            client,
            recorder,
            hpa,
            "AbleToScale",
            "FailedGetScale",
            message,
        )
        .await;
    };
    let targets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let scale = match targets.get_scale(&target.name).await {
        Ok(scale) => scale,
        Err(e) => {
            let message =
                format!("the HPA controller was unable to get the target's current scale: {e}");
            return fail(
                client,
                recorder,
                hpa,
                "AbleToScale",
                "FailedGetScale",
                message,
            )
            .await;
        }
    };
    let current = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
    let selector = scale.status.and_then(|s| s.selector).unwrap_or_default();
    let min = spec.min_replicas.unwrap_or(1);
    let max = spec.max_replicas;
    if current == 0 && min > 0 {
        let message = "scaling is disabled since the replica count of the target is zero".into();
        return fail(
            client,
            recorder,
            hpa,
            "ScalingActive",
            "ScalingDisabled",
            message,
        )
        .await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let by_selector = ListParams::default().labels(&selector);
    let pods = pods
        .list(&by_selector)
        .await
        .map_err(|e| format!("listing pods: {e}"))?
        .items;
    let usage = match pod_usage(client, &namespace, &by_selector).await {
        Ok(usage) => usage,
        Err(e) => {
            let message = format!("unable to get pod metrics: {e}");
            return fail(
                client,
                recorder,
                hpa,
                "ScalingActive",
                "FailedGetResourceMetric",
                message,
            )
            .await;
        }
    };
    let metrics = match spec.metrics.clone().filter(|m| !m.is_empty()) {
        Some(metrics) => metrics,
        // Upstream's default: 80 % CPU utilisation.
        None => vec![serde_json::from_value(json!({"type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}))
        .map_err(|e| e.to_string())?],
    };
    let mut proposals = Vec::new();
    for metric in &metrics {
        match propose(metric, current, &pods, &usage) {
            Ok(p) => proposals.push(p),
            Err(message) => {
                return fail(
                    client,
                    recorder,
                    hpa,
                    "ScalingActive",
                    "FailedGetResourceMetric",
                    message,
                )
                .await;
            }
        }
    }
    let Some(best) = proposals.iter().max_by_key(|p| p.replicas) else {
        return Ok(());
    };
    let now = Instant::now();
    recent.push((now, best.replicas));
    let behavior = spec.behavior.clone().unwrap_or_default();
    let stabilized = stabilize(recent, now, current, best.replicas, &behavior);
    let limited = limit(current, stabilized, &behavior);
    let desired = limited.clamp(min, max.max(min));
    let limit_reason = if limited > max {
        Some((
            "TooManyReplicas",
            "the desired replica count is more than the maximum replica count",
        ))
    } else if limited < min {
        Some((
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count",
        ))
    } else {
        None
    };
    let mut scaled = false;
    if desired != current {
        let patch = json!({"spec": {"replicas": desired}});
        if let Err(e) = targets
            .patch_scale(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            let message = format!("failed to rescale {}: {e}", target.name);
            return fail(
                client,
                recorder,
                hpa,
                "AbleToScale",
                "FailedUpdateScale",
                message,
            )
            .await;
        }
        scaled = true;
        let direction = if desired > current { "above" } else { "below" };
        let note = format!(
            "New size: {desired}; reason: {} {direction} target",
            best.description
        );
        let action = format!("Rescale to {desired}");
        publish(
            recorder,
            hpa,
            EventType::Normal,
            "SuccessfulRescale",
            &action,
            note,
        )
        .await;
    }
    let now_text = Timestamp::now().to_string();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now_text})
    };
    let (limited_status, limited_reason, limited_message) = match limit_reason {
        Some((reason, message)) => ("True", reason, message),
        None => (
            "False",
            "DesiredWithinRange",
            "the desired count is within the acceptable range",
        ),
    };
    let mut status = json!({
        "observedGeneration": hpa.metadata.generation,
        "currentReplicas": current,
        "desiredReplicas": desired,
        "currentMetrics": proposals.iter().map(|p| p.current.clone()).collect::<Vec<_>>(),
        "conditions": [
            condition("AbleToScale", "True", if scaled { "SucceededRescale" } else { "ReadyForNewScale" },
                "recommended size matches current size"),
            condition("ScalingActive", "True", "ValidMetricFound",
                "the HPA was able to successfully calculate a replica count from the metrics"),
            condition("ScalingLimited", limited_status, limited_reason, limited_message),
        ],
    });
    if scaled {
        status["lastScaleTime"] = json!(now_text);
    } else if let Some(last) = hpa.status.as_ref().and_then(|s| s.last_scale_time.as_ref()) {
        status["lastScaleTime"] = json!(last.0.to_string());
    }
    write_status(client, hpa, status).await
}

/// What the metric asks for, by upstream's replica calculator.
fn propose(
    metric: &MetricSpec,
    current: i32,
    pods: &[Pod],
    usage: &HashMap<String, [f64; 2]>,
) -> Result<Proposal, String> {
    let Some(source) = metric
        .resource
        .as_ref()
        .filter(|_| metric.type_ == "Resource")
    else {
        return Err(format!(
            "metrics of type {} are not supported; use Resource (cpu or memory)",
            metric.type_
        ));
    };
    let name = source.name.as_str();
    let index = match name {
        "cpu" => 0,
        "memory" => 1,
        other => {
            return Err(format!(
                "resource {other} has no metrics; use cpu or memory"
            ));
        }
    };
    let target = &source.target;
    let mut ready_usage = 0.0;
    let mut ready_requests = 0.0;
    let mut ready = 0usize;
    let mut missing = Vec::new();
    let mut unready = Vec::new();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Failed" | "Succeeded"))
        {
            continue;
        }
        let request = requests(pod, name)?;
        let pod_name = pod.name_any();
        match usage.get(&pod_name) {
            None => missing.push(request),
            Some(_) if !is_ready(pod) => unready.push(request),
            Some(used) => {
                ready += 1;
                ready_usage += used[index];
                ready_requests += request;
            }
        }
    }
    if ready == 0 {
        return Err(format!(
            "did not receive metrics for any ready pods of resource {name}"
        ));
    }
    let (ratio, utilization, average) = ratio_of(target, ready_usage, ready_requests, ready)?;
    let description = match target.type_.as_str() {
        "Utilization" => format!("{name} resource utilization (percentage of request)"),
        _ => format!("{name} resource"),
    };
    let current_metric = json!({"type": "Resource", "resource": {"name": name, "current": {
        "averageUtilization": utilization.map(|u| u.round() as i64),
        "averageValue": format_quantity(name, average),
    }}});
    let mut replicas = if (ratio - 1.0).abs() <= TOLERANCE {
        current
    } else {
        (ratio * ready as f64).ceil() as i32
    };
    if (!missing.is_empty() || !unready.is_empty()) && (ratio - 1.0).abs() > TOLERANCE {
        // Be conservative about what cannot be seen: assume pods without
        // metrics use all of their request when scaling down and none
        // when scaling up; unready pods use none when scaling up.
        let mut usage_sum = ready_usage;
        let mut request_sum = ready_requests;
        let mut counted = ready;
        for request in &missing {
            if ratio < 1.0 {
                usage_sum += request;
            }
            request_sum += request;
            counted += 1;
        }
        if ratio > 1.0 {
            request_sum += unready.iter().sum::<f64>();
            counted += unready.len();
        }
        let (new_ratio, _, _) = ratio_of(target, usage_sum, request_sum, counted)?;
        let flipped = (ratio > 1.0) != (new_ratio > 1.0);
        replicas = if flipped || (new_ratio - 1.0).abs() <= TOLERANCE {
            current
        } else {
            (new_ratio * counted as f64).ceil() as i32
        };
    }
    Ok(Proposal {
        replicas,
        current: current_metric,
        description,
    })
}

/// usage/target ratio, the utilisation (percent) and the average value.
fn ratio_of(
    target: &MetricTarget,
    usage: f64,
    requests: f64,
    pods: usize,
) -> Result<(f64, Option<f64>, f64), String> {
    let average = usage / pods.max(1) as f64;
    match target.type_.as_str() {
        "Utilization" => {
            let want = target
                .average_utilization
                .ok_or("target utilization is missing")?;
            if requests <= 0.0 || want <= 0 {
                return Err("pods do not request the resource".into());
            }
            let utilization = usage * 100.0 / requests;
            Ok((utilization / f64::from(want), Some(utilization), average))
        }
        "AverageValue" => {
            let want = target
                .average_value
                .as_ref()
                .and_then(|q| Quantity::parse(&q.0))
                .map(|q| q.milli() as f64 / 1000.0)
                .filter(|v| *v > 0.0)
                .ok_or("target averageValue is missing")?;
            Ok((average / want, None, average))
        }
        other => Err(format!(
            "target type {other} is not supported for resource metrics"
        )),
    }
}

/// The pod's request of `resource` (cores for cpu, bytes for memory).
fn requests(pod: &Pod, resource: &str) -> Result<f64, String> {
    let mut total = 0.0;
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let quantity = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get(resource))
            .and_then(|q| Quantity::parse(&q.0))
            .ok_or_else(|| {
                format!(
                    "missing request for {resource} in container {} of Pod {}",
                    c.name,
                    pod.name_any()
                )
            })?;
        total += quantity.milli() as f64 / 1000.0;
    }
    Ok(total)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Pod name → [cpu cores, memory bytes] from `metrics.k8s.io`.
async fn pod_usage(
    client: &kube::Client,
    namespace: &str,
    params: &ListParams,
) -> Result<HashMap<String, [f64; 2]>, kube::Error> {
    let resource = ApiResource {
        group: "metrics.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "metrics.k8s.io/v1beta1".into(),
        kind: "PodMetrics".into(),
        plural: "pods".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let list = api.list(params).await?;
    Ok(list
        .items
        .into_iter()
        .map(|m| {
            let sum = |resource: &str| -> f64 {
                m.data["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["usage"][resource].as_str())
                    .filter_map(Quantity::parse)
                    .map(|q| q.milli() as f64 / 1000.0)
                    .sum()
            };
            (m.name_any(), [sum("cpu"), sum("memory")])
        })
        .collect())
}

/// Holds proposals in `behavior`'s windows: scaling down goes no lower
/// than the highest recent proposal, scaling up no higher than the lowest.
fn stabilize(
    recent: &mut Vec<(Instant, i32)>,
    now: Instant,
    current: i32,
    proposed: i32,
    behavior: &k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior,
) -> i32 {
    let window = |rules: Option<&HPAScalingRules>, default: i32| {
        let seconds = rules
            .and_then(|r| r.stabilization_window_seconds)
            .unwrap_or(default)
            .max(0);
        Duration::from_secs(seconds as u64)
    };
    let down = window(behavior.scale_down.as_ref(), SCALE_DOWN_WINDOW);
    let up = window(behavior.scale_up.as_ref(), 0);
    let longest = down.max(up);
    recent.retain(|(at, _)| now.duration_since(*at) <= longest);
    let within = |w: Duration| {
        recent
            .iter()
            .filter(move |(at, _)| now.duration_since(*at) <= w)
    };
    if proposed < current {
        within(down)
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(proposed)
            .min(current)
    } else if proposed > current {
        within(up)
            .map(|(_, r)| *r)
            .min()
            .unwrap_or(proposed)
            .max(current)
    } else {
        proposed
    }
}

/// Caps one step by the policies (defaults: up by 100 % or 4 pods, the
/// larger; down by 100 %).
fn limit(
    current: i32,
    desired: i32,
    behavior: &k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior,
) -> i32 {
    let step = |rules: Option<&HPAScalingRules>, defaults: &[(&str, i32)]| {
        let policies: Vec<(String, i32)> = match rules.and_then(|r| r.policies.as_ref()) {
            Some(p) => p.iter().map(|p| (p.type_.clone(), p.value)).collect(),
            None => defaults
                .iter()
                .map(|(t, v)| ((*t).to_owned(), *v))
                .collect(),
        };
        let select_min = rules.and_then(|r| r.select_policy.as_deref()) == Some("Min");
        let disabled = rules.and_then(|r| r.select_policy.as_deref()) == Some("Disabled");
        let changes = policies.iter().map(|(kind, value)| match kind.as_str() {
            "Percent" => (f64::from(current) * f64::from(*value) / 100.0).ceil() as i32,
            _ => *value,
        });
        if disabled {
            Some(0)
        } else if select_min {
            changes.min()
        } else {
            changes.max()
        }
    };
    if desired > current {
        let most =
            step(behavior.scale_up.as_ref(), &[("Percent", 100), ("Pods", 4)]).unwrap_or(i32::MAX);
        desired.min(current.saturating_add(most))
    } else if desired < current {
        let most = step(behavior.scale_down.as_ref(), &[("Percent", 100)]).unwrap_or(i32::MAX);
        desired.max(current.saturating_sub(most))
    } else {
        desired
    }
}

/// The `scale` endpoint of the kinds upstream's HPA scales.
fn scalable(api_version: &str, kind: &str) -> Option<ApiResource> {
    let plural = match (api_version, kind) {
        ("apps/v1", "Deployment") => "deployments",
        ("apps/v1", "ReplicaSet") => "replicasets",
        ("apps/v1", "StatefulSet") => "statefulsets",
        ("v1", "ReplicationController") => "replicationcontrollers",
        _ => return None,
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Some(ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    })
}

fn format_quantity(resource: &str, value: f64) -> String {
    if resource == "cpu" {
        format!("{}m", (value * 1000.0).round() as i64)
    } else {
        format!("{}", value.round() as i64)
    }
}

/// Records why the autoscaler could not act, in an Event and a condition.
async fn fail(
    client: &kube::Client,
    recorder: &Recorder,
    hpa: &HorizontalPodAutoscaler,
    condition: &str,
    reason: &str,
    message: String,
) -> Result<(), String> {
    publish(
        recorder,
        hpa,
        EventType::Warning,
        reason,
        "Scaling",
        message.clone(),
    )
    .await;
    let status = json!({"conditions": [{"type": condition, "status": "False", "reason": reason,
        "message": message, "lastTransitionTime": Timestamp::now().to_string()}]});
    write_status(client, hpa, status).await?;
    Err(message)
}

async fn write_status(
    client: &kube::Client,
    hpa: &HorizontalPodAutoscaler,
    status: Value,
) -> Result<(), String> {
    let api: Api<HorizontalPodAutoscaler> =
        Api::namespaced(client.clone(), &hpa.namespace().unwrap_or_default());
    api.patch_status(
        &hpa.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": status})),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("writing the status: {e}"))
}

async fn publish(
    recorder: &Recorder,
    hpa: &HorizontalPodAutoscaler,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        // kube's recorder folds events with one reason and action into a
        // series and keeps the first note: name the size in the action so
        // each rescale is told.
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &hpa.object_ref(&())).await {
        tracing::debug!(error = %e, "recording an autoscaler event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, cpu: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .expect("a pod")
    }

    fn cpu_target(percent: i32) -> MetricSpec {
        serde_json::from_value(json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": percent}}}))
        .expect("a metric")
    }

    #[test]
    fn proposes_from_utilization_within_tolerance() {
        let pods = [pod("a", "100m", true), pod("b", "100m", true)];
        let usage =
            |a: f64, b: f64| [("a".to_owned(), [a, 0.0]), ("b".to_owned(), [b, 0.0])].into();
        // 100 % against a 50 % target: double.
        let p = propose(&cpu_target(50), 2, &pods, &usage(0.1, 0.1)).expect("a proposal");
        assert_eq!(p.replicas, 4);
        assert_eq!(p.current["resource"]["current"]["averageUtilization"], 100);
        // 52 % against 50 %: within tolerance.
        let p = propose(&cpu_target(50), 2, &pods, &usage(0.052, 0.052)).expect("a proposal");
        assert_eq!(p.replicas, 2);
        // 10 % against 50 %: down to 1.
        let p = propose(&cpu_target(50), 2, &pods, &usage(0.01, 0.01)).expect("a proposal");
        assert_eq!(p.replicas, 1);
    }

    #[test]
    fn unseen_pods_are_counted_conservatively() {
        let pods = [
            pod("a", "100m", true),
            pod("b", "100m", true),
            pod("c", "100m", true),
        ];
        // Only "a" reports, at 20 % of a 50 % target: as if b and c used
        // their whole request, utilisation is 73 %: no scale-down.
        let usage = [("a".to_owned(), [0.02, 0.0])].into();
        let p = propose(&cpu_target(50), 3, &pods, &usage).expect("a proposal");
        assert_eq!(p.replicas, 3);
        let no_request: Pod = serde_json::from_value(json!({"metadata": {"name": "x"},
            "spec": {"containers": [{"name": "c"}]}}))
        .expect("a pod");
        assert!(propose(&cpu_target(50), 1, &[no_request], &usage).is_err());
    }

    #[test]
    fn stabilization_and_policies_shape_the_step() {
        let behavior = Default::default();
        let start = Instant::now();
        let mut recent = vec![(start, 8)];
        // A lower proposal right after a higher one waits out the window.
        recent.push((start, 3));
        assert_eq!(stabilize(&mut recent, start, 8, 3, &behavior), 8);
        // Up by at most max(100 %, 4 pods).
        assert_eq!(limit(2, 20, &behavior), 6);
        assert_eq!(limit(10, 50, &behavior), 20);
        assert_eq!(limit(10, 1, &behavior), 1);
    }
}
