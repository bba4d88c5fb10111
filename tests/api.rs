//! End-to-end tests of the FHIR API on the embedded log: writes, reads, versions, history,
//! search, transactions, validation, authentication and audited reads.

mod common;

use axum::http::{Method, StatusCode};
use common::{patient, weight, TestNode};
use serde_json::{json, Value};

#[tokio::test]
async fn create_read_vread_round_trip() {
    let node = TestNode::start().await;
    let reply = node
        .post(
            "/fhir/Patient",
            &patient("Ngata", "Aroha", "1984-03-02").to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let id = reply.json["id"].as_str().unwrap().to_owned();
    assert_eq!(reply.header("etag"), Some("W/\"1\""));
    let location = reply.header("location").unwrap();
    assert!(
        location.ends_with(&format!("/Patient/{id}/_history/1")),
        "location {location}"
    );
    assert_eq!(reply.json["meta"]["versionId"], "1");
    assert!(reply.json["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    let read = node.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.json, reply.json, "read returns the stored version");
    let vread = node.get(&format!("/fhir/Patient/{id}/_history/1")).await;
    assert_eq!(vread.status, StatusCode::OK);
    assert_eq!(vread.json["name"][0]["family"], "Ngata");
}

#[tokio::test]
async fn decimals_and_element_order_round_trip() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Okafor", "Chidi", "1970-01-01")).await;
    // NOTE: exponent forms such as 1e2 come back as 1e+2: the same decimal, another spelling.
    for value in [
        "1.0",
        "1.00",
        "72.50",
        "0.000100",
        "-0.0",
        "12345678901234567890.123456789",
    ] {
        let observation = weight(&patient_id, value, "2024-05-01T10:00:00Z");
        let reply = node
            .post("/fhir/Observation", &observation.to_string())
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
        let needle = format!("\"value\":{value},");
        assert!(
            reply.text.contains(&needle),
            "decimal {value} changed: {}",
            reply.text
        );
        let id = reply.json["id"].as_str().unwrap();
        let read = node.get(&format!("/fhir/Observation/{id}")).await;
        assert!(
            read.text.contains(&needle),
            "decimal {value} changed on read: {}",
            read.text
        );
        let keys: Vec<&String> = read.json.as_object().unwrap().keys().collect();
        assert_eq!(keys[0], "resourceType", "element order kept");
        assert_eq!(keys[1], "status", "element order kept: {keys:?}");
    }
}

#[tokio::test]
async fn update_with_stale_if_match_writes_nothing() {
    let node = TestNode::start().await;
    let id = node.create(&patient("Ruiz", "Marta", "1990-07-07")).await;
    let mut changed = patient("Ruiz", "Marta", "1990-07-08");
    changed["id"] = json!(id);
    let uri = format!("/fhir/Patient/{id}");

    let first = node
        .put(&uri, &changed.to_string(), &[("if-match", "W/\"1\"")])
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.header("etag"), Some("W/\"2\""));

    let before = node.log_end();
    let stale = node
        .put(&uri, &changed.to_string(), &[("if-match", "W/\"1\"")])
        .await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.text
    );
    assert_eq!(stale.json["resourceType"], "OperationOutcome");
    assert_eq!(node.log_end(), before, "a stale update appended to the log");
    let read = node.get(&uri).await;
    assert_eq!(read.json["meta"]["versionId"], "2");
}

#[tokio::test]
async fn delete_answers_gone_and_keeps_history() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Lind", "Erik", "1955-12-24")).await;
    let id = node
        .create(&weight(&patient_id, "80.1", "2024-01-01T08:00:00Z"))
        .await;
    let uri = format!("/fhir/Observation/{id}");
    let deleted = node.delete(&uri).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);

    assert_eq!(node.get(&uri).await.status, StatusCode::GONE);
    assert_eq!(
        node.get(&format!("{uri}/_history/2")).await.status,
        StatusCode::GONE
    );
    assert_eq!(
        node.get(&format!("{uri}/_history/1")).await.status,
        StatusCode::OK
    );

    let history = node.get(&format!("{uri}/_history")).await;
    assert_eq!(history.status, StatusCode::OK);
    let entries = history.json["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["request"]["method"], "DELETE", "newest first");
    assert!(entries[0].get("resource").is_none());
    assert_eq!(entries[1]["request"]["method"], "POST");
}

#[tokio::test]
async fn histories_filter_by_since() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Okafor", "Ada", "1988-08-08")).await;
    let first = node
        .create(&weight(&patient_id, "70.0", "2024-03-01T08:00:00Z"))
        .await;
    let second = node
        .create(&weight(&patient_id, "71.0", "2024-03-02T08:00:00Z"))
        .await;
    let read = node.get(&format!("/fhir/Observation/{second}")).await;
    let since = read.json["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_owned();
    let ids = |bundle: &Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["resource"]["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let types = node
        .get(&format!("/fhir/Observation/_history?_since={since}"))
        .await;
    assert_eq!(types.status, StatusCode::OK, "{}", types.text);
    assert_eq!(ids(&types.json), vec![second.clone()]);
    let instance = node
        .get(&format!(
            "/fhir/Observation/{second}/_history?_since={since}"
        ))
        .await;
    assert_eq!(ids(&instance.json), vec![second.clone()]);
    let older = node
        .get(&format!(
            "/fhir/Observation/{first}/_history?_since={since}"
        ))
        .await;
    assert_eq!(older.status, StatusCode::OK, "{}", older.text);
    assert!(ids(&older.json).is_empty(), "{}", older.text);

    for query in [
        "_since=2024-03-01",
        "_since=2024-03-01T08:00:00",
        "_at=2024-03-01T08:00:00Z",
        "_sinse=2024-03-01T08:00:00Z",
        "_since=2024-03-01T08:00:00Z&_since=2024-03-02T08:00:00Z",
    ] {
        let reply = node
            .get(&format!("/fhir/Observation/_history?{query}"))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{query}: {}",
            reply.text
        );
        assert_eq!(reply.json["resourceType"], "OperationOutcome");
    }
}

