//! FHIR REST interactions on single resources and types: create, read, vread, update, delete,
//! history and search, plus the Patient compartment and `$everything`.
//!
//! Writes are validated and their references checked before the command reaches the writer;
//! the writer checks versions and references again when it plans the events, so a race between
//! two clients cannot slip a stale or dangling write through.

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chartlog_projections::VersionRecord;
use serde_json::{Map, Value};

use super::access::{open_value, record_access};
use super::{header_text, ApiError, AppState, Caller};
use crate::auth::roles::is_directory_type;
use crate::auth::Action;
use crate::command::state::format_instant;
use crate::command::{ChartTarget, Command, Operation, OperationResult};
use crate::fhir::{compartment, definitions, search, validate};
use crate::writer::WriteOutcome;

/// Default page size of searches and histories.
const DEFAULT_PAGE: usize = 50;

/// Resource types the server does not store: OperationOutcome and Parameters only ever travel
/// in requests and responses.
const NOT_STORED: &[&str] = &["OperationOutcome", "Parameters"];

/// Checks that a resource type from a URL is one this server stores.
pub fn check_type(resource_type: &str) -> Result<(), ApiError> {
    if definitions::is_resource_type(resource_type) && !NOT_STORED.contains(&resource_type) {
        Ok(())
    } else {
        Err(ApiError::not_found_path())
    }
}

/// Checks a logical id from a URL.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "id",
            "invalid resource id; expected 1 to 64 of A-Z, a-z, 0-9, '-' and '.'",
        ))
    }
}

/// Returns what a PUT of `resource_type/id` does: update an existing resource, or create one
/// under a client-chosen id.
pub fn put_action(state: &AppState, resource_type: &str, id: &str) -> Action {
    let exists = state
        .writer
        .state()
        .read()
        .expect("writer state lock is not poisoned")
        .resource(resource_type, id)
        .is_some();
    if exists {
        Action::Update
    } else {
        Action::Create
    }
}

/// Checks that the caller may perform `action` on the type of every contained resource, so a
/// resource cannot carry in content its writer may not create.
pub fn check_contained(caller: &Caller, action: Action, resource: &Value) -> Result<(), ApiError> {
    let contained = resource.get("contained").and_then(Value::as_array);
    for inner in contained.into_iter().flatten() {
        if let Some(resource_type) = inner.get("resourceType").and_then(Value::as_str) {
            caller.require(action, resource_type)?;
        }
    }
    Ok(())
}

/// Removes contained resources of types the caller may not read, and marks a resource that
/// lost any with the `REDACTED` security label, so roles see no more through `contained` than
/// through their own reads.
pub fn redact_contained(caller: &Caller, resource: &mut Value) {
    let Some(contained) = resource.get_mut("contained").and_then(Value::as_array_mut) else {
        return;
    };
    let before = contained.len();
    contained.retain(|inner| {
        inner
            .get("resourceType")
            .and_then(Value::as_str)
            .is_some_and(|resource_type| caller.principal.may(Action::Read, resource_type))
    });
    if contained.len() == before {
        return;
    }
    if contained.is_empty() {
        resource
            .as_object_mut()
            .map(|object| object.remove("contained"));
    }
    let label = serde_json::json!({
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "REDACTED",
    });
    if let Some(object) = resource.as_object_mut() {
        let meta = object
            .entry("meta")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(meta) = meta.as_object_mut() {
            let security = meta
                .entry("security")
                .or_insert_with(|| serde_json::json!([]));
            if let Some(labels) = security.as_array_mut() {
                labels.push(label);
            }
        }
    }
}

/// Opens a stored version as JSON with the caller's redactions applied.
fn open_for(state: &AppState, caller: &Caller, record: &VersionRecord) -> Result<Value, ApiError> {
    let mut value = open_value(state, record)?;
    redact_contained(caller, &mut value);
    Ok(value)
}

/// Checks that a request body is declared as FHIR JSON (or plain JSON) when its type is given.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = header_text(headers, "content-type") else {
        return Ok(());
    };
    let media_type = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if [
        "application/fhir+json",
        "application/json",
        "application/json+fhir",
    ]
    .contains(&media_type.as_str())
    {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type())
    }
}

/// Parses a request body as JSON, keeping decimals and element order exactly as sent.
pub fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::malformed_json(
            "request body is empty; expected a FHIR JSON resource",
        ));
    }
    let value = serde_json::from_slice(body).map_err(|error| {
        // serde_json stops at 128 levels of arrays and objects, deeper than FHIR resources
        // nest in practice, and reports it as a syntax error.
        let problem = if error.to_string().starts_with("recursion limit exceeded") {
            "nests arrays and objects more than 128 levels deep"
        } else {
            "is not valid JSON"
        };
        ApiError::malformed_json(format!(
            "request body {problem} (line {}, column {})",
            error.line(),
            error.column()
        ))
    })?;
    super::json::check_no_duplicate_keys(body).map_err(|error| {
        ApiError::malformed_json(format!(
            "request body repeats a property name in one object (line {}, column {})",
            error.line(),
            error.column()
        ))
    })?;
    Ok(value)
}

