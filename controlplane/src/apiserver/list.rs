//! LIST: consistent or exact-revision reads of a collection, with label and
//! field selectors and `limit`/`continue` pagination whose pages all come
//! from one revision, as upstream's.

use base64::Engine;
use bytes::Bytes;
use serde_json::{Value, json};

use super::objects;
use super::request::Query;
use super::resources::ResourceType;
use super::selectors::{self, FieldSelector, LabelSelector};
use super::status::ApiError;
use crate::storage::{RangeRequest, Revision, Store};

/// Selectors of a list or watch request.
pub struct Filter {
    labels: Option<LabelSelector>,
    fields: Option<FieldSelector>,
}

impl Filter {
    pub fn from_query(query: &Query) -> Result<Self, ApiError> {
        let labels = query
            .get("labelSelector")
            .map(|s| LabelSelector::parse(s).map_err(|e| ApiError::bad_request(e.to_string())))
            .transpose()?;
        let fields = query
            .get("fieldSelector")
            .map(|s| FieldSelector::parse(s).map_err(|e| ApiError::bad_request(e.to_string())))
            .transpose()?;
        Ok(Filter { labels, fields })
    }

    pub fn is_everything(&self) -> bool {
        self.labels.as_ref().is_none_or(LabelSelector::is_empty)
            && self.fields.as_ref().is_none_or(FieldSelector::is_empty)
    }

    /// Checks that every field the selector names is one this resource
    /// supports, so that a typo is a 400 and not an empty list.
    pub fn check_fields(&self, rt: &ResourceType) -> Result<(), ApiError> {
        match &self.fields {
            Some(fields) => fields
                .validate_for(rt.group, rt.plural)
                .map_err(|e| ApiError::bad_request(e.to_string())),
            None => Ok(()),
        }
    }

    /// Whether stored (served) bytes pass; only what selectors read is
    /// parsed. Bytes that are not a JSON object never pass.
    pub fn matches_stored(&self, rt: &ResourceType, bytes: &[u8]) -> bool {
        self.is_everything()
            || selectors::sparse::parse(bytes).is_some_and(|object| self.matches(rt, &object))
    }

    pub fn matches(&self, rt: &ResourceType, object: &Value) -> bool {
        if let Some(labels) = &self.labels
            && !labels.matches(object.pointer("/metadata/labels").unwrap_or(&Value::Null))
        {
            return false;
        }
        match &self.fields {
            Some(fields) => fields.matches_object(rt.group, rt.plural, object),
            None => true,
        }
    }
}

/// One page of a list, ready to encode.
pub struct Page {
    /// (stored bytes, mod_revision) of each item, in key order.
    pub items: Vec<(Bytes, Revision)>,
    pub revision: Revision,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: Revision,
    start: String,
}

/// Reads one page of `rt` in `namespace` (all namespaces when `None`).
pub async fn read(
    store: &dyn Store,
    rt: &ResourceType,
    namespace: Option<&str>,
    query: &Query,
    filter: &Filter,
) -> Result<Page, ApiError> {
    let prefix = rt.key_prefix(namespace);
    let limit = query
        .number("limit")?
        .filter(|l| *l > 0)
        .map(|l| l as usize);
    let (mut revision, mut start) = match query.get("continue") {
        Some(token) => {
            let token = decode_token(token)?;
            (token.rv, Some(format!("{prefix}{}", token.start)))
        }
        None => (requested_revision(store, query).await?, None),
    };
    let mut page = Page {
        items: Vec::new(),
        revision,
        continue_token: None,
        remaining: None,
    };
    loop {
        // With selectors a page may filter to nothing; read ahead in
        // chunks so a small limit still makes progress.
        let chunk = match (limit, filter.is_everything()) {
            (Some(l), true) => l,
            (Some(l), false) => l.max(256),
            (None, _) => 0,
        };
        let response = store
            .range(RangeRequest {
                prefix: Bytes::from(prefix.clone()),
                start: start.clone().map(Bytes::from),
                limit: chunk,
                revision,
            })
            .await
            .map_err(|e| match e {
                crate::storage::StoreError::Compacted { .. } => ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                ),
                other => ApiError::from_store(other, rt, ""),
            })?;
        revision = response.revision;
        page.revision = revision;
        let mut last_key = None;
        let mut full = false;
        for kv in &response.kvs {
            if full {
                break;
            }
            last_key = Some(kv.key.clone());
            let value = objects::served(rt, kv.value.clone());
            if !filter.matches_stored(rt, &value) {
                continue;
            }
            page.items.push((value, kv.mod_revision));
            if limit.is_some_and(|l| page.items.len() >= l) {
                full = true;
            }
        }
        let scanned_all = last_key.as_ref() == response.kvs.last().map(|kv| &kv.key);
        let more = response.more || !scanned_all;
        if !more {
            return Ok(page);
        }
        let Some(last) = last_key else {
            return Ok(page);
        };
        let mut next = last.to_vec();
        next.push(0);
        if full {
            let relative = String::from_utf8_lossy(&next[prefix.len()..]).into_owned();
            page.continue_token = Some(encode_token(revision, relative));
            if filter.is_everything() {
                page.remaining = Some(response.count.saturating_sub(page.items.len()));
            }
            return Ok(page);
        }
        start = Some(String::from_utf8_lossy(&next).into_owned());
    }
}

