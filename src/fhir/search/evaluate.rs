//! Evaluation of parsed search clauses against one resource held as JSON, and the sort values
//! that `_sort` orders by.
//!
//! Element values that do not parse (such as a malformed date in stored data) never match.

use std::cmp::Ordering;

use serde_json::Value;

use super::super::datetime::{self, DateRange};
use super::parameters::{Element, ElementType, SearchParameter};
use super::values::{
    fold_text, typed_tail, DateValue, Prefix, ReferenceValue, TextValue, TokenSystem, TokenValue,
};
use super::{Clause, Modifier, SearchValue};

/// Checks whether the resource satisfies one clause: any of its alternative values matches any
/// value of the parameter's elements, with `:not` and `:missing` applied.
pub(super) fn clause_matches(
    clause: &Clause,
    resource: &Value,
    last_updated: &str,
    now: Option<i128>,
) -> bool {
    let found = element_values(clause.parameter, resource, last_updated);

    if let Modifier::Missing = clause.modifier {
        let is_missing = found.is_empty();
        return clause
            .values
            .iter()
            .any(|value| matches!(value, SearchValue::Missing(wanted) if *wanted == is_missing));
    }

    let any_match = clause.values.iter().any(|search_value| {
        found.iter().any(|(element, element_type)| {
            value_matches(clause, search_value, element, *element_type, now)
        })
    });

    // `:not` selects resources where no value matches, including those without the element.
    if let Modifier::Not = clause.modifier {
        !any_match
    } else {
        any_match
    }
}

/// A value found in the resource, or the caller's `lastUpdated` for [`ElementType::LastUpdated`].
enum Found<'a> {
    Json(&'a Value),
    LastUpdated(&'a str),
}

fn element_values<'a>(
    parameter: &SearchParameter,
    resource: &'a Value,
    last_updated: &'a str,
) -> Vec<(Found<'a>, ElementType)> {
    let mut found = Vec::new();
    for element in parameter.elements {
        if element.element_type == ElementType::LastUpdated {
            found.push((Found::LastUpdated(last_updated), element.element_type));
            continue;
        }
        let mut json_values = Vec::new();
        collect_path(resource, element, &mut json_values);
        found.extend(
            json_values
                .into_iter()
                .map(|value| (Found::Json(value), element.element_type)),
        );
    }
    found
}

fn collect_path<'a>(resource: &'a Value, element: &Element, output: &mut Vec<&'a Value>) {
    let segments: Vec<&str> = element.path.split('.').collect();
    collect_segments(resource, &segments, output);
}

/// Walks `segments` from `node`, flattening arrays at every level and skipping nulls, which FHIR
/// JSON uses as placeholders in arrays of primitives.
pub(super) fn collect_segments<'a>(
    node: &'a Value,
    segments: &[&str],
    output: &mut Vec<&'a Value>,
) {
    match node {
        Value::Null => {}
        Value::Array(items) => {
            for item in items {
                collect_segments(item, segments, output);
            }
        }
        _ => match segments.split_first() {
            None => output.push(node),
            Some((first, rest)) => {
                if let Some(child) = node.get(*first) {
                    collect_segments(child, rest, output);
                }
            }
        },
    }
}

fn value_matches(
    clause: &Clause,
    search_value: &SearchValue,
    found: &Found<'_>,
    element_type: ElementType,
    now: Option<i128>,
) -> bool {
    let json = match found {
        Found::LastUpdated(instant) => {
            return match search_value {
                SearchValue::Date(date) => datetime::parse_fhir_date_time(instant)
                    .is_ok_and(|range| date_matches(date, &range, now)),
                _ => false,
            };
        }
        Found::Json(json) => *json,
    };

    match search_value {
        SearchValue::Text(text) => match clause.modifier {
            Modifier::Text => token_text_matches(text, json, element_type),
            _ => string_matches(clause.modifier, text, json, element_type),
        },
        SearchValue::Token(token) => match clause.modifier {
            Modifier::Identifier => json
                .get("identifier")
                .is_some_and(|identifier| coded_matches(token, identifier, "value")),
            _ => token_matches(token, json, element_type),
        },
        SearchValue::Date(date) => date_ranges(json, element_type)
            .iter()
            .any(|range| date_matches(date, range, now)),
        SearchValue::Reference(reference) => {
            reference_matches(reference, json, clause.parameter.targets)
        }
        SearchValue::Uri(uri) => json.as_str() == Some(uri.as_str()),
        SearchValue::Missing(_) => false,
    }
}