/// A resource ready to become a Record operation.
pub struct Prepared {
    /// The resource with server-owned meta removed.
    pub resource: Map<String, Value>,
    /// The chart it belongs to.
    pub chart: ChartTarget,
    /// Local resources it refers to.
    pub references: Vec<(String, String)>,
}

/// Parses `Type/id` or `Type/id/_history/v`, relative or under this server's base URL.
/// Returns `None` for references that are not literal local references.
pub fn parse_local_reference(base_url: &str, reference: &str) -> Option<(String, String)> {
    let relative = reference
        .strip_prefix(base_url)
        .map(|rest| rest.trim_start_matches('/'))
        .unwrap_or(reference);
    if relative.contains("://") || relative.starts_with("urn:") || relative.starts_with('#') {
        return None;
    }
    let mut parts = relative.split('/');
    let resource_type = parts.next()?;
    let id = parts.next()?;
    let rest: Vec<&str> = parts.collect();
    let well_formed = rest.is_empty() || (rest.len() == 2 && rest[0] == "_history");
    if !well_formed || !definitions::is_resource_type(resource_type) || id.is_empty() {
        return None;
    }
    Some((resource_type.to_owned(), id.to_owned()))
}

/// Validates a resource and works out its chart and local references.
///
/// `created` lists resources created by the same command; references to them are not checked
/// against the store.
///
/// # Errors
///
/// 400 for a wrong resourceType or invalid content, 422 for references that cannot be
/// resolved or point at several patients.
pub fn prepare(
    state: &AppState,
    resource_type: &str,
    id: &str,
    value: Value,
    created: &HashSet<(String, String)>,
) -> Result<Prepared, ApiError> {
    let Value::Object(resource) = value else {
        return Err(ApiError::invalid(
            "resourceType",
            "expected a JSON object holding a FHIR resource",
        ));
    };
    match resource.get("resourceType") {
        Some(Value::String(found)) if found == resource_type => {}
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(
                "resourceType",
                format!("resourceType does not match the endpoint's type {resource_type}"),
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "resourceType",
                "missing or invalid resourceType",
            ))
        }
    }

    // The resource is validated as sent, so an invalid id or meta is rejected even where the
    // server replaces it. Then server-owned elements are replaced: the id comes from the URL or
    // the server, and the version and timestamp from the writer.
    let sent = Value::Object(resource);
    validate::validate_resource(&sent).map_err(ApiError::from_validation)?;
    let Value::Object(mut resource) = sent else {
        unreachable!("checked to be an object above")
    };
    resource.insert("id".into(), Value::String(id.to_owned()));
    if let Some(Value::Object(meta)) = resource.get_mut("meta") {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            resource.remove("meta");
        }
    }
    let value = Value::Object(resource);

    let mut references = Vec::new();
    // A stored Bundle (a document or a collection) carries references that belong to its
    // entries' own context, so they are kept as given and not resolved here.
    let checked_references = if resource_type == "Bundle" {
        Vec::new()
    } else {
        compartment::references(&value)
    };
    let writer_state = state
        .writer
        .state()
        .read()
        .expect("writer state lock is not poisoned");
    for (path, reference) in checked_references {
        if reference.starts_with('#') {
            continue;
        }
        if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
            return Err(ApiError::unprocessable(
                "not-found",
                Some(&path),
                "urn references resolve only inside a transaction Bundle",
            ));
        }
        if reference.contains('?') {
            return Err(ApiError::unprocessable(
                "not-supported",
                Some(&path),
                "conditional references resolve only inside a transaction Bundle",
            ));
        }
        let Some((target_type, target_id)) = parse_local_reference(&state.base_url, &reference)
        else {
            if !reference.contains("://") {
                return Err(ApiError::unprocessable(
                    "invalid",
                    Some(&path),
                    "reference is neither Type/id, an absolute URL nor a contained #id",
                ));
            }
            // NOTE: absolute references to other servers are stored as given and never
            // resolved; the CapabilityStatement declares this.
            continue;
        };
        let key = (target_type.clone(), target_id.clone());
        let is_self = target_type == resource_type && target_id == id;
        if !is_self && !created.contains(&key) {
            if !writer_state.is_live(&target_type, &target_id) {
                return Err(ApiError::unprocessable(
                    "not-found",
                    Some(&path),
                    format!("reference points to {target_type}/{target_id}, which does not exist"),
                ));
            }
            references.push(key);
        }
    }
    drop(writer_state);

    let chart = chart_target(state, resource_type, id, &value)?;
    let Value::Object(resource) = value else {
        unreachable!("checked to be an object above")
    };
    Ok(Prepared {
        resource,
        chart,
        references,
    })
}

