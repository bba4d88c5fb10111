//! Replication on a three-broker Kafka cluster started by `compose/kafka.sh start --brokers 3`:
//! with replication factor 3 and `min.insync.replicas` 2, stopping one broker during a stream
//! of writes loses no acknowledged write. Needs `--features kafka-tests`,
//! `CHARTLOG_TEST_LOG=kafka` and `CHARTLOG_TEST_KAFKA_BROKERS=3`; `scripts/test.sh` sets them.

mod common;

use std::process::Command as Process;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{patient, TestNode};

fn kafka_script(arguments: &[&str]) {
    let script = common::checkout().join("compose/kafka.sh");
    let status = Process::new("bash")
        .arg(script)
        .args(arguments)
        .status()
        .unwrap();
    assert!(status.success(), "kafka.sh {arguments:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_loss_keeps_acknowledged_writes() {
    let three_brokers =
        std::env::var("CHARTLOG_TEST_KAFKA_BROKERS").is_ok_and(|count| count == "3");
    assert!(
        three_brokers,
        "the replication test needs CHARTLOG_TEST_KAFKA_BROKERS=3"
    );
    let mut kafka =
        common::test_kafka_config().expect("the replication test needs CHARTLOG_TEST_LOG=kafka");
    kafka.replication_factor = 3;
    kafka.min_insync_replicas = 2;
    let node =
        Arc::new(TestNode::start_in(tempfile::tempdir().unwrap(), Some(kafka.clone())).await);

    // Four writers stream Patients while one broker stops and starts again.
    let mut writers = Vec::new();
    for writer in 0..4 {
        let node = node.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for index in 0..150 {
                let body =
                    patient(&format!("Replica{writer}n{index}"), "Kept", "1970-01-01").to_string();
                let reply = node.post("/fhir/Patient", &body).await;
                if reply.status == StatusCode::CREATED {
                    acknowledged.push(reply.json["id"].as_str().unwrap().to_owned());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(|| kafka_script(&["stop-broker", "2"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::spawn_blocking(|| {
        kafka_script(&["start-broker", "2"]);
        kafka_script(&["wait", "--timeout", "90"]);
    })
    .await
    .unwrap();

    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    assert!(
        acknowledged.len() > 100,
        "too few writes succeeded: {}",
        acknowledged.len()
    );
    for id in &acknowledged {
        let read = node.get(&format!("/fhir/Patient/{id}")).await;
        assert_eq!(
            read.status,
            StatusCode::OK,
            "acknowledged Patient/{id} was lost"
        );
    }

    // A fresh reader of the topic sees an intact log.
    let log = chartlog::log::KafkaLog::open_reader(kafka).await.unwrap();
    let keys = node.node.keys.clone();
    let report = tokio::task::spawn_blocking(move || {
        chartlog::verify::verify_log(&log, &keys, chartlog::verify::HeadCheck::Unrecorded).unwrap()
    })
    .await
    .unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}
