//! Cluster-level kinds: Nodes, Namespaces, Events, Leases, PriorityClasses,
//! RuntimeClasses, admission webhooks and RBAC bindings.

use std::collections::BTreeSet;

use serde_json::Value;

use super::value::Obj;
use super::{AGE, Column, Ctx, NAME, Printer};

const ROLE_LABEL_PREFIX: &str = "node-role.kubernetes.io/";
const LEGACY_ROLE_LABEL: &str = "kubernetes.io/role";

pub(super) static NODES: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Status",
            "string",
            "Whether the node is ready, and whether scheduling is disabled.",
        ),
        Column::new(
            "Roles",
            "string",
            "Roles from the node's node-role.kubernetes.io/ labels.",
        ),
        AGE,
        Column::new("Version", "string", "The node agent's reported version."),
        Column::new(
            "Internal-IP",
            "string",
            "The node's first internal address.",
        )
        .wide(),
        Column::new(
            "External-IP",
            "string",
            "The node's first external address.",
        )
        .wide(),
        Column::new(
            "OS-Image",
            "string",
            "The operating system image reported by the node.",
        )
        .wide(),
        Column::new(
            "Kernel-Version",
            "string",
            "The kernel version reported by the node.",
        )
        .wide(),
        Column::new(
            "Container-Runtime",
            "string",
            "The container runtime reported by the node.",
        )
        .wide(),
    ],
    |node, ctx| {
        let info = node.at("status.nodeInfo");
        let known = |field: &str| match info.get(field).str() {
            "" => "<unknown>".to_string(),
            value => value.to_string(),
        };
        cells![
            node.at("metadata.name").str(),
            node_status(node),
            node_roles(node),
            ctx.age(node),
            info.get("kubeletVersion").str(),
            node_address(node, "InternalIP"),
            node_address(node, "ExternalIP"),
            known("osImage"),
            known("kernelVersion"),
            known("containerRuntimeVersion"),
        ]
    },
);

pub(super) static NAMESPACES: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Status",
            "string",
            "Active, or Terminating while being deleted.",
        ),
        AGE,
    ],
    |ns, ctx| {
        cells![
            ns.at("metadata.name").str(),
            ns.at("status.phase").str(),
            ctx.age(ns)
        ]
    },
);

/// core/v1 and events.k8s.io/v1 events share one table, as upstream where
/// both are stored as one kind.
pub(super) static EVENTS: Printer = Printer::new(
    &[
        Column::new(
            "Last Seen",
            "string",
            "Time since the event was last observed.",
        ),
        Column::new("Type", "string", "Normal or Warning."),
        Column::new(
            "Reason",
            "string",
            "Short, machine-readable reason for the event.",
        ),
        Column::new(
            "Object",
            "string",
            "The object the event is about, as kind/name.",
        ),
        Column::new(
            "Subobject",
            "string",
            "The part of the object the event is about.",
        )
        .wide(),
        Column::new("Source", "string", "The component that reported the event.").wide(),
        Column::new("Message", "string", "What happened."),
        Column::new(
            "First Seen",
            "string",
            "Time since the event was first observed.",
        )
        .wide(),
        Column::new("Count", "string", "How often the event was observed.").wide(),
        Column {
            priority: 1,
            ..NAME
        },
    ],
    event_cells,
);

pub(super) static LEASES: Printer = Printer::new(
    &[
        NAME,
        Column::new("Holder", "string", "The identity holding the lease."),
        AGE,
    ],
    |lease, ctx| {
        cells![
            lease.at("metadata.name").str(),
            lease.at("spec.holderIdentity").str(),
            ctx.age(lease),
        ]
    },
);

pub(super) static PRIORITY_CLASSES: Printer = Printer::new(
    &[
        NAME,
        Column::new("Value", "integer", "Priority of pods in this class."),
        Column::new(
            "Global-Default",
            "boolean",
            "Whether pods without a class get this one.",
        ),
        AGE,
        Column::new(
            "PreemptionPolicy",
            "string",
            "Whether these pods may preempt others.",
        )
        .wide(),
    ],
    |pc, ctx| {
        cells![
            pc.at("metadata.name").str(),
            pc.get("value").int(),
            pc.get("globalDefault").bool(),
            ctx.age(pc),
            pc.get("preemptionPolicy").str(),
        ]
    },
);

pub(super) static RUNTIME_CLASSES: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Handler",
            "string",
            "The runtime handler that runs these pods.",
        ),
        AGE,
    ],
    |rc, ctx| {
        cells![
            rc.at("metadata.name").str(),
            rc.get("handler").str(),
            ctx.age(rc)
        ]
    },
);

pub(super) static MUTATING_WEBHOOKS: Printer = Printer::new(WEBHOOK_COLUMNS, webhook_cells);
pub(super) static VALIDATING_WEBHOOKS: Printer = Printer::new(WEBHOOK_COLUMNS, webhook_cells);

const WEBHOOK_COLUMNS: &[Column] = &[
    NAME,
    Column::new(
        "Webhooks",
        "integer",
        "Number of webhooks in this configuration.",
    ),
    AGE,
];

fn webhook_cells(config: Obj<'_>, ctx: &Ctx) -> Vec<Value> {
    cells![
        config.at("metadata.name").str(),
        config.get("webhooks").len() as i64,
        ctx.age(config),
    ]
}

