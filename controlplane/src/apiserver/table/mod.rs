//! Table responses (`meta.k8s.io/v1` Table) for `kubectl get`.
//!
//! kubectl asks for `application/json;as=Table;v=v1;g=meta.k8s.io` and prints
//! whatever columns the server sends, so the server decides what `kubectl
//! get` shows. Each resource has a `Printer`: a column list and a function
//! that turns one stored object into that row's cells, written after
//! upstream's `pkg/printers/internalversion`. As upstream's API server does,
//! rows always carry the wide columns (priority 1); kubectl hides them
//! unless asked for `-o wide`. Resources without a printer get upstream's
//! default table: Name and Created At.
//!
//! Objects are read as stored, through `value::Obj`, so missing or
//! mistyped fields render as empty or zero instead of failing. Where the
//! API server defaults a field on write and the zero value would mislead
//! (replicas, a port's protocol, a Service's type), an absent field reads
//! as that default.

use jiff::Timestamp;
use serde_json::{Map, Value, json};

/// Builds a row's cells from values of mixed types (strings, integers,
/// booleans), each becoming the JSON value kubectl expects.
macro_rules! cells {
    ($($cell:expr),* $(,)?) => {
        vec![$(::serde_json::Value::from($cell)),*]
    };
}

mod cluster;
mod config;
mod format;
mod network;
mod pod;
mod storage;
mod value;
mod workloads;

pub use format::human_duration;

use value::Obj;

/// What each row's `object` holds, as upstream's `includeObject` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    /// `null`.
    None,
    /// A `meta.k8s.io/v1` `PartialObjectMetadata` with the object's metadata.
    #[default]
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses the `?includeObject=` query value; absent or empty means
    /// `Metadata`. The error is upstream's message, for a 400 BadRequest.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("") {
            "" | "Metadata" => Ok(Self::Metadata),
            "None" => Ok(Self::None),
            "Object" => Ok(Self::Object),
            other => Err(format!("unrecognized includeObject value: \"{other}\"")),
        }
    }
}

/// Renders `objects` of resource `group`/`plural` (group "" is core) as a
/// complete `meta.k8s.io/v1` Table. Ages are measured against `now`.
///
/// The list metadata (`resourceVersion`, `continue`, `remainingItemCount`)
/// is left for the caller to fill into the empty `metadata` object. For a
/// watch, upstream sends `columnDefinitions` only with the first event;
/// callers can drop them from later ones.
pub fn render(
    group: &str,
    plural: &str,
    objects: &[Value],
    now: Timestamp,
    include_object: IncludeObject,
) -> Value {
    let printer = printer_for(group, plural);
    let ctx = Ctx { now };
    let columns: Vec<Value> = printer.columns.iter().map(|c| c.to_json()).collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| render_row(printer, object, &ctx, include_object))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// A resource's table layout and row builder.
struct Printer {
    columns: &'static [Column],
    cells: fn(Obj<'_>, &Ctx) -> Vec<Value>,
    /// Row conditions (upstream marks finished pods `Completed`).
    conditions: Option<fn(Obj<'_>) -> Option<Value>>,
}

impl Printer {
    const fn new(columns: &'static [Column], cells: fn(Obj<'_>, &Ctx) -> Vec<Value>) -> Self {
        Self {
            columns,
            cells,
            conditions: None,
        }
    }
}

/// One `columnDefinitions` entry.
#[derive(Debug, Clone, Copy)]
struct Column {
    name: &'static str,
    /// The OpenAPI type of the cells: `string`, `integer`, `boolean`, `date`.
    kind: &'static str,
    format: &'static str,
    description: &'static str,
    /// 0 is always shown; 1 only with `-o wide`.
    priority: u8,
}

impl Column {
    /// A column `kubectl get` always shows.
    const fn new(name: &'static str, kind: &'static str, description: &'static str) -> Self {
        Self {
            name,
            kind,
            format: "",
            description,
            priority: 0,
        }
    }

    /// A column shown only with `-o wide`.
    const fn wide(self) -> Self {
        Self {
            priority: 1,
            ..self
        }
    }

    fn to_json(self) -> Value {
        json!({
            "name": self.name,
            "type": self.kind,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        })
    }
}

/// The first column of (almost) every table.
const NAME: Column = Column {
    name: "Name",
    kind: "string",
    format: "name",
    description: "Name of the object, unique within its namespace (or cluster-wide for cluster-scoped kinds).",
    priority: 0,
};

/// Time since creation.
const AGE: Column = Column::new(
    "Age",
    "string",
    "Time since the object was created (metadata.creationTimestamp).",
);

/// Per-render state the row builders share.
struct Ctx {
    now: Timestamp,
}

impl Ctx {
    /// Human age of a timestamp, `<unknown>` when missing.
    fn since(&self, ts: Option<Timestamp>) -> String {
        format::since(self.now, ts)
    }