#[tokio::test]
async fn histories_page_with_next_links() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Sato", "Yui", "2001-02-03")).await;
    for index in 0..5 {
        node.create(&weight(
            &patient_id,
            &format!("{}.5", 60 + index),
            "2024-02-01T09:00:00Z",
        ))
        .await;
    }
    let page = node.get("/fhir/Observation/_history?_count=2").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.json["entry"].as_array().unwrap().len(), 2);
    let next = page.json["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|link| link["relation"] == "next")
        .unwrap();
    let next_url = next["url"].as_str().unwrap().replace(common::BASE, "/fhir");
    let second = node.get(&next_url).await;
    assert_eq!(second.json["entry"].as_array().unwrap().len(), 2);
    assert_ne!(
        second.json["entry"][0]["fullUrl"],
        page.json["entry"][0]["fullUrl"]
    );

    let chart = node
        .get(&format!("/fhir/Patient/{patient_id}/$history?_count=100"))
        .await;
    assert_eq!(chart.status, StatusCode::OK, "{}", chart.text);
    assert_eq!(
        chart.json["entry"].as_array().unwrap().len(),
        6,
        "patient and five observations"
    );
}

#[tokio::test]
async fn search_by_name_is_accent_insensitive() {
    let node = TestNode::start().await;
    node.create(&patient("Marché", "Bénédicte", "1974-12-25"))
        .await;
    node.create(&patient("Other", "Person", "1960-01-01")).await;
    let reply = node.get("/fhir/Patient?name=bene").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["total"], 1);
    let by_date = node
        .get("/fhir/Patient?birthdate=ge1970&birthdate=lt1975")
        .await;
    assert_eq!(by_date.json["total"], 1);
    let by_identifier = node
        .get("/fhir/Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|MRN-Other-Person")
        .await;
    assert_eq!(by_identifier.json["total"], 1);
}

#[tokio::test]
async fn search_by_patient_code_and_date() {
    let node = TestNode::start().await;
    let first = node.create(&patient("A", "One", "1980-01-01")).await;
    let second = node.create(&patient("B", "Two", "1980-01-01")).await;
    node.create(&weight(&first, "70.0", "2024-03-01T10:00:00+02:00"))
        .await;
    node.create(&weight(&first, "71.0", "2023-03-01T10:00:00Z"))
        .await;
    node.create(&weight(&second, "90.0", "2024-03-01T10:00:00Z"))
        .await;

    let reply = node
        .get(&format!(
            "/fhir/Observation?patient={first}&code=http://loinc.org|29463-7&date=ge2024-01-01"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["total"], 1);
    let compartment = node
        .get(&format!("/fhir/Patient/{second}/Observation"))
        .await;
    assert_eq!(compartment.json["total"], 1);
}

#[tokio::test]
async fn unknown_search_parameters_ignored_or_rejected() {
    let node = TestNode::start().await;
    node.create(&patient("A", "One", "1980-01-01")).await;

    // Without a preference the search runs as if the parameter were absent, and reports it.
    let reply = node
        .get("/fhir/Patient?birthdate=1980-01-01&shoe-size=44")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["total"], 1);
    let links = reply.json["link"].as_array().unwrap();
    let own = links
        .iter()
        .find(|link| link["relation"] == "self")
        .unwrap()["url"]
        .as_str()
        .unwrap();
    assert!(own.contains("birthdate=1980-01-01"), "{own}");
    assert!(!own.contains("shoe-size"), "{own}");
    let outcome = reply.json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["search"]["mode"] == "outcome")
        .expect("no outcome entry names the ignored parameter");
    assert!(
        outcome["resource"]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("shoe-size"),
        "{outcome}"
    );

    // Under handling=strict the search is rejected.
    let token = node.physician();
    let strict = node
        .call(
            Method::GET,
            "/fhir/Patient?birthdate=1980-01-01&shoe-size=44",
            Some(&token),
            None,
            &[("prefer", "handling=strict")],
        )
        .await;
    assert_eq!(strict.status, StatusCode::BAD_REQUEST, "{}", strict.text);
    assert_eq!(strict.json["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn invalid_resources_are_rejected_without_writing() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Valid", "Base", "1999-09-09")).await;
    let cases: Vec<(&str, String, StatusCode, Option<&str>)> = vec![
        (
            "malformed JSON",
            "{\"resourceType\": \"Patient\",".into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "wrong resourceType",
            json!({"resourceType": "Observation", "status": "final"}).to_string(),
            StatusCode::BAD_REQUEST,
            Some("resourceType"),
        ),
        (
            "unknown element",
            json!({"resourceType": "Patient", "unknownElement": 1}).to_string(),
            StatusCode::BAD_REQUEST,
            Some("Patient.unknownElement"),
        ),
        (
            "bad date",
            json!({"resourceType": "Patient", "birthDate": "not a date"}).to_string(),
            StatusCode::BAD_REQUEST,
            Some("Patient.birthDate"),
        ),
        (
            "wrong datatype",
            json!({"resourceType": "Patient", "active": "yes"}).to_string(),
            StatusCode::BAD_REQUEST,
            Some("Patient.active"),
        ),
        (
            "empty array",
            json!({"resourceType": "Patient", "name": []}).to_string(),
            StatusCode::BAD_REQUEST,
            Some("Patient.name"),
        ),
        (
            "bad code",
            json!({"resourceType": "Patient", "gender": "unknown-gender"}).to_string(),
            StatusCode::BAD_REQUEST,
            Some("Patient.gender"),
        ),
        (
            "repeated key",
            r#"{"resourceType": "Patient", "gender": "male", "gender": "female"}"#.to_owned(),
            StatusCode::BAD_REQUEST,
            None,
        ),
    ];
    for (case, body, status, expression) in cases {
        let before = node.log_end();
        let reply = node.post("/fhir/Patient", &body).await;
        assert_eq!(reply.status, status, "{case}: {}", reply.text);
        assert_eq!(reply.json["resourceType"], "OperationOutcome", "{case}");
        if let Some(expression) = expression {
            let named = reply
                .outcome_expressions()
                .iter()
                .any(|found| found.contains(expression));
            assert!(
                named,
                "{case}: outcome does not name {expression}: {}",
                reply.text
            );
        }
        assert_eq!(
            node.log_end(),
            before,
            "{case}: the log grew after a rejected request"
        );
    }

    let missing_status = json!({"resourceType": "Observation", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient_id}")}});
    let before = node.log_end();
    let reply = node
        .post("/fhir/Observation", &missing_status.to_string())
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert!(
        reply
            .outcome_expressions()
            .iter()
            .any(|found| found.contains("Observation.status")),
        "{}",
        reply.text
    );
    assert_eq!(node.log_end(), before);

    let dangling = weight("no-such-patient", "1.0", "2024-01-01");
    let before = node.log_end();
    let reply = node.post("/fhir/Observation", &dangling.to_string()).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text
    );
    assert_eq!(
        node.log_end(),
        before,
        "a dangling reference wrote to the log"
    );
}

