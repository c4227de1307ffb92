//! Service accounts in the API server: the TokenRequest subresource
//! (`serviceaccounts/<name>/token`), authentication of the tokens it
//! issues, and the ServiceAccount admission plugin that mounts a token
//! into every pod.
//!
//! A pod naming a ServiceAccount that does not exist (yet) is admitted;
//! the node agent's TokenRequest then fails and the pod waits in
//! `ContainerCreating` with that error until the account appears. This
//! spares the race between a new namespace and its `default` account.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::ApiState;
use super::authn::User;
use super::handlers::{self, Reply};
use super::objects;
use super::request::{BodyFormat, decode_body};
use super::resources::ResourceType;
use super::sa_token::{self, Claims, KubernetesClaims, ObjectClaim};
use super::status::{ApiError, Cause};

/// Where upstream mounts the token, CA bundle and namespace files.
pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The ConfigMap with the cluster CA every namespace gets.
pub const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";
/// The lifetime of mounted tokens, as upstream's admission plugin asks.
const MOUNTED_TOKEN_SECONDS: i64 = 3607;
/// Without `expirationSeconds`, a token lives an hour, as upstream.
const DEFAULT_TOKEN_SECONDS: i64 = 3600;
/// Upstream refuses shorter lifetimes.
const MIN_TOKEN_SECONDS: i64 = 600;
/// And this server longer ones than a year.
const MAX_TOKEN_SECONDS: i64 = 365 * 24 * 3600;

/// `POST .../serviceaccounts/<name>/token`: a signed token for the
/// account, optionally bound to a pod or secret that must exist.
pub async fn token_request(
    state: &ApiState,
    ns: Option<&str>,
    name: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let keys = state
        .service_account_keys
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("this server issues no service-account tokens"))?;
    let ns = ns.ok_or_else(|| ApiError::bad_request("a namespace is required"))?;
    let sa = read_object(state, "serviceaccounts", ns, name).await?;
    let request = decode_body(BodyFormat::of(headers)?, &body)?;
    let spec = request.get("spec").cloned().unwrap_or_else(|| json!({}));
    let invalid = |cause: Cause| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "TokenRequest.authentication.k8s.io {name:?} is invalid: {}",
                cause_text(&cause)
            ),
        )
    };
    let mut audiences: Vec<String> = spec
        .get("audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if audiences.is_empty() {
        audiences.push(sa_token::ISSUER.to_owned());
    }
    let lifetime = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => DEFAULT_TOKEN_SECONDS,
        Some(v) => v.as_i64().ok_or_else(|| {
            invalid(Cause::invalid(
                "spec.expirationSeconds",
                &v.to_string(),
                "must be an integer",
            ))
        })?,
    };
    if lifetime < MIN_TOKEN_SECONDS {
        return Err(invalid(Cause::invalid(
            "spec.expirationSeconds",
            &lifetime.to_string(),
            "may not specify a duration less than 10 minutes",
        )));
    }
    let lifetime = lifetime.min(MAX_TOKEN_SECONDS);
    let mut claims_k8s = KubernetesClaims {
        namespace: ns.to_owned(),
        serviceaccount: ObjectClaim {
            name: name.to_owned(),
            uid: objects::meta_str(&sa, "uid").unwrap_or_default().to_owned(),
        },
        pod: None,
        secret: None,
    };
    let bound = spec.get("boundObjectRef").filter(|b| !b.is_null());
    if let Some(bound) = bound {
        let kind = bound
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let bound_name = bound
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if bound_name.is_empty() {
            return Err(invalid(Cause::required("spec.boundObjectRef.name")));
        }
        let plural = match kind {
            "Pod" => "pods",
            "Secret" => "secrets",
            other => {
                return Err(invalid(Cause::unsupported(
                    "spec.boundObjectRef.kind",
                    other,
                    &["Pod", "Secret"],
                )));
            }
        };
        let object = read_object(state, plural, ns, bound_name).await?;
        let uid = objects::meta_str(&object, "uid")
            .unwrap_or_default()
            .to_owned();
        if let Some(wanted) = bound.get("uid").and_then(Value::as_str)
            && !wanted.is_empty()
            && wanted != uid
        {
            return Err(ApiError::conflict(
                resource(state, plural)?,
                bound_name,
                &format!(
                    "the UID in the bound object reference ({wanted}) does not match the {kind}'s ({uid})"
                ),
            ));
        }
        let claim = Some(ObjectClaim {
            name: bound_name.to_owned(),
            uid,
        });
        if kind == "Pod" {
            claims_k8s.pod = claim;
        } else {
            claims_k8s.secret = claim;
        }
    }
    let now = jiff::Timestamp::now().as_second();
    let claims = Claims {
        iss: sa_token::ISSUER.to_owned(),
        sub: sa_token::user_name(ns, name),
        aud: audiences.clone(),
        exp: now + lifetime,
        iat: now,
        nbf: now,
        jti: Some(uuid::Uuid::new_v4().to_string()),
        kubernetes: claims_k8s,
    };
    let token = keys
        .sign(&claims)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let expires = jiff::Timestamp::from_second(claims.exp)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut out_spec = json!({"audiences": audiences, "expirationSeconds": lifetime});
    if let Some(bound) = bound {
        out_spec["boundObjectRef"] = bound.clone();
    }
    Ok(Reply::value(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": null},
            "spec": out_spec,
            "status": {"token": token, "expirationTimestamp": expires},
        }),
    ))
}

