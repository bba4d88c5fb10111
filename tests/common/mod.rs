//! Test harness: a node on a temporary data directory with the real embedded log, the router
//! built by `chartlog::api::app`, tokens from the development issuer, and a log wrapper that
//! counts appends and can be made to fail.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use chartlog::api::{self, AppState};
use chartlog::auth::dev_issuer::{self, DevIssuer};
use chartlog::auth::{Authenticator, IssuerConfig};
use chartlog::log::{AppendError, EventLog, LogPosition, ReadError};
use chartlog::node::{Node, NodeConfig};
use chartlog_schemas::Envelope;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::watch;
use tower::ServiceExt;

/// Returns the checkout under test. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test; the
/// value compiled in names where the binary was built, which differs when a shared target
/// directory serves several checkouts.
pub fn checkout() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    )
}

/// Sends the nodes' log lines to the test's output, which the harness prints when a test
/// fails. `CHARTLOG_TEST_TRACE` takes a filter in `CHARTLOG_LOG`'s syntax; the default keeps
/// warnings and Chartlog's own lines.
pub fn trace_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHARTLOG_TEST_TRACE")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,chartlog=info"));
    // A second node in the same test finds the subscriber already set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_thread_names(true)
        .try_init();
}

/// Returns the Kafka log settings when the tests run against Kafka (`CHARTLOG_TEST_LOG=kafka`),
/// each node on a topic of its own, or `None` for the embedded log.
pub fn test_kafka_config() -> Option<chartlog::log::KafkaConfig> {
    if std::env::var("CHARTLOG_TEST_LOG").ok()? != "kafka" {
        return None;
    }
    let bootstrap = std::env::var("CHARTLOG_TEST_KAFKA_BOOTSTRAP")
        .unwrap_or_else(|_| "127.0.0.1:19092".to_owned());
    Some(chartlog::log::KafkaConfig {
        bootstrap_servers: bootstrap,
        topic: format!("chartlog-test-{}", uuid::Uuid::new_v4()),
        partitions: test_partitions(),
        replication_factor: 1,
        min_insync_replicas: 1,
        properties: test_kafka_properties(),
    })
}

/// Client properties of the test nodes: librdkafka's `debug` contexts from
/// `CHARTLOG_TEST_KAFKA_DEBUG` (such as `broker,fetch,cgrp`), or none.
fn test_kafka_properties() -> std::collections::HashMap<String, String> {
    std::env::var("CHARTLOG_TEST_KAFKA_DEBUG")
        .ok()
        .map(|contexts| ("debug".to_owned(), contexts))
        .into_iter()
        .collect()
}