#[tokio::test]
async fn missing_and_bad_tokens_get_401() {
    let node = TestNode::start().await;
    let reply = node
        .call(Method::GET, "/fhir/Patient", None, None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
    let garbage = node
        .call(Method::GET, "/fhir/Patient", Some("not-a-jwt"), None, &[])
        .await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED);
    let expired = node
        .issuer
        .mint_with_times("dr-x", &["physician"], -600, -120)
        .unwrap();
    let reply = node
        .call(Method::GET, "/fhir/Patient", Some(&expired), None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn roles_without_permission_get_403() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Perm", "Check", "1985-05-05")).await;
    let observation = node
        .create(&weight(&patient_id, "55.0", "2024-01-01"))
        .await;
    let billing = node.token("billing-1", "billing");
    let reply = node
        .call(
            Method::GET,
            &format!("/fhir/Observation/{observation}"),
            Some(&billing),
            None,
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);
    let allowed = node
        .call(
            Method::GET,
            &format!("/fhir/Patient/{patient_id}"),
            Some(&billing),
            None,
            &[],
        )
        .await;
    assert_eq!(allowed.status, StatusCode::OK);
    let compliance = node.token("privacy-1", "compliance-officer");
    let before = node.log_end();
    let body = patient("No", "Write", "2000-01-01").to_string();
    let reply = node
        .call(
            Method::POST,
            "/fhir/Patient",
            Some(&compliance),
            Some(&body),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(node.log_end(), before);
}

#[tokio::test]
async fn every_read_appends_an_access_event() {
    let node = TestNode::start().await;
    let id = node.create(&patient("Audit", "Me", "1970-10-10")).await;
    let reads = [
        format!("/fhir/Patient/{id}"),
        format!("/fhir/Patient/{id}/_history/1"),
        format!("/fhir/Patient/{id}/_history"),
        "/fhir/Patient?name=audit".to_owned(),
        format!("/fhir/Patient/{id}/$everything"),
    ];
    for uri in reads {
        let before = node.log_end();
        let reply = node.get(&uri).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}: {}", reply.text);
        assert_eq!(
            node.log_end(),
            before + 1,
            "{uri} did not append exactly one access event"
        );
    }
}

/// Polls /health until the access journal is empty, or fails after ten seconds.
async fn wait_for_empty_journal(node: &TestNode) {
    for _ in 0..100 {
        let health = node.call(Method::GET, "/health", None, None, &[]).await;
        if health.json["access_journal"]["pending"] == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the access journal did not drain");
}

/// Creates a patient, makes the log fail and reads the patient. Returns the patient id and the
/// log's end before the read.
async fn read_while_log_fails(node: &TestNode, family: &str) -> (String, u64) {
    let id = node.create(&patient(family, "Log", "1970-10-10")).await;
    node.log
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let before = node.log_end();
    let reply = node.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["name"][0]["family"], family);
    (id, before)
}

#[tokio::test]
async fn reads_are_journaled_while_log_fails() {
    let node = TestNode::start().await;
    let (id, before) = read_while_log_fails(&node, "Down").await;
    assert_eq!(node.log_end(), before, "the failing log took an event");
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json["status"], "degraded", "{}", health.text);
    assert_eq!(
        health.json["access_journal"]["pending"], 1,
        "{}",
        health.text
    );
    let metrics = node.call(Method::GET, "/metrics", None, None, &[]).await;
    assert!(
        metrics.text.contains("chartlog_access_journal_pending 1\n"),
        "{}",
        metrics.text
    );

    let write = node
        .post(
            "/fhir/Patient",
            &patient("New", "One", "1999-01-01").to_string(),
        )
        .await;
    assert_eq!(write.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(write.header("retry-after").is_some());
    assert!(
        !write.text.contains("New"),
        "health data leaked in the error: {}",
        write.text
    );

    node.log
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for_empty_journal(&node).await;
    assert_eq!(
        node.log_end(),
        before + 1,
        "the journaled access was not recorded once"
    );

    // The trail shows when the data left, before the event could be recorded.
    let trail = node.access_log(&id).await;
    assert_eq!(trail.status, StatusCode::OK, "{}", trail.text);
    assert_eq!(TestNode::served_during_outage(&trail), 1, "{}", trail.text);
    let journaled = trail.json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| &entry["resource"])
        .find(|event| event["period"]["start"] != event["recorded"])
        .unwrap();
    assert_eq!(journaled["subtype"][0]["code"], "read");
    let served = journaled["period"]["start"].as_str().unwrap();
    let recorded = journaled["recorded"].as_str().unwrap();
    assert!(served < recorded, "served {served}, recorded {recorded}");
}

#[tokio::test]
async fn journaled_access_survives_restart_once() {
    let node = TestNode::start().await;
    let (_, before) = read_while_log_fails(&node, "Kept").await;
    let (dir, kafka) = node.stop().await;

    let node = TestNode::start_in(dir, kafka).await;
    wait_for_empty_journal(&node).await;
    assert_eq!(node.log_end(), before + 1);
    let (dir, kafka) = node.stop().await;

    let node = TestNode::start_in(dir, kafka).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(node.log_end(), before + 1, "the access was recorded twice");
}