/// Works out which chart a resource belongs to, by the FHIR R4 Patient compartment.
fn chart_target(
    state: &AppState,
    resource_type: &str,
    id: &str,
    resource: &Value,
) -> Result<ChartTarget, ApiError> {
    if resource_type == "Patient" {
        return Ok(ChartTarget::Patient(id.to_owned()));
    }
    if is_directory_type(resource_type)
        || compartment::patient_compartment_paths(resource_type).is_none()
    {
        return Ok(ChartTarget::Directory);
    }
    let mut patients: Vec<String> = compartment::compartment_patient_refs(resource)
        .iter()
        .filter_map(|reference| parse_local_reference(&state.base_url, reference))
        .filter(|(target_type, _)| target_type == "Patient")
        .map(|(_, patient_id)| patient_id)
        .collect();
    patients.sort();
    patients.dedup();
    match patients.len() {
        0 => Ok(ChartTarget::Directory),
        1 => Ok(ChartTarget::Patient(patients.remove(0))),
        _ => Err(ApiError::unprocessable(
            "business-rule",
            None,
            "the resource refers to more than one patient; a resource belongs to one chart",
        )),
    }
}

/// Parses an `If-Match` header: `W/"3"` or `"3"`.
pub fn parse_if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(text) = header_text(headers, "if-match") else {
        return Ok(None);
    };
    parse_etag(text).map(Some).ok_or_else(|| {
        ApiError::invalid(
            "If-Match",
            "invalid If-Match; expected an ETag such as W/\"3\"",
        )
    })
}

/// Parses an ETag value `W/"3"`, `"3"` or `3`.
pub fn parse_etag(text: &str) -> Option<u64> {
    let text = text.trim();
    let text = text.strip_prefix("W/").unwrap_or(text);
    let digits = match text.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => text,
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("W/\"{version}\"")).expect("an ETag of digits is a valid header")
}

pub(super) fn fhir_json(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    response
}

fn last_modified(last_updated: &str) -> Option<HeaderValue> {
    let parsed =
        time::OffsetDateTime::parse(last_updated, &time::format_description::well_known::Rfc3339)
            .ok()?;
    let text = parsed
        .format(&time::format_description::well_known::Rfc2822)
        .ok()?
        .replace("+0000", "GMT");
    HeaderValue::from_str(&text).ok()
}

/// Builds the response to a completed write with the stored version, as FHIR asks (201 or 200, ETag,
/// Location, Last-Modified), honouring `Prefer: return=minimal`.
async fn write_response(
    state: &AppState,
    headers: &HeaderMap,
    result: &OperationResult,
    body: Option<String>,
) -> Result<Response, ApiError> {
    let OperationResult::Recorded {
        resource_type,
        resource_id,
        version,
        created,
        last_updated,
    } = result
    else {
        return Err(ApiError::internal(
            "write response",
            &"operation recorded no version",
        ));
    };
    let status = if *created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let minimal =
        header_text(headers, "prefer").is_some_and(|prefer| prefer.contains("return=minimal"));
    let mut response = if minimal {
        fhir_json(status, String::new())
    } else if let Some(body) = body {
        fhir_json(status, body)
    } else {
        let record = state
            .projection
            .version(resource_type, resource_id, *version)
            .map_err(|error| ApiError::internal("projection read", &error))?
            .ok_or_else(|| {
                ApiError::internal("write response", &"written version missing from projection")
            })?;
        let body = super::access::open_record(state, &record)?;
        fhir_json(status, body)
    };
    let location = format!(
        "{}/{resource_type}/{resource_id}/_history/{version}",
        state.base_url
    );
    let response_headers = response.headers_mut();
    response_headers.insert("etag", etag(*version));
    if let Ok(value) = HeaderValue::from_str(&location) {
        response_headers.insert("location", value.clone());
        if *created {
            response_headers.insert("content-location", value);
        }
    }
    if let Some(value) = last_modified(last_updated) {
        response_headers.insert("last-modified", value);
    }
    Ok(response)
}

/// Submits a command and waits until the projection shows its effect.
pub async fn submit_and_wait(state: &AppState, command: Command) -> Result<WriteOutcome, ApiError> {
    let outcome = state.writer.submit(command).await?;
    state.wait_for_projection(&outcome.end_position).await?;
    Ok(outcome)
}

/// Returns the digest that identifies a request for a command id: method, path and body.
pub fn request_fingerprint(method: &str, path: &str, body: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(method.as_bytes());
    hasher.update(&[0]);
    hasher.update(path.as_bytes());
    hasher.update(&[0]);
    hasher.update(body);
    *hasher.finalize().as_bytes()
}

/// Reads the client's `X-Command-Id`, which makes a retried write take effect once.
pub fn command_id(headers: &HeaderMap) -> Result<Option<chartlog_schemas::CommandId>, ApiError> {
    match header_text(headers, "x-command-id") {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| ApiError::invalid("X-Command-Id", "invalid command id; expected a UUID")),
    }
}

/// Parses the query string into decoded pairs.
pub fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|query| {
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    })
    .unwrap_or_default()
}

