//! Core group (`v1`) kinds and the shared types (object metadata, pod template).

use super::{ATOMIC, Field, List, PLAIN, Type, merge_by};

/// `metav1.ObjectMeta`.
pub(crate) static OBJECT_META: Type = Type::new(
    "ObjectMeta",
    &[
        ("annotations", Field::Map),
        ("finalizers", Field::List(List::Set)),
        ("labels", Field::Map),
        ("managedFields", ATOMIC),
        ("ownerReferences", merge_by("uid", &PLAIN)),
    ],
);

const METADATA: (&str, Field) = ("metadata", Field::Struct(&OBJECT_META));

/// `metav1.LabelSelector`.
pub(crate) static LABEL_SELECTOR: Type = Type::new(
    "LabelSelector",
    &[("matchExpressions", ATOMIC), ("matchLabels", Field::Map)],
);

/// `v1.PodTemplateSpec`, shared by every workload kind.
pub(crate) static POD_TEMPLATE_SPEC: Type = Type::new(
    "PodTemplateSpec",
    &[METADATA, ("spec", Field::Struct(&POD_SPEC))],
);

static POD_SPEC: Type = Type::new(
    "PodSpec",
    &[
        ("containers", merge_by("name", &CONTAINER)),
        ("ephemeralContainers", merge_by("name", &CONTAINER)),
        ("hostAliases", merge_by("ip", &HOST_ALIAS)),
        ("imagePullSecrets", merge_by("name", &PLAIN)),
        ("initContainers", merge_by("name", &CONTAINER)),
        ("nodeSelector", Field::Map),
        ("overhead", Field::Map),
        ("readinessGates", ATOMIC),
        ("resourceClaims", merge_by("name", &POD_RESOURCE_CLAIM)),
        ("schedulingGates", merge_by("name", &PLAIN)),
        ("tolerations", ATOMIC),
        (
            "topologySpreadConstraints",
            merge_by("topologyKey", &TOPOLOGY_SPREAD_CONSTRAINT),
        ),
        ("volumes", merge_by("name", &VOLUME)),
    ],
);

/// `v1.Container`; `v1.EphemeralContainer` carries the same tags.
static CONTAINER: Type = Type::new(
    "Container",
    &[
        ("args", ATOMIC),
        ("command", ATOMIC),
        ("env", merge_by("name", &PLAIN)),
        ("envFrom", ATOMIC),
        ("ports", merge_by("containerPort", &PLAIN)),
        ("resizePolicy", ATOMIC),
        ("resources", Field::Struct(&RESOURCE_REQUIREMENTS)),
        ("volumeDevices", merge_by("devicePath", &PLAIN)),
        ("volumeMounts", merge_by("mountPath", &PLAIN)),
    ],
);

static RESOURCE_REQUIREMENTS: Type = Type::new(
    "ResourceRequirements",
    &[
        ("claims", ATOMIC),
        ("limits", Field::Map),
        ("requests", Field::Map),
    ],
);

/// `PodSpec.volumes` is tagged `merge,retainKeys`: a volume switching source
/// arrives with `$retainKeys` naming the one source left.
static VOLUME: Type = Type::retaining_keys("Volume", &[]);

static POD_RESOURCE_CLAIM: Type = Type::retaining_keys("PodResourceClaim", &[]);

static HOST_ALIAS: Type = Type::new("HostAlias", &[("hostnames", ATOMIC)]);

static TOPOLOGY_SPREAD_CONSTRAINT: Type = Type::new(
    "TopologySpreadConstraint",
    &[
        ("labelSelector", Field::Struct(&LABEL_SELECTOR)),
        ("matchLabelKeys", ATOMIC),
    ],
);

static POD_STATUS: Type = Type::new(
    "PodStatus",
    &[
        ("conditions", merge_by("type", &PLAIN)),
        ("containerStatuses", ATOMIC),
        ("ephemeralContainerStatuses", ATOMIC),
        ("hostIPs", merge_by("ip", &PLAIN)),
        ("initContainerStatuses", ATOMIC),
        ("podIPs", merge_by("ip", &PLAIN)),
        (
            "resourceClaimStatuses",
            merge_by("name", &POD_RESOURCE_CLAIM_STATUS),
        ),
    ],
);

static POD_RESOURCE_CLAIM_STATUS: Type = Type::retaining_keys("PodResourceClaimStatus", &[]);

static POD: Type = Type::new(
    "Pod",
    &[
        METADATA,
        ("spec", Field::Struct(&POD_SPEC)),
        ("status", Field::Struct(&POD_STATUS)),
    ],
);

static POD_TEMPLATE: Type = Type::new(
    "PodTemplate",
    &[METADATA, ("template", Field::Struct(&POD_TEMPLATE_SPEC))],
);

