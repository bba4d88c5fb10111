//! Real public FHIR data through the HTTP API: the official R4 examples, invalid files from the
//! HL7 validator's test suite, Synthea patient bundles and bulk NDJSON. The files are read from
//! the shared corpus folder beside the repository (or `CHARTLOG_CORPUS`); none is copied into
//! the repository.

mod common;

use std::path::PathBuf;

use axum::http::StatusCode;
use common::TestNode;
use serde_json::{json, Value};

fn corpus_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("CHARTLOG_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::checkout().join("../shared/corpus"));
    if dir.is_dir() {
        return Some(dir);
    }
    // CI always has the corpus beside the clone; only a developer machine may lack it.
    assert!(
        std::env::var_os("CI").is_none(),
        "corpus folder {} is missing",
        dir.display()
    );
    eprintln!(
        "corpus folder {} not found; corpus tests skipped",
        dir.display()
    );
    None
}

fn files(dir: &std::path::Path, extension: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == extension))
        .collect();
    found.sort();
    found
}

/// Drops the server-owned parts of meta, so a stored resource compares with what was sent.
fn without_server_meta(mut value: Value) -> Value {
    if let Some(meta) = value.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            value.as_object_mut().unwrap().remove("meta");
        }
    }
    value
}

/// A minimal valid resource to stand in for a resource an example refers to but the corpus
/// does not hold.
fn stub(resource_type: &str, id: &str) -> Value {
    let patient = json!({"reference": "Patient/example"});
    let mut value = match resource_type {
        "Encounter" => {
            json!({"status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}, "subject": patient})
        }
        "Procedure" => json!({"status": "completed", "subject": patient}),
        "Coverage" => {
            json!({"status": "active", "beneficiary": patient, "payor": [{"reference": "Organization/f001"}]})
        }
        "DetectedIssue" => json!({"status": "final"}),
        "ServiceRequest" => json!({"status": "active", "intent": "order", "subject": patient}),
        "RelatedPerson" => json!({"patient": patient}),
        "Group" => json!({"type": "person", "actual": true}),
        "Specimen" => json!({"subject": patient}),
        "CarePlan" => json!({"status": "active", "intent": "plan", "subject": patient}),
        "DocumentReference" => {
            json!({"status": "current", "content": [{"attachment": {"contentType": "text/plain"}}]})
        }
        _ => json!({}),
    };
    value["resourceType"] = json!(resource_type);
    value["id"] = json!(id);
    value
}

/// Returns the `Type/id` a 422 answer names as missing.
fn missing_reference(reply: &common::Reply) -> Option<(String, String)> {
    let text = reply.json["issue"][0]["diagnostics"].as_str()?;
    let target = text.split("points to ").nth(1)?.split(',').next()?;
    let (resource_type, id) = target.split_once('/')?;
    Some((resource_type.to_owned(), id.to_owned()))
}

/// PUTs a resource under its own id, first creating stubs for references it needs.
async fn put_with_stubs(node: &TestNode, resource: &Value) -> common::Reply {
    let resource_type = resource["resourceType"].as_str().unwrap();
    let id = resource["id"].as_str().unwrap();
    let uri = format!("/fhir/{resource_type}/{id}");
    for _ in 0..20 {
        let reply = node.put(&uri, &resource.to_string(), &[]).await;
        if reply.status != StatusCode::UNPROCESSABLE_ENTITY {
            return reply;
        }
        let Some((missing_type, missing_id)) = missing_reference(&reply) else {
            return reply;
        };
        let stub = stub(&missing_type, &missing_id);
        let stubbed = Box::pin(put_with_stubs(node, &stub)).await;
        assert!(
            stubbed.status.is_success(),
            "stub {missing_type}/{missing_id}: {}",
            stubbed.text
        );
    }
    panic!("{uri}: too many missing references");
}

#[tokio::test]
async fn official_examples_import_and_read_back() {
    let Some(corpus) = corpus_dir() else { return };
    let node = TestNode::start().await;
    let mut failures = Vec::new();
    for path in files(&corpus.join("fhir-examples"), "json") {
        let original: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let reply = put_with_stubs(&node, &original).await;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !reply.status.is_success() {
            failures.push(format!("{name}: {} {}", reply.status, reply.text));
            continue;
        }
        let uri = format!(
            "/fhir/{}/{}",
            original["resourceType"].as_str().unwrap(),
            original["id"].as_str().unwrap()
        );
        let read = node.get(&uri).await;
        assert_eq!(read.status, StatusCode::OK, "{name}: {}", read.text);
        if without_server_meta(read.json.clone()) != without_server_meta(original.clone()) {
            failures.push(format!("{name}: read back differs from what was sent"));
        }
    }
    assert!(
        failures.is_empty(),
        "examples that did not import whole:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn invalid_files_are_rejected_without_writing() {
    let Some(corpus) = corpus_dir() else { return };
    let node = TestNode::start().await;
    for path in files(&corpus.join("fhir-invalid"), "json") {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let resource_type = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|value| value["resourceType"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "Bundle".to_owned());
        let before = node.log_end();
        let reply = node.post(&format!("/fhir/{resource_type}"), &text).await;
        assert!(
            reply.status == StatusCode::BAD_REQUEST
                || reply.status == StatusCode::UNPROCESSABLE_ENTITY,
            "{name} was not rejected: {} {}",
            reply.status,
            reply.text
        );
        assert_eq!(reply.json["resourceType"], "OperationOutcome", "{name}");
        assert_eq!(node.log_end(), before, "{name}: the log grew");
    }
}

#[tokio::test]
async fn synthea_bundles_import_whole() {
    let Some(corpus) = corpus_dir() else { return };
    let node = TestNode::start().await;
    for path in files(&corpus.join("synthea"), "json") {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let bundle: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let reply = node.post("/fhir", &bundle.to_string()).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {}", reply.text);

        // Map each fullUrl to where the server put it, then compare every resource.
        let sent = bundle["entry"].as_array().unwrap();
        let answered = reply.json["entry"].as_array().unwrap();
        assert_eq!(
            sent.len(),
            answered.len(),
            "{name}: one response entry per entry"
        );
        let mut locations = std::collections::HashMap::new();
        for (entry, response) in sent.iter().zip(answered) {
            let location = response["response"]["location"].as_str().unwrap();
            let target = location.split("/_history").next().unwrap().to_owned();
            locations.insert(entry["fullUrl"].as_str().unwrap().to_owned(), target);
        }
        let mut patient_id = None;
        for (entry, target) in sent.iter().zip(answered).map(|(entry, response)| {
            (
                entry,
                response["response"]["location"]
                    .as_str()
                    .unwrap()
                    .split("/_history")
                    .next()
                    .unwrap()
                    .to_owned(),
            )
        }) {
            let mut expected = entry["resource"].clone();
            chartlog::fhir::compartment::for_each_reference_mut(&mut expected, |_, reference| {
                if let Some(mapped) = locations.get(reference.as_str()) {
                    *reference = mapped.clone();
                }
            });
            expected["id"] = json!(target.split('/').nth(1).unwrap());
            if target.starts_with("Patient/") {
                patient_id = Some(target.trim_start_matches("Patient/").to_owned());
            }
            let read = node.get(&format!("/fhir/{target}")).await;
            assert_eq!(read.status, StatusCode::OK, "{name} {target}");
            assert!(
                without_server_meta(read.json.clone()) == without_server_meta(expected),
                "{name}: {target} reads back different from what was sent"
            );
        }
        let patient_id = patient_id.expect("a Synthea bundle holds a Patient");
        let everything = node
            .get(&format!("/fhir/Patient/{patient_id}/$everything"))
            .await;
        let in_chart = sent
            .iter()
            .filter(|entry| {
                !["Organization", "Practitioner"]
                    .contains(&entry["resource"]["resourceType"].as_str().unwrap())
            })
            .count();
        assert_eq!(
            everything.json["total"], in_chart,
            "{name}: the chart holds every clinical resource"
        );
    }
}

#[tokio::test]
async fn bulk_ndjson_imports_by_id() {
    let Some(corpus) = corpus_dir() else { return };
    let node = TestNode::start().await;
    let dir = corpus.join("synthea").join("bulk-ndjson");
    let mut paths = files(&dir, "ndjson");
    // Patients first: the other files refer to them.
    paths.sort_by_key(|path| {
        !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("Patient")
    });
    for path in paths {
        for (line_number, line) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let resource: Value = serde_json::from_str(line).unwrap();
            let reply = put_with_stubs(&node, &resource).await;
            assert!(
                reply.status.is_success(),
                "{} line {}: {}",
                path.display(),
                line_number + 1,
                reply.text
            );
            let uri = format!(
                "/fhir/{}/{}",
                resource["resourceType"].as_str().unwrap(),
                resource["id"].as_str().unwrap()
            );
            let read = node.get(&uri).await;
            assert!(
                without_server_meta(read.json.clone()) == without_server_meta(resource.clone()),
                "{} line {} reads back different",
                path.display(),
                line_number + 1
            );
        }
    }
}