/// `POST /fhir/{type}`: create, with optional `If-None-Exist`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    caller.require(Action::Create, &resource_type)?;
    check_content_type(&headers)?;
    let value = parse_body(&body)?;
    check_contained(&caller, Action::Create, &value)?;

    if let Some(condition) = header_text(&headers, "if-none-exist") {
        let pairs = query_pairs(Some(condition));
        let matches = search_current(&state, &caller, &resource_type, &pairs).await?;
        match matches.len() {
            0 => {}
            1 => {
                let record = &matches[0].0;
                let mut response = fhir_json(StatusCode::OK, matches[0].1.to_string());
                response.headers_mut().insert("etag", etag(record.version));
                return Ok(response);
            }
            _ => {
                return Err(ApiError::precondition(
                    "If-None-Exist matches more than one resource",
                ))
            }
        }
    }

    let id = uuid::Uuid::new_v4().to_string();
    let prepared = prepare(&state, &resource_type, &id, value, &HashSet::new())?;
    let command = Command {
        actor: caller.principal.subject.clone(),
        purpose_of_use: caller.purpose_of_use.clone(),
        command_id: command_id(&headers)?,
        fingerprint: Some(request_fingerprint("POST", &resource_type, &body)),
        operations: vec![Operation::Record {
            resource_type: resource_type.clone(),
            resource_id: id,
            resource: prepared.resource,
            chart: prepared.chart,
            if_match: None,
            create_only: true,
            references: prepared.references,
        }],
    };
    let outcome = submit_and_wait(&state, command).await?;
    let body = outcome.bodies.into_iter().next();
    write_response(&state, &headers, &outcome.results[0], body).await
}

/// `PUT /fhir/{type}/{id}`: update, or create with a client id; `If-Match` for optimistic
/// locking.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    check_id(&id)?;
    caller.require(put_action(&state, &resource_type, &id), &resource_type)?;
    check_content_type(&headers)?;
    let value = parse_body(&body)?;
    check_contained(&caller, Action::Create, &value)?;
    match value.get("id") {
        Some(Value::String(body_id)) if body_id == &id => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "id",
                "resource id does not match the id in the URL",
            ))
        }
        None => {
            return Err(ApiError::invalid(
                "id",
                "an update must carry the resource id",
            ))
        }
    }
    let if_match = parse_if_match(&headers)?;
    let prepared = prepare(&state, &resource_type, &id, value, &HashSet::new())?;
    let command = Command {
        actor: caller.principal.subject.clone(),
        purpose_of_use: caller.purpose_of_use.clone(),
        command_id: command_id(&headers)?,
        fingerprint: Some(request_fingerprint(
            "PUT",
            &format!("{resource_type}/{id}"),
            &body,
        )),
        operations: vec![Operation::Record {
            resource_type: resource_type.clone(),
            resource_id: id,
            resource: prepared.resource,
            chart: prepared.chart,
            if_match,
            create_only: false,
            references: prepared.references,
        }],
    };
    let outcome = submit_and_wait(&state, command).await?;
    let body = outcome.bodies.into_iter().next();
    write_response(&state, &headers, &outcome.results[0], body).await
}

/// `DELETE /fhir/{type}/{id}`: a retraction; history keeps every version.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    check_id(&id)?;
    caller.require(Action::Delete, &resource_type)?;
    let if_match = parse_if_match(&headers)?;
    let command = Command {
        actor: caller.principal.subject.clone(),
        purpose_of_use: caller.purpose_of_use.clone(),
        command_id: command_id(&headers)?,
        fingerprint: Some(request_fingerprint(
            "DELETE",
            &format!("{resource_type}/{id}"),
            &[],
        )),
        operations: vec![Operation::Retract {
            resource_type,
            resource_id: id,
            if_match,
        }],
    };
    let results = submit_and_wait(&state, command).await?.results;
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Some(OperationResult::Retracted {
        version: Some(version),
        ..
    }) = results.first()
    {
        response.headers_mut().insert("etag", etag(*version));
    }
    Ok(response)
}

/// Loads the current record of a resource, or 404 / 410.
fn current_record(
    state: &AppState,
    resource_type: &str,
    id: &str,
) -> Result<VersionRecord, ApiError> {
    let record = state
        .projection
        .current(resource_type, id)
        .map_err(|error| ApiError::internal("projection read", &error))?
        .ok_or_else(|| ApiError::not_found(resource_type, id))?;
    if record.deleted {
        return Err(ApiError::gone(resource_type, id));
    }
    Ok(record)
}

fn resource_response(
    state: &AppState,
    caller: &Caller,
    record: &VersionRecord,
) -> Result<Response, ApiError> {
    let mut body = super::access::open_record(state, record)?;
    if body.contains("\"contained\"") {
        let mut value: Value = serde_json::from_str(&body)
            .map_err(|error| ApiError::internal("stored resource", &error))?;
        redact_contained(caller, &mut value);
        body = value.to_string();
    }
    let mut response = fhir_json(StatusCode::OK, body);
    response.headers_mut().insert("etag", etag(record.version));
    if let Some(value) = last_modified(&format_instant(record.recorded_at)) {
        response.headers_mut().insert("last-modified", value);
    }
    Ok(response)
}

/// `GET /fhir/{type}/{id}`: read.
pub async fn read_or_operation(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    check_id(&id)?;
    caller.require(Action::Read, &resource_type)?;
    let record = current_record(&state, &resource_type, &id)?;
    let response = resource_response(&state, &caller, &record)?;
    record_access(&state, &caller, "read", &[&record], true).await?;
    Ok(response)
}

