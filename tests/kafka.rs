//! Faults on a real Apache Kafka broker, started by `compose/kafka.sh`: a writer fenced by a
//! newer one, a standby node that redirects to the owner and takes over when the owner stops,
//! a broker outage that writes survive once the broker is back, and a log copied to Kafka and
//! back. Run with `--features kafka-tests`,
//! `CHARTLOG_TEST_LOG=kafka` and one test thread, since one test stops the shared broker;
//! `scripts/test.sh` does all three.

mod common;

use std::process::Command as Process;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use chartlog::log::{EventLog, KafkaLog};
use chartlog_schemas::Envelope;
use common::{patient, TestNode};

/// Starts broker 1 again when dropped while it is stopped, so a test that fails during an
/// outage does not leave the broker down for the tests after it.
struct StoppedBroker {
    restarted: bool,
}

impl StoppedBroker {
    fn stop() -> StoppedBroker {
        kafka_script(&["stop-broker", "1"]);
        StoppedBroker { restarted: false }
    }

    fn start(mut self) {
        self.restart();
    }

    fn restart(&mut self) {
        if !self.restarted {
            self.restarted = true;
            kafka_script(&["start-broker", "1"]);
            kafka_script(&["wait", "--timeout", "90"]);
        }
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        self.restart();
    }
}

fn kafka_script(arguments: &[&str]) {
    let script = common::checkout().join("compose/kafka.sh");
    let status = Process::new("bash")
        .arg(script)
        .args(arguments)
        .status()
        .unwrap();
    assert!(status.success(), "kafka.sh {arguments:?} failed");
}

#[tokio::test]
async fn newer_writer_fences_the_older() {
    let config = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let older = KafkaLog::open(config.clone()).await.unwrap();
    let record = Envelope(b"opaque bytes, stored as given".to_vec());
    let (older, first) = tokio::task::spawn_blocking(move || {
        let positions = older.append_batch(std::slice::from_ref(&record));
        (older, positions)
    })
    .await
    .unwrap();
    assert!(first.is_ok(), "the only writer appends: {first:?}");

    // A second node taking over the partition initializes the same transactional id.
    let newer = KafkaLog::open(config).await.unwrap();
    let (older, fenced) = tokio::task::spawn_blocking(move || {
        let outcome = older.append_batch(&[Envelope(b"from the zombie".to_vec())]);
        (older, outcome)
    })
    .await
    .unwrap();
    assert!(fenced.is_err(), "the fenced writer appended anyway");
    let (newer, accepted) = tokio::task::spawn_blocking(move || {
        let outcome = newer.append_batch(&[Envelope(b"from the new owner".to_vec())]);
        (newer, outcome)
    })
    .await
    .unwrap();
    assert!(accepted.is_ok(), "the new owner appends: {accepted:?}");

    // A read may return fewer entries than there are; read until one comes back empty.
    let entries = tokio::task::spawn_blocking(move || {
        let mut entries = Vec::new();
        let mut from = chartlog::log::LogPosition::new(0, 0);
        loop {
            let batch = newer.read_from(from, 10).unwrap();
            let Some((last, _)) = batch.last() else {
                break entries;
            };
            from = last.next();
            entries.extend(batch);
        }
    })
    .await
    .unwrap();
    let payloads: Vec<&[u8]> = entries
        .iter()
        .map(|(_, envelope)| envelope.0.as_slice())
        .collect();
    assert_eq!(
        payloads,
        vec![
            b"opaque bytes, stored as given".as_slice(),
            b"from the new owner".as_slice()
        ]
    );
    drop(older);
}

