//! `/metadata`: the CapabilityStatement, built from the same tables the handlers use, so it
//! lists what works and nothing more.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::AppState;
use crate::fhir::{definitions, search};

/// Resource types served: every R4 type except those never stored.
fn served_types() -> impl Iterator<Item = &'static str> {
    definitions::resource_types()
        .iter()
        .map(String::as_str)
        .filter(|name| !["OperationOutcome", "Parameters"].contains(name))
}

fn search_type_code(param_type: search::SearchParamType) -> &'static str {
    match param_type {
        search::SearchParamType::String => "string",
        search::SearchParamType::Token => "token",
        search::SearchParamType::Date => "date",
        search::SearchParamType::Reference => "reference",
        search::SearchParamType::Uri => "uri",
    }
}

fn resource_entry(resource_type: &str) -> Value {
    let interactions: Vec<Value> = [
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ]
    .iter()
    .map(|code| json!({"code": code}))
    .collect();
    let mut params: Vec<Value> = search::search_parameters(resource_type)
        .map(|param| json!({"name": param.name(), "type": search_type_code(param.param_type())}))
        .collect();
    params.push(
        json!({"name": "_count", "type": "number", "documentation": "page size, at most 1000"}),
    );
    params.push(json!({"name": "_offset", "type": "number", "documentation": "entries to skip, for paging"}));
    let mut entry = json!({
        "type": resource_type,
        "interaction": interactions,
        "versioning": "versioned-update",
        "readHistory": true,
        "updateCreate": true,
        "conditionalCreate": true,
        "conditionalRead": "not-supported",
        "conditionalUpdate": false,
        "conditionalDelete": "not-supported",
        "referencePolicy": ["literal", "enforced", "local"],
        "searchParam": params,
    });
    if resource_type == "Patient" {
        entry["operation"] = json!([
            {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}
        ]);
    }
    entry
}

/// `GET /metadata` and `GET /fhir/metadata`.
pub async fn metadata(State(state): State<AppState>) -> Response {
    let resources: Vec<Value> = served_types().map(resource_entry).collect();
    let statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-04",
        "kind": "instance",
        "software": {"name": "Chartlog", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Chartlog clinical record store", "url": &*state.base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Every read of health data is recorded as an access event before the response is sent. Literal references to local resources must resolve (referencePolicy enforced); absolute URLs to other servers are stored as given. Deletes keep every earlier version in history. Transaction Bundles are applied all or nothing; batch Bundles are not supported.",
            "security": {
                "cors": false,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "OAuth"}]}],
                "description": "Bearer JWTs (EdDSA, ES256, RS256) from configured issuers; roles in the token map to permissions per resource type."
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}],
        }],
    });
    let mut response = (StatusCode::OK, statement.to_string()).into_response();
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    response
}
