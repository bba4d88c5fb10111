//! The writer's state: each chart's head and each resource's current version, rebuilt from the
//! log at start-up and kept in memory. Commands are checked against it and planned into events.
//!
//! Planning mutates the state tentatively and records an undo entry for every change, so a
//! command that fails half-way, or a batch that the log rejects, leaves the state as it was.

use std::collections::HashMap;

use chartlog_schemas::{
    ChartAccessed, ChartId, ChartKind, ChartOpened, CommandId, EventPayload, EventSeq, EventType,
    HlcTimestamp, KeyId, ResourceRecorded, ResourceRetracted,
};

use super::{ChartTarget, Command, CommandError, Operation, OperationResult};

/// Head of a chart's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChartHead {
    /// Sequence number of the chart's last event.
    pub seq: EventSeq,
    /// Digest of the chart's last event; all zeros while its first event is not yet sealed.
    pub digest: [u8; 32],
    /// Data key of the chart, once created.
    pub key_id: Option<KeyId>,
}

/// Current state of a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceHead {
    /// Chart the resource belongs to.
    pub chart_id: ChartId,
    /// Latest version number, deletions included.
    pub version: u64,
    /// Whether the latest version is a deletion.
    pub deleted: bool,
}

/// An event planned by a command, not yet sealed.
#[derive(Clone, Debug)]
pub struct PlannedEvent {
    /// Chart the event extends.
    pub chart_id: ChartId,
    /// Its sequence number in the chart.
    pub seq: EventSeq,
    /// Its timestamp.
    pub recorded_at: HlcTimestamp,
    /// Its payload.
    pub payload: EventPayload,
}

impl PlannedEvent {
    /// Returns the event type of the payload.
    pub fn event_type(&self) -> EventType {
        self.payload.event_type()
    }
}

/// What the state remembers of an applied command id.
#[derive(Debug, Default)]
struct CommandRecord {
    actor: String,
    /// Digest of the request; unknown for commands replayed from the log at start-up.
    fingerprint: Option<[u8; 32]>,
    results: Vec<OperationResult>,
}

/// An entry that restores one piece of state.
#[derive(Debug)]
enum Undo {
    Chart(ChartId, Option<ChartHead>),
    Resource((String, String), Option<ResourceHead>),
    Patient(String, Option<ChartId>),
    Command(CommandId),
    Clock(HlcTimestamp),
}

/// Undo entries of a batch of commands, applied in reverse by [`WriterState::undo`].
#[derive(Debug, Default)]
pub struct UndoJournal(Vec<Undo>);

/// The writer's in-memory state.
#[derive(Debug, Default)]
pub struct WriterState {
    charts: HashMap<ChartId, ChartHead>,
    resources: HashMap<(String, String), ResourceHead>,
    patients: HashMap<String, ChartId>,
    commands: HashMap<CommandId, CommandRecord>,
    clock: HlcTimestamp,
    /// Largest resource JSON an event may carry, when the log allows less than
    /// [`super::MAX_RESOURCE_BYTES`].
    resource_limit: Option<usize>,
}

/// Formats a timestamp as a FHIR instant in UTC with microseconds, for `meta.lastUpdated`.
pub fn format_instant(timestamp: HlcTimestamp) -> String {
    let nanos = i128::from(timestamp.wall_micros) * 1_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(moment) => {
            let date = moment.date();
            let clock = moment.time();
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                date.year(),
                u8::from(date.month()),
                date.day(),
                clock.hour(),
                clock.minute(),
                clock.second(),
                clock.microsecond()
            )
        }
        // The writer's clock reads the system time, which is inside the representable range.
        Err(_) => "1970-01-01T00:00:00.000000Z".to_owned(),
    }
}

impl WriterState {
    /// Returns the head of a chart.
    pub fn chart(&self, chart_id: ChartId) -> Option<&ChartHead> {
        self.charts.get(&chart_id)
    }

