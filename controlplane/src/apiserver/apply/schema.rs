//! The shape of each kind as server-side apply sees it: which objects are
//! structs (owned field by field), which maps are granular, and which lists are
//! atomic, sets, or associative lists keyed by some of their items' fields.
//!
//! Upstream reads this from the OpenAPI extensions `x-kubernetes-list-type`,
//! `x-kubernetes-list-map-keys`, `x-kubernetes-map-type`. For the built-in kinds
//! they mostly agree with the strategic-merge-patch tags already tabulated in
//! `patch::schema`, so the shapes here are derived from that table; [`OVERRIDES`]
//! and the small `own` tables list where apply differs (checked against
//! `k8s.io/api` 1.33 and `k8s-openapi`'s merge strategies).
//!
//! A field the table does not know is a struct when it holds an object and
//! atomic otherwise, as upstream treats fields without list or map extensions.

use serde_json::{Value, json};

use crate::apiserver::patch::TypeRef;
use crate::apiserver::patch::schema::{self as smp, Field, List};

/// How one value is merged and owned.
#[derive(Clone, Copy, Debug)]
pub(super) enum Shape {
    /// Fields merge and are owned one by one.
    Struct(Struct),
    /// A granular `map[string]scalar`: each key is owned on its own.
    Map,
    /// Replaced and owned whole: scalars, atomic lists, atomic structs and maps.
    Atomic,
    /// A list of scalars with set semantics (`x-kubernetes-list-type: set`).
    Set,
    /// An associative list (`x-kubernetes-list-type: map`).
    ListMap(ListMap),
}

/// A struct: the strategic-merge table of its Go type plus fields whose apply
/// shape differs from what that table implies.
#[derive(Clone, Copy, Debug)]
pub(super) struct Struct {
    smp: &'static smp::Type,
    own: &'static [(&'static str, Shape)],
}

/// An associative list.
#[derive(Clone, Copy, Debug)]
pub(super) struct ListMap {
    keys: Keys,
    /// The items' struct; `None` when items are atomic structs.
    item: Option<Struct>,
}

#[derive(Clone, Copy, Debug)]
enum Keys {
    One(&'static str),
    Many(&'static [&'static str]),
}

/// Where apply's shape differs from the strategic-merge table, by Go type name
/// of the struct holding the field.
enum Override {
    /// An associative list keyed by more fields than its patch merge key.
    Keys(&'static [&'static str]),
    /// A different shape altogether.
    Shape(Shape),
}

static OVERRIDES: &[(&str, &str, Override)] = &[
    // Ports are unique by number *and* protocol (`listMapKey=containerPort,
    // listMapKey=protocol`); the patch merge key is only the number.
    (
        "Container",
        "ports",
        Override::Keys(&["containerPort", "protocol"]),
    ),
    (
        "ServiceSpec",
        "ports",
        Override::Keys(&["port", "protocol"]),
    ),
    (
        "PodSpec",
        "topologySpreadConstraints",
        Override::Keys(&["topologyKey", "whenUnsatisfiable"]),
    ),
    // `+mapType=atomic`: a selector is one value, not a set of labels.
    ("PodSpec", "nodeSelector", Override::Shape(Shape::Atomic)),
    ("ServiceSpec", "selector", Override::Shape(Shape::Atomic)),
    (
        "ReplicationControllerSpec",
        "selector",
        Override::Shape(Shape::Atomic),
    ),
    // Items that are `+structType=atomic` references.
    (
        "ObjectMeta",
        "ownerReferences",
        Override::Shape(Shape::ListMap(ListMap {
            keys: Keys::One("uid"),
            item: None,
        })),
    ),
    (
        "PodSpec",
        "imagePullSecrets",
        Override::Shape(Shape::ListMap(ListMap {
            keys: Keys::One("name"),
            item: None,
        })),
    ),
    (
        "Container",
        "env",
        Override::Shape(Shape::ListMap(ListMap {
            keys: Keys::One("name"),
            item: Some(Struct {
                smp: &smp::PLAIN,
                own: ENV_VAR,
            }),
        })),
    ),
    ("PodSpec", "affinity", Override::Shape(plain_with(AFFINITY))),
    (
        "ResourceRequirements",
        "claims",
        Override::Shape(Shape::ListMap(ListMap {
            keys: Keys::One("name"),
            item: None,
        })),
    ),
    (
        "PersistentVolumeSpec",
        "claimRef",
        Override::Shape(Shape::Atomic),
    ),
    (
        "PersistentVolumeClaimSpec",
        "dataSource",
        Override::Shape(Shape::Atomic),
    ),
];

/// Go types that are `+structType=atomic` wherever they appear.
const ATOMIC_TYPES: &[&str] = &["LabelSelector"];

/// `v1.EnvVar`: the sources in `valueFrom` are atomic selectors.
const ENV_VAR: &[(&str, Shape)] = &[("valueFrom", plain_with(ENV_VAR_SOURCE))];

const ENV_VAR_SOURCE: &[(&str, Shape)] = &[
    ("configMapKeyRef", Shape::Atomic),
    ("fieldRef", Shape::Atomic),
    ("resourceFieldRef", Shape::Atomic),
    ("secretKeyRef", Shape::Atomic),
];

