//! Offline verification of a whole log: every envelope's layout, digest and signature, every
//! chart's sequence numbering, hash chain and timestamps, that every payload decrypts, and that
//! each chart ends where its recorded head says.
//!
//! [`verify_log`] reads each partition of the log in position order and keeps, per chart, the last sequence
//! number, digest and timestamp. It reports problems with the position, chart id and sequence
//! number involved, never with payload content.

use std::collections::{BTreeSet, HashMap};

use chartlog_schemas::{ChartId, EventSeq, HlcTimestamp, SignerId};

use crate::crypto::{self, KeyStore};
use crate::log::{partition_of, EventLog, LogPosition, RecordedHead};

/// The chart heads recorded beside a log, and how they relate to the entries read.
#[derive(Clone, Copy, Debug)]
pub enum HeadCheck<'a> {
    /// The log records no heads.
    Unrecorded,
    /// Heads read in one snapshot with the log, as the embedded log's are: each chart must end
    /// exactly at its head.
    AtEnd(&'a [RecordedHead]),
    /// Heads read before the log, as Kafka's are, while a writer may go on appending: each
    /// chart must reach its head with the digest recorded there, and may continue past it.
    Before(&'a [RecordedHead]),
}

/// Most problems listed before verification stops.
const MAX_PROBLEMS: usize = 20;

/// One integrity problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Log position of the entry, or of the gap.
    pub position: LogPosition,
    /// Chart of the entry, when its header could be read.
    pub chart_id: Option<ChartId>,
    /// Sequence number of the entry, when its header could be read.
    pub seq: Option<u64>,
    /// What failed.
    pub failure: String,
}

impl std::fmt::Display for Problem {
    /// Writes the problem; the alternate form (`{:#}`) names the position's partition even
    /// when it is 0, for logs of several partitions.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if f.alternate() {
            write!(f, "position {:#}", self.position)?;
        } else {
            write!(f, "position {}", self.position)?;
        }
        if let Some(chart_id) = self.chart_id {
            write!(f, ", chart {chart_id}")?;
        }
        if let Some(seq) = self.seq {
            write!(f, ", sequence {seq}")?;
        }
        write!(f, ": {}", self.failure)
    }
}

/// Result of verifying a log.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Partitions of the log read.
    pub partitions: u32,
    /// Entries read.
    pub events: u64,
    /// Charts seen.
    pub charts: usize,
    /// Signing keys seen.
    pub signers: BTreeSet<String>,
    /// Earliest timestamp.
    pub first_timestamp: Option<HlcTimestamp>,
    /// Latest timestamp.
    pub last_timestamp: Option<HlcTimestamp>,
    /// Problems, in log order; empty when the log verifies.
    pub problems: Vec<Problem>,
    /// Whether reading stopped after the most problems listed, so that the rest of the log
    /// and the recorded heads were not checked.
    pub stopped_early: bool,
    /// Each chart's last event as read.
    pub chart_ends: HashMap<ChartId, ChartEnd>,
}

/// A chart's last event as verification read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChartEnd {
    /// Its sequence number.
    pub seq: EventSeq,
    /// Its digest.
    pub digest: [u8; 32],
    /// Its position.
    pub position: LogPosition,
}

impl VerifyReport {
    /// Returns whether the log verified.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct ChartTail {
    seq: EventSeq,
    digest: [u8; 32],
    recorded_at: HlcTimestamp,
    position: LogPosition,
}

