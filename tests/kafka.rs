//! Faults on a real Apache Kafka broker, started by `compose/kafka.sh`: a writer fenced by a
//! newer one, a second node on the same topic, a broker outage that writes survive once the
//! broker is back, and a log copied to Kafka and back. Run with `--features kafka-tests`,
//! `CHARTLOG_TEST_LOG=kafka` and one test thread, since one test stops the shared broker;
//! `scripts/test.sh` does all three.

mod common;

use std::process::Command as Process;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use chartlog::log::{EventLog, KafkaLog};
use chartlog_schemas::Envelope;
use common::{patient, TestNode};

fn kafka_script(arguments: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/compose/kafka.sh");
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

    let entries = tokio::task::spawn_blocking(move || {
        newer.read_from(chartlog::log::LogPosition(0), 10).unwrap()
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

    kafka_script(&["stop-broker", "1"]);
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

    kafka_script(&["start-broker", "1"]);
    kafka_script(&["wait", "--timeout", "90"]);
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

fn replay(arguments: &[&str], data: &std::path::Path, topic: &str) -> (bool, String) {
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
    log.read_from(chartlog::log::LogPosition(0), 100_000)
        .unwrap()
        .into_iter()
        .map(|(position, envelope)| (position.0, envelope.0))
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

#[tokio::test]
async fn two_nodes_on_one_topic_keep_one_chain() {
    let kafka = common::test_kafka_config().expect("the kafka tests need CHARTLOG_TEST_LOG=kafka");
    let first = TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await;
    let patient_id = first
        .create(&patient("Shared", "Topic", "1970-01-01"))
        .await;
    let (first_dir, _) = first.stop().await;

    // The nodes share a key store, as a deployment would through its key service.
    let second_dir = tempfile::tempdir().unwrap();
    copy_tree(
        &first_dir.path().join("keys"),
        &second_dir.path().join("keys"),
    );
    let first = TestNode::start_in(first_dir, Some(kafka.clone())).await;
    first
        .create(&common::weight(&patient_id, "60.0", "2024-01-01T00:00:00Z"))
        .await;

    let second = TestNode::start_in(second_dir, Some(kafka.clone())).await;
    let fenced = first
        .post(
            "/fhir/Observation",
            &common::weight(&patient_id, "61.0", "2024-01-02T00:00:00Z").to_string(),
        )
        .await;
    assert_eq!(
        fenced.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the fenced node still wrote: {}",
        fenced.text
    );
    // A fenced node must not take the partition back on its next writes, since its chart
    // heads are stale: it stays fenced until a restart.
    for attempt in 0..3 {
        let again = first
            .post(
                "/fhir/Observation",
                &common::weight(&patient_id, "61.5", "2024-01-02T00:00:00Z").to_string(),
            )
            .await;
        assert_eq!(
            again.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}: {}",
            again.text
        );
    }
    second
        .create(&common::weight(&patient_id, "62.0", "2024-01-03T00:00:00Z"))
        .await;

    let log = KafkaLog::open_reader(kafka).await.unwrap();
    let keys = second.node.keys.clone();
    let report = tokio::task::spawn_blocking(move || {
        chartlog::verify::verify_log(&log, &keys, None).unwrap()
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
        observations.json["total"], 2,
        "the fenced write must not appear"
    );
}
