//! `chartlog-replay`: the compliance officer's command line. `verify` proves offline that the
//! log was not altered; `rebuild` throws a projection away and rebuilds it from the log.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use chartlog::crypto::keystore::{KeyPaths, KeyStoreError};
use chartlog::crypto::KeyStore;
use chartlog::log::key_topic::KeyTopic;
use chartlog::log::{EmbeddedLog, EventLog, KafkaConfig, KafkaLog, LogPosition};
use chartlog::node::NodeConfig;
use chartlog::verify::{verify_log, HeadCheck, VerifyReport};
use chartlog_schemas::{Envelope, HlcTimestamp};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chartlog-replay",
    version,
    about = "Verify and replay a Chartlog log"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Checks every signature, hash-chain link, sequence number and payload of the log, and
    /// that each chart ends at its recorded head. Exits 0 when all hold, 1 when any does not,
    /// and 2 when the log or the keys cannot be read.
    /// Safe to run while a server uses the data directory.
    Verify {
        /// Data directory of the node.
        #[arg(long, default_value = "./chartlog-data")]
        data: PathBuf,
        /// Key-encryption key file [default: DATA/keys/kek.key].
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// File of trusted Ed25519 public keys, hex, one per line, kept apart from the data
        /// directory; only their signatures are accepted [default: DATA/keys/trusted-signers].
        #[arg(long)]
        trusted_signers: Option<PathBuf>,
        /// Log to verify: embedded (in the data directory) or kafka (the topic named by the
        /// CHARTLOG_KAFKA_* variables, read without disturbing its writer).
        #[arg(long, env = "CHARTLOG_LOG_BACKEND", default_value = "embedded")]
        log_backend: String,
    },
    /// Copies a log byte for byte between the embedded log of a data directory and the Kafka
    /// topic named by the CHARTLOG_KAFKA_* variables. The target must be empty and no server
    /// may run; the keys stay in the data directory, which reads both copies.
    Copy {
        /// Data directory of the node.
        #[arg(long, default_value = "./chartlog-data")]
        data: PathBuf,
        /// Direction: to-kafka (embedded to Kafka) or from-kafka (Kafka to embedded).
        #[arg(long)]
        direction: String,
    },
    /// Deletes the chart projection and rebuilds it from the log. The server must be stopped.
    Rebuild {
        /// Data directory of the node.
        #[arg(long, default_value = "./chartlog-data")]
        data: PathBuf,
        /// Key-encryption key file [default: DATA/keys/kek.key].
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Log to rebuild from: embedded or kafka (the topic named by the CHARTLOG_KAFKA_*
        /// variables).
        #[arg(long, env = "CHARTLOG_LOG_BACKEND", default_value = "embedded")]
        log_backend: String,
    },
}

fn main() {
    let cli: Cli = chartlog::parse_command_line("chartlog-replay");
    let outcome = match cli.command {
        Commands::Verify {
            data,
            key_file,
            trusted_signers,
            log_backend,
        } => verify(&data, key_file, trusted_signers.as_deref(), &log_backend),
        Commands::Copy { data, direction } => copy(&data, &direction),
        Commands::Rebuild {
            data,
            key_file,
            log_backend,
        } => rebuild(&data, key_file, &log_backend),
    };
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("chartlog-replay: {}", chartlog::one_line(&error));
            std::process::exit(2);
        }
    }
}

fn open_keys(
    data: &Path,
    key_file: Option<PathBuf>,
    pinned: Option<chartlog::crypto::TrustedSigners>,
) -> anyhow::Result<KeyStore> {
    if !data.is_dir() {
        anyhow::bail!("data directory {} does not exist", data.display());
    }
    let keys = match KeyStore::open_read_only(&KeyPaths::under(data, key_file), pinned) {
        Err(error @ KeyStoreError::NoTrustedSigners(_)) => {
            anyhow::bail!("{error}; name the signers to trust with --trusted-signers FILE")
        }
        opened => {
            opened.with_context(|| format!("cannot open the key store of {}", data.display()))?
        }
    };
    // A wrong key-encryption key would fail every payload as a problem of the log; it is a
    // problem of the keys given.
    if let Some(key_id) = keys.key_ids().context("cannot read the key store")?.first() {
        if let Err(error @ KeyStoreError::Unwrap(..)) = keys.data_key(*key_id) {
            anyhow::bail!(
                "{error}; name the key-encryption key of this data directory with --key-file"
            );
        }
    }
    Ok(keys)
}

