//! The REST verbs on resources: create, get, list, update, patch, delete
//! and deletecollection, with their subresources (`status`, `scale`,
//! `binding`, `eviction`). Watches are in [`super::watch`].

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

use super::objects::{self, metadata_mut, name_of};
use super::request::{Answer, BodyFormat, FieldValidation, Query, Target, decode_body};
use super::resources::{ResourceType, Subresource};
use super::status::{ApiError, Cause, success};
use super::{ApiState, apply, list, service_accounts, services, strategy, validation, watch};
use crate::storage::{KeyValue, StoreError};

/// How often an update that lost a race is retried from a fresh read
/// before giving up (only for writes that did not name a resourceVersion).
const UPDATE_RETRIES: usize = 8;

/// A response plus the warnings to send as `Warning` headers.
pub struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    warnings: Vec<String>,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(http::header::CONTENT_TYPE, "application/json")],
            self.body,
        )
            .into_response();
        for warning in self.warnings {
            let text = format!("299 - {:?}", warning);
            if let Ok(value) = HeaderValue::from_str(&text) {
                response.headers_mut().append(http::header::WARNING, value);
            }
        }
        response
    }
}

impl Reply {
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    fn json(status: StatusCode, body: Vec<u8>) -> Self {
        Reply {
            status,
            body,
            warnings: Vec::new(),
        }
    }

    pub fn value(status: StatusCode, value: &Value) -> Self {
        Reply::json(status, value.to_string().into_bytes())
    }
}

/// Dispatches a request for a resource by method and path shape.
pub async fn serve(
    state: Arc<ApiState>,
    target: Target,
    method: Method,
    headers: &HeaderMap,
    query: Query,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rt = target.rt;
    let ns = target.namespace.as_deref();
    if rt.namespaced && ns.is_none() && target.name.is_some() {
        return Err(ApiError::no_route(
            "a namespaced object needs its namespace in the path",
        ));
    }
    let answer = Answer::of(headers)?;
    let reply = match (&method, target.name.as_deref(), target.subresource) {
        (&Method::GET, None, None) if query.flag("watch")? => {
            return watch::serve(state, rt, ns, &query, answer).await;
        }
        (&Method::GET, None, None) => list(&state, rt, ns, &query, answer).await?,
        (&Method::POST, None, None) => create(&state, rt, ns, headers, &query, body).await?,
        (&Method::DELETE, None, None) => delete_collection(&state, rt, ns, &query).await?,
        (&Method::GET, Some(name), None | Some(Subresource::Status)) => {
            get(&state, rt, ns, name, answer).await?
        }
        (
            &Method::PUT,
            Some(name),
            sub @ (None | Some(Subresource::Status | Subresource::Finalize)),
        ) => update(&state, rt, ns, name, sub, headers, &query, body).await?,
        (&Method::PATCH, Some(name), sub @ (None | Some(Subresource::Status))) => {
            patch(&state, rt, ns, name, sub, headers, &query, body).await?
        }
        (&Method::DELETE, Some(name), None) => delete(&state, rt, ns, name, &query, body).await?,
        (_, Some(name), Some(Subresource::Scale)) => {
            super::scale::serve(&state, rt, ns, name, &method, headers, &query, body).await?
        }
        (&Method::POST, Some(name), Some(Subresource::Binding)) => {
            bind(&state, rt, ns, name, headers, body).await?
        }
        (&Method::POST, Some(name), Some(Subresource::Eviction)) => {
            evict(&state, rt, ns, name, headers, body).await?
        }
        (&Method::POST, Some(name), Some(Subresource::Token)) => {
            service_accounts::token_request(&state, ns, name, headers, body).await?
        }
        (_, Some(_), Some(sub)) => {
            return Err(ApiError::method_not_allowed(format!(
                "{} on {}/{} is not supported yet",
                method,
                rt.plural,
                sub.name()
            )));
        }
        _ => {
            return Err(ApiError::method_not_allowed(format!(
                "method {method} is not allowed on this path"
            )));
        }
    };
    Ok(reply.into_response())
}

