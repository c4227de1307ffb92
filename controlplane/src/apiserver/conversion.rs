//! Kinds served in one shape and stored in another's.
//!
//! events.k8s.io/v1 Events are core/v1 Events in the store, as upstream
//! keeps them: an Event written through either API is read through both,
//! so what a controller records with the new API shows in `kubectl get
//! events` and `kubectl describe`. The two shapes differ only in field
//! names, so the conversion is a rename in each direction.

use serde_json::{Map, Value};

/// How a served kind maps onto another kind's storage.
pub struct StoredAs {
    /// The storage kind's group (`""` for core) and plural, which name the
    /// store keys.
    pub group: &'static str,
    pub plural: &'static str,
    /// Served shape → stored shape.
    pub to_stored: fn(Value) -> Value,
    /// Stored shape → served shape.
    pub from_stored: fn(Value) -> Value,
}

/// events.k8s.io/v1 Event ↔ core/v1 Event.
pub static EVENTS_AS_CORE: StoredAs = StoredAs {
    group: "",
    plural: "events",
    to_stored: event_to_core,
    from_stored: core_to_event,
};

/// (core/v1 name, events.k8s.io/v1 name) of every renamed field; the
/// others (`reason`, `type`, `action`, `related`, `reportingInstance`,
/// `eventTime`, `series`) are spelled the same in both.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn event_to_core(event: Value) -> Value {
    renamed(event, "v1", |(core, events)| (events, core))
}

fn core_to_event(core: Value) -> Value {
    renamed(core, "events.k8s.io/v1", |pair| pair)
}

/// `object` with `apiVersion` set and every field renamed from the first
/// name of a pair (as `direction` orders it) to the second.
fn renamed(
    object: Value,
    api_version: &str,
    direction: fn((&'static str, &'static str)) -> (&'static str, &'static str),
) -> Value {
    let Value::Object(fields) = object else {
        return object;
    };
    let mut out = Map::with_capacity(fields.len());
    for (name, value) in fields {
        let name = EVENT_RENAMES
            .iter()
            .map(|&pair| direction(pair))
            .find(|(from, _)| *from == name)
            .map_or(name, |(_, to)| to.to_owned());
        out.insert(name, value);
    }
    out.insert("apiVersion".into(), Value::String(api_version.to_owned()));
    out.insert("kind".into(), Value::String("Event".to_owned()));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn recorded() -> Value {
        json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": "web.1", "namespace": "default"},
            "regarding": {"kind": "Pod", "name": "web", "namespace": "default"},
            "note": "pulled",
            "reason": "Pulled",
            "type": "Normal",
            "action": "Pull",
            "reportingController": "skiff.io/agent",
            "reportingInstance": "node-1",
            "eventTime": "2026-11-27T20:00:00.000000Z",
            "series": {"count": 3, "lastObservedTime": "2026-11-27T20:01:00.000000Z"},
            "deprecatedCount": 3
        })
    }

    #[test]
    fn new_api_events_are_stored_as_core_events() {
        let core = (EVENTS_AS_CORE.to_stored)(recorded());
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "web");
        assert_eq!(core["message"], "pulled");
        assert_eq!(core["reportingComponent"], "skiff.io/agent");
        assert_eq!(core["count"], 3);
        assert_eq!(core["series"]["count"], 3);
        assert!(core.get("regarding").is_none() && core.get("note").is_none());
        // Both shapes decode as their typed structs.
        serde_json::from_value::<k8s_openapi::api::core::v1::Event>(core.clone()).unwrap();
    }

    #[test]
    fn conversion_round_trips() {
        let back = (EVENTS_AS_CORE.from_stored)((EVENTS_AS_CORE.to_stored)(recorded()));
        assert_eq!(back, recorded());
        serde_json::from_value::<k8s_openapi::api::events::v1::Event>(back).unwrap();
    }

    #[test]
    fn core_events_read_through_the_new_api() {
        let core = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "x", "namespace": "default"},
            "involvedObject": {"kind": "Node", "name": "n1"},
            "message": "ready",
            "source": {"component": "kubelet"},
            "firstTimestamp": "2026-11-27T20:00:00Z",
            "lastTimestamp": "2026-11-27T20:00:05Z",
            "count": 2
        });
        let event = (EVENTS_AS_CORE.from_stored)(core);
        assert_eq!(event["apiVersion"], "events.k8s.io/v1");
        assert_eq!(event["regarding"]["name"], "n1");
        assert_eq!(event["note"], "ready");
        assert_eq!(event["deprecatedSource"]["component"], "kubelet");
        assert_eq!(event["deprecatedLastTimestamp"], "2026-11-27T20:00:05Z");
        assert_eq!(event["deprecatedCount"], 2);
    }
}