/// Verifies every entry of `log` with the keys in `keys`, and each chart against its head as
/// recorded with the appends.
///
/// # Errors
///
/// Fails only when the log cannot be read; integrity problems are in the report.
pub fn verify_log(
    log: &dyn EventLog,
    keys: &KeyStore,
    heads: HeadCheck<'_>,
) -> Result<VerifyReport, crate::log::ReadError> {
    let mut report = VerifyReport::default();
    let mut tails: HashMap<ChartId, ChartTail> = HashMap::new();
    // For heads read before the log: each chart's recorded head, and once the chart reached
    // that sequence number, whether the event there has the recorded digest.
    let earlier: HashMap<ChartId, (EventSeq, [u8; 32])> = match heads {
        HeadCheck::Before(heads) => heads
            .iter()
            .map(|(chart_id, seq, digest)| (*chart_id, (*seq, *digest)))
            .collect(),
        _ => HashMap::new(),
    };
    let mut reached: HashMap<ChartId, (LogPosition, bool)> = HashMap::new();
    let partitions = log.partitions();
    report.partitions = partitions;
    // Where each partition's reading ended: a chart missing from the log is reported there.
    let mut ends = vec![0u64; partitions as usize];

    'read: for partition in 0..partitions {
        let mut from = LogPosition::new(partition, 0);
        loop {
            let entries = log.read_from(from, 4096)?;
            if entries.is_empty() {
                break;
            }
            for (position, envelope) in &entries {
                let expected = from.offset;
                from = position.next();
                report.events += 1;
                if log.is_dense() && position.offset != expected {
                    report.problems.push(Problem {
                        position: LogPosition::new(partition, expected),
                        chart_id: None,
                        seq: None,
                        failure: format!(
                            "log entries at positions {expected} to {} are missing",
                            position.offset - 1
                        ),
                    });
                }
                ends[partition as usize] = position.offset + 1;
                let read = check_entry(
                    *position,
                    partitions,
                    &envelope.0,
                    keys,
                    &mut tails,
                    &mut report,
                );
                if let Some((chart_id, seq, digest)) = read {
                    if let Some((head_seq, head_digest)) = earlier.get(&chart_id) {
                        if *head_seq == seq {
                            reached.insert(chart_id, (*position, digest == *head_digest));
                        }
                    }
                }
                if report.problems.len() >= MAX_PROBLEMS {
                    report.stopped_early = true;
                    break 'read;
                }
            }
        }
    }
    let end_of = |chart_id: ChartId| {
        let partition = partition_of(chart_id, partitions);
        LogPosition::new(partition, ends[partition as usize])
    };

    if report.stopped_early {
        // Charts read only in part would all look as if their last events were removed.
        report.charts = tails.len();
        return Ok(report);
    }
    // Charts with a problem already reported: an altered or forged event there also leaves the
    // chart short of its head, which is not a removal.
    let damaged: std::collections::HashSet<ChartId> = report
        .problems
        .iter()
        .filter_map(|problem| problem.chart_id)
        .collect();
    if let HeadCheck::Before(heads) = heads {
        for (chart_id, seq, _) in heads {
            let failure = match reached.get(chart_id) {
                Some((_, true)) => continue,
                None if damaged.contains(chart_id) => Problem {
                    position: tails
                        .get(chart_id)
                        .map_or_else(|| end_of(*chart_id), |tail| tail.position),
                    chart_id: Some(*chart_id),
                    seq: Some(seq.0),
                    failure: format!(
                        "chart does not reach its recorded head, sequence {seq}, because of the problems above"
                    ),
                },
                Some((position, false)) => Problem {
                    position: *position,
                    chart_id: Some(*chart_id),
                    seq: Some(seq.0),
                    failure: "the chart's event at its recorded head is not the one the head names: the event was replaced".into(),
                },
                None => {
                    let tail = tails.get(chart_id);
                    let (position, found) = tail
                        .map_or((end_of(*chart_id), 0), |tail| (tail.position, tail.seq.0));
                    Problem {
                        position,
                        chart_id: Some(*chart_id),
                        seq: Some(found),
                        failure: format!(
                            "chart ends at sequence {found} but its recorded head is sequence {seq}: events were removed from its end"
                        ),
                    }
                }
            };
            report.problems.push(failure);
        }
    }
    if let HeadCheck::AtEnd(heads) = heads {
        for (chart_id, seq, digest) in heads {
            let tail = tails.get(chart_id);
            let matches = tail.is_some_and(|tail| tail.seq == *seq && tail.digest == *digest);
            if !matches {
                let (position, found) =
                    tail.map_or((end_of(*chart_id), 0), |tail| (tail.position, tail.seq.0));
                let failure = if damaged.contains(chart_id) {
                    format!(
                        "chart ends at sequence {found} but its recorded head is sequence {seq}, because of the problems above"
                    )
                } else if found > seq.0 {
                    format!(
                        "chart continues to sequence {found} past its recorded head, sequence {seq}: the recorded heads were rolled back or altered"
                    )
                } else if found == seq.0 {
                    format!(
                        "the chart's last event (sequence {found}) is not the one its recorded head names: the event was replaced"
                    )
                } else {
                    format!(
                        "chart ends at sequence {found} but its recorded head is sequence {seq}: events were removed from its end"
                    )
                };
                report.problems.push(Problem {
                    position,
                    chart_id: Some(*chart_id),
                    seq: Some(found),
                    failure,
                });
            }
        }
    }
    report.charts = tails.len();
    report.chart_ends = tails
        .into_iter()
        .map(|(chart_id, tail)| {
            let end = ChartEnd {
                seq: tail.seq,
                digest: tail.digest,
                position: tail.position,
            };
            (chart_id, end)
        })
        .collect();
    Ok(report)
}

/// Returns a problem for each chart whose recorded head, read after the log, is behind the
/// last event read, or names another event at the same sequence number. Every append records
/// its charts' heads in the same transaction as their events, so heads read after the log
/// reach at least as far. A head behind was rolled back to an earlier one, which heads read
/// before the log cannot reveal. A chart without a recorded head is not a problem here, since
/// logs written before heads were recorded have none until the next take-over.
pub fn heads_behind(report: &VerifyReport, heads_after: &[RecordedHead]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (chart_id, seq, digest) in heads_after {
        let Some(end) = report.chart_ends.get(chart_id) else {
            continue;
        };
        let failure = if seq.0 < end.seq.0 {
            format!(
                "chart continues to sequence {} but its recorded head, read after the log, is sequence {seq}: the recorded heads were rolled back or altered",
                end.seq
            )
        } else if *seq == end.seq && *digest != end.digest {
            "the chart's last event is not the one its recorded head names: the event or the head was replaced".into()
        } else {
            continue;
        };
        problems.push(Problem {
            position: end.position,
            chart_id: Some(*chart_id),
            seq: Some(end.seq.0),
            failure,
        });
    }
    problems.sort_by_key(|problem| problem.position);
    problems
}