async fn get(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    answer: Answer,
) -> Result<Reply, ApiError> {
    let kv = read(state, rt, ns, name).await?;
    match answer {
        Answer::Json => Ok(Reply::json(
            StatusCode::OK,
            objects::with_version(&kv.value, kv.mod_revision),
        )),
        Answer::Table => {
            let object = objects::decode(&kv.value, kv.mod_revision)?;
            let table = super::table_for(rt, &[object], &Query::default())?;
            Ok(Reply::value(StatusCode::OK, &table))
        }
        Answer::Metadata => {
            let mut body = Vec::with_capacity(kv.value.len() / 2);
            objects::write_partial_metadata(&mut body, &kv.value, kv.mod_revision)?;
            Ok(Reply::json(StatusCode::OK, body))
        }
    }
}

async fn list(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    query: &Query,
    answer: Answer,
) -> Result<Reply, ApiError> {
    let filter = list::Filter::from_query(query)?;
    filter.check_fields(rt)?;
    let page = list::read(state.store.as_ref(), rt, ns, query, &filter).await?;
    match answer {
        Answer::Json => Ok(Reply::json(StatusCode::OK, list::encode(rt, &page))),
        Answer::Table => {
            let objects = page
                .items
                .iter()
                .map(|(bytes, rev)| objects::decode(bytes, *rev))
                .collect::<Result<Vec<_>, _>>()?;
            let mut table = super::table_for(rt, &objects, query)?;
            table["metadata"] = list::list_metadata(&page);
            Ok(Reply::value(StatusCode::OK, &table))
        }
        Answer::Metadata => {
            let mut body = Vec::with_capacity(1024 + page.items.len() * 512);
            body.extend_from_slice(
                b"{\"kind\":\"PartialObjectMetadataList\",\"apiVersion\":\"meta.k8s.io/v1\",\"metadata\":",
            );
            body.extend_from_slice(list::list_metadata(&page).to_string().as_bytes());
            body.extend_from_slice(b",\"items\":[");
            for (i, (bytes, rev)) in page.items.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                objects::write_partial_metadata(&mut body, bytes, *rev)?;
            }
            body.extend_from_slice(b"]}");
            Ok(Reply::json(StatusCode::OK, body))
        }
    }
}

/// Creates an object on the server's own behalf (bootstrap objects).
pub async fn create_internal(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    body: Bytes,
) -> Result<(), ApiError> {
    create(state, rt, ns, &HeaderMap::new(), &Query::default(), body)
        .await
        .map(|_| ())
}

async fn create(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    headers: &HeaderMap,
    query: &Query,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let manager = field_manager(headers, query)?;
    let mut object = decode_body(BodyFormat::of(headers)?, &body)?;
    check_type_meta(rt, &mut object)?;
    place_in_namespace(rt, ns, &mut object)?;
    generate_name(&mut object);
    let warnings = check_fields(rt, &mut object, query.field_validation()?)?;
    create_object(state, rt, ns, object, query, Some(&manager), warnings).await
}

