//! FHIR R4 search: parses a query string into a [`SearchQuery`] and decides whether one resource,
//! held as JSON, matches it. The server decrypts candidates and filters them with [`matches()`].
//!
//! A resource matches when every parameter matches, repeated ones included, and a parameter
//! matches when any of its comma-separated values does. Error messages name the parameter and
//! never the value, because a search value can be health data.

mod evaluate;
mod parameters;
mod values;

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;

use super::datetime::DateTimeError;
use evaluate::SortValue;
use values::{DateValue, ReferenceValue, TextValue, TokenSystem, TokenValue};

pub use parameters::{search_parameters, SearchParamType, SearchParameter};

/// Maximum page size that `_count` can request. Larger requests are lowered to it, which FHIR
/// allows. Resources in two Synthea sample bundles measured 0.4 to 8 kB of compact JSON (median
/// 0.8 kB), so a full page of similar data stays under about 8 MB once decrypted.
pub const MAX_COUNT: usize = 1000;

/// Maximum length, in characters, of a parameter name or modifier repeated in an error message.
const MAX_NAME_CHARS_IN_ERROR: usize = 64;

/// Search query parsed from the query string of a FHIR search on one resource type.
///
/// Parameters that the type does not define are not errors: [`SearchQuery::unknown_parameters`]
/// lists them, and the caller ignores them (FHIR's lenient handling, the default) or rejects the
/// search with [`SearchQuery::reject_unknown_parameters`] under `Prefer: handling=strict`.
pub struct SearchQuery {
    resource_type: String,
    clauses: Vec<Clause>,
    count: Option<usize>,
    sort: Vec<SortField>,
    summary: Option<Summary>,
    unknown: Vec<String>,
    now: Option<i128>,
}

/// Value of the `_summary` result parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    /// `true`: only the elements marked as summary.
    True,
    /// `text`: text, id, meta and mandatory elements.
    Text,
    /// `data`: everything except the narrative text.
    Data,
    /// `count`: only the total number of matches.
    Count,
    /// `false`: the full resources.
    False,
}

/// Reason a query string could not be parsed. No variant contains a search value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchError {
    /// A value of a known parameter is not valid for its type.
    InvalidValue {
        /// Parameter name as written, modifier included.
        parameter: String,
        /// Description of the problem with the value.
        reason: &'static str,
    },
    /// A value of a date parameter is not a valid date.
    InvalidDate {
        /// Parameter name as written, modifier included.
        parameter: String,
        /// Description of the problem with the date.
        source: DateTimeError,
    },
    /// The modifier does not exist for the parameter's type or is not implemented.
    UnsupportedModifier {
        /// Parameter name without the modifier.
        parameter: String,
        /// Modifier without the leading colon.
        modifier: String,
    },
    /// The parameter uses a search feature that this server does not implement.
    UnsupportedFeature {
        /// Parameter name as written.
        parameter: String,
        /// The feature, such as "chained search".
        feature: &'static str,
    },
    /// `_sort` names a parameter that the resource type does not define.
    UnsupportedSort {
        /// Sort parameter name without its `-` sign.
        parameter: String,
    },
    /// A result parameter such as `_count` appears more than once.
    RepeatedParameter {
        /// Parameter name.
        parameter: String,
    },
    /// The resource type does not define the parameter (from
    /// [`SearchQuery::reject_unknown_parameters`]).
    UnknownParameter {
        /// Resource type searched.
        resource_type: String,
        /// Parameter name as written.
        parameter: String,
    },
}

impl fmt::Display for SearchError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SearchError::InvalidValue { parameter, reason } => {
                write!(
                    formatter,
                    "invalid value for search parameter `{parameter}`: {reason}"
                )
            }
            SearchError::InvalidDate { parameter, .. } => {
                write!(formatter, "invalid date in search parameter `{parameter}`")
            }
            SearchError::UnsupportedModifier {
                parameter,
                modifier,
            } => write!(
                formatter,
                "search parameter `{parameter}` does not support the modifier `:{modifier}`"
            ),
            SearchError::UnsupportedFeature { parameter, feature } => write!(
                formatter,
                "search parameter `{parameter}` uses {feature}, which is not supported"
            ),
            SearchError::UnsupportedSort { parameter } => write!(
                formatter,
                "cannot sort by `{parameter}`: not a search parameter of this resource type"
            ),
            SearchError::RepeatedParameter { parameter } => {
                write!(
                    formatter,
                    "search parameter `{parameter}` may appear only once"
                )
            }
            SearchError::UnknownParameter {
                resource_type,
                parameter,
            } => write!(
                formatter,
                "unknown search parameter `{parameter}` for resource type {resource_type}"
            ),
        }
    }
}

impl std::error::Error for SearchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SearchError::InvalidDate { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Modifier written after the parameter name, as in `name:exact`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Modifier {
    None,
    Missing,
    Exact,
    Contains,
    Not,
    Text,
    Identifier,
    /// `:Type` on a reference parameter; the type is already applied to the parsed values.
    ResourceType,
}

/// One parsed search value.
enum SearchValue {
    Text(TextValue),
    Token(TokenValue),
    Date(DateValue),
    Reference(ReferenceValue),
    Uri(String),
    Missing(bool),
}

/// One occurrence of a filter parameter: its values are alternatives (OR).
struct Clause {
    parameter: &'static SearchParameter,
    modifier: Modifier,
    values: Vec<SearchValue>,
}

/// One `_sort` key.
struct SortField {
    parameter: &'static SearchParameter,
    descending: bool,
}

impl SearchQuery {
    /// Returns the resource type searched.
    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// Returns the page size from `_count`, already lowered to [`MAX_COUNT`], if one was given.
    pub fn count(&self) -> Option<usize> {
        self.count
    }

    /// Returns the `_summary` mode, if one was given.
    pub fn summary(&self) -> Option<Summary> {
        self.summary
    }

    /// Checks whether the query has a `_sort`. Without one, [`sort_key`] gives every resource
    /// the same key.
    pub fn has_sort(&self) -> bool {
        !self.sort.is_empty()
    }

    /// Returns the names (modifiers included) of parameters that the resource type does not
    /// define and that were left out of the filter, in query order.
    pub fn unknown_parameters(&self) -> &[String] {
        &self.unknown
    }

    /// Rejects the query if it has an unknown parameter, as FHIR requires of a server under
    /// `Prefer: handling=strict`.
    ///
    /// # Errors
    ///
    /// Returns [`SearchError::UnknownParameter`] for the first unknown parameter.
    pub fn reject_unknown_parameters(&self) -> Result<(), SearchError> {
        match self.unknown.first() {
            Some(name) => Err(SearchError::UnknownParameter {
                resource_type: shorten(&self.resource_type),
                parameter: shorten(name),
            }),
            None => Ok(()),
        }
    }

