//! The `chartlog` binary on bad setups: a second server on one data directory, missing or
//! exposed key files, a corrupt log, and bad arguments. Each must end with a one-line message
//! and write nothing.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn chartlog() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chartlog"))
}

/// Starts a server on an ephemeral loopback port and waits until it logs that it is ready.
fn start_server(data: &Path) -> Child {
    let mut child = chartlog()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("CHARTLOG_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "server did not become ready");
        match lines.next() {
            Some(Ok(line)) if line.contains("chartlog ready") => break,
            Some(Ok(_)) => {}
            _ => panic!("server exited before it was ready"),
        }
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

/// Runs a command that must fail and returns its stderr.
fn run_failing(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(!output.status.success(), "command succeeded unexpectedly");
    String::from_utf8_lossy(&output.stderr).trim().to_owned()
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or("")
}

#[test]
fn second_server_on_same_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start_server(dir.path());
    let message = run_failing(
        chartlog()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path()),
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let line = last_line(&message);
    assert!(line.starts_with("chartlog: "), "{message}");
    assert!(
        line.contains("in use by another Chartlog process"),
        "{message}"
    );
}

#[test]
fn missing_key_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path());
    server.kill().unwrap();
    server.wait().unwrap();
    std::fs::remove_file(dir.path().join("keys/kek.key")).unwrap();
    let message = run_failing(
        chartlog()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path()),
    );
    let line = last_line(&message);
    assert!(line.contains("kek.key"), "{message}");
    assert!(line.contains("missing"), "{message}");
    assert!(
        !dir.path().join("keys/kek.key").exists(),
        "a new key-encryption key was created silently"
    );
}

#[test]
fn key_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path());
    server.kill().unwrap();
    server.wait().unwrap();
    let kek = dir.path().join("keys/kek.key");
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    let message = run_failing(
        chartlog()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path()),
    );
    assert!(last_line(&message).contains("chmod 600"), "{message}");
}

#[test]
fn corrupt_log_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path());
    server.kill().unwrap();
    server.wait().unwrap();
    let log_dir = dir.path().join("log");
    for entry in std::fs::read_dir(&log_dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("CURRENT")
        {
            std::fs::write(&path, "garbage\n").unwrap();
        }
    }
    let message = run_failing(
        chartlog()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path()),
    );
    let line = last_line(&message);
    assert!(line.starts_with("chartlog: "), "{message}");
    assert!(line.contains("log"), "{message}");
}

#[test]
fn token_with_unknown_role_fails_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let message = run_failing(
        chartlog()
            .args(["token", "--sub", "x", "--role", "janitor", "--data"])
            .arg(dir.path()),
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("unknown role janitor"), "{message}");
}

#[test]
fn token_missing_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let message = run_failing(
        chartlog()
            .args(["token", "--sub", "x", "--role", "nurse", "--data"])
            .arg(&missing),
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("does not exist"), "{message}");
    assert!(!missing.exists(), "the token command created the directory");
}

#[test]
fn config_file_error_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("typo.toml");
    std::fs::write(&config, "lisen = \"127.0.0.1:1\"\n[kafka\n").unwrap();
    let message = run_failing(chartlog().args(["serve", "--config"]).arg(&config));
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("invalid config file"), "{message}");
}

#[test]
fn usage_error_is_one_line() {
    let message = run_failing(chartlog().args(["serve", "--bogus"]));
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("--bogus"), "{message}");
    assert!(message.contains("chartlog --help"), "{message}");
}

#[test]
fn invalid_kafka_counts_rejected() {
    for (variable, value, expected) in [
        (
            "CHARTLOG_KAFKA_REPLICATION_FACTOR",
            "three",
            "CHARTLOG_KAFKA_REPLICATION_FACTOR must be a positive whole number",
        ),
        (
            "CHARTLOG_KAFKA_PARTITIONS",
            "0",
            "CHARTLOG_KAFKA_PARTITIONS must be a positive whole number",
        ),
        (
            "CHARTLOG_KAFKA_PARTITIONS",
            "1000000",
            "CHARTLOG_KAFKA_PARTITIONS) must be a whole number from 1 to 100000",
        ),
        (
            "CHARTLOG_KAFKA_MIN_INSYNC_REPLICAS",
            "2",
            "CHARTLOG_KAFKA_MIN_INSYNC_REPLICAS) must be at most the replication factor",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let message = run_failing(
            chartlog()
                .args(["serve", "--log-backend", "kafka", "--data"])
                .arg(dir.path())
                .env("CHARTLOG_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
                .env(variable, value),
        );
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(message.contains(expected), "{message}");
    }
}

#[test]
fn token_prints_a_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let output = chartlog()
        .args(["token", "--sub", "dr-ada", "--role", "physician", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        token.trim().split('.').count(),
        3,
        "a JWT has three parts: {token}"
    );
    let help = chartlog().args(["token", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    assert!(help.contains("development only"), "{help}");
}