#[tokio::test]
async fn unreadable_journal_entry_is_quarantined() {
    let node = TestNode::start().await;
    let readable_id = node.create(&patient("Kept", "Entry", "1970-02-02")).await;
    let (altered_id, _) = read_while_log_fails(&node, "Altered").await;
    let reply = node.get(&format!("/fhir/Patient/{readable_id}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let (dir, kafka) = node.stop().await;

    // Flip the last byte of the oldest entry, the altered patient's access: its ciphertext no
    // longer authenticates.
    {
        let path = dir.path().join("access-journal");
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, ["quarantine"]).unwrap();
        let key = 0u64.to_be_bytes();
        let mut value = db.get(key).unwrap().expect("the first access is journaled");
        *value.last_mut().unwrap() ^= 0x01;
        db.put(key, value).unwrap();
    }

    let node = TestNode::start_in(dir, kafka).await;
    wait_for_empty_journal(&node).await;
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(
        health.json["access_journal"]["quarantined"], 1,
        "{}",
        health.text
    );
    assert_eq!(health.json["status"], "ok", "{}", health.text);
    let metrics = node.call(Method::GET, "/metrics", None, None, &[]).await;
    assert!(
        metrics
            .text
            .contains("chartlog_access_journal_quarantined 1\n"),
        "{}",
        metrics.text
    );
    let trail = node.access_log(&readable_id).await;
    assert_eq!(TestNode::served_during_outage(&trail), 1, "{}", trail.text);
    let trail = node.access_log(&altered_id).await;
    assert_eq!(TestNode::served_during_outage(&trail), 0, "{}", trail.text);

    // The quarantined entry stays aside, and is not submitted, after a restart.
    let (dir, kafka) = node.stop().await;
    let node = TestNode::start_in(dir, kafka).await;
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(
        health.json["access_journal"]["quarantined"], 1,
        "{}",
        health.text
    );
    assert_eq!(
        health.json["access_journal"]["pending"], 0,
        "{}",
        health.text
    );
}

fn transaction_bundle(patient_url: &str, fail_last: bool) -> Value {
    let mut entries = vec![
        json!({"fullUrl": patient_url, "resource": patient("Tx", "Person", "1988-08-08"), "request": {"method": "POST", "url": "Patient"}}),
        json!({"fullUrl": "urn:uuid:0b4d8f6e-1c1e-4a8e-9a55-111111111111", "resource": {
            "resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": patient_url}}, "request": {"method": "POST", "url": "Encounter"}}),
        json!({"fullUrl": "urn:uuid:0b4d8f6e-1c1e-4a8e-9a55-222222222222", "resource": {
            "resourceType": "Observation", "status": "final", "code": {"text": "weight"},
            "subject": {"reference": patient_url},
            "encounter": {"reference": "urn:uuid:0b4d8f6e-1c1e-4a8e-9a55-111111111111"},
            "valueQuantity": {"value": 1.50, "unit": "kg"}}, "request": {"method": "POST", "url": "Observation"}}),
    ];
    if fail_last {
        entries.push(json!({"resource": {"resourceType": "Condition", "subject": {"reference": "Patient/does-not-exist"}}, "request": {"method": "POST", "url": "Condition"}}));
    }
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

#[tokio::test]
async fn transaction_resolves_urn_references() {
    let node = TestNode::start().await;
    let bundle = transaction_bundle("urn:uuid:0b4d8f6e-1c1e-4a8e-9a55-000000000000", false);
    let reply = node.post("/fhir", &bundle.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["type"], "transaction-response");
    let entries = reply.json["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entries
        .iter()
        .all(|entry| entry["response"]["status"] == "201 Created"));
    let location = entries[2]["response"]["location"].as_str().unwrap();
    let observation = node
        .get(&format!(
            "/fhir/{}",
            location.split("/_history").next().unwrap()
        ))
        .await;
    let subject = observation.json["subject"]["reference"].as_str().unwrap();
    assert!(
        subject.starts_with("Patient/"),
        "urn reference was not rewritten: {subject}"
    );
    assert!(
        observation.text.contains("\"value\":1.5,"),
        "{}",
        observation.text
    );
    let patient_id = subject.trim_start_matches("Patient/");
    let everything = node
        .get(&format!("/fhir/Patient/{patient_id}/$everything"))
        .await;
    assert_eq!(everything.json["total"], 3);
}

#[tokio::test]
async fn failed_transaction_leaves_no_trace() {
    let node = TestNode::start().await;
    let before = node.log_end();
    let bundle = transaction_bundle("urn:uuid:0b4d8f6e-1c1e-4a8e-9a55-000000000000", true);
    let reply = node.post("/fhir", &bundle.to_string()).await;
    assert!(reply.status.is_client_error(), "{}", reply.text);
    assert_eq!(reply.json["resourceType"], "OperationOutcome");
    assert_eq!(
        node.log_end(),
        before,
        "a failed transaction wrote to the log"
    );
    let patients = node.get("/fhir/Patient?name=Tx").await;
    assert_eq!(patients.json["total"], 0);
}

#[tokio::test]
async fn transaction_delete_is_rolled_back_on_failure() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Keep", "Me", "1960-06-06")).await;
    let observation = node
        .create(&weight(&patient_id, "60.0", "2024-01-01"))
        .await;
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": format!("Observation/{observation}")}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/missing"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]});
    let before = node.log_end();
    let reply = node.post("/fhir", &bundle.to_string()).await;
    assert!(reply.status.is_client_error(), "{}", reply.text);
    assert_eq!(node.log_end(), before);
    assert_eq!(
        node.get(&format!("/fhir/Observation/{observation}"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn conditional_create_and_references() {
    let node = TestNode::start().await;
    let practitioner = json!({"resourceType": "Practitioner", "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999999999"}], "name": [{"family": "House"}]});
    let first = node
        .call(
            Method::POST,
            "/fhir/Practitioner",
            Some(&node.physician()),
            Some(&practitioner.to_string()),
            &[(
                "if-none-exist",
                "identifier=http://hl7.org/fhir/sid/us-npi|9999999999",
            )],
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let before = node.log_end();
    let second = node
        .call(
            Method::POST,
            "/fhir/Practitioner",
            Some(&node.physician()),
            Some(&practitioner.to_string()),
            &[(
                "if-none-exist",
                "identifier=http://hl7.org/fhir/sid/us-npi|9999999999",
            )],
        )
        .await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    assert_eq!(second.json["id"], first.json["id"]);
    assert_eq!(
        node.log_end(),
        before + 1,
        "only the access event of the conditional read"
    );

    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:6a1f3d0c-0000-4000-8000-000000000001", "resource": patient("Cond", "Ref", "1977-07-07"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "urn:uuid:6a1f3d0c-0000-4000-8000-000000000001"},
            "participant": [{"individual": {"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999999999"}}]},
         "request": {"method": "POST", "url": "Encounter"}},
        {"resource": practitioner, "request": {"method": "POST", "url": "Practitioner", "ifNoneExist": "identifier=http://hl7.org/fhir/sid/us-npi|9999999999"}},
    ]});
    let reply = node.post("/fhir", &bundle.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(
        reply.json["entry"][2]["response"]["status"], "200 OK",
        "ifNoneExist found the practitioner"
    );
    let encounter_location = reply.json["entry"][1]["response"]["location"]
        .as_str()
        .unwrap();
    let encounter = node
        .get(&format!(
            "/fhir/{}",
            encounter_location.split("/_history").next().unwrap()
        ))
        .await;
    let expected = format!("Practitioner/{}", first.json["id"].as_str().unwrap());
    assert_eq!(
        encounter.json["participant"][0]["individual"]["reference"],
        expected.as_str()
    );
}

