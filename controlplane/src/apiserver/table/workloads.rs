//! Workload controllers and their helpers: Deployments, ReplicaSets,
//! StatefulSets, DaemonSets, Jobs, CronJobs, ReplicationControllers,
//! ControllerRevisions, HorizontalPodAutoscalers, PodTemplates and
//! PodDisruptionBudgets.

use super::format::{
    bool_ptr, container_cells, format_label_selector, format_labels, human_duration, int_or_string,
    quantity, selector_string,
};
use super::value::Obj;
use super::{AGE, Column, NAME, Printer};

const CONTAINERS: Column = Column::new(
    "Containers",
    "string",
    "Names of the containers in the pod template.",
)
.wide();
const IMAGES: Column = Column::new(
    "Images",
    "string",
    "Images of the containers in the pod template.",
)
.wide();
const SELECTOR: Column = Column::new(
    "Selector",
    "string",
    "Label selector for the pods this object manages.",
)
.wide();

pub(super) static DEPLOYMENTS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Ready", "string", "Ready pods out of desired replicas."),
        Column::new(
            "Up-to-date",
            "string",
            "Pods running the latest pod template.",
        ),
        Column::new("Available", "string", "Pods available to serve."),
        AGE,
        CONTAINERS,
        IMAGES,
        SELECTOR,
    ],
    |d, ctx| {
        let (names, images) = container_cells(d.at("spec.template.spec.containers"));
        cells![
            d.at("metadata.name").str(),
            format!(
                "{}/{}",
                d.at("status.readyReplicas").int(),
                desired_replicas(d)
            ),
            d.at("status.updatedReplicas").int(),
            d.at("status.availableReplicas").int(),
            ctx.age(d),
            names,
            images,
            selector_string(d.at("spec.selector")),
        ]
    },
);

pub(super) static REPLICA_SETS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Desired", "integer", "Desired number of pods."),
        Column::new("Current", "integer", "Pods that exist now."),
        Column::new("Ready", "integer", "Pods that are ready."),
        AGE,
        CONTAINERS,
        IMAGES,
        SELECTOR,
    ],
    |rs, ctx| {
        let (names, images) = container_cells(rs.at("spec.template.spec.containers"));
        cells![
            rs.at("metadata.name").str(),
            desired_replicas(rs),
            rs.at("status.replicas").int(),
            rs.at("status.readyReplicas").int(),
            ctx.age(rs),
            names,
            images,
            format_label_selector(rs.at("spec.selector")),
        ]
    },
);

pub(super) static REPLICATION_CONTROLLERS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Desired", "integer", "Desired number of pods."),
        Column::new("Current", "integer", "Pods that exist now."),
        Column::new("Ready", "integer", "Pods that are ready."),
        AGE,
        CONTAINERS,
        IMAGES,
        SELECTOR,
    ],
    |rc, ctx| {
        let (names, images) = container_cells(rc.at("spec.template.spec.containers"));
        cells![
            rc.at("metadata.name").str(),
            desired_replicas(rc),
            rc.at("status.replicas").int(),
            rc.at("status.readyReplicas").int(),
            ctx.age(rc),
            names,
            images,
            format_labels(rc.at("spec.selector")),
        ]
    },
);

pub(super) static STATEFUL_SETS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Ready", "string", "Ready pods out of desired replicas."),
        AGE,
        CONTAINERS,
        IMAGES,
    ],
    |ss, ctx| {
        let (names, images) = container_cells(ss.at("spec.template.spec.containers"));
        cells![
            ss.at("metadata.name").str(),
            format!(
                "{}/{}",
                ss.at("status.readyReplicas").int(),
                desired_replicas(ss)
            ),
            ctx.age(ss),
            names,
            images,
        ]
    },
);