/// Stores a new object: server-owned fields, defaults, ownership (unless
/// server-side apply already recorded it), validation, allocation.
async fn create_object(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    mut object: Value,
    query: &Query,
    manager: Option<&str>,
    mut warnings: Vec<String>,
) -> Result<Reply, ApiError> {
    let now = super::now();
    strategy::prepare_create(rt, &mut object, uuid::Uuid::new_v4().to_string(), &now);
    if let Some(manager) = manager {
        apply::record_update(kind_of(rt), None, &mut object, manager, &now);
    }
    if (rt.group, rt.plural) == ("", "pods") {
        service_accounts::admit_pod(state, &mut object).await?;
    }
    let name = name_of(&object).to_owned();
    let causes = strategy::validate(rt, &object);
    if !causes.is_empty() {
        return Err(ApiError::invalid(rt, &name, causes));
    }
    if let Some(ns) = ns {
        check_namespace_open(state, ns).await?;
    }
    let dry_run = query.dry_run()?;
    let allocated = services::allocate(state, rt, &mut object, None, dry_run).await?;
    if dry_run {
        let mut reply = Reply::value(StatusCode::CREATED, &object);
        reply.warnings.append(&mut warnings);
        return Ok(reply);
    }
    let stored = objects::encode_for(rt, &object)?;
    let key = rt.key(ns, &name);
    match state
        .store
        .create(key.as_bytes(), Bytes::from(stored))
        .await
    {
        Ok(kv) => {
            let mut reply = Reply::json(
                StatusCode::CREATED,
                objects::served_with_version(rt, kv.value, kv.mod_revision),
            );
            reply.warnings = warnings;
            Ok(reply)
        }
        Err(e) => {
            services::release(state, &allocated).await;
            Err(ApiError::from_store(e, rt, &name))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn update(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    sub: Option<Subresource>,
    headers: &HeaderMap,
    query: &Query,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let mut object = decode_body(BodyFormat::of(headers)?, &body)?;
    check_type_meta(rt, &mut object)?;
    place_in_namespace(rt, ns, &mut object)?;
    name_from_url(&mut object, name)?;
    let warnings = check_fields(rt, &mut object, query.field_validation()?)?;
    let precondition = resource_version_of(&object)?;
    let dry_run = query.dry_run()?;
    let manager = field_manager(headers, query)?;
    let mut reply = write_update(
        state,
        rt,
        ns,
        name,
        sub,
        precondition,
        dry_run,
        Some(&manager),
        |_| Ok(object.clone()),
    )
    .await?;
    reply.warnings = warnings;
    Ok(reply)
}

#[allow(clippy::too_many_arguments)]
async fn patch(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    sub: Option<Subresource>,
    headers: &HeaderMap,
    query: &Query,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let patch_type = super::patch::PatchType::from_content_type(content_type)
        .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
    if patch_type == super::patch::PatchType::Apply {
        return server_side_apply(state, rt, ns, name, sub, query, body).await;
    }
    let validation_mode = query.field_validation()?;
    let dry_run = query.dry_run()?;
    let manager = field_manager(headers, query)?;
    let mut warnings = Vec::new();
    let reply = write_update(
        state,
        rt,
        ns,
        name,
        sub,
        None,
        dry_run,
        Some(&manager),
        |current| {
            let mut patched = super::patch_object(rt, current, patch_type, &body)?;
            check_type_meta(rt, &mut patched)?;
            warnings = check_fields(rt, &mut patched, validation_mode)?;
            Ok(patched)
        },
    )
    .await?;
    Ok(Reply { warnings, ..reply })
}

/// Read-modify-write of one object: `change` turns the current object into
/// the desired one; server-owned fields are carried over, the result is
/// validated and written with compare-and-swap, retried on a lost race
/// unless the caller named the resourceVersion it expects.
#[allow(clippy::too_many_arguments)]
pub async fn write_update(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    sub: Option<Subresource>,
    precondition: Option<i64>,
    dry_run: bool,
    manager: Option<&str>,
    mut change: impl FnMut(&Value) -> Result<Value, ApiError>,
) -> Result<Reply, ApiError> {
    let key = rt.key(ns, name);
    for _ in 0..UPDATE_RETRIES {
        let current_kv = read(state, rt, ns, name).await?;
        if let Some(expected) = precondition
            && expected != current_kv.mod_revision
        {
            return Err(ApiError::stale(rt, name));
        }
        let current = objects::decode(&current_kv.value, current_kv.mod_revision)?;
        let mut desired = change(&current)?;
        if let Some(patched_rv) = resource_version_of(&desired)?
            && precondition.is_none()
            && patched_rv != current_kv.mod_revision
        {
            return Err(ApiError::stale(rt, name));
        }
        strategy::prepare_update(rt, &mut desired, &current, sub);
        if let Some(manager) = manager {
            let now = super::now();
            match sub {
                Some(sub) => apply::record_subresource_update(
                    kind_of(rt),
                    sub.name(),
                    &current,
                    &mut desired,
                    manager,
                    &now,
                ),
                None => {
                    apply::record_update(kind_of(rt), Some(&current), &mut desired, manager, &now)
                }
            }
        }
        let causes = strategy::validate(rt, &desired);
        if !causes.is_empty() {
            return Err(ApiError::invalid(rt, name, causes));
        }
        if finalized(&desired) {
            // The last finalizer is gone from an object being deleted.
            if dry_run {
                return Ok(Reply::value(StatusCode::OK, &desired));
            }
            return match state
                .store
                .delete(key.as_bytes(), Some(current_kv.mod_revision))
                .await
            {
                Ok(_) => {
                    services::release_for(state, rt, &current).await;
                    Ok(Reply::value(StatusCode::OK, &desired))
                }
                Err(StoreError::Conflict { .. }) if precondition.is_none() => continue,
                Err(e) => Err(ApiError::from_store(e, rt, name)),
            };
        }
        let allocations =
            services::allocate(state, rt, &mut desired, Some(&current), dry_run).await?;
        let stored = Bytes::from(objects::encode_for(rt, &desired)?);
        // `current_kv` holds the served shape (see `read`).
        if objects::served(rt, stored.clone()) == current_kv.value || dry_run {
            // Nothing changed: no write, and the resourceVersion stays.
            services::release(state, &allocations).await;
            return Ok(Reply::json(
                StatusCode::OK,
                objects::served_with_version(rt, stored, current_kv.mod_revision),
            ));
        }
        let written = state
            .store
            .update(key.as_bytes(), stored, current_kv.mod_revision)
            .await;
        match written {
            Ok(kv) => {
                services::settle(state, &allocations).await;
                return Ok(Reply::json(
                    StatusCode::OK,
                    objects::served_with_version(rt, kv.value, kv.mod_revision),
                ));
            }
            Err(StoreError::Conflict { .. }) if precondition.is_none() => {
                services::release(state, &allocations).await;
                continue;
            }
            Err(e) => {
                services::release(state, &allocations).await;
                return Err(ApiError::from_store(e, rt, name));
            }
        }
    }
    Err(ApiError::conflict(
        rt,
        name,
        "too many concurrent updates; try again",
    ))
}

async fn delete(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    query: &Query,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let options = DeleteOptions::parse(query, &body)?;
    delete_one(state, rt, ns, name, &options).await
}

async fn delete_collection(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    query: &Query,
) -> Result<Reply, ApiError> {
    let filter = list::Filter::from_query(query)?;
    filter.check_fields(rt)?;
    let options = DeleteOptions::parse(query, &Bytes::new())?;
    let everything = Query::default();
    let page = list::read(state.store.as_ref(), rt, ns, &everything, &filter).await?;
    for (stored, revision) in &page.items {
        let object = objects::decode(stored, *revision)?;
        let object_ns = objects::meta_str(&object, "namespace");
        match delete_one(state, rt, object_ns, name_of(&object), &options).await {
            Ok(_) => {}
            Err(e) if e.reason == "NotFound" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Reply::value(StatusCode::OK, &success()))
}

/// Deletes one object, or marks it for deletion when finalizers (or a
/// graceful pod shutdown) must run first.
async fn delete_one(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    options: &DeleteOptions,
) -> Result<Reply, ApiError> {
    let key = rt.key(ns, name);
    for _ in 0..UPDATE_RETRIES {
        let kv = read(state, rt, ns, name).await?;
        let mut object = objects::decode(&kv.value, kv.mod_revision)?;
        options.check_preconditions(rt, name, &object, kv.mod_revision)?;
        let mut finalizers = finalizers_of(&object);
        match options.propagation.as_deref() {
            Some("Orphan") => add_finalizer(&mut finalizers, "orphan"),
            Some("Foreground") => add_finalizer(&mut finalizers, "foregroundDeletion"),
            Some("Background") | None => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unsupported propagationPolicy {other:?}"
                )));
            }
        }
        let grace = grace_period(rt, &object, options.grace_seconds);
        let already_deleting = object.pointer("/metadata/deletionTimestamp").is_some();
        if finalizers.is_empty() && grace == 0 && spec_finalizers_of(&object).is_empty() {
            if options.dry_run {
                return Ok(Reply::value(StatusCode::OK, &object));
            }
            match state
                .store
                .delete(key.as_bytes(), Some(kv.mod_revision))
                .await
            {
                Ok(deleted) => {
                    services::release_for(state, rt, &object).await;
                    objects::set_resource_version(&mut object, deleted.revision);
                    return Ok(Reply::value(StatusCode::OK, &object));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ApiError::from_store(e, rt, name)),
            }
        }
        // Mark for deletion: finalizers (or the node agent, for a pod's
        // graceful shutdown) finish the job.
        if let Some(meta) = metadata_mut(&mut object) {
            if !already_deleting {
                let at = super::now_plus(grace);
                meta.insert("deletionTimestamp".into(), json!(at));
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            if !finalizers.is_empty() {
                meta.insert("finalizers".into(), json!(finalizers));
            }
        }
        if rt.plural == "namespaces" && rt.group.is_empty() {
            object["status"]["phase"] = json!("Terminating");
        }
        if options.dry_run {
            return Ok(Reply::value(StatusCode::OK, &object));
        }
        let stored = objects::encode_for(rt, &object)?;
        match state
            .store
            .update(key.as_bytes(), Bytes::from(stored), kv.mod_revision)
            .await
        {
            Ok(kv) => {
                let status = if finalizers.is_empty() {
                    StatusCode::OK
                } else {
                    StatusCode::ACCEPTED
                };
                return Ok(Reply::json(
                    status,
                    objects::served_with_version(rt, kv.value, kv.mod_revision),
                ));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(ApiError::from_store(e, rt, name)),
        }
    }
    Err(ApiError::conflict(
        rt,
        name,
        "too many concurrent updates; try again",
    ))
}

/// `pods/binding`: assigns a pod to a node, once.
async fn bind(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let binding = decode_body(BodyFormat::of(headers)?, &body)?;
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::invalid(rt, name, vec![Cause::required("target.name")]))?
        .to_owned();
    let key = rt.key(ns, name);
    for _ in 0..UPDATE_RETRIES {
        let kv = read(state, rt, ns, name).await?;
        let mut pod = objects::decode(&kv.value, kv.mod_revision)?;
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::conflict(
                rt,
                name,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        if let Some(current) = pod.pointer("/spec/nodeName").and_then(Value::as_str)
            && !current.is_empty()
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!("pod {name} is already assigned to node {current:?}"),
            ));
        }
        pod["spec"]["nodeName"] = json!(node);
        let conditions = pod["status"]
            .as_object_mut()
            .map(|s| s.entry("conditions").or_insert_with(|| json!([])));
        if let Some(Value::Array(conditions)) = conditions {
            conditions.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
            conditions.push(json!({
                "type": "PodScheduled", "status": "True",
                "lastProbeTime": null, "lastTransitionTime": super::now()
            }));
        }
        let stored = objects::encode_for(rt, &pod)?;
        match state
            .store
            .update(key.as_bytes(), Bytes::from(stored), kv.mod_revision)
            .await
        {
            Ok(_) => {
                return Ok(Reply::value(
                    StatusCode::CREATED,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                ));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(ApiError::from_store(e, rt, name)),
        }
    }
    Err(ApiError::conflict(
        rt,
        name,
        "too many concurrent updates; try again",
    ))
}

