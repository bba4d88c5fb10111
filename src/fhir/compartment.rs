//! Patient compartment membership and reference discovery for FHIR R4 resources.
//! The compartment table joins R4's CompartmentDefinition `patient` with its search parameters
//! (`schemas/fhir-r4/compartment-patient.json`). The reference walk follows the structure tables
//! of [`super::definitions`], so it finds every `Reference.reference` and nothing else.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::definitions::{self, TypeDefinition, RESOURCE_TYPE};
use super::validate::{is_valid_id, MAX_DEPTH};

const COMPARTMENT_JSON: &str = include_str!("../../schemas/fhir-r4/compartment-patient.json");

fn compartment_paths() -> &'static HashMap<String, Vec<String>> {
    static PATHS: OnceLock<HashMap<String, Vec<String>>> = OnceLock::new();
    PATHS.get_or_init(|| {
        parse_compartment(COMPARTMENT_JSON)
            .expect("embedded schemas/fhir-r4/compartment-patient.json maps types to path lists")
    })
}

fn parse_compartment(text: &str) -> Option<HashMap<String, Vec<String>>> {
    let document: Value = serde_json::from_str(text).ok()?;
    let mut paths = HashMap::new();
    for (resource_type, list) in document.get("paths")?.as_object()? {
        let list = list
            .as_array()?
            .iter()
            .map(|path| path.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()?;
        paths.insert(resource_type.clone(), list);
    }
    Some(paths)
}

/// Returns the element paths (relative to the resource, such as `subject` or
/// `participant.actor`) whose Patient reference places a resource of this type in that patient's
/// compartment, or `None` when the type is not in the Patient compartment.
///
/// A Patient is the root of its own compartment. Its entry lists `link.other`, which also places
/// it in the compartment of each patient it links to.
///
/// # Panics
///
/// Panics on first use if the embedded table does not parse, which the unit tests rule out.
pub fn patient_compartment_paths(resource_type: &str) -> Option<&'static [String]> {
    compartment_paths().get(resource_type).map(Vec::as_slice)
}

/// Returns the distinct `reference` values, in document order, of the compartment elements of
/// this resource that point at a Patient: relative `Patient/id`, an absolute URL ending in
/// `Patient/id` (a `/_history/n` suffix allowed), or a `urn:uuid:` that the caller resolves.
///
/// Conditional references (`Patient?identifier=...`) are not returned. Rewrite them to literal
/// references first with [`for_each_reference_mut`]. References in contained resources do not
/// count, because compartment membership is decided by the resource's own elements.
///
/// # Panics
///
/// Panics on first use if the embedded tables do not parse, which the unit tests rule out.
pub fn compartment_patient_refs(resource: &Value) -> Vec<String> {
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
        return Vec::new();
    };
    let Some(paths) = patient_compartment_paths(resource_type) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for path in paths {
        let segments: Vec<&str> = path.split('.').collect();
        collect_path_references(resource, &segments, 0, &mut found);
    }
    found
}

fn collect_path_references(
    value: &Value,
    segments: &[&str],
    depth: usize,
    found: &mut Vec<String>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    match value {
        Value::Array(items) => {
            for item in items {
                collect_path_references(item, segments, depth + 1, found);
            }
        }
        Value::Object(object) => match segments.split_first() {
            Some((first, rest)) => {
                if let Some(child) = object.get(*first) {
                    collect_path_references(child, rest, depth + 1, found);
                }
            }
            None => {
                let reference = object.get("reference").and_then(Value::as_str);
                if let Some(reference) = reference.filter(|reference| points_to_patient(reference))
                {
                    if !found.iter().any(|known| known == reference) {
                        found.push(reference.to_owned());
                    }
                }
            }
        },
        _ => {}
    }
}

/// Returns whether a literal reference targets a Patient, or is a `urn:uuid:` whose target only
/// the caller can resolve.
fn points_to_patient(reference: &str) -> bool {
    if reference.starts_with("urn:uuid:") {
        return true;
    }
    if reference.contains('?') || reference.starts_with('#') {
        return false;
    }
    let without_version = match reference.find("/_history/") {
        Some(position) => &reference[..position],
        None => reference,
    };
    let segments: Vec<&str> = without_version.split('/').collect();
    let [.., type_name, id] = segments.as_slice() else {
        return false;
    };
    let is_relative = segments.len() == 2;
    let is_absolute = without_version.contains("://");
    *type_name == "Patient" && is_valid_id(id) && (is_relative || is_absolute)
}