/// Partitions of the topics the tests create: `CHARTLOG_TEST_KAFKA_PARTITIONS`, or 1.
pub fn test_partitions() -> u32 {
    std::env::var("CHARTLOG_TEST_KAFKA_PARTITIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1)
}

/// Returns whether the tests run against Kafka.
pub fn on_kafka() -> bool {
    std::env::var("CHARTLOG_TEST_LOG").is_ok_and(|value| value == "kafka")
}

/// Base URL the test router pretends to be served at.
pub const BASE: &str = "http://chartlog.test/fhir";

/// A log wrapper that counts append calls and fails them while `failing` is set.
pub struct ControlledLog {
    inner: Arc<dyn EventLog>,
    pub failing: AtomicBool,
    pub appends: AtomicUsize,
}

impl EventLog for ControlledLog {
    fn append_batch(&self, envelopes: &[Envelope]) -> Result<Vec<LogPosition>, AppendError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(AppendError::Unavailable("test switched the log off".into()));
        }
        self.inner.append_batch(envelopes)
    }

    fn read_from(
        &self,
        from: LogPosition,
        max: usize,
    ) -> Result<Vec<(LogPosition, Envelope)>, ReadError> {
        self.inner.read_from(from, max)
    }

    fn partitions(&self) -> u32 {
        self.inner.partitions()
    }

    fn separate_reader(&self) -> Result<Option<Box<dyn EventLog>>, ReadError> {
        self.inner.separate_reader()
    }

    fn end_position(&self) -> watch::Receiver<chartlog::log::Frontier> {
        self.inner.end_position()
    }

    fn end_age(&self) -> Option<Duration> {
        self.inner.end_age()
    }

    fn refresh_end(&self) {
        self.inner.refresh_end()
    }

    fn readers_replaced(&self) -> u64 {
        self.inner.readers_replaced()
    }

    fn is_dense(&self) -> bool {
        self.inner.is_dense()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn resume_position(&self, from: LogPosition) -> Result<LogPosition, ReadError> {
        self.inner.resume_position(from)
    }

    fn recorded_heads(&self) -> Result<Option<Vec<chartlog::log::RecordedHead>>, ReadError> {
        self.inner.recorded_heads()
    }

    fn max_resource_bytes(&self) -> Option<usize> {
        self.inner.max_resource_bytes()
    }

    fn begin_ownership(&self) -> Result<(), AppendError> {
        self.inner.begin_ownership()
    }

    fn record_heads(&self, heads: &[chartlog::log::RecordedHead]) -> Result<(), AppendError> {
        self.inner.record_heads(heads)
    }

    fn complete_ownership(&self) {
        self.inner.complete_ownership()
    }

    fn release_ownership(&self) {
        self.inner.release_ownership()
    }

    fn is_owner(&self) -> bool {
        self.inner.is_owner()
    }
}