/// `pods/eviction`: a delete that a PodDisruptionBudget could refuse (no
/// budgets are enforced yet: every eviction is allowed).
async fn evict(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let eviction = decode_body(BodyFormat::of(headers)?, &body)?;
    let options = match eviction.get("deleteOptions") {
        Some(opts) => DeleteOptions::from_value(opts)?,
        None => DeleteOptions::default(),
    };
    delete_one(state, rt, ns, name, &options).await?;
    Ok(Reply::value(
        StatusCode::CREATED,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// What DELETE was asked to do, from the query and/or a DeleteOptions body.
#[derive(Default)]
struct DeleteOptions {
    propagation: Option<String>,
    grace_seconds: Option<i64>,
    dry_run: bool,
    uid: Option<String>,
    resource_version: Option<String>,
}

impl DeleteOptions {
    fn parse(query: &Query, body: &Bytes) -> Result<Self, ApiError> {
        let mut options = if body.is_empty() {
            DeleteOptions::default()
        } else {
            let value: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?;
            DeleteOptions::from_value(&value)?
        };
        if let Some(p) = query.get("propagationPolicy") {
            options.propagation = Some(p.to_owned());
        }
        if let Some(g) = query.number("gracePeriodSeconds")? {
            options.grace_seconds = Some(g);
        }
        if query.dry_run()? {
            options.dry_run = true;
        }
        Ok(options)
    }

    fn from_value(value: &Value) -> Result<Self, ApiError> {
        let typed: k8s_openapi::apimachinery::pkg::apis::meta::v1::DeleteOptions =
            serde_json::from_value(value.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?;
        let mut propagation = typed.propagation_policy;
        if propagation.is_none() {
            propagation = match typed.orphan_dependents {
                Some(true) => Some("Orphan".into()),
                Some(false) => Some("Background".into()),
                None => None,
            };
        }
        let preconditions = typed.preconditions.unwrap_or_default();
        Ok(DeleteOptions {
            propagation,
            grace_seconds: typed.grace_period_seconds,
            dry_run: typed.dry_run.is_some_and(|d| d.iter().any(|x| x == "All")),
            uid: preconditions.uid,
            resource_version: preconditions.resource_version,
        })
    }

    fn check_preconditions(
        &self,
        rt: &ResourceType,
        name: &str,
        object: &Value,
        revision: i64,
    ) -> Result<(), ApiError> {
        if let Some(uid) = &self.uid
            && objects::meta_str(object, "uid") != Some(uid)
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    objects::meta_str(object, "uid").unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = &self.resource_version
            && rv != &revision.to_string()
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {revision}"
                ),
            ));
        }
        Ok(())
    }
}

