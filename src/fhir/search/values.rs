//! Parsing of search values: the escaped comma list, tokens, date prefixes and references, and
//! the case and accent folding that string search compares with.
//!
//! Errors are `&'static str` reasons, which the caller wraps with the parameter name, because a
//! search value can be health data and never goes into a message.

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use super::super::datetime::{self, DateRange, DateTimeError};

/// Comparison prefix of a date search value. FHIR R4 defines them over ranges: the search value
/// and the resource value each cover the range that their precision leaves open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prefix {
    /// The search range contains the resource range.
    Equal,
    /// The search range does not contain the resource range.
    NotEqual,
    /// The resource range reaches past the end of the search range.
    GreaterThan,
    /// The resource range starts before the search range.
    LessThan,
    /// Either `GreaterThan` or `Equal`.
    GreaterOrEqual,
    /// Either `LessThan` or `Equal`.
    LessOrEqual,
    /// The resource range starts at or after the end of the search range.
    StartsAfter,
    /// The resource range ends at or before the start of the search range.
    EndsBefore,
    /// The resource range overlaps the search range widened by about 10%.
    Approximately,
}

/// Date search value: a prefix and the range that the written date covers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct DateValue {
    pub(super) prefix: Prefix,
    pub(super) range: DateRange,
}

/// String search value, kept as written for `:exact` and folded for the other modes.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct TextValue {
    pub(super) written: String,
    pub(super) folded: String,
}

impl TextValue {
    pub(super) fn new(written: String) -> TextValue {
        let folded = fold_text(&written);
        TextValue { written, folded }
    }
}

/// Requirement of a token search value on the system of a Coding or Identifier.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum TokenSystem {
    /// `code`: any system, or none.
    Any,
    /// `|code`: the element has no system.
    Absent,
    /// `system|code` or `system|`: the element has exactly this system.
    Equals(String),
}

/// Token search value. `code` is `None` for `system|`, which matches any code in the system.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct TokenValue {
    pub(super) system: TokenSystem,
    pub(super) code: Option<String>,
}

/// Reference search value.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum ReferenceValue {
    /// `Type/id`, a URL ending in `Type/id`, or a bare id. `resource_type` is `None` for a bare id
    /// when the parameter may point to several types, and then any of them matches.
    Typed {
        resource_type: Option<String>,
        id: String,
    },
    /// Any other reference, such as `urn:uuid:...`, compared as a whole string.
    Literal(String),
}

/// Splits a parameter value at the commas that separate alternative values, keeping the
/// backslash escapes inside each item so that a token can still be split at its `|`.
pub(super) fn split_alternatives(value: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut item_start = 0;
    let mut escaped = false;
    for (index, character) in value.char_indices() {
        if escaped {
            escaped = false;
        } else if character == '\\' {
            escaped = true;
        } else if character == ',' {
            items.push(&value[item_start..index]);
            item_start = index + 1;
        }
    }
    items.push(&value[item_start..]);
    items
}

/// Removes the search escapes `\,`, `\|`, `\$` and `\\`. Any other backslash stays as written.
pub(super) fn unescape(item: &str) -> String {
    let mut text = String::with_capacity(item.len());
    let mut characters = item.chars().peekable();
    while let Some(character) = characters.next() {
        let escapes_next = matches!(characters.peek(), Some(',' | '|' | '$' | '\\'));
        if character == '\\' && escapes_next {
            if let Some(escaped) = characters.next() {
                text.push(escaped);
            }
        } else {
            text.push(character);
        }
    }
    text
}

/// Folds text for the default and `:contains` string search: lowercase, then compatibility
/// decomposition (NFKD) with the combining marks dropped, so `Bénédicte` becomes `benedicte`.
/// Lowercasing comes first because some lowercase forms, such as that of `İ`, add a mark.
pub(super) fn fold_text(text: &str) -> String {
    text.to_lowercase()
        .nfkd()
        .filter(|character| !is_combining_mark(*character))
        .collect()
}