/// `GET /fhir/{type}/{id}/_history/{version}`: version read.
pub async fn vread(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id, version)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    check_id(&id)?;
    caller.require(Action::Read, &resource_type)?;
    let version: u64 = version
        .parse()
        .map_err(|_| ApiError::invalid("vid", "invalid version id; expected a positive integer"))?;
    let record = state
        .projection
        .version(&resource_type, &id, version)
        .map_err(|error| ApiError::internal("projection read", &error))?
        .ok_or_else(|| ApiError::not_found(&resource_type, &format!("{id}/_history/{version}")))?;
    if record.deleted {
        return Err(ApiError::gone(&resource_type, &id));
    }
    let response = resource_response(&state, &caller, &record)?;
    record_access(&state, &caller, "vread", &[&record], true).await?;
    Ok(response)
}

/// Paging parameters of histories and searches.
pub(super) struct Page {
    pub(super) count: usize,
    pub(super) offset: usize,
}

pub(super) fn page_from(
    pairs: &[(String, String)],
    count_hint: Option<usize>,
) -> Result<Page, ApiError> {
    let mut page = Page {
        count: count_hint.unwrap_or(DEFAULT_PAGE),
        offset: 0,
    };
    for (name, value) in pairs {
        match name.as_str() {
            "_count" if count_hint.is_none() => {
                page.count = value
                    .parse::<usize>()
                    .map_err(|_| {
                        ApiError::invalid(
                            "_count",
                            "invalid _count; expected a non-negative integer",
                        )
                    })?
                    .min(search::MAX_COUNT);
            }
            "_offset" => {
                page.offset = value.parse().map_err(|_| {
                    ApiError::invalid(
                        "_offset",
                        "invalid _offset; expected a non-negative integer",
                    )
                })?;
            }
            _ => {}
        }
    }
    Ok(page)
}

pub(super) fn page_links(
    state: &AppState,
    path: &str,
    pairs: &[(String, String)],
    page: &Page,
    more: bool,
) -> Vec<Value> {
    let link = |offset: usize| {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        for (name, value) in pairs
            .iter()
            .filter(|(name, _)| name != "_offset" && name != "_count")
        {
            serializer.append_pair(name, value);
        }
        serializer.append_pair("_count", &page.count.to_string());
        serializer.append_pair("_offset", &offset.to_string());
        format!("{}/{path}?{}", state.base_url, serializer.finish())
    };
    let mut links = vec![serde_json::json!({"relation": "self", "url": link(page.offset)})];
    if more && page.count > 0 {
        links.push(serde_json::json!({"relation": "next", "url": link(page.offset.saturating_add(page.count))}));
    }
    if page.offset > 0 {
        links.push(serde_json::json!({"relation": "previous", "url": link(page.offset.saturating_sub(page.count))}));
    }
    links
}

/// Builds a history Bundle entry for one version.
fn history_entry(
    state: &AppState,
    caller: &Caller,
    record: &VersionRecord,
) -> Result<Value, ApiError> {
    let url = format!("{}/{}", record.resource_type, record.resource_id);
    let last_updated = format_instant(record.recorded_at);
    let (method, status) = if record.deleted {
        ("DELETE", "204 No Content")
    } else if record.version == 1 {
        ("POST", "201 Created")
    } else {
        ("PUT", "200 OK")
    };
    let mut entry = serde_json::json!({
        "fullUrl": format!("{}/{url}", state.base_url),
        "request": {"method": method, "url": if method == "POST" { record.resource_type.clone() } else { url.clone() }},
        "response": {"status": status, "etag": format!("W/\"{}\"", record.version), "lastModified": last_updated},
    });
    if !record.deleted {
        entry["resource"] = open_for(state, caller, record)?;
    }
    Ok(entry)
}

async fn history_response(
    state: &AppState,
    caller: &Caller,
    path: &str,
    pairs: &[(String, String)],
    page: &Page,
    records: Vec<VersionRecord>,
    more: bool,
) -> Result<Response, ApiError> {
    let mut entries = Vec::with_capacity(records.len());
    for record in &records {
        entries.push(history_entry(state, caller, record)?);
    }
    let shown: Vec<&VersionRecord> = records.iter().filter(|record| !record.deleted).collect();
    record_access(state, caller, "history", &shown, true).await?;
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "history",
        "link": page_links(state, path, pairs, page, more),
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, bundle.to_string()))
}