/// Seconds a deleted object waits before it is removed: only pods bound
/// to a node shut down gracefully (their agent removes them).
fn grace_period(rt: &ResourceType, object: &Value, requested: Option<i64>) -> i64 {
    if !(rt.group.is_empty() && rt.plural == "pods") {
        return 0;
    }
    let bound = object
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let finished = matches!(
        object.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if !bound || finished {
        return 0;
    }
    requested
        .or_else(|| {
            object
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30)
        .max(0)
}

fn finalizers_of(object: &Value) -> Vec<String> {
    strings_at(object, "/metadata/finalizers")
}

/// The strings of the JSON array at `pointer`, if any.
fn strings_at(object: &Value, pointer: &str) -> Vec<String> {
    object
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn add_finalizer(finalizers: &mut Vec<String>, finalizer: &str) {
    if !finalizers.iter().any(|f| f == finalizer) {
        finalizers.push(finalizer.to_owned());
    }
}

/// A namespace's own finalizers (`spec.finalizers`), which the namespace
/// controller removes once the namespace is empty.
fn spec_finalizers_of(object: &Value) -> Vec<String> {
    if object.get("kind").and_then(Value::as_str) != Some("Namespace") {
        return Vec::new();
    }
    strings_at(object, "/spec/finalizers")
}

/// An object being deleted whose finalizers are all gone is removed.
fn finalized(object: &Value) -> bool {
    object.pointer("/metadata/deletionTimestamp").is_some()
        && finalizers_of(object).is_empty()
        && spec_finalizers_of(object).is_empty()
        && object
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .is_none_or(|g| g == 0)
}

pub async fn read(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
) -> Result<KeyValue, ApiError> {
    let key = rt.key(ns, name);
    let mut kv = state
        .store
        .get(key.as_bytes())
        .await
        .map_err(|e| ApiError::from_store(e, rt, name))?
        .ok_or_else(|| ApiError::not_found(rt, name))?;
    kv.value = objects::served(rt, kv.value);
    Ok(kv)
}

/// `apiVersion` and `kind` must name this resource; absent ones are set.
fn check_type_meta(rt: &ResourceType, object: &mut Value) -> Result<(), ApiError> {
    let Some(map) = object.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    match map.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("apiVersion".into(), json!(rt.api_version));
        }
        Some(v) if v == rt.api_version => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                rt.api_version
            )));
        }
    }
    match map.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("kind".into(), json!(rt.kind));
        }
        Some(k) if k == rt.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
    }
    Ok(())
}