    /// Sets the current time, in nanoseconds since the Unix epoch, that the `ap` date prefix
    /// measures its 10% margin from. Without it, `ap` widens a date by 10% of its own precision.
    pub fn with_current_time(mut self, now_unix_nanos: i128) -> SearchQuery {
        self.now = Some(now_unix_nanos);
        self
    }
}

impl fmt::Debug for SearchQuery {
    /// Prints parameter names and value counts, never the values, which can be health data.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let clauses: Vec<String> = self
            .clauses
            .iter()
            .map(|clause| {
                format!(
                    "{}({:?}, {} values)",
                    clause.parameter.name(),
                    clause.modifier,
                    clause.values.len()
                )
            })
            .collect();
        let sort: Vec<String> = self
            .sort
            .iter()
            .map(|field| {
                let sign = if field.descending { "-" } else { "" };
                format!("{sign}{}", field.parameter.name())
            })
            .collect();
        formatter
            .debug_struct("SearchQuery")
            .field("resource_type", &self.resource_type)
            .field("clauses", &clauses)
            .field("count", &self.count)
            .field("sort", &sort)
            .field("summary", &self.summary)
            .field("unknown", &self.unknown)
            .finish()
    }
}

/// Parses the decoded query pairs of a search on `resource_type`.
///
/// Supported forms:
///
/// - string parameters, with `:exact` and `:contains`;
/// - tokens as `code`, `system|code`, `|code` and `system|`, with `:not` and `:text`;
/// - dates with the prefixes eq, ne, gt, lt, ge, le, sa, eb and ap;
/// - references as `Type/id`, a bare id or a URL ending in `Type/id`, with `:Type` and
///   `:identifier`;
/// - `:missing` on every parameter;
/// - the result parameters `_count`, `_sort` and `_summary`.
///
/// `_format` and `_pretty` are ignored, because they shape the response rather than select
/// resources. Names that the type does not define are collected in
/// [`SearchQuery::unknown_parameters`] instead of failing the parse.
///
/// # Errors
///
/// Returns a [`SearchError`] naming the parameter when a value is empty or invalid for its
/// type, a modifier is unsupported, a chain or `_has` is used, `_sort` names an unknown
/// parameter, or `_count`, `_sort` or `_summary` is repeated.
pub fn parse_query(
    resource_type: &str,
    pairs: &[(String, String)],
) -> Result<SearchQuery, SearchError> {
    let mut query = SearchQuery {
        resource_type: resource_type.to_owned(),
        clauses: Vec::new(),
        count: None,
        sort: Vec::new(),
        summary: None,
        unknown: Vec::new(),
        now: None,
    };
    let mut result_parameters_seen: Vec<&str> = Vec::new();

    for (name, value) in pairs {
        let name = name.as_str();
        match name {
            "_format" | "_pretty" => continue,
            "_count" | "_sort" | "_summary" => {
                if result_parameters_seen.contains(&name) {
                    return Err(SearchError::RepeatedParameter {
                        parameter: name.to_owned(),
                    });
                }
                result_parameters_seen.push(name);
                parse_result_parameter(&mut query, name, value)?;
                continue;
            }
            _ => {}
        }

        let (base, modifier) = match name.split_once(':') {
            Some((base, modifier)) => (base, Some(modifier)),
            None => (name, None),
        };
        if base == "_has" {
            return Err(SearchError::UnsupportedFeature {
                parameter: shorten(name),
                feature: "reverse chaining",
            });
        }
        if let Some((head, _)) = base.split_once('.') {
            let is_reference = parameters::find_parameter(resource_type, head)
                .is_some_and(|parameter| parameter.param_type() == SearchParamType::Reference);
            if is_reference {
                return Err(SearchError::UnsupportedFeature {
                    parameter: shorten(name),
                    feature: "chained search",
                });
            }
            query.unknown.push(name.to_owned());
            continue;
        }
        let Some(parameter) = parameters::find_parameter(resource_type, base) else {
            query.unknown.push(name.to_owned());
            continue;
        };

        let clause = parse_clause(parameter, name, modifier, value)?;
        query.clauses.push(clause);
    }
    Ok(query)
}

fn parse_result_parameter(
    query: &mut SearchQuery,
    name: &str,
    value: &str,
) -> Result<(), SearchError> {
    let invalid = |reason| SearchError::InvalidValue {
        parameter: name.to_owned(),
        reason,
    };
    match name {
        "_count" => {
            let count: usize = value
                .parse()
                .map_err(|_| invalid("expected a non-negative integer"))?;
            query.count = Some(count.min(MAX_COUNT));
        }
        "_summary" => {
            let summary = match value {
                "true" => Summary::True,
                "text" => Summary::Text,
                "data" => Summary::Data,
                "count" => Summary::Count,
                "false" => Summary::False,
                _ => return Err(invalid("expected true, text, data, count or false")),
            };
            query.summary = Some(summary);
        }
        _ => {
            for item in value.split(',') {
                let (descending, sort_name) = match item.strip_prefix('-') {
                    Some(rest) => (true, rest),
                    None => (false, item),
                };
                if sort_name.is_empty() {
                    return Err(invalid("empty sort key"));
                }
                let Some(parameter) = parameters::find_parameter(&query.resource_type, sort_name)
                else {
                    return Err(SearchError::UnsupportedSort {
                        parameter: shorten(sort_name),
                    });
                };
                query.sort.push(SortField {
                    parameter,
                    descending,
                });
            }
        }
    }
    Ok(())
}

fn parse_clause(
    parameter: &'static SearchParameter,
    name: &str,
    modifier_text: Option<&str>,
    value: &str,
) -> Result<Clause, SearchError> {
    let modifier = parse_modifier(parameter, modifier_text)?;
    let type_modifier = match modifier {
        Modifier::ResourceType => modifier_text,
        _ => None,
    };
    let invalid = |reason| SearchError::InvalidValue {
        parameter: shorten(name),
        reason,
    };
    if value.is_empty() {
        return Err(invalid("the value is empty"));
    }

    let mut parsed_values = Vec::new();
    for item in values::split_alternatives(value) {
        if item.is_empty() {
            return Err(invalid("empty value in a comma-separated list"));
        }
        let parsed = match (modifier, parameter.param_type()) {
            (Modifier::Missing, _) => {
                SearchValue::Missing(values::parse_missing(item).map_err(invalid)?)
            }
            (Modifier::Text, _) | (_, SearchParamType::String) => {
                SearchValue::Text(TextValue::new(values::unescape(item)))
            }
            (Modifier::Identifier, _) | (_, SearchParamType::Token) => {
                SearchValue::Token(values::parse_token(item).map_err(invalid)?)
            }
            (_, SearchParamType::Date) => {
                let date = values::parse_date(item).map_err(|source| SearchError::InvalidDate {
                    parameter: shorten(name),
                    source,
                })?;
                SearchValue::Date(date)
            }
            (_, SearchParamType::Reference) => SearchValue::Reference(
                values::parse_reference(item, type_modifier, parameter.target_types())
                    .map_err(invalid)?,
            ),
            (_, SearchParamType::Uri) => SearchValue::Uri(values::unescape(item)),
        };
        parsed_values.push(parsed);
    }

    Ok(Clause {
        parameter,
        modifier,
        values: parsed_values,
    })
}