/// Lists the strings that a string parameter compares with: the element itself, or for a
/// HumanName each of family, given, prefix, suffix and text on its own.
fn searchable_strings(json: &Value, element_type: ElementType) -> Vec<&str> {
    match element_type {
        ElementType::HumanName => {
            let mut parts = Vec::new();
            for field in ["family", "given", "prefix", "suffix", "text"] {
                let mut values = Vec::new();
                collect_segments(json, &[field], &mut values);
                parts.extend(values.into_iter().filter_map(Value::as_str));
            }
            parts
        }
        _ => json.as_str().into_iter().collect(),
    }
}

fn string_matches(
    modifier: Modifier,
    search: &TextValue,
    json: &Value,
    element_type: ElementType,
) -> bool {
    searchable_strings(json, element_type)
        .into_iter()
        .any(|candidate| match modifier {
            Modifier::Exact => candidate == search.written,
            Modifier::Contains => fold_text(candidate).contains(&search.folded),
            _ => fold_text(candidate).starts_with(&search.folded),
        })
}

/// Compares `:text` with the text of a CodeableConcept, the display of its Codings, or the text
/// of an Identifier's type, using the default string rule.
fn token_text_matches(search: &TextValue, json: &Value, element_type: ElementType) -> bool {
    let mut texts = Vec::new();
    match element_type {
        ElementType::CodeableConcept => {
            collect_segments(json, &["text"], &mut texts);
            collect_segments(json, &["coding", "display"], &mut texts);
        }
        ElementType::Coding => collect_segments(json, &["display"], &mut texts),
        ElementType::Identifier => collect_segments(json, &["type", "text"], &mut texts),
        _ => {}
    }
    texts
        .into_iter()
        .filter_map(Value::as_str)
        .any(|text| fold_text(text).starts_with(&search.folded))
}

fn token_matches(token: &TokenValue, json: &Value, element_type: ElementType) -> bool {
    match element_type {
        ElementType::Code { system } => {
            let system_matches = match &token.system {
                TokenSystem::Any => true,
                TokenSystem::Absent => system.is_none(),
                // NOTE: a code whose system this table does not record matches any system.
                TokenSystem::Equals(wanted) => system.is_none_or(|known| known == wanted),
            };
            let code_matches = match &token.code {
                Some(code) => json.as_str() == Some(code.as_str()),
                None => true,
            };
            system_matches && code_matches
        }
        ElementType::Boolean => {
            let system_matches = matches!(token.system, TokenSystem::Any | TokenSystem::Absent);
            let code_matches = match (&token.code, json.as_bool()) {
                (Some(code), Some(flag)) => code.as_str() == if flag { "true" } else { "false" },
                _ => false,
            };
            system_matches && code_matches
        }
        ElementType::Coding => coded_matches(token, json, "code"),
        ElementType::CodeableConcept => {
            let mut codings = Vec::new();
            collect_segments(json, &["coding"], &mut codings);
            codings
                .into_iter()
                .any(|coding| coded_matches(token, coding, "code"))
        }
        ElementType::Identifier => coded_matches(token, json, "value"),
        _ => false,
    }
}

/// Compares a token with a Coding (`code_field` is `code`) or an Identifier (`value`).
pub(super) fn coded_matches(token: &TokenValue, json: &Value, code_field: &str) -> bool {
    let system = json.get("system").and_then(Value::as_str);
    let system_matches = match &token.system {
        TokenSystem::Any => true,
        TokenSystem::Absent => system.is_none(),
        TokenSystem::Equals(wanted) => system == Some(wanted.as_str()),
    };
    let code_matches = match &token.code {
        Some(code) => json.get(code_field).and_then(Value::as_str) == Some(code.as_str()),
        None => true,
    };
    system_matches && code_matches
}

