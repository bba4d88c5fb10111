//! The search parameter table: for each resource type, the FHIR R4 search parameters that this
//! server evaluates, their types and the elements they read.
//!
//! Written by hand from the FHIR R4 (4.0.1) SearchParameter definitions. A choice element such as
//! `effective[x]` is listed once per data type that the definition's expression accepts.

/// FHIR search parameter type, which decides how values are parsed and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchParamType {
    /// Text compared after case and accent folding, or exactly with `:exact`.
    String,
    /// Code, Coding, CodeableConcept, Identifier or boolean, compared as `system|code`.
    Token,
    /// date, dateTime, instant, Period or Timing, compared as time ranges.
    Date,
    /// Reference to another resource, compared by type and id.
    Reference,
    /// URI, compared exactly.
    Uri,
}

/// FHIR data type of an element that a search parameter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ElementType {
    /// Primitive `code`, `id` or `string` searched as a token. `system` is the code system that
    /// the element's required binding implies, where this table records it.
    Code {
        system: Option<&'static str>,
    },
    Boolean,
    Coding,
    CodeableConcept,
    Identifier,
    /// Primitive `string` searched as a string.
    String,
    HumanName,
    /// Primitive `date`, `dateTime` or `instant`.
    Date,
    Period,
    /// Timing, searched through its `event` dateTimes.
    Timing,
    Reference,
    Uri,
    /// The stored version's `meta.lastUpdated`, which the caller passes in rather than reading it
    /// from the resource.
    LastUpdated,
}

/// One element that a search parameter reads: a dotted path below the resource root.
#[derive(Debug, Clone, Copy)]
pub(super) struct Element {
    pub(super) path: &'static str,
    pub(super) element_type: ElementType,
}

/// A FHIR search parameter as this server evaluates it.
#[derive(Debug)]
pub struct SearchParameter {
    name: &'static str,
    param_type: SearchParamType,
    pub(super) elements: &'static [Element],
    /// Resource types a reference parameter may point to. Empty means any type.
    pub(super) targets: &'static [&'static str],
}

impl SearchParameter {
    /// Returns the parameter's code as it appears in a query string, such as `birthdate`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Returns the parameter's FHIR search type.
    pub fn param_type(&self) -> SearchParamType {
        self.param_type
    }

    /// Returns the resource types a reference parameter may point to, empty for any type.
    pub fn target_types(&self) -> &'static [&'static str] {
        self.targets
    }
}

/// Returns the search parameter `name` for `resource_type`, common parameters included.
pub(super) fn find_parameter(resource_type: &str, name: &str) -> Option<&'static SearchParameter> {
    COMMON
        .iter()
        .chain(parameters_of_type(resource_type))
        .find(|parameter| parameter.name == name)
}

/// Lists the search parameters that [`super::parse_query`] accepts for `resource_type`: the
/// parameters common to all resources, then those of the type.
pub fn search_parameters(resource_type: &str) -> impl Iterator<Item = &'static SearchParameter> {
    COMMON.iter().chain(parameters_of_type(resource_type))
}

const fn at(path: &'static str, element_type: ElementType) -> Element {
    Element { path, element_type }
}

const fn parameter(
    name: &'static str,
    param_type: SearchParamType,
    elements: &'static [Element],
    targets: &'static [&'static str],
) -> SearchParameter {
    SearchParameter {
        name,
        param_type,
        elements,
        targets,
    }
}

const fn string(name: &'static str, elements: &'static [Element]) -> SearchParameter {
    parameter(name, SearchParamType::String, elements, &[])
}

const fn token(name: &'static str, elements: &'static [Element]) -> SearchParameter {
    parameter(name, SearchParamType::Token, elements, &[])
}

const fn date(name: &'static str, elements: &'static [Element]) -> SearchParameter {
    parameter(name, SearchParamType::Date, elements, &[])
}

const fn reference(
    name: &'static str,
    elements: &'static [Element],
    targets: &'static [&'static str],
) -> SearchParameter {
    parameter(name, SearchParamType::Reference, elements, targets)
}