fn parse_modifier(
    parameter: &SearchParameter,
    modifier_text: Option<&str>,
) -> Result<Modifier, SearchError> {
    let Some(text) = modifier_text else {
        return Ok(Modifier::None);
    };
    let modifier = match (parameter.param_type(), text) {
        (_, "missing") => Some(Modifier::Missing),
        (SearchParamType::String, "exact") => Some(Modifier::Exact),
        (SearchParamType::String, "contains") => Some(Modifier::Contains),
        (SearchParamType::Token, "not") => Some(Modifier::Not),
        (SearchParamType::Token, "text") => Some(Modifier::Text),
        (SearchParamType::Reference, "identifier") => Some(Modifier::Identifier),
        (SearchParamType::Reference, type_name) if values::is_resource_type(type_name) => {
            let targets = parameter.target_types();
            let allowed = targets.is_empty() || targets.contains(&type_name);
            allowed.then_some(Modifier::ResourceType)
        }
        _ => None,
    };
    modifier.ok_or_else(|| SearchError::UnsupportedModifier {
        parameter: shorten(parameter.name()),
        modifier: shorten(text),
    })
}

/// Checks whether a resource matches every parameter of the query.
///
/// `last_updated` is the `meta.lastUpdated` instant of the stored version, which `_lastUpdated`
/// compares with. A resource of another type than the query's never matches.
pub fn matches(query: &SearchQuery, resource: &Value, last_updated: &str) -> bool {
    let resource_type = resource.get("resourceType").and_then(Value::as_str);
    if resource_type != Some(query.resource_type.as_str()) {
        return false;
    }
    query
        .clauses
        .iter()
        .all(|clause| evaluate::clause_matches(clause, resource, last_updated, query.now))
}

/// Returns the id of the one patient that the query restricts results to, so the server can
/// scan only that patient's chart.
///
/// A restriction is a `patient` or `subject` parameter with a single value that names a Patient
/// (`Patient/1`, or a bare id where the parameter can only point to a Patient), or `_id` with a
/// single value in a Patient search. `:not`, `:missing` and several alternatives give no
/// restriction. With two restrictions to different patients no resource matches, and scanning
/// either chart still gives that empty result.
pub fn patient_filter(query: &SearchQuery) -> Option<String> {
    query.clauses.iter().find_map(|clause| {
        let [single] = clause.values.as_slice() else {
            return None;
        };
        let name = clause.parameter.name();
        let restricts_by_reference = matches!(name, "patient" | "subject")
            && matches!(clause.modifier, Modifier::None | Modifier::ResourceType);
        let restricts_by_id =
            name == "_id" && query.resource_type == "Patient" && clause.modifier == Modifier::None;

        match single {
            SearchValue::Reference(ReferenceValue::Typed {
                resource_type: Some(resource_type),
                id,
            }) if restricts_by_reference && resource_type == "Patient" => Some(id.clone()),
            SearchValue::Token(TokenValue {
                system: TokenSystem::Any,
                code: Some(id),
            }) if restricts_by_id => Some(id.clone()),
            _ => None,
        }
    })
}

/// Checks whether the resource has an `identifier` with the given value and system, which
/// resolves a conditional reference such as `Practitioner?identifier=system|value`.
///
/// `system` is `None` to accept any system, and `Some("")` to require an identifier without
/// one, matching the token forms `value` and `|value`. Only the `identifier` element is read.
pub fn identifier_matches(resource: &Value, system: Option<&str>, value: &str) -> bool {
    let token = TokenValue {
        system: match system {
            None => TokenSystem::Any,
            Some("") => TokenSystem::Absent,
            Some(system) => TokenSystem::Equals(system.to_owned()),
        },
        code: Some(value.to_owned()),
    };
    let mut identifiers = Vec::new();
    evaluate::collect_segments(resource, &["identifier"], &mut identifiers);
    identifiers
        .into_iter()
        .any(|identifier| evaluate::coded_matches(&token, identifier, "value"))
}

/// Position of one resource in the order that a query's `_sort` requests.
///
/// Compare only keys built from the same query. Resources without a value for a sort parameter
/// come after those with one, in both directions. Equal keys keep no particular order, so a
/// caller that needs a stable page order sorts by id after the key.
#[derive(Clone)]
pub struct SortKey {
    parts: Vec<SortPart>,
}

#[derive(Clone)]
struct SortPart {
    value: Option<SortValue>,
    descending: bool,
}

impl Ord for SortKey {
    fn cmp(&self, other: &SortKey) -> Ordering {
        for (left, right) in self.parts.iter().zip(&other.parts) {
            let ordering = match (&left.value, &right.value) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(left_value), Some(right_value)) if left.descending => {
                    right_value.cmp(left_value)
                }
                (Some(left_value), Some(right_value)) => left_value.cmp(right_value),
            };
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        self.parts.len().cmp(&other.parts.len())
    }
}

