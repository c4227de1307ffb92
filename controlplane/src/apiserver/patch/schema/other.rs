//! Networking, discovery, coordination, events and policy kinds.
//!
//! Most of these have no strategies below `metadata`; they are listed so their
//! atomic lists are recognised and the coverage is explicit.

use super::core_v1::{CONDITIONS_BY_TYPE, LABEL_SELECTOR, OBJECT_META};
use super::{ATOMIC, Field, Type};

const METADATA: (&str, Field) = ("metadata", Field::Struct(&OBJECT_META));

static INGRESS: Type = Type::new(
    "Ingress",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "IngressSpec",
                &[("rules", ATOMIC), ("tls", ATOMIC)],
            )),
        ),
    ],
);

static INGRESS_CLASS: Type = Type::new("IngressClass", &[METADATA]);

static ENDPOINT_SLICE: Type = Type::new(
    "EndpointSlice",
    &[METADATA, ("endpoints", ATOMIC), ("ports", ATOMIC)],
);

static LEASE: Type = Type::new("Lease", &[METADATA]);

static EVENT: Type = Type::new("Event", &[METADATA]);

static POD_DISRUPTION_BUDGET: Type = Type::new(
    "PodDisruptionBudget",
    &[
        METADATA,
        (
            "spec",
            Field::Struct(&Type::new(
                "PodDisruptionBudgetSpec",
                &[("selector", Field::Struct(&LABEL_SELECTOR))],
            )),
        ),
        ("status", Field::Struct(&CONDITIONS_BY_TYPE)),
    ],
);

/// The table for one of these kinds.
pub(super) fn root(group: &str, kind: &str) -> Option<&'static Type> {
    Some(match (group, kind) {
        ("networking.k8s.io", "Ingress") => &INGRESS,
        ("networking.k8s.io", "IngressClass") => &INGRESS_CLASS,
        ("discovery.k8s.io", "EndpointSlice") => &ENDPOINT_SLICE,
        ("coordination.k8s.io", "Lease") => &LEASE,
        ("events.k8s.io", "Event") => &EVENT,
        ("policy", "PodDisruptionBudget") => &POD_DISRUPTION_BUDGET,
        _ => return None,
    })
}