/// Checks one entry and moves its chart's tail on. Returns the entry's chart, sequence number
/// and digest when its signature held.
fn check_entry(
    position: LogPosition,
    partitions: u32,
    bytes: &[u8],
    keys: &KeyStore,
    tails: &mut HashMap<ChartId, ChartTail>,
    report: &mut VerifyReport,
) -> Option<(ChartId, EventSeq, [u8; 32])> {
    let problem = |chart_id, seq, failure: String| Problem {
        position,
        chart_id,
        seq,
        failure,
    };
    let parsed = match chartlog_schemas::envelope::parse(bytes) {
        Ok(parsed) => parsed,
        Err(error) => {
            report.problems.push(problem(
                None,
                None,
                format!("envelope layout invalid: {error}"),
            ));
            return None;
        }
    };
    let header = parsed.header.clone();
    let chart_id = Some(header.chart_id);
    let seq = Some(header.seq.0);
    let home = partition_of(header.chart_id, partitions);
    let misplaced = home != position.partition;
    if misplaced {
        report.problems.push(problem(
            chart_id,
            seq,
            format!("the chart's events belong in partition {home} of {partitions}, not here"),
        ));
    }

    let checked = match crypto::check_envelope(bytes, keys.trusted_signers()) {
        Ok(checked) => checked,
        Err(error) => {
            report
                .problems
                .push(problem(chart_id, seq, describe(&error)));
            return None;
        }
    };
    report.signers.insert(signer_text(header.signer));

    match keys.data_key(header.key_id) {
        Ok(data_key) => {
            if let Err(error) = crypto::open_payload(&checked, &data_key) {
                report.problems.push(problem(
                    chart_id,
                    seq,
                    format!("payload does not decrypt: {error}"),
                ));
            }
        }
        Err(error) => report.problems.push(problem(
            chart_id,
            seq,
            format!("data key unavailable: {error}"),
        )),
    }

    if misplaced {
        // Not part of its chart's chain, which is checked in its own partition: taking it as
        // the chart's latest event would blame the genuine events read after it.
        return None;
    }
    let previous = tails.get(&header.chart_id);
    let expected_seq = previous.map_or(EventSeq::FIRST, |tail| tail.seq.next());
    if header.seq != expected_seq {
        report.problems.push(problem(
            chart_id,
            seq,
            format!(
                "expected sequence number {expected_seq} in this chart, found {}",
                header.seq
            ),
        ));
    }
    let expected_digest = previous.map_or([0u8; 32], |tail| tail.digest);
    if header.prev_digest != expected_digest {
        report.problems.push(problem(
            chart_id,
            seq,
            "hash chain broken: previous-digest does not match the chart's preceding event".into(),
        ));
    }
    if let Some(tail) = previous {
        if header.recorded_at < tail.recorded_at {
            report.problems.push(problem(
                chart_id,
                seq,
                "timestamp earlier than the chart's preceding event".into(),
            ));
        }
    }

    report.first_timestamp = Some(
        report
            .first_timestamp
            .map_or(header.recorded_at, |first| first.min(header.recorded_at)),
    );
    report.last_timestamp = Some(
        report
            .last_timestamp
            .map_or(header.recorded_at, |last| last.max(header.recorded_at)),
    );
    tails.insert(
        header.chart_id,
        ChartTail {
            seq: header.seq,
            digest: parsed.digest,
            recorded_at: header.recorded_at,
            position,
        },
    );
    Some((header.chart_id, header.seq, parsed.digest))
}

fn describe(error: &crypto::CryptoError) -> String {
    match error {
        crypto::CryptoError::DigestMismatch => {
            "digest mismatch: the entry's bytes were altered".into()
        }
        crypto::CryptoError::BadSignature(signer) => {
            format!("signature by {signer} does not verify")
        }
        crypto::CryptoError::UnknownSigner(signer) => format!("signed by untrusted key {signer}"),
        other => other.to_string(),
    }
}

fn signer_text(signer: SignerId) -> String {
    signer.to_string()
}

#[cfg(test)]
mod tests {
    use super::Problem;
    use crate::log::LogPosition;

    #[test]
    fn problem_display_names_partition() {
        let problem = Problem {
            position: LogPosition::new(0, 7),
            chart_id: None,
            seq: Some(2),
            failure: "hash chain broken".into(),
        };
        assert_eq!(
            problem.to_string(),
            "position 7, sequence 2: hash chain broken"
        );
        assert_eq!(
            format!("{problem:#}"),
            "position 0:7, sequence 2: hash chain broken"
        );
    }
}