/// Calls `f` with the FHIRPath of each Reference element (`Observation.subject`,
/// `Bundle.entry[0].resource.performer[1]`) and its `reference` string, which `f` may rewrite.
///
/// The walk follows the R4 structure tables through backbone elements, datatypes, extensions
/// (including those on primitive values), contained resources and, in a Bundle or Parameters,
/// the resources inside it. It skips elements the tables do not know, and content nested deeper
/// than [`MAX_DEPTH`], which [`super::validate::validate_resource`] rejects.
///
/// # Panics
///
/// Panics on first use if the embedded tables do not parse, which the unit tests rule out.
pub fn for_each_reference_mut(resource: &mut Value, mut f: impl FnMut(&str, &mut String)) {
    for site in reference_sites(resource) {
        if let Some(Value::String(reference)) = resource.pointer_mut(&site.pointer) {
            f(&site.path, reference);
        }
    }
}

/// Returns the FHIRPath and `reference` string of every Reference element in the resource, in
/// the order [`for_each_reference_mut`] visits them.
///
/// # Panics
///
/// Panics on first use if the embedded tables do not parse, which the unit tests rule out.
pub fn references(resource: &Value) -> Vec<(String, String)> {
    reference_sites(resource)
        .into_iter()
        .filter_map(|site| {
            let reference = resource.pointer(&site.pointer)?.as_str()?.to_owned();
            Some((site.path, reference))
        })
        .collect()
}

// Typed walk

/// Location of one `Reference.reference` string: its FHIRPath for callers and its JSON Pointer
/// (RFC 6901) for reaching it again.
struct ReferenceSite {
    path: String,
    pointer: String,
}

fn reference_sites(resource: &Value) -> Vec<ReferenceSite> {
    let mut sites = Vec::new();
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
        return sites;
    };
    walk_resource(
        resource,
        resource_type.to_owned(),
        String::new(),
        0,
        &mut sites,
    );
    sites
}

fn walk_resource(
    value: &Value,
    path: String,
    pointer: String,
    depth: usize,
    sites: &mut Vec<ReferenceSite>,
) {
    let definition = value
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(definitions::type_definition);
    if let (Some(definition), Value::Object(object)) = (definition, value) {
        walk_object(definition, object, &path, &pointer, depth, sites);
    }
}

fn walk_object(
    definition: &TypeDefinition,
    object: &Map<String, Value>,
    path: &str,
    pointer: &str,
    depth: usize,
    sites: &mut Vec<ReferenceSite>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    for (key, value) in object {
        let key_pointer = format!("{pointer}/{}", escape_pointer_token(key));
        let (json_name, is_primitive_extension) = match key.strip_prefix('_') {
            Some(base) => (base, true),
            None => (key.as_str(), false),
        };
        let Some((element, type_name)) = definition.property(json_name) else {
            continue;
        };
        let element_path = element.child_path(path, type_name);

        if is_primitive_extension {
            // `_name` contains the id and extensions of a primitive value, and extensions can carry
            // references (valueReference).
            if let Some(extension_type) = definitions::type_definition("Extension") {
                let items = match value {
                    Value::Array(items) => items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| (Some(i), item))
                        .collect(),
                    other => vec![(None, other)],
                };
                for (index, item) in items {
                    let (item_path, item_pointer) = indexed(&element_path, &key_pointer, index);
                    if let Value::Object(companion) = item {
                        if let Some(extensions) = companion.get("extension") {
                            walk_extensions(
                                extension_type,
                                extensions,
                                &item_path,
                                &item_pointer,
                                depth + 1,
                                sites,
                            );
                        }
                    }
                }
            }
            continue;
        }

        match value {
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    let (item_path, item_pointer) =
                        indexed(&element_path, &key_pointer, Some(index));
                    walk_value(type_name, item, item_path, item_pointer, depth, sites);
                }
            }
            other => walk_value(type_name, other, element_path, key_pointer, depth, sites),
        }
    }
}

fn walk_extensions(
    extension_type: &TypeDefinition,
    extensions: &Value,
    path: &str,
    pointer: &str,
    depth: usize,
    sites: &mut Vec<ReferenceSite>,
) {
    let Value::Array(items) = extensions else {
        return;
    };
    for (index, item) in items.iter().enumerate() {
        if let Value::Object(extension) = item {
            walk_object(
                extension_type,
                extension,
                &format!("{path}.extension[{index}]"),
                &format!("{pointer}/extension/{index}"),
                depth + 1,
                sites,
            );
        }
    }
}