/// Reads `_since` from a history request's parameters, as microseconds since the epoch.
/// Besides it, only the paging parameters and `_format` and `_pretty` are accepted: ignoring
/// `_at`, `_list` or a misspelt `_since` would return history the client did not request.
fn history_since(pairs: &[(String, String)]) -> Result<Option<i64>, ApiError> {
    let mut since = None;
    for (name, value) in pairs {
        match name.as_str() {
            "_count" | "_offset" | "_format" | "_pretty" => {}
            "_since" if since.is_some() => {
                return Err(ApiError::invalid(
                    "_since",
                    "invalid _since: the parameter is repeated; give it once",
                ));
            }
            "_since" => {
                let invalid = || {
                    ApiError::invalid(
                        "_since",
                        "invalid _since; expected an instant with seconds and a time zone, such as 2024-01-31T08:00:00Z",
                    )
                };
                if !value.contains('T') {
                    return Err(invalid());
                }
                let range =
                    crate::fhir::datetime::parse_fhir_date_time(value).map_err(|_| invalid())?;
                let micros = i64::try_from(range.start.div_euclid(1_000)).map_err(|_| invalid())?;
                since = Some(micros);
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unsupported history parameter {other}; history accepts _since, _count and _offset"),
                ));
            }
        }
    }
    Ok(since)
}

/// `GET /fhir/{type}/{id}/_history`: instance history, newest first.
pub async fn instance_history(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    check_id(&id)?;
    caller.require(Action::Read, &resource_type)?;
    let pairs = query_pairs(query.as_deref());
    let since = history_since(&pairs)?;
    let page = page_from(&pairs, None)?;
    let mut all = state
        .projection
        .instance_history(&resource_type, &id)
        .map_err(|error| ApiError::internal("projection read", &error))?;
    if all.is_empty() {
        return Err(ApiError::not_found(&resource_type, &id));
    }
    if let Some(since) = since {
        all.retain(|record| record.recorded_at.wall_micros >= since);
    }
    let more = all.len() > page.offset.saturating_add(page.count);
    let records: Vec<VersionRecord> = all.into_iter().skip(page.offset).take(page.count).collect();
    let path = format!("{resource_type}/{id}/_history");
    history_response(&state, &caller, &path, &pairs, &page, records, more).await
}

/// `GET /fhir/{type}/_history`: type history, newest first.
pub async fn type_history(
    State(state): State<AppState>,
    caller: Caller,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    caller.require(Action::Read, &resource_type)?;
    let pairs = query_pairs(query.as_deref());
    let since = history_since(&pairs)?;
    let page = page_from(&pairs, None)?;
    let (records, more) = state
        .projection
        .type_history(&resource_type, since, page.offset, page.count)
        .map_err(|error| ApiError::internal("projection read", &error))?;
    let path = format!("{resource_type}/_history");
    history_response(&state, &caller, &path, &pairs, &page, records, more).await
}

/// Runs a search over current resources and returns every match with its parsed content,
/// sorted. Used by searches and by conditional operations.
///
/// A condition reads health data to decide, so the caller needs read permission on the type,
/// unknown parameters are rejected rather than ignored (an ignored typo would match every
/// resource), and the resources that matched are recorded as accessed.
pub async fn search_current(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    pairs: &[(String, String)],
) -> Result<Vec<(VersionRecord, Value)>, ApiError> {
    caller.require(Action::Read, resource_type)?;
    if pairs.is_empty() {
        return Err(ApiError::invalid(
            "condition",
            "a condition needs at least one search parameter",
        ));
    }
    let query = search::parse_query(resource_type, pairs)
        .map_err(|error| ApiError::invalid("condition", error.to_string()))?;
    query
        .reject_unknown_parameters()
        .map_err(|error| ApiError::invalid("condition", error.to_string()))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let matched = run_search(state, query.with_current_time(now), None).await?;
    let records: Vec<&VersionRecord> = matched.iter().map(|(record, _)| record).collect();
    record_access(state, caller, "search", &records, false).await?;
    Ok(matched)
}

async fn run_search(
    state: &AppState,
    query: search::SearchQuery,
    chart_scope: Option<chartlog_schemas::ChartId>,
) -> Result<Vec<(VersionRecord, Value)>, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || -> Result<Vec<(VersionRecord, Value)>, ApiError> {
        let resource_type = query.resource_type().to_owned();
        let scope = match chart_scope {
            Some(chart) => Some(chart),
            None => match search::patient_filter(&query) {
                None => None,
                Some(patient_id) => match state
                    .projection
                    .patient_chart(&patient_id)
                    .map_err(|error| ApiError::internal("projection read", &error))?
                {
                    Some(chart) => Some(chart),
                    None => return Ok(Vec::new()),
                },
            },
        };
        let candidates = match scope {
            Some(chart) => {
                let members = state
                    .projection
                    .chart_members(chart, Some(&resource_type))
                    .map_err(|error| ApiError::internal("projection read", &error))?;
                let mut records = Vec::with_capacity(members.len());
                for (member_type, member_id) in members {
                    if let Some(record) = state
                        .projection
                        .current(&member_type, &member_id)
                        .map_err(|error| ApiError::internal("projection read", &error))?
                    {
                        records.push(record);
                    }
                }
                records
            }
            None => state
                .projection
                .current_of_type(&resource_type)
                .map_err(|error| ApiError::internal("projection read", &error))?,
        };
        let mut matched = Vec::new();
        for record in candidates {
            let value = open_value(&state, &record)?;
            let last_updated = format_instant(record.recorded_at);
            if search::matches(&query, &value, &last_updated) {
                matched.push((
                    search::sort_key(&query, &value, &last_updated),
                    record,
                    value,
                ));
            }
        }
        if query.has_sort() {
            matched.sort_by(|left, right| left.0.cmp(&right.0));
        } else {
            // Without _sort, newest first, so paging is stable while nothing is written.
            matched.sort_by_key(|entry| std::cmp::Reverse(entry.1.log_order()));
        }
        Ok(matched
            .into_iter()
            .map(|(_, record, value)| (record, value))
            .collect())
    })
    .await
    .map_err(|error| ApiError::internal("search task", &error))?
}