#[tokio::test]
async fn metadata_lists_supported_interactions() {
    let node = TestNode::start().await;
    let reply = node
        .call(Method::GET, "/fhir/metadata", None, None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["resourceType"], "CapabilityStatement");
    assert_eq!(reply.json["fhirVersion"], "4.0.1");
    let resources = reply.json["rest"][0]["resource"].as_array().unwrap();
    let observation = resources
        .iter()
        .find(|resource| resource["type"] == "Observation")
        .unwrap();
    let params: Vec<&str> = observation["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|param| param["name"].as_str().unwrap())
        .collect();
    for name in ["code", "date", "category", "patient"] {
        assert!(
            params.contains(&name),
            "Observation search parameter {name} missing: {params:?}"
        );
    }
    assert!(
        resources
            .iter()
            .all(|resource| resource["type"] != "OperationOutcome"),
        "OperationOutcome is not stored"
    );
}

#[tokio::test]
async fn repeated_command_id_applies_once() {
    let node = TestNode::start().await;
    let body = patient("Once", "Only", "1966-06-06").to_string();
    let headers = [("x-command-id", "5b0c8a7e-9c1f-4e0a-8f7e-3a2b1c0d9e8f")];
    let first = node
        .call(
            Method::POST,
            "/fhir/Patient",
            Some(&node.physician()),
            Some(&body),
            &headers,
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let before = node.log_end();
    let second = node
        .call(
            Method::POST,
            "/fhir/Patient",
            Some(&node.physician()),
            Some(&body),
            &headers,
        )
        .await;
    assert_eq!(node.log_end(), before, "a repeated command appended again");
    assert_eq!(second.json["id"], first.json["id"]);
}

#[tokio::test]
async fn command_id_keeps_its_request_after_restart() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Keep", "Request", "1971-01-01")).await;
    let headers = [("x-command-id", "6d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6")];
    let body = weight(&patient_id, "62.0", "2024-02-01").to_string();
    let first = node
        .call(
            Method::POST,
            "/fhir/Observation",
            Some(&node.physician()),
            Some(&body),
            &headers,
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let (dir, kafka) = node.stop().await;
    let node = TestNode::start_in(dir, kafka).await;

    let before = node.log_end();
    let other_body = weight(&patient_id, "63.0", "2024-02-02").to_string();
    let changed = node
        .call(
            Method::POST,
            "/fhir/Observation",
            Some(&node.physician()),
            Some(&other_body),
            &headers,
        )
        .await;
    assert_eq!(changed.status, StatusCode::CONFLICT, "{}", changed.text);
    let repeated = node
        .call(
            Method::POST,
            "/fhir/Observation",
            Some(&node.physician()),
            Some(&body),
            &headers,
        )
        .await;
    assert_eq!(repeated.status, StatusCode::CREATED, "{}", repeated.text);
    assert_eq!(repeated.json["id"], first.json["id"]);
    assert_eq!(
        node.log_end(),
        before,
        "a repeated or refused command appended"
    );
}

#[tokio::test]
async fn restart_keeps_versions_and_chains() {
    let node = TestNode::start().await;
    let id = node.create(&patient("Restart", "Me", "1950-05-05")).await;
    let (dir, kafka) = node.stop().await;
    let node = TestNode::start_in(dir, kafka).await;
    let mut changed = patient("Restart", "Me", "1950-05-06");
    changed["id"] = json!(id);
    let stale = node
        .put(
            &format!("/fhir/Patient/{id}"),
            &changed.to_string(),
            &[("if-match", "W/\"2\"")],
        )
        .await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "If-Match survives a restart"
    );
    let fresh = node
        .put(
            &format!("/fhir/Patient/{id}"),
            &changed.to_string(),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.text);
}

#[tokio::test]
async fn concurrent_writes_share_syncs() {
    let node = std::sync::Arc::new(TestNode::start().await);
    let patient_id = node.create(&patient("Group", "Commit", "1980-01-01")).await;
    let appends_before = node.log.appends.load(std::sync::atomic::Ordering::SeqCst);
    let mut tasks = Vec::new();
    for index in 0..200 {
        let node = node.clone();
        let patient_id = patient_id.clone();
        tasks.push(tokio::spawn(async move {
            let observation = weight(&patient_id, &format!("{index}.0"), "2024-01-01");
            node.post("/fhir/Observation", &observation.to_string())
                .await
                .status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::CREATED);
    }
    let appends = node.log.appends.load(std::sync::atomic::Ordering::SeqCst) - appends_before;
    assert!(
        appends < 200,
        "200 concurrent writes took {appends} synced appends; expected shared syncs"
    );
}

#[tokio::test]
async fn health_reports_projection_position() {
    let node = TestNode::start().await;
    node.create(&patient("Health", "Check", "1980-01-01")).await;
    // On Kafka the write's commit marker takes an offset that the projector passes on its
    // next read, a moment after the write returns, so the lag can show 1 until then.
    let mut reply = node.call(Method::GET, "/health", None, None, &[]).await;
    for _ in 0..50 {
        if reply.json["projections"]["chart"]["lag_events"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        reply = node.call(Method::GET, "/health", None, None, &[]).await;
    }
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["status"], "ok");
    assert_eq!(reply.json["projections"]["chart"]["lag_events"], 0);
    // A single node writes its log, whichever log it is.
    let owner = node
        .call(Method::GET, "/health/owner", None, None, &[])
        .await;
    assert_eq!(owner.status, StatusCode::OK, "{}", owner.text);
    assert_eq!(owner.json["accepting_writes"], true);
}

#[tokio::test]
async fn rebuilt_projection_matches_live_one() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Rebuild", "Me", "1971-01-01")).await;
    let observation = node
        .create(&weight(&patient_id, "70.25", "2024-06-01T12:00:00Z"))
        .await;
    let mut changed = weight(&patient_id, "70.50", "2024-06-01T12:00:00Z");
    changed["id"] = json!(observation);
    let updated = node
        .put(
            &format!("/fhir/Observation/{observation}"),
            &changed.to_string(),
            &[],
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK);
    node.delete(&format!("/fhir/Observation/{observation}"))
        .await;
    node.get(&format!("/fhir/Patient/{patient_id}")).await;

    let rebuilt_dir = tempfile::tempdir().unwrap();
    let rebuilt = chartlog_projections::ChartProjection::open(rebuilt_dir.path()).unwrap();
    rebuilt
        .bind_log(&chartlog::log::log_name(node.kafka.as_ref()))
        .unwrap();
    for partition in 0..node.node.log.partitions() {
        while chartlog::projector::apply_next(
            node.node.log.as_ref(),
            &node.node.keys,
            &rebuilt,
            partition,
        )
        .unwrap()
        .is_some()
        {}
    }
    // The last read appended an access event; let the live projection take it in too.
    let end = node.node.log.end_position().borrow().clone();
    node.node
        .wait_for_projection(&end, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let mut live = node.node.projection.dump().unwrap();
    let mut rebuilt = rebuilt.dump().unwrap();
    if common::on_kafka() {
        // Kafka's transaction markers take offsets, so where a projection stops past the last
        // record depends on when it last read; the state itself must still be identical.
        live.retain(|(key, _)| !key.starts_with(b"!position"));
        rebuilt.retain(|(key, _)| !key.starts_with(b"!position"));
    }
    assert!(!live.is_empty());
    assert_eq!(
        rebuilt.len(),
        live.len(),
        "rebuilt and live projections hold different key counts"
    );
    let first_difference = live
        .iter()
        .zip(&rebuilt)
        .position(|(left, right)| left != right);
    assert_eq!(
        first_difference, None,
        "rebuilt and live projections differ at entry {first_difference:?}"
    );
}

#[tokio::test]
async fn search_across_charts_records_access_per_chart() {
    let node = TestNode::start().await;
    for index in 0..3 {
        let patient_id = node
            .create(&patient("Multi", &format!("Chart{index}"), "1980-01-01"))
            .await;
        node.create(&weight(&patient_id, "50.0", "2024-01-01"))
            .await;
    }
    let before = node.log_end();
    let reply = node
        .get("/fhir/Observation?code=http://loinc.org|29463-7")
        .await;
    assert_eq!(reply.json["total"], 3);
    assert_eq!(
        node.log_end(),
        before + 3,
        "one access event per chart read"
    );
}

#[tokio::test]
async fn command_id_reuse_by_others_is_rejected() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Reuse", "Id", "1970-01-01")).await;
    let headers = [("x-command-id", "0f6c1b7e-2b1a-4c3d-9e8f-7a6b5c4d3e2f")];
    let body = weight(&patient_id, "61.0", "2024-01-01").to_string();
    let first = node
        .call(
            Method::POST,
            "/fhir/Observation",
            Some(&node.physician()),
            Some(&body),
            &headers,
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);

    let front_desk = node.token("desk-1", "front-desk");
    let other_body = patient("Walk", "In", "1990-01-01").to_string();
    let before = node.log_end();
    let stolen = node
        .call(
            Method::POST,
            "/fhir/Patient",
            Some(&front_desk),
            Some(&other_body),
            &headers,
        )
        .await;
    assert_eq!(stolen.status, StatusCode::CONFLICT, "{}", stolen.text);
    assert!(
        !stolen.text.contains("61.0"),
        "another actor's resource leaked: {}",
        stolen.text
    );
    let changed = node
        .call(
            Method::POST,
            "/fhir/Patient",
            Some(&node.physician()),
            Some(&other_body),
            &headers,
        )
        .await;
    assert_eq!(
        changed.status,
        StatusCode::CONFLICT,
        "same actor, different request: {}",
        changed.text
    );
    assert_eq!(node.log_end(), before, "rejected reuse wrote to the log");
}

#[tokio::test]
async fn conditional_reference_needs_read_permission() {
    let node = TestNode::start().await;
    node.create(&patient("Probe", "Target", "1984-07-02")).await;
    let administrator = node.token("admin-1", "administrator");
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Location", "name": "Ward", "managingOrganization": {"reference": "Patient?name=Probe"}},
         "request": {"method": "POST", "url": "Location"}},
    ]});
    let reply = node
        .call(
            Method::POST,
            "/fhir",
            Some(&administrator),
            Some(&bundle.to_string()),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);

    let typo = node
        .call(
            Method::POST,
            "/fhir/Patient",
            Some(&node.physician()),
            Some(&patient("A", "B", "2000-01-01").to_string()),
            &[("if-none-exist", "identifer=x")],
        )
        .await;
    assert_eq!(
        typo.status,
        StatusCode::BAD_REQUEST,
        "an unknown condition parameter must not match everything: {}",
        typo.text
    );
}

