use serde_json::json;

use super::*;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).expect("valid object"))
}

fn class(name: &str, controller: &str, default: bool) -> Arc<IngressClass> {
    let annotations = if default {
        json!({DEFAULT_CLASS_ANNOTATION: "true"})
    } else {
        json!({})
    };
    obj(
        json!({"metadata": {"name": name, "annotations": annotations}, "spec": {"controller": controller}}),
    )
}

fn service(name: &str, ports: serde_json::Value) -> Arc<Service> {
    obj(json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {"ports": ports}}))
}

fn slice(
    name: &str,
    service: &str,
    port_name: &str,
    port: u16,
    endpoints: serde_json::Value,
) -> Arc<EndpointSlice> {
    obj(json!({
        "metadata": {"name": name, "namespace": "ns", "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port}],
        "endpoints": endpoints,
    }))
}

fn ingress(
    name: &str,
    created: &str,
    annotations: serde_json::Value,
    spec: serde_json::Value,
) -> Arc<Ingress> {
    obj(json!({
        "metadata": {"name": name, "namespace": "ns", "uid": name, "creationTimestamp": created, "annotations": annotations},
        "spec": spec,
    }))
}

fn rule(host: &str, path: &str, service: &str, port: serde_json::Value) -> serde_json::Value {
    json!({"host": host, "http": {"paths": [{"path": path, "pathType": "Prefix", "backend": {"service": {"name": service, "port": port}}}]}})
}

fn builder() -> Builder {
    let metrics = Arc::new(Metrics::new(&mut Default::default()));
    Builder::new(metrics, tls::default_certificate().expect("certificate"))
}

fn endpoints_of(built: &Built, host: &str, path: &str) -> Option<Vec<String>> {
    let m = built.snapshot.table.lookup(host, path)?;
    Some(
        m.route
            .backend
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect(),
    )
}

#[test]
fn classes_decide_what_is_served() {
    let ours = class("skiff", CONTROLLER, false);
    let theirs = class("nginx", "k8s.io/ingress-nginx", true);
    let named = |c: &str| {
        ingress(
            "i",
            "2026-01-01T00:00:00Z",
            json!({}),
            json!({"ingressClassName": c}),
        )
    };
    let unnamed = ingress("i", "2026-01-01T00:00:00Z", json!({}), json!({}));
    let legacy = ingress(
        "i",
        "2026-01-01T00:00:00Z",
        json!({LEGACY_CLASS_ANNOTATION: "skiff"}),
        json!({}),
    );
    let classes = [ours.clone(), theirs.clone()];
    assert!(is_ours(&named("skiff"), &classes));
    assert!(!is_ours(&named("nginx"), &classes));
    assert!(
        !is_ours(&unnamed, &classes),
        "the default class is someone else's"
    );
    assert!(is_ours(&legacy, &classes));
    let classes = [
        class("skiff", CONTROLLER, true),
        class("nginx", "k8s.io/ingress-nginx", false),
    ];
    assert!(is_ours(&unnamed, &classes), "ours is the default");
    // Before the class object is seen, its name is still ours.
    assert!(is_ours(&named("skiff"), &[]));
}

#[test]
fn backends_resolve_to_ready_endpoints_by_port_number_or_name() {
    let services = [
        service(
            "web",
            json!([{"name": "http", "port": 80}, {"name": "admin", "port": 9000}]),
        ),
        service("solo", json!([{"port": 81}])),
    ];
    let slices = [
        slice(
            "web-a",
            "web",
            "http",
            8080,
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
            ]),
        ),
        slice(
            "web-b",
            "web",
            "admin",
            9090,
            json!([{"addresses": ["10.0.0.9"]}]),
        ),
        slice(
            "solo-a",
            "solo",
            "",
            7000,
            json!([{"addresses": ["10.0.1.1"]}]),
        ),
    ];
    let ing = ingress(
        "i",
        "2026-01-01T00:00:00Z",
        json!({}),
        json!({
            "ingressClassName": "skiff",
            "rules": [
                rule("a.example", "/", "web", json!({"number": 80})),
                rule("b.example", "/", "web", json!({"name": "admin"})),
                rule("c.example", "/", "solo", json!({"number": 81})),
                rule("d.example", "/", "nosuch", json!({"number": 80})),
                rule("e.example", "/", "web", json!({"number": 1234})),
            ],
        }),
    );
    let built = builder().build(&Objects {
        ingresses: &[ing],
        classes: &[],
        services: &services,
        slices: &slices,
        secrets: &[],
    });
    assert_eq!(
        endpoints_of(&built, "a.example", "/").unwrap(),
        ["10.0.0.1:8080", "10.0.0.3:8080"]
    );
    assert_eq!(
        endpoints_of(&built, "b.example", "/").unwrap(),
        ["10.0.0.9:9090"]
    );
    assert_eq!(
        endpoints_of(&built, "c.example", "/").unwrap(),
        ["10.0.1.1:7000"]
    );
    assert!(endpoints_of(&built, "d.example", "/").unwrap().is_empty());
    assert!(endpoints_of(&built, "e.example", "/").unwrap().is_empty());
    let reasons: Vec<&str> = built.ours[0].1.iter().map(|p| p.reason).collect();
    assert_eq!(reasons, ["ServiceNotFound", "PortNotFound"]);
}