/// Encodes a list response without parsing its items.
pub fn encode(rt: &ResourceType, page: &Page) -> Vec<u8> {
    let size: usize = page.items.iter().map(|(b, _)| b.len() + 40).sum();
    let mut out = Vec::with_capacity(size + 256);
    out.extend_from_slice(b"{\"kind\":");
    out.extend_from_slice(
        Value::String(rt.list_kind.to_owned())
            .to_string()
            .as_bytes(),
    );
    out.extend_from_slice(b",\"apiVersion\":");
    out.extend_from_slice(
        Value::String(rt.api_version.to_owned())
            .to_string()
            .as_bytes(),
    );
    out.extend_from_slice(b",\"metadata\":");
    out.extend_from_slice(list_metadata(page).to_string().as_bytes());
    out.extend_from_slice(b",\"items\":[");
    for (i, (stored, revision)) in page.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        objects::write_with_version(&mut out, stored, *revision);
    }
    out.extend_from_slice(b"]}");
    out
}

pub fn list_metadata(page: &Page) -> Value {
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(token) = &page.continue_token {
        meta["continue"] = json!(token);
    }
    if let Some(remaining) = page.remaining {
        meta["remainingItemCount"] = json!(remaining);
    }
    meta
}

/// The revision a list without `continue` reads at: the current one,
/// unless `resourceVersionMatch=Exact` names a past one.
async fn requested_revision(store: &dyn Store, query: &Query) -> Result<Revision, ApiError> {
    let rv = query.get("resourceVersion");
    let parsed = rv
        .map(|v| {
            v.parse::<Revision>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))
        })
        .transpose()?;
    match (query.get("resourceVersionMatch"), parsed) {
        (Some("Exact"), Some(rv)) if rv > 0 => Ok(rv),
        (Some("Exact"), _) => Err(ApiError::bad_request(
            "resourceVersionMatch \"Exact\" requires a non-zero resourceVersion",
        )),
        (Some("NotOlderThan") | None, Some(rv)) if rv > 0 => {
            wait_for_revision(store, rv).await?;
            Ok(0)
        }
        (Some("NotOlderThan") | None, _) => Ok(0),
        (Some(other), _) => Err(ApiError::bad_request(format!(
            "unsupported resourceVersionMatch {other:?}"
        ))),
    }
}

/// A read "not older than" a revision this server has not reached yet
/// waits a little for it (another API server on the same etcd may have
/// written it), then fails as upstream does.
async fn wait_for_revision(store: &dyn Store, wanted: Revision) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let current = store
            .current_revision()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        if current >= wanted {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::timeout(format!(
                "Too large resource version: {wanted}, current: {current}"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn encode_token(rv: Revision, start: String) -> String {
    let token = ContinueToken {
        v: "meta.k8s.io/v1".into(),
        rv,
        start,
    };
    let json = serde_json::to_vec(&token).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE.encode(json)
}

fn decode_token(token: &str) -> Result<ContinueToken, ApiError> {
    let invalid = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(token))
        .map_err(|_| invalid())?;
    let token: ContinueToken = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if token.v != "meta.k8s.io/v1" || token.rv <= 0 || token.start.contains("..") {
        return Err(invalid());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let token = encode_token(42, "default/web\u{0}".into());
        let back = decode_token(&token).unwrap();
        assert_eq!(back.rv, 42);
        assert_eq!(back.start, "default/web\u{0}");
        assert!(decode_token("not base64!").is_err());
        assert!(decode_token(&base64::engine::general_purpose::URL_SAFE.encode("{}")).is_err());
    }
}