    /// Returns the head of every chart with at least one sealed event.
    pub fn heads(&self) -> impl Iterator<Item = crate::log::RecordedHead> + '_ {
        self.charts
            .iter()
            .filter(|(_, head)| head.seq.0 > 0)
            .map(|(chart_id, head)| (*chart_id, head.seq, head.digest))
    }

    /// Returns the current state of a resource.
    pub fn resource(&self, resource_type: &str, resource_id: &str) -> Option<&ResourceHead> {
        self.resources
            .get(&(resource_type.to_owned(), resource_id.to_owned()))
    }

    /// Returns whether a resource exists and is not deleted.
    pub fn is_live(&self, resource_type: &str, resource_id: &str) -> bool {
        self.resource(resource_type, resource_id)
            .is_some_and(|head| !head.deleted)
    }

    /// Returns the chart of a patient.
    pub fn patient_chart(&self, patient_id: &str) -> Option<ChartId> {
        self.patients.get(patient_id).copied()
    }

    /// Returns the stored results when `command` repeats a command id that was applied
    /// before, or an error when the id was applied for another actor or another request.
    ///
    /// # Errors
    ///
    /// [`CommandError::CommandIdReused`].
    pub fn repeated_results(
        &self,
        command: &Command,
    ) -> Option<Result<Vec<OperationResult>, CommandError>> {
        let command_id = command.command_id?;
        let record = self.commands.get(&command_id)?;
        let same_request = match (record.fingerprint, command.fingerprint) {
            (Some(first), Some(again)) => first == again,
            // Events written before they carried the request's digest: the id is matched by
            // actor alone.
            _ => true,
        };
        if record.actor != command.actor || !same_request {
            return Some(Err(CommandError::CommandIdReused(command_id)));
        }
        Some(Ok(record.results.clone()))
    }

    /// Lowers the largest resource an event may carry to what the log can store in one entry.
    pub fn set_resource_limit(&mut self, limit: Option<usize>) {
        self.resource_limit = limit.map(|limit| limit.min(super::MAX_RESOURCE_BYTES));
    }

    /// Returns the number of charts.
    pub fn chart_count(&self) -> usize {
        self.charts.len()
    }

    /// Sets a chart's data key once it has been created.
    pub fn set_chart_key(&mut self, chart_id: ChartId, key_id: KeyId) {
        if let Some(head) = self.charts.get_mut(&chart_id) {
            head.key_id = Some(key_id);
        }
    }

    /// Sets a chart's head digest after its event was sealed and appended.
    pub fn set_chart_digest(&mut self, chart_id: ChartId, digest: [u8; 32]) {
        if let Some(head) = self.charts.get_mut(&chart_id) {
            head.digest = digest;
        }
    }

    /// Reverts every change recorded in `journal`, newest first.
    pub fn undo(&mut self, journal: UndoJournal) {
        for entry in journal.0.into_iter().rev() {
            match entry {
                Undo::Chart(chart_id, previous) => restore(&mut self.charts, chart_id, previous),
                Undo::Resource(key, previous) => restore(&mut self.resources, key, previous),
                Undo::Patient(patient_id, previous) => {
                    restore(&mut self.patients, patient_id, previous)
                }
                Undo::Command(command_id) => {
                    self.commands.remove(&command_id);
                }
                Undo::Clock(previous) => self.clock = previous,
            }
        }
    }

    fn tick(&mut self, journal: &mut UndoJournal, wall_micros: i64) -> HlcTimestamp {
        journal.0.push(Undo::Clock(self.clock));
        self.clock = self.clock.advance(wall_micros);
        self.clock
    }

    fn next_seq(&mut self, journal: &mut UndoJournal, chart_id: ChartId) -> EventSeq {
        let previous = self.charts.get(&chart_id).cloned();
        journal.0.push(Undo::Chart(chart_id, previous.clone()));
        let head = self.charts.entry(chart_id).or_insert(ChartHead {
            seq: EventSeq(0),
            digest: [0; 32],
            key_id: None,
        });
        head.seq = head.seq.next();
        head.seq
    }

    fn set_resource(
        &mut self,
        journal: &mut UndoJournal,
        key: (String, String),
        head: ResourceHead,
    ) {
        let previous = self.resources.insert(key.clone(), head);
        journal.0.push(Undo::Resource(key, previous));
    }

    /// Checks a command against the state and plans its events, changing the state as if they
    /// were appended. Undo entries go to `journal`; on error the command's own changes are
    /// already reverted.
    ///
    /// # Errors
    ///
    /// [`CommandError`] when any operation's precondition fails.
    pub fn plan(
        &mut self,
        command: &Command,
        wall_micros: i64,
        journal: &mut UndoJournal,
    ) -> Result<(Vec<PlannedEvent>, Vec<OperationResult>), CommandError> {
        let mut own = UndoJournal::default();
        match self.plan_operations(command, wall_micros, &mut own) {
            Ok(planned) => {
                journal.0.append(&mut own.0);
                Ok(planned)
            }
            Err(error) => {
                self.undo(own);
                Err(error)
            }
        }
    }

    fn plan_operations(
        &mut self,
        command: &Command,
        wall_micros: i64,
        journal: &mut UndoJournal,
    ) -> Result<(Vec<PlannedEvent>, Vec<OperationResult>), CommandError> {
        let mut events = Vec::new();
        let mut results = Vec::new();
        for operation in &command.operations {
            let result = match operation {
                Operation::Record {
                    resource_type,
                    resource_id,
                    resource,
                    chart,
                    if_match,
                    create_only,
                    references,
                } => {
                    let request = RecordRequest {
                        resource_type,
                        resource_id,
                        resource,
                        chart,
                        if_match: *if_match,
                        create_only: *create_only,
                        references,
                    };
                    self.plan_record(request, wall_micros, journal, &mut events)?
                }
                Operation::Retract {
                    resource_type,
                    resource_id,
                    if_match,
                } => self.plan_retract(
                    resource_type,
                    resource_id,
                    *if_match,
                    wall_micros,
                    journal,
                    &mut events,
                )?,
                Operation::Access { chart_id, access } => {
                    self.plan_access(*chart_id, access, wall_micros, journal, &mut events)
                }
            };
            results.push(result);
        }
        if let Some(command_id) = command.command_id {
            // The events carry the request's digest, so a writer that rebuilds its state from
            // the log still distinguishes a repeated request from another one under the same id.
            for event in &mut events {
                match &mut event.payload {
                    EventPayload::ResourceRecorded(recorded) => {
                        recorded.command_fingerprint = command.fingerprint;
                    }
                    EventPayload::ResourceRetracted(retracted) => {
                        retracted.command_fingerprint = command.fingerprint;
                    }
                    EventPayload::ChartOpened(_) | EventPayload::ChartAccessed(_) => {}
                }
            }
            let record = CommandRecord {
                actor: command.actor.clone(),
                fingerprint: command.fingerprint,
                results: results.clone(),
            };
            self.commands.insert(command_id, record);
            journal.0.push(Undo::Command(command_id));
        }
        Ok((events, results))
    }

    fn resolve_chart(
        &mut self,
        target: &ChartTarget,
        resource_type: &str,
        wall_micros: i64,
        journal: &mut UndoJournal,
        events: &mut Vec<PlannedEvent>,
    ) -> Result<ChartId, CommandError> {
        match target {
            ChartTarget::Directory => {
                if !self.charts.contains_key(&ChartId::DIRECTORY) {
                    self.open_chart(
                        ChartId::DIRECTORY,
                        ChartKind::Directory,
                        "",
                        wall_micros,
                        journal,
                        events,
                    );
                }
                Ok(ChartId::DIRECTORY)
            }
            ChartTarget::Patient(patient_id) => {
                if let Some(chart_id) = self.patients.get(patient_id) {
                    return Ok(*chart_id);
                }
                if resource_type != "Patient" {
                    return Err(CommandError::NotFound {
                        resource_type: "Patient".into(),
                        resource_id: patient_id.clone(),
                    });
                }
                let chart_id = ChartId::random();
                self.open_chart(
                    chart_id,
                    ChartKind::Patient,
                    patient_id,
                    wall_micros,
                    journal,
                    events,
                );
                let previous = self.patients.insert(patient_id.clone(), chart_id);
                journal.0.push(Undo::Patient(patient_id.clone(), previous));
                Ok(chart_id)
            }
        }
    }

    fn open_chart(
        &mut self,
        chart_id: ChartId,
        kind: ChartKind,
        patient_id: &str,
        wall_micros: i64,
        journal: &mut UndoJournal,
        events: &mut Vec<PlannedEvent>,
    ) {
        let seq = self.next_seq(journal, chart_id);
        let recorded_at = self.tick(journal, wall_micros);
        events.push(PlannedEvent {
            chart_id,
            seq,
            recorded_at,
            payload: EventPayload::ChartOpened(ChartOpened {
                kind,
                patient_id: patient_id.to_owned(),
            }),
        });
    }

    fn plan_record(
        &mut self,
        request: RecordRequest<'_>,
        wall_micros: i64,
        journal: &mut UndoJournal,
        events: &mut Vec<PlannedEvent>,
    ) -> Result<OperationResult, CommandError> {
        let RecordRequest {
            resource_type,
            resource_id,
            resource,
            chart,
            if_match,
            create_only,
            references,
        } = request;
        let key = (resource_type.to_owned(), resource_id.to_owned());
        let existing = self.resources.get(&key).cloned();

        if create_only && existing.is_some() {
            return Err(CommandError::AlreadyExists {
                resource_type: resource_type.to_owned(),
                resource_id: resource_id.to_owned(),
            });
        }
        if let Some(expected) = if_match {
            let actual = existing.as_ref().map_or(0, |head| head.version);
            let stale = existing.as_ref().is_none_or(|head| head.deleted) || actual != expected;
            if stale {
                return Err(CommandError::VersionConflict {
                    resource_type: resource_type.to_owned(),
                    resource_id: resource_id.to_owned(),
                    expected,
                    actual,
                });
            }
        }
        for (target_type, target_id) in references {
            let is_self = target_type == resource_type && target_id == resource_id;
            if !is_self && !self.is_live(target_type, target_id) {
                return Err(CommandError::DanglingReference {
                    path: resource_type.to_owned(),
                    resource_type: target_type.clone(),
                    resource_id: target_id.clone(),
                });
            }
        }

        let chart_id = self.resolve_chart(chart, resource_type, wall_micros, journal, events)?;
        if let Some(head) = &existing {
            if head.chart_id != chart_id {
                return Err(CommandError::ChartChange {
                    resource_type: resource_type.to_owned(),
                    resource_id: resource_id.to_owned(),
                });
            }
        }

        let version = existing.as_ref().map_or(1, |head| head.version + 1);
        let created = existing.as_ref().is_none_or(|head| head.deleted);
        let seq = self.next_seq(journal, chart_id);
        let recorded_at = self.tick(journal, wall_micros);
        let last_updated = format_instant(recorded_at);

        let mut stored = resource.clone();
        stored.insert(
            "id".into(),
            serde_json::Value::String(resource_id.to_owned()),
        );
        let meta = stored
            .entry("meta")
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let serde_json::Value::Object(meta) = meta {
            meta.insert(
                "versionId".into(),
                serde_json::Value::String(version.to_string()),
            );
            meta.insert(
                "lastUpdated".into(),
                serde_json::Value::String(last_updated.clone()),
            );
        }
        let resource_json = serde_json::Value::Object(stored).to_string();
        let limit = self.resource_limit.unwrap_or(super::MAX_RESOURCE_BYTES);
        if resource_json.len() > limit {
            return Err(CommandError::TooLarge {
                resource_type: resource_type.to_owned(),
                bytes: resource_json.len(),
                limit,
            });
        }

        events.push(PlannedEvent {
            chart_id,
            seq,
            recorded_at,
            payload: EventPayload::ResourceRecorded(ResourceRecorded {
                resource_type: resource_type.to_owned(),
                resource_id: resource_id.to_owned(),
                version,
                resource_json,
                command_fingerprint: None,
            }),
        });
        self.set_resource(
            journal,
            key,
            ResourceHead {
                chart_id,
                version,
                deleted: false,
            },
        );
        Ok(OperationResult::Recorded {
            resource_type: resource_type.to_owned(),
            resource_id: resource_id.to_owned(),
            version,
            created,
            last_updated,
        })
    }

    fn plan_retract(
        &mut self,
        resource_type: &str,
        resource_id: &str,
        if_match: Option<u64>,
        wall_micros: i64,
        journal: &mut UndoJournal,
        events: &mut Vec<PlannedEvent>,
    ) -> Result<OperationResult, CommandError> {
        let key = (resource_type.to_owned(), resource_id.to_owned());
        let existing = self.resources.get(&key).cloned();
        if let Some(expected) = if_match {
            let actual = existing.as_ref().map_or(0, |head| head.version);
            if actual != expected || existing.as_ref().is_some_and(|head| head.deleted) {
                return Err(CommandError::VersionConflict {
                    resource_type: resource_type.to_owned(),
                    resource_id: resource_id.to_owned(),
                    expected,
                    actual,
                });
            }
        }
        let Some(head) = existing.filter(|head| !head.deleted) else {
            // Deleting what does not exist, or is already deleted, succeeds without an event.
            return Ok(OperationResult::Retracted {
                resource_type: resource_type.to_owned(),
                resource_id: resource_id.to_owned(),
                version: None,
            });
        };
        let version = head.version + 1;
        let seq = self.next_seq(journal, head.chart_id);
        let recorded_at = self.tick(journal, wall_micros);
        events.push(PlannedEvent {
            chart_id: head.chart_id,
            seq,
            recorded_at,
            payload: EventPayload::ResourceRetracted(ResourceRetracted {
                resource_type: resource_type.to_owned(),
                resource_id: resource_id.to_owned(),
                version,
                command_fingerprint: None,
            }),
        });
        self.set_resource(
            journal,
            key,
            ResourceHead {
                chart_id: head.chart_id,
                version,
                deleted: true,
            },
        );
        Ok(OperationResult::Retracted {
            resource_type: resource_type.to_owned(),
            resource_id: resource_id.to_owned(),
            version: Some(version),
        })
    }

    fn plan_access(
        &mut self,
        chart_id: ChartId,
        access: &ChartAccessed,
        wall_micros: i64,
        journal: &mut UndoJournal,
        events: &mut Vec<PlannedEvent>,
    ) -> OperationResult {
        let seq = self.next_seq(journal, chart_id);
        let recorded_at = self.tick(journal, wall_micros);
        events.push(PlannedEvent {
            chart_id,
            seq,
            recorded_at,
            payload: EventPayload::ChartAccessed(access.clone()),
        });
        OperationResult::Accessed
    }

    /// Replays one event from the log into the state, at start-up. `digest` is the event's
    /// digest. Events must come in log order.
    pub fn replay(
        &mut self,
        header: &chartlog_schemas::EventHeader,
        payload: &EventPayload,
        digest: [u8; 32],
    ) {
        let chart_id = header.chart_id;
        self.charts.insert(
            chart_id,
            ChartHead {
                seq: header.seq,
                digest,
                key_id: Some(header.key_id),
            },
        );
        if header.recorded_at > self.clock {
            self.clock = header.recorded_at;
        }
        let result = match payload {
            EventPayload::ChartOpened(opened) => {
                if opened.kind == ChartKind::Patient {
                    self.patients.insert(opened.patient_id.clone(), chart_id);
                }
                None
            }
            EventPayload::ResourceRecorded(recorded) => {
                let key = (recorded.resource_type.clone(), recorded.resource_id.clone());
                let created = self.resources.get(&key).is_none_or(|head| head.deleted);
                self.resources.insert(
                    key,
                    ResourceHead {
                        chart_id,
                        version: recorded.version,
                        deleted: false,
                    },
                );
                Some(OperationResult::Recorded {
                    resource_type: recorded.resource_type.clone(),
                    resource_id: recorded.resource_id.clone(),
                    version: recorded.version,
                    created,
                    last_updated: format_instant(header.recorded_at),
                })
            }
            EventPayload::ResourceRetracted(retracted) => {
                let key = (
                    retracted.resource_type.clone(),
                    retracted.resource_id.clone(),
                );
                self.resources.insert(
                    key,
                    ResourceHead {
                        chart_id,
                        version: retracted.version,
                        deleted: true,
                    },
                );
                Some(OperationResult::Retracted {
                    resource_type: retracted.resource_type.clone(),
                    resource_id: retracted.resource_id.clone(),
                    version: Some(retracted.version),
                })
            }
            EventPayload::ChartAccessed(_) => Some(OperationResult::Accessed),
        };
        if let (Some(command_id), Some(result)) = (header.command_id, result) {
            let fingerprint = match payload {
                EventPayload::ResourceRecorded(recorded) => recorded.command_fingerprint,
                EventPayload::ResourceRetracted(retracted) => retracted.command_fingerprint,
                EventPayload::ChartOpened(_) | EventPayload::ChartAccessed(_) => None,
            };
            let record = self
                .commands
                .entry(command_id)
                .or_insert_with(|| CommandRecord {
                    actor: header.actor.clone(),
                    fingerprint: None,
                    results: Vec::new(),
                });
            record.fingerprint = record.fingerprint.or(fingerprint);
            record.results.push(result);
        }
    }
}

