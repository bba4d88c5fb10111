//! Tamper tests of `chartlog-replay verify`: a log written by a real node passes, and each kind
//! of alteration made directly in the RocksDB files is detected and named.

use std::path::Path;
use std::process::Command as Process;

use chartlog::command::{ChartTarget, Command, Operation};
use chartlog::node::{Node, NodeConfig};
use chartlog_schemas::envelope;

const CHART_EVENTS: usize = 6;

/// Writes a patient and five observations through a real node, then stops it.
fn write_sample_log(dir: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config = NodeConfig { data_dir: dir.to_path_buf(), kek_file: None, kafka: None, url: None };
        let node = Node::open(&config).await.unwrap();
        let record = |resource_type: &str, id: &str, body: serde_json::Value| Operation::Record {
            resource_type: resource_type.into(),
            resource_id: id.into(),
            resource: body.as_object().unwrap().clone(),
            chart: ChartTarget::Patient("pat-1".into()),
            if_match: None,
            create_only: true,
            references: Vec::new(),
        };
        let mut operations = vec![record(
            "Patient",
            "pat-1",
            serde_json::json!({"resourceType": "Patient", "name": [{"family": "Synthetic"}]}),
        )];
        for index in 0..(CHART_EVENTS - 2) {
            operations.push(record(
                "Observation",
                &format!("obs-{index}"),
                serde_json::json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/pat-1"}}),
            ));
        }
        for operation in operations {
            let command = Command {
                actor: "tester".into(),
                purpose_of_use: "TREAT".into(),
                command_id: None,
                fingerprint: None,
                operations: vec![operation],
            };
            node.writer.submit(command).await.unwrap();
        }
        node.shutdown().await;
    });
}

