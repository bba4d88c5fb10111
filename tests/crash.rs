//! Kill -9 of a running `chartlog serve` during a stream of writes, on the embedded log or on
//! Kafka (`CHARTLOG_TEST_LOG=kafka`): after a restart every acknowledged write is there exactly
//! once and `chartlog-replay verify` passes. Also SIGTERM, which stops the server cleanly.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sends one HTTP/1.1 request and returns the status and body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing; build the workspace first",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    data: PathBuf,
    kafka: Option<chartlog::log::KafkaConfig>,
}

impl Setup {
    fn command(&self, binary_name: &str) -> Command {
        let mut command = Command::new(binary(binary_name));
        command.env_remove("CHARTLOG_LOG_BACKEND");
        if let Some(kafka) = &self.kafka {
            command
                .env("CHARTLOG_LOG_BACKEND", "kafka")
                .env("CHARTLOG_KAFKA_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
                .env("CHARTLOG_KAFKA_TOPIC", &kafka.topic)
                .env("CHARTLOG_KAFKA_PARTITIONS", kafka.partitions.to_string());
        }
        command
    }

    fn serve(&self, port: u16) -> Child {
        let mut child = self
            .command("chartlog")
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while http(port, "GET", "/health", "", "")
            .map(|(status, _)| status)
            .ok()
            != Some(200)
        {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("server exited before it was ready: {status}");
            }
            assert!(Instant::now() < deadline, "server did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        child
    }

    fn token(&self) -> String {
        let output = self
            .command("chartlog")
            .args([
                "token",
                "--sub",
                "crash-test",
                "--role",
                "physician",
                "--data",
            ])
            .arg(&self.data)
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    fn verify(&self) -> (bool, String) {
        let mut command = self.command("chartlog-replay");
        command.args(["verify", "--data"]).arg(&self.data);
        if self.kafka.is_some() {
            command.args(["--log-backend", "kafka"]);
        }
        let output = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }
}

fn patient_body(family: &str) -> String {
    format!(
        r#"{{"resourceType":"Patient","name":[{{"family":"{family}"}}],"birthDate":"1970-01-01"}}"#
    )
}

#[test]
fn kill_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        data: dir.path().join("data"),
        kafka: common::test_kafka_config(),
    };
    let port = free_port();
    let mut server = setup.serve(port);
    let token = setup.token();

    // Eight clients write until the server dies under them.
    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut clients = Vec::new();
    for client in 0..8 {
        let (token, acknowledged) = (token.clone(), acknowledged.clone());
        clients.push(std::thread::spawn(move || {
            for index in 0..2_000 {
                let family = format!("Crash{client}n{index}");
                match http(
                    port,
                    "POST",
                    "/fhir/Patient",
                    &token,
                    &patient_body(&family),
                ) {
                    Ok((201, body)) => {
                        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
                        let id = value["id"].as_str().unwrap().to_owned();
                        acknowledged.lock().unwrap().push((family, id));
                    }
                    Ok(_) | Err(_) => return,
                }
            }
        }));
    }
    // Kill once writes are flowing, however long the first ones took on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill().unwrap();
    server.wait().unwrap();
    for client in clients {
        client.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 10,
        "too few writes before the kill: {}",
        acknowledged.len()
    );

    let mut server = setup.serve(port);
    for (_, id) in &acknowledged {
        let (status, _) = http(port, "GET", &format!("/fhir/Patient/{id}"), &token, "").unwrap();
        assert_eq!(
            status, 200,
            "acknowledged Patient/{id} is missing after the restart"
        );
    }
    // Every stored Patient, page by page, counted by family name.
    let mut counts = std::collections::HashMap::new();
    let mut offset = 0;
    loop {
        let path = format!("/fhir/Patient?_count=1000&_offset={offset}");
        let (status, body) = http(port, "GET", &path, &token, "").unwrap();
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let entries = page["entry"].as_array().cloned().unwrap_or_default();
        for entry in &entries {
            let family = entry["resource"]["name"][0]["family"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *counts.entry(family).or_insert(0) += 1;
        }
        if entries.len() < 1000 {
            break;
        }
        offset += 1000;
    }
    for (family, _) in &acknowledged {
        assert_eq!(
            counts.get(family),
            Some(&1),
            "{family} is not there exactly once"
        );
    }
    server.kill().unwrap();
    server.wait().unwrap();

    let (verified, output) = setup.verify();
    assert!(
        verified,
        "the log does not verify after the crash: {output}"
    );
    drop_dir(dir.path());
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        data: dir.path().to_path_buf(),
        kafka: common::test_kafka_config(),
    };
    let port = free_port();
    let mut server = setup.serve(port);
    let token = setup.token();
    let (status, body) =
        http(port, "POST", "/fhir/Patient", &token, &patient_body("Term")).unwrap();
    assert_eq!(status, 201, "{body}");

    let terminated = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "the server exited with {status} after SIGTERM"
    );
    let (verified, output) = setup.verify();
    assert!(verified, "{output}");
    drop_dir(dir.path());
}

fn drop_dir(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
}