fn place_in_namespace(
    rt: &ResourceType,
    ns: Option<&str>,
    object: &mut Value,
) -> Result<(), ApiError> {
    let meta = metadata_mut(object)
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    let body_ns = meta
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    match (rt.namespaced, ns, body_ns) {
        (true, Some(path), Some(body)) if path != body => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        (true, Some(path), _) => {
            meta.insert("namespace".into(), json!(path));
            Ok(())
        }
        (true, None, _) => Err(ApiError::bad_request(
            "a namespaced object must be created in a namespace path",
        )),
        (false, _, _) => {
            meta.remove("namespace");
            Ok(())
        }
    }
}

/// `generateName`: a random suffix of five characters from upstream's
/// alphabet (no vowels, so no words).
fn generate_name(object: &mut Value) {
    let Some(meta) = metadata_mut(object) else {
        return;
    };
    let has_name = meta
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let Some(prefix) = meta.get("generateName").and_then(Value::as_str) else {
        return;
    };
    if has_name {
        return;
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut random = [0u8; 5];
    if getrandom::fill(&mut random).is_err() {
        random = uuid::Uuid::new_v4().as_bytes()[..5]
            .try_into()
            .unwrap_or([0; 5]);
    }
    let suffix: String = random
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    let mut prefix = prefix.to_owned();
    prefix.truncate(253 - 5);
    meta.insert("name".into(), json!(format!("{prefix}{suffix}")));
}

/// Type-checks against the kind's struct and handles unknown fields as
/// `fieldValidation` says: Strict refuses them, Warn reports them, and in
/// every case they are not stored.
fn check_fields(
    rt: &ResourceType,
    object: &mut Value,
    mode: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let not_this_kind = |e: serde_json::Error| {
        ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: {e}",
            rt.kind, rt.version, rt.kind
        ))
    };
    let mut unknown = Vec::new();
    (rt.typed_check)(object, &mut |path| {
        unknown.extend(validation::unknown_field(object, &path));
    })
    .map_err(not_this_kind)?;
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let messages: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect();
    match mode {
        FieldValidation::Strict => Err(ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
            rt.kind,
            rt.version,
            rt.kind,
            messages.join(", ")
        ))),
        FieldValidation::Warn => {
            *object = (rt.typed_round_trip)(object).map_err(not_this_kind)?;
            Ok(messages)
        }
        FieldValidation::Ignore => {
            *object = (rt.typed_round_trip)(object).map_err(not_this_kind)?;
            Ok(Vec::new())
        }
    }
}