fn run_verify(dir: &Path) -> (bool, String) {
    let output = Process::new(env!("CARGO_BIN_EXE_chartlog-replay"))
        .args(["verify", "--data"])
        .arg(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn open_log_db(dir: &Path) -> rocksdb::DB {
    let options = rocksdb::Options::default();
    rocksdb::DB::open_cf(&options, dir.join("log"), ["default", "heads"]).unwrap()
}

fn key(position: u64) -> [u8; 8] {
    position.to_be_bytes()
}

/// Returns a fresh sample log and the positions of the chart's events (log order).
fn sample() -> (tempfile::TempDir, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    write_sample_log(dir.path());
    let db = open_log_db(dir.path());
    let mut positions = Vec::new();
    for item in db.iterator(rocksdb::IteratorMode::Start) {
        let (key, _) = item.unwrap();
        positions.push(u64::from_be_bytes(key.as_ref().try_into().unwrap()));
    }
    assert_eq!(
        positions.len(),
        CHART_EVENTS,
        "chart opened plus five resources"
    );
    (dir, positions)
}

fn chart_id_of(db: &rocksdb::DB, position: u64) -> String {
    let bytes = db.get(key(position)).unwrap().unwrap();
    envelope::parse(&bytes).unwrap().header.chart_id.to_string()
}

#[test]
fn untouched_log_verifies() {
    let (dir, _) = sample();
    let (ok, output) = run_verify(dir.path());
    assert!(ok, "{output}");
    assert!(output.contains("events:          6"), "{output}");
    assert!(output.contains("charts:          1"), "{output}");
}

#[test]
fn altered_byte_is_named() {
    let (dir, positions) = sample();
    let chart = {
        let db = open_log_db(dir.path());
        let mut bytes = db.get(key(positions[3])).unwrap().unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        db.put(key(positions[3]), bytes).unwrap();
        chart_id_of(&db, positions[0])
    };
    let (ok, output) = run_verify(dir.path());
    assert!(!ok, "an altered byte went unnoticed: {output}");
    assert!(
        output.contains(&format!("position {}", positions[3])),
        "{output}"
    );
    assert!(output.contains(&chart), "the chart is named: {output}");
    assert!(
        output.contains("sequence 4"),
        "the sequence number is named: {output}"
    );
}

#[test]
fn altered_last_event_is_not_called_a_removal() {
    let (dir, positions) = sample();
    {
        let db = open_log_db(dir.path());
        let last = *positions.last().unwrap();
        let mut bytes = db.get(key(last)).unwrap().unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        db.put(key(last), bytes).unwrap();
    }
    let (ok, output) = run_verify(dir.path());
    assert!(!ok, "an altered last event went unnoticed: {output}");
    assert!(output.contains("sequence 6"), "{output}");
    assert!(
        !output.contains("events were removed"),
        "an altered event was reported as removed: {output}"
    );
    assert!(output.contains("because of the problems above"), "{output}");
}

#[test]
fn removed_event_is_named() {
    let (dir, positions) = sample();
    {
        let db = open_log_db(dir.path());
        db.delete(key(positions[2])).unwrap();
    }
    let (ok, output) = run_verify(dir.path());
    assert!(!ok, "a removed event went unnoticed: {output}");
    assert!(
        output.contains("expected sequence number 3 in this chart, found 4"),
        "{output}"
    );
}

#[test]
fn swapped_events_are_named() {
    let (dir, positions) = sample();
    {
        let db = open_log_db(dir.path());
        let first = db.get(key(positions[2])).unwrap().unwrap();
        let second = db.get(key(positions[3])).unwrap().unwrap();
        db.put(key(positions[2]), second).unwrap();
        db.put(key(positions[3]), first).unwrap();
    }
    let (ok, output) = run_verify(dir.path());
    assert!(!ok, "swapped events went unnoticed: {output}");
    assert!(
        output.contains("expected sequence number 3 in this chart, found 4"),
        "{output}"
    );
}

#[test]
fn forged_event_is_named() {
    let (dir, positions) = sample();
    {
        let db = open_log_db(dir.path());
        let last = db.get(key(*positions.last().unwrap())).unwrap().unwrap();
        let parsed = envelope::parse(&last).unwrap();
        // A forger who knows the chain continues it correctly but signs with a key of their own.
        let forger = chartlog::crypto::NodeSigner::from_seed(&[42u8; 32]);
        let mut header = parsed.header.clone();
        header.seq = header.seq.next();
        header.prev_digest = parsed.digest;
        header.signer = forger.id();
        let payload = chartlog_schemas::EventPayload::ResourceRetracted(
            chartlog_schemas::ResourceRetracted {
                resource_type: "Patient".into(),
                resource_id: "pat-1".into(),
                version: 2,
                command_fingerprint: None,
            },
        );
        let key_material = chartlog::crypto::SymmetricKey::from_bytes([7u8; 32]);
        let forged = chartlog::crypto::seal_event(&header, &payload, &key_material, &forger);
        db.put(key(positions.last().unwrap() + 1), forged.0)
            .unwrap();
    }
    let (ok, output) = run_verify(dir.path());
    assert!(!ok, "a forged event went unnoticed: {output}");
    assert!(output.contains("signed by untrusted key"), "{output}");
    assert!(output.contains("sequence 7"), "{output}");
}

#[test]
fn truncated_chart_tail_is_named() {
    let (dir, positions) = sample();
    let chart = {
        let db = open_log_db(dir.path());
        let chart = chart_id_of(&db, positions[0]);
        for position in &positions[4..] {
            db.delete(key(*position)).unwrap();
        }
        chart
    };
    let (ok, output) = run_verify(dir.path());
    assert!(!ok, "a truncated chart went unnoticed: {output}");
    assert!(output.contains(&chart), "{output}");
    assert!(
        output.contains("chart ends at sequence 4 but its recorded head is sequence 6"),
        "{output}"
    );
}

#[test]
fn verify_of_missing_directory_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = run_verify(&dir.path().join("absent"));
    assert!(!ok);
    assert!(output.contains("does not exist"), "{output}");
    assert_eq!(output.lines().count(), 1, "a one-line message: {output}");
}

/// Copies a directory tree, file by file.
fn copy_tree(from: &Path, to: &Path) {
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

#[test]
fn auditor_copy_verifies_read_only() {
    let (dir, _) = sample();
    // The auditor's copy: everything but the node's private signing key.
    let audit = tempfile::tempdir().unwrap();
    copy_tree(dir.path(), audit.path());
    let signing_key = audit.path().join("keys/node-signing.key");
    std::fs::remove_file(&signing_key).unwrap();
    let (ok, output) = run_verify(audit.path());
    assert!(ok, "{output}");
    assert!(!signing_key.exists(), "verify created a signing key");

    // Without the trusted signers file nothing names a key to trust.
    std::fs::remove_file(audit.path().join("keys/trusted-signers")).unwrap();
    let (ok, output) = run_verify(audit.path());
    assert!(!ok);
    assert!(output.contains("no trusted signers"), "{output}");
    assert_eq!(output.lines().count(), 1, "a one-line message: {output}");
}

#[test]
fn verify_before_first_start() {
    // A new node's directory holds only the key files it shares with the others.
    let (dir, _) = sample();
    let fresh = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(fresh.path().join("keys")).unwrap();
    for name in ["kek.key", "node-signing.key", "trusted-signers"] {
        std::fs::copy(
            dir.path().join("keys").join(name),
            fresh.path().join("keys").join(name),
        )
        .unwrap();
    }
    let output = Process::new(env!("CARGO_BIN_EXE_chartlog-replay"))
        .args(["verify", "--data"])
        .arg(fresh.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "there is no log to read");
    assert!(
        !fresh.path().join("keys/data-keys").exists(),
        "verify created the key database"
    );
    assert!(
        !fresh.path().join("log").exists(),
        "verify created a log directory"
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config = NodeConfig {
            data_dir: fresh.path().to_path_buf(),
            kek_file: None,
            kafka: None,
            url: None,
        };
        let node = Node::open(&config)
            .await
            .expect("the node starts after a verify");
        node.shutdown().await;
    });
}

#[test]
fn pinned_signers_reject_the_directory_key() {
    let (dir, _) = sample();
    let other = chartlog::crypto::NodeSigner::from_seed(&[3u8; 32]);
    let pinned = dir.path().join("expected-signers");
    std::fs::write(&pinned, format!("{}\n", hex::encode(other.public_key()))).unwrap();
    let output = Process::new(env!("CARGO_BIN_EXE_chartlog-replay"))
        .args(["verify", "--data"])
        .arg(dir.path())
        .arg("--trusted-signers")
        .arg(&pinned)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a log signed by an unpinned key passed"
    );
    assert!(text.contains("signed by untrusted key"), "{text}");
}