/// Returns the type of a `code` element bound to one code system.
const fn code_in(system: &'static str) -> ElementType {
    ElementType::Code {
        system: Some(system),
    }
}

/// A `code` element whose code system this table does not record.
const CODE: ElementType = ElementType::Code { system: None };

const IDENTIFIER: SearchParameter =
    token("identifier", &[at("identifier", ElementType::Identifier)]);

/// `patient` defined as `X.subject.where(resolve() is Patient)`.
const SUBJECT_PATIENT: SearchParameter = reference(
    "patient",
    &[at("subject", ElementType::Reference)],
    &["Patient"],
);

/// `patient` defined as `X.patient`.
const PATIENT_ELEMENT: SearchParameter = reference(
    "patient",
    &[at("patient", ElementType::Reference)],
    &["Patient"],
);

const SUBJECT_PATIENT_OR_GROUP: SearchParameter = reference(
    "subject",
    &[at("subject", ElementType::Reference)],
    &["Patient", "Group"],
);

const ENCOUNTER: SearchParameter = reference(
    "encounter",
    &[at("encounter", ElementType::Reference)],
    &["Encounter"],
);

const NAME: SearchParameter = string("name", &[at("name", ElementType::HumanName)]);

const FAMILY: SearchParameter = string("family", &[at("name.family", ElementType::String)]);

const GIVEN: SearchParameter = string("given", &[at("name.given", ElementType::String)]);

static COMMON: &[SearchParameter] = &[
    token("_id", &[at("id", CODE)]),
    date(
        "_lastUpdated",
        &[at("meta.lastUpdated", ElementType::LastUpdated)],
    ),
    token("_tag", &[at("meta.tag", ElementType::Coding)]),
    token("_security", &[at("meta.security", ElementType::Coding)]),
    parameter(
        "_profile",
        SearchParamType::Uri,
        &[at("meta.profile", ElementType::Uri)],
        &[],
    ),
];

static PATIENT: &[SearchParameter] = &[
    IDENTIFIER,
    NAME,
    FAMILY,
    GIVEN,
    date("birthdate", &[at("birthDate", ElementType::Date)]),
    token(
        "gender",
        &[at(
            "gender",
            code_in("http://hl7.org/fhir/administrative-gender"),
        )],
    ),
    token("active", &[at("active", ElementType::Boolean)]),
    date("death-date", &[at("deceasedDateTime", ElementType::Date)]),
    reference(
        "general-practitioner",
        &[at("generalPractitioner", ElementType::Reference)],
        &["Organization", "Practitioner", "PractitionerRole"],
    ),
    reference(
        "organization",
        &[at("managingOrganization", ElementType::Reference)],
        &["Organization"],
    ),
];

static OBSERVATION: &[SearchParameter] = &[
    IDENTIFIER,
    token("code", &[at("code", ElementType::CodeableConcept)]),
    date(
        "date",
        &[
            at("effectiveDateTime", ElementType::Date),
            at("effectivePeriod", ElementType::Period),
            at("effectiveTiming", ElementType::Timing),
            at("effectiveInstant", ElementType::Date),
        ],
    ),
    token("category", &[at("category", ElementType::CodeableConcept)]),
    token(
        "status",
        &[at(
            "status",
            code_in("http://hl7.org/fhir/observation-status"),
        )],
    ),
    reference(
        "subject",
        &[at("subject", ElementType::Reference)],
        &["Patient", "Group", "Device", "Location"],
    ),
    SUBJECT_PATIENT,
    ENCOUNTER,
];