/// Parses one token item (still escaped) as `code`, `system|code`, `|code` or `system|`.
pub(super) fn parse_token(item: &str) -> Result<TokenValue, &'static str> {
    let Some(separator) = find_unescaped_bar(item) else {
        return Ok(TokenValue {
            system: TokenSystem::Any,
            code: Some(unescape(item)),
        });
    };

    let system = &item[..separator];
    let code = &item[separator + 1..];
    if system.is_empty() && code.is_empty() {
        return Err("a token needs a system or a code around '|'");
    }
    let system = if system.is_empty() {
        TokenSystem::Absent
    } else {
        TokenSystem::Equals(unescape(system))
    };
    let code = if code.is_empty() {
        None
    } else {
        Some(unescape(code))
    };
    Ok(TokenValue { system, code })
}

fn find_unescaped_bar(item: &str) -> Option<usize> {
    let mut escaped = false;
    for (index, character) in item.char_indices() {
        if escaped {
            escaped = false;
        } else if character == '\\' {
            escaped = true;
        } else if character == '|' {
            return Some(index);
        }
    }
    None
}

/// Parses a date search item: an optional two-letter prefix, then a date.
pub(super) fn parse_date(item: &str) -> Result<DateValue, DateTimeError> {
    let (prefix, date) = split_prefix(item);
    let range = datetime::parse_search_date(date)?;
    Ok(DateValue { prefix, range })
}

fn split_prefix(item: &str) -> (Prefix, &str) {
    let prefix = match item.get(..2) {
        Some("eq") => Prefix::Equal,
        Some("ne") => Prefix::NotEqual,
        Some("gt") => Prefix::GreaterThan,
        Some("lt") => Prefix::LessThan,
        Some("ge") => Prefix::GreaterOrEqual,
        Some("le") => Prefix::LessOrEqual,
        Some("sa") => Prefix::StartsAfter,
        Some("eb") => Prefix::EndsBefore,
        Some("ap") => Prefix::Approximately,
        _ => return (Prefix::Equal, item),
    };
    (prefix, &item[2..])
}

/// Parses a reference search item.
///
/// `type_modifier` is the type named by a `:Type` modifier, and `targets` the types that the
/// parameter may point to (empty for any). A bare id takes the modifier's type, or the single
/// target type. The version of a versioned reference (`Patient/1/_history/2`) is dropped, so any
/// version of the resource matches.
pub(super) fn parse_reference(
    item: &str,
    type_modifier: Option<&str>,
    targets: &[&str],
) -> Result<ReferenceValue, &'static str> {
    let text = unescape(item);
    let value = if text.starts_with("urn:") || text.starts_with('#') {
        ReferenceValue::Literal(text)
    } else if let Some((_, path)) = text.split_once("://") {
        match typed_tail(path) {
            Some((resource_type, id)) => ReferenceValue::Typed {
                resource_type: Some(resource_type.to_owned()),
                id: id.to_owned(),
            },
            None => ReferenceValue::Literal(text),
        }
    } else if text.contains('/') {
        let Some((resource_type, id)) = typed_tail(&text) else {
            return Err("expected a reference of the form Type/id");
        };
        let is_whole_value = text == format!("{resource_type}/{id}")
            || text.starts_with(&format!("{resource_type}/{id}/_history/"));
        if !is_whole_value {
            return Err("expected a reference of the form Type/id");
        }
        ReferenceValue::Typed {
            resource_type: Some(resource_type.to_owned()),
            id: id.to_owned(),
        }
    } else {
        if !is_resource_id(&text) {
            return Err("expected a resource id of letters, digits, '-' and '.'");
        }
        let resource_type = match (type_modifier, targets) {
            (Some(modifier), _) => Some(modifier.to_owned()),
            (None, [single]) => Some((*single).to_owned()),
            _ => None,
        };
        ReferenceValue::Typed {
            resource_type,
            id: text,
        }
    };

    if let ReferenceValue::Typed {
        resource_type: Some(resource_type),
        ..
    } = &value
    {
        if type_modifier.is_some_and(|modifier| modifier != resource_type) {
            return Err("the reference type differs from the type modifier");
        }
        if !targets.is_empty() && !targets.contains(&resource_type.as_str()) {
            return Err("the reference type is not a target of this parameter");
        }
    }
    Ok(value)
}