pub(super) static DAEMON_SETS: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Desired",
            "integer",
            "Nodes that should run the daemon pod.",
        ),
        Column::new(
            "Current",
            "integer",
            "Nodes running at least one daemon pod.",
        ),
        Column::new("Ready", "integer", "Nodes whose daemon pod is ready."),
        Column::new(
            "Up-to-date",
            "integer",
            "Nodes running the latest pod template.",
        ),
        Column::new(
            "Available",
            "integer",
            "Nodes whose daemon pod is available.",
        ),
        Column::new(
            "Node Selector",
            "string",
            "Node labels the daemon pods are restricted to.",
        ),
        AGE,
        CONTAINERS,
        IMAGES,
        SELECTOR,
    ],
    |ds, ctx| {
        let (names, images) = container_cells(ds.at("spec.template.spec.containers"));
        cells![
            ds.at("metadata.name").str(),
            ds.at("status.desiredNumberScheduled").int(),
            ds.at("status.currentNumberScheduled").int(),
            ds.at("status.numberReady").int(),
            ds.at("status.updatedNumberScheduled").int(),
            ds.at("status.numberAvailable").int(),
            format_labels(ds.at("spec.template.spec.nodeSelector")),
            ctx.age(ds),
            names,
            images,
            format_label_selector(ds.at("spec.selector")),
        ]
    },
);

pub(super) static JOBS: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Status",
            "string",
            "Whether the job is running, complete, failed or suspended.",
        ),
        Column::new(
            "Completions",
            "string",
            "Successful pods out of required completions.",
        ),
        Column::new(
            "Duration",
            "string",
            "How long the job ran (or has been running).",
        ),
        AGE,
        CONTAINERS,
        IMAGES,
        SELECTOR,
    ],
    |job, ctx| {
        let succeeded = job.at("status.succeeded").int();
        let completions = match job.at("spec.completions").opt_int() {
            Some(wanted) => format!("{succeeded}/{wanted}"),
            None => match job.at("spec.parallelism").int() {
                parallelism if parallelism > 1 => format!("{succeeded}/1 of {parallelism}"),
                _ => format!("{succeeded}/1"),
            },
        };
        let duration = match (
            job.at("status.startTime").time(),
            job.at("status.completionTime").time(),
        ) {
            (None, _) => String::new(),
            (Some(start), None) => ctx.since(Some(start)),
            (Some(start), Some(end)) => human_duration(end.duration_since(start)),
        };
        let (names, images) = container_cells(job.at("spec.template.spec.containers"));
        cells![
            job.at("metadata.name").str(),
            job_status(job),
            completions,
            duration,
            ctx.age(job),
            names,
            images,
            format_label_selector(job.at("spec.selector")),
        ]
    },
);

pub(super) static CRON_JOBS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Schedule", "string", "The cron schedule."),
        Column::new("Timezone", "string", "Time zone of the schedule."),
        Column::new("Suspend", "boolean", "Whether new runs are suspended."),
        Column::new("Active", "integer", "Jobs running now."),
        Column::new(
            "Last Schedule",
            "string",
            "Time since a job was last scheduled.",
        ),
        AGE,
        CONTAINERS,
        IMAGES,
        SELECTOR,
    ],
    |cj, ctx| {
        let last = match cj.at("status.lastScheduleTime").value() {
            Some(_) => ctx.since(cj.at("status.lastScheduleTime").time()),
            None => "<none>".into(),
        };
        let template = cj.at("spec.jobTemplate.spec");
        let (names, images) = container_cells(template.at("template.spec.containers"));
        cells![
            cj.at("metadata.name").str(),
            cj.at("spec.schedule").str(),
            cj.at("spec.timeZone").opt_str().unwrap_or("<none>"),
            bool_ptr(cj.at("spec.suspend")),
            cj.at("status.active").len() as i64,
            last,
            ctx.age(cj),
            names,
            images,
            format_label_selector(template.get("selector")),
        ]
    },
);

pub(super) static CONTROLLER_REVISIONS: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Controller",
            "string",
            "The object that owns this revision.",
        ),
        Column::new("Revision", "string", "The revision number."),
        AGE,
    ],
    |cr, ctx| {
        cells![
            cr.at("metadata.name").str(),
            controller_of(cr),
            cr.get("revision").int(),
            ctx.age(cr),
        ]
    },
);