/// `v1.Affinity`: a required node selector is one atomic value.
const AFFINITY: &[(&str, Shape)] = &[("nodeAffinity", plain_with(NODE_AFFINITY))];

const NODE_AFFINITY: &[(&str, Shape)] = &[(
    "requiredDuringSchedulingIgnoredDuringExecution",
    Shape::Atomic,
)];

const fn plain_with(own: &'static [(&'static str, Shape)]) -> Shape {
    Shape::Struct(Struct {
        smp: &smp::PLAIN,
        own,
    })
}

/// The shape of a whole object of kind `kind`.
pub(super) fn root(kind: TypeRef<'_>) -> Shape {
    Shape::Struct(Struct::of(smp::root(kind)))
}

impl Shape {
    /// The shape of field (or map key) `name` of an object of this shape.
    pub(super) fn child(self, name: &str) -> Shape {
        match self {
            Shape::Struct(fields) => fields.field(name),
            _ => Shape::Atomic,
        }
    }
}

impl Struct {
    fn of(smp: &'static smp::Type) -> Struct {
        Struct { smp, own: &[] }
    }

    fn field(self, name: &str) -> Shape {
        if let Some((_, shape)) = self.own.iter().find(|(field, _)| *field == name) {
            return *shape;
        }
        let field = self.smp.field(name);
        let over = OVERRIDES
            .iter()
            .find(|(ty, field, _)| *ty == self.smp.name && *field == name);
        match (over, field) {
            (Some((_, _, Override::Shape(shape))), _) => *shape,
            (Some((_, _, Override::Keys(keys))), field) => {
                let item = match field {
                    Some(Field::List(List::Merge { item, .. })) => item,
                    _ => &smp::PLAIN,
                };
                Shape::ListMap(ListMap {
                    keys: Keys::Many(keys),
                    item: Some(Struct::of(item)),
                })
            }
            (None, None) => Shape::Struct(Struct::of(&smp::PLAIN)),
            (None, Some(Field::Struct(ty))) if ATOMIC_TYPES.contains(&ty.name) => Shape::Atomic,
            (None, Some(Field::Struct(ty))) => Shape::Struct(Struct::of(ty)),
            (None, Some(Field::Map)) => Shape::Map,
            (None, Some(Field::List(List::Atomic))) => Shape::Atomic,
            (None, Some(Field::List(List::Set))) => Shape::Set,
            (None, Some(Field::List(List::Merge { key, item }))) => Shape::ListMap(ListMap {
                keys: Keys::One(key),
                item: Some(Struct::of(item)),
            }),
        }
    }
}

impl ListMap {
    pub(super) fn keys(&self) -> &[&'static str] {
        match &self.keys {
            Keys::One(key) => std::slice::from_ref(key),
            Keys::Many(keys) => keys,
        }
    }

    /// The shape of one item.
    pub(super) fn item(&self) -> Shape {
        self.item.map_or(Shape::Atomic, Shape::Struct)
    }
}

/// What an empty object of `kind` looks like once upstream has turned it into
/// its Go struct and back: structs that are not pointers are present (`{}`) and
/// lists without `omitempty` are `null`. A create is compared against this, so
/// the creator does not own the mere existence of `spec` or
/// `spec.template.spec.containers` (no `"."` in FieldsV1), as upstream records it.
pub(super) fn skeleton(kind: TypeRef<'_>) -> Value {
    let pod_template = || json!({"metadata": {}, "spec": {"containers": null}});
    let spec = match (kind.group, kind.kind) {
        ("apps", "Deployment") => {
            json!({"selector": null, "strategy": {}, "template": pod_template()})
        }
        ("apps", "ReplicaSet") => json!({"selector": null, "template": pod_template()}),
        ("apps", "StatefulSet" | "DaemonSet") => {
            json!({"selector": null, "template": pod_template(), "updateStrategy": {}})
        }
        ("batch", "Job") => json!({"template": pod_template()}),
        ("batch", "CronJob") => {
            json!({"jobTemplate": {"metadata": {}, "spec": {"template": pod_template()}}})
        }
        ("" | "core", "Pod") => json!({"containers": null}),
        ("" | "core", "PodTemplate") => {
            return json!({"metadata": {}, "template": pod_template()});
        }
        ("" | "core", "PersistentVolumeClaim") => json!({"resources": {}}),
        ("autoscaling", "HorizontalPodAutoscaler") => json!({"scaleTargetRef": {}}),
        ("discovery.k8s.io", "EndpointSlice") => {
            return json!({"metadata": {}, "endpoints": null, "ports": null});
        }
        (
            "" | "core",
            "Service" | "Namespace" | "Node" | "PersistentVolume" | "ReplicationController",
        )
        | ("networking.k8s.io", "Ingress" | "IngressClass")
        | ("policy", "PodDisruptionBudget")
        | ("coordination.k8s.io", "Lease") => json!({}),
        _ => return json!({"metadata": {}}),
    };
    json!({"metadata": {}, "spec": spec})
}