/// Reads `Type/id` from the end of a reference path, skipping a trailing `_history/version`.
pub(super) fn typed_tail(path: &str) -> Option<(&str, &str)> {
    let mut segments: Vec<&str> = path.split('/').collect();
    if segments.len() >= 4 && segments[segments.len() - 2] == "_history" {
        segments.truncate(segments.len() - 2);
    }
    let [.., resource_type, id] = segments.as_slice() else {
        return None;
    };
    if is_resource_type(resource_type) && is_resource_id(id) {
        Some((resource_type, id))
    } else {
        None
    }
}

/// Checks the shape of a FHIR resource type name: an ASCII capital, then letters and digits.
pub(super) fn is_resource_type(text: &str) -> bool {
    let mut characters = text.chars();
    let starts_with_capital = characters
        .next()
        .is_some_and(|first| first.is_ascii_uppercase());
    starts_with_capital && characters.all(|character| character.is_ascii_alphanumeric())
}

/// Checks a FHIR logical id: 1 to 64 ASCII letters, digits, `-` and `.`.
pub(super) fn is_resource_id(text: &str) -> bool {
    let allowed =
        |character: char| character.is_ascii_alphanumeric() || matches!(character, '-' | '.');
    (1..=64).contains(&text.len()) && text.chars().all(allowed)
}