#[test]
fn canary_attaches_to_the_route_it_shadows_and_oldest_wins() {
    let services = [
        service("v1", json!([{"port": 80}])),
        service("v2", json!([{"port": 80}])),
        service("v3", json!([{"port": 80}])),
    ];
    let spec = |svc: &str| json!({"ingressClassName": "skiff", "rules": [rule("app.example", "/", svc, json!({"number": 80}))]});
    let ingresses = [
        ingress("newer", "2026-02-01T00:00:00Z", json!({}), spec("v3")),
        ingress("main", "2026-01-01T00:00:00Z", json!({}), spec("v1")),
        ingress(
            "canary",
            "2026-03-01T00:00:00Z",
            json!({"skiff.io/canary": "true", "skiff.io/canary-weight": "20"}),
            spec("v2"),
        ),
    ];
    let built = builder().build(&Objects {
        ingresses: &ingresses,
        classes: &[],
        services: &services,
        slices: &[],
        secrets: &[],
    });
    let m = built.snapshot.table.lookup("app.example", "/x").unwrap();
    assert_eq!(m.route.ingress, "ns/main");
    assert_eq!(m.route.backend.name, "ns/v1:80");
    let canary = m.route.canary.as_ref().expect("canary attached");
    assert_eq!(
        (canary.weight, canary.backend.name.as_str()),
        (20, "ns/v2:80")
    );
}

#[test]
fn tls_hosts_get_certificates_redirects_and_missing_secrets_are_problems() {
    let cert = rcgen::generate_simple_self_signed(vec!["a.example".to_owned()]).expect("cert");
    let secret: Arc<Secret> = obj(json!({
        "metadata": {"name": "a-tls", "namespace": "ns", "resourceVersion": "1"},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64(cert.cert.pem().as_bytes()),
            "tls.key": base64(cert.signing_key.serialize_pem().as_bytes()),
        },
    }));
    let services = [service("web", json!([{"port": 80}]))];
    let ing = ingress(
        "i",
        "2026-01-01T00:00:00Z",
        json!({}),
        json!({
            "ingressClassName": "skiff",
            "tls": [{"hosts": ["a.example"], "secretName": "a-tls"}, {"hosts": ["b.example"], "secretName": "gone"}],
            "rules": [rule("a.example", "/", "web", json!({"number": 80})), rule("c.example", "/", "web", json!({"number": 80}))],
        }),
    );
    let built = builder().build(&Objects {
        ingresses: &[ing],
        classes: &[],
        services: &services,
        slices: &[],
        secrets: &[secret],
    });
    let served = built.snapshot.certs.find(Some("A.example"));
    assert_eq!(served.cert[0].as_ref(), cert.cert.der().as_ref());
    let default = built.snapshot.certs.find(Some("c.example"));
    assert_ne!(default.cert[0].as_ref(), cert.cert.der().as_ref());
    assert!(
        built
            .snapshot
            .table
            .lookup("a.example", "/")
            .unwrap()
            .route
            .redirect_https
    );
    assert!(
        !built
            .snapshot
            .table
            .lookup("c.example", "/")
            .unwrap()
            .route
            .redirect_https
    );
    let reasons: Vec<&str> = built.ours[0].1.iter().map(|p| p.reason).collect();
    assert_eq!(reasons, ["SecretNotFound"]);
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