pub(super) static HORIZONTAL_POD_AUTOSCALERS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Reference", "string", "The scaled object, as kind/name."),
        Column::new(
            "Targets",
            "string",
            "Current and target values of each metric.",
        ),
        Column::new("MinPods", "string", "Lower limit of replicas."),
        Column::new("MaxPods", "string", "Upper limit of replicas."),
        Column::new("Replicas", "string", "Current number of replicas."),
        AGE,
    ],
    |hpa, ctx| {
        let target = hpa.at("spec.scaleTargetRef");
        let min_pods = hpa
            .at("spec.minReplicas")
            .opt_int()
            .map(|n| n.to_string())
            .unwrap_or_else(|| "<unset>".into());
        cells![
            hpa.at("metadata.name").str(),
            format!("{}/{}", target.get("kind").str(), target.get("name").str()),
            hpa_targets(hpa),
            min_pods,
            hpa.at("spec.maxReplicas").int(),
            hpa.at("status.currentReplicas").int(),
            ctx.age(hpa),
        ]
    },
);

pub(super) static POD_TEMPLATES: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Containers",
            "string",
            "Names of the containers in the template.",
        ),
        Column::new(
            "Images",
            "string",
            "Images of the containers in the template.",
        ),
        Column::new(
            "Pod Labels",
            "string",
            "Labels of the pods made from the template.",
        ),
    ],
    |pt, _| {
        let (names, images) = container_cells(pt.at("template.spec.containers"));
        cells![
            pt.at("metadata.name").str(),
            names,
            images,
            format_labels(pt.at("template.metadata.labels")),
        ]
    },
);

pub(super) static POD_DISRUPTION_BUDGETS: Printer = Printer::new(
    &[
        NAME,
        Column::new("Min Available", "string", "Pods that must stay available."),
        Column::new("Max Unavailable", "string", "Pods that may be unavailable."),
        Column::new(
            "Allowed Disruptions",
            "integer",
            "Pods that may be disrupted now.",
        ),
        AGE,
    ],
    |pdb, ctx| {
        cells![
            pdb.at("metadata.name").str(),
            int_or_string(pdb.at("spec.minAvailable"), "N/A"),
            int_or_string(pdb.at("spec.maxUnavailable"), "N/A"),
            pdb.at("status.disruptionsAllowed").int(),
            ctx.age(pdb),
        ]
    },
);

/// `spec.replicas`, which the API server defaults to 1 when absent.
fn desired_replicas(object: Obj<'_>) -> i64 {
    object.at("spec.replicas").opt_int().unwrap_or(1)
}

