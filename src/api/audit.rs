//! The audit trail for compliance officers: `GET /fhir/Patient/{id}/$access-log` lists every
//! read of the patient's chart, newest first, as FHIR AuditEvent resources.
//!
//! Each entry comes from a chart-accessed event on the log: who (the token subject), when, why
//! (purpose of use), how (the FHIR interaction), from where (client address) and which
//! resources. Reading the trail is itself recorded as an access of the chart.

use axum::http::StatusCode;
use axum::response::Response;
use chartlog_schemas::{ChartAccessed, EventHeader, EventPayload, HlcTimestamp};
use serde_json::{json, Value};

use super::rest::{fhir_json, page_from, page_links};
use super::{ApiError, AppState, Caller};
use crate::auth::Action;
use crate::command::state::format_instant;
use crate::command::{Command, Operation};
use crate::log::partition_of;

/// The paging parameter that limits every page of the trail to the entries before the log
/// position of its first page.
const BEFORE_POSITION: &str = "_before-position";

/// Decrypts one stored access event.
fn open_access(
    state: &AppState,
    envelope: &[u8],
) -> Result<(EventHeader, ChartAccessed), ApiError> {
    match super::access::open_stored(state, envelope)? {
        (header, EventPayload::ChartAccessed(access)) => Ok((header, access)),
        _ => Err(ApiError::internal(
            "stored access event",
            &"entry holds no access",
        )),
    }
}

/// Returns when the data left: the moment the event was recorded, or, for a read served while
/// the log was unreachable, the earlier moment kept in the access journal.
fn served_period(header: &EventHeader, access: &ChartAccessed) -> Value {
    let served = access
        .served_at_micros
        .map_or(header.recorded_at, |wall_micros| HlcTimestamp {
            wall_micros,
            logical: 0,
        });
    let instant = format_instant(served);
    json!({"start": instant, "end": instant})
}

/// Builds the AuditEvent of one access.
fn audit_event(position: u64, header: &EventHeader, access: &ChartAccessed) -> Value {
    // A search reads many resources at once (FHIR's audit action E, execute); every other
    // interaction reads (R).
    let action = if access.interaction == "search" {
        "E"
    } else {
        "R"
    };
    let entities: Vec<Value> = access
        .resources
        .iter()
        .map(|resource| {
            let reference = match resource.version {
                Some(version) => {
                    format!(
                        "{}/{}/_history/{version}",
                        resource.resource_type, resource.resource_id
                    )
                }
                None => format!("{}/{}", resource.resource_type, resource.resource_id),
            };
            json!({"what": {"reference": reference}})
        })
        .collect();
    json!({
        "resourceType": "AuditEvent",
        "id": header.event_id.to_string(),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": access.interaction}],
        "action": action,
        "recorded": format_instant(header.recorded_at),
        "period": served_period(header, access),
        "outcome": "0",
        "purposeOfEvent": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": header.purpose_of_use}]}],
        "agent": [{
            "who": {"identifier": {"value": header.actor}},
            "requestor": true,
            "network": {"address": access.client_address, "type": "2"},
        }],
        "source": {"observer": {"display": "chartlog"}, "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}]},
        "entity": entities,
        "extension": [{"url": "urn:chartlog:log-position", "valueUnsignedInt": position}],
    })
}

/// Serves `GET /fhir/Patient/{id}/$access-log`.
///
/// # Errors
///
/// 403 without the audit permission, 404 for an unknown patient, 503 when the reading of the
/// trail cannot itself be recorded.
pub async fn access_log(
    state: &AppState,
    caller: &Caller,
    patient_id: &str,
    pairs: &[(String, String)],
) -> Result<Response, ApiError> {
    caller.require(Action::ViewAudit, "Patient")?;
    let chart = state
        .projection
        .patient_chart(patient_id)
        .map_err(|error| ApiError::internal("projection read", &error))?
        .ok_or_else(|| ApiError::not_found("Patient", patient_id))?;
    // Reads do not wait for their own access events to be projected, so the trail first
    // catches up with everything on the log.
    let log_end = state.log.end_position().borrow().clone();
    state.wait_for_projection(&log_end).await?;
    // A chart's accesses are all in its partition, so its offsets order them.
    let partition_end = log_end.get(partition_of(chart, state.log.partitions()));
    let page = page_from(pairs, None)?;
    // Every reading of the trail appends an access to it. Without a fixed bound, each page
    // would therefore repeat the last entry of the page before, so every page link carries
    // the log position where the first page was taken.
    let mut link_pairs = pairs.to_vec();
    let before = match pairs.iter().find(|(name, _)| name == BEFORE_POSITION) {
        Some((_, value)) => value.parse::<u64>().map_err(|_| {
            ApiError::invalid(
                BEFORE_POSITION,
                "invalid _before-position; expected a log position from a page link",
            )
        })?,
        None => {
            link_pairs.push((BEFORE_POSITION.to_owned(), partition_end.to_string()));
            partition_end
        }
    };
    let (accesses, more) = state
        .projection
        .chart_accesses(chart, before, page.offset, page.count)
        .map_err(|error| ApiError::internal("projection read", &error))?;
    let mut entries = Vec::with_capacity(accesses.len());
    for (position, envelope) in &accesses {
        let (header, access) = open_access(state, envelope)?;
        entries.push(json!({"resource": audit_event(*position, &header, &access)}));
    }

    let reading = Command {
        actor: caller.principal.subject.clone(),
        purpose_of_use: caller.purpose_of_use.clone(),
        command_id: None,
        fingerprint: None,
        operations: vec![Operation::Access {
            chart_id: chart,
            access: ChartAccessed {
                interaction: "audit".into(),
                resources: Vec::new(),
                client_address: caller.client_address.clone(),
                served_at_micros: None,
            },
        }],
    };
    super::access::submit_access(state, reading, "audit").await?;

    let path = format!("Patient/{patient_id}/$access-log");
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "link": page_links(state, &path, &link_pairs, &page, more),
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, bundle.to_string()))
}