#[tokio::test]
async fn oversized_resource_is_rejected_and_writer_survives() {
    let node = TestNode::start().await;
    let mut huge = patient("Big", "Body", "1970-01-01");
    huge["name"][0]["family"] = json!("A".repeat(9 * 1024 * 1024));
    let reply = node.post("/fhir/Patient", &huge.to_string()).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        &reply.text[..reply.text.len().min(300)]
    );
    node.create(&patient("Small", "After", "1970-01-01")).await;
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(health.json["status"], "ok");
}

#[tokio::test]
async fn oversized_log_entry_rejected_alone() {
    let node = TestNode::start().await;
    let mut big = patient("Big", "Entry", "1970-01-01");
    big["name"][0]["family"] = json!("B".repeat(2 * 1024 * 1024));
    let body = big.to_string();
    let small = patient("Small", "Beside", "1970-01-01").to_string();
    // Sent together, so that both can land in one batch of the writer.
    let (big_reply, small_reply) = tokio::join!(
        node.post("/fhir/Patient", &body),
        node.post("/fhir/Patient", &small)
    );
    assert_eq!(
        small_reply.status,
        StatusCode::CREATED,
        "{}",
        small_reply.text
    );
    match node.node.log.max_resource_bytes() {
        // Kafka records are limited to about 1 MB by default.
        Some(limit) => {
            assert!(limit < 2 * 1024 * 1024, "limit {limit}");
            assert_eq!(
                big_reply.status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{}",
                big_reply.text
            );
            assert!(
                big_reply.text.contains(&limit.to_string()),
                "{}",
                big_reply.text
            );
        }
        None => assert_eq!(big_reply.status, StatusCode::CREATED),
    }
}

