//! Faults on a real Apache Kafka broker, started by `compose/kafka.sh`: a writer fenced by a
//! newer one, and a broker outage that writes survive once the broker is back. Run with
//! `CHARTLOG_TEST_LOG=kafka` and one test thread, since one test stops the shared broker;
//! `scripts/test.sh` does both.

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
    let Some(config) = common::test_kafka_config() else {
        eprintln!("CHARTLOG_TEST_LOG is not kafka; skipped");
        return;
    };
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
    if !common::on_kafka() {
        eprintln!("CHARTLOG_TEST_LOG is not kafka; skipped");
        return;
    }
    let node = TestNode::start().await;
    node.create(&patient("Before", "Outage", "1970-01-01"))
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
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(health.json["status"], "ok", "{}", health.text);
    let found = node.get("/fhir/Patient?name=During").await;
    assert_eq!(
        found.json["total"], 0,
        "the write that failed during the outage must not appear"
    );
    let found = node.get("/fhir/Patient?name=After").await;
    assert_eq!(found.json["total"], 1);
}
