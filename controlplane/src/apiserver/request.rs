//! What a request asks for: the resource path, the query parameters, and
//! the body decoded from the media type it came in.

use std::collections::HashMap;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::resources::{Registry, ResourceType, Subresource};
use super::status::ApiError;

/// Request bodies larger than this are refused with 413 (upstream's limit
/// for most requests is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// A parsed resource path such as
/// `/apis/apps/v1/namespaces/default/deployments/web/scale`.
#[derive(Clone)]
pub struct Target {
    pub rt: &'static ResourceType,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<Subresource>,
}

/// The answer to "what does this path name?".
pub enum Route {
    /// `/api/v1/...` or `/apis/g/v/...` naming a resource.
    Resource(Target),
    /// `/apis/g/v` or `/api/v1`: the group-version's resource list.
    GroupVersion { group: String, version: String },
}

/// Parses the path of a resource request. `None` when it names nothing
/// this server serves.
pub fn route(registry: &'static Registry, path: &str) -> Result<Option<Route>, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Ok(None),
    };
    if rest.is_empty() {
        return Ok(Some(Route::GroupVersion {
            group: group.to_owned(),
            version: version.to_owned(),
        }));
    }
    // `namespaces/<ns>/<plural>...` addresses namespaced resources; but
    // `namespaces/<name>[/status|/finalize]` is the Namespace itself.
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..]
            if registry
                .get(group, version, plural)
                .is_some_and(|rt| rt.namespaced) =>
        {
            (Some(*ns), {
                let mut r = vec![*plural];
                r.extend_from_slice(rest);
                r
            })
        }
        other => (None, other.to_vec()),
    };
    let Some(rt) = registry.get(group, version, rest[0]) else {
        return Ok(None);
    };
    let name = rest.get(1).map(|s| (*s).to_owned());
    let subresource = match rest.get(2) {
        None => None,
        Some(sub) => match rt.subresources.iter().find(|s| s.name() == *sub) {
            Some(s) => Some(*s),
            None => return Ok(None),
        },
    };
    if rest.len() > 3 && subresource != Some(Subresource::Proxy) {
        return Ok(None);
    }
    if let Some(ns) = namespace {
        check_path_name(ns)?;
    }
    if let Some(name) = &name {
        check_path_name(name)?;
    }
    Ok(Some(Route::Resource(Target {
        rt,
        namespace: namespace.map(str::to_owned),
        name,
        subresource,
    })))
}

/// Query parameters, raw. Values are parsed where they are used, so a bad
/// value is reported against its own name.
#[derive(Default)]
pub struct Query {
    params: HashMap<String, String>,
}

impl Query {
    pub fn parse(query: Option<&str>) -> Self {
        let params = query
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Query { params }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some("1") | Some("true") | Some("True") => Ok(true),
            Some("0") | Some("false") | Some("False") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid value {other:?} for query parameter {name}"
            ))),
        }
    }

    pub fn number(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid value {v:?} for query parameter {name}"))
                })
            })
            .transpose()
    }

    /// `dryRun=All` (the only value upstream accepts).
    pub fn dry_run(&self) -> Result<bool, ApiError> {
        match self.get("dryRun") {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "Invalid dryRun value {other:?}: supported values: \"All\""
            ))),
        }
    }

    pub fn field_validation(&self) -> Result<FieldValidation, ApiError> {
        match self.get("fieldValidation") {
            None | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other:?}"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

/// Body media types the server reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Yaml,
    Protobuf,
}

impl BodyFormat {
    pub fn of(headers: &HeaderMap) -> Result<Self, ApiError> {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json");
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/json" | "" | "*/*" => Ok(BodyFormat::Json),
            "application/yaml" => Ok(BodyFormat::Yaml),
            super::protobuf::CONTENT_TYPE => Ok(BodyFormat::Protobuf),
            _ => Err(ApiError::unsupported_media_type(content_type)),
        }
    }
}

/// Decodes a body into a JSON object.
pub fn decode_body(format: BodyFormat, body: &Bytes) -> Result<Value, ApiError> {
    let value: Value = match format {
        BodyFormat::Json => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON in request body: {e}")))?,
        BodyFormat::Yaml => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request("YAML request body is not UTF-8"))?;
            super::yaml::parse(text)?
        }
        BodyFormat::Protobuf => {
            let decoded =
                super::protobuf::decode(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
            // Field numbers this server's types do not have: say so rather
            // than drop them silently.
            if let Some(unknown) = decoded.unknown_fields.first() {
                return Err(ApiError::bad_request(format!(
                    "protobuf body has fields this server does not know: {unknown}"
                )));
            }
            decoded.object
        }
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// What the response may be: JSON, a Table rendering of it, or only the
/// objects' metadata (`PartialObjectMetadata`, as metadata-only clients
/// such as garbage collectors ask for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Json,
    Table,
    Metadata,
}

impl Answer {
    pub fn of(headers: &HeaderMap) -> Result<Self, ApiError> {
        let accept = headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("*/*");
        let mut json_ok = false;
        for option in accept.split(',') {
            let mut parts = option.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let params: Vec<&str> = parts.collect();
            let as_param = params
                .iter()
                .find_map(|p| p.replace(' ', "").strip_prefix("as=").map(str::to_owned));
            let json_like = matches!(media, "application/json" | "application/*" | "*/*");
            match as_param.as_deref() {
                Some("Table") if json_like => return Ok(Answer::Table),
                Some("PartialObjectMetadata" | "PartialObjectMetadataList") if json_like => {
                    return Ok(Answer::Metadata);
                }
                _ => {}
            }
            match media {
                "application/json" | "application/*" | "*/*" | "application/yaml"
                    if params.iter().all(|p| !p.starts_with("as=")) =>
                {
                    json_ok = true;
                }
                // Protobuf is offered by clients that also take JSON.
                _ => {}
            }
        }
        if json_ok {
            Ok(Answer::Json)
        } else {
            Err(ApiError::not_acceptable(accept))
        }
    }
}

/// Names in paths must be usable as store key segments.
fn check_path_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('%') {
        return Err(ApiError::bad_request(format!(
            "invalid name {name:?} in path"
        )));
    }
    Ok(())
}