struct RecordRequest<'a> {
    resource_type: &'a str,
    resource_id: &'a str,
    resource: &'a serde_json::Map<String, serde_json::Value>,
    chart: &'a ChartTarget,
    if_match: Option<u64>,
    create_only: bool,
    references: &'a [(String, String)],
}

fn restore<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, previous: Option<V>) {
    match previous {
        Some(value) => {
            map.insert(key, value);
        }
        None => {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        resource_type: &str,
        id: &str,
        chart: ChartTarget,
        if_match: Option<u64>,
    ) -> Operation {
        Operation::Record {
            resource_type: resource_type.into(),
            resource_id: id.into(),
            resource: serde_json::Map::new(),
            chart,
            if_match,
            create_only: false,
            references: Vec::new(),
        }
    }

    fn command(operations: Vec<Operation>) -> Command {
        Command {
            actor: "dr-1".into(),
            purpose_of_use: "TREAT".into(),
            command_id: None,
            fingerprint: None,
            operations,
        }
    }

    /// Runs a command and keeps its effects, as a successful append would.
    fn given(state: &mut WriterState, operations: Vec<Operation>) -> Vec<PlannedEvent> {
        let mut journal = UndoJournal::default();
        state
            .plan(&command(operations), 1_000, &mut journal)
            .unwrap()
            .0
    }

    fn patient(id: &str) -> ChartTarget {
        ChartTarget::Patient(id.into())
    }

    #[test]
    fn new_patient_opens_chart_then_records() {
        let mut state = WriterState::default();
        let events = given(
            &mut state,
            vec![record("Patient", "p1", patient("p1"), None)],
        );
        let types: Vec<EventType> = events.iter().map(PlannedEvent::event_type).collect();
        assert_eq!(
            types,
            vec![EventType::ChartOpened, EventType::ResourceRecorded]
        );
        assert_eq!(events[0].seq, EventSeq(1));
        assert_eq!(events[1].seq, EventSeq(2));
        assert!(
            events[1].recorded_at > events[0].recorded_at,
            "time moves forward in a chart"
        );
    }

    #[test]
    fn stale_if_match_is_version_conflict() {
        let mut state = WriterState::default();
        given(
            &mut state,
            vec![record("Patient", "p1", patient("p1"), None)],
        );
        given(
            &mut state,
            vec![record("Patient", "p1", patient("p1"), Some(1))],
        );
        let mut journal = UndoJournal::default();
        let error = state
            .plan(
                &command(vec![record("Patient", "p1", patient("p1"), Some(1))]),
                2_000,
                &mut journal,
            )
            .unwrap_err();
        assert_eq!(
            error,
            CommandError::VersionConflict {
                resource_type: "Patient".into(),
                resource_id: "p1".into(),
                expected: 1,
                actual: 2
            }
        );
    }

    #[test]
    fn failed_transaction_leaves_no_trace() {
        let mut state = WriterState::default();
        given(
            &mut state,
            vec![record("Patient", "p1", patient("p1"), None)],
        );
        let before_seq = state.chart(state.patient_chart("p1").unwrap()).unwrap().seq;
        let mut journal = UndoJournal::default();
        let failing = command(vec![
            record("Observation", "o1", patient("p1"), None),
            Operation::Retract {
                resource_type: "Patient".into(),
                resource_id: "p1".into(),
                if_match: None,
            },
            record("Observation", "o2", patient("missing"), None),
        ]);
        assert!(state.plan(&failing, 2_000, &mut journal).is_err());
        assert!(
            state.resource("Observation", "o1").is_none(),
            "o1 must be rolled back"
        );
        assert!(
            state.is_live("Patient", "p1"),
            "the delete must be rolled back"
        );
        let chart = state.patient_chart("p1").unwrap();
        assert_eq!(state.chart(chart).unwrap().seq, before_seq);
    }

    #[test]
    fn undo_journal_reverts_whole_batch() {
        let mut state = WriterState::default();
        let mut journal = UndoJournal::default();
        state
            .plan(
                &command(vec![record("Patient", "p1", patient("p1"), None)]),
                1,
                &mut journal,
            )
            .unwrap();
        state
            .plan(
                &command(vec![record("Observation", "o1", patient("p1"), None)]),
                2,
                &mut journal,
            )
            .unwrap();
        state.undo(journal);
        assert_eq!(state.chart_count(), 0);
        assert!(state.patient_chart("p1").is_none());
        assert!(state.resource("Observation", "o1").is_none());
    }

    #[test]
    fn delete_then_read_state_is_gone() {
        let mut state = WriterState::default();
        given(
            &mut state,
            vec![record("Patient", "p1", patient("p1"), None)],
        );
        let events = given(
            &mut state,
            vec![Operation::Retract {
                resource_type: "Patient".into(),
                resource_id: "p1".into(),
                if_match: Some(1),
            }],
        );
        assert_eq!(events.len(), 1);
        let head = state.resource("Patient", "p1").unwrap();
        assert!(head.deleted);
        assert_eq!(head.version, 2, "the delete takes a version of its own");
        let again = given(
            &mut state,
            vec![Operation::Retract {
                resource_type: "Patient".into(),
                resource_id: "p1".into(),
                if_match: None,
            }],
        );
        assert!(
            again.is_empty(),
            "deleting a deleted resource appends nothing"
        );
    }

    #[test]
    fn dangling_reference_is_rejected() {
        let mut state = WriterState::default();
        given(
            &mut state,
            vec![record("Patient", "p1", patient("p1"), None)],
        );
        let mut operation = record("Observation", "o1", patient("p1"), None);
        if let Operation::Record { references, .. } = &mut operation {
            references.push(("Practitioner".into(), "nobody".into()));
        }
        let mut journal = UndoJournal::default();
        let error = state
            .plan(&command(vec![operation]), 5, &mut journal)
            .unwrap_err();
        assert!(
            matches!(error, CommandError::DanglingReference { .. }),
            "{error}"
        );
    }

    #[test]
    fn instant_format_has_microseconds_and_zone() {
        let text = format_instant(HlcTimestamp {
            wall_micros: 1_764_806_400_123_456,
            logical: 0,
        });
        assert_eq!(text, "2025-12-04T00:00:00.123456Z");
    }
}