async fn search_response(
    state: &AppState,
    caller: &Caller,
    resource_type: &str,
    path: &str,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
    chart_scope: Option<chartlog_schemas::ChartId>,
) -> Result<Response, ApiError> {
    let filtered: Vec<(String, String)> = pairs
        .iter()
        .filter(|(name, _)| name != "_offset")
        .cloned()
        .collect();
    let query = search::parse_query(resource_type, &filtered)
        .map_err(|error| ApiError::invalid("query", error.to_string()))?;
    let strict =
        header_text(headers, "prefer").is_some_and(|prefer| prefer.contains("handling=strict"));
    if strict {
        query
            .reject_unknown_parameters()
            .map_err(|error| ApiError::invalid("query", error.to_string()))?;
    }
    let unknown: Vec<String> = query.unknown_parameters().to_vec();
    let summary_count = query.summary() == Some(search::Summary::Count);
    let page = page_from(&pairs, query.count())?;
    let query = query.with_current_time(time::OffsetDateTime::now_utc().unix_timestamp_nanos());
    let matched = run_search(state, query, chart_scope).await?;
    let total = matched.len();

    let shown: Vec<&(VersionRecord, Value)> = if summary_count {
        Vec::new()
    } else {
        matched.iter().skip(page.offset).take(page.count).collect()
    };
    let more = !summary_count && total > page.offset.saturating_add(page.count);
    let mut entries: Vec<Value> = shown
        .iter()
        .map(|(record, value)| {
            let mut value = value.clone();
            redact_contained(caller, &mut value);
            serde_json::json!({
                "fullUrl": format!("{}/{}/{}", state.base_url, record.resource_type, record.resource_id),
                "resource": value,
                "search": {"mode": "match"},
            })
        })
        .collect();
    if !unknown.is_empty() {
        // Only names shaped like parameter names are repeated back; anything else a client
        // put where a name belongs could be health data.
        let looks_like_name = |name: &&String| {
            name.len() <= 64
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"_-.:".contains(&byte))
        };
        let shown: Vec<&String> = unknown.iter().filter(looks_like_name).collect();
        let hidden = unknown.len() - shown.len();
        let mut names = shown
            .iter()
            .map(|name| name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if hidden > 0 {
            names.push_str(&format!(
                "{}{hidden} malformed names",
                if names.is_empty() { "" } else { ", " }
            ));
        }
        entries.push(serde_json::json!({
            "resource": {"resourceType": "OperationOutcome", "issue": [{
                "severity": "warning", "code": "not-supported",
                "diagnostics": format!("unknown search parameters were ignored: {names}"),
            }]},
            "search": {"mode": "outcome"},
        }));
    }
    let records: Vec<&VersionRecord> = shown.iter().map(|(record, _)| record).collect();
    record_access(state, caller, "search", &records, false).await?;
    // The links show the search as performed, without the parameters it ignored.
    let performed: Vec<(String, String)> = pairs
        .iter()
        .filter(|(name, _)| !unknown.contains(name))
        .cloned()
        .collect();
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": page_links(state, path, &performed, &page, more),
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, bundle.to_string()))
}

/// `GET /fhir/{type}?...`: search.
pub async fn search_type(
    State(state): State<AppState>,
    caller: Caller,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    caller.require(Action::Read, &resource_type)?;
    let pairs = query_pairs(query.as_deref());
    search_response(
        &state,
        &caller,
        &resource_type,
        &resource_type,
        pairs,
        &headers,
        None,
    )
    .await
}

/// `POST /fhir/{type}/_search`: search with form-encoded parameters in the body.
pub async fn search_post(
    State(state): State<AppState>,
    caller: Caller,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    caller.require(Action::Read, &resource_type)?;
    let mut pairs = query_pairs(query.as_deref());
    pairs.extend(form_urlencoded::parse(&body).into_owned());
    search_response(
        &state,
        &caller,
        &resource_type,
        &resource_type,
        pairs,
        &headers,
        None,
    )
    .await
}