static CONDITION: &[SearchParameter] = &[
    IDENTIFIER,
    token("code", &[at("code", ElementType::CodeableConcept)]),
    token(
        "clinical-status",
        &[at("clinicalStatus", ElementType::CodeableConcept)],
    ),
    token(
        "verification-status",
        &[at("verificationStatus", ElementType::CodeableConcept)],
    ),
    token("category", &[at("category", ElementType::CodeableConcept)]),
    SUBJECT_PATIENT_OR_GROUP,
    SUBJECT_PATIENT,
    ENCOUNTER,
    date(
        "onset-date",
        &[
            at("onsetDateTime", ElementType::Date),
            at("onsetPeriod", ElementType::Period),
        ],
    ),
    date(
        "abatement-date",
        &[
            at("abatementDateTime", ElementType::Date),
            at("abatementPeriod", ElementType::Period),
        ],
    ),
    date("recorded-date", &[at("recordedDate", ElementType::Date)]),
];

static ENCOUNTER_PARAMETERS: &[SearchParameter] = &[
    IDENTIFIER,
    date("date", &[at("period", ElementType::Period)]),
    token(
        "status",
        &[at(
            "status",
            code_in("http://hl7.org/fhir/encounter-status"),
        )],
    ),
    token("class", &[at("class", ElementType::Coding)]),
    token("type", &[at("type", ElementType::CodeableConcept)]),
    SUBJECT_PATIENT_OR_GROUP,
    SUBJECT_PATIENT,
    reference(
        "service-provider",
        &[at("serviceProvider", ElementType::Reference)],
        &["Organization"],
    ),
];

static ALLERGY_INTOLERANCE: &[SearchParameter] = &[
    IDENTIFIER,
    PATIENT_ELEMENT,
    token(
        "code",
        &[
            at("code", ElementType::CodeableConcept),
            at("reaction.substance", ElementType::CodeableConcept),
        ],
    ),
    token(
        "clinical-status",
        &[at("clinicalStatus", ElementType::CodeableConcept)],
    ),
    token(
        "category",
        &[at(
            "category",
            code_in("http://hl7.org/fhir/allergy-intolerance-category"),
        )],
    ),
    date("date", &[at("recordedDate", ElementType::Date)]),
];

static MEDICATION_REQUEST: &[SearchParameter] = &[
    IDENTIFIER,
    SUBJECT_PATIENT,
    SUBJECT_PATIENT_OR_GROUP,
    ENCOUNTER,
    token(
        "status",
        &[at(
            "status",
            code_in("http://hl7.org/fhir/CodeSystem/medicationrequest-status"),
        )],
    ),
    token(
        "intent",
        &[at(
            "intent",
            code_in("http://hl7.org/fhir/CodeSystem/medicationrequest-intent"),
        )],
    ),
    token(
        "code",
        &[at(
            "medicationCodeableConcept",
            ElementType::CodeableConcept,
        )],
    ),
    reference(
        "medication",
        &[at("medicationReference", ElementType::Reference)],
        &["Medication"],
    ),
    date("authoredon", &[at("authoredOn", ElementType::Date)]),
];

static PROCEDURE: &[SearchParameter] = &[
    IDENTIFIER,
    SUBJECT_PATIENT,
    SUBJECT_PATIENT_OR_GROUP,
    ENCOUNTER,
    token("code", &[at("code", ElementType::CodeableConcept)]),
    date(
        "date",
        &[
            at("performedDateTime", ElementType::Date),
            at("performedPeriod", ElementType::Period),
        ],
    ),
    token(
        "status",
        &[at("status", code_in("http://hl7.org/fhir/event-status"))],
    ),
];

static IMMUNIZATION: &[SearchParameter] = &[
    IDENTIFIER,
    PATIENT_ELEMENT,
    date("date", &[at("occurrenceDateTime", ElementType::Date)]),
    token(
        "vaccine-code",
        &[at("vaccineCode", ElementType::CodeableConcept)],
    ),
    token(
        "status",
        &[at("status", code_in("http://hl7.org/fhir/event-status"))],
    ),
];

static DIAGNOSTIC_REPORT: &[SearchParameter] = &[
    IDENTIFIER,
    SUBJECT_PATIENT,
    reference(
        "subject",
        &[at("subject", ElementType::Reference)],
        &["Patient", "Group", "Device", "Location"],
    ),
    ENCOUNTER,
    token("code", &[at("code", ElementType::CodeableConcept)]),
    date(
        "date",
        &[
            at("effectiveDateTime", ElementType::Date),
            at("effectivePeriod", ElementType::Period),
        ],
    ),
    date("issued", &[at("issued", ElementType::Date)]),
    token("category", &[at("category", ElementType::CodeableConcept)]),
    token(
        "status",
        &[at(
            "status",
            code_in("http://hl7.org/fhir/diagnostic-report-status"),
        )],
    ),
];

