//! Decoder tests: bodies captured from kubectl 1.33 (testdata/, made by
//! tools/protobuf-schema/capture_fixtures.py) against the JSON kubectl sends for the
//! same command, and hand-built bodies for each special case.

use serde_json::{Value, json};

use super::model::MsgId;
use super::schema::{KINDS, MESSAGES};
use super::{ProtobufError, UnknownField, decode};

// ------------------------------------------------------------------ fixtures

const FIXTURES: &[(&str, &[u8], &str)] = &[
    (
        "configmap",
        include_bytes!("testdata/configmap.pb"),
        include_str!("testdata/configmap.json"),
    ),
    (
        "secret",
        include_bytes!("testdata/secret.pb"),
        include_str!("testdata/secret.json"),
    ),
    (
        "namespace",
        include_bytes!("testdata/namespace.pb"),
        include_str!("testdata/namespace.json"),
    ),
    (
        "deployment",
        include_bytes!("testdata/deployment.pb"),
        include_str!("testdata/deployment.json"),
    ),
    (
        "service",
        include_bytes!("testdata/service.pb"),
        include_str!("testdata/service.json"),
    ),
    (
        "quota",
        include_bytes!("testdata/quota.pb"),
        include_str!("testdata/quota.json"),
    ),
    (
        "pdb",
        include_bytes!("testdata/pdb.pb"),
        include_str!("testdata/pdb.json"),
    ),
    (
        "cronjob",
        include_bytes!("testdata/cronjob.pb"),
        include_str!("testdata/cronjob.json"),
    ),
    (
        "clusterrole",
        include_bytes!("testdata/clusterrole.pb"),
        include_str!("testdata/clusterrole.json"),
    ),
    (
        "job",
        include_bytes!("testdata/job.pb"),
        include_str!("testdata/job.json"),
    ),
    (
        "ingress",
        include_bytes!("testdata/ingress.pb"),
        include_str!("testdata/ingress.json"),
    ),
];

#[test]
fn kubectl_bodies_decode_to_the_json_kubectl_sends() {
    for (name, body, json) in FIXTURES {
        let expected: Value = serde_json::from_str(json).unwrap();
        let decoded = decode(body).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(decoded.object, expected, "{name}");
        assert!(
            decoded.unknown_fields.is_empty(),
            "{name}: {:?}",
            decoded.unknown_fields
        );
    }
}

#[test]
fn kubectl_configmap_and_secret_details() {
    let cm = decode(FIXTURES[0].1).unwrap().object;
    // kubectl writes `namespace: ""`, `generation: 0` and friends; Go's JSON drops them.
    assert_eq!(
        cm["metadata"],
        json!({"name": "app-config", "creationTimestamp": null})
    );
    // A present empty map value stays.
    assert_eq!(cm["data"], json!({"greeting": "hello", "empty": ""}));

    let secret = decode(FIXTURES[1].1).unwrap().object;
    assert_eq!(secret["data"]["password"], "czNjcjN0IQ==");
}

#[test]
fn truncated_real_bodies_are_errors_not_panics() {
    for (name, body, _) in FIXTURES {
        // Cutting at a field boundary of the envelope leaves a shorter, valid body;
        // cutting anywhere inside the object's own bytes (`raw`) must be an error.
        let (raw_start, raw_end) = raw_span(body);
        for len in 0..body.len() {
            let result = decode(&body[..len]);
            if (raw_start..raw_end).contains(&len) {
                assert!(result.is_err(), "{name} cut at {len}");
            }
        }
    }
}

// ------------------------------------------------------------------ special types

