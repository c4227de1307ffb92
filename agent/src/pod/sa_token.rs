//! Service-account tokens for a pod's projected volumes: requested
//! through the TokenRequest API bound to the pod, as the kubelet does, and
//! requested again once 80 % of their lifetime has passed.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// The share of a token's lifetime after which it is replaced.
const REFRESH_AT: f64 = 0.8;
/// Upstream's default when a projection names no lifetime.
const DEFAULT_SECONDS: i64 = 3600;

struct Issued {
    token: String,
    refresh_at: Instant,
    expires_at: Instant,
}

/// The pod's current tokens, by volume name and file path.
#[derive(Default)]
pub struct Tokens {
    issued: HashMap<(String, String), Issued>,
}

impl Tokens {
    /// The token to write for `path` of `volume`, if one was issued.
    pub fn get(&self, volume: &str, path: &str) -> Option<&str> {
        self.issued
            .get(&(volume.to_owned(), path.to_owned()))
            .map(|i| i.token.as_str())
    }

    /// Requests every token the pod's volumes need that is missing or due.
    /// A failed renewal keeps the old token while it is still valid.
    pub async fn refresh(&mut self, client: &kube::Client, pod: &Pod) -> Result<(), String> {
        let Some(spec) = &pod.spec else {
            return Ok(());
        };
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let account = spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let now = Instant::now();
        for volume in spec.volumes.iter().flatten() {
            let Some(projected) = &volume.projected else {
                continue;
            };
            for source in projected.sources.iter().flatten() {
                let Some(wanted) = &source.service_account_token else {
                    continue;
                };
                let key = (volume.name.clone(), wanted.path.clone());
                if self.issued.get(&key).is_some_and(|i| now < i.refresh_at) {
                    continue;
                }
                let lifetime = wanted.expiration_seconds.unwrap_or(DEFAULT_SECONDS);
                match request(
                    client,
                    pod,
                    namespace,
                    account,
                    wanted.audience.as_deref(),
                    lifetime,
                )
                .await
                {
                    Ok(issued) => {
                        self.issued.insert(key, issued);
                    }
                    Err(e) if self.issued.get(&key).is_some_and(|i| now < i.expires_at) => {
                        tracing::warn!(pod = ?pod.metadata.name, error = %e, "cannot renew a service account token yet");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

async fn request(
    client: &kube::Client,
    pod: &Pod,
    namespace: &str,
    account: &str,
    audience: Option<&str>,
    lifetime: i64,
) -> Result<Issued, String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience
                .filter(|a| !a.is_empty())
                .map(|a| vec![a.to_owned()])
                .unwrap_or_default(),
            expiration_seconds: Some(lifetime),
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let requested_at = Instant::now();
    let answer = api
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("requesting a token for serviceaccount {account:?}: {e}"))?;
    let status = answer
        .status
        .ok_or_else(|| format!("the token request for serviceaccount {account:?} got no token"))?;
    // The server may shorten the lifetime; its expiry is what counts.
    let granted = status
        .expiration_timestamp
        .0
        .duration_since(k8s_openapi::jiff::Timestamp::now())
        .as_secs()
        .clamp(0, lifetime.max(0));
    let granted = Duration::from_secs(granted as u64);
    Ok(Issued {
        token: status.token,
        refresh_at: requested_at + granted.mul_f64(REFRESH_AT),
        expires_at: requested_at + granted,
    })
}