static DOCUMENT_REFERENCE: &[SearchParameter] = &[
    token(
        "identifier",
        &[
            at("masterIdentifier", ElementType::Identifier),
            at("identifier", ElementType::Identifier),
        ],
    ),
    SUBJECT_PATIENT,
    reference(
        "subject",
        &[at("subject", ElementType::Reference)],
        &["Patient", "Practitioner", "Group", "Device"],
    ),
    reference(
        "encounter",
        &[at("context.encounter", ElementType::Reference)],
        &["Encounter", "EpisodeOfCare"],
    ),
    token("type", &[at("type", ElementType::CodeableConcept)]),
    token("category", &[at("category", ElementType::CodeableConcept)]),
    date("date", &[at("date", ElementType::Date)]),
    date("period", &[at("context.period", ElementType::Period)]),
    token(
        "status",
        &[at(
            "status",
            code_in("http://hl7.org/fhir/document-reference-status"),
        )],
    ),
];

static PRACTITIONER: &[SearchParameter] = &[IDENTIFIER, NAME, FAMILY, GIVEN];

static ORGANIZATION: &[SearchParameter] = &[
    IDENTIFIER,
    string(
        "name",
        &[
            at("name", ElementType::String),
            at("alias", ElementType::String),
        ],
    ),
];

static LOCATION: &[SearchParameter] = &[
    IDENTIFIER,
    string(
        "name",
        &[
            at("name", ElementType::String),
            at("alias", ElementType::String),
        ],
    ),
];

static PRACTITIONER_ROLE: &[SearchParameter] = &[
    IDENTIFIER,
    reference(
        "practitioner",
        &[at("practitioner", ElementType::Reference)],
        &["Practitioner"],
    ),
    reference(
        "organization",
        &[at("organization", ElementType::Reference)],
        &["Organization"],
    ),
];

static CONSENT: &[SearchParameter] = &[
    IDENTIFIER,
    PATIENT_ELEMENT,
    token(
        "status",
        &[at(
            "status",
            code_in("http://hl7.org/fhir/consent-state-codes"),
        )],
    ),
    token("category", &[at("category", ElementType::CodeableConcept)]),
    token("scope", &[at("scope", ElementType::CodeableConcept)]),
    date("date", &[at("dateTime", ElementType::Date)]),
    date("period", &[at("provision.period", ElementType::Period)]),
];

static PROVENANCE: &[SearchParameter] = &[
    reference(
        "patient",
        &[at("target", ElementType::Reference)],
        &["Patient"],
    ),
    reference("target", &[at("target", ElementType::Reference)], &[]),
    date("recorded", &[at("recorded", ElementType::Date)]),
];

static AUDIT_EVENT: &[SearchParameter] = &[
    date("date", &[at("recorded", ElementType::Date)]),
    reference(
        "patient",
        &[
            at("agent.who", ElementType::Reference),
            at("entity.what", ElementType::Reference),
        ],
        &["Patient"],
    ),
    reference(
        "agent",
        &[at("agent.who", ElementType::Reference)],
        &[
            "Practitioner",
            "Organization",
            "Device",
            "Patient",
            "PractitionerRole",
            "RelatedPerson",
        ],
    ),
    reference("entity", &[at("entity.what", ElementType::Reference)], &[]),
    token("type", &[at("type", ElementType::Coding)]),
    token(
        "action",
        &[at(
            "action",
            code_in("http://hl7.org/fhir/audit-event-action"),
        )],
    ),
    token(
        "outcome",
        &[at(
            "outcome",
            code_in("http://hl7.org/fhir/audit-event-outcome"),
        )],
    ),
];

