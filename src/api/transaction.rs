//! Transaction Bundles: every entry applied together or none at all.
//!
//! Steps: check the Bundle; give each POST entry a new id and map its `fullUrl` to it; settle
//! conditional creates (`ifNoneExist`); rewrite `urn:uuid:` and conditional references
//! (`Practitioner?identifier=...`) to `Type/id`; validate and prepare every resource; submit
//! one command. The writer appends all its events in one durable write, so a failing entry
//! leaves no trace of the others.

use std::collections::{HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::rest::{
    check_contained, check_content_type, check_id, check_type, command_id, parse_body, parse_etag,
    prepare, put_action, query_pairs, request_fingerprint, search_current, submit_and_wait,
};
use super::{ApiError, AppState, Caller};
use crate::auth::roles::is_directory_type;
use crate::auth::Action;
use crate::command::{Command, Operation, OperationResult};
use crate::fhir::compartment;

/// Most entries one transaction may hold, a bound on the work one request can cause. A
/// patient's full Synthea history is typically a few hundred to a few thousand entries.
const MAX_ENTRIES: usize = 20_000;

enum Planned {
    Write {
        index: usize,
        resource_type: String,
        id: String,
        value: Value,
        if_match: Option<u64>,
        create_only: bool,
    },
    Delete {
        index: usize,
        resource_type: String,
        id: String,
        if_match: Option<u64>,
    },
    Existing {
        resource_type: String,
        id: String,
        version: u64,
    },
}

fn entry_error(index: usize, error: ApiError) -> ApiError {
    error.within(&format!("Bundle.entry[{index}]"))
}

/// `POST /fhir`: a transaction Bundle.
pub async fn transaction(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_content_type(&headers)?;
    let bundle = parse_body(&body)?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::invalid(
            "Bundle.resourceType",
            "expected a Bundle",
        ));
    }
    match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => {}
        Some("batch") => {
            return Err(ApiError::invalid(
                "Bundle.type",
                "batch Bundles are not supported; use a transaction",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "Bundle.type",
                "expected a Bundle of type transaction",
            ))
        }
    }
    let entries = match bundle.get("entry") {
        None => Vec::new(),
        Some(Value::Array(entries)) if !entries.is_empty() => entries.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "Bundle.entry",
                "expected a non-empty array of entries",
            ))
        }
    };
    if entries.len() > MAX_ENTRIES {
        return Err(ApiError::invalid(
            "Bundle.entry",
            format!("a transaction holds at most {MAX_ENTRIES} entries"),
        ));
    }

    // Step 1: read each entry's request, give POSTs ids and map fullUrls.
    let mut planned = Vec::with_capacity(entries.len());
    let mut full_urls: HashMap<String, String> = HashMap::new();
    let mut created: HashSet<(String, String)> = HashSet::new();
    // Every resource a transaction writes or deletes, so that no two entries target one.
    let mut targets: HashSet<(String, String)> = HashSet::new();
    for (index, entry) in entries.iter().enumerate() {
        let at = |name: &str| format!("Bundle.entry[{index}].{name}");
        if let Some(full_url) = entry.get("fullUrl").and_then(Value::as_str) {
            if full_urls.contains_key(full_url) {
                return Err(ApiError::invalid(
                    &at("fullUrl"),
                    "two entries have the same fullUrl",
                ));
            }
        }
        let request = entry
            .get("request")
            .ok_or_else(|| ApiError::invalid(&at("request"), "missing request"))?;
        let method = request.get("method").and_then(Value::as_str).unwrap_or("");
        let url = request
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(&at("request.url"), "missing request url"))?;
        let (path, _) = url.split_once('?').unwrap_or((url, ""));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let resource_type = segments[0].to_owned();
        check_type(&resource_type).map_err(|error| entry_error(index, error))?;
        if let Some(id) = segments.get(1) {
            check_id(id).map_err(|error| entry_error(index, error))?;
            if segments.len() > 2 {
                return Err(ApiError::invalid(
                    &at("request.url"),
                    "expected a url of the form Type or Type/id",
                ));
            }
            if !targets.insert((resource_type.clone(), (*id).to_owned())) {
                return Err(ApiError::invalid(
                    &at("request.url"),
                    "two entries target the same resource",
                ));
            }
        }
        let if_match = request
            .get("ifMatch")
            .and_then(Value::as_str)
            .and_then(parse_etag);
        match method {
            "POST" => {
                caller.require(Action::Create, &resource_type)?;
                let value = entry
                    .get("resource")
                    .cloned()
                    .ok_or_else(|| ApiError::invalid(&at("resource"), "missing resource"))?;
                check_contained(&caller, Action::Create, &value)?;
                let mut id = uuid::Uuid::new_v4().to_string();
                let mut existing = None;
                if let Some(condition) = request.get("ifNoneExist").and_then(Value::as_str) {
                    let matches = search_current(
                        &state,
                        &caller,
                        &resource_type,
                        &query_pairs(Some(condition)),
                    )
                    .await
                    .map_err(|error| entry_error(index, error))?;
                    match matches.len() {
                        0 => {}
                        1 => {
                            id = matches[0].0.resource_id.clone();
                            existing = Some(matches[0].0.version);
                        }
                        _ => {
                            return Err(entry_error(
                                index,
                                ApiError::precondition(
                                    "ifNoneExist matches more than one resource",
                                ),
                            ))
                        }
                    }
                }
                if let Some(full_url) = entry.get("fullUrl").and_then(Value::as_str) {
                    full_urls.insert(full_url.to_owned(), format!("{resource_type}/{id}"));
                }
                if existing.is_some() && !targets.insert((resource_type.clone(), id.clone())) {
                    return Err(ApiError::invalid(
                        &at("request"),
                        "two entries target the same resource",
                    ));
                }
                match existing {
                    Some(version) => planned.push(Planned::Existing {
                        resource_type,
                        id,
                        version,
                    }),
                    None => {
                        created.insert((resource_type.clone(), id.clone()));
                        planned.push(Planned::Write {
                            index,
                            resource_type,
                            id,
                            value,
                            if_match: None,
                            create_only: true,
                        });
                    }
                }
            }
            "PUT" => {
                let id = segments.get(1).filter(|id| !id.is_empty()).ok_or_else(|| {
                    ApiError::invalid(
                        &at("request.url"),
                        "a PUT entry needs a url of the form Type/id",
                    )
                })?;
                let action = put_action(&state, &resource_type, id);
                caller.require(action, &resource_type)?;
                let value = entry
                    .get("resource")
                    .cloned()
                    .ok_or_else(|| ApiError::invalid(&at("resource"), "missing resource"))?;
                check_contained(&caller, Action::Create, &value)?;
                if value.get("id").and_then(Value::as_str) != Some(*id) {
                    return Err(ApiError::invalid(
                        &at("resource.id"),
                        "a PUT entry's resource must carry the id of its request url",
                    ));
                }
                if let Some(full_url) = entry.get("fullUrl").and_then(Value::as_str) {
                    full_urls.insert(full_url.to_owned(), format!("{resource_type}/{id}"));
                }
                if action == Action::Create {
                    created.insert((resource_type.clone(), (*id).to_owned()));
                }
                planned.push(Planned::Write {
                    index,
                    resource_type,
                    id: (*id).to_owned(),
                    value,
                    if_match,
                    create_only: false,
                });
            }
            "DELETE" => {
                let id = segments.get(1).filter(|id| !id.is_empty()).ok_or_else(|| {
                    ApiError::invalid(
                        &at("request.url"),
                        "conditional deletes are not supported; use Type/id",
                    )
                })?;
                caller.require(Action::Delete, &resource_type)?;
                planned.push(Planned::Delete {
                    index,
                    resource_type,
                    id: (*id).to_owned(),
                    if_match,
                });
            }
            _ => {
                return Err(ApiError::invalid(
                    &at("request.method"),
                    "transaction entries support POST, PUT and DELETE",
                ))
            }
        }
    }

    // Step 2: rewrite urn:uuid and conditional references, then validate and prepare.
    let mut conditional_cache: HashMap<String, String> = HashMap::new();
    let mut operations: Vec<(u8, usize, Operation)> = Vec::with_capacity(planned.len());
    for item in &mut planned {
        match item {
            Planned::Write {
                index,
                resource_type,
                id,
                value,
                if_match,
                create_only,
            } => {
                let index = *index;
                let mut failure = None;
                let mut conditionals = Vec::new();
                compartment::for_each_reference_mut(value, |path, reference| {
                    if let Some(target) = full_urls.get(reference.as_str()) {
                        *reference = target.clone();
                    } else if reference.starts_with("urn:uuid:")
                        || reference.starts_with("urn:oid:")
                    {
                        failure.get_or_insert_with(|| {
                            ApiError::unprocessable(
                                "not-found",
                                Some(path),
                                "urn reference matches no fullUrl in the Bundle",
                            )
                        });
                    } else if reference
                        .split_once('?')
                        .is_some_and(|(target, _)| !target.contains('/'))
                    {
                        conditionals.push(reference.clone());
                    }
                });
                if let Some(error) = failure {
                    return Err(entry_error(index, error));
                }
                for conditional in conditionals {
                    if conditional_cache.contains_key(&conditional) {
                        continue;
                    }
                    let (target_type, condition) =
                        conditional.split_once('?').unwrap_or((&conditional, ""));
                    check_type(target_type).map_err(|error| entry_error(index, error))?;
                    let matches =
                        search_current(&state, &caller, target_type, &query_pairs(Some(condition)))
                            .await
                            .map_err(|error| entry_error(index, error))?;
                    if matches.len() != 1 {
                        return Err(entry_error(
                            index,
                            ApiError::unprocessable(
                                "not-found",
                                None,
                                format!(
                                    "conditional reference to {target_type} {}; it must match exactly one",
                                    if matches.is_empty() { "matches no resource" } else { "matches more than one resource" }
                                ),
                            ),
                        ));
                    }
                    conditional_cache.insert(
                        conditional.clone(),
                        format!("{target_type}/{}", matches[0].0.resource_id),
                    );
                }
                compartment::for_each_reference_mut(value, |_, reference| {
                    if let Some(target) = conditional_cache.get(reference.as_str()) {
                        *reference = target.clone();
                    }
                });
                let prepared = prepare(&state, resource_type, id, value.take(), &created)
                    .map_err(|error| entry_error(index, error))?;
                // Patients open charts that the other entries write to, and the directory
                // contains what clinical entries refer to, so they are planned first.
                let rank = if is_directory_type(resource_type) {
                    1
                } else if resource_type == "Patient" {
                    2
                } else {
                    3
                };
                operations.push((
                    rank,
                    index,
                    Operation::Record {
                        resource_type: resource_type.clone(),
                        resource_id: id.clone(),
                        resource: prepared.resource,
                        chart: prepared.chart,
                        if_match: *if_match,
                        create_only: *create_only,
                        references: prepared.references,
                    },
                ));
            }
            Planned::Delete {
                index,
                resource_type,
                id,
                if_match,
            } => {
                operations.push((
                    0,
                    *index,
                    Operation::Retract {
                        resource_type: resource_type.clone(),
                        resource_id: id.clone(),
                        if_match: *if_match,
                    },
                ));
            }
            Planned::Existing { .. } => {}
        }
    }
    operations.sort_by_key(|(rank, index, _)| (*rank, *index));
    let order: Vec<usize> = operations.iter().map(|(_, index, _)| *index).collect();

    // Step 3: one command, all or nothing.
    let command = Command {
        actor: caller.principal.subject.clone(),
        purpose_of_use: caller.purpose_of_use.clone(),
        command_id: command_id(&headers)?,
        fingerprint: Some(request_fingerprint("POST", "", &body)),
        operations: operations
            .into_iter()
            .map(|(_, _, operation)| operation)
            .collect(),
    };
    let results = if command.operations.is_empty() {
        Vec::new()
    } else {
        submit_and_wait(&state, command).await?.results
    };
    let mut by_index: HashMap<usize, OperationResult> = order.into_iter().zip(results).collect();

    let mut response_entries = Vec::with_capacity(planned.len());
    for item in &planned {
        let entry = match item {
            Planned::Existing {
                resource_type,
                id,
                version,
            } => serde_json::json!({
                "response": {
                    "status": "200 OK",
                    "location": format!("{resource_type}/{id}/_history/{version}"),
                    "etag": format!("W/\"{version}\""),
                }
            }),
            Planned::Write { index, .. } | Planned::Delete { index, .. } => {
                match by_index.remove(index) {
                    Some(OperationResult::Recorded {
                        resource_type,
                        resource_id,
                        version,
                        created,
                        last_updated,
                    }) => {
                        serde_json::json!({
                            "fullUrl": format!("{}/{resource_type}/{resource_id}", state.base_url),
                            "response": {
                                "status": if created { "201 Created" } else { "200 OK" },
                                "location": format!("{resource_type}/{resource_id}/_history/{version}"),
                                "etag": format!("W/\"{version}\""),
                                "lastModified": last_updated,
                            }
                        })
                    }
                    Some(OperationResult::Retracted { .. }) => {
                        serde_json::json!({"response": {"status": "204 No Content"}})
                    }
                    _ => serde_json::json!({"response": {"status": "200 OK"}}),
                }
            }
        };
        response_entries.push(entry);
    }
    let response = serde_json::json!({
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": response_entries,
    });
    let mut http = (StatusCode::OK, response.to_string()).into_response();
    http.headers_mut().insert(
        "content-type",
        axum::http::HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    Ok(http)
}