#[tokio::test]
async fn broker_outage_fails_writes_then_recovers() {
    assert!(
        common::on_kafka(),
        "the kafka tests need CHARTLOG_TEST_LOG=kafka"
    );
    let node = TestNode::start().await;
    let before_id = node
        .create(&patient("Before", "Outage", "1970-01-01"))
        .await;

    let outage = StoppedBroker::stop();
    let reply = node
        .post(
            "/fhir/Patient",
            &patient("During", "Outage", "1970-01-01").to_string(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text
    );
    assert!(reply.header("retry-after").is_some());
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(health.json["status"], "degraded", "{}", health.text);

    // Reads keep being served from the projection; their accesses wait in the journal.
    let read = node.get(&format!("/fhir/Patient/{before_id}")).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text);
    assert_eq!(read.json["name"][0]["family"], "Before");
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(
        health.json["access_journal"]["pending"], 1,
        "{}",
        health.text
    );

    outage.start();
    let deadline = Instant::now() + Duration::from_secs(90);
    let recovered = loop {
        let reply = node
            .post(
                "/fhir/Patient",
                &patient("After", "Outage", "1970-01-01").to_string(),
            )
            .await;
        if reply.status == StatusCode::CREATED || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(
        recovered.status,
        StatusCode::CREATED,
        "writes did not resume: {}",
        recovered.text
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = loop {
        let health = node.call(Method::GET, "/health", None, None, &[]).await;
        if health.json["access_journal"]["pending"] == 0 || Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(health.json["status"], "ok", "{}", health.text);
    let trail = node.access_log(&before_id).await;
    let served_in_outage = TestNode::served_during_outage(&trail);
    assert_eq!(served_in_outage, 1, "{}", trail.text);
    let found = node.get("/fhir/Patient?name=During").await;
    assert_eq!(
        found.json["total"], 0,
        "the write that failed during the outage must not appear"
    );
    let found = node.get("/fhir/Patient?name=After").await;
    assert_eq!(found.json["total"], 1);
}

/// Copies a directory tree, for giving a second node the first node's key store.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Copies the files of a key directory (the key-encryption key, the signing key and the
/// trusted signers) but not its data key database.
fn copy_key_files(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn replay(arguments: &[&str], data: &std::path::Path, topic: &str) -> (bool, String) {
    replay_on(arguments, data, topic, common::test_partitions())
}

/// Runs `chartlog-replay` on a topic of `partitions` partitions.
fn replay_on(
    arguments: &[&str],
    data: &std::path::Path,
    topic: &str,
    partitions: u32,
) -> (bool, String) {
    let bootstrap = common::test_kafka_config().unwrap().bootstrap_servers;
    // The binary belongs to another package of the workspace, built beside this test's.
    let deps = std::env::current_exe().unwrap();
    let binary = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("chartlog-replay");
    assert!(
        binary.exists(),
        "{} is missing; build the workspace first",
        binary.display()
    );
    let output = Process::new(binary)
        .args(arguments)
        .arg("--data")
        .arg(data)
        .env("CHARTLOG_KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("CHARTLOG_KAFKA_TOPIC", topic)
        .env("CHARTLOG_KAFKA_PARTITIONS", partitions.to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn embedded_entries(data: &std::path::Path) -> Vec<(u64, Vec<u8>)> {
    let log = chartlog::log::EmbeddedLog::open_read_only(&data.join("log")).unwrap();
    log.read_from(chartlog::log::LogPosition::new(0, 0), 100_000)
        .unwrap()
        .into_iter()
        .map(|(position, envelope)| (position.offset, envelope.0))
        .collect()
}

#[tokio::test]
async fn copy_moves_logs_byte_for_byte() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), None).await;
    let patient_id = node.create(&patient("Copy", "Me", "1970-01-01")).await;
    node.create(&common::weight(&patient_id, "70.5", "2024-01-01T00:00:00Z"))
        .await;
    node.get(&format!("/fhir/Patient/{patient_id}")).await;
    let (source, _) = node.stop().await;

    let (copied, output) = replay(
        &["copy", "--direction", "to-kafka"],
        source.path(),
        &kafka.topic,
    );
    assert!(copied, "{output}");
    let (verified, output) = replay(
        &["verify", "--log-backend", "kafka"],
        source.path(),
        &kafka.topic,
    );
    assert!(verified, "the Kafka copy does not verify: {output}");

    // Back into a fresh data directory holding the same keys.
    let target = tempfile::tempdir().unwrap();
    copy_tree(&source.path().join("keys"), &target.path().join("keys"));
    let (copied_back, output) = replay(
        &["copy", "--direction", "from-kafka"],
        target.path(),
        &kafka.topic,
    );
    assert!(copied_back, "{output}");
    let original = embedded_entries(source.path());
    assert!(!original.is_empty());
    assert_eq!(
        embedded_entries(target.path()),
        original,
        "the round trip changed the log"
    );
    let (verified, output) = replay(&["verify"], target.path(), &kafka.topic);
    assert!(verified, "{output}");

    for dir in [source.path(), target.path()] {
        let (rebuilt, output) = replay(&["rebuild"], dir, &kafka.topic);
        assert!(rebuilt, "{output}");
    }
    let dump = |dir: &std::path::Path| {
        chartlog_projections::ChartProjection::open(&dir.join("projections/chart"))
            .unwrap()
            .dump()
            .unwrap()
    };
    assert_eq!(
        dump(target.path()),
        dump(source.path()),
        "projections built from the two copies differ"
    );
}

/// Returns a plain producer on the test broker, for writing records no node would write.
fn raw_producer(kafka: &chartlog::log::KafkaConfig) -> rdkafka::producer::BaseProducer {
    rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .create()
        .unwrap()
}

/// Writes head records, chart id and encoded head, to the head topic of `kafka`'s log.
fn send_heads(
    producer: &rdkafka::producer::BaseProducer,
    kafka: &chartlog::log::KafkaConfig,
    heads: impl IntoIterator<Item = (chartlog_schemas::ChartId, [u8; 40])>,
) {
    use rdkafka::producer::{BaseRecord, Producer};

    let topic = chartlog::log::head_topic::head_topic_name(&kafka.topic);
    for (chart_id, value) in heads {
        producer
            .send(
                BaseRecord::to(&topic)
                    .key(chart_id.as_bytes().as_slice())
                    .payload(value.as_slice()),
            )
            .map_err(|(error, _)| error)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// Reads every record of each partition of `log`, as bytes, partition by partition.
async fn partition_records(log: std::sync::Arc<dyn EventLog>) -> Vec<Vec<Vec<u8>>> {
    tokio::task::spawn_blocking(move || {
        (0..log.partitions())
            .map(|partition| {
                let mut records = Vec::new();
                let mut from = chartlog::log::LogPosition::new(partition, 0);
                loop {
                    let batch = log.read_from(from, 1000).unwrap();
                    let Some((last, _)) = batch.last() else {
                        break records;
                    };
                    from = last.next();
                    records.extend(batch.into_iter().map(|(_, envelope)| envelope.0));
                }
            })
            .collect()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn charts_spread_over_partitions_keep_order_and_state() {
    const PARTITIONS: u32 = 3;
    let mut kafka =
        common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    kafka.partitions = PARTITIONS;
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let mut patients = Vec::new();
    for index in 0..9 {
        let id = node
            .create(&patient("Spread", &format!("Chart{index}"), "1970-01-01"))
            .await;
        let weight = post_weight(&node, &id, "70.0", "2024-01-01T00:00:00Z").await;
        assert_eq!(weight.status, StatusCode::CREATED, "{}", weight.text);
        let observation = weight.json["id"].as_str().unwrap().to_owned();
        patients.push((id, observation));
    }
    let health = node.get("/health").await;
    let ends = health.json["log"]["partition_ends"].as_array().unwrap();
    assert_eq!(ends.len(), PARTITIONS as usize, "{}", health.text);
    let used = ends.iter().filter(|end| end.as_u64() > Some(0)).count();
    assert!(
        used > 1,
        "nine charts all went to one partition: {}",
        health.text
    );

    // Every record sits in the partition its chart id names, in sequence order.
    let records = partition_records(node.node.log.clone()).await;
    for (partition, records) in records.iter().enumerate() {
        let mut last_seq = std::collections::HashMap::new();
        for bytes in records {
            let parsed = chartlog_schemas::envelope::parse(bytes).unwrap();
            let chart = parsed.header.chart_id;
            assert_eq!(
                chartlog::log::partition_of(chart, PARTITIONS),
                partition as u32,
                "chart {chart} has an event outside its partition"
            );
            let previous = last_seq.insert(chart, parsed.header.seq.0).unwrap_or(0);
            assert_eq!(
                parsed.header.seq.0,
                previous + 1,
                "chart {chart} out of order"
            );
        }
    }

    // After a restart the writer state comes back from every partition: a stale If-Match
    // is refused and the current one accepted.
    let (dir, kafka) = node.stop().await;
    let node = TestNode::start_in(dir, kafka.clone()).await;
    for (patient_id, observation) in &patients {
        let uri = format!("/fhir/Observation/{observation}");
        let mut body = common::weight(patient_id, "71.0", "2024-01-02T00:00:00Z");
        body["id"] = observation.as_str().into();
        let stale = node
            .put(&uri, &body.to_string(), &[("if-match", "W/\"2\"")])
            .await;
        assert_eq!(
            stale.status,
            StatusCode::PRECONDITION_FAILED,
            "{}",
            stale.text
        );
        let current = node
            .put(&uri, &body.to_string(), &[("if-match", "W/\"1\"")])
            .await;
        assert_eq!(current.status, StatusCode::OK, "{}", current.text);
    }
    let history = node.get("/fhir/Observation/_history").await;
    assert_eq!(history.status, StatusCode::OK, "{}", history.text);
    let entries = history.json["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 18, "{}", history.text);
    let stamps: Vec<&str> = entries
        .iter()
        .map(|entry| entry["resource"]["meta"]["lastUpdated"].as_str().unwrap())
        .collect();
    let mut newest_first = stamps.clone();
    newest_first.sort_by(|left, right| right.cmp(left));
    assert_eq!(stamps, newest_first, "the type history is not newest first");
    let kafka = kafka.unwrap();
    let original = partition_records(node.node.log.clone()).await;
    let (source, _) = node.stop().await;

    let (verified, output) = replay_on(
        &["verify", "--log-backend", "kafka"],
        source.path(),
        &kafka.topic,
        PARTITIONS,
    );
    assert!(verified, "{output}");
    // A topic read with another partition count is refused, not misread.
    let (misread, output) = replay_on(
        &["verify", "--log-backend", "kafka"],
        source.path(),
        &kafka.topic,
        1,
    );
    assert!(
        !misread,
        "verify read a topic of three partitions as one: {output}"
    );
    assert!(
        output.contains("has 3 partitions but the configuration names 1"),
        "{output}"
    );

    // Into one embedded log, merged in recorded order, and out again into a new topic of
    // three partitions: each partition contains the same records in the same order.
    // The target has the node's key files but none of the charts' data keys, so the copy
    // brings them from the key topic.
    let embedded = tempfile::tempdir().unwrap();
    copy_key_files(&source.path().join("keys"), &embedded.path().join("keys"));
    let (copied, output) = replay_on(
        &["copy", "--direction", "from-kafka"],
        embedded.path(),
        &kafka.topic,
        PARTITIONS,
    );
    assert!(copied, "{output}");

    // Copying out of a directory whose key store lacks the data keys is refused.
    let keyless = tempfile::tempdir().unwrap();
    copy_key_files(&source.path().join("keys"), &keyless.path().join("keys"));
    copy_tree(&embedded.path().join("log"), &keyless.path().join("log"));
    let (copied, output) = replay_on(
        &["copy", "--direction", "to-kafka"],
        keyless.path(),
        &format!("{}-keyless", kafka.topic),
        PARTITIONS,
    );
    assert!(!copied, "a copy without the data keys succeeded: {output}");
    assert!(
        output.contains("is missing from this directory's key store"),
        "{output}"
    );
    let (verified, output) = replay(&["verify"], embedded.path(), &kafka.topic);
    assert!(
        verified,
        "the merged embedded log does not verify: {output}"
    );
    let second_topic = format!("{}-again", kafka.topic);
    let (copied, output) = replay_on(
        &["copy", "--direction", "to-kafka"],
        embedded.path(),
        &second_topic,
        PARTITIONS,
    );
    assert!(copied, "{output}");
    let mut settings = kafka.clone();
    settings.topic = second_topic;
    let again = KafkaLog::open_reader(settings).await.unwrap();
    assert_eq!(
        partition_records(std::sync::Arc::new(again)).await,
        original,
        "the round trip through the embedded log changed a partition"
    );

    // A genuine event written again into another partition is named, not read as a chart's.
    use rdkafka::producer::{BaseRecord, Producer};
    let (home, records) = original
        .iter()
        .enumerate()
        .find(|(_, records)| !records.is_empty())
        .unwrap();
    let elsewhere = (home as i32 + 1) % PARTITIONS as i32;
    let producer = raw_producer(&kafka);
    producer
        .send(
            BaseRecord::<(), _>::to(&kafka.topic)
                .partition(elsewhere)
                .payload(records[0].as_slice()),
        )
        .map_err(|(error, _)| error)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    let (verified, output) = replay_on(
        &["verify", "--log-backend", "kafka"],
        source.path(),
        &kafka.topic,
        PARTITIONS,
    );
    assert!(
        !verified,
        "an event moved to another partition verified: {output}"
    );
    assert!(
        output.contains(&format!(
            "the chart's events belong in partition {home} of 3"
        )),
        "{output}"
    );
    // The copy is the only entry named: the genuine event stays its chart's first, wherever
    // the copy lies in the order verify reads the partitions.
    assert_eq!(output.matches("FAILED position").count(), 1, "{output}");
    // On a log of several partitions the position names its partition, 0 included.
    assert!(
        output.contains(&format!("FAILED position {elsewhere}:")),
        "{output}"
    );
    // A projection rebuilt from it stops there rather than taking the event in twice.
    let (rebuilt, output) = replay_on(
        &["rebuild", "--log-backend", "kafka"],
        source.path(),
        &kafka.topic,
        PARTITIONS,
    );
    assert!(!rebuilt, "rebuild took in a misplaced event: {output}");
    assert!(
        output.contains(&format!("whose events go to partition {home}")),
        "{output}"
    );
}

/// Posts a body-weight Observation for a patient.
async fn post_weight(
    node: &TestNode,
    patient_id: &str,
    kilograms: &str,
    effective: &str,
) -> common::Reply {
    node.post(
        "/fhir/Observation",
        &common::weight(patient_id, kilograms, effective).to_string(),
    )
    .await
}

/// Polls `check` every 200 ms until it returns a value or `limit` passes.
async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn two_nodes_on_one_topic_keep_one_chain() {
    const FIRST: &str = "http://first.chartlog.test/fhir";
    const SECOND: &str = "http://second.chartlog.test/fhir";
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let first = TestNode::start_at(tempfile::tempdir().unwrap(), Some(kafka.clone()), FIRST).await;
    let patient_id = first
        .create(&patient("Shared", "Topic", "1970-01-01"))
        .await;
    let (first_dir, _) = first.stop().await;

    // Without the Kafka settings, the tools and the server name the topic the directory uses.
    let (verified, output) = replay(&["verify"], first_dir.path(), &kafka.topic);
    assert!(!verified, "{output}");
    assert!(
        output.contains(&format!(
            "belongs to a node on the Kafka topic {}",
            kafka.topic
        )),
        "{output}"
    );
    assert!(output.contains("--log-backend kafka"), "{output}");
    let embedded = chartlog::node::NodeConfig {
        data_dir: first_dir.path().to_path_buf(),
        kek_file: None,
        kafka: None,
        url: None,
    };
    let rejected = chartlog::node::Node::open_with(&embedded, |log| log)
        .await
        .err()
        .expect("a Kafka node's directory opened on the embedded log");
    assert!(
        format!("{rejected:#}").contains("CHARTLOG_LOG_BACKEND=kafka"),
        "{rejected:#}"
    );

    // The nodes share the key-encryption key and the signing key; data keys of charts reach
    // the second node through the key topic.
    let second_dir = tempfile::tempdir().unwrap();
    copy_key_files(
        &first_dir.path().join("keys"),
        &second_dir.path().join("keys"),
    );
    // A restarted node is the same static member of the owner group, so it owns the log again.
    let first = TestNode::start_at(first_dir, Some(kafka.clone()), FIRST).await;
    first
        .create(&common::weight(&patient_id, "60.0", "2024-01-01T00:00:00Z"))
        .await;

    // The second node is a standby and sends clients to the first, reads and writes alike.
    let second = TestNode::start_at(second_dir, Some(kafka.clone()), SECOND).await;
    let redirected = eventually(Duration::from_secs(20), || async {
        let reply = post_weight(&second, &patient_id, "60.5", "2024-01-01T12:00:00Z").await;
        (reply.status == StatusCode::TEMPORARY_REDIRECT).then_some(reply)
    })
    .await
    .expect("the standby never learned the owner's address");
    assert_eq!(
        redirected.header("location"),
        Some(format!("{FIRST}/Observation").as_str())
    );
    assert_eq!(redirected.json["resourceType"], "OperationOutcome");
    let read = second
        .get(&format!("/fhir/Patient/{patient_id}?_format=json"))
        .await;
    assert_eq!(read.status, StatusCode::TEMPORARY_REDIRECT, "{}", read.text);
    assert_eq!(
        read.header("location"),
        Some(format!("{FIRST}/Patient/{patient_id}?_format=json").as_str())
    );
    // A transaction goes to the owner's base URL itself.
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": []});
    let transaction = second.post("/fhir", &bundle.to_string()).await;
    assert_eq!(
        transaction.status,
        StatusCode::TEMPORARY_REDIRECT,
        "{}",
        transaction.text
    );
    assert_eq!(transaction.header("location"), Some(FIRST));
    let metadata = second.get("/fhir/metadata").await;
    assert_eq!(metadata.status, StatusCode::OK);
    // A chart created after the standby started: its data key reaches the standby with its
    // first events, so the standby's projection applies them instead of halting.
    let later_id = first.create(&patient("Later", "Chart", "1980-05-05")).await;
    let first_end = first.node.log.end_position().borrow().total();
    let caught_up = eventually(Duration::from_secs(20), || async {
        let health = second.call(Method::GET, "/health", None, None, &[]).await;
        let applied = health.json["projections"]["chart"]["applied_position"].as_u64();
        (applied >= Some(first_end)).then_some(health)
    })
    .await
    .expect("the standby's projection did not reach the owner's log end");
    assert_eq!(
        caught_up.json["projections"]["chart"]["halted"], false,
        "{}",
        caught_up.text
    );
    // The standby's end of the log follows the owner's appends, not only its own.
    let end_seen = eventually(Duration::from_secs(10), || async {
        let health = second.call(Method::GET, "/health", None, None, &[]).await;
        (health.json["log"]["end_position"].as_u64() >= Some(first_end)).then_some(())
    })
    .await;
    assert!(
        end_seen.is_some(),
        "the standby's log end stayed behind the owner's"
    );
    let health = second.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);
    assert_eq!(health.json["log"]["ownership"]["role"], "standby");
    assert_eq!(health.json["log"]["ownership"]["owner_url"], FIRST);
    assert_eq!(health.json["log"]["accepting_writes"], false);
    let standby = second
        .call(Method::GET, "/health/owner", None, None, &[])
        .await;
    assert_eq!(
        standby.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        standby.text
    );
    let owner = first
        .call(Method::GET, "/health/owner", None, None, &[])
        .await;
    assert_eq!(owner.status, StatusCode::OK, "{}", owner.text);

    // A writer outside the group takes the transactional id: the broker fences the first
    // node, whose next write fails. Still assigned the partition, the first node takes it
    // back, its state rebuilt from the log, and writes again.
    let intruder = KafkaLog::open(kafka.clone()).await.unwrap();
    let fenced = post_weight(&first, &patient_id, "61.0", "2024-01-02T00:00:00Z").await;
    assert_eq!(
        fenced.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the fenced node still wrote: {}",
        fenced.text
    );
    drop(intruder);
    let resumed = eventually(Duration::from_secs(30), || async {
        let reply = post_weight(&first, &patient_id, "61.5", "2024-01-02T12:00:00Z").await;
        (reply.status == StatusCode::CREATED).then_some(reply)
    })
    .await;
    assert!(
        resumed.is_some(),
        "the first node did not take the log back"
    );

    // The owner stops. Once its session times out, the group gives the partition to the
    // second node, which fences it, rebuilds the state and serves: If-Match still holds.
    let (_first_dir, _) = first.stop().await;
    let moved = eventually(Duration::from_secs(60), || async {
        let health = second.call(Method::GET, "/health", None, None, &[]).await;
        (health.json["log"]["ownership"]["role"] == "owner").then_some(())
    })
    .await;
    assert!(moved.is_some(), "the standby never took the log over");
    let owner = second
        .call(Method::GET, "/health/owner", None, None, &[])
        .await;
    assert_eq!(owner.status, StatusCode::OK, "{}", owner.text);
    let rename = |if_match: &'static str| {
        let body = serde_json::json!({
            "resourceType": "Patient",
            "id": patient_id,
            "name": [{"family": "Shared", "given": ["Again"]}],
        })
        .to_string();
        let uri = format!("/fhir/Patient/{patient_id}");
        let second = &second;
        async move { second.put(&uri, &body, &[("if-match", if_match)]).await }
    };
    let stale = rename("W/\"7\"").await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.text
    );
    let updated = rename("W/\"1\"").await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text);
    second
        .create(&common::weight(&patient_id, "62.0", "2024-01-03T00:00:00Z"))
        .await;
    let later = second.get(&format!("/fhir/Patient/{later_id}")).await;
    assert_eq!(later.status, StatusCode::OK, "{}", later.text);
    assert_eq!(later.json["name"][0]["family"], "Later");
    second
        .create(&common::weight(&later_id, "70.0", "2024-01-03T00:00:00Z"))
        .await;

    let log = KafkaLog::open_reader(kafka).await.unwrap();
    let keys = second.node.keys.clone();
    let report = tokio::task::spawn_blocking(move || {
        chartlog::verify::verify_log(&log, &keys, chartlog::verify::HeadCheck::Unrecorded).unwrap()
    })
    .await
    .unwrap();
    assert!(
        report.is_ok(),
        "chains forked or sequence numbers repeat: {:?}",
        report.problems
    );
    let observations = second
        .get(&format!("/fhir/Observation?patient={patient_id}"))
        .await;
    assert_eq!(
        observations.json["total"], 3,
        "exactly the acknowledged writes, the fenced one not among them: {}",
        observations.text
    );
}

#[tokio::test]
async fn standby_with_the_owners_url_does_not_redirect() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let first = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let second_dir = tempfile::tempdir().unwrap();
    copy_key_files(
        &first.dir.path().join("keys"),
        &second_dir.path().join("keys"),
    );
    // Both nodes publish the same base URL, as two nodes behind one address would.
    let second = TestNode::start_in(second_dir, Some(kafka)).await;
    let known = eventually(Duration::from_secs(20), || async {
        let health = second.call(Method::GET, "/health", None, None, &[]).await;
        health.json["log"]["ownership"]["owner_url"]
            .is_string()
            .then_some(())
    })
    .await;
    assert!(
        known.is_some(),
        "the standby never learned the owner's address"
    );
    let reply = second
        .post(
            "/fhir/Patient",
            &patient("Same", "Address", "1970-01-01").to_string(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text
    );
    assert_eq!(reply.header("location"), None);
    // `/health` reports the misconfiguration rather than a working standby.
    let health = second.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(
        health.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        health.text
    );
    assert!(
        health.json["log"]["ownership"]["problem"]
            .as_str()
            .is_some_and(|problem| problem.contains("--base-url")),
        "{}",
        health.text
    );
}

/// Creates a topic with the given partitions and settings through the admin API.
async fn create_topic(bootstrap: &str, name: &str, partitions: i32, settings: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in settings {
        topic = topic.set(key, value);
    }
    let created = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
}

#[tokio::test]
async fn topics_that_would_lose_records_are_refused() {
    let base = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    // Each case differs from an acceptable topic in one setting.
    let cases: [(&str, i32, (&str, &str), &str); 4] = [
        (
            "retention",
            1,
            ("retention.ms", "604800000"),
            "retention.ms=604800000",
        ),
        (
            "compacted",
            1,
            ("cleanup.policy", "compact"),
            "cleanup.policy=compact",
        ),
        (
            "size-limited",
            1,
            ("retention.bytes", "1073741824"),
            "retention.bytes=1073741824",
        ),
        ("partitioned", 3, ("retention.ms", "-1"), "has 3 partitions"),
    ];
    for (case, partitions, (setting, value), expected) in cases {
        let mut config = base.clone();
        config.topic = format!("{}-{case}", base.topic);
        let mut settings = vec![
            ("retention.ms", "-1"),
            ("retention.bytes", "-1"),
            ("cleanup.policy", "delete"),
        ];
        settings.retain(|(name, _)| *name != setting);
        settings.push((setting, value));
        create_topic(
            &config.bootstrap_servers,
            &config.topic,
            partitions,
            &settings,
        )
        .await;
        let error = KafkaLog::open_unowned(config)
            .await
            .err()
            .unwrap_or_else(|| panic!("{case}: the topic was accepted"));
        let message = error.to_string();
        assert!(message.contains(expected), "{case}: {message}");
    }

    // A configuration refused for its partition count creates no topic beside the event topic.
    let mut config = base.clone();
    config.topic = format!("{}-partitioned", base.topic);
    config.partitions = 5;
    let error = KafkaLog::open_unowned(config.clone())
        .await
        .expect_err("a topic of 3 partitions was accepted as 5");
    assert!(error.to_string().contains("has 3 partitions"), "{error}");
    let listed: Vec<String> = {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap_servers)
            .create()
            .unwrap();
        let metadata = client
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        metadata
            .topics()
            .iter()
            .map(|topic| topic.name().to_owned())
            .collect()
    };
    for beside in [
        chartlog::log::ownership::lease_topic_name(&config.topic, config.partitions),
        chartlog::log::head_topic::head_topic_name(&config.topic),
    ] {
        assert!(!listed.contains(&beside), "{beside} was created");
    }

    // The key topic must be compacted, never emptied by retention.
    let mut config = base.clone();
    config.topic = format!("{}-keys-deleted", base.topic);
    let key_topic = chartlog::log::key_topic::key_topic_name(&config.topic);
    create_topic(
        &config.bootstrap_servers,
        &key_topic,
        1,
        &[("cleanup.policy", "delete")],
    )
    .await;
    let error = chartlog::log::key_topic::KeyTopic::open(&config, true)
        .await
        .err()
        .expect("a key topic that is not compacted was accepted");
    assert!(
        error.to_string().contains("cleanup.policy=delete"),
        "{error}"
    );
}

#[tokio::test]
async fn rolled_back_head_is_named() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = node.create(&patient("Roll", "Back", "1970-01-01")).await;
    for day in 1..=3 {
        let effective = format!("2024-01-0{day}T00:00:00Z");
        let reply = post_weight(&node, &patient_id, "60.0", &effective).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    }
    let records = partition_records(node.node.log.clone()).await;
    let (dir, _) = node.stop().await;

    // The head of the chart with the most events goes back to its second event: a genuine
    // head, as an attacker who removed the later events would leave it.
    let mut events: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
    for bytes in records.iter().flatten() {
        let parsed = chartlog_schemas::envelope::parse(bytes).unwrap();
        events
            .entry(parsed.header.chart_id)
            .or_default()
            .push((parsed.header.seq, parsed.digest));
    }
    let (chart_id, chart_events) = events
        .into_iter()
        .max_by_key(|(_, chart_events)| chart_events.len())
        .unwrap();
    assert!(chart_events.len() >= 3, "the chart has too few events");
    let (earlier_seq, earlier_digest) = chart_events[1];
    let value = chartlog::log::head_topic::encode_head(earlier_seq, &earlier_digest);
    let producer = raw_producer(&kafka);
    send_heads(&producer, &kafka, [(chart_id, value)]);

    let (verified, output) = replay(
        &["verify", "--log-backend", "kafka"],
        dir.path(),
        &kafka.topic,
    );
    assert!(!verified, "verify passed a rolled-back head: {output}");
    assert!(
        output.contains("read after the log, is sequence 2"),
        "{output}"
    );
}

#[tokio::test]
async fn forged_head_reveals_removed_events() {
    use rdkafka::producer::BaseRecord;

    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = node.create(&patient("Head", "Check", "1970-01-01")).await;
    node.create(&common::weight(&patient_id, "60.0", "2024-01-01T00:00:00Z"))
        .await;
    let (dir, _) = node.stop().await;
    let (verified, output) = replay(
        &["verify", "--log-backend", "kafka"],
        dir.path(),
        &kafka.topic,
    );
    assert!(verified, "{output}");

    // Record a head one event beyond each chart's last: the log now looks as if its last
    // events were removed.
    let heads = {
        let kafka = kafka.clone();
        tokio::task::spawn_blocking(move || chartlog::log::head_topic::read_heads(&kafka))
            .await
            .unwrap()
            .unwrap()
            .expect("the node recorded no chart heads")
    };
    assert!(!heads.is_empty());
    let producer = raw_producer(&kafka);
    let topic = chartlog::log::head_topic::head_topic_name(&kafka.topic);
    // A record that is no head at all is skipped, so the forged heads behind it still count.
    producer
        .send(BaseRecord::to(&topic).key("junk").payload("not a head"))
        .map_err(|(error, _)| error)
        .unwrap();
    let forged = heads.iter().map(|(chart_id, seq, _)| {
        let next = chartlog_schemas::EventSeq(seq.0 + 1);
        (
            *chart_id,
            chartlog::log::head_topic::encode_head(next, &[0; 32]),
        )
    });
    send_heads(&producer, &kafka, forged);

    let (verified, output) = replay(
        &["verify", "--log-backend", "kafka"],
        dir.path(),
        &kafka.topic,
    );
    assert!(
        !verified,
        "verify passed a log whose charts end early: {output}"
    );
    assert!(
        output.contains("events were removed from its end"),
        "{output}"
    );
    assert!(
        output.contains("records that are not chart heads (first at offset"),
        "{output}"
    );

    // A node refuses to take such a log over, so it writes nothing on top of it.
    let node = TestNode::start_in(dir, Some(kafka)).await;
    let reply = post_weight(&node, &patient_id, "61.0", "2024-01-02T00:00:00Z").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text
    );
    let owner = node
        .call(Method::GET, "/health/owner", None, None, &[])
        .await;
    assert_eq!(
        owner.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        owner.text
    );
    // `/health` gives the reason, for the operator who has to act.
    let reason = eventually(Duration::from_secs(20), || async {
        let health = node.call(Method::GET, "/health", None, None, &[]).await;
        health.json["log"]["ownership"]["take_over_error"]
            .as_str()
            .map(str::to_owned)
    })
    .await
    .expect("/health did not say why the node cannot take the log over");
    assert!(
        reason.contains("does not end at its recorded head"),
        "{reason}"
    );
}

#[tokio::test]
async fn refused_session_timeout_stops_the_start() {
    let mut kafka =
        common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    // Below the broker's group.min.session.timeout.ms (6 s by default).
    kafka
        .properties
        .insert("session.timeout.ms".into(), "1000".into());
    let dir = tempfile::tempdir().unwrap();
    let config = chartlog::node::NodeConfig {
        data_dir: dir.path().to_path_buf(),
        kek_file: None,
        kafka: Some(kafka),
        url: Some(common::BASE.to_owned()),
    };
    let error = chartlog::node::Node::open(&config)
        .await
        .err()
        .expect("a node started with a session timeout the broker refuses");
    let message = format!("{error:#}");
    assert!(message.contains("Invalid session timeout"), "{message}");
}

#[tokio::test]
async fn foreign_keys_get_sharing_hint() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let first = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let created = first
        .post(
            "/fhir/Patient",
            &patient("Own", "Keys", "1980-02-02").to_string(),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);

    // A second node started on the topic without the first node's key files, twice: at its
    // first start it creates keys of its own, at the second it finds them.
    let dir = tempfile::tempdir().unwrap();
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("chartlog");
    for attempt in ["first", "second"] {
        let output = Process::new(&binary)
            .args([
                "serve",
                "--log-backend",
                "kafka",
                "--listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(dir.path())
            .env("CHARTLOG_KAFKA_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
            .env("CHARTLOG_KAFKA_TOPIC", &kafka.topic)
            .env("CHARTLOG_BASE_URL", "http://second.test/fhir")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "the {attempt} start succeeded");
        let message = stderr
            .lines()
            .find(|line| line.starts_with("chartlog:"))
            .unwrap_or_default();
        assert!(
            message.contains("unknown signer"),
            "{attempt} start: {stderr}"
        );
        assert!(
            message.contains("needs the same kek.key, node-signing.key and trusted-signers"),
            "{attempt} start: {stderr}"
        );
    }
    first.stop().await;
}

/// Deletes topics and waits until the cluster no longer lists them.
async fn delete_topics(kafka: &chartlog::log::KafkaConfig, names: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let mut config = rdkafka::config::ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let deleted = admin
        .delete_topics(names, &AdminOptions::new())
        .await
        .unwrap();
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    let consumer: BaseConsumer = config.create().unwrap();
    let gone = eventually(Duration::from_secs(30), || {
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .unwrap();
        let listed = metadata
            .topics()
            .iter()
            .any(|topic| names.contains(&topic.name()));
        async move { (!listed).then_some(()) }
    })
    .await;
    assert!(gone.is_some(), "the topics were not deleted");
}

#[tokio::test]
async fn lost_side_topics_restored() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = node.create(&patient("Lost", "Topics", "1975-05-05")).await;
    node.create(&common::weight(&patient_id, "70.0", "2024-01-01T00:00:00Z"))
        .await;
    let (dir, _) = node.stop().await;
    let read_heads = |kafka: chartlog::log::KafkaConfig| async move {
        tokio::task::spawn_blocking(move || chartlog::log::head_topic::read_heads(&kafka))
            .await
            .unwrap()
            .unwrap()
    };
    let before = read_heads(kafka.clone())
        .await
        .expect("heads were recorded");

    let heads_topic = chartlog::log::head_topic::head_topic_name(&kafka.topic);
    let keys_topic = chartlog::log::key_topic::key_topic_name(&kafka.topic);
    delete_topics(&kafka, &[&heads_topic, &keys_topic]).await;

    let (verified, output) = replay(
        &["verify", "--log-backend", "kafka"],
        dir.path(),
        &kafka.topic,
    );
    assert!(!verified, "verify passed without the head topic: {output}");
    assert!(output.contains("is missing"), "{output}");

    // Taking the log over creates both topics again and fills them from the log and the keys.
    let node = TestNode::start_in(dir, Some(kafka.clone())).await;
    let mut after = read_heads(kafka.clone())
        .await
        .expect("the head topic was not created again");
    let mut expected = before.clone();
    after.sort();
    expected.sort();
    assert_eq!(after, expected, "the recorded heads were not restored");
    let reply = post_weight(&node, &patient_id, "71.0", "2024-01-02T00:00:00Z").await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);

    // Lost under a running owner: its next append fails, and it takes the log over again.
    delete_topics(&kafka, &[&heads_topic]).await;
    let written = eventually(Duration::from_secs(30), || async {
        let reply = post_weight(&node, &patient_id, "72.0", "2024-01-03T00:00:00Z").await;
        (reply.status == StatusCode::CREATED).then_some(())
    })
    .await;
    assert!(
        written.is_some(),
        "writes did not resume after the head topic was lost"
    );
    let highest = before.iter().map(|head| head.1 .0).max().unwrap();
    let restored = read_heads(kafka.clone()).await.expect("no head topic");
    assert!(
        restored.iter().any(|(_, seq, _)| seq.0 > highest),
        "the head topic does not hold the charts' new heads: {restored:?}"
    );
    let (dir, _) = node.stop().await;

    // A verifier holding only the shared key files reads the data keys from the key topic.
    let auditor = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(auditor.path().join("keys")).unwrap();
    for name in ["kek.key", "trusted-signers"] {
        std::fs::copy(
            dir.path().join("keys").join(name),
            auditor.path().join("keys").join(name),
        )
        .unwrap();
    }
    let (verified, output) = replay(
        &["verify", "--log-backend", "kafka"],
        auditor.path(),
        &kafka.topic,
    );
    assert!(verified, "{output}");
}

#[tokio::test]
async fn outage_restart_serves_reads() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = node
        .create(&patient("Restarted", "Outage", "1960-06-06"))
        .await;
    let (dir, _) = node.stop().await;

    let outage = StoppedBroker::stop();
    // The node ran on this topic before, so it starts without the cluster.
    let node = TestNode::start_in(dir, Some(kafka.clone())).await;
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(health.json["status"], "degraded", "{}", health.text);
    let read = node.get(&format!("/fhir/Patient/{patient_id}")).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text);
    assert_eq!(read.json["name"][0]["family"], "Restarted");
    let reply = node
        .post(
            "/fhir/Patient",
            &patient("During", "Restart", "1960-06-06").to_string(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text
    );

    outage.start();
    let written = eventually(Duration::from_secs(90), || async {
        let reply = post_weight(&node, &patient_id, "80.0", "2024-03-03T00:00:00Z").await;
        (reply.status == StatusCode::CREATED).then_some(())
    })
    .await;
    assert!(
        written.is_some(),
        "writes did not resume after the cluster came back"
    );
    let drained = eventually(Duration::from_secs(30), || async {
        let health = node.call(Method::GET, "/health", None, None, &[]).await;
        (health.json["status"] == "ok").then_some(())
    })
    .await;
    assert!(drained.is_some(), "the node stayed degraded");
    let trail = node.access_log(&patient_id).await;
    assert_eq!(TestNode::served_during_outage(&trail), 1, "{}", trail.text);
    let (dir, _) = node.stop().await;
    let (verified, output) = replay(
        &["verify", "--log-backend", "kafka"],
        dir.path(),
        &kafka.topic,
    );
    assert!(verified, "{output}");
}

#[tokio::test]
async fn first_start_needs_cluster() {
    let mut kafka =
        common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    // Nothing listens on the discard port of loopback.
    kafka.bootstrap_servers = "127.0.0.1:9".to_owned();
    let dir = tempfile::tempdir().unwrap();
    let config = chartlog::node::NodeConfig {
        data_dir: dir.path().to_path_buf(),
        kek_file: None,
        kafka: Some(kafka),
        url: Some(common::BASE.to_owned()),
    };
    let error = chartlog::node::Node::open(&config)
        .await
        .err()
        .expect("a new node started without a cluster");
    let message = format!("{error:#}");
    assert!(message.contains("cannot open the Kafka log"), "{message}");
}

#[tokio::test]
async fn standby_hands_accesses_to_owner() {
    use chartlog::journal::PendingAccess;
    use chartlog_schemas::{AccessedResource, ChartAccessed, CommandId};

    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let first = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = first.create(&patient("Handed", "Over", "1955-05-05")).await;
    let second_dir = tempfile::tempdir().unwrap();
    copy_key_files(
        &first.dir.path().join("keys"),
        &second_dir.path().join("keys"),
    );
    let second =
        TestNode::start_at(second_dir, Some(kafka.clone()), "http://second.test/fhir").await;
    // The standby projects the patient's chart and learns who owns the log.
    let chart_id = eventually(Duration::from_secs(30), || async {
        let known = second
            .call(Method::GET, "/health", None, None, &[])
            .await
            .json["log"]["ownership"]["owner_url"]
            .is_string();
        let chart = second.node.projection.patient_chart(&patient_id).unwrap();
        chart.filter(|_| known)
    })
    .await
    .expect("the standby never projected the chart or learned the owner");

    // An access the standby served while it knew no owner, as its read path journals it.
    let served_at = 1_700_000_000_000_000;
    let access = PendingAccess {
        command_id: CommandId::random(),
        actor: "nurse-7".into(),
        purpose_of_use: "TREAT".into(),
        chart_id,
        access: ChartAccessed {
            interaction: "read".into(),
            resources: vec![AccessedResource {
                resource_type: "Patient".into(),
                resource_id: patient_id.clone(),
                version: None,
            }],
            client_address: "127.0.0.1".into(),
            served_at_micros: Some(served_at),
        },
    };
    {
        let journal = second.node.access_journal.clone();
        tokio::task::spawn_blocking(move || journal.append(&[access]))
            .await
            .unwrap()
            .unwrap();
    }

    // The standby hands it over, and the owner records it on the log.
    let recorded = eventually(Duration::from_secs(30), || async {
        let trail = first.access_log(&patient_id).await;
        (TestNode::served_during_outage(&trail) == 1).then_some(trail)
    })
    .await
    .expect("the owner never recorded the handed access");
    assert!(recorded.text.contains("nurse-7"), "{}", recorded.text);
    let drained = eventually(Duration::from_secs(10), || async {
        (*second.node.access_journal.pending().borrow() == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "the standby kept the handed access");
    // Once: a second look after more handoff rounds still finds one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let trail = first.access_log(&patient_id).await;
    assert_eq!(TestNode::served_during_outage(&trail), 1, "{}", trail.text);
    second.stop().await;
    first.stop().await;
}

/// Starts an owner with one chart and a standby that shares its keys and has projected it.
async fn owner_and_standby(kafka: &chartlog::log::KafkaConfig) -> (TestNode, TestNode) {
    let first = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let early = first.create(&patient("Early", "Keys", "1950-01-01")).await;
    let second_dir = tempfile::tempdir().unwrap();
    copy_key_files(
        &first.dir.path().join("keys"),
        &second_dir.path().join("keys"),
    );
    let second =
        TestNode::start_at(second_dir, Some(kafka.clone()), "http://second.test/fhir").await;
    let projected = eventually(Duration::from_secs(30), || async {
        second.node.projection.patient_chart(&early).unwrap()
    })
    .await;
    assert!(
        projected.is_some(),
        "the standby never projected the first chart"
    );
    (first, second)
}

/// Returns the node's role in the owner group as `/health` gives it.
async fn role(node: &TestNode) -> String {
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    health.json["log"]["ownership"]["role"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn standby_join_keeps_partitioned_owner() {
    let mut kafka =
        common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    kafka.partitions = 3;
    let (first, second) = owner_and_standby(&kafka).await;
    assert_eq!(
        role(&first).await,
        "owner",
        "the joining standby took the log"
    );
    assert_eq!(role(&second).await, "standby");
    // A restarted standby rejoins without moving the log either.
    let (second_dir, _) = second.stop().await;
    let second =
        TestNode::start_at(second_dir, Some(kafka.clone()), "http://second.test/fhir").await;
    assert_eq!(
        role(&second).await,
        "standby",
        "the restarted standby took the log"
    );
    assert_eq!(role(&first).await, "owner");
    let reply = first
        .post(
            "/fhir/Patient",
            &patient("Still", "Owner", "1960-01-01").to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
}

#[tokio::test]
async fn deleted_lease_topic_is_restored() {
    let mut kafka =
        common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    kafka.partitions = 3;
    // The group notices a deleted topic at its next metadata refresh, every 300,000 ms by
    // default (librdkafka's CONFIGURATION.md).
    kafka
        .properties
        .insert("topic.metadata.refresh.interval.ms".into(), "2000".into());
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = node.create(&patient("Lost", "Lease", "1966-06-06")).await;

    let lease = chartlog::log::ownership::lease_topic_name(&kafka.topic, kafka.partitions);
    delete_topics(&kafka, &[&lease]).await;
    // With its topic gone the group assigns the lease to no member, so the node stops writing.
    let released = eventually(Duration::from_secs(60), || async {
        (role(&node).await != "owner").then_some(())
    })
    .await;
    assert!(
        released.is_some(),
        "the node kept writing without its lease"
    );
    // It creates the topic again and takes the log back, without a restart.
    let resumed = eventually(Duration::from_secs(90), || async {
        let reply = post_weight(&node, &patient_id, "66.0", "2024-06-06T00:00:00Z").await;
        (reply.status == StatusCode::CREATED).then_some(())
    })
    .await;
    assert!(
        resumed.is_some(),
        "writes did not resume after the lease topic was deleted"
    );
    assert_eq!(role(&node).await, "owner");
    node.stop().await;
}

/// Returns the client ids of the owner group's members.
fn group_members(kafka: &chartlog::log::KafkaConfig) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let group = chartlog::log::ownership::group_name(&kafka.topic);
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .create()
        .unwrap();
    let Ok(groups) = client.fetch_group_list(Some(&group), Duration::from_secs(5)) else {
        return Vec::new();
    };
    groups
        .groups()
        .iter()
        .filter(|described| described.name() == group)
        .flat_map(|described| described.members())
        .map(|member| member.client_id().to_owned())
        .collect()
}

#[tokio::test]
async fn fenced_member_joins_the_group_again() {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = node
        .create(&patient("Fenced", "Member", "1958-08-08"))
        .await;
    assert_eq!(group_members(&kafka), vec![common::BASE.to_owned()]);

    // A consumer with the node's group.instance.id, as a node started on a copy of its data
    // directory would have, fences the node's member out of the group.
    let node_id = std::fs::read_to_string(node.dir.path().join("node-id")).unwrap();
    let impostor: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set(
            "group.id",
            chartlog::log::ownership::group_name(&kafka.topic),
        )
        .set("group.instance.id", format!("chartlog-{}", node_id.trim()))
        .set("client.id", "impostor")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .create()
        .unwrap();
    let lease = chartlog::log::ownership::lease_topic_name(&kafka.topic, kafka.partitions);
    impostor.subscribe(&[&lease]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while impostor.assignment().unwrap().count() == 0 && Instant::now() < deadline {
        impostor.poll(Duration::from_millis(200));
    }
    assert!(
        impostor.assignment().unwrap().count() > 0,
        "the impostor was not assigned the lease"
    );
    drop(impostor);

    // Once the impostor's session ends, the node is a member again and owns the log.
    let rejoined = eventually(Duration::from_secs(180), || {
        let members = group_members(&kafka);
        async move { members.contains(&common::BASE.to_owned()).then_some(()) }
    })
    .await;
    assert!(
        rejoined.is_some(),
        "the fenced node never joined the group again"
    );
    let written = eventually(Duration::from_secs(60), || async {
        let reply = post_weight(&node, &patient_id, "58.0", "2024-08-08T00:00:00Z").await;
        (reply.status == StatusCode::CREATED).then_some(())
    })
    .await;
    assert!(
        written.is_some(),
        "writes did not resume after the node joined again"
    );
    assert_eq!(role(&node).await, "owner");
    node.stop().await;
}

/// Replaces the event topic's settings with `retention.ms` and the broker's defaults.
async fn set_retention(kafka: &chartlog::log::KafkaConfig, retention_ms: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .create()
        .unwrap();
    let change = AlterConfig::new(ResourceSpecifier::Topic(&kafka.topic))
        .set("retention.ms", retention_ms)
        .set("retention.bytes", "-1");
    let altered = admin
        .alter_configs([&change], &AdminOptions::new())
        .await
        .unwrap();
    assert!(altered.iter().all(Result::is_ok), "{altered:?}");
}

#[tokio::test]
async fn retention_set_while_running_stops_writes() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = node.create(&patient("Kept", "Records", "1947-07-07")).await;

    // A retention of one day would have the broker delete the chart's events tomorrow.
    set_retention(&kafka, "86400000").await;
    let stopped = eventually(Duration::from_secs(90), || async {
        let health = node.call(Method::GET, "/health", None, None, &[]).await;
        let reason = health.json["log"]["ownership"]["take_over_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        reason.contains("retention.ms=86400000").then_some(health)
    })
    .await
    .expect("the owner did not notice the retention");
    assert_eq!(stopped.json["status"], "degraded", "{}", stopped.text);
    let refused = post_weight(&node, &patient_id, "47.0", "2024-07-07T00:00:00Z").await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text
    );

    // Fixed on the cluster, the topic is taken over again without a restart.
    set_retention(&kafka, "-1").await;
    let resumed = eventually(Duration::from_secs(60), || async {
        let reply = post_weight(&node, &patient_id, "47.5", "2024-07-08T00:00:00Z").await;
        (reply.status == StatusCode::CREATED).then_some(())
    })
    .await;
    assert!(
        resumed.is_some(),
        "writes did not resume once the retention was fixed"
    );
    node.stop().await;
}

#[tokio::test]
async fn standby_follows_recreated_key_topic() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let (first, second) = owner_and_standby(&kafka).await;

    delete_topics(
        &kafka,
        &[&chartlog::log::key_topic::key_topic_name(&kafka.topic)],
    )
    .await;
    // The owner's next write fails, so it takes the log over again and fills the new key
    // topic. The chart it then creates has a key that the standby must find there.
    let late = eventually(Duration::from_secs(30), || async {
        let reply = first
            .post(
                "/fhir/Patient",
                &patient("Late", "Keys", "1951-01-01").to_string(),
            )
            .await;
        (reply.status == StatusCode::CREATED).then(|| reply.json["id"].as_str().unwrap().to_owned())
    })
    .await
    .expect("writes did not resume after the key topic was lost");
    let projected = eventually(Duration::from_secs(30), || async {
        second.node.projection.patient_chart(&late).unwrap()
    })
    .await;
    assert!(
        projected.is_some(),
        "the standby did not project a chart whose key is in the new key topic: {:?}",
        second.node.projector.borrow().halted
    );
    assert_eq!(second.node.projector.borrow().halted, None);
    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn standby_reads_new_keys_after_outages() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let (first, second) = owner_and_standby(&kafka).await;

    // Neither node's key topic reader has work through the outages: no new chart needs a key.
    for _ in 0..2 {
        let broker = StoppedBroker::stop();
        tokio::time::sleep(Duration::from_secs(12)).await;
        broker.start();
    }
    // An outage longer than the group's session timeout ends the owner's lease, and the group
    // may then hand it to either node. The chart is written through the node that has it.
    let nodes = [&first, &second];
    let written = eventually(Duration::from_secs(60), || async {
        for (index, node) in nodes.iter().enumerate() {
            if role(node).await != "owner" {
                continue;
            }
            let reply = node
                .post(
                    "/fhir/Patient",
                    &patient("After", "Outages", "1953-01-01").to_string(),
                )
                .await;
            if reply.status == StatusCode::CREATED {
                return Some((index, reply.json["id"].as_str().unwrap().to_owned()));
            }
        }
        None
    })
    .await;
    let Some((owner, late)) = written else {
        let first_health = first.call(Method::GET, "/health", None, None, &[]).await;
        let second_health = second.call(Method::GET, "/health", None, None, &[]).await;
        panic!(
            "writes did not resume after the outages\nfirst: {}\nsecond: {}",
            first_health.text, second_health.text
        );
    };
    // Errors the reader's client queued during the outages must not fail the catch-ups that
    // fetch the new chart's key, one queued error at a time.
    let standby = nodes[1 - owner];
    let projected = eventually(Duration::from_secs(15), || async {
        standby.node.projection.patient_chart(&late).unwrap()
    })
    .await;
    assert!(
        projected.is_some(),
        "the standby did not project the new chart: {:?}",
        standby.node.projector.borrow().retrying
    );
    let health = standby.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(
        health.json["projections"]["chart"]["retrying"],
        serde_json::Value::Null,
        "{}",
        health.text
    );
    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn stalled_reader_gets_a_new_client() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    node.create(&patient("Held", "Back", "1955-01-01")).await;
    node.create(&patient("Read", "On", "1956-01-01")).await;
    let log = KafkaLog::open_reader(kafka).await.unwrap();
    let end = log.end_position().borrow().get(0);
    let first = log
        .read_from(chartlog::log::LogPosition::new(0, 0), 1)
        .unwrap();
    assert_eq!(first.len(), 1);
    let next = chartlog::log::LogPosition::new(0, first[0].0.offset + 1);
    assert!(next.offset < end, "the log holds one entry only");

    // The reader's client now fetches nothing at the position the reader expects next.
    log.stall_reader(0).unwrap();
    let log = std::sync::Arc::new(log);
    let stalled = {
        let log = log.clone();
        tokio::task::spawn_blocking(move || log.read_from(next, 16))
            .await
            .unwrap()
            .unwrap()
    };
    assert!(stalled.is_empty(), "the stalled client still read");
    assert_eq!(log.readers_replaced(), 0);

    // Reads go on finding nothing until the watch replaces the client, then read on.
    let resumed = eventually(Duration::from_secs(40), || {
        let log = log.clone();
        async move {
            let entries = tokio::task::spawn_blocking(move || log.read_from(next, 16))
                .await
                .unwrap()
                .unwrap();
            (!entries.is_empty()).then_some(entries)
        }
    })
    .await
    .expect("the stalled reader never read on");
    assert_eq!(resumed[0].0, next);
    assert_eq!(log.readers_replaced(), 1);
    node.stop().await;
}

/// Sends `store`'s wrapped record of `key_id` to the key topic, as a writer's transaction does.
async fn publish_key(
    kafka: &chartlog::log::KafkaConfig,
    store: &chartlog::crypto::KeyStore,
    key_id: chartlog_schemas::KeyId,
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let record = store.wrapped_record(key_id).unwrap().unwrap();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .create()
        .unwrap();
    let topic = chartlog::log::key_topic::key_topic_name(&kafka.topic);
    producer
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key(key_id.as_bytes().as_slice())
                .payload(&record),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn key_catch_up_survives_past_outages() {
    use chartlog::crypto::keystore::KeyPaths;
    use chartlog::crypto::{KeySource, KeyStore};

    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let writer_dir = tempfile::tempdir().unwrap();
    let (writer, _) = KeyStore::open(&KeyPaths::under(writer_dir.path(), None), true).unwrap();
    let reader_dir = tempfile::tempdir().unwrap();
    copy_key_files(
        &writer_dir.path().join("keys"),
        &reader_dir.path().join("keys"),
    );
    let (reader, _) = KeyStore::open(&KeyPaths::under(reader_dir.path(), None), true).unwrap();
    let topic = chartlog::log::key_topic::KeyTopic::open(&kafka, true)
        .await
        .unwrap();

    let first = writer
        .create_data_key(chartlog_schemas::ChartId::random())
        .unwrap();
    publish_key(&kafka, &writer, first).await;
    let (topic, reader) = tokio::task::spawn_blocking(move || {
        topic.catch_up(&reader).unwrap();
        (topic, reader)
    })
    .await
    .unwrap();
    assert!(reader.data_key(first).is_ok());

    // While the broker is away the idle reader's client queues connection errors.
    let broker = StoppedBroker::stop();
    tokio::time::sleep(Duration::from_secs(12)).await;
    broker.start();
    let second = writer
        .create_data_key(chartlog_schemas::ChartId::random())
        .unwrap();
    publish_key(&kafka, &writer, second).await;
    // One catch-up, as a projector meeting the chart's first event makes, finds the key.
    let (caught_up, reader) = tokio::task::spawn_blocking(move || {
        let caught_up = topic.catch_up(&reader);
        (caught_up, reader)
    })
    .await
    .unwrap();
    assert!(
        caught_up.is_ok(),
        "an error queued during the outage failed the catch-up: {caught_up:?}"
    );
    assert!(reader.data_key(second).is_ok());
}

#[tokio::test]
async fn emptied_topic_take_over_rejected() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let node = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = node
        .create(&patient("Emptied", "Topic", "1945-04-04"))
        .await;
    let (dir, _) = node.stop().await;

    // The event topic deleted and created again empty, and the node then started while the
    // cluster is away, so it cannot see at start that its log shrank.
    delete_topics(&kafka, &[&kafka.topic]).await;
    create_topic(
        &kafka.bootstrap_servers,
        &kafka.topic,
        1,
        &[("retention.ms", "-1"), ("retention.bytes", "-1")],
    )
    .await;
    let outage = StoppedBroker::stop();
    let node = TestNode::start_in(dir, Some(kafka.clone())).await;
    outage.start();

    let refused = eventually(Duration::from_secs(60), || async {
        let health = node.call(Method::GET, "/health", None, None, &[]).await;
        let reason = health.json["log"]["ownership"]["take_over_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        reason.contains("entries were lost").then_some(reason)
    })
    .await;
    assert!(
        refused.is_some(),
        "the node took over a log that lost its entries"
    );
    let reply = post_weight(&node, &patient_id, "70.0", "2024-04-04T00:00:00Z").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text
    );
    assert_eq!(
        node.node.log.end_position().borrow().total(),
        0,
        "something was written on the emptied topic"
    );
}