impl PartialOrd for SortKey {
    fn partial_cmp(&self, other: &SortKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for SortKey {
    fn eq(&self, other: &SortKey) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for SortKey {}

impl fmt::Debug for SortKey {
    /// Prints only the number of parts, because sort values can be health data.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "SortKey({} parts)", self.parts.len())
    }
}

/// Computes the sort key of a resource under the query's `_sort`.
///
/// For each sort parameter the key contains the lowest of the resource's values in ascending order
/// and the highest in descending order. Dates compare by instant and other types by their text
/// after case and accent folding. `last_updated` is the stored version's `meta.lastUpdated`.
pub fn sort_key(query: &SearchQuery, resource: &Value, last_updated: &str) -> SortKey {
    let parts = query
        .sort
        .iter()
        .map(|field| SortPart {
            value: evaluate::sort_value(field.parameter, resource, last_updated, field.descending),
            descending: field.descending,
        })
        .collect();
    SortKey { parts }
}

/// Cuts a client-supplied name to a bounded length before it goes into an error message.
fn shorten(name: &str) -> String {
    if name.chars().count() <= MAX_NAME_CHARS_IN_ERROR {
        return name.to_owned();
    }
    let mut shortened: String = name.chars().take(MAX_NAME_CHARS_IN_ERROR).collect();
    shortened.push('…');
    shortened
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LAST_UPDATED: &str = "2024-03-01T10:00:00Z";

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn parse(resource_type: &str, query: &[(&str, &str)]) -> SearchQuery {
        parse_query(resource_type, &pairs(query)).unwrap()
    }

    fn parse_error(resource_type: &str, query: &[(&str, &str)]) -> SearchError {
        parse_query(resource_type, &pairs(query)).unwrap_err()
    }

    fn is_match(resource: &Value, query: &[(&str, &str)]) -> bool {
        let resource_type = resource["resourceType"].as_str().unwrap();
        matches(&parse(resource_type, query), resource, LAST_UPDATED)
    }

    fn synthetic_patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "pat-1",
            "identifier": [
                {"system": "urn:oid:2.16.840.1.113883.19.5", "value": "MRN-0001"},
                {"value": "LOCAL-7"}
            ],
            "active": true,
            "name": [
                {"use": "official", "family": "du Marché", "given": ["Bénédicte", "Ann"],
                 "prefix": ["Mme"]},
                {"use": "usual", "text": "Benny Example"}
            ],
            "gender": "female",
            "birthDate": "1974-12-25"
        })
    }

    fn synthetic_observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "obs-1",
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs"
            }]}],
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "8302-2",
                            "display": "Body Height"}],
                "text": "Body Height"
            },
            "subject": {"reference": "Patient/pat-1"},
            "encounter": {"reference": "Encounter/enc-1"},
            "effectiveDateTime": "2012-06-15"
        })
    }

    fn observation_with(field: &str, value: Value) -> Value {
        let mut observation = synthetic_observation();
        let object = observation.as_object_mut().unwrap();
        object.remove("effectiveDateTime");
        object.insert(field.to_owned(), value);
        observation
    }

    #[test]
    fn string_default_folds_accents_and_case() {
        let patient = synthetic_patient();
        assert!(is_match(&patient, &[("name", "bene")]));
        assert!(is_match(&patient, &[("name", "BÉNÉ")]));
        assert!(is_match(&patient, &[("name", "Bénédicte")]));
        assert!(is_match(&patient, &[("family", "du march")]));
        assert!(!is_match(&patient, &[("family", "marche")]));
        assert!(!is_match(&patient, &[("name", "benedictine")]));
    }

    #[test]
    fn human_name_parts_matched_separately() {
        let patient = synthetic_patient();
        assert!(is_match(&patient, &[("name", "mme")]));
        assert!(is_match(&patient, &[("name", "ann")]));
        assert!(is_match(&patient, &[("name", "benny ex")]));
        assert!(!is_match(&patient, &[("name", "bénédicte ann")]));
        assert!(is_match(&patient, &[("given", "ann")]));
        assert!(!is_match(&patient, &[("given", "du")]));
    }

    #[test]
    fn string_exact_keeps_case_and_accents() {
        let patient = synthetic_patient();
        assert!(is_match(&patient, &[("name:exact", "Bénédicte")]));
        assert!(!is_match(&patient, &[("name:exact", "benedicte")]));
        assert!(!is_match(&patient, &[("name:exact", "Béné")]));
        assert!(is_match(&patient, &[("family:exact", "du Marché")]));
    }

    #[test]
    fn string_contains_finds_inner_text() {
        let patient = synthetic_patient();
        assert!(is_match(&patient, &[("family:contains", "arche")]));
        assert!(is_match(&patient, &[("name:contains", "EDIC")]));
        assert!(!is_match(&patient, &[("family:contains", "xyz")]));
    }

    #[test]
    fn string_value_unescapes_commas() {
        let organization = json!({
            "resourceType": "Organization",
            "name": "Smith, Jones and Partners"
        });
        assert!(is_match(&organization, &[("name", r"smith\, jones")]));
        assert!(!is_match(&organization, &[("name", r"smith\, x")]));
        assert!(is_match(&organization, &[("name", "smith, x")]));
    }

    #[test]
    fn token_code_matches_any_system() {
        let observation = synthetic_observation();
        assert!(is_match(&observation, &[("code", "8302-2")]));
        assert!(!is_match(&observation, &[("code", "8302")]));
        assert!(!is_match(&observation, &[("code", "8302-2 ")]));
    }

    #[test]
    fn token_system_and_code_both_checked() {
        let observation = synthetic_observation();
        assert!(is_match(
            &observation,
            &[("code", "http://loinc.org|8302-2")]
        ));
        assert!(!is_match(
            &observation,
            &[("code", "http://snomed.info/sct|8302-2")]
        ));
        assert!(is_match(&observation, &[("code", "http://loinc.org|")]));
        assert!(!is_match(
            &observation,
            &[("code", "http://snomed.info/sct|")]
        ));
    }

    #[test]
    fn token_empty_system_requires_no_system() {
        let patient = synthetic_patient();
        assert!(is_match(&patient, &[("identifier", "|LOCAL-7")]));
        assert!(!is_match(&patient, &[("identifier", "|MRN-0001")]));
        assert!(is_match(
            &patient,
            &[("identifier", "urn:oid:2.16.840.1.113883.19.5|MRN-0001")]
        ));
    }

    #[test]
    fn token_on_code_uses_bound_system() {
        let patient = synthetic_patient();
        assert!(is_match(&patient, &[("gender", "female")]));
        assert!(is_match(
            &patient,
            &[("gender", "http://hl7.org/fhir/administrative-gender|female")]
        ));
        assert!(!is_match(
            &patient,
            &[("gender", "http://example.org/gender|female")]
        ));
        assert!(!is_match(&patient, &[("gender", "|female")]));
        assert!(!is_match(&patient, &[("gender", "male")]));
    }

    #[test]
    fn token_on_boolean_element() {
        let patient = synthetic_patient();
        assert!(is_match(&patient, &[("active", "true")]));
        assert!(!is_match(&patient, &[("active", "false")]));
    }

    #[test]
    fn token_not_excludes_matching_values() {
        let patient = synthetic_patient();
        assert!(is_match(&patient, &[("gender:not", "male")]));
        assert!(!is_match(&patient, &[("gender:not", "female")]));
        assert!(!is_match(&patient, &[("gender:not", "male,female")]));

        let mut without_gender = synthetic_patient();
        without_gender.as_object_mut().unwrap().remove("gender");
        assert!(is_match(&without_gender, &[("gender:not", "female")]));
    }

    #[test]
    fn token_text_searches_display_text() {
        let observation = synthetic_observation();
        assert!(is_match(&observation, &[("code:text", "body")]));
        assert!(is_match(&observation, &[("code:text", "BODY HEI")]));
        assert!(!is_match(&observation, &[("code:text", "weight")]));
    }

    #[test]
    fn comma_values_are_alternatives() {
        let observation = synthetic_observation();
        assert!(is_match(&observation, &[("code", "29463-7,8302-2")]));
        assert!(!is_match(&observation, &[("code", "29463-7,39156-5")]));
    }

    #[test]
    fn repeated_parameters_all_apply() {
        let observation = synthetic_observation();
        assert!(is_match(
            &observation,
            &[("status", "final"), ("code", "8302-2")]
        ));
        assert!(!is_match(
            &observation,
            &[("code", "8302-2"), ("code", "29463-7")]
        ));
        assert!(is_match(
            &observation,
            &[("date", "ge2012"), ("date", "lt2013")]
        ));
        assert!(!is_match(
            &observation,
            &[("date", "ge2012-07"), ("date", "lt2013")]
        ));
    }

    #[test]
    fn date_prefix_precision_against_day() {
        let observation = synthetic_observation();
        assert!(is_match(&observation, &[("date", "ge2012-06")]));
        assert!(is_match(&observation, &[("date", "2012-06")]));
        assert!(is_match(&observation, &[("date", "eq2012")]));
        assert!(!is_match(&observation, &[("date", "2012-06-15T10:00")]));
        assert!(is_match(&observation, &[("date", "ne2012-06-16")]));
        assert!(is_match(&observation, &[("date", "gt2012-06-14")]));
        assert!(!is_match(&observation, &[("date", "gt2012-06-15")]));
        assert!(is_match(&observation, &[("date", "lt2012-06-16")]));
        assert!(is_match(&observation, &[("date", "le2012-06-15")]));
        assert!(is_match(&observation, &[("date", "sa2012-06-14")]));
        assert!(is_match(&observation, &[("date", "eb2012-06-16")]));
        assert!(!is_match(&observation, &[("date", "eb2012-06-15")]));
    }

    #[test]
    fn date_equal_against_period() {
        let within = observation_with(
            "effectivePeriod",
            json!({"start": "2012-03-01", "end": "2012-04-01"}),
        );
        assert!(is_match(&within, &[("date", "eq2012")]));
        assert!(!is_match(&within, &[("date", "eq2012-03")]));
        assert!(is_match(&within, &[("date", "ge2012-03")]));

        let straddling = observation_with(
            "effectivePeriod",
            json!({"start": "2011-12-20", "end": "2012-01-10"}),
        );
        assert!(!is_match(&straddling, &[("date", "eq2012")]));
        assert!(is_match(&straddling, &[("date", "lt2012")]));
        assert!(is_match(&straddling, &[("date", "ne2012")]));
    }

    #[test]
    fn open_period_extends_to_infinity() {
        let ongoing = observation_with(
            "effectivePeriod",
            json!({"start": "2012-03-01T08:00:00+01:00"}),
        );
        assert!(is_match(&ongoing, &[("date", "gt2030")]));
        assert!(!is_match(&ongoing, &[("date", "eq2012")]));
        assert!(!is_match(&ongoing, &[("date", "lt2012-03-01")]));
        assert!(is_match(&ongoing, &[("date", "sa2012-02")]));
    }

    #[test]
    fn date_time_offset_moves_utc_day() {
        let late_evening =
            observation_with("effectiveDateTime", json!("2012-06-15T23:30:00-05:00"));
        assert!(!is_match(&late_evening, &[("date", "2012-06-15")]));
        assert!(is_match(&late_evening, &[("date", "2012-06-16")]));
        assert!(is_match(
            &late_evening,
            &[("date", "2012-06-15T23:30-05:00")]
        ));
        assert!(is_match(&late_evening, &[("date", "2012-06-16T04:30")]));
        assert!(is_match(&late_evening, &[("date", "gt2012-06-15")]));
        assert!(!is_match(&late_evening, &[("date", "lt2012-06-16")]));
    }

    #[test]
    fn date_reads_instant_and_timing() {
        let instant = observation_with("effectiveInstant", json!("2012-06-15T10:00:00.250Z"));
        assert!(is_match(&instant, &[("date", "2012-06-15")]));

        let timing = observation_with(
            "effectiveTiming",
            json!({"event": ["2011-01-05T08:00:00Z", "2012-06-15T08:00:00Z"]}),
        );
        assert!(is_match(&timing, &[("date", "2011-01")]));
        assert!(is_match(&timing, &[("date", "2012-06")]));
        assert!(!is_match(&timing, &[("date", "2013")]));
    }

    #[test]
    fn malformed_stored_date_never_matches() {
        let broken = observation_with("effectiveDateTime", json!("June 2012"));
        assert!(!is_match(&broken, &[("date", "2012")]));
        assert!(!is_match(&broken, &[("date", "ne2012")]));
    }

    #[test]
    fn approximate_date_uses_current_time() {
        let observation = observation_with("effectiveDateTime", json!("2000-06-01"));
        let query = parse("Observation", &[("date", "ap2000-01-01")]);
        assert!(!matches(&query, &observation, LAST_UPDATED));

        let now = super::super::datetime::parse_fhir_date_time("2020-01-01T00:00:00Z")
            .unwrap()
            .start;
        let query = query.with_current_time(now);
        assert!(matches(&query, &observation, LAST_UPDATED));
    }

    #[test]
    fn last_updated_uses_caller_instant() {
        let observation = synthetic_observation();
        assert!(is_match(&observation, &[("_lastUpdated", "ge2024-01-01")]));
        assert!(is_match(&observation, &[("_lastUpdated", "2024-03-01")]));
        assert!(!is_match(&observation, &[("_lastUpdated", "lt2024")]));
        assert!(!is_match(
            &observation,
            &[("_lastUpdated", "gt2024-03-01T10:00:00Z")]
        ));
    }

    #[test]
    fn id_and_meta_tokens() {
        let mut observation = synthetic_observation();
        observation["meta"] = json!({
            "tag": [{"system": "https://example.org/tags", "code": "synthetic"}],
            "profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]
        });
        assert!(is_match(&observation, &[("_id", "obs-1")]));
        assert!(is_match(&observation, &[("_id", "other,obs-1")]));
        assert!(!is_match(&observation, &[("_id", "obs")]));
        assert!(is_match(
            &observation,
            &[("_tag", "https://example.org/tags|synthetic")]
        ));
        assert!(is_match(
            &observation,
            &[(
                "_profile",
                "http://hl7.org/fhir/StructureDefinition/vitalsigns"
            )]
        ));
        assert!(!is_match(
            &observation,
            &[("_profile", "http://hl7.org/fhir")]
        ));
    }

    #[test]
    fn reference_forms_match() {
        let observation = synthetic_observation();
        assert!(is_match(&observation, &[("subject", "Patient/pat-1")]));
        assert!(is_match(&observation, &[("subject", "pat-1")]));
        assert!(is_match(&observation, &[("subject:Patient", "pat-1")]));
        assert!(is_match(&observation, &[("patient", "pat-1")]));
        assert!(is_match(
            &observation,
            &[("patient", "Patient/pat-1/_history/3")]
        ));
        assert!(is_match(
            &observation,
            &[("patient", "https://fhir.example.org/r4/Patient/pat-1")]
        ));
        assert!(is_match(&observation, &[("encounter", "enc-1")]));
        assert!(!is_match(&observation, &[("patient", "pat-2")]));
        assert!(!is_match(&observation, &[("subject:Group", "pat-1")]));
    }

    #[test]
    fn patient_parameter_ignores_other_subjects() {
        let group_observation = observation_with("subject", json!({"reference": "Group/pat-1"}));
        let mut group_observation = group_observation;
        group_observation["effectiveDateTime"] = json!("2012-06-15");
        assert!(!is_match(&group_observation, &[("patient", "pat-1")]));
        assert!(is_match(&group_observation, &[("subject", "pat-1")]));
        assert!(is_match(&group_observation, &[("subject", "Group/pat-1")]));
    }

    #[test]
    fn stored_absolute_reference_matches() {
        let observation = observation_with(
            "subject",
            json!({"reference": "https://fhir.example.org/r4/Patient/pat-1/_history/2"}),
        );
        assert!(is_match(&observation, &[("patient", "pat-1")]));

        let urn = observation_with("subject", json!({"reference": "urn:uuid:1f0c2b9e"}));
        assert!(!is_match(&urn, &[("patient", "pat-1")]));
        assert!(is_match(&urn, &[("subject", "urn:uuid:1f0c2b9e")]));
    }

    #[test]
    fn reference_identifier_modifier() {
        let observation = observation_with(
            "subject",
            json!({"identifier": {"system": "urn:example:mrn", "value": "MRN-0001"}}),
        );
        assert!(is_match(
            &observation,
            &[("subject:identifier", "urn:example:mrn|MRN-0001")]
        ));
        assert!(is_match(
            &observation,
            &[("subject:identifier", "MRN-0001")]
        ));
        assert!(!is_match(
            &observation,
            &[("subject:identifier", "MRN-0002")]
        ));
        assert!(!is_match(&observation, &[("subject", "pat-1")]));
    }

    #[test]
    fn missing_modifier_tests_presence() {
        let observation = synthetic_observation();
        assert!(is_match(&observation, &[("encounter:missing", "false")]));
        assert!(!is_match(&observation, &[("encounter:missing", "true")]));
        assert!(is_match(&observation, &[("date:missing", "false")]));

        let mut without_gender = synthetic_patient();
        without_gender.as_object_mut().unwrap().remove("gender");
        assert!(is_match(&without_gender, &[("gender:missing", "true")]));
        assert!(!is_match(&without_gender, &[("gender:missing", "false")]));
    }

    #[test]
    fn other_resource_type_never_matches() {
        let query = parse("Observation", &[]);
        assert!(matches(&query, &synthetic_observation(), LAST_UPDATED));
        assert!(!matches(&query, &synthetic_patient(), LAST_UPDATED));
    }

    #[test]
    fn unknown_parameters_reported_not_failed() {
        let query = parse(
            "Patient",
            &[
                ("name", "bene"),
                ("shoe-size", "44"),
                ("_include", "Patient:link"),
            ],
        );
        assert_eq!(query.unknown_parameters(), ["shoe-size", "_include"]);
        assert!(matches(&query, &synthetic_patient(), LAST_UPDATED));

        let error = query.reject_unknown_parameters().unwrap_err();
        assert_eq!(
            error,
            SearchError::UnknownParameter {
                resource_type: "Patient".to_owned(),
                parameter: "shoe-size".to_owned()
            }
        );
        assert_eq!(
            error.to_string(),
            "unknown search parameter `shoe-size` for resource type Patient"
        );
    }

    #[test]
    fn known_parameters_pass_strict_check() {
        let query = parse(
            "Patient",
            &[("name", "bene"), ("_format", "json"), ("_pretty", "true")],
        );
        assert!(query.unknown_parameters().is_empty());
        assert_eq!(query.reject_unknown_parameters(), Ok(()));
    }

    #[test]
    fn parameter_of_other_type_is_unknown() {
        let query = parse("Observation", &[("birthdate", "2012")]);
        assert_eq!(query.unknown_parameters(), ["birthdate"]);
    }

    #[test]
    fn chains_and_has_rejected() {
        assert_eq!(
            parse_error("Observation", &[("subject.name", "bene")]),
            SearchError::UnsupportedFeature {
                parameter: "subject.name".to_owned(),
                feature: "chained search"
            }
        );
        assert_eq!(
            parse_error("Patient", &[("_has:Observation:patient:code", "8302-2")]),
            SearchError::UnsupportedFeature {
                parameter: "_has:Observation:patient:code".to_owned(),
                feature: "reverse chaining"
            }
        );
    }

    #[test]
    fn unsupported_modifiers_rejected() {
        assert_eq!(
            parse_error("Observation", &[("code:below", "8302")]),
            SearchError::UnsupportedModifier {
                parameter: "code".to_owned(),
                modifier: "below".to_owned()
            }
        );
        assert!(matches!(
            parse_error("Patient", &[("name:not", "bene")]),
            SearchError::UnsupportedModifier { .. }
        ));
        assert!(matches!(
            parse_error("Patient", &[("birthdate:exact", "2012")]),
            SearchError::UnsupportedModifier { .. }
        ));
        assert!(matches!(
            parse_error("Observation", &[("patient:Group", "1")]),
            SearchError::UnsupportedModifier { .. }
        ));
    }

    #[test]
    fn bad_dates_are_errors() {
        let cases = [
            "2012-13",
            "2012-02-30",
            "ge",
            "gex2012",
            "2012-06-15T25:00",
            "2012-06-15T10:00:00+15:00",
            "yesterday",
            "ap",
            "２０１２",
        ];
        for value in cases {
            let error = parse_error("Observation", &[("date", value)]);
            assert!(
                matches!(&error, SearchError::InvalidDate { parameter, .. } if parameter == "date"),
                "{value}: {error:?}"
            );
            assert_eq!(error.to_string(), "invalid date in search parameter `date`");
        }
    }

    #[test]
    fn date_error_keeps_cause() {
        let error = parse_error("Patient", &[("birthdate", "1974-02-30")]);
        let source = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("invalid date: day out of range"));
    }

    #[test]
    fn invalid_values_name_parameter_only() {
        let cases: [(&str, &str, &str); 6] = [
            ("Patient", "name", ""),
            ("Patient", "name", "bene,"),
            ("Observation", "code", "8302-2,|"),
            ("Observation", "patient", "Group/Bénédicte"),
            ("Observation", "encounter:missing", "maybe"),
            ("Observation", "subject", "Patient/a b"),
        ];
        for (resource_type, name, value) in cases {
            let error = parse_error(resource_type, &[(name, value)]);
            let message = error.to_string();
            assert!(message.contains(&format!("`{name}`")), "{message}");
            assert!(
                value.is_empty() || !message.contains(value),
                "message repeats the value: {message}"
            );
        }
    }

    #[test]
    fn long_names_shortened_in_errors() {
        let long_name = format!("subject.{}", "name".repeat(40));
        let error = parse_error("Observation", &[(&long_name, "1")]);
        let SearchError::UnsupportedFeature { parameter, .. } = error else {
            panic!("expected an unsupported feature error");
        };
        assert_eq!(parameter.chars().count(), MAX_NAME_CHARS_IN_ERROR + 1);

        let long_modifier = format!("code:{}", "x".repeat(200));
        let error = parse_error("Observation", &[(&long_modifier, "1")]);
        let SearchError::UnsupportedModifier { modifier, .. } = error else {
            panic!("expected an unsupported modifier error");
        };
        assert_eq!(modifier.chars().count(), MAX_NAME_CHARS_IN_ERROR + 1);
    }

    #[test]
    fn count_parsed_and_bounded() {
        assert_eq!(parse("Patient", &[("_count", "20")]).count(), Some(20));
        assert_eq!(parse("Patient", &[("_count", "0")]).count(), Some(0));
        assert_eq!(
            parse("Patient", &[("_count", "100000")]).count(),
            Some(MAX_COUNT)
        );
        assert_eq!(parse("Patient", &[]).count(), None);
        assert!(matches!(
            parse_error("Patient", &[("_count", "-1")]),
            SearchError::InvalidValue { .. }
        ));
        assert!(matches!(
            parse_error("Patient", &[("_count", "ten")]),
            SearchError::InvalidValue { .. }
        ));
        assert_eq!(
            parse_error("Patient", &[("_count", "1"), ("_count", "2")]),
            SearchError::RepeatedParameter {
                parameter: "_count".to_owned()
            }
        );
    }

    #[test]
    fn summary_modes_parsed() {
        assert_eq!(
            parse("Observation", &[("_summary", "count")]).summary(),
            Some(Summary::Count)
        );
        assert_eq!(
            parse("Observation", &[("_summary", "data")]).summary(),
            Some(Summary::Data)
        );
        assert_eq!(parse("Observation", &[]).summary(), None);
        assert!(matches!(
            parse_error("Observation", &[("_summary", "all")]),
            SearchError::InvalidValue { .. }
        ));
    }

    #[test]
    fn sort_by_last_updated_both_directions() {
        let observation = synthetic_observation();
        let ascending = parse("Observation", &[("_sort", "_lastUpdated")]);
        assert!(ascending.has_sort());
        let early = sort_key(&ascending, &observation, "2024-01-01T00:00:00Z");
        let late = sort_key(&ascending, &observation, "2024-06-01T00:00:00Z");
        assert!(early < late);

        let descending = parse("Observation", &[("_sort", "-_lastUpdated")]);
        let early = sort_key(&descending, &observation, "2024-01-01T00:00:00Z");
        let late = sort_key(&descending, &observation, "2024-06-01T00:00:00Z");
        assert!(late < early);
    }

    #[test]
    fn sort_by_date_puts_missing_last() {
        let older = observation_with("effectiveDateTime", json!("2011-02-03"));
        let newer = observation_with("effectiveDateTime", json!("2013-04-05T06:07:08Z"));
        let undated = observation_with("effectiveString", json!("unknown"));

        let ascending = parse("Observation", &[("_sort", "date")]);
        let mut keys = [
            (sort_key(&ascending, &undated, LAST_UPDATED), "undated"),
            (sort_key(&ascending, &newer, LAST_UPDATED), "newer"),
            (sort_key(&ascending, &older, LAST_UPDATED), "older"),
        ];
        keys.sort_by(|left, right| left.0.cmp(&right.0));
        let order: Vec<&str> = keys.iter().map(|(_, label)| *label).collect();
        assert_eq!(order, ["older", "newer", "undated"]);

        let descending = parse("Observation", &[("_sort", "-date")]);
        let mut keys = [
            (sort_key(&descending, &older, LAST_UPDATED), "older"),
            (sort_key(&descending, &undated, LAST_UPDATED), "undated"),
            (sort_key(&descending, &newer, LAST_UPDATED), "newer"),
        ];
        keys.sort_by(|left, right| left.0.cmp(&right.0));
        let order: Vec<&str> = keys.iter().map(|(_, label)| *label).collect();
        assert_eq!(order, ["newer", "older", "undated"]);
    }

    #[test]
    fn sort_by_several_keys() {
        let first = observation_with("effectiveDateTime", json!("2012-01-01"));
        let query = parse("Observation", &[("_sort", "date,-_lastUpdated")]);
        let older_update = sort_key(&query, &first, "2024-01-01T00:00:00Z");
        let newer_update = sort_key(&query, &first, "2024-02-01T00:00:00Z");
        assert!(newer_update < older_update);
        assert_eq!(older_update, older_update.clone());
    }

    #[test]
    fn sort_by_name_folds_text() {
        let query = parse("Patient", &[("_sort", "family")]);
        let marche = sort_key(&query, &synthetic_patient(), LAST_UPDATED);
        let mut other = synthetic_patient();
        other["name"] = json!([{"family": "Dubois"}]);
        let dubois = sort_key(&query, &other, LAST_UPDATED);
        assert!(marche < dubois, "\"du marché\" sorts before \"dubois\"");
    }

    #[test]
    fn sort_rejects_unknown_parameter() {
        assert_eq!(
            parse_error("Patient", &[("_sort", "date")]),
            SearchError::UnsupportedSort {
                parameter: "date".to_owned()
            }
        );
        assert!(matches!(
            parse_error("Patient", &[("_sort", "-")]),
            SearchError::InvalidValue { .. }
        ));
    }

    #[test]
    fn patient_filter_finds_single_patient() {
        let cases = [
            ("Observation", "patient", "pat-1", Some("pat-1")),
            ("Observation", "subject", "Patient/pat-1", Some("pat-1")),
            ("Observation", "subject:Patient", "pat-1", Some("pat-1")),
            ("Observation", "subject", "pat-1", None),
            ("Observation", "subject", "Group/g-1", None),
            ("Observation", "patient", "pat-1,pat-2", None),
            ("Observation", "patient:missing", "false", None),
            ("Observation", "encounter", "enc-1", None),
            (
                "Immunization",
                "patient",
                "https://x.example/Patient/pat-9",
                Some("pat-9"),
            ),
            ("Patient", "_id", "pat-1", Some("pat-1")),
            ("Observation", "_id", "obs-1", None),
        ];
        for (resource_type, name, value, expected) in cases {
            let query = parse(resource_type, &[(name, value)]);
            assert_eq!(
                patient_filter(&query).as_deref(),
                expected,
                "{resource_type}?{name}={value}"
            );
        }
    }

    #[test]
    fn patient_filter_among_other_parameters() {
        let query = parse(
            "Observation",
            &[
                ("code", "8302-2"),
                ("patient", "Patient/pat-1"),
                ("date", "ge2012"),
            ],
        );
        assert_eq!(patient_filter(&query).as_deref(), Some("pat-1"));
        assert_eq!(
            patient_filter(&parse("Observation", &[("code", "8302-2")])),
            None
        );
    }

    #[test]
    fn identifier_helper_matches_system_and_value() {
        let practitioner = json!({
            "resourceType": "Practitioner",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999999999"}]
        });
        assert!(identifier_matches(
            &practitioner,
            Some("http://hl7.org/fhir/sid/us-npi"),
            "9999999999"
        ));
        assert!(identifier_matches(&practitioner, None, "9999999999"));
        assert!(!identifier_matches(&practitioner, Some(""), "9999999999"));
        assert!(!identifier_matches(
            &practitioner,
            Some("urn:other"),
            "9999999999"
        ));
        assert!(!identifier_matches(&practitioner, None, "999999999"));
        assert!(!identifier_matches(
            &json!({"resourceType": "Practitioner"}),
            None,
            "1"
        ));
    }

    #[test]
    fn conditional_reference_query_matches() {
        let organization = json!({
            "resourceType": "Organization",
            "identifier": [{"system": "https://github.com/synthetichealth/synthea",
                            "value": "org-0001"}],
            "name": "Example General Hospital"
        });
        let query = parse(
            "Organization",
            &[(
                "identifier",
                "https://github.com/synthetichealth/synthea|org-0001",
            )],
        );
        assert!(matches(&query, &organization, LAST_UPDATED));
        let other = parse(
            "Organization",
            &[(
                "identifier",
                "https://github.com/synthetichealth/synthea|org-0002",
            )],
        );
        assert!(!matches(&other, &organization, LAST_UPDATED));
    }

    #[test]
    fn debug_output_hides_values() {
        let query = parse(
            "Patient",
            &[("name", "Bénédicte"), ("birthdate", "1974-12-25")],
        );
        let printed = format!("{query:?}");
        assert!(printed.contains("name"), "{printed}");
        assert!(!printed.contains("Bénédicte"), "{printed}");
        assert!(!printed.contains("1974"), "{printed}");

        let key = sort_key(
            &parse("Patient", &[("_sort", "family")]),
            &synthetic_patient(),
            "",
        );
        assert!(!format!("{key:?}").contains("march"));
    }

    #[test]
    fn condition_parameters_match() {
        let condition = json!({
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"
            }]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
            "subject": {"reference": "Patient/pat-1"},
            "onsetPeriod": {"start": "2010-05-01"}
        });
        assert!(is_match(&condition, &[("clinical-status", "active")]));
        assert!(!is_match(&condition, &[("clinical-status", "resolved")]));
        assert!(is_match(
            &condition,
            &[("code", "http://snomed.info/sct|44054006")]
        ));
        assert!(is_match(&condition, &[("patient", "pat-1")]));
        assert!(is_match(&condition, &[("onset-date", "ge2010-05")]));
        assert!(!is_match(&condition, &[("onset-date", "lt2010-05")]));
    }

    #[test]
    fn encounter_parameters_match() {
        let encounter = json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003"}]}],
            "subject": {"reference": "Patient/pat-1"},
            "period": {"start": "2012-10-04T22:48:50+00:00", "end": "2012-10-04T23:03:50+00:00"}
        });
        assert!(is_match(&encounter, &[("class", "AMB")]));
        assert!(is_match(&encounter, &[("type", "185349003")]));
        assert!(is_match(&encounter, &[("status", "finished")]));
        assert!(is_match(&encounter, &[("date", "2012-10-04")]));
        assert!(!is_match(&encounter, &[("date", "2012-10-05")]));
        assert!(is_match(&encounter, &[("subject", "Patient/pat-1")]));
    }

    #[test]
    fn medication_and_immunization_parameters_match() {
        let request = json!({
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "562251"
            }]},
            "subject": {"reference": "Patient/pat-1"},
            "authoredOn": "2015-07-10T22:48:50+00:00"
        });
        assert!(is_match(&request, &[("code", "562251")]));
        assert!(is_match(&request, &[("intent", "order")]));
        assert!(is_match(&request, &[("status", "active")]));
        assert!(is_match(&request, &[("authoredon", "2015-07")]));
        assert!(is_match(&request, &[("patient", "pat-1")]));

        let immunization = json!({
            "resourceType": "Immunization",
            "status": "completed",
            "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
            "patient": {"reference": "Patient/pat-1"},
            "occurrenceDateTime": "2012-10-04T22:48:50+00:00"
        });
        assert!(is_match(
            &immunization,
            &[("vaccine-code", "http://hl7.org/fhir/sid/cvx|140")]
        ));
        assert!(is_match(&immunization, &[("patient", "Patient/pat-1")]));
        assert!(is_match(&immunization, &[("date", "2012")]));
        assert!(is_match(&immunization, &[("status", "completed")]));
    }

    #[test]
    fn report_document_and_allergy_parameters_match() {
        let report = json!({
            "resourceType": "DiagnosticReport",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                      "code": "LAB"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
            "subject": {"reference": "Patient/pat-1"},
            "effectivePeriod": {"start": "2015-10-08T22:48:50+00:00"}
        });
        assert!(is_match(
            &report,
            &[("category", "LAB"), ("code", "58410-2")]
        ));
        assert!(is_match(&report, &[("date", "ge2015-10-08")]));
        assert!(is_match(
            &report,
            &[("patient", "pat-1"), ("status", "final")]
        ));

        let document = json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "34117-2"}]},
            "subject": {"reference": "Patient/pat-1"},
            "date": "2016-01-01T10:00:00.000Z"
        });
        assert!(is_match(
            &document,
            &[("type", "34117-2"), ("status", "current")]
        ));
        assert!(is_match(
            &document,
            &[("date", "2016"), ("patient", "pat-1")]
        ));

        let allergy = json!({
            "resourceType": "AllergyIntolerance",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91935009"}]},
            "reaction": [{"substance": {"coding": [{"code": "256349002"}]}}],
            "patient": {"reference": "Patient/pat-1"}
        });
        assert!(is_match(&allergy, &[("code", "256349002")]));
        assert!(is_match(
            &allergy,
            &[("clinical-status", "active"), ("patient", "pat-1")]
        ));
    }

    #[test]
    fn procedure_parameters_match() {
        let procedure = json!({
            "resourceType": "Procedure",
            "status": "completed",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "117015009"}]},
            "subject": {"reference": "Patient/pat-1"},
            "performedPeriod": {"start": "2017-03-15T22:48:50+00:00",
                                "end": "2017-03-15T23:03:50+00:00"}
        });
        assert!(is_match(
            &procedure,
            &[("code", "117015009"), ("status", "completed")]
        ));
        assert!(is_match(
            &procedure,
            &[("date", "2017-03-15"), ("patient", "pat-1")]
        ));
        assert!(!is_match(&procedure, &[("date", "gt2017-03-15")]));
    }

    #[test]
    fn search_parameters_listed_for_type() {
        let names: Vec<&str> = search_parameters("Patient")
            .map(SearchParameter::name)
            .collect();
        for expected in [
            "_id",
            "_lastUpdated",
            "identifier",
            "name",
            "birthdate",
            "gender",
        ] {
            assert!(names.contains(&expected), "Patient lacks {expected}");
        }
        let birthdate = search_parameters("Patient")
            .find(|parameter| parameter.name() == "birthdate")
            .map(SearchParameter::param_type);
        assert_eq!(birthdate, Some(SearchParamType::Date));
    }
}