/// Parses the value of a `:missing` modifier.
pub(super) fn parse_missing(item: &str) -> Result<bool, &'static str> {
    match item {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_split_on_unescaped_commas() {
        assert_eq!(split_alternatives("a,b,c"), vec!["a", "b", "c"]);
        assert_eq!(split_alternatives(r"a\,b,c"), vec![r"a\,b", "c"]);
        assert_eq!(split_alternatives(r"a\\,b"), vec![r"a\\", "b"]);
        assert_eq!(split_alternatives("a,"), vec!["a", ""]);
        assert_eq!(split_alternatives("single"), vec!["single"]);
    }

    #[test]
    fn unescape_removes_search_escapes() {
        assert_eq!(unescape(r"a\,b"), "a,b");
        assert_eq!(unescape(r"a\|b"), "a|b");
        assert_eq!(unescape(r"a\$b"), "a$b");
        assert_eq!(unescape(r"a\\b"), r"a\b");
        assert_eq!(unescape(r"a\nb"), r"a\nb");
        assert_eq!(unescape("trailing\\"), "trailing\\");
    }

    #[test]
    fn fold_drops_case_and_accents() {
        assert_eq!(fold_text("Bénédicte"), "benedicte");
        assert_eq!(fold_text("MARCHÉ"), "marche");
        assert_eq!(fold_text("Ångström"), "angstrom");
        assert_eq!(fold_text("ﬁnn"), "finn");
        assert_eq!(fold_text("İpek"), "ipek");
        assert_eq!(fold_text("Zoë"), "zoe");
    }

    #[test]
    fn token_forms_parse() {
        let code_only = parse_token("8302-2").unwrap();
        assert!(code_only.system == TokenSystem::Any);
        assert_eq!(code_only.code.as_deref(), Some("8302-2"));

        let both = parse_token("http://loinc.org|8302-2").unwrap();
        assert!(both.system == TokenSystem::Equals("http://loinc.org".to_owned()));
        assert_eq!(both.code.as_deref(), Some("8302-2"));

        let no_system = parse_token("|8302-2").unwrap();
        assert!(no_system.system == TokenSystem::Absent);

        let system_only = parse_token("http://loinc.org|").unwrap();
        assert_eq!(system_only.code, None);

        let escaped = parse_token(r"urn:x|a\|b").unwrap();
        assert_eq!(escaped.code.as_deref(), Some("a|b"));

        assert!(parse_token("|").is_err());
    }

    #[test]
    fn date_prefixes_parse() {
        let cases = [
            ("2012", Prefix::Equal),
            ("eq2012", Prefix::Equal),
            ("ne2012", Prefix::NotEqual),
            ("gt2012", Prefix::GreaterThan),
            ("lt2012", Prefix::LessThan),
            ("ge2012", Prefix::GreaterOrEqual),
            ("le2012", Prefix::LessOrEqual),
            ("sa2012", Prefix::StartsAfter),
            ("eb2012", Prefix::EndsBefore),
            ("ap2012", Prefix::Approximately),
        ];
        for (item, prefix) in cases {
            assert_eq!(parse_date(item).unwrap().prefix, prefix, "{item}");
        }
        assert!(parse_date("xx2012").is_err());
        assert!(parse_date("ge").is_err());
        assert!(parse_date("é").is_err());
    }

    #[test]
    fn reference_forms_parse() {
        let typed = parse_reference("Patient/123", None, &["Patient", "Group"]).unwrap();
        assert!(
            typed
                == ReferenceValue::Typed {
                    resource_type: Some("Patient".to_owned()),
                    id: "123".to_owned()
                }
        );

        let bare_single = parse_reference("123", None, &["Patient"]).unwrap();
        assert!(
            bare_single
                == ReferenceValue::Typed {
                    resource_type: Some("Patient".to_owned()),
                    id: "123".to_owned()
                }
        );

        let bare_ambiguous = parse_reference("123", None, &["Patient", "Group"]).unwrap();
        assert!(
            bare_ambiguous
                == ReferenceValue::Typed {
                    resource_type: None,
                    id: "123".to_owned()
                }
        );

        let url = parse_reference("https://example.org/fhir/Patient/123", None, &[]).unwrap();
        assert!(
            url == ReferenceValue::Typed {
                resource_type: Some("Patient".to_owned()),
                id: "123".to_owned()
            }
        );

        let versioned = parse_reference("Patient/123/_history/4", None, &[]).unwrap();
        assert!(
            versioned
                == ReferenceValue::Typed {
                    resource_type: Some("Patient".to_owned()),
                    id: "123".to_owned()
                }
        );

        let urn = parse_reference("urn:uuid:abc", None, &[]).unwrap();
        assert!(urn == ReferenceValue::Literal("urn:uuid:abc".to_owned()));
    }

    #[test]
    fn reference_type_conflicts_rejected() {
        assert!(parse_reference("Group/1", None, &["Patient"]).is_err());
        assert!(parse_reference("Group/1", Some("Patient"), &["Patient", "Group"]).is_err());
        assert!(parse_reference("Patient/1/extra", None, &[]).is_err());
        assert!(parse_reference("patient/1", None, &[]).is_err());
        assert!(parse_reference("bad id", None, &["Patient"]).is_err());
        assert!(parse_reference(&"1".repeat(65), None, &["Patient"]).is_err());
    }

    #[test]
    fn resource_type_shape_checked() {
        assert!(is_resource_type("Patient"));
        assert!(is_resource_type("AllergyIntolerance"));
        assert!(!is_resource_type("patient"));
        assert!(!is_resource_type(""));
        assert!(!is_resource_type("Pat-ient"));
    }

    #[test]
    fn missing_values_parse() {
        assert_eq!(parse_missing("true"), Ok(true));
        assert_eq!(parse_missing("false"), Ok(false));
        assert!(parse_missing("yes").is_err());
    }
}
