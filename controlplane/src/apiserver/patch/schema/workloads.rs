//! Workload kinds: `apps/v1`, `batch/v1`, `autoscaling/v2`.

use super::core_v1::{CONDITIONS_BY_TYPE, LABEL_SELECTOR, OBJECT_META, POD_TEMPLATE_SPEC};
use super::{ATOMIC, Field, PLAIN, Type, merge_by};

const METADATA: (&str, Field) = ("metadata", Field::Struct(&OBJECT_META));
const SELECTOR: (&str, Field) = ("selector", Field::Struct(&LABEL_SELECTOR));
const TEMPLATE: (&str, Field) = ("template", Field::Struct(&POD_TEMPLATE_SPEC));
const STATUS: (&str, Field) = ("status", Field::Struct(&CONDITIONS_BY_TYPE));

/// `DeploymentSpec.strategy` is tagged `retainKeys`: switching to `Recreate`
/// arrives as `$retainKeys: [type]` with `rollingUpdate` dropped.
static DEPLOYMENT_STRATEGY: Type = Type::retaining_keys("DeploymentStrategy", &[]);

static DEPLOYMENT: Type = Type::new(
    "Deployment",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "DeploymentSpec",
                &[
                    SELECTOR,
                    ("strategy", Field::Struct(&DEPLOYMENT_STRATEGY)),
                    TEMPLATE,
                ],
            )),
        ),
        STATUS,
    ],
);

static REPLICA_SET: Type = Type::new(
    "ReplicaSet",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new("ReplicaSetSpec", &[SELECTOR, TEMPLATE])),
        ),
        STATUS,
    ],
);

static STATEFUL_SET: Type = Type::new(
    "StatefulSet",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "StatefulSetSpec",
                &[SELECTOR, TEMPLATE, ("volumeClaimTemplates", ATOMIC)],
            )),
        ),
        STATUS,
    ],
);

static DAEMON_SET: Type = Type::new(
    "DaemonSet",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new("DaemonSetSpec", &[SELECTOR, TEMPLATE])),
        ),
        STATUS,
    ],
);

static CONTROLLER_REVISION: Type = Type::new("ControllerRevision", &[METADATA]);

static JOB_SPEC: Type = Type::new("JobSpec", &[SELECTOR, TEMPLATE]);

static JOB: Type = Type::new(
    "Job",
    &[METADATA, ("spec", Field::Struct(&JOB_SPEC)), STATUS],
);

static CRON_JOB: Type = Type::new(
    "CronJob",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "CronJobSpec",
                &[(
                    "jobTemplate",
                    Field::Struct(&Type::new(
                        "JobTemplateSpec",
                        &[METADATA, ("spec", Field::Struct(&JOB_SPEC))],
                    )),
                )],
            )),
        ),
        (
            "status",
            Field::Struct(&Type::new("CronJobStatus", &[("active", ATOMIC)])),
        ),
    ],
);

static HORIZONTAL_POD_AUTOSCALER: Type = Type::new(
    "HorizontalPodAutoscaler",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "HorizontalPodAutoscalerSpec",
                &[("metrics", ATOMIC)],
            )),
        ),
        (
            "status",
            Field::Struct(&Type::new(
                "HorizontalPodAutoscalerStatus",
                &[
                    ("conditions", merge_by("type", &PLAIN)),
                    ("currentMetrics", ATOMIC),
                ],
            )),
        ),
    ],
);

/// The table for a workload kind.
pub(super) fn root(group: &str, kind: &str) -> Option<&'static Type> {
    Some(match (group, kind) {
        ("apps", "ControllerRevision") => &CONTROLLER_REVISION,
        ("apps", "DaemonSet") => &DAEMON_SET,
        ("apps", "Deployment") => &DEPLOYMENT,
        ("apps", "ReplicaSet") => &REPLICA_SET,
        ("apps", "StatefulSet") => &STATEFUL_SET,
        ("batch", "CronJob") => &CRON_JOB,
        ("batch", "Job") => &JOB,
        ("autoscaling", "HorizontalPodAutoscaler") => &HORIZONTAL_POD_AUTOSCALER,
        _ => return None,
    })
}