/// A running node and its router.
// Fields drop in order: the router's writer handles go first, then the node closes its
// databases, and only then is the data directory removed.
pub struct TestNode {
    pub app: Router,
    pub node: Node,
    pub log: Arc<ControlledLog>,
    pub issuer: DevIssuer,
    pub kafka: Option<chartlog::log::KafkaConfig>,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    pub async fn start() -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, test_kafka_config()).await
    }

    /// Starts a node on an existing data directory and, on Kafka, an existing topic.
    pub async fn start_in(
        dir: tempfile::TempDir,
        kafka: Option<chartlog::log::KafkaConfig>,
    ) -> TestNode {
        Self::start_at(dir, kafka, BASE).await
    }

    /// Starts a node like [`TestNode::start_in`] whose base URL is `url`.
    pub async fn start_at(
        dir: tempfile::TempDir,
        kafka: Option<chartlog::log::KafkaConfig>,
        url: &str,
    ) -> TestNode {
        trace_to_test_output();
        let config = NodeConfig {
            data_dir: dir.path().to_path_buf(),
            kek_file: None,
            kafka: kafka.clone(),
            url: Some(url.to_owned()),
        };
        let mut controlled = None;
        let node = Node::open_with(&config, |inner| {
            let log = Arc::new(ControlledLog {
                inner,
                failing: AtomicBool::new(false),
                appends: AtomicUsize::new(0),
            });
            controlled = Some(log.clone());
            log
        })
        .await
        .unwrap();
        let key_dir = config.key_paths().dir;
        let issuer = DevIssuer::open_or_create(&key_dir).unwrap();
        let jwks = key_dir.join("test-jwks.json");
        std::fs::write(&jwks, issuer.jwks_json()).unwrap();
        let authenticator = Authenticator::from_config(&[IssuerConfig {
            issuer: dev_issuer::ISSUER.into(),
            audience: dev_issuer::AUDIENCE.into(),
            jwks_file: Some(jwks),
            jwks_url: None,
        }])
        .unwrap();
        let state = AppState::new(&node, Arc::new(authenticator), url);
        TestNode {
            app: api::app(state),
            node,
            log: controlled.unwrap(),
            issuer,
            kafka,
            dir,
        }
    }

    /// Stops the node and returns its data directory and Kafka settings, to reopen it.
    pub async fn stop(self) -> (tempfile::TempDir, Option<chartlog::log::KafkaConfig>) {
        let TestNode {
            app,
            node,
            log,
            issuer,
            kafka,
            dir,
        } = self;
        drop(app);
        drop(log);
        drop(issuer);
        node.shutdown().await;
        (dir, kafka)
    }

    pub fn token(&self, subject: &str, role: &str) -> String {
        self.issuer
            .mint(subject, &[role], Duration::from_secs(600))
            .unwrap()
    }

    pub fn physician(&self) -> String {
        self.token("dr-test", "physician")
    }

    /// Number of entries on the log, counted by reading it: on Kafka, transaction markers
    /// take offsets too, so the end position is not a count.
    pub fn log_end(&self) -> u64 {
        let mut count = 0;
        for partition in 0..self.node.log.partitions() {
            let mut from = chartlog::log::LogPosition::new(partition, 0);
            loop {
                let entries = self.node.log.read_from(from, 4096).unwrap();
                let Some((last, _)) = entries.last() else {
                    break;
                };
                count += entries.len() as u64;
                from = last.next();
            }
        }
        count
    }

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/fhir+json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(body.map_or_else(Body::empty, |text| Body::from(text.to_owned())))
            .unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            text,
            json,
        }
    }

    /// Reads a patient's access log as a compliance officer.
    pub async fn access_log(&self, patient_id: &str) -> Reply {
        let officer = self.token("privacy-1", "compliance-officer");
        let uri = format!("/fhir/Patient/{patient_id}/$access-log");
        self.call(Method::GET, &uri, Some(&officer), None, &[])
            .await
    }

    /// Returns how many AuditEvents of an access log record a read served while the log was
    /// unreachable: those whose period differs from the moment they were recorded.
    pub fn served_during_outage(trail: &Reply) -> usize {
        trail.json["entry"].as_array().map_or(0, |entries| {
            entries
                .iter()
                .filter(|entry| {
                    entry["resource"]["period"]["start"] != entry["resource"]["recorded"]
                })
                .count()
        })
    }

    pub async fn get(&self, uri: &str) -> Reply {
        let token = self.physician();
        self.call(Method::GET, uri, Some(&token), None, &[]).await
    }

    pub async fn post(&self, uri: &str, body: &str) -> Reply {
        let token = self.physician();
        self.call(Method::POST, uri, Some(&token), Some(body), &[])
            .await
    }

    pub async fn put(&self, uri: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let token = self.physician();
        self.call(Method::PUT, uri, Some(&token), Some(body), headers)
            .await
    }

    pub async fn delete(&self, uri: &str) -> Reply {
        let token = self.physician();
        self.call(Method::DELETE, uri, Some(&token), None, &[])
            .await
    }

    /// Creates a resource and returns its server-assigned id.
    pub async fn create(&self, resource: &Value) -> String {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let reply = self
            .post(&format!("/fhir/{resource_type}"), &resource.to_string())
            .await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "create {resource_type}: {}",
            reply.text
        );
        reply.json["id"].as_str().unwrap().to_owned()
    }
}

/// A response, with the body parsed when it is JSON.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Returns the expressions an OperationOutcome names.
    pub fn outcome_expressions(&self) -> Vec<String> {
        self.json["issue"]
            .as_array()
            .map(|issues| {
                issues
                    .iter()
                    .flat_map(|issue| issue["expression"].as_array().cloned().unwrap_or_default())
                    .filter_map(|expression| expression.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub fn get_method() -> Method {
    Method::GET
}

/// Builds a synthetic patient.
pub fn patient(family: &str, given: &str, birth_date: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": format!("MRN-{family}-{given}")}],
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": birth_date,
    })
}

/// Builds a synthetic body-weight observation for a patient.
pub fn weight(patient_id: &str, kilograms: &str, effective: &str) -> Value {
    let text = format!(
        r#"{{"resourceType":"Observation","status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"29463-7","display":"Body Weight"}}]}},"subject":{{"reference":"Patient/{patient_id}"}},"effectiveDateTime":"{effective}","valueQuantity":{{"value":{kilograms},"unit":"kg","system":"http://unitsofmeasure.org","code":"kg"}}}}"#
    );
    serde_json::from_str(&text).unwrap()
}