/// The service account a bearer token stands for, if this server signed
/// it, it is current, and the account and any object it is bound to still
/// exist (with the same uid).
pub async fn authenticate(state: &ApiState, token: &str) -> Option<User> {
    let keys = state.service_account_keys.as_ref()?;
    let now = jiff::Timestamp::now().as_second();
    let claims = match keys.verify(token, now, &[sa_token::ISSUER]) {
        Ok(claims) => claims,
        Err(e) => {
            tracing::debug!(error = %e, "service-account token refused");
            return None;
        }
    };
    let k8s = &claims.kubernetes;
    let ns = k8s.namespace.as_str();
    let current = |object: &Value, claim: &ObjectClaim| {
        claim.uid.is_empty() || objects::meta_str(object, "uid") == Some(claim.uid.as_str())
    };
    let sa = read_object(state, "serviceaccounts", ns, &k8s.serviceaccount.name)
        .await
        .ok()?;
    if !current(&sa, &k8s.serviceaccount) {
        return None;
    }
    for (plural, claim) in [("pods", &k8s.pod), ("secrets", &k8s.secret)] {
        if let Some(claim) = claim {
            let object = read_object(state, plural, ns, &claim.name).await.ok()?;
            if !current(&object, claim) {
                tracing::debug!(%plural, name = %claim.name, "token bound to an object that is gone");
                return None;
            }
        }
    }
    Some(User {
        name: sa_token::user_name(ns, &k8s.serviceaccount.name),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
        ],
    })
}

/// The ServiceAccount admission plugin on a new pod: names the account in
/// both fields and, unless the pod or its account opts out, adds the
/// `kube-api-access-*` projected volume and mounts it in every container.
pub async fn admit_pod(state: &ApiState, pod: &mut Value) -> Result<(), ApiError> {
    let ns = objects::meta_str(pod, "namespace")
        .unwrap_or("default")
        .to_owned();
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    let account = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_owned();
    spec.insert("serviceAccountName".into(), json!(account));
    spec.insert("serviceAccount".into(), json!(account));
    let pod_choice = spec
        .get("automountServiceAccountToken")
        .and_then(Value::as_bool);
    let automount = match pod_choice {
        Some(choice) => choice,
        None => match read_object(state, "serviceaccounts", &ns, &account).await {
            Ok(sa) => sa
                .get("automountServiceAccountToken")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            Err(e) if e.reason == "NotFound" => true,
            Err(e) => return Err(e),
        },
    };
    if automount {
        mount_token(spec);
    }
    Ok(())
}