/// `GET /fhir/Patient/{id}/$everything`, `GET /fhir/Patient/{id}/{type}` (compartment search)
/// and `GET /fhir/Patient/{id}/$history` (the chart's history, every type, newest first).
pub async fn patient_compartment(
    State(state): State<AppState>,
    caller: Caller,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if operation == "_history" {
        return instance_history(
            State(state),
            caller,
            Path((resource_type, id)),
            RawQuery(query),
        )
        .await;
    }
    if resource_type != "Patient" {
        return Err(ApiError::not_found_path());
    }
    check_id(&id)?;
    if operation == "$access-log" {
        let pairs = query_pairs(query.as_deref());
        return super::audit::access_log(&state, &caller, &id, &pairs).await;
    }
    caller.require(Action::Read, "Patient")?;
    let patient = current_record(&state, "Patient", &id)?;
    let chart = patient.chart_id;
    let pairs = query_pairs(query.as_deref());
    match operation.as_str() {
        "$everything" => everything(&state, &caller, chart, &id, &pairs).await,
        "$history" => {
            let page = page_from(&pairs, None)?;
            let (records, more) = state
                .projection
                .chart_history(chart, page.offset, page.count)
                .map_err(|error| ApiError::internal("projection read", &error))?;
            for record in &records {
                caller.require(Action::Read, &record.resource_type)?;
            }
            let path = format!("Patient/{id}/$history");
            history_response(&state, &caller, &path, &pairs, &page, records, more).await
        }
        compartment_type => {
            check_type(compartment_type)?;
            caller.require(Action::Read, compartment_type)?;
            let path = format!("Patient/{id}/{compartment_type}");
            search_response(
                &state,
                &caller,
                compartment_type,
                &path,
                pairs,
                &headers,
                Some(chart),
            )
            .await
        }
    }
}

async fn everything(
    state: &AppState,
    caller: &Caller,
    chart: chartlog_schemas::ChartId,
    patient_id: &str,
    pairs: &[(String, String)],
) -> Result<Response, ApiError> {
    let members = state
        .projection
        .chart_members(chart, None)
        .map_err(|error| ApiError::internal("projection read", &error))?;
    let mut records = Vec::with_capacity(members.len());
    for (member_type, member_id) in &members {
        if !caller.principal.may(Action::Read, member_type) {
            continue;
        }
        if let Some(record) = state
            .projection
            .current(member_type, member_id)
            .map_err(|error| ApiError::internal("projection read", &error))?
        {
            records.push(record);
        }
    }
    // The Patient first, then everything else in log order.
    records.sort_by_key(|record| (record.resource_type != "Patient", record.log_order()));
    let page = page_from(pairs, None)?;
    let page = Page {
        count: if pairs.iter().any(|(name, _)| name == "_count") {
            page.count
        } else {
            search::MAX_COUNT
        },
        offset: page.offset,
    };
    let total = records.len();
    let shown: Vec<VersionRecord> = records
        .into_iter()
        .skip(page.offset)
        .take(page.count)
        .collect();
    let more = total > page.offset.saturating_add(page.count);
    let mut entries = Vec::with_capacity(shown.len());
    for record in &shown {
        entries.push(serde_json::json!({
            "fullUrl": format!("{}/{}/{}", state.base_url, record.resource_type, record.resource_id),
            "resource": open_for(state, caller, record)?,
            "search": {"mode": "match"},
        }));
    }
    let accessed: Vec<&VersionRecord> = shown.iter().collect();
    record_access(state, caller, "everything", &accessed, true).await?;
    let path = format!("Patient/{patient_id}/$everything");
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": page_links(state, &path, pairs, &page, more),
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, bundle.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_reference_forms_parse() {
        let base = "http://localhost:8080/fhir";
        assert_eq!(
            parse_local_reference(base, "Patient/p1"),
            Some(("Patient".into(), "p1".into()))
        );
        assert_eq!(
            parse_local_reference(base, "Procedure/x/_history/1"),
            Some(("Procedure".into(), "x".into()))
        );
        assert_eq!(
            parse_local_reference(base, "http://localhost:8080/fhir/Patient/p1"),
            Some(("Patient".into(), "p1".into()))
        );
        assert_eq!(
            parse_local_reference(base, "http://elsewhere.example/fhir/Patient/p1"),
            None
        );
        assert_eq!(parse_local_reference(base, "urn:uuid:1234"), None);
        assert_eq!(parse_local_reference(base, "Nonsense/p1"), None);
    }

    #[test]
    fn deep_nesting_is_named() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let error = parse_body(deep.as_bytes()).unwrap_err();
        assert!(
            error.issues[0].diagnostics.contains("more than 128 levels"),
            "{}",
            error.issues[0].diagnostics
        );
        let broken = parse_body(b"{\"resourceType\": }").unwrap_err();
        assert!(
            broken.issues[0].diagnostics.contains("is not valid JSON"),
            "{}",
            broken.issues[0].diagnostics
        );
    }

    #[test]
    fn decimal_digits_are_kept() {
        let value = parse_body(br#"{"a": 1.50, "b": 1E5, "c": 2e-3, "d": 1e999999}"#).unwrap();
        assert_eq!(
            value.to_string(),
            r#"{"a":1.50,"b":1e+5,"c":2e-3,"d":1e+999999}"#
        );
    }

    #[test]
    fn etag_forms_parse() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("\"12\""), Some(12));
        assert_eq!(parse_etag("W/\"x\""), None);
        assert_eq!(parse_etag("W/\"2"), None, "unbalanced quote");
        assert_eq!(parse_etag("\"\"2\"\""), None, "doubled quotes");
    }
}