static CARE_PLAN: &[SearchParameter] = &[
    IDENTIFIER,
    SUBJECT_PATIENT,
    SUBJECT_PATIENT_OR_GROUP,
    ENCOUNTER,
    token(
        "status",
        &[at("status", code_in("http://hl7.org/fhir/request-status"))],
    ),
    token("category", &[at("category", ElementType::CodeableConcept)]),
    date("date", &[at("period", ElementType::Period)]),
];

static CARE_TEAM: &[SearchParameter] = &[
    IDENTIFIER,
    SUBJECT_PATIENT,
    SUBJECT_PATIENT_OR_GROUP,
    ENCOUNTER,
    token("status", &[at("status", CODE)]),
    token("category", &[at("category", ElementType::CodeableConcept)]),
    date("date", &[at("period", ElementType::Period)]),
];

static CLAIM: &[SearchParameter] = &[
    IDENTIFIER,
    PATIENT_ELEMENT,
    token("status", &[at("status", CODE)]),
    date("created", &[at("created", ElementType::Date)]),
];

static EXPLANATION_OF_BENEFIT: &[SearchParameter] = &[
    IDENTIFIER,
    PATIENT_ELEMENT,
    token("status", &[at("status", CODE)]),
    date("created", &[at("created", ElementType::Date)]),
];

static DEVICE: &[SearchParameter] = &[
    IDENTIFIER,
    PATIENT_ELEMENT,
    token("type", &[at("type", ElementType::CodeableConcept)]),
    token("status", &[at("status", CODE)]),
];

static IMAGING_STUDY: &[SearchParameter] = &[
    IDENTIFIER,
    SUBJECT_PATIENT,
    reference(
        "subject",
        &[at("subject", ElementType::Reference)],
        &["Patient", "Group", "Device"],
    ),
    ENCOUNTER,
    token("status", &[at("status", CODE)]),
    date("started", &[at("started", ElementType::Date)]),
];

static MEDICATION_ADMINISTRATION: &[SearchParameter] = &[
    IDENTIFIER,
    SUBJECT_PATIENT,
    reference(
        "subject",
        &[at("subject", ElementType::Reference)],
        &["Patient", "Group"],
    ),
    reference(
        "context",
        &[at("context", ElementType::Reference)],
        &["Encounter", "EpisodeOfCare"],
    ),
    token("status", &[at("status", CODE)]),
    token(
        "code",
        &[at(
            "medicationCodeableConcept",
            ElementType::CodeableConcept,
        )],
    ),
    date(
        "effective-time",
        &[
            at("effectiveDateTime", ElementType::Date),
            at("effectivePeriod", ElementType::Period),
        ],
    ),
];

static MEDICATION: &[SearchParameter] = &[
    IDENTIFIER,
    token("code", &[at("code", ElementType::CodeableConcept)]),
    token("status", &[at("status", CODE)]),
];

static SUPPLY_DELIVERY: &[SearchParameter] = &[
    IDENTIFIER,
    PATIENT_ELEMENT,
    token("status", &[at("status", CODE)]),
];

static GOAL: &[SearchParameter] = &[
    IDENTIFIER,
    SUBJECT_PATIENT,
    reference(
        "subject",
        &[at("subject", ElementType::Reference)],
        &["Patient", "Group", "Organization"],
    ),
    token("lifecycle-status", &[at("lifecycleStatus", CODE)]),
];