fn resource_version_of(object: &Value) -> Result<Option<i64>, ApiError> {
    match objects::meta_str(object, "resourceVersion") {
        None | Some("") => Ok(None),
        Some(rv) => rv
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))),
    }
}

/// New objects may not be created in a namespace that is missing or
/// being deleted.
async fn check_namespace_open(state: &ApiState, ns: &str) -> Result<(), ApiError> {
    let namespaces = state
        .registry
        .get("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("namespaces are not served"))?;
    /// Only what this check reads: every create in a namespace runs it,
    /// and the rest of the namespace (managedFields) need not be built.
    #[derive(serde::Deserialize)]
    struct Namespace {
        #[serde(default)]
        metadata: Metadata,
    }
    #[derive(Default, serde::Deserialize)]
    struct Metadata {
        #[serde(rename = "deletionTimestamp", default)]
        deletion_timestamp: Option<serde::de::IgnoredAny>,
    }
    let kv = read(state, namespaces, None, ns).await?;
    let object: Namespace = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("stored namespace: {e}")))?;
    if object.metadata.deletion_timestamp.is_some() {
        return Err(ApiError::forbidden(format!(
            "unable to create new content in namespace {ns} because it is being terminated"
        )));
    }
    Ok(())
}

/// `kubectl apply --server-side`: the applied configuration is merged by
/// field ownership; an absent object is created from it.
async fn server_side_apply(
    state: &ApiState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    sub: Option<Subresource>,
    query: &Query,
    body: Bytes,
) -> Result<Reply, ApiError> {
    let manager = query
        .get("fieldManager")
        .ok_or_else(|| {
            ApiError::bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            )
        })?
        .to_owned();
    apply::validate_manager(&manager, true).map_err(apply_error)?;
    let force = query.flag("force")?;
    let dry_run = query.dry_run()?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("apply body is not UTF-8"))?;
    let mut applied = super::yaml::parse(text)?;
    if !applied.is_object() {
        return Err(ApiError::bad_request("the apply body must be an object"));
    }
    check_type_meta(rt, &mut applied)?;
    place_in_namespace(rt, ns, &mut applied)?;
    name_from_url(&mut applied, name)?;
    let warnings = check_fields(rt, &mut applied, query.field_validation()?)?;
    let precondition = resource_version_of(&applied)?;
    let now = super::now();
    match read(state, rt, ns, name).await {
        Err(e) if e.reason == "NotFound" && sub.is_none() => {
            let object = apply::apply(kind_of(rt), None, &applied, &manager, force, &now)
                .map_err(apply_error)?;
            create_object(state, rt, ns, object, query, None, warnings).await
        }
        Err(e) => Err(e),
        Ok(_) => {
            let mut reply = write_update(
                state,
                rt,
                ns,
                name,
                sub,
                precondition,
                dry_run,
                None,
                |current| {
                    apply::apply(kind_of(rt), Some(current), &applied, &manager, force, &now)
                        .map_err(apply_error)
                },
            )
            .await?;
            reply.warnings = warnings;
            Ok(reply)
        }
    }
}