/// Appends one more observation to the sample chart through a real node.
fn append_observation(dir: &Path, id: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config = NodeConfig { data_dir: dir.to_path_buf(), kek_file: None, kafka: None, url: None };
        let node = Node::open(&config).await.unwrap();
        let command = Command {
            actor: "tester".into(),
            purpose_of_use: "TREAT".into(),
            command_id: None,
            fingerprint: None,
            operations: vec![Operation::Record {
                resource_type: "Observation".into(),
                resource_id: id.into(),
                resource: serde_json::json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/pat-1"}}).as_object().unwrap().clone(),
                chart: ChartTarget::Patient("pat-1".into()),
                if_match: None,
                create_only: true,
                references: Vec::new(),
            }],
        };
        node.writer.submit(command).await.unwrap();
        node.shutdown().await;
    });
}

#[test]
fn earlier_heads_checked_in_place() {
    use chartlog::crypto::keystore::KeyPaths;
    use chartlog::crypto::KeyStore;
    use chartlog::log::EmbeddedLog;
    use chartlog::verify::{verify_log, HeadCheck};

    let (dir, _) = sample();
    let earlier = EmbeddedLog::open_read_only(&dir.path().join("log"))
        .unwrap()
        .chart_heads()
        .unwrap();
    append_observation(dir.path(), "obs-late");
    let log = EmbeddedLog::open_read_only(&dir.path().join("log")).unwrap();
    let keys = KeyStore::open_read_only(&KeyPaths::under(dir.path(), None), None).unwrap();

    // A writer appended after the heads were read: that is no problem for heads read before.
    let report = verify_log(&log, &keys, HeadCheck::Before(&earlier)).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    // Taken as the heads at the log's end, the same heads look rolled back.
    let report = verify_log(&log, &keys, HeadCheck::AtEnd(&earlier)).unwrap();
    assert!(
        report.problems[0].failure.contains("rolled back"),
        "{:?}",
        report.problems
    );

    // A head whose digest is not the chart's event at that sequence number is a replacement.
    let mut altered = earlier.clone();
    altered[0].2[0] ^= 1;
    let report = verify_log(&log, &keys, HeadCheck::Before(&altered)).unwrap();
    assert!(
        report.problems[0].failure.contains("was replaced"),
        "{:?}",
        report.problems
    );
    // A head beyond the chart's last event means events were removed.
    let mut ahead = earlier;
    ahead[0].1 = chartlog_schemas::EventSeq(ahead[0].1 .0 + 5);
    let report = verify_log(&log, &keys, HeadCheck::Before(&ahead)).unwrap();
    assert!(
        report.problems[0].failure.contains("events were removed"),
        "{:?}",
        report.problems
    );
}