    /// The AGE cell of `object`.
    fn age(&self, object: Obj<'_>) -> String {
        self.since(object.at("metadata.creationTimestamp").time())
    }
}

/// The printer for a resource; unknown resources get the default table.
fn printer_for(group: &str, plural: &str) -> &'static Printer {
    match (group, plural) {
        ("", "pods") => &pod::PODS,
        ("", "podtemplates") => &workloads::POD_TEMPLATES,
        ("", "replicationcontrollers") => &workloads::REPLICATION_CONTROLLERS,
        ("", "services") => &network::SERVICES,
        ("", "endpoints") => &network::ENDPOINTS,
        ("", "nodes") => &cluster::NODES,
        ("", "namespaces") => &cluster::NAMESPACES,
        ("", "events") | ("events.k8s.io", "events") => &cluster::EVENTS,
        ("", "configmaps") => &config::CONFIG_MAPS,
        ("", "secrets") => &config::SECRETS,
        ("", "serviceaccounts") => &config::SERVICE_ACCOUNTS,
        ("", "persistentvolumes") => &storage::PERSISTENT_VOLUMES,
        ("", "persistentvolumeclaims") => &storage::PERSISTENT_VOLUME_CLAIMS,
        ("apps", "deployments") => &workloads::DEPLOYMENTS,
        ("apps", "replicasets") => &workloads::REPLICA_SETS,
        ("apps", "statefulsets") => &workloads::STATEFUL_SETS,
        ("apps", "daemonsets") => &workloads::DAEMON_SETS,
        ("apps", "controllerrevisions") => &workloads::CONTROLLER_REVISIONS,
        ("batch", "jobs") => &workloads::JOBS,
        ("batch", "cronjobs") => &workloads::CRON_JOBS,
        ("autoscaling", "horizontalpodautoscalers") => &workloads::HORIZONTAL_POD_AUTOSCALERS,
        ("policy", "poddisruptionbudgets") => &workloads::POD_DISRUPTION_BUDGETS,
        ("discovery.k8s.io", "endpointslices") => &network::ENDPOINT_SLICES,
        ("networking.k8s.io", "ingresses") => &network::INGRESSES,
        ("networking.k8s.io", "ingressclasses") => &network::INGRESS_CLASSES,
        ("networking.k8s.io", "networkpolicies") => &network::NETWORK_POLICIES,
        ("coordination.k8s.io", "leases") => &cluster::LEASES,
        ("scheduling.k8s.io", "priorityclasses") => &cluster::PRIORITY_CLASSES,
        ("node.k8s.io", "runtimeclasses") => &cluster::RUNTIME_CLASSES,
        ("rbac.authorization.k8s.io", "rolebindings") => &cluster::ROLE_BINDINGS,
        ("rbac.authorization.k8s.io", "clusterrolebindings") => &cluster::CLUSTER_ROLE_BINDINGS,
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations") => {
            &cluster::MUTATING_WEBHOOKS
        }
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations") => {
            &cluster::VALIDATING_WEBHOOKS
        }
        ("storage.k8s.io", "storageclasses") => &storage::STORAGE_CLASSES,
        _ => &DEFAULT,
    }
}

/// Upstream's default table: Name and the creation time in RFC 3339.
static DEFAULT: Printer = Printer::new(
    &[
        NAME,
        Column::new(
            "Created At",
            "date",
            "Time the object was created (metadata.creationTimestamp).",
        ),
    ],
    |o, _| {
        let created = o
            .at("metadata.creationTimestamp")
            .time()
            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| "0001-01-01T00:00:00Z".into());
        cells![o.at("metadata.name").str(), created]
    },
);

fn render_row(printer: &Printer, object: &Value, ctx: &Ctx, include: IncludeObject) -> Value {
    let obj = Obj::new(object);
    let mut cells = (printer.cells)(obj, ctx);
    // Never send kubectl a ragged row, even if a printer is wrong.
    cells.resize(printer.columns.len(), Value::from(""));
    let mut row = Map::new();
    row.insert("cells".into(), Value::Array(cells));
    if let Some(conditions) = printer.conditions.and_then(|f| f(obj)) {
        row.insert("conditions".into(), conditions);
    }
    let embedded = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Metadata => partial_object_metadata(object),
        IncludeObject::Object => object.clone(),
    };
    row.insert("object".into(), embedded);
    Value::Object(row)
}

fn partial_object_metadata(object: &Value) -> Value {
    let metadata = object
        .get("metadata")
        .filter(|m| m.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
    })
}

#[cfg(test)]
mod tests;