/// The first of the job conditions that decide its state, by precedence.
fn job_status(job: Obj<'_>) -> &'static str {
    let condition = |kind: &str| {
        job.at("status.conditions")
            .items()
            .find(|c| c.get("type").str() == kind)
            .is_some_and(|c| c.get("status").str() == "True")
    };
    if condition("Complete") {
        "Complete"
    } else if condition("Failed") {
        "Failed"
    } else if job.at("metadata.deletionTimestamp").is_set() {
        "Terminating"
    } else if condition("Suspended") {
        "Suspended"
    } else if condition("FailureTarget") {
        "FailureTarget"
    } else {
        "Running"
    }
}

/// The owning controller as `kind.group/name` (lower-case kind), or
/// `<none>`.
fn controller_of(object: Obj<'_>) -> String {
    let Some(owner) = object
        .at("metadata.ownerReferences")
        .items()
        .find(|r| r.get("controller").bool())
    else {
        return "<none>".into();
    };
    let name = owner.get("name").str();
    let kind = owner.get("kind").str();
    let group = match owner.get("apiVersion").str().split_once('/') {
        Some((group, version)) if !version.contains('/') => group,
        Some(_) => return name.to_string(),
        None => "",
    };
    match (kind, group) {
        ("", "") => name.to_string(),
        (kind, "") => format!("{}/{name}", kind.to_lowercase()),
        (kind, group) => format!("{}.{}/{name}", kind.to_lowercase(), group.to_lowercase()),
    }
}

/// The TARGETS cell: "current/target" per metric (at most two shown).
/// Reads autoscaling/v2 metrics, or v1's CPU utilization target.
fn hpa_targets(hpa: Obj<'_>) -> String {
    const MAX: usize = 2;
    let specs = hpa.at("spec.metrics");
    let statuses: Vec<Obj<'_>> = hpa.at("status.currentMetrics").items().collect();
    if specs.len() == 0 {
        return match hpa.at("spec.targetCPUUtilizationPercentage").opt_int() {
            Some(target) => {
                let current = hpa
                    .at("status.currentCPUUtilizationPercentage")
                    .opt_int()
                    .map(|c| format!("{c}%"))
                    .unwrap_or_else(|| "<unknown>".into());
                format!("cpu: {current}/{target}%")
            }
            None => "<none>".into(),
        };
    }
    let list: Vec<String> = specs
        .items()
        .enumerate()
        .map(|(i, spec)| {
            let status = statuses.get(i).copied();
            metric_target(spec, status)
        })
        .collect();
    let shown = list
        .iter()
        .take(MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > MAX {
        format!("{shown} + {} more...", list.len() - MAX)
    } else {
        shown
    }
}

/// One metric as upstream's `formatHPAMetrics` prints it.
fn metric_target(spec: Obj<'_>, status: Option<Obj<'_>>) -> String {
    const UNKNOWN: &str = "<unknown>";
    // The status entry for this metric, when it reports the same source.
    let current = |source: &str| status.map(|s| s.get(source)).filter(|s| s.is_set());
    let value_of = |o: Obj<'_>| {
        if o.is_set() {
            quantity(o)
        } else {
            UNKNOWN.to_string()
        }
    };
    match spec.get("type").str() {
        source_type @ ("External" | "Object") => {
            let key = if source_type == "External" {
                "external"
            } else {
                "object"
            };
            let target = spec.at(key).get("target");
            if target.get("averageValue").is_set() {
                let now = current(key)
                    .map(|c| c.at("current.averageValue"))
                    .filter(|v| v.is_set())
                    .map(quantity)
                    .unwrap_or_else(|| UNKNOWN.into());
                format!("{now}/{} (avg)", quantity(target.get("averageValue")))
            } else {
                let now = current(key)
                    .map(|c| value_of(c.at("current.value")))
                    .unwrap_or_else(|| UNKNOWN.into());
                format!("{now}/{}", value_of(target.get("value")))
            }
        }
        "Pods" => {
            let now = current("pods")
                .map(|c| value_of(c.at("current.averageValue")))
                .unwrap_or_else(|| UNKNOWN.into());
            format!("{now}/{}", value_of(spec.at("pods.target.averageValue")))
        }
        source_type @ ("Resource" | "ContainerResource") => {
            let key = if source_type == "Resource" {
                "resource"
            } else {
                "containerResource"
            };
            let source = spec.get(key);
            let name = source.get("name").str();
            let target = source.get("target");
            if target.get("averageValue").is_set() {
                let now = current(key)
                    .map(|c| value_of(c.at("current.averageValue")))
                    .unwrap_or_else(|| UNKNOWN.into());
                format!("{name}: {now}/{}", quantity(target.get("averageValue")))
            } else {
                let now = current(key)
                    .and_then(|c| c.at("current.averageUtilization").opt_int())
                    .map(|u| format!("{u}%"))
                    .unwrap_or_else(|| UNKNOWN.into());
                let goal = target
                    .get("averageUtilization")
                    .opt_int()
                    .map(|u| format!("{u}%"))
                    .unwrap_or_else(|| "<auto>".into());
                format!("{name}: {now}/{goal}")
            }
        }
        _ => "<unknown type>".into(),
    }
}