/// Returns an error naming the Kafka topic and the settings to pass when `data` has no
/// embedded log because its node writes to Kafka.
fn check_embedded_log(config: &NodeConfig, data: &Path) -> anyhow::Result<()> {
    if config.log_dir().is_dir() {
        return Ok(());
    }
    if let Some(topic) = chartlog::node::projected_kafka_topic(config) {
        anyhow::bail!(
            "{} belongs to a node on the Kafka topic {topic} and has no embedded log; pass --log-backend kafka and set CHARTLOG_KAFKA_BOOTSTRAP_SERVERS and CHARTLOG_KAFKA_TOPIC",
            data.display()
        );
    }
    Ok(())
}

fn format_timestamp(timestamp: Option<HlcTimestamp>) -> String {
    timestamp.map_or_else(
        || "none".to_owned(),
        chartlog::command::state::format_instant,
    )
}

fn print_report(report: &VerifyReport) {
    println!("events:          {}", report.events);
    println!("charts:          {}", report.charts);
    let signers: Vec<&str> = report.signers.iter().map(String::as_str).collect();
    println!(
        "signers:         {}",
        if signers.is_empty() {
            "none".to_owned()
        } else {
            signers.join(", ")
        }
    );
    println!(
        "first timestamp: {}",
        format_timestamp(report.first_timestamp)
    );
    println!(
        "last timestamp:  {}",
        format_timestamp(report.last_timestamp)
    );
}

/// Reads a file of hex Ed25519 public keys, one per line.
fn read_trusted_signers(path: &Path) -> anyhow::Result<chartlog::crypto::TrustedSigners> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read trusted signers file {}", path.display()))?;
    let mut trusted = chartlog::crypto::TrustedSigners::default();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
    {
        let mut key = [0u8; 32];
        let valid =
            hex::decode_to_slice(line.trim(), &mut key).is_ok() && trusted.add(&key).is_some();
        if !valid {
            anyhow::bail!(
                "{} line {}: expected a 64-character hex Ed25519 public key",
                path.display(),
                number + 1
            );
        }
    }
    Ok(trusted)
}