pub(super) static ROLE_BINDINGS: Printer = Printer::new(BINDING_COLUMNS, binding_cells);
pub(super) static CLUSTER_ROLE_BINDINGS: Printer = Printer::new(BINDING_COLUMNS, binding_cells);

const BINDING_COLUMNS: &[Column] = &[
    NAME,
    Column::new("Role", "string", "The bound role, as kind/name."),
    AGE,
    Column::new("Users", "string", "Users bound to the role.").wide(),
    Column::new("Groups", "string", "Groups bound to the role.").wide(),
    Column::new(
        "ServiceAccounts",
        "string",
        "Service accounts bound to the role, as namespace/name.",
    )
    .wide(),
];

fn binding_cells(binding: Obj<'_>, ctx: &Ctx) -> Vec<Value> {
    let mut users = Vec::new();
    let mut groups = Vec::new();
    let mut service_accounts = Vec::new();
    for subject in binding.get("subjects").items() {
        let name = subject.get("name").str();
        match subject.get("kind").str() {
            "User" => users.push(name.to_string()),
            "Group" => groups.push(name.to_string()),
            "ServiceAccount" => {
                service_accounts.push(format!("{}/{name}", subject.get("namespace").str()))
            }
            _ => {}
        }
    }
    let role = binding.get("roleRef");
    cells![
        binding.at("metadata.name").str(),
        format!("{}/{}", role.get("kind").str(), role.get("name").str()),
        ctx.age(binding),
        users.join(", "),
        groups.join(", "),
        service_accounts.join(", "),
    ]
}

/// `Ready`/`NotReady` from the Ready condition (`Unknown` without one),
/// plus `SchedulingDisabled` for a cordoned node.
fn node_status(node: Obj<'_>) -> String {
    // Upstream keys conditions by type, so the last Ready condition wins.
    let ready = node
        .at("status.conditions")
        .items()
        .rev()
        .find(|c| c.get("type").str() == "Ready");
    let mut status = vec![match ready {
        Some(c) if c.get("status").str() == "True" => "Ready",
        Some(_) => "NotReady",
        None => "Unknown",
    }];
    if node.at("spec.unschedulable").bool() {
        status.push("SchedulingDisabled");
    }
    status.join(",")
}

/// Roles from `node-role.kubernetes.io/<role>` label keys and the legacy
/// `kubernetes.io/role=<role>` label, sorted, or `<none>`.
fn node_roles(node: Obj<'_>) -> String {
    let roles: BTreeSet<&str> = node
        .at("metadata.labels")
        .entries()
        .filter_map(|(key, value)| match key.strip_prefix(ROLE_LABEL_PREFIX) {
            Some(role) if !role.is_empty() => Some(role),
            Some(_) => None,
            None if key == LEGACY_ROLE_LABEL => value.opt_str().filter(|v| !v.is_empty()),
            None => None,
        })
        .collect();
    if roles.is_empty() {
        return "<none>".into();
    }
    roles.into_iter().collect::<Vec<_>>().join(",")
}

/// The first address of a type, or `<none>`.
fn node_address(node: Obj<'_>, kind: &str) -> String {
    node.at("status.addresses")
        .items()
        .find(|a| a.get("type").str() == kind)
        .map(|a| a.get("address").str().to_string())
        .unwrap_or_else(|| "<none>".into())
}

/// Event cells. Reads both stored shapes: core/v1 (`involvedObject`,
/// `message`, `firstTimestamp`, `source`, `reportingComponent`) and
/// events.k8s.io/v1 (`regarding`, `note`, `deprecated*`,
/// `reportingController`).
fn event_cells(ev: Obj<'_>, ctx: &Ctx) -> Vec<Value> {
    let either = |core: &str, events: &str| {
        let first = ev.get(core);
        if first.is_set() {
            first
        } else {
            ev.get(events)
        }
    };
    let first_seen = match either("firstTimestamp", "deprecatedFirstTimestamp").time() {
        Some(first) => ctx.since(Some(first)),
        None => ctx.since(ev.get("eventTime").time()),
    };
    let mut last_seen = match either("lastTimestamp", "deprecatedLastTimestamp").time() {
        Some(last) => ctx.since(Some(last)),
        None => first_seen.clone(),
    };
    let series = ev.get("series");
    let count = if series.is_set() {
        last_seen = ctx.since(series.get("lastObservedTime").time());
        series.get("count").int()
    } else {
        // Singleton events of the new API carry no count.
        match either("count", "deprecatedCount").int() {
            0 => 1,
            n => n,
        }
    };
    let object = either("involvedObject", "regarding");
    let kind = object.get("kind").str().to_lowercase();
    let target = match object.get("name").str() {
        "" => kind,
        name => format!("{kind}/{name}"),
    };
    let source = either("source", "deprecatedSource");
    let component = first_non_empty(&[
        source.get("component").str(),
        either("reportingComponent", "reportingController").str(),
    ]);
    let host = first_non_empty(&[source.get("host").str(), ev.get("reportingInstance").str()]);
    let source = if host.is_empty() {
        component.to_string()
    } else {
        format!("{component}, {host}")
    };
    cells![
        last_seen,
        ev.get("type").str(),
        ev.get("reason").str(),
        target,
        object.get("fieldPath").str(),
        source,
        either("message", "note").str().trim(),
        first_seen,
        count,
        ev.at("metadata.name").str(),
    ]
}

fn first_non_empty<'a>(candidates: &[&'a str]) -> &'a str {
    candidates
        .iter()
        .copied()
        .find(|s| !s.is_empty())
        .unwrap_or("")
}