static REPLICATION_CONTROLLER: Type = Type::new(
    "ReplicationController",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "ReplicationControllerSpec",
                &[
                    ("selector", Field::Map),
                    ("template", Field::Struct(&POD_TEMPLATE_SPEC)),
                ],
            )),
        ),
        ("status", Field::Struct(&CONDITIONS_BY_TYPE)),
    ],
);

/// Any status whose only strategy is `conditions` merged by `type`.
pub(crate) static CONDITIONS_BY_TYPE: Type =
    Type::new("Status", &[("conditions", merge_by("type", &PLAIN))]);

static SERVICE: Type = Type::new(
    "Service",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "ServiceSpec",
                &[
                    ("clusterIPs", ATOMIC),
                    ("externalIPs", ATOMIC),
                    ("ipFamilies", ATOMIC),
                    ("loadBalancerSourceRanges", ATOMIC),
                    ("ports", merge_by("port", &PLAIN)),
                    ("selector", Field::Map),
                ],
            )),
        ),
        ("status", Field::Struct(&CONDITIONS_BY_TYPE)),
    ],
);

static ENDPOINTS: Type = Type::new("Endpoints", &[METADATA, ("subsets", ATOMIC)]);

static CONFIG_MAP: Type = Type::new(
    "ConfigMap",
    &[METADATA, ("binaryData", Field::Map), ("data", Field::Map)],
);

static SECRET: Type = Type::new(
    "Secret",
    &[METADATA, ("data", Field::Map), ("stringData", Field::Map)],
);

static NODE: Type = Type::new(
    "Node",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "NodeSpec",
                &[("podCIDRs", Field::List(List::Set)), ("taints", ATOMIC)],
            )),
        ),
        (
            "status",
            Field::Struct(&Type::new(
                "NodeStatus",
                &[
                    ("addresses", merge_by("type", &PLAIN)),
                    ("allocatable", Field::Map),
                    ("capacity", Field::Map),
                    ("conditions", merge_by("type", &PLAIN)),
                    ("images", ATOMIC),
                    ("volumesAttached", ATOMIC),
                    ("volumesInUse", ATOMIC),
                ],
            )),
        ),
    ],
);

static NAMESPACE: Type = Type::new(
    "Namespace",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new("NamespaceSpec", &[("finalizers", ATOMIC)])),
        ),
        ("status", Field::Struct(&CONDITIONS_BY_TYPE)),
    ],
);

static EVENT: Type = Type::new("Event", &[METADATA]);

static SERVICE_ACCOUNT: Type = Type::new(
    "ServiceAccount",
    &[
        METADATA,
        ("imagePullSecrets", ATOMIC),
        ("secrets", merge_by("name", &PLAIN)),
    ],
);

static PERSISTENT_VOLUME: Type = Type::new(
    "PersistentVolume",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "PersistentVolumeSpec",
                &[
                    ("accessModes", ATOMIC),
                    ("capacity", Field::Map),
                    ("mountOptions", ATOMIC),
                ],
            )),
        ),
    ],
);

static PERSISTENT_VOLUME_CLAIM: Type = Type::new(
    "PersistentVolumeClaim",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "PersistentVolumeClaimSpec",
                &[
                    ("accessModes", ATOMIC),
                    ("resources", Field::Struct(&RESOURCE_REQUIREMENTS)),
                    ("selector", Field::Struct(&LABEL_SELECTOR)),
                ],
            )),
        ),
        (
            "status",
            Field::Struct(&Type::new(
                "PersistentVolumeClaimStatus",
                &[
                    ("accessModes", ATOMIC),
                    ("allocatedResourceStatuses", Field::Map),
                    ("allocatedResources", Field::Map),
                    ("capacity", Field::Map),
                    ("conditions", merge_by("type", &PLAIN)),
                ],
            )),
        ),
    ],
);

/// The table for a core-group kind.
pub(super) fn root(kind: &str) -> Option<&'static Type> {
    Some(match kind {
        "ConfigMap" => &CONFIG_MAP,
        "Endpoints" => &ENDPOINTS,
        "Event" => &EVENT,
        "Namespace" => &NAMESPACE,
        "Node" => &NODE,
        "PersistentVolume" => &PERSISTENT_VOLUME,
        "PersistentVolumeClaim" => &PERSISTENT_VOLUME_CLAIM,
        "Pod" => &POD,
        "PodTemplate" => &POD_TEMPLATE,
        "ReplicationController" => &REPLICATION_CONTROLLER,
        "Secret" => &SECRET,
        "Service" => &SERVICE,
        "ServiceAccount" => &SERVICE_ACCOUNT,
        _ => return None,
    })
}