#[test]
fn int_or_string_and_quantities_in_a_pod() {
    let port = |f: Msg| Msg::new().str(1, "/healthz").msg(2, f);
    let probe = |port_value: Msg| {
        Msg::new()
            .msg(1, Msg::new().msg(2, port(port_value)))
            .varint(2, 0)
    };
    let container = Msg::new()
        .str(1, "app")
        .msg(
            8,
            Msg::new()
                .map_msg(1, "cpu", quantity("250m"))
                .map_msg(2, "memory", quantity("64Mi")),
        )
        .msg(10, probe(Msg::new().varint(1, 0).varint(2, 8080)))
        .msg(11, probe(Msg::new().varint(1, 1).str(3, "http")));
    let pod = Msg::new()
        .msg(1, meta("p"))
        .msg(2, Msg::new().msg(2, container));
    let object = decode(&body("v1", "Pod", pod)).unwrap().object;
    let c = &object["spec"]["containers"][0];
    assert_eq!(
        c["resources"],
        json!({"limits": {"cpu": "250m"}, "requests": {"memory": "64Mi"}})
    );
    // Probe's handler is embedded inline; initialDelaySeconds 0 is omitempty and dropped.
    assert_eq!(
        c["livenessProbe"],
        json!({"httpGet": {"path": "/healthz", "port": 8080}})
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http");
}

#[test]
fn times_and_micro_times() {
    let t = Msg::new().varint(1, 1_795_788_000).varint(2, 123_456_789);
    let meta = meta("l").msg(8, t.clone()).msg(9, Msg::new());
    let spec = Msg::new()
        .str(1, "node-a")
        .msg(3, t)
        .msg(4, Msg::new().varint(1, 1_795_788_001));
    let object = decode(&body(
        "coordination.k8s.io/v1",
        "Lease",
        Msg::new().msg(1, meta).msg(2, spec),
    ))
    .unwrap()
    .object;
    // Time keeps whole seconds (as Go's unmarshalling does); an empty Time is null.
    assert_eq!(
        object["metadata"]["creationTimestamp"],
        "2026-11-27T14:00:00Z"
    );
    assert_eq!(object["metadata"]["deletionTimestamp"], Value::Null);
    assert_eq!(object["spec"]["acquireTime"], "2026-11-27T14:00:00.123456Z");
    assert_eq!(object["spec"]["renewTime"], "2026-11-27T14:00:01.000000Z");
}

#[test]
fn raw_extension_holds_json_or_a_nested_object() {
    let revision = |data: Msg| Msg::new().msg(1, meta("r")).msg(2, data).varint(3, 7);
    let json_data = Msg::new().bytes(1, br#"{"spec":{"replicas":3}}"#);
    let object = decode(&body("apps/v1", "ControllerRevision", revision(json_data)))
        .unwrap()
        .object;
    assert_eq!(object["data"], json!({"spec": {"replicas": 3}}));
    assert_eq!(object["revision"], 7);

    let inner = body("v1", "ConfigMap", Msg::new().map_str(2, "k", "v"));
    let object = decode(&body(
        "apps/v1",
        "ControllerRevision",
        revision(Msg::new().bytes(1, &inner)),
    ))
    .unwrap()
    .object;
    assert_eq!(
        object["data"],
        json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "v"}})
    );

    let bad = Msg::new().bytes(1, b"not json");
    let err = decode(&body("apps/v1", "ControllerRevision", revision(bad))).unwrap_err();
    assert!(err.to_string().contains("at data"), "{err}");
}