#[tokio::test]
async fn huge_offsets_and_zero_counts_are_safe() {
    let node = TestNode::start().await;
    let id = node.create(&patient("Page", "Edge", "1970-01-01")).await;
    for uri in [
        format!("/fhir/Patient/{id}/_history?_offset=18446744073709551615"),
        "/fhir/Patient?_offset=18446744073709551615".to_owned(),
        format!("/fhir/Patient/{id}/$everything?_offset=18446744073709551615"),
    ] {
        let reply = node.get(&uri).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}: {}", reply.text);
    }
    let zero = node.get("/fhir/Patient?_count=0").await;
    let has_next = zero.json["link"]
        .as_array()
        .unwrap()
        .iter()
        .any(|link| link["relation"] == "next");
    assert!(
        !has_next,
        "_count=0 must not offer a next page that repeats itself"
    );
}

#[tokio::test]
async fn transaction_entries_are_checked_like_requests() {
    let node = TestNode::start().await;
    let cases = [
        (
            "bad id",
            json!([{"resource": {"resourceType": "Patient", "id": "bad id"}, "request": {"method": "PUT", "url": "Patient/bad id"}}]),
        ),
        (
            "id mismatch",
            json!([{"resource": {"resourceType": "Patient", "id": "one"}, "request": {"method": "PUT", "url": "Patient/two"}}]),
        ),
        (
            "same target twice",
            json!([
            {"resource": {"resourceType": "Patient", "id": "dup"}, "request": {"method": "PUT", "url": "Patient/dup"}},
            {"resource": {"resourceType": "Patient", "id": "dup"}, "request": {"method": "PUT", "url": "Patient/dup"}}]),
        ),
        (
            "same fullUrl twice",
            json!([
            {"fullUrl": "urn:uuid:9a8b7c6d-0000-4000-8000-000000000001", "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:9a8b7c6d-0000-4000-8000-000000000001", "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}]),
        ),
    ];
    for (case, entries) in cases {
        let before = node.log_end();
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let reply = node.post("/fhir", &bundle.to_string()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{case}: {}",
            reply.text
        );
        assert_eq!(node.log_end(), before, "{case}: the log grew");
    }
}

#[tokio::test]
async fn start_refuses_a_log_that_lost_entries() {
    if common::on_kafka() {
        // The check edits the embedded log's files; Kafka keeps no such files here.
        return;
    }
    let node = TestNode::start().await;
    node.create(&patient("Lost", "Tail", "1970-01-01")).await;
    node.create(&patient("Lost", "Tail2", "1970-01-01")).await;
    let end = node.log_end();
    let (dir, _) = node.stop().await;

    // Remove the last entries and their heads, as a torn or truncated write-ahead log would.
    {
        let db = rocksdb::DB::open_cf(
            &rocksdb::Options::default(),
            dir.path().join("log"),
            ["default", "heads"],
        )
        .unwrap();
        db.delete((end - 1).to_be_bytes()).unwrap();
        db.delete((end - 2).to_be_bytes()).unwrap();
        let heads = db.cf_handle("heads").unwrap();
        let keys: Vec<Box<[u8]>> = db
            .iterator_cf(heads, rocksdb::IteratorMode::Start)
            .map(|item| item.unwrap().0)
            .collect();
        for key in keys {
            db.delete_cf(heads, key).unwrap();
        }
    }
    let config = chartlog::node::NodeConfig {
        data_dir: dir.path().to_path_buf(),
        kek_file: None,
        kafka: None,
        url: None,
    };
    let error = chartlog::node::Node::open(&config)
        .await
        .err()
        .expect("a node opened on a log that lost entries");
    assert!(
        format!("{error:#}").contains("entries were lost from the log"),
        "{error:#}"
    );

    std::fs::remove_dir_all(dir.path().join("log")).unwrap();
    let error = chartlog::node::Node::open(&config)
        .await
        .err()
        .expect("a node opened without its log");
    assert!(format!("{error:#}").contains("log at"), "{error:#}");
    assert!(format!("{error:#}").contains("is missing"), "{error:#}");
}

#[tokio::test]
async fn compliance_officer_reads_the_access_log() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Trail", "Audit", "1970-01-01")).await;
    let nurse = node.token("nurse-7", "nurse");
    let read = node
        .call(
            Method::GET,
            &format!("/fhir/Patient/{patient_id}"),
            Some(&nurse),
            None,
            &[],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);

    let uri = format!("/fhir/Patient/{patient_id}/$access-log");
    let physician_try = node.get(&uri).await;
    assert_eq!(
        physician_try.status,
        StatusCode::FORBIDDEN,
        "the audit trail needs the audit permission"
    );

    let officer = node.token("privacy-1", "compliance-officer");
    let before = node.log_end();
    let reply = node
        .call(Method::GET, &uri, Some(&officer), None, &[])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let events = reply.json["entry"].as_array().unwrap();
    let nurse_read = events
        .iter()
        .find(|entry| entry["resource"]["agent"][0]["who"]["identifier"]["value"] == "nurse-7");
    let nurse_read = nurse_read.expect("the nurse's read is in the trail");
    assert_eq!(nurse_read["resource"]["subtype"][0]["code"], "read");
    assert_eq!(
        nurse_read["resource"]["purposeOfEvent"][0]["coding"][0]["code"],
        "TREAT"
    );
    let entity = nurse_read["resource"]["entity"][0]["what"]["reference"]
        .as_str()
        .unwrap();
    assert_eq!(entity, format!("Patient/{patient_id}/_history/1"));
    assert_eq!(
        node.log_end(),
        before + 1,
        "reading the trail is itself recorded"
    );

    let officer_read = node
        .call(
            Method::GET,
            &format!("/fhir/Patient/{patient_id}"),
            Some(&officer),
            None,
            &[],
        )
        .await;
    assert_eq!(
        officer_read.status,
        StatusCode::FORBIDDEN,
        "the audit role reads no clinical content"
    );
}

#[tokio::test]
async fn access_log_pages_never_repeat() {
    let node = TestNode::start().await;
    let patient_id = node.create(&patient("Page", "Trail", "1971-01-01")).await;
    for _ in 0..5 {
        let read = node.get(&format!("/fhir/Patient/{patient_id}")).await;
        assert_eq!(read.status, StatusCode::OK);
    }
    let officer = node.token("privacy-2", "compliance-officer");
    let mut uri = format!("/fhir/Patient/{patient_id}/$access-log?_count=2");
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let reply = node
            .call(Method::GET, &uri, Some(&officer), None, &[])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        pages += 1;
        for entry in reply.json["entry"].as_array().unwrap() {
            ids.push(entry["resource"]["id"].as_str().unwrap().to_owned());
        }
        let next = reply.json["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|link| link["relation"] == "next")
            .map(|link| link["url"].as_str().unwrap().replace(common::BASE, "/fhir"));
        match next {
            Some(next) => uri = next,
            None => break,
        }
    }
    assert_eq!(pages, 3, "five reads at two per page");
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(
        ids.len(),
        5,
        "each read once, the officer's own reads not among them: {ids:?}"
    );
    assert_eq!(distinct.len(), 5, "no entry repeated across pages: {ids:?}");

    let bad = node
        .call(
            Method::GET,
            &format!("/fhir/Patient/{patient_id}/$access-log?_before-position=soon"),
            Some(&officer),
            None,
            &[],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text);
}

#[tokio::test]
async fn metrics_report_projection_lag() {
    let node = TestNode::start().await;
    node.create(&patient("Metric", "Check", "1980-01-01")).await;
    let reply = node.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let lag_line = reply
        .text
        .lines()
        .find(|line| line.starts_with("chartlog_projection_lag_positions{"));
    assert_eq!(
        lag_line,
        Some("chartlog_projection_lag_positions{projection=\"chart\"} 0"),
        "{}",
        reply.text
    );
    assert!(
        reply.text.contains("chartlog_log_accepting_writes 1"),
        "{}",
        reply.text
    );
    // The patient create is one append carrying the chart's opening and the Patient.
    assert!(
        reply.text.contains("chartlog_log_appends_total 1\n"),
        "{}",
        reply.text
    );
    assert!(
        reply
            .text
            .contains("chartlog_log_appended_events_total 2\n"),
        "{}",
        reply.text
    );
}

#[tokio::test]
async fn oversized_body_gets_an_operation_outcome() {
    let node = TestNode::start().await;
    let body = format!(
        "{{\"resourceType\":\"Patient\",\"text\":\"{}\"}}",
        "x".repeat(65 * 1024 * 1024)
    );
    let reply = node.post("/fhir/Patient", &body).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        reply.json["resourceType"],
        "OperationOutcome",
        "{}",
        &reply.text[..reply.text.len().min(200)]
    );
}

#[tokio::test]
async fn contained_resources_follow_the_role_table() {
    let node = TestNode::start().await;
    let patient_id = node
        .create(&patient("Contained", "Check", "1980-01-01"))
        .await;
    let encounter = json!({
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "contained": [{"resourceType": "Condition", "id": "c1", "code": {"text": "sensitive finding"},
                       "subject": {"reference": format!("Patient/{patient_id}")}}],
        "reasonReference": [{"reference": "#c1"}],
    });
    let front_desk = node.token("desk-2", "front-desk");
    let denied = node
        .call(
            Method::POST,
            "/fhir/Encounter",
            Some(&front_desk),
            Some(&encounter.to_string()),
            &[],
        )
        .await;
    assert_eq!(
        denied.status,
        StatusCode::FORBIDDEN,
        "a role may not create a Condition inside an Encounter: {}",
        denied.text
    );

    let id = node.create(&encounter).await;
    let billing = node.token("billing-2", "billing");
    let read = node
        .call(
            Method::GET,
            &format!("/fhir/Encounter/{id}"),
            Some(&billing),
            None,
            &[],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert!(
        !read.text.contains("sensitive finding"),
        "billing saw a contained Condition: {}",
        read.text
    );
    assert_eq!(read.json["meta"]["security"][0]["code"], "REDACTED");
    let search = node
        .call(
            Method::GET,
            &format!("/fhir/Encounter?patient={patient_id}"),
            Some(&billing),
            None,
            &[],
        )
        .await;
    assert!(
        !search.text.contains("sensitive finding"),
        "billing saw it through search: {}",
        search.text
    );
    let physician_read = node.get(&format!("/fhir/Encounter/{id}")).await;
    assert!(
        physician_read.text.contains("sensitive finding"),
        "the physician sees the whole resource"
    );
}

#[tokio::test]
async fn writes_are_refused_while_the_projector_is_halted() {
    let node = TestNode::start().await;
    node.create(&patient("Before", "Halt", "1970-03-03")).await;
    // An entry no writer sealed stops the projector there.
    let log = node.node.log.clone();
    tokio::task::spawn_blocking(move || {
        log.append_batch(&[chartlog_schemas::Envelope(vec![0u8; 40])])
    })
    .await
    .unwrap()
    .unwrap();
    let mut status = node.node.projector.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        status.wait_for(|status| status.halted.is_some()),
    )
    .await
    .expect("the projector did not halt")
    .unwrap();
    let end = node.node.log.end_position().borrow().clone();

    let reply = node
        .post(
            "/fhir/Patient",
            &patient("After", "Halt", "1970-03-03").to_string(),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text
    );
    assert!(
        reply.text.contains("stopped at a log entry"),
        "{}",
        reply.text
    );
    assert_eq!(
        *node.node.log.end_position().borrow(),
        end,
        "a refused write was appended"
    );
    let health = node.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(
        health.json["log"]["accepting_writes"], false,
        "{}",
        health.text
    );
    let anonymous = node
        .call(
            Method::POST,
            "/fhir/Patient",
            None,
            Some(&patient("No", "Token", "1970-03-03").to_string()),
            &[],
        )
        .await;
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "a missing token is named before the halt: {}",
        anonymous.text
    );
    let metrics = node.call(Method::GET, "/metrics", None, None, &[]).await;
    assert!(
        metrics.text.contains("chartlog_log_accepting_writes 0\n"),
        "/metrics agrees with /health: {}",
        metrics.text
    );
}