/// A body for `.../<name>` names that object, or takes the name from the
/// URL when it names none.
fn name_from_url(object: &mut Value, name: &str) -> Result<(), ApiError> {
    match name_of(object) {
        "" => {
            if let Some(meta) = metadata_mut(object) {
                meta.insert("name".into(), json!(name));
            }
            Ok(())
        }
        body_name if body_name != name => Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        ))),
        _ => Ok(()),
    }
}

/// The field manager of a write: `?fieldManager=`, or upstream's default
/// from the User-Agent.
fn field_manager(headers: &HeaderMap, query: &Query) -> Result<String, ApiError> {
    let manager = match query.get("fieldManager") {
        Some(m) => m.to_owned(),
        None => apply::default_manager(
            headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok()),
        ),
    };
    apply::validate_manager(&manager, false).map_err(apply_error)?;
    Ok(manager)
}

fn kind_of(rt: &ResourceType) -> apply::KindRef<'static> {
    apply::KindRef::new(rt.group, rt.kind)
}

fn apply_error(error: apply::ApplyError) -> ApiError {
    let code = StatusCode::from_u16(error.status_code()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut api_error = ApiError::new(code, error.reason(), error.to_string());
    if let apply::ApplyError::Conflict { conflicts } = &error {
        api_error.details = Some(Box::new(super::status::Details {
            causes: conflicts
                .iter()
                .map(|c| Cause {
                    reason: apply::CONFLICT_CAUSE,
                    message: c.message(),
                    field: c.field.clone(),
                })
                .collect(),
            ..Default::default()
        }));
    }
    api_error
}