#[test]
fn bytes_are_base64_and_managed_fields_keep_their_json() {
    let entry = Msg::new()
        .str(1, "kubectl")
        .str(2, "Update")
        .str(6, "FieldsV1")
        .msg(7, Msg::new().bytes(1, br#"{"f:data":{}}"#));
    let cm = Msg::new()
        .msg(1, meta("c").msg(17, entry))
        .map_bytes(3, "bin", &[0, 1, 0xfe, 0xff]);
    let object = decode(&body("v1", "ConfigMap", cm)).unwrap().object;
    assert_eq!(object["binaryData"], json!({"bin": "AAH+/w=="}));
    assert_eq!(
        object["metadata"]["managedFields"],
        json!([{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:data": {}}}])
    );
}

// ------------------------------------------------------------------ field semantics

#[test]
fn packed_and_unpacked_repeated_ints() {
    let security = |groups: Msg| Msg::new().msg(2, Msg::new().msg(14, groups));
    // supplementalGroups is `repeated int64`: Go writes it unpacked, proto3 writers packed.
    let unpacked = Msg::new().varint(4, 1000).varint(4, 2000);
    let mut packed_run = Vec::new();
    for v in [1000u64, 2000, u64::MAX] {
        varint(v, &mut packed_run);
    }
    let packed = Msg::new().bytes(4, &packed_run);
    for (groups, expected) in [
        (unpacked, json!([1000, 2000])),
        (packed, json!([1000, 2000, -1])),
    ] {
        let object = decode(&body("v1", "Pod", security(groups))).unwrap().object;
        assert_eq!(
            object["spec"]["securityContext"]["supplementalGroups"],
            expected
        );
    }
}

#[test]
fn pointers_keep_zero_values_and_plain_omitempty_fields_drop_them() {
    let spec = Msg::new()
        .varint(1, 0)
        .varint(5, 0)
        .varint(7, 0)
        .varint(6, 0);
    let object = decode(&body("apps/v1", "Deployment", Msg::new().msg(2, spec)))
        .unwrap()
        .object;
    // replicas and revisionHistoryLimit are pointers: 0 is a real value. minReadySeconds
    // and paused are plain omitempty fields, which Go's JSON never shows at zero.
    assert_eq!(
        object["spec"],
        json!({"replicas": 0, "revisionHistoryLimit": 0})
    );

    // A pointer string set to "" (no storage class at all) is not the same as unset.
    let pvc = Msg::new().msg(2, Msg::new().str(5, "").str(3, ""));
    let object = decode(&body("v1", "PersistentVolumeClaim", pvc))
        .unwrap()
        .object;
    assert_eq!(object["spec"], json!({"storageClassName": ""}));

    let cm = Msg::new().varint(4, 0);
    assert_eq!(
        decode(&body("v1", "ConfigMap", cm)).unwrap().object["immutable"],
        false
    );
}

#[test]
fn embedded_structs_are_inlined() {
    let config_map = Msg::new()
        .msg(1, Msg::new().str(1, "settings"))
        .varint(3, 0o644);
    let volume = Msg::new()
        .str(1, "cfg")
        .msg(2, Msg::new().msg(19, config_map));
    let object = decode(&body(
        "v1",
        "Pod",
        Msg::new().msg(2, Msg::new().msg(1, volume)),
    ))
    .unwrap()
    .object;
    assert_eq!(
        object["spec"]["volumes"],
        json!([{"name": "cfg", "configMap": {"name": "settings", "defaultMode": 420}}])
    );
}

#[test]
fn repeated_singular_messages_merge_and_scalars_replace() {
    let cm = Msg::new()
        .msg(1, Msg::new().str(1, "first").map_str(11, "a", "1"))
        .msg(1, Msg::new().str(1, "second").map_str(11, "b", "2"));
    let object = decode(&body("v1", "ConfigMap", cm)).unwrap().object;
    assert_eq!(
        object["metadata"],
        json!({"name": "second", "labels": {"a": "1", "b": "2"}})
    );
}

#[test]
fn unknown_fields_are_skipped_and_reported() {
    let container = Msg::new().str(1, "c").varint(99, 5).fixed32(98);
    let pod = Msg::new()
        .msg(1, meta("p").bytes(40, b"future"))
        .msg(2, Msg::new().msg(2, container))
        .fixed64(77)
        .group(76);
    let decoded = decode(&body("v1", "Pod", pod)).unwrap();
    assert_eq!(decoded.object["spec"]["containers"], json!([{"name": "c"}]));
    let unknown: Vec<String> = decoded
        .unknown_fields
        .iter()
        .map(UnknownField::to_string)
        .collect();
    assert_eq!(
        unknown,
        [
            "metadata: unknown field 40 of ObjectMeta",
            "spec.containers[0]: unknown field 99 of Container",
            "spec.containers[0]: unknown field 98 of Container",
            "unknown field 77 of Pod",
            "unknown field 76 of Pod",
        ]
    );
}

#[test]
fn unknown_fields_under_a_long_map_key_are_reported_a_few_times() {
    // Many unknown fields inside one Quantity under a 64 KB map key: each
    // report carries the key in its path, so only the first few are kept.
    let key = "k".repeat(64 * 1024);
    let mut quantity = Msg::new().str(1, "1");
    for _ in 0..10_000 {
        quantity = quantity.varint(2, 0);
    }
    let entry = Msg::new().str(1, &key).msg(2, quantity);
    let pod = Msg::new()
        .msg(1, meta("p"))
        .msg(2, Msg::new().msg(32, entry));
    let decoded = decode(&body("v1", "Pod", pod)).unwrap();
    assert_eq!(
        decoded.unknown_fields.len(),
        super::message::MAX_UNKNOWN_REPORTED
    );
    assert!(decoded.unknown_fields[0].path.contains(&key));
}

#[test]
fn delete_options_in_any_served_group_version() {
    let opts = Msg::new().varint(1, 0).str(4, "Foreground").str(5, "All");
    for api_version in ["v1", "apps/v1", "meta.k8s.io/v1"] {
        let object = decode(&body(api_version, "DeleteOptions", opts.clone()))
            .unwrap()
            .object;
        assert_eq!(
            object,
            json!({"apiVersion": api_version, "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                   "propagationPolicy": "Foreground", "dryRun": ["All"]})
        );
    }
    assert!(decode(&body("example.com/v1", "DeleteOptions", opts)).is_err());
}

// ------------------------------------------------------------------ refusals

#[test]
fn refuses_bad_envelopes() {
    let cm = || Msg::new().map_str(2, "k", "v");
    assert_eq!(
        decode(b"{\"kind\":\"ConfigMap\"}"),
        Err(ProtobufError::NotProtobuf)
    );
    assert_eq!(decode(b"k8s"), Err(ProtobufError::NotProtobuf));
    assert_eq!(decode(b"k8s\0"), Err(ProtobufError::MissingTypeMeta));
    assert_eq!(
        decode(&body("v1", "Frobnicator", cm())),
        Err(ProtobufError::UnknownKind {
            api_version: "v1".into(),
            kind: "Frobnicator".into()
        })
    );
    let with = |extra: Msg| {
        let mut b = body("v1", "ConfigMap", cm());
        b.extend_from_slice(&extra.0);
        b
    };
    assert_eq!(
        decode(&with(Msg::new().str(3, "gzip"))),
        Err(ProtobufError::ContentEncoding("gzip".into()))
    );
    assert_eq!(
        decode(&with(Msg::new().str(4, "application/json"))),
        Err(ProtobufError::ContentType("application/json".into()))
    );
    assert!(decode(&with(Msg::new().str(4, super::CONTENT_TYPE))).is_ok());
}

#[test]
fn wrong_wire_types_say_where() {
    let err = decode(&body("v1", "ConfigMap", Msg::new().varint(3, 1))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "protobuf body: field 3 of ConfigMap has wire type 0, expected 2 (at binaryData)"
    );
    let container = Msg::new().varint(1, 1);
    let err = decode(&body(
        "v1",
        "Pod",
        Msg::new().msg(2, Msg::new().msg(2, container)),
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "protobuf body: field 1 of Container has wire type 0, expected 2 (at spec.containers[0].name)"
    );
    let err = decode(&body(
        "v1",
        "ConfigMap",
        Msg::new().bytes(2, &[0x0a, 0x01, 0xff]),
    ))
    .unwrap_err();
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");
}

#[test]
fn nesting_is_bounded() {
    // ControllerRevision.data may hold another whole object: the one way to recurse.
    let mut object = body("v1", "ConfigMap", Msg::new());
    for _ in 0..40 {
        let revision = Msg::new().msg(2, Msg::new().bytes(1, &object));
        object = body("apps/v1", "ControllerRevision", revision);
    }
    let err = decode(&object).unwrap_err();
    assert!(matches!(err, ProtobufError::TooDeep { .. }), "{err}");
    assert!(err.to_string().contains("deeper than 64 levels"), "{err}");
}

#[test]
fn random_bytes_are_errors_not_panics() {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for round in 0..2000 {
        let len = (rng.next() % 200) as usize;
        let mut b = b"k8s\0".to_vec();
        b.extend((0..len).map(|_| rng.next() as u8));
        assert!(decode(&b).is_err(), "round {round}");
    }
    // Mutated real bodies: any result is fine, a panic is not.
    for (_, body, _) in FIXTURES {
        for _ in 0..300 {
            let mut b = body.to_vec();
            for _ in 0..1 + rng.next() % 4 {
                let i = 4 + (rng.next() as usize) % (b.len() - 4);
                b[i] = rng.next() as u8;
            }
            let _ = decode(&b);
        }
    }
}

// ------------------------------------------------------------------ the table

#[test]
fn schema_table_is_consistent() {
    let valid = |id: MsgId| usize::from(id.0) < MESSAGES.len();
    for (_, _, id) in KINDS {
        assert!(valid(*id));
    }
    for msg in MESSAGES {
        assert!(
            msg.fields.windows(2).all(|w| w[0].number < w[1].number),
            "{}",
            msg.name
        );
        for field in msg.fields {
            let mut kind = field.kind;
            if let super::model::Kind::Map(value) = kind {
                kind = *value;
            }
            if let super::model::Kind::Message(id) = kind {
                assert!(valid(id), "{}.{}", msg.name, field.json);
            }
        }
    }
}

// ------------------------------------------------------------------ helpers

/// A protobuf message under construction.
#[derive(Clone, Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn new() -> Self {
        Msg::default()
    }
    fn key(mut self, field: u32, wire: u8) -> Self {
        varint(u64::from(field) << 3 | u64::from(wire), &mut self.0);
        self
    }
    fn varint(self, field: u32, v: u64) -> Self {
        let mut m = self.key(field, 0);
        varint(v, &mut m.0);
        m
    }
    fn fixed64(self, field: u32) -> Self {
        let mut m = self.key(field, 1);
        m.0.extend_from_slice(&[1; 8]);
        m
    }
    fn fixed32(self, field: u32) -> Self {
        let mut m = self.key(field, 5);
        m.0.extend_from_slice(&[1; 4]);
        m
    }
    fn group(self, field: u32) -> Self {
        self.key(field, 3).varint(1, 1).key(field, 4)
    }
    fn bytes(self, field: u32, b: &[u8]) -> Self {
        let mut m = self.key(field, 2);
        varint(b.len() as u64, &mut m.0);
        m.0.extend_from_slice(b);
        m
    }
    fn str(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }
    fn msg(self, field: u32, m: Msg) -> Self {
        self.bytes(field, &m.0)
    }
    fn map_str(self, field: u32, k: &str, v: &str) -> Self {
        self.msg(field, Msg::new().str(1, k).str(2, v))
    }
    fn map_bytes(self, field: u32, k: &str, v: &[u8]) -> Self {
        self.msg(field, Msg::new().str(1, k).bytes(2, v))
    }
    fn map_msg(self, field: u32, k: &str, v: Msg) -> Self {
        self.msg(field, Msg::new().str(1, k).msg(2, v))
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn meta(name: &str) -> Msg {
    Msg::new().str(1, name)
}

fn quantity(s: &str) -> Msg {
    Msg::new().str(1, s)
}

/// Where the object's bytes (field 2 of runtime.Unknown) start and end in a body.
fn raw_span(body: &[u8]) -> (usize, usize) {
    let mut r = super::wire::Reader::new(&body[4..]);
    while let Some((number, _)) = r.key().unwrap() {
        let value = r.len_delimited().unwrap();
        if number == 2 {
            let start = value.as_ptr() as usize - body.as_ptr() as usize;
            return (start, start + value.len());
        }
    }
    panic!("no raw field");
}

/// `k8s\0` + runtime.Unknown{typeMeta, raw}, as kubectl sends.
fn body(api_version: &str, kind: &str, raw: Msg) -> Vec<u8> {
    let type_meta = Msg::new().str(1, api_version).str(2, kind);
    let mut out = b"k8s\0".to_vec();
    out.extend(Msg::new().msg(1, type_meta).msg(2, raw).0);
    out
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