fn mount_token(spec: &mut serde_json::Map<String, Value>) {
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    let Some(volumes) = volumes.as_array_mut() else {
        return;
    };
    let existing = volumes.iter().find_map(|v| {
        v.get("name")
            .and_then(Value::as_str)
            .filter(|n| n.starts_with("kube-api-access-"))
            .map(str::to_owned)
    });
    let name = match existing {
        Some(name) => name,
        None => {
            let name = format!("kube-api-access-{}", random_suffix());
            volumes.push(json!({
                "name": name,
                "projected": {
                    "defaultMode": 0o644,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": MOUNTED_TOKEN_SECONDS, "path": "token"}},
                        {"configMap": {"name": ROOT_CA_CONFIG_MAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                    ],
                },
            }));
            name
        }
    };
    for field in ["initContainers", "containers", "ephemeralContainers"] {
        let Some(Value::Array(containers)) = spec.get_mut(field) else {
            continue;
        };
        for container in containers.iter_mut().filter_map(Value::as_object_mut) {
            let mounts = container.entry("volumeMounts").or_insert_with(|| json!([]));
            let Some(mounts) = mounts.as_array_mut() else {
                continue;
            };
            let taken = mounts
                .iter()
                .any(|m| m.get("mountPath").and_then(Value::as_str) == Some(MOUNT_PATH));
            if !taken {
                mounts.push(json!({"name": name, "readOnly": true, "mountPath": MOUNT_PATH}));
            }
        }
    }
}

/// Five characters from the alphabet upstream's name generator uses.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn cause_text(cause: &Cause) -> String {
    format!("{}: {}", cause.field, cause.message)
}

fn resource(state: &ApiState, plural: &str) -> Result<&'static ResourceType, ApiError> {
    state
        .registry
        .all()
        .iter()
        .find(|t| t.group.is_empty() && t.plural == plural)
        .ok_or_else(|| ApiError::internal(format!("{plural} are not served")))
}

async fn read_object(
    state: &ApiState,
    plural: &str,
    ns: &str,
    name: &str,
) -> Result<Value, ApiError> {
    let rt = resource(state, plural)?;
    let kv = handlers::read(state, rt, Some(ns), name).await?;
    objects::decode(&kv.value, kv.mod_revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_container_mounts_the_token_once() {
        let mut pod = json!({"spec": {
            "containers": [
                {"name": "a"},
                {"name": "b", "volumeMounts": [{"name": "own", "mountPath": MOUNT_PATH}]},
            ],
            "initContainers": [{"name": "i"}],
        }});
        let spec = pod["spec"].as_object_mut().unwrap();
        mount_token(spec);
        mount_token(spec);
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 1, "{volumes:?}");
        let name = volumes[0]["name"].as_str().unwrap();
        assert!(
            name.starts_with("kube-api-access-") && name.len() == 21,
            "{name}"
        );
        let sources = &volumes[0]["projected"]["sources"];
        assert_eq!(sources[0]["serviceAccountToken"]["expirationSeconds"], 3607);
        assert_eq!(sources[1]["configMap"]["name"], ROOT_CA_CONFIG_MAP);
        assert_eq!(
            sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        let a = pod["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        assert_eq!(
            a,
            &vec![json!({"name": name, "readOnly": true, "mountPath": MOUNT_PATH})]
        );
        let b = pod["spec"]["containers"][1]["volumeMounts"]
            .as_array()
            .unwrap();
        assert_eq!(b.len(), 1, "a container's own mount at the path is kept");
        assert_eq!(b[0]["name"], "own");
        let i = pod["spec"]["initContainers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        assert_eq!(i[0]["name"], name);
    }
}