fn parameters_of_type(resource_type: &str) -> &'static [SearchParameter] {
    match resource_type {
        "Patient" => PATIENT,
        "Observation" => OBSERVATION,
        "Condition" => CONDITION,
        "Encounter" => ENCOUNTER_PARAMETERS,
        "AllergyIntolerance" => ALLERGY_INTOLERANCE,
        "MedicationRequest" => MEDICATION_REQUEST,
        "Procedure" => PROCEDURE,
        "Immunization" => IMMUNIZATION,
        "DiagnosticReport" => DIAGNOSTIC_REPORT,
        "DocumentReference" => DOCUMENT_REFERENCE,
        "Practitioner" => PRACTITIONER,
        "Organization" => ORGANIZATION,
        "Location" => LOCATION,
        "PractitionerRole" => PRACTITIONER_ROLE,
        "Consent" => CONSENT,
        "Provenance" => PROVENANCE,
        "AuditEvent" => AUDIT_EVENT,
        "CarePlan" => CARE_PLAN,
        "CareTeam" => CARE_TEAM,
        "Claim" => CLAIM,
        "ExplanationOfBenefit" => EXPLANATION_OF_BENEFIT,
        "Device" => DEVICE,
        "ImagingStudy" => IMAGING_STUDY,
        "MedicationAdministration" => MEDICATION_ADMINISTRATION,
        "Medication" => MEDICATION,
        "SupplyDelivery" => SUPPLY_DELIVERY,
        "Goal" => GOAL,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE_TYPES: [&str; 27] = [
        "Patient",
        "Observation",
        "Condition",
        "Encounter",
        "AllergyIntolerance",
        "MedicationRequest",
        "Procedure",
        "Immunization",
        "DiagnosticReport",
        "DocumentReference",
        "Practitioner",
        "Organization",
        "Location",
        "PractitionerRole",
        "Consent",
        "Provenance",
        "AuditEvent",
        "CarePlan",
        "CareTeam",
        "Claim",
        "ExplanationOfBenefit",
        "Device",
        "ImagingStudy",
        "MedicationAdministration",
        "Medication",
        "SupplyDelivery",
        "Goal",
    ];

    #[test]
    fn parameter_names_unique_per_type() {
        for resource_type in TABLE_TYPES {
            let names: Vec<&str> = search_parameters(resource_type)
                .map(SearchParameter::name)
                .collect();
            for (index, name) in names.iter().enumerate() {
                assert!(
                    !names[index + 1..].contains(name),
                    "{resource_type} lists {name} twice"
                );
            }
        }
    }

    #[test]
    fn element_types_fit_parameter_types() {
        for resource_type in TABLE_TYPES {
            for parameter in search_parameters(resource_type) {
                assert!(
                    !parameter.elements.is_empty(),
                    "{resource_type}.{} reads no element",
                    parameter.name
                );
                for element in parameter.elements {
                    let fits = match parameter.param_type {
                        SearchParamType::String => matches!(
                            element.element_type,
                            ElementType::String | ElementType::HumanName
                        ),
                        SearchParamType::Token => matches!(
                            element.element_type,
                            ElementType::Code { .. }
                                | ElementType::Boolean
                                | ElementType::Coding
                                | ElementType::CodeableConcept
                                | ElementType::Identifier
                        ),
                        SearchParamType::Date => matches!(
                            element.element_type,
                            ElementType::Date
                                | ElementType::Period
                                | ElementType::Timing
                                | ElementType::LastUpdated
                        ),
                        SearchParamType::Reference => {
                            element.element_type == ElementType::Reference
                        }
                        SearchParamType::Uri => element.element_type == ElementType::Uri,
                    };
                    assert!(
                        fits,
                        "{resource_type}.{} reads {}",
                        parameter.name, element.path
                    );
                }
            }
        }
    }

    #[test]
    fn identifier_defined_for_synthea_targets() {
        for resource_type in ["Practitioner", "Organization", "Location", "Patient"] {
            let parameter = find_parameter(resource_type, "identifier");
            assert!(parameter.is_some(), "{resource_type} lacks identifier");
        }
    }

    #[test]
    fn unknown_type_has_common_parameters() {
        assert!(find_parameter("Basic", "_id").is_some());
        assert!(find_parameter("Basic", "_lastUpdated").is_some());
        assert!(find_parameter("Basic", "identifier").is_none());
    }

    #[test]
    fn patient_parameters_point_at_patient() {
        for resource_type in TABLE_TYPES {
            if let Some(parameter) = find_parameter(resource_type, "patient") {
                assert_eq!(parameter.targets, &["Patient"], "{resource_type}.patient");
            }
        }
    }
}