fn walk_value(
    type_name: &str,
    value: &Value,
    path: String,
    pointer: String,
    depth: usize,
    sites: &mut Vec<ReferenceSite>,
) {
    if type_name == RESOURCE_TYPE {
        walk_resource(value, path, pointer, depth + 1, sites);
        return;
    }
    let Some(definition) = definitions::type_definition(type_name) else {
        return;
    };
    let Value::Object(object) = value else { return };
    if type_name == "Reference" && object.get("reference").is_some_and(Value::is_string) {
        sites.push(ReferenceSite {
            path: path.clone(),
            pointer: format!("{pointer}/reference"),
        });
    }
    walk_object(definition, object, &path, &pointer, depth + 1, sites);
}

fn indexed(path: &str, pointer: &str, index: Option<usize>) -> (String, String) {
    match index {
        Some(index) => (format!("{path}[{index}]"), format!("{pointer}/{index}")),
        None => (path.to_owned(), pointer.to_owned()),
    }
}

/// Escapes a JSON Pointer reference token as RFC 6901 requires (`~` as `~0`, `/` as `~1`).
fn escape_pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn compartment_table_parses() {
        assert!(parse_compartment(COMPARTMENT_JSON).is_some());
    }

    #[test]
    fn compartment_paths_follow_r4() {
        assert_eq!(
            patient_compartment_paths("Observation").unwrap(),
            ["subject", "performer"]
        );
        assert_eq!(patient_compartment_paths("Encounter").unwrap(), ["subject"]);
        assert_eq!(
            patient_compartment_paths("Patient").unwrap(),
            ["link.other"]
        );
        assert_eq!(
            patient_compartment_paths("AuditEvent").unwrap(),
            ["agent.who", "entity.what"]
        );
        assert_eq!(
            patient_compartment_paths("Appointment").unwrap(),
            ["participant.actor"]
        );
    }

    #[test]
    fn types_outside_compartment_have_none() {
        assert!(patient_compartment_paths("Organization").is_none());
        assert!(patient_compartment_paths("Practitioner").is_none());
        // Listed in the compartment definition without parameters, so never a member.
        assert!(patient_compartment_paths("ActivityDefinition").is_none());
        assert!(patient_compartment_paths("NotAType").is_none());
    }

    #[test]
    fn patient_refs_come_from_compartment_paths() {
        let observation = json!({
            "resourceType": "Observation",
            "subject": {"reference": "Patient/p1"},
            "performer": [
                {"reference": "Practitioner/d1"},
                {"reference": "Patient/p2/_history/3"},
                {"reference": "Patient/p1"}
            ],
            "focus": [{"reference": "Patient/p9"}]
        });
        assert_eq!(
            compartment_patient_refs(&observation),
            ["Patient/p1", "Patient/p2/_history/3"]
        );
    }

    #[test]
    fn patient_refs_accept_absolute_and_uuid() {
        let absolute = "https://ehr.example.org/fhir/Patient/p7";
        let encounter = json!({"resourceType": "Encounter", "subject": {"reference": absolute}});
        assert_eq!(compartment_patient_refs(&encounter), [absolute]);
        let uuid = "urn:uuid:6f1c1d2e-0c6b-4a44-9d4f-2b7c3a1e9f00";
        let condition = json!({"resourceType": "Condition", "subject": {"reference": uuid}});
        assert_eq!(compartment_patient_refs(&condition), [uuid]);
    }

    #[test]
    fn patient_refs_skip_other_targets() {
        let encounter = json!({"resourceType": "Encounter", "subject": {"reference": "Group/g1"}});
        assert!(compartment_patient_refs(&encounter).is_empty());
        let search = "Patient?identifier=http://example.org|1";
        let conditional = json!({"resourceType": "Encounter", "subject": {"reference": search}});
        assert!(compartment_patient_refs(&conditional).is_empty());
        let local = json!({"resourceType": "Encounter", "subject": {"reference": "#p1"}});
        assert!(compartment_patient_refs(&local).is_empty());
        let nested_relative =
            json!({"resourceType": "Encounter", "subject": {"reference": "fhir/Patient/p1"}});
        assert!(compartment_patient_refs(&nested_relative).is_empty());
        let organization =
            json!({"resourceType": "Organization", "partOf": {"reference": "Patient/p1"}});
        assert!(compartment_patient_refs(&organization).is_empty());
        assert!(
            compartment_patient_refs(&json!({"subject": {"reference": "Patient/p1"}})).is_empty()
        );
    }

    #[test]
    fn patient_refs_walk_nested_arrays() {
        let appointment = json!({
            "resourceType": "Appointment",
            "participant": [
                {"actor": {"reference": "Practitioner/d1"}},
                {"actor": {"reference": "Patient/p3"}}
            ]
        });
        assert_eq!(compartment_patient_refs(&appointment), ["Patient/p3"]);
        let link = json!({"other": {"reference": "Patient/p4"}, "type": "seealso"});
        let patient = json!({"resourceType": "Patient", "link": [link]});
        assert_eq!(compartment_patient_refs(&patient), ["Patient/p4"]);
    }

    fn sample_bundle() -> Value {
        json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{
                "fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000001",
                "resource": {
                    "resourceType": "Encounter",
                    "status": "finished",
                    "class": {"code": "AMB"},
                    "subject": {"reference": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000002"},
                    "participant": [{"individual": {
                        "reference": "Practitioner?identifier=http://example.org/npi|1",
                        "identifier": {"value": "1", "assigner": {"reference": "Organization/o1"}}
                    }}],
                    "extension": [{
                        "url": "http://example.org/ext",
                        "valueReference": {"reference": "#loc"}
                    }],
                    "_status": {"extension": [{
                        "url": "http://example.org/why",
                        "valueReference": {"reference": "Device/d1"}
                    }]},
                    "contained": [{
                        "resourceType": "Location",
                        "id": "loc",
                        "managingOrganization": {"reference": "Organization/o2"}
                    }],
                    "unknownThing": {"reference": "Patient/ignored"}
                },
                "request": {"method": "POST", "url": "Encounter"}
            }]
        })
    }

    #[test]
    fn references_follow_the_typed_structure() {
        let found = references(&sample_bundle());
        let expected = [
            (
                "Bundle.entry[0].resource.contained[0].managingOrganization",
                "Organization/o2",
            ),
            (
                "Bundle.entry[0].resource.extension[0].value.ofType(Reference)",
                "#loc",
            ),
            (
                "Bundle.entry[0].resource.status.extension[0].value.ofType(Reference)",
                "Device/d1",
            ),
            (
                "Bundle.entry[0].resource.subject",
                "urn:uuid:aaaaaaaa-0000-4000-8000-000000000002",
            ),
            (
                "Bundle.entry[0].resource.participant[0].individual",
                "Practitioner?identifier=http://example.org/npi|1",
            ),
            (
                "Bundle.entry[0].resource.participant[0].individual.identifier.assigner",
                "Organization/o1",
            ),
        ];
        for (path, reference) in expected {
            let is_found = found.iter().any(|(found_path, found_reference)| {
                found_path == path && found_reference == reference
            });
            assert!(is_found, "missing {path} -> {reference} in {found:#?}");
        }
        assert_eq!(found.len(), expected.len(), "{found:#?}");
    }

    #[test]
    fn references_of_single_resource_use_type_root() {
        let observation =
            json!({"resourceType": "Observation", "performer": [{"reference": "Practitioner/d1"}]});
        assert_eq!(
            references(&observation),
            [(
                "Observation.performer[0]".to_owned(),
                "Practitioner/d1".to_owned()
            )]
        );
        assert!(references(&json!({"performer": [{"reference": "Practitioner/d1"}]})).is_empty());
    }

    #[test]
    fn reference_rewrite_changes_values_in_place() {
        let mut bundle = sample_bundle();
        let mut visited = Vec::new();
        for_each_reference_mut(&mut bundle, |path, reference| {
            visited.push(path.to_owned());
            if reference.starts_with("urn:uuid:") {
                *reference = "Patient/p1".to_owned();
            } else if reference.starts_with("Practitioner?") {
                *reference = "Practitioner/d9".to_owned();
            }
        });
        let resource = &bundle["entry"][0]["resource"];
        assert_eq!(resource["subject"]["reference"], "Patient/p1");
        assert_eq!(
            resource["participant"][0]["individual"]["reference"],
            "Practitioner/d9"
        );
        assert_eq!(
            resource["extension"][0]["valueReference"]["reference"],
            "#loc"
        );
        assert_eq!(visited.len(), 6, "{visited:#?}");
    }

    #[test]
    fn reference_walk_survives_deep_input() {
        let leaf = json!({"reference": "Patient/p1"});
        let mut extension = json!({"url": "http://example.org/leaf", "valueReference": leaf});
        for _ in 0..300 {
            extension = json!({"url": "http://example.org/branch", "extension": [extension]});
        }
        let patient = json!({"resourceType": "Patient", "extension": [extension]});
        assert!(references(&patient).is_empty());
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        assert_eq!(escape_pointer_token("a/b~c"), "a~1b~0c");
    }
}