fn kafka_settings() -> anyhow::Result<KafkaConfig> {
    KafkaConfig::from_env(None)?.context(
        "set CHARTLOG_KAFKA_BOOTSTRAP_SERVERS (and CHARTLOG_KAFKA_TOPIC and CHARTLOG_KAFKA_PARTITIONS) to name the Kafka log",
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn verify(
    data: &Path,
    key_file: Option<PathBuf>,
    pinned: Option<&Path>,
    backend: &str,
) -> anyhow::Result<bool> {
    let pinned = pinned.map(read_trusted_signers).transpose()?;
    let keys = open_keys(data, key_file.clone(), pinned)?;
    let config = NodeConfig {
        data_dir: data.to_path_buf(),
        kek_file: key_file,
        kafka: None,
        url: None,
    };
    // Failures of the log as a whole, beside the problems of single entries.
    let mut failures = Vec::new();
    let report = match backend {
        "embedded" => {
            check_embedded_log(&config, data)?;
            // The projection before the log: a running server only moves both on, so a
            // projection found ahead of the log means the log lost entries.
            let applied = chartlog_projections::ChartProjection::read_position(
                &config.chart_projection_dir(),
                1,
            )
            .context("cannot read the chart projection's position")?
            .map(|positions| positions[0]);
            let log = EmbeddedLog::open_read_only(&config.log_dir())
                .with_context(|| format!("cannot open the log of {}", data.display()))?;
            let heads = log.chart_heads().context("cannot read the chart heads")?;
            let report =
                verify_log(&log, &keys, HeadCheck::AtEnd(&heads)).context("cannot read the log")?;
            let end = log.end_position().borrow().get(0);
            if let Some(applied) = applied.filter(|applied| *applied > end) {
                failures.push(format!(
                    "the chart projection has applied {applied} log entries but the log holds {end}: entries were lost from the end of the log"
                ));
            }
            report
        }
        "kafka" => {
            let settings = kafka_settings()?;
            let settings_topic = settings.topic.clone();
            let head_settings = settings.clone();
            let runtime = runtime()?;
            // Data keys of charts other nodes created come from the key topic.
            let key_topic = runtime
                .block_on(KeyTopic::open(&settings, false))
                .context("cannot open the key topic")?;
            keys.set_source(key_topic);
            let log = runtime
                .block_on(KafkaLog::open_reader(settings))
                .context("cannot open the Kafka log")?;
            // The heads are read first and the log after, so a writer that appends meanwhile
            // moves charts past their recorded heads, which the check allows.
            let records = chartlog::log::head_topic::read_heads_noting(&head_settings)
                .context("cannot read the chart heads of the Kafka log")?;
            if let Some(records) = &records {
                let name = chartlog::log::head_topic::head_topic_name(&settings_topic);
                if !records.tombstones.is_empty() {
                    failures.push(format!(
                        "the head topic {name} holds {} tombstones (first at offset {}), which Chartlog never writes: the charts they name have no recorded head, so events removed from their ends cannot be detected",
                        records.tombstones.len(),
                        records.tombstones[0]
                    ));
                }
                if !records.malformed.is_empty() {
                    failures.push(format!(
                        "the head topic {name} holds {} records that are not chart heads (first at offset {}), which Chartlog never writes",
                        records.malformed.len(),
                        records.malformed[0]
                    ));
                }
            }
            let heads = records.map(|records| records.heads);
            let check = heads
                .as_deref()
                .map_or(HeadCheck::Unrecorded, HeadCheck::Before);
            let mut report = verify_log(&log, &keys, check).context("cannot read the log")?;
            drop(log);
            if heads.is_some() && !report.stopped_early {
                report
                    .problems
                    .extend(heads_read_after(&report, &head_settings)?);
            }
            if heads.is_none() && report.events > 0 {
                failures.push(format!(
                    "the head topic {} is missing, so events removed from the end of a chart cannot be detected; a node re-creates it from the log when it next takes the log over",
                    chartlog::log::head_topic::head_topic_name(&settings_topic)
                ));
            }
            report
        }
        other => anyhow::bail!("unknown log backend {other}; expected embedded or kafka"),
    };
    print_report(&report);
    for failure in &failures {
        eprintln!("FAILED {failure}");
    }
    if report.is_ok() {
        if !failures.is_empty() {
            return Ok(false);
        }
        println!("verified: every signature, hash-chain link, sequence number and payload checks");
        return Ok(true);
    }
    for problem in &report.problems {
        // On a log of several partitions, a bare offset would leave its partition unclear.
        if report.partitions > 1 {
            eprintln!("FAILED {problem:#}");
        } else {
            eprintln!("FAILED {problem}");
        }
    }
    if report.stopped_early {
        eprintln!(
            "verification stopped after {} problems; the rest of the log and the recorded heads were not checked",
            report.problems.len()
        );
    }
    let count = report.problems.len();
    eprintln!(
        "verification failed: {count} {}; the first bad event is at {}",
        if count == 1 { "problem" } else { "problems" },
        report.problems[0]
    );
    Ok(false)
}

/// How often the heads are read again after the log before a head behind it counts.
const HEAD_REREADS: u32 = 5;

/// Reads the recorded heads again after the log and returns the charts whose head is behind
/// the events read. A transaction's commit reaches the head topic a moment after the event
/// topic, so a head behind is read again a few times, a second apart, before it counts.
fn heads_read_after(
    report: &VerifyReport,
    settings: &KafkaConfig,
) -> anyhow::Result<Vec<chartlog::verify::Problem>> {
    let mut attempt = 1;
    loop {
        let heads = chartlog::log::head_topic::read_heads(settings)
            .context("cannot read the chart heads of the Kafka log again")?
            .unwrap_or_default();
        let behind = chartlog::verify::heads_behind(report, &heads);
        if behind.is_empty() || attempt == HEAD_REREADS {
            return Ok(behind);
        }
        attempt += 1;
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Entries copied per append: one Kafka transaction or one synced RocksDB batch.
const COPY_BATCH: usize = 1000;

fn copy(data: &Path, direction: &str) -> anyhow::Result<bool> {
    if !matches!(direction, "to-kafka" | "from-kafka") {
        anyhow::bail!("unknown direction {direction}; expected to-kafka or from-kafka");
    }
    let config = NodeConfig {
        data_dir: data.to_path_buf(),
        kek_file: None,
        kafka: None,
        url: None,
    };
    let runtime = runtime()?;
    let settings = kafka_settings()?;
    let started = Instant::now();
    let keys: std::sync::Arc<KeyStore>;
    let (source, target): (Box<dyn EventLog>, Box<dyn EventLog>) = match direction {
        "to-kafka" => {
            check_embedded_log(&config, data)?;
            let source = EmbeddedLog::open(&config.log_dir(), false).with_context(|| {
                format!(
                    "cannot open the log of {}; stop the server first",
                    data.display()
                )
            })?;
            // The copied events' data keys go to the key topic with them, so every node on
            // the topic can open them.
            keys = std::sync::Arc::new(open_keys(data, None, None)?);
            let key_topic = runtime
                .block_on(KeyTopic::open(&settings, true))
                .context("cannot open the key topic")?;
            let mut target = runtime
                .block_on(KafkaLog::open(settings))
                .context("cannot open the Kafka log")?;
            target.attach_keys(keys.clone(), key_topic);
            (Box::new(source), Box::new(target))
        }
        "from-kafka" => {
            // The copied events' data keys come from the key topic into this directory's key
            // store, so the embedded copy can be read without the cluster.
            let paths = KeyPaths::under(data, None);
            if !paths.kek_file.exists() || !paths.signing_key().exists() {
                anyhow::bail!(
                    "{} lacks a node's key files; copying from Kafka needs keys/kek.key and keys/node-signing.key there to store the charts' data keys",
                    data.display()
                );
            }
            // Both key files exist, so opening creates the data key database alone.
            let (store, _) = KeyStore::open(&paths, true)
                .with_context(|| format!("cannot open the key store of {}", data.display()))?;
            let key_topic = runtime
                .block_on(KeyTopic::open(&settings, false))
                .context("cannot open the key topic")?;
            store.set_source(key_topic);
            keys = std::sync::Arc::new(store);
            let source = runtime
                .block_on(KafkaLog::open_reader(settings))
                .context("cannot open the Kafka log")?;
            let target = EmbeddedLog::open(&config.log_dir(), true)
                .with_context(|| format!("cannot open the log of {}", data.display()))?;
            (Box::new(source), Box::new(target))
        }
        other => anyhow::bail!("unknown direction {other}; expected to-kafka or from-kafka"),
    };
    for partition in 0..target.partitions() {
        if !target
            .read_from(LogPosition::new(partition, 0), 1)?
            .is_empty()
        {
            anyhow::bail!("the target log is not empty; copy only into an empty log");
        }
    }
    let mut merged = MergedReader::new(source.as_ref());
    let mut copied = 0usize;
    loop {
        let envelopes = merged.next_batch(COPY_BATCH)?;
        if envelopes.is_empty() {
            break;
        }
        // A copy whose data keys stay behind could be read by no one.
        for envelope in &envelopes {
            let Ok(parsed) = chartlog_schemas::envelope::parse(&envelope.0) else {
                continue;
            };
            let header = &parsed.header;
            keys.data_key(header.key_id).with_context(|| {
                format!(
                    "the data key {} of chart {} is missing from {}, so the copy could not be read; copy from a data directory that holds every chart's data key",
                    header.key_id,
                    header.chart_id,
                    if direction == "to-kafka" { "this directory's key store" } else { "the key topic" },
                )
            })?;
        }
        // The target places each envelope in its chart's partition.
        target
            .append_batch(&envelopes)
            .context("cannot append to the target log")?;
        copied += envelopes.len();
    }
    drop(target);
    drop(source);
    println!(
        "copied {copied} log entries {direction} in {} ms",
        started.elapsed().as_millis()
    );
    Ok(true)
}

/// Reads every partition of a log as one sequence, in the order the events were recorded:
/// by timestamp, which one writer issues in increasing order across the whole log. A log
/// copied from one partition into several and back is then the same, byte for byte.
struct MergedReader<'a> {
    log: &'a dyn EventLog,
    /// Per partition: entries read and not yet given, each with its timestamp, and the next
    /// position to read.
    buffers: Vec<(VecDeque<(HlcTimestamp, Envelope)>, LogPosition)>,
    /// Per partition, whether a read found nothing more: the copy runs with no writer, so
    /// the partition is not read again.
    exhausted: Vec<bool>,
}

impl<'a> MergedReader<'a> {
    fn new(log: &'a dyn EventLog) -> MergedReader<'a> {
        let buffers: Vec<_> = (0..log.partitions())
            .map(|partition| (VecDeque::new(), LogPosition::new(partition, 0)))
            .collect();
        let exhausted = vec![false; log.partitions() as usize];
        MergedReader {
            log,
            buffers,
            exhausted,
        }
    }

    /// Returns up to `max` envelopes, the earliest first; none once every partition is read.
    fn next_batch(&mut self, max: usize) -> anyhow::Result<Vec<Envelope>> {
        let mut batch = Vec::with_capacity(max);
        while batch.len() < max {
            let mut earliest: Option<(usize, HlcTimestamp)> = None;
            for index in 0..self.buffers.len() {
                let (buffer, next) = &mut self.buffers[index];
                if buffer.is_empty() && !self.exhausted[index] {
                    let entries = self.log.read_from(*next, COPY_BATCH)?;
                    self.exhausted[index] = entries.is_empty();
                    for (position, envelope) in entries {
                        *next = position.next();
                        // Bytes that are not an envelope sort first; verify reports them.
                        let recorded_at = chartlog_schemas::envelope::parse(&envelope.0)
                            .map(|parsed| parsed.header.recorded_at)
                            .unwrap_or_default();
                        buffer.push_back((recorded_at, envelope));
                    }
                }
                if let Some((recorded_at, _)) = buffer.front() {
                    if earliest.is_none_or(|(_, earliest)| *recorded_at < earliest) {
                        earliest = Some((index, *recorded_at));
                    }
                }
            }
            let Some((index, _)) = earliest else {
                break;
            };
            let (_, envelope) = self.buffers[index]
                .0
                .pop_front()
                .expect("the earliest buffer is not empty");
            batch.push(envelope);
        }
        Ok(batch)
    }
}

fn rebuild(data: &Path, key_file: Option<PathBuf>, backend: &str) -> anyhow::Result<bool> {
    let keys = open_keys(data, key_file.clone(), None)?;
    let config = NodeConfig {
        data_dir: data.to_path_buf(),
        kek_file: key_file,
        kafka: None,
        url: None,
    };
    let runtime = runtime()?;
    let mut log_name = chartlog::log::log_name(None);
    let log: Box<dyn EventLog> = match backend {
        // Opening the log for writing takes its lock, so a rebuild cannot run beside a server.
        "embedded" => {
            check_embedded_log(&config, data)?;
            Box::new(
                EmbeddedLog::open(&config.log_dir(), false).with_context(|| {
                    format!(
                        "cannot open the log of {}; stop the server first",
                        data.display()
                    )
                })?,
            )
        }
        // NOTE: on Kafka nothing stops a rebuild beside a running server, whose own
        // projection files would then be replaced under it; stop the server first.
        "kafka" => {
            let settings = kafka_settings()?;
            let key_topic = runtime
                .block_on(KeyTopic::open(&settings, false))
                .context("cannot open the key topic")?;
            keys.set_source(key_topic);
            log_name = chartlog::log::log_name(Some(&settings));
            Box::new(
                runtime
                    .block_on(KafkaLog::open_reader(settings))
                    .context("cannot open the Kafka log")?,
            )
        }
        other => anyhow::bail!("unknown log backend {other}; expected embedded or kafka"),
    };
    let projection_dir = config.chart_projection_dir();
    let started = Instant::now();
    if projection_dir.exists() {
        std::fs::remove_dir_all(&projection_dir)
            .with_context(|| format!("cannot remove {}", projection_dir.display()))?;
    }
    let projection = chartlog_projections::ChartProjection::open(&projection_dir)
        .context("cannot create the chart projection; is the server still running?")?;
    // A server started on this directory then keeps the rebuilt projection.
    projection.bind_log(&log_name)?;
    for partition in 0..log.partitions() {
        while chartlog::projector::apply_next(log.as_ref(), &keys, &projection, partition)?
            .is_some()
        {}
    }
    let applied: u64 = projection.positions(log.partitions())?.iter().sum();
    println!(
        "rebuilt chart projection: {applied} log entries in {} ms",
        started.elapsed().as_millis()
    );
    Ok(true)
}