/// Reads the ranges of a date element. A value that does not parse gives no range.
fn date_ranges(json: &Value, element_type: ElementType) -> Vec<DateRange> {
    match element_type {
        ElementType::Date => json
            .as_str()
            .and_then(|text| datetime::parse_fhir_date_time(text).ok())
            .into_iter()
            .collect(),
        ElementType::Period => {
            let start = json.get("start").and_then(Value::as_str);
            let end = json.get("end").and_then(Value::as_str);
            if start.is_none() && end.is_none() {
                return Vec::new();
            }
            datetime::parse_period(start, end)
                .ok()
                .into_iter()
                .collect()
        }
        ElementType::Timing => {
            let mut events = Vec::new();
            collect_segments(json, &["event"], &mut events);
            events
                .into_iter()
                .filter_map(Value::as_str)
                .filter_map(|text| datetime::parse_fhir_date_time(text).ok())
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Applies a date prefix as FHIR R4 defines it over the search range and the resource range.
pub(super) fn date_matches(search: &DateValue, target: &DateRange, now: Option<i128>) -> bool {
    let range = &search.range;
    let above_search = target.end > range.end;
    let below_search = target.start < range.start;
    match search.prefix {
        Prefix::Equal => range.contains(target),
        Prefix::NotEqual => !range.contains(target),
        Prefix::GreaterThan => above_search,
        Prefix::LessThan => below_search,
        Prefix::GreaterOrEqual => above_search || range.contains(target),
        Prefix::LessOrEqual => below_search || range.contains(target),
        Prefix::StartsAfter => target.start >= range.end,
        Prefix::EndsBefore => target.end <= range.start,
        Prefix::Approximately => approximate_range(range, now).overlaps(target),
    }
}

/// Widens a search range for `ap`. FHIR R4 suggests 10% of the gap between now and the date, so
/// with the current time known the range grows by that much on each side. It always grows by at
/// least 10% of its own width, which is all it grows when the caller gave no current time.
fn approximate_range(range: &DateRange, now: Option<i128>) -> DateRange {
    let width_margin = range.duration_nanos() / 10;
    let distance_margin = now.map_or(0, |now| {
        let distance = if now < range.start {
            range.start.saturating_sub(now)
        } else {
            now.saturating_sub(range.end)
        };
        distance / 10
    });
    let margin = width_margin.max(distance_margin);
    DateRange {
        start: range.start.saturating_sub(margin),
        end: range.end.saturating_add(margin),
    }
}

fn reference_matches(search: &ReferenceValue, json: &Value, targets: &[&str]) -> bool {
    let Some(stored) = json.get("reference").and_then(Value::as_str) else {
        return false;
    };
    match search {
        ReferenceValue::Literal(literal) => stored == literal,
        ReferenceValue::Typed { resource_type, id } => {
            if stored.starts_with("urn:") || stored.starts_with('#') {
                return false;
            }
            let path = stored.split_once("://").map_or(stored, |(_, path)| path);
            let Some((stored_type, stored_id)) = typed_tail(path) else {
                return false;
            };
            let type_matches = match resource_type {
                Some(wanted) => stored_type == wanted,
                None => targets.is_empty() || targets.contains(&stored_type),
            };
            // NOTE: the base URL of an absolute reference is not compared with this server's,
            // so `https://elsewhere/fhir/Patient/1` matches `Patient/1`.
            type_matches && stored_id == id
        }
    }
}

/// Value that `_sort` orders by for one parameter. One parameter always gives values of one
/// kind, so an instant is never compared with text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum SortValue {
    Instant(i128),
    Text(String),
}

/// Computes the value `_sort` orders a resource by. A resource with several values sorts by the
/// lowest in ascending order and by the highest in descending order. Dates compare by the start
/// (ascending) or end (descending) of their range, and text after case and accent folding.
pub(super) fn sort_value(
    parameter: &SearchParameter,
    resource: &Value,
    last_updated: &str,
    descending: bool,
) -> Option<SortValue> {
    let mut candidates = Vec::new();
    for (found, element_type) in element_values(parameter, resource, last_updated) {
        match found {
            Found::LastUpdated(instant) => {
                if let Ok(range) = datetime::parse_fhir_date_time(instant) {
                    candidates.push(date_sort_value(&range, descending));
                }
            }
            Found::Json(json) => {
                collect_sort_candidates(json, element_type, descending, &mut candidates);
            }
        }
    }
    let ordering = if descending {
        Ordering::Greater
    } else {
        Ordering::Less
    };
    candidates.into_iter().reduce(|best, next| {
        if next.cmp(&best) == ordering {
            next
        } else {
            best
        }
    })
}

fn date_sort_value(range: &DateRange, descending: bool) -> SortValue {
    if descending {
        SortValue::Instant(range.end)
    } else {
        SortValue::Instant(range.start)
    }
}

fn collect_sort_candidates(
    json: &Value,
    element_type: ElementType,
    descending: bool,
    output: &mut Vec<SortValue>,
) {
    let mut texts = Vec::new();
    match element_type {
        ElementType::Date | ElementType::Period | ElementType::Timing => {
            for range in date_ranges(json, element_type) {
                output.push(date_sort_value(&range, descending));
            }
        }
        ElementType::String | ElementType::HumanName => {
            texts = searchable_strings(json, element_type);
        }
        ElementType::Code { .. } | ElementType::Uri => texts.extend(json.as_str()),
        ElementType::Boolean => {
            if let Some(flag) = json.as_bool() {
                output.push(SortValue::Text(flag.to_string()));
            }
        }
        ElementType::Coding => texts.extend(json.get("code").and_then(Value::as_str)),
        ElementType::CodeableConcept => {
            let mut codes = Vec::new();
            collect_segments(json, &["coding", "code"], &mut codes);
            texts.extend(codes.into_iter().filter_map(Value::as_str));
        }
        ElementType::Identifier => texts.extend(json.get("value").and_then(Value::as_str)),
        ElementType::Reference => texts.extend(json.get("reference").and_then(Value::as_str)),
        ElementType::LastUpdated => {}
    }
    output.extend(
        texts
            .into_iter()
            .map(|text| SortValue::Text(fold_text(text))),
    );
}

#[cfg(test)]
mod tests {
    use super::super::super::datetime::parse_fhir_date_time;
    use super::super::values::parse_date;
    use super::*;

    fn date_match(search: &str, target: &str) -> bool {
        let search = parse_date(search).unwrap();
        let target = parse_fhir_date_time(target).unwrap();
        date_matches(&search, &target, None)
    }

    #[test]
    fn equal_requires_containment() {
        assert!(date_match("eq2012-06", "2012-06-15"));
        assert!(date_match("2012-06-15", "2012-06-15T10:00:00Z"));
        assert!(!date_match("eq2012-06-15", "2012-06"));
        assert!(!date_match("eq2012-06", "2012-07-01"));
    }

    #[test]
    fn not_equal_negates_containment() {
        assert!(date_match("ne2012-06", "2012-07-01"));
        assert!(date_match("ne2012-06-15", "2012-06"));
        assert!(!date_match("ne2012-06", "2012-06-15"));
    }

    #[test]
    fn greater_and_less_compare_range_edges() {
        assert!(date_match("gt2012-06-15", "2012-06-16"));
        assert!(date_match("gt2012-06-15", "2012-06"));
        assert!(!date_match("gt2012-06-15", "2012-06-15T23:00:00Z"));
        assert!(date_match("lt2012-06-15", "2012-06-14"));
        assert!(date_match("lt2012-06-15", "2012-06"));
        assert!(!date_match("lt2012-06-15", "2012-06-15T01:00:00Z"));
    }

    #[test]
    fn greater_or_equal_includes_contained() {
        assert!(date_match("ge2012-06", "2012-06-15"));
        assert!(date_match("ge2012-06", "2012-07-01"));
        assert!(!date_match("ge2012-06", "2012-05-31"));
        assert!(date_match("le2012-06", "2012-06-15"));
        assert!(date_match("le2012-06", "2012-05-31"));
        assert!(!date_match("le2012-06", "2012-07-01"));
    }

    #[test]
    fn starts_after_and_ends_before() {
        assert!(date_match("sa2012-06-15", "2012-06-16"));
        assert!(!date_match("sa2012-06-15", "2012-06-15T23:59:59Z"));
        assert!(!date_match("sa2012-06-15", "2012-06"));
        assert!(date_match("eb2012-06-15", "2012-06-14T23:59:59Z"));
        assert!(!date_match("eb2012-06-15", "2012-06-15T00:00:00Z"));
        assert!(!date_match("eb2012-06-15", "2012-06"));
    }

    #[test]
    fn approximately_widens_by_width() {
        assert!(date_match("ap2012", "2012-06-15"));
        assert!(date_match("ap2012", "2013-01-20"));
        assert!(!date_match("ap2012", "2013-03-01"));
    }

    #[test]
    fn approximately_widens_by_distance_to_now() {
        let search = parse_date("ap2000-01-01").unwrap();
        let target = parse_fhir_date_time("2000-06-01").unwrap();
        let now = parse_fhir_date_time("2020-01-01T00:00:00Z").unwrap().start;
        assert!(date_matches(&search, &target, Some(now)));
        assert!(!date_matches(&search, &target, None));
    }

    #[test]
    fn collect_flattens_arrays_and_skips_nulls() {
        let resource: Value = serde_json::json!({
            "name": [
                {"given": ["Peter", null, "James"]},
                {"given": ["Jim"]},
                null
            ]
        });
        let mut values = Vec::new();
        collect_segments(&resource, &["name", "given"], &mut values);
        let texts: Vec<&str> = values.iter().filter_map(|value| value.as_str()).collect();
        assert_eq!(texts, vec!["Peter", "James", "Jim"]);
    }
}