#[test]
fn early_stop_skips_head_checks() {
    use chartlog::crypto::keystore::KeyPaths;
    use chartlog::crypto::KeyStore;
    use chartlog::log::{EmbeddedLog, EventLog};
    use chartlog::verify::{verify_log, HeadCheck};

    let dir = tempfile::tempdir().unwrap();
    let (keys, _) = KeyStore::open(&KeyPaths::under(dir.path(), None), true).unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log"), true).unwrap();
    let junk: Vec<_> = (0..30u8)
        .map(|byte| chartlog_schemas::Envelope(vec![byte; 40]))
        .collect();
    log.append_batch(&junk).unwrap();
    // A chart whose events would come after the problems that stop the reading.
    let unread = (
        chartlog_schemas::ChartId::random(),
        chartlog_schemas::EventSeq(3),
        [1u8; 32],
    );
    let report = verify_log(&log, &keys, HeadCheck::AtEnd(&[unread])).unwrap();
    assert!(report.stopped_early);
    assert!(
        report
            .problems
            .iter()
            .all(|problem| problem.failure.contains("envelope layout invalid")),
        "{:?}",
        report.problems
    );
}

#[test]
fn wrong_kek_exits_two() {
    use std::os::unix::fs::PermissionsExt;

    let (dir, _) = sample();
    let other = dir.path().join("other.kek");
    std::fs::write(&other, hex::encode([5u8; 32])).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = Process::new(env!("CARGO_BIN_EXE_chartlog-replay"))
        .args(["verify", "--data"])
        .arg(dir.path())
        .arg("--key-file")
        .arg(&other)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("does not unwrap"), "{text}");
    assert_eq!(text.lines().count(), 1, "a one-line message: {text}");
}

#[test]
fn log_shorter_than_its_projection_fails() {
    // The log and its heads cut back together, as a lost end of the write-ahead log leaves
    // them. Only the projection still records how far the log went.
    let (dir, positions) = sample();
    // A start waits until the projection has applied the whole log.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let config = NodeConfig {
            data_dir: dir.path().to_path_buf(),
            kek_file: None,
            kafka: None,
            url: None,
        };
        Node::open(&config).await.unwrap().shutdown().await;
    });
    {
        let db = open_log_db(dir.path());
        let heads = db.cf_handle("heads").unwrap();
        let keys: Vec<Vec<u8>> = db
            .iterator_cf(heads, rocksdb::IteratorMode::Start)
            .map(|item| item.unwrap().0.to_vec())
            .collect();
        for key in keys {
            db.delete_cf(heads, key).unwrap();
        }
        db.delete(key(*positions.last().unwrap())).unwrap();
    }
    let (ok, output) = run_verify(dir.path());
    assert!(!ok, "a log that lost its end passed: {output}");
    assert!(
        output.contains("the chart projection has applied 6 log entries but the log holds 5"),
        "{output}"
    );
}
