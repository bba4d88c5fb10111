//! Opening stored versions and recording who read them.
//!
//! Invariant: a handler calls [`record_access`] and awaits it before any health data leaves in
//! its response. The access is then durable: on the log, or, while the log cannot take it, in
//! the node's access journal (see [`crate::journal`]). When neither can take it the request
//! fails with 503.

use std::collections::BTreeMap;

use chartlog_projections::VersionRecord;
use chartlog_schemas::{AccessedResource, ChartAccessed, ChartId, CommandId, EventPayload};

use super::{ApiError, AppState, Caller};
use crate::command::{Command, Operation};
use crate::crypto;
use crate::journal::PendingAccess;
use crate::writer::{now_micros, WriteError};

/// Checks the digest of an envelope kept in the projection and decrypts its payload. The
/// signature was checked when the projector applied the envelope; here the digest and the
/// AEAD tag are.
///
/// # Errors
///
/// 500 when a check fails (the log records which) or the data key is unavailable.
pub fn open_stored(
    state: &AppState,
    envelope: &[u8],
) -> Result<(chartlog_schemas::EventHeader, EventPayload), ApiError> {
    let checked = crypto::check_stored_envelope(envelope)
        .map_err(|error| ApiError::internal("stored envelope integrity", &error))?;
    let data_key = state
        .keys
        .data_key(checked.parsed.header.key_id)
        .map_err(|error| ApiError::internal("data key", &error))?;
    let payload = crypto::open_payload(&checked, &data_key)
        .map_err(|error| ApiError::internal("stored envelope decryption", &error))?;
    Ok((checked.parsed.header.clone(), payload))
}

/// Returns the resource JSON stored in a version record.
///
/// # Errors
///
/// As [`open_stored`], and 500 when the record contains no resource version.
pub fn open_record(state: &AppState, record: &VersionRecord) -> Result<String, ApiError> {
    match open_stored(state, &record.envelope)?.1 {
        EventPayload::ResourceRecorded(recorded) => Ok(recorded.resource_json),
        _ => Err(ApiError::internal(
            "stored envelope",
            &"version record holds no resource",
        )),
    }
}

/// Opens a record and parses its JSON.
///
/// # Errors
///
/// As [`open_record`].
pub fn open_value(state: &AppState, record: &VersionRecord) -> Result<serde_json::Value, ApiError> {
    let text = open_record(state, record)?;
    serde_json::from_str(&text).map_err(|error| ApiError::internal("stored resource", &error))
}

/// Appends one chart-accessed event per chart among `records` and waits until they are durable.
///
/// # Errors
///
/// 503 when the events cannot be appended.
pub async fn record_access(
    state: &AppState,
    caller: &Caller,
    interaction: &str,
    records: &[&VersionRecord],
    with_versions: bool,
) -> Result<(), ApiError> {
    let mut by_chart: BTreeMap<ChartId, Vec<AccessedResource>> = BTreeMap::new();
    for record in records {
        by_chart
            .entry(record.chart_id)
            .or_default()
            .push(AccessedResource {
                resource_type: record.resource_type.clone(),
                resource_id: record.resource_id.clone(),
                version: with_versions.then_some(record.version),
            });
    }
    if by_chart.is_empty() {
        return Ok(());
    }
    let operations = by_chart
        .into_iter()
        .map(|(chart_id, resources)| Operation::Access {
            chart_id,
            access: ChartAccessed {
                interaction: interaction.to_owned(),
                resources,
                client_address: caller.client_address.clone(),
                served_at_micros: None,
            },
        })
        .collect();
    let command = Command {
        actor: caller.principal.subject.clone(),
        purpose_of_use: caller.purpose_of_use.clone(),
        command_id: None,
        fingerprint: None,
        operations,
    };
    submit_access(state, command, interaction).await
}

/// Makes the access events of `command` durable: appended to the log, or journaled when the
/// log cannot take them now.
///
/// # Errors
///
/// 503 when neither the log nor the journal took them.
pub async fn submit_access(
    state: &AppState,
    command: Command,
    interaction: &str,
) -> Result<(), ApiError> {
    let rejected = |error: &dyn std::fmt::Display| {
        tracing::error!(error = %error, interaction, "access event not recorded; read rejected");
        ApiError::unavailable(
            "the access could not be recorded, so the read was rejected; retry later",
        )
    };
    // While the log is known to fail, or earlier accesses still wait, the journal takes the
    // access at once instead of waiting for another append to time out.
    if state.writer.is_healthy() && state.access_journal.is_empty() {
        match state.writer.submit(command.clone()).await {
            Ok(_) => return Ok(()),
            Err(WriteError::Append(error)) => {
                tracing::warn!(error = %error, interaction, "log append failed; access goes to the access journal");
            }
            Err(error) => return Err(rejected(&error)),
        }
    }
    let served_at_micros = now_micros();
    let pending: Vec<PendingAccess> = command
        .operations
        .into_iter()
        .filter_map(|operation| match operation {
            Operation::Access {
                chart_id,
                mut access,
            } => {
                access.served_at_micros = Some(served_at_micros);
                Some(PendingAccess {
                    command_id: CommandId::random(),
                    actor: command.actor.clone(),
                    purpose_of_use: command.purpose_of_use.clone(),
                    chart_id,
                    access,
                })
            }
            _ => None,
        })
        .collect();
    let journal = state.access_journal.clone();
    match tokio::task::spawn_blocking(move || journal.append(&pending)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(rejected(&error)),
        Err(error) => Err(rejected(&error)),
    }
}
