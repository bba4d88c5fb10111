//! Structural validation of FHIR R4 JSON resources against the embedded R4 tables: element names,
//! JSON shapes, cardinality, primitive formats, required codes, contained resources, local
//! references and the Bundle invariants. [`validate_resource`] is the entry point, and its
//! diagnostics name the element and the expected form but never quote an input value.

use std::collections::HashSet;
use std::fmt;

use serde_json::{Map, Value};

use super::definitions::{self, ElementDefinition, MaxOccurs, TypeDefinition, RESOURCE_TYPE};

/// Maximum number of issues collected before validation stops, so a huge invalid resource costs
/// bounded work. One informational issue is appended when the limit is reached.
pub const MAX_ISSUES: usize = 100;

/// Maximum nesting of resources and complex elements. Real R4 content (deep Questionnaire items,
/// nested extensions, a document Bundle inside a Bundle) stays well below it, and the bound keeps
/// the recursive walk far from the end of a thread's stack.
pub const MAX_DEPTH: usize = 64;

/// Severity of a validation issue, as in FHIR's `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The content could not be processed at all.
    Fatal,
    /// The content is invalid.
    Error,
    /// The content is valid but questionable.
    Warning,
    /// A note about the validation itself.
    Information,
}

impl Severity {
    /// Returns the FHIR `IssueSeverity` code.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// Type of a validation issue, from FHIR's `IssueType` codes (`OperationOutcome.issue.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    /// Content invalid against the specification or a profile.
    Invalid,
    /// A structural issue: unknown element, wrong JSON shape, empty or null content.
    Structure,
    /// A required element is missing.
    Required,
    /// An element value is invalid for its datatype.
    Value,
    /// A content invariant (a rule across elements) is violated.
    Invariant,
    /// An authentication or authorization problem.
    Security,
    /// The client needs to log in.
    Login,
    /// The user or system was not able to be authenticated.
    Unknown,
    /// The session or credentials expired.
    Expired,
    /// The user is not allowed to perform the operation.
    Forbidden,
    /// Some information was not returned for policy reasons.
    Suppressed,
    /// The processing of the content failed.
    Processing,
    /// The interaction, operation, resource or profile is not supported.
    NotSupported,
    /// An attempt to create a duplicate record.
    Duplicate,
    /// Several matching records were found where one was expected.
    MultipleMatches,
    /// The reference could not be resolved.
    NotFound,
    /// The resource was deleted.
    Deleted,
    /// Content too long or nested too deep.
    TooLong,
    /// A code is not in the value set the element binds.
    CodeInvalid,
    /// An extension is not recognized or is invalid.
    Extension,
    /// The operation would take too many resources.
    TooCostly,
    /// A business rule is violated.
    BusinessRule,
    /// An edit conflict with another client.
    Conflict,
    /// A transient processing failure.
    Transient,
    /// A resource lock prevented the operation.
    LockError,
    /// The server has no persistent store.
    NoStore,
    /// An unexpected internal error.
    Exception,
    /// An internal timeout.
    Timeout,
    /// Not all data sources were available.
    Incomplete,
    /// The system is throttling the client.
    Throttled,
    /// A message that is not an error.
    Informational,
}

impl IssueCode {
    /// Returns the FHIR `IssueType` code (`structure`, `code-invalid`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::Invariant => "invariant",
            IssueCode::Security => "security",
            IssueCode::Login => "login",
            IssueCode::Unknown => "unknown",
            IssueCode::Expired => "expired",
            IssueCode::Forbidden => "forbidden",
            IssueCode::Suppressed => "suppressed",
            IssueCode::Processing => "processing",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Duplicate => "duplicate",
            IssueCode::MultipleMatches => "multiple-matches",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::TooLong => "too-long",
            IssueCode::CodeInvalid => "code-invalid",
            IssueCode::Extension => "extension",
            IssueCode::TooCostly => "too-costly",
            IssueCode::BusinessRule => "business-rule",
            IssueCode::Conflict => "conflict",
            IssueCode::Transient => "transient",
            IssueCode::LockError => "lock-error",
            IssueCode::NoStore => "no-store",
            IssueCode::Exception => "exception",
            IssueCode::Timeout => "timeout",
            IssueCode::Incomplete => "incomplete",
            IssueCode::Throttled => "throttled",
            IssueCode::Informational => "informational",
        }
    }
}

/// One problem found in a resource, ready to become an `OperationOutcome.issue`.
///
/// The diagnostics never contain input values, because values can be health data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationIssue {
    /// Seriousness of the issue.
    pub severity: Severity,
    /// FHIR issue type.
    pub code: IssueCode,
    /// FHIRPath of the element at fault, such as `Patient.name[0].given[1]`.
    pub expression: String,
    /// Plain-language description of the problem, without input values.
    pub diagnostics: String,
}

impl fmt::Display for ValidationIssue {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{} {} at {}: {}",
            self.severity.as_str(),
            self.code.as_str(),
            self.expression,
            self.diagnostics
        )
    }
}

/// Validates one FHIR R4 resource in JSON form, including any contained resources and, for a
/// Bundle or Parameters, the resources inside it.
///
/// # Errors
///
/// Returns every issue found, up to [`MAX_ISSUES`], when the resource is not valid R4.
///
/// # Panics
///
/// Panics on first use if the embedded R4 tables do not parse, which the unit tests rule out.
pub fn validate_resource(resource: &Value) -> Result<(), Vec<ValidationIssue>> {
    let mut validator = Validator::default();
    validator.check_resource(resource, None, ResourceRole::Root, 0);
    if validator.issues.is_empty() {
        Ok(())
    } else {
        Err(validator.issues)
    }
}

// Walk state

/// Position of a resource in the content being validated.
#[derive(Clone, Copy)]
enum ResourceRole {
    /// The validated resource itself, or one inside a Bundle entry or a Parameters parameter:
    /// it owns the scope that its `#id` references resolve in.
    Root,
    /// A resource in `contained`, at this index of the enclosing scope.
    Contained(usize),
}

/// A `#id` reference, or a canonical or uri value that starts with `#`.
struct LocalReference {
    /// Text after `#`, empty for a reference to the containing resource.
    target: String,
    expression: String,
    /// Index of the contained resource the reference sits in, if any.
    from_contained: Option<usize>,
    /// Whether the value is a `Reference.reference` (as opposed to a canonical or uri).
    is_reference: bool,
}

struct ContainedEntry {
    id: Option<String>,
    expression: String,
}

/// Contained resources and local references of one root resource.
#[derive(Default)]
struct LocalScope {
    contained: Vec<ContainedEntry>,
    references: Vec<LocalReference>,
    current_contained: Option<usize>,
}

#[derive(Default)]
struct Validator {
    issues: Vec<ValidationIssue>,
    stopped: bool,
    scopes: Vec<LocalScope>,
}

impl Validator {
    fn report(
        &mut self,
        code: IssueCode,
        expression: impl Into<String>,
        diagnostics: impl Into<String>,
    ) {
        if self.stopped {
            return;
        }
        if self.issues.len() == MAX_ISSUES {
            self.stopped = true;
            self.issues.push(ValidationIssue {
                severity: Severity::Information,
                code: IssueCode::Informational,
                expression: String::new(),
                diagnostics: format!("validation stopped after {MAX_ISSUES} issues"),
            });
            return;
        }
        self.issues.push(ValidationIssue {
            severity: Severity::Error,
            code,
            expression: expression.into(),
            diagnostics: diagnostics.into(),
        });
    }

    // Resources

    /// Checks a resource. `expression` is `None` for the top-level resource, whose FHIRPath
    /// starts with its type name.
    fn check_resource(
        &mut self,
        value: &Value,
        expression: Option<&str>,
        role: ResourceRole,
        depth: usize,
    ) {
        let fallback = expression.unwrap_or("Resource");
        if depth > MAX_DEPTH {
            self.report(
                IssueCode::TooLong,
                fallback,
                format!("nesting exceeds {MAX_DEPTH} levels"),
            );
            return;
        }
        let Some(object) = value.as_object() else {
            self.report(
                IssueCode::Structure,
                fallback,
                "expected a resource as a JSON object",
            );
            return;
        };
        let resource_type = match object.get("resourceType") {
            Some(Value::String(name)) if definitions::is_resource_type(name) => name.as_str(),
            Some(Value::String(_)) => {
                self.report(
                    IssueCode::Value,
                    format!("{fallback}.resourceType"),
                    "resourceType is not an R4 resource type",
                );
                return;
            }
            Some(_) => {
                self.report(
                    IssueCode::Structure,
                    format!("{fallback}.resourceType"),
                    "expected resourceType to be a JSON string",
                );
                return;
            }
            None => {
                self.report(IssueCode::Required, fallback, "missing resourceType");
                return;
            }
        };
        let Some(definition) = definitions::type_definition(resource_type) else {
            self.report(
                IssueCode::Exception,
                fallback,
                "no structure definition for resource type",
            );
            return;
        };
        let path = expression.unwrap_or(resource_type).to_owned();

        let previous_contained = match role {
            ResourceRole::Root => {
                self.scopes.push(LocalScope::default());
                None
            }
            ResourceRole::Contained(index) => self.scopes.last_mut().map(|scope| {
                let previous = scope.current_contained;
                scope.current_contained = Some(index);
                previous
            }),
        };

        self.check_object(definition, object, &path, depth, true);

        match role {
            ResourceRole::Root => {
                if let Some(scope) = self.scopes.pop() {
                    self.check_local_references(&scope);
                }
            }
            ResourceRole::Contained(_) => {
                if let Some(scope) = self.scopes.last_mut() {
                    scope.current_contained = previous_contained.flatten();
                }
                self.check_contained_rules(object, &path);
            }
        }
        if resource_type == "Bundle" {
            self.check_bundle(object, &path);
        }
    }

    /// Checks the rules for a resource inside `contained` (dom-2, dom-4 and dom-5 of R4, and
    /// the local id that references need).
    fn check_contained_rules(&mut self, object: &Map<String, Value>, path: &str) {
        if !object.contains_key("id") {
            self.report(
                IssueCode::Required,
                format!("{path}.id"),
                "contained resource has no id",
            );
        }
        if object.contains_key("contained") {
            self.report(
                IssueCode::Invariant,
                format!("{path}.contained"),
                "a contained resource must not contain resources (dom-2)",
            );
        }
        if let Some(Value::Object(meta)) = object.get("meta") {
            if meta.contains_key("versionId") || meta.contains_key("lastUpdated") {
                self.report(
                    IssueCode::Invariant,
                    format!("{path}.meta"),
                    "a contained resource must not have meta.versionId or meta.lastUpdated (dom-4)",
                );
            }
            if meta.contains_key("security") {
                self.report(
                    IssueCode::Invariant,
                    format!("{path}.meta.security"),
                    "a contained resource must not have security labels (dom-5)",
                );
            }
        }
    }

    /// Checks that every `#id` reference matches a contained resource (ref-1) and that every
    /// contained resource is referenced (dom-3).
    fn check_local_references(&mut self, scope: &LocalScope) {
        let mut seen_ids = HashSet::new();
        for entry in &scope.contained {
            if let Some(id) = &entry.id {
                if !seen_ids.insert(id.as_str()) {
                    self.report(
                        IssueCode::Invariant,
                        format!("{}.id", entry.expression),
                        "duplicate contained resource id",
                    );
                }
            }
        }

        for reference in scope
            .references
            .iter()
            .filter(|reference| reference.is_reference)
        {
            if reference.target.is_empty() {
                if reference.from_contained.is_none() {
                    self.report(
                        IssueCode::Invariant,
                        reference.expression.as_str(),
                        "a '#' reference to the container is only allowed in a contained resource",
                    );
                }
            } else if !seen_ids.contains(reference.target.as_str()) {
                self.report(
                    IssueCode::Invariant,
                    reference.expression.as_str(),
                    "local reference does not match any contained resource id (ref-1)",
                );
            }
        }

        for (index, entry) in scope.contained.iter().enumerate() {
            let Some(id) = &entry.id else { continue };
            let is_referenced = scope.references.iter().any(|reference| {
                reference.target == *id
                    || (reference.target.is_empty() && reference.from_contained == Some(index))
            });
            if !is_referenced {
                self.report(
                    IssueCode::Invariant,
                    entry.expression.as_str(),
                    "contained resource is not referenced from the containing resource (dom-3)",
                );
            }
        }
    }

    // Elements

    /// Checks the members of a resource, datatype or backbone element object.
    fn check_object(
        &mut self,
        definition: &TypeDefinition,
        object: &Map<String, Value>,
        path: &str,
        depth: usize,
        is_resource: bool,
    ) {
        if depth > MAX_DEPTH {
            self.report(
                IssueCode::TooLong,
                path,
                format!("nesting exceeds {MAX_DEPTH} levels"),
            );
            return;
        }
        if object.is_empty() {
            self.report(IssueCode::Structure, path, "empty object");
            return;
        }

        // Type index of the first variant seen per element, to find doubled choice elements.
        let mut seen_types: Vec<Option<usize>> = vec![None; definition.elements.len()];
        let mut doubled_choices: Vec<usize> = Vec::new();

        for (key, value) in object {
            if self.stopped {
                return;
            }
            if is_resource && key == "resourceType" {
                continue;
            }
            let (json_name, is_extension) = match key.strip_prefix('_') {
                Some(base) => (base, true),
                None => (key.as_str(), false),
            };
            let Some((element_index, type_index)) = definition.property_index(json_name) else {
                self.report_unknown(path, key);
                continue;
            };
            let element = &definition.elements[element_index];
            let type_name = element.types[type_index].as_str();
            let element_path = element.child_path(path, type_name);

            match seen_types[element_index] {
                None => seen_types[element_index] = Some(type_index),
                Some(seen) if seen != type_index && !doubled_choices.contains(&element_index) => {
                    doubled_choices.push(element_index);
                }
                Some(_) => {}
            }

            if is_extension {
                if !definitions::is_primitive_type(type_name) {
                    self.report(
                        IssueCode::Structure,
                        element_path,
                        "primitive extension on an element that is not a primitive",
                    );
                    continue;
                }
                let primitive_value = object.get(json_name);
                self.check_primitive_extension(
                    element,
                    value,
                    primitive_value,
                    &element_path,
                    depth,
                );
            } else {
                let extension = object.get(&format!("_{key}"));
                self.check_element(element, type_name, value, extension, &element_path, depth);
            }
        }

        for element_index in doubled_choices {
            let element = &definition.elements[element_index];
            self.report(
                IssueCode::Structure,
                format!("{path}.{}", element.name),
                format!(
                    "more than one type given for choice element {}",
                    element.display_name()
                ),
            );
        }
        for (element, seen) in definition.elements.iter().zip(&seen_types) {
            if element.min > 0 && seen.is_none() {
                self.report(
                    IssueCode::Required,
                    format!("{path}.{}", element.name),
                    format!("missing required element {}", element.display_name()),
                );
            }
        }

        if !is_resource && object.keys().all(|key| key == "id") {
            self.report(
                IssueCode::Invariant,
                path,
                "element has only an id and no value or children (ele-1)",
            );
        }
        if definition.name == "Extension" {
            self.check_extension_rule(definition, object, path);
        }
    }

    fn report_unknown(&mut self, path: &str, key: &str) {
        // A key that cannot be an element name might carry input data, so it stays out of the
        // message.
        let is_plain_name = !key.is_empty()
            && key.len() <= 64
            && key
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        if is_plain_name {
            self.report(
                IssueCode::Structure,
                format!("{path}.{key}"),
                "unknown element",
            );
        } else {
            self.report(
                IssueCode::Structure,
                path,
                "unknown element whose name is not a FHIR element name",
            );
        }
    }

    /// Checks ext-1: an extension has either nested extensions or a value, not both and not
    /// neither.
    fn check_extension_rule(
        &mut self,
        definition: &TypeDefinition,
        object: &Map<String, Value>,
        path: &str,
    ) {
        let has_extension = object.contains_key("extension");
        let has_value = object.keys().any(|key| {
            let name = key.strip_prefix('_').unwrap_or(key);
            definition
                .property(name)
                .is_some_and(|(element, _)| element.name == "value")
        });
        if has_extension == has_value {
            self.report(
                IssueCode::Invariant,
                path,
                "extension must have either nested extensions or a value[x], not both (ext-1)",
            );
        }
    }

    /// Checks the JSON shape of one element (array or single value) and each value in it.
    fn check_element(
        &mut self,
        element: &ElementDefinition,
        type_name: &str,
        value: &Value,
        extension: Option<&Value>,
        path: &str,
        depth: usize,
    ) {
        if !element.is_array() {
            match value {
                Value::Array(_) => self.report(
                    IssueCode::Structure,
                    path,
                    "expected a single value, not an array",
                ),
                Value::Null => self.report(IssueCode::Structure, path, "null value"),
                _ => self.check_value(element, type_name, value, path, depth),
            }
            return;
        }

        let Value::Array(items) = value else {
            self.report(IssueCode::Structure, path, "expected an array");
            return;
        };
        if items.is_empty() {
            self.report(IssueCode::Structure, path, "empty array");
            return;
        }
        if let MaxOccurs::Bounded(max) = element.max {
            if items.len() > max as usize {
                self.report(IssueCode::Structure, path, format!("more than {max} items"));
            }
        }

        let extension_items = extension.and_then(Value::as_array);
        let is_primitive = definitions::is_primitive_type(type_name);
        for (index, item) in items.iter().enumerate() {
            if self.stopped {
                return;
            }
            let item_path = format!("{path}[{index}]");
            if item.is_null() {
                let has_extension = is_primitive
                    && extension_items
                        .and_then(|extensions| extensions.get(index))
                        .is_some_and(|extension| !extension.is_null());
                if !has_extension {
                    self.report(
                        IssueCode::Structure,
                        item_path,
                        "null is only allowed in a primitive array with a matching extension",
                    );
                }
                continue;
            }
            self.check_value(element, type_name, item, &item_path, depth);
        }
    }

    /// Checks one value of an element against its type.
    fn check_value(
        &mut self,
        element: &ElementDefinition,
        type_name: &str,
        value: &Value,
        path: &str,
        depth: usize,
    ) {
        if definitions::is_primitive_type(type_name) {
            self.check_primitive(type_name, element.value_set.as_deref(), value, path);
            return;
        }
        if type_name == RESOURCE_TYPE {
            let role = if element.name == "contained" {
                self.register_contained(value, path)
            } else {
                ResourceRole::Root
            };
            self.check_resource(value, Some(path), role, depth + 1);
            return;
        }
        let Some(definition) = definitions::type_definition(type_name) else {
            self.report(
                IssueCode::Exception,
                path,
                "no structure definition for element type",
            );
            return;
        };
        let Value::Object(object) = value else {
            self.report(IssueCode::Structure, path, "expected a JSON object");
            return;
        };
        self.check_object(definition, object, path, depth + 1, false);
        if type_name == "Reference" {
            self.check_reference(object, path);
        }
    }

    fn register_contained(&mut self, value: &Value, path: &str) -> ResourceRole {
        let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
        match self.scopes.last_mut() {
            Some(scope) => {
                scope.contained.push(ContainedEntry {
                    id,
                    expression: path.to_owned(),
                });
                ResourceRole::Contained(scope.contained.len() - 1)
            }
            None => ResourceRole::Root,
        }
    }

    /// Records a `#id` reference for the contained-resource checks of the enclosing root.
    ///
    /// NOTE: the element's target types (`ElementDefinition::targets`) are not enforced, because
    /// the published R4 examples break them (MedicationRequest example medrx0301 has a
    /// dispenseRequest.performer pointing at a Practitioner where R4 allows only Organization).
    fn check_reference(&mut self, object: &Map<String, Value>, path: &str) {
        let Some(Value::String(reference)) = object.get("reference") else {
            return;
        };
        if let Some(target) = reference.strip_prefix('#') {
            self.note_local_reference(target, format!("{path}.reference"), true);
        }
    }

    fn note_local_reference(&mut self, target: &str, expression: String, is_reference: bool) {
        if let Some(scope) = self.scopes.last_mut() {
            let from_contained = scope.current_contained;
            scope.references.push(LocalReference {
                target: target.to_owned(),
                expression,
                from_contained,
                is_reference,
            });
        }
    }

    // Primitives

    /// Checks the `_name` companion of a primitive element: an object (or an array aligned with
    /// the value array) of `id` and `extension`.
    fn check_primitive_extension(
        &mut self,
        element: &ElementDefinition,
        value: &Value,
        primitive_value: Option<&Value>,
        path: &str,
        depth: usize,
    ) {
        if !element.is_array() {
            match value {
                Value::Array(_) => self.report(
                    IssueCode::Structure,
                    path,
                    "expected a single primitive extension object, not an array",
                ),
                Value::Null => self.report(IssueCode::Structure, path, "null value"),
                _ => self.check_primitive_extension_object(value, path, depth),
            }
            return;
        }

        let Value::Array(items) = value else {
            self.report(
                IssueCode::Structure,
                path,
                "expected an array of primitive extensions",
            );
            return;
        };
        if items.is_empty() {
            self.report(IssueCode::Structure, path, "empty array");
            return;
        }
        let values = primitive_value.and_then(Value::as_array);
        if let Some(values) = values {
            if values.len() != items.len() {
                self.report(
                    IssueCode::Structure,
                    path,
                    "primitive extension array and value array differ in length",
                );
            }
        }
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            if item.is_null() {
                let has_value = values
                    .and_then(|values| values.get(index))
                    .is_some_and(|value| !value.is_null());
                if !has_value {
                    self.report(
                        IssueCode::Structure,
                        item_path,
                        "null primitive extension without a matching value",
                    );
                }
                continue;
            }
            self.check_primitive_extension_object(item, &item_path, depth);
        }
    }

    fn check_primitive_extension_object(&mut self, value: &Value, path: &str, depth: usize) {
        let Value::Object(object) = value else {
            self.report(
                IssueCode::Structure,
                path,
                "expected a primitive extension object",
            );
            return;
        };
        if object.is_empty() {
            self.report(IssueCode::Structure, path, "empty object");
            return;
        }
        // The companion object contains the members that every element inherits from Element, which
        // the Extension type also has.
        let Some(extension_type) = definitions::type_definition("Extension") else {
            self.report(
                IssueCode::Exception,
                path,
                "no structure definition for Extension",
            );
            return;
        };
        for (key, member) in object {
            let inherited = match key.as_str() {
                "id" | "extension" => extension_type.property(key),
                _ => None,
            };
            let Some((element, type_name)) = inherited else {
                self.report_unknown(path, key);
                continue;
            };
            let member_path = element.child_path(path, type_name);
            self.check_element(element, type_name, member, None, &member_path, depth + 1);
        }
        if object.keys().all(|key| key == "id") {
            self.report(
                IssueCode::Invariant,
                path,
                "element has only an id and no value or children (ele-1)",
            );
        }
    }

    /// Checks a primitive value's JSON type and lexical form, and its code against a required
    /// value set.
    fn check_primitive(
        &mut self,
        type_name: &str,
        value_set: Option<&str>,
        value: &Value,
        path: &str,
    ) {
        match type_name {
            "boolean" => {
                if !value.is_boolean() {
                    self.report(IssueCode::Structure, path, "expected a JSON boolean");
                }
            }
            "integer" | "positiveInt" | "unsignedInt" | "decimal" => {
                let Value::Number(number) = value else {
                    self.report(
                        IssueCode::Structure,
                        path,
                        format!("expected a JSON number for {type_name}"),
                    );
                    return;
                };
                if let Err(message) = check_number(type_name, &number.to_string()) {
                    self.report(IssueCode::Value, path, message);
                }
            }
            _ => {
                let Value::String(text) = value else {
                    self.report(
                        IssueCode::Structure,
                        path,
                        format!("expected a JSON string for {type_name}"),
                    );
                    return;
                };
                if text.is_empty() {
                    self.report(IssueCode::Value, path, "empty string");
                    return;
                }
                if let Err(message) = check_text(type_name, text) {
                    self.report(IssueCode::Value, path, message);
                    return;
                }
                if let Some(url) = value_set {
                    let is_listed = definitions::value_set_codes(url)
                        .is_none_or(|codes| codes.iter().any(|code| code == text));
                    if !is_listed {
                        self.report(
                            IssueCode::CodeInvalid,
                            path,
                            format!("code not in required value set {url}"),
                        );
                    }
                }
                if matches!(type_name, "canonical" | "uri" | "url") {
                    if let Some(target) = text.strip_prefix('#') {
                        self.note_local_reference(target, path.to_owned(), false);
                    }
                }
            }
        }
    }

    // Bundle invariants

    /// Checks the R4 Bundle invariants bdl-1 to bdl-5 and bdl-7 to bdl-12, and the fullUrl rules
    /// of `Bundle.entry.fullUrl` (an absolute URL that agrees with the resource's type and id).
    fn check_bundle(&mut self, bundle: &Map<String, Value>, path: &str) {
        let Some(bundle_type) = bundle.get("type").and_then(Value::as_str) else {
            return;
        };
        let is_search = bundle_type == "searchset";
        let is_history = bundle_type == "history";
        let needs_request = matches!(bundle_type, "batch" | "transaction" | "history");
        let needs_response = matches!(
            bundle_type,
            "batch-response" | "transaction-response" | "history"
        );

        if bundle.contains_key("total") && !(is_search || is_history) {
            self.report(
                IssueCode::Invariant,
                format!("{path}.total"),
                "total is only allowed in a searchset or history bundle (bdl-1)",
            );
        }

        let entries: &[Value] = bundle
            .get("entry")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        let mut full_urls: HashSet<(&str, Option<&str>)> = HashSet::new();
        for (index, entry) in entries.iter().enumerate() {
            let Value::Object(entry) = entry else {
                continue;
            };
            let entry_path = format!("{path}.entry[{index}]");
            let resource = entry.get("resource").and_then(Value::as_object);

            if entry.contains_key("search") && !is_search {
                self.report(
                    IssueCode::Invariant,
                    format!("{entry_path}.search"),
                    "entry.search is only allowed in a searchset bundle (bdl-2)",
                );
            }
            if entry.contains_key("request") != needs_request {
                let message = if needs_request {
                    REQUEST_REQUIRED_MESSAGE
                } else {
                    REQUEST_NOT_ALLOWED_MESSAGE
                };
                self.report(
                    IssueCode::Invariant,
                    format!("{entry_path}.request"),
                    message,
                );
            }
            if entry.contains_key("response") != needs_response {
                let message = if needs_response {
                    RESPONSE_REQUIRED_MESSAGE
                } else {
                    RESPONSE_NOT_ALLOWED_MESSAGE
                };
                self.report(
                    IssueCode::Invariant,
                    format!("{entry_path}.response"),
                    message,
                );
            }
            let has_content = entry.contains_key("resource")
                || entry.contains_key("request")
                || entry.contains_key("response");
            if !has_content {
                self.report(
                    IssueCode::Invariant,
                    entry_path.as_str(),
                    "entry must have a resource, a request or a response (bdl-5)",
                );
            }

            let Some(full_url) = entry.get("fullUrl").and_then(Value::as_str) else {
                continue;
            };
            let full_url_path = format!("{entry_path}.fullUrl");
            if full_url.contains("/_history/") {
                self.report(
                    IssueCode::Invariant,
                    full_url_path.as_str(),
                    "fullUrl must not be a version-specific reference (bdl-8)",
                );
            }
            if !has_uri_scheme(full_url) {
                self.report(
                    IssueCode::Invariant,
                    full_url_path.as_str(),
                    "fullUrl must be an absolute URL",
                );
            } else if let Some(resource) = resource {
                if !full_url_matches_resource(full_url, resource) {
                    self.report(
                        IssueCode::Invariant,
                        full_url_path.as_str(),
                        "fullUrl does not end with the resource's type and id",
                    );
                }
            }
            if !is_history {
                let version = resource
                    .and_then(|resource| resource.get("meta"))
                    .and_then(|meta| meta.get("versionId"))
                    .and_then(Value::as_str);
                if !full_urls.insert((full_url, version)) {
                    self.report(
                        IssueCode::Invariant,
                        full_url_path,
                        "fullUrl repeats an earlier entry's fullUrl and meta.versionId (bdl-7)",
                    );
                }
            }
        }

        let first_resource_type = entries
            .first()
            .and_then(|entry| entry.get("resource"))
            .and_then(|resource| resource.get("resourceType"))
            .and_then(Value::as_str);
        if bundle_type == "document" {
            let identifier = bundle.get("identifier");
            let has_identifier = identifier.is_some_and(|identifier| {
                identifier.get("system").is_some() && identifier.get("value").is_some()
            });
            if !has_identifier {
                self.report(
                    IssueCode::Invariant,
                    format!("{path}.identifier"),
                    "a document bundle must have an identifier with a system and a value (bdl-9)",
                );
            }
            if !bundle.contains_key("timestamp") {
                self.report(
                    IssueCode::Invariant,
                    format!("{path}.timestamp"),
                    "a document bundle must have a timestamp (bdl-10)",
                );
            }
            if first_resource_type != Some("Composition") {
                self.report(
                    IssueCode::Invariant,
                    format!("{path}.entry"),
                    "a document bundle must start with a Composition (bdl-11)",
                );
            }
        }
        if bundle_type == "message" && first_resource_type != Some("MessageHeader") {
            self.report(
                IssueCode::Invariant,
                format!("{path}.entry"),
                "a message bundle must start with a MessageHeader (bdl-12)",
            );
        }
    }
}

const REQUEST_REQUIRED_MESSAGE: &str =
    "entry.request is required in a batch, transaction or history bundle (bdl-3)";
const REQUEST_NOT_ALLOWED_MESSAGE: &str =
    "entry.request is only allowed in a batch, transaction or history bundle (bdl-3)";
const RESPONSE_REQUIRED_MESSAGE: &str = "entry.response is required in a batch-response, \
     transaction-response or history bundle (bdl-4)";
const RESPONSE_NOT_ALLOWED_MESSAGE: &str = "entry.response is only allowed in a batch-response, \
     transaction-response or history bundle (bdl-4)";

// Bundle helpers

/// Returns whether a URI starts with a scheme (`http:`, `urn:`), as RFC 3986 defines one.
fn has_uri_scheme(uri: &str) -> bool {
    let Some((scheme, _)) = uri.split_once(':') else {
        return false;
    };
    let mut bytes = scheme.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic())
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'-' | b'.'))
}

/// Returns whether an http(s) fullUrl ends with the entry resource's `Type/id`. Other schemes
/// (urn:uuid, urn:oid) and resources without an id always agree.
fn full_url_matches_resource(full_url: &str, resource: &Map<String, Value>) -> bool {
    let is_http = full_url.starts_with("http://") || full_url.starts_with("https://");
    let resource_type = resource.get("resourceType").and_then(Value::as_str);
    let id = resource.get("id").and_then(Value::as_str);
    match (is_http, resource_type, id) {
        (true, Some(resource_type), Some(id)) => {
            full_url.ends_with(&format!("/{resource_type}/{id}"))
        }
        _ => true,
    }
}

// Lexical checks of primitive values, after the regular expressions that the R4 structure
// definitions give for each primitive type (profiles-types.xml, element `<type>.value`).

/// Checks the text of a JSON number against an R4 numeric type.
fn check_number(type_name: &str, text: &str) -> Result<(), String> {
    if type_name == "decimal" {
        return if is_decimal(text) {
            Ok(())
        } else {
            Err("invalid decimal: expected a plain decimal number".to_owned())
        };
    }
    let (minimum, message) = match type_name {
        "positiveInt" => (
            1,
            "invalid positiveInt: expected a whole number from 1 to 2147483647",
        ),
        "unsignedInt" => (
            0,
            "invalid unsignedInt: expected a whole number from 0 to 2147483647",
        ),
        _ => (
            i64::from(i32::MIN),
            "invalid integer: expected a whole number from -2147483648 to 2147483647",
        ),
    };
    let digits = text.strip_prefix('-').unwrap_or(text);
    let is_whole = !digits.is_empty()
        && digits.bytes().all(|byte| byte.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    // At most 11 digits keeps the parse inside i64, and anything longer is out of range anyway.
    let parsed = (is_whole && digits.len() <= 11)
        .then(|| text.parse::<i64>().ok())
        .flatten();
    match parsed {
        Some(number) if (minimum..=i64::from(i32::MAX)).contains(&number) => Ok(()),
        _ => Err(message.to_owned()),
    }
}

/// Matches `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_decimal(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut position = usize::from(bytes.first() == Some(&b'-'));
    let integer_digits = count_digits(&bytes[position..]);
    if integer_digits == 0 || (integer_digits > 1 && bytes[position] == b'0') {
        return false;
    }
    position += integer_digits;
    if bytes.get(position) == Some(&b'.') {
        let fraction_digits = count_digits(&bytes[position + 1..]);
        if fraction_digits == 0 {
            return false;
        }
        position += 1 + fraction_digits;
    }
    if matches!(bytes.get(position), Some(b'e' | b'E')) {
        position += 1;
        if matches!(bytes.get(position), Some(b'+' | b'-')) {
            position += 1;
        }
        let exponent_digits = count_digits(&bytes[position..]);
        if exponent_digits == 0 {
            return false;
        }
        position += exponent_digits;
    }
    position == bytes.len()
}

fn count_digits(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .count()
}

/// Whitespace as the R4 regular expressions mean `\s`: space, tab, line feed, vertical tab,
/// form feed and carriage return.
fn is_regex_whitespace(character: char) -> bool {
    matches!(character, ' ' | '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r')
}

/// Checks a non-empty JSON string against an R4 string-based primitive type.
fn check_text(type_name: &str, text: &str) -> Result<(), String> {
    let valid = match type_name {
        // `[ \r\n\t\S]+`: no whitespace other than space, tab, CR and LF, and FHIR forbids the
        // other control characters in strings too.
        "string" | "markdown" => !text
            .chars()
            .any(|character| character.is_control() && !matches!(character, '\t' | '\n' | '\r')),
        // `[^\s]+(\s[^\s]+)*`: single whitespace between tokens, none at either end.
        "code" => is_code(text),
        // `[A-Za-z0-9\-\.]{1,64}`
        "id" => is_valid_id(text),
        // `\S*` (empty strings are never allowed in FHIR JSON).
        "uri" | "url" | "canonical" => !text
            .chars()
            .any(|character| is_regex_whitespace(character) || character.is_control()),
        "oid" => is_oid(text),
        "uuid" => is_uuid(text),
        "base64Binary" => is_base64(text),
        "date" => return check_date(text),
        "dateTime" => return check_date_time(text),
        "instant" => return check_instant(text),
        "time" => {
            let bytes = text.as_bytes();
            parse_clock(bytes) == Some(bytes.len())
        }
        "xhtml" => {
            if !is_xhtml_div(text) {
                false
            } else if let Some(forbidden) = forbidden_narrative_content(text) {
                return Err(format!(
                    "invalid xhtml: the narrative contains {forbidden}, which FHIR forbids (no scripts, forms, frames, objects, head, body, base or link elements, and no event attributes)"
                ));
            } else {
                true
            }
        }
        _ => true,
    };
    if valid {
        Ok(())
    } else {
        Err(text_format_message(type_name).to_owned())
    }
}

fn text_format_message(type_name: &str) -> &'static str {
    match type_name {
        "string" => "invalid string: contains a control character",
        "markdown" => "invalid markdown: contains a control character",
        "code" => "invalid code: leading, trailing or repeated whitespace",
        "id" => "invalid id: expected 1 to 64 letters, digits, '-' or '.'",
        "uri" => "invalid uri: contains whitespace or a control character",
        "url" => "invalid url: contains whitespace or a control character",
        "canonical" => "invalid canonical: contains whitespace or a control character",
        "oid" => "invalid oid: expected urn:oid: followed by a dotted number such as 1.2.3",
        "uuid" => "invalid uuid: expected urn:uuid: followed by a lowercase UUID",
        "base64Binary" => "invalid base64Binary: expected base64 text",
        "time" => "invalid time: expected hh:mm:ss with optional fractional seconds",
        "xhtml" => "invalid xhtml: expected a single div element",
        _ => "invalid value",
    }
}

fn is_code(text: &str) -> bool {
    let starts_or_ends_with_space =
        text.starts_with(is_regex_whitespace) || text.ends_with(is_regex_whitespace);
    let has_double_space = text
        .chars()
        .zip(text.chars().skip(1))
        .any(|(first, second)| is_regex_whitespace(first) && is_regex_whitespace(second));
    !starts_or_ends_with_space && !has_double_space
}

/// Returns whether `text` is a valid FHIR id: 1 to 64 letters, digits, `-` or `.`.
pub fn is_valid_id(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.'))
}

/// Matches `urn:oid:[0-2](\.(0|[1-9][0-9]*))+`.
fn is_oid(text: &str) -> bool {
    let Some(arcs) = text.strip_prefix("urn:oid:") else {
        return false;
    };
    let mut parts = arcs.split('.');
    let first_is_valid = matches!(parts.next(), Some("0" | "1" | "2"));
    let mut rest_count = 0;
    for part in parts {
        let is_number = !part.is_empty()
            && part.bytes().all(|byte| byte.is_ascii_digit())
            && (part == "0" || !part.starts_with('0'));
        if !is_number {
            return false;
        }
        rest_count += 1;
    }
    first_is_valid && rest_count > 0
}

/// Matches `urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`.
fn is_uuid(text: &str) -> bool {
    let Some(uuid) = text.strip_prefix("urn:uuid:") else {
        return false;
    };
    let groups: Vec<&str> = uuid.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    groups.len() == lengths.len()
        && groups.iter().zip(lengths).all(|(group, length)| {
            group.len() == length
                && group
                    .bytes()
                    .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        })
}

/// Accepts base64 text with optional whitespace, with `=` padding only at the end. The R4
/// regular expression `(\s*([0-9a-zA-Z\+/=]){4}\s*)+` is looser about where `=` may appear.
fn is_base64(text: &str) -> bool {
    let mut symbols = 0usize;
    let mut padding = 0usize;
    for byte in text.bytes() {
        if byte.is_ascii_whitespace() {
            continue;
        }
        if byte == b'=' {
            padding += 1;
        } else if byte.is_ascii_alphanumeric() || byte == b'+' || byte == b'/' {
            if padding > 0 {
                return false;
            }
        } else {
            return false;
        }
        symbols += 1;
    }
    symbols > 0 && symbols % 4 == 0 && padding <= 2
}

/// Accepts the narrative form FHIR requires: one `div` element, possibly surrounded by whitespace.
fn is_xhtml_div(text: &str) -> bool {
    let trimmed = text.trim();
    let opens_div = trimmed
        .strip_prefix("<div")
        .and_then(|rest| rest.chars().next())
        .is_some_and(|next| next == '>' || next == '/' || next.is_whitespace());
    opens_div && (trimmed.ends_with("</div>") || trimmed.ends_with("/>"))
}

/// Elements a narrative must not contain. FHIR R4 defines `Narrative.div` as basic HTML
/// formatting, links, images and internal stylesheets, without a head, a body, external
/// stylesheet references, scripts, forms, base or link elements, frames, iframes or objects.
const FORBIDDEN_NARRATIVE_ELEMENTS: &[&str] = &[
    "script", "form", "input", "button", "select", "textarea", "option", "iframe", "frame",
    "frameset", "object", "embed", "applet", "param", "base", "link", "meta", "head", "body",
    "html",
];

/// Returns a description of the first element or attribute of `text` that a narrative must
/// not contain: a forbidden element, an event attribute (`on...`), or a `javascript:` URL.
/// A lexical scan of the tags, not an XHTML parser.
fn forbidden_narrative_content(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let mut rest = lower.as_str();
    while let Some(start) = rest.find('<') {
        let tag = &rest[start + 1..];
        let end = tag.find('>').unwrap_or(tag.len());
        let inside = &tag[..end];
        rest = &tag[end..];
        let inside = inside.trim_start_matches('/');
        let name: String = inside
            .chars()
            .take_while(|character| character.is_ascii_alphanumeric() || *character == ':')
            .collect();
        let local = name.rsplit(':').next().unwrap_or_default();
        if FORBIDDEN_NARRATIVE_ELEMENTS.contains(&local) {
            return Some(format!("a {local} element"));
        }
        for (attribute, value) in tag_attributes(&inside[name.len()..]) {
            if attribute.starts_with("on") && attribute.len() > 2 {
                return Some("an event attribute".to_owned());
            }
            let compact: String = value
                .chars()
                .filter(|character| !character.is_whitespace())
                .collect();
            if compact.starts_with("javascript:") || compact.starts_with("vbscript:") {
                return Some("a script URL".to_owned());
            }
        }
    }
    None
}

/// Splits the attribute part of a tag into names and values, honouring quotes, so that text
/// inside a value is never taken for an attribute.
fn tag_attributes(text: &str) -> Vec<(&str, &str)> {
    let bytes = text.as_bytes();
    let mut attributes = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        while index < bytes.len() && (bytes[index].is_ascii_whitespace() || bytes[index] == b'/') {
            index += 1;
        }
        let name_start = index;
        while index < bytes.len()
            && !bytes[index].is_ascii_whitespace()
            && bytes[index] != b'='
            && bytes[index] != b'/'
        {
            index += 1;
        }
        let name = &text[name_start..index];
        while index < bytes.len() && bytes[index].is_ascii_whitespace() {
            index += 1;
        }
        let mut value = "";
        if index < bytes.len() && bytes[index] == b'=' {
            index += 1;
            while index < bytes.len() && bytes[index].is_ascii_whitespace() {
                index += 1;
            }
            if index < bytes.len() && (bytes[index] == b'"' || bytes[index] == b'\'') {
                let quote = bytes[index];
                let value_start = index + 1;
                index = value_start;
                while index < bytes.len() && bytes[index] != quote {
                    index += 1;
                }
                value = &text[value_start..index];
                index += 1;
            } else {
                let value_start = index;
                while index < bytes.len() && !bytes[index].is_ascii_whitespace() {
                    index += 1;
                }
                value = &text[value_start..index];
            }
        }
        if !name.is_empty() {
            attributes.push((name, value));
        } else if index < bytes.len() {
            index += 1;
        }
    }
    attributes
}

// Dates and times

const DATE_MESSAGE: &str =
    "invalid date: expected YYYY, YYYY-MM or YYYY-MM-DD with a valid month and day";
const DATE_TIME_MESSAGE: &str = "invalid dateTime: expected YYYY, YYYY-MM, YYYY-MM-DD or \
     YYYY-MM-DDThh:mm:ss with a time zone, and a valid month, day and time";
const DATE_TIME_ZONE_MESSAGE: &str = "invalid dateTime: a time of day must have a time zone";
const INSTANT_MESSAGE: &str = "invalid instant: expected YYYY-MM-DDThh:mm:ss with optional \
     fractional seconds and a time zone";

fn check_date(text: &str) -> Result<(), String> {
    if is_partial_date(text.as_bytes()) {
        Ok(())
    } else {
        Err(DATE_MESSAGE.to_owned())
    }
}

/// Matches the R4 dateTime form: a partial date, or a full date with `T`, a time with seconds
/// and a time zone.
fn check_date_time(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    if bytes.len() <= 10 {
        return check_partial(bytes);
    }
    if !is_partial_date(&bytes[..10]) || bytes[10] != b'T' {
        return Err(DATE_TIME_MESSAGE.to_owned());
    }
    let time = &bytes[11..];
    match parse_clock(time) {
        Some(length) if length == time.len() => Err(DATE_TIME_ZONE_MESSAGE.to_owned()),
        Some(length) if is_time_zone(&time[length..]) => Ok(()),
        _ => Err(DATE_TIME_MESSAGE.to_owned()),
    }
}

fn check_partial(bytes: &[u8]) -> Result<(), String> {
    if is_partial_date(bytes) {
        Ok(())
    } else {
        Err(DATE_TIME_MESSAGE.to_owned())
    }
}

/// Matches the R4 instant form: a full date, a time with seconds and a time zone.
fn check_instant(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    let is_valid = bytes.len() > 11
        && is_partial_date(&bytes[..10])
        && bytes[10] == b'T'
        && parse_clock(&bytes[11..]).is_some_and(|length| is_time_zone(&bytes[11 + length..]));
    if is_valid {
        Ok(())
    } else {
        Err(INSTANT_MESSAGE.to_owned())
    }
}

/// Matches `YYYY`, `YYYY-MM` or `YYYY-MM-DD` with year 0001 to 9999 and a day that exists in the
/// month.
fn is_partial_date(bytes: &[u8]) -> bool {
    let Some(year) = digits_value(bytes, 0, 4) else {
        return false;
    };
    if year == 0 {
        return false;
    }
    match bytes.len() {
        4 => true,
        7 => {
            bytes[4] == b'-'
                && digits_value(bytes, 5, 2).is_some_and(|month| (1..=12).contains(&month))
        }
        10 => {
            let month = digits_value(bytes, 5, 2).filter(|month| (1..=12).contains(month));
            let day = digits_value(bytes, 8, 2);
            match (month, day) {
                (Some(month), Some(day)) => {
                    bytes[4] == b'-'
                        && bytes[7] == b'-'
                        && day >= 1
                        && day <= days_in_month(year, month)
                }
                _ => false,
            }
        }
        _ => false,
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses `hh:mm:ss` with optional `.fraction` at the start of `bytes` and returns its length.
/// Seconds may be 60, for a leap second.
fn parse_clock(bytes: &[u8]) -> Option<usize> {
    let hour = digits_value(bytes, 0, 2)?;
    let minute = digits_value(bytes, 3, 2)?;
    let second = digits_value(bytes, 6, 2)?;
    let is_valid =
        bytes[2] == b':' && bytes[5] == b':' && hour <= 23 && minute <= 59 && second <= 60;
    if !is_valid {
        return None;
    }
    if bytes.get(8) == Some(&b'.') {
        let fraction_digits = count_digits(&bytes[9..]);
        if fraction_digits == 0 {
            return None;
        }
        return Some(9 + fraction_digits);
    }
    Some(8)
}

/// Matches `Z` or `(+|-)hh:mm` with an offset from -14:00 to +14:00 as R4 allows it
/// (`(0[0-9]|1[0-3]):[0-5][0-9]|14:00`).
fn is_time_zone(bytes: &[u8]) -> bool {
    if bytes == b"Z" {
        return true;
    }
    if bytes.len() != 6 || !matches!(bytes[0], b'+' | b'-') || bytes[3] != b':' {
        return false;
    }
    match (digits_value(bytes, 1, 2), digits_value(bytes, 4, 2)) {
        (Some(hours), Some(minutes)) => {
            (hours <= 13 && minutes <= 59) || (hours == 14 && minutes == 0)
        }
        _ => false,
    }
}

/// Reads `count` ASCII digits starting at `start`, or returns `None`.
fn digits_value(bytes: &[u8], start: usize, count: usize) -> Option<u32> {
    let digits = bytes.get(start..start + count)?;
    digits.iter().try_fold(0u32, |value, byte| {
        byte.is_ascii_digit()
            .then(|| value * 10 + u32::from(byte - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const UUID_1: &str = "urn:uuid:0a5f1d0e-3a5b-4c7e-9d5e-1b2c3d4e5f60";
    const UUID_2: &str = "urn:uuid:0a5f1d0e-3a5b-4c7e-9d5e-1b2c3d4e5f61";

    fn issues_of(resource: &Value) -> Vec<ValidationIssue> {
        validate_resource(resource).err().unwrap_or_default()
    }

    /// Asserts that validation reports an issue with this code at this expression, whose
    /// diagnostics contain `fragment`.
    fn assert_issue(resource: &Value, code: IssueCode, expression: &str, fragment: &str) {
        let issues = issues_of(resource);
        let found = issues.iter().any(|issue| {
            issue.code == code
                && issue.expression == expression
                && issue.diagnostics.contains(fragment)
        });
        assert!(
            found,
            "expected {} at {expression} containing {fragment:?}, got {issues:#?}",
            code.as_str()
        );
    }

    fn assert_valid(resource: &Value) {
        let issues = issues_of(resource);
        assert!(issues.is_empty(), "expected no issues, got {issues:#?}");
    }

    fn patient_with(member: &str, value: Value) -> Value {
        let mut patient = json!({"resourceType": "Patient", "id": "synthetic-1"});
        patient[member] = value;
        patient
    }

    fn observation() -> Value {
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "synthetic"}})
    }

    fn observation_with(member: &str, value: Value) -> Value {
        let mut resource = observation();
        resource[member] = value;
        resource
    }

    // Valid minimal resources

    #[test]
    fn minimal_clinical_resources_are_valid() {
        let subject = json!({"reference": "Patient/synthetic-1"});
        let concept = json!({"coding": [{"system": "http://loinc.org", "code": "8867-4"}]});
        let resources = [
            json!({"resourceType": "Patient"}),
            json!({
                "resourceType": "Patient",
                "id": "synthetic-1",
                "gender": "female",
                "birthDate": "1990-04-01"
            }),
            json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}}),
            json!({
                "resourceType": "Observation",
                "status": "final",
                "code": concept,
                "subject": subject,
                "valueQuantity": {"value": 72, "unit": "/min"}
            }),
            json!({"resourceType": "Condition", "subject": subject}),
            json!({"resourceType": "AllergyIntolerance", "patient": subject}),
            json!({
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": concept,
                "subject": subject
            }),
            json!({"resourceType": "Procedure", "status": "completed", "subject": subject}),
            json!({
                "resourceType": "Immunization",
                "status": "completed",
                "vaccineCode": concept,
                "patient": subject,
                "occurrenceDateTime": "2021-03-04"
            }),
            json!({"resourceType": "DiagnosticReport", "status": "final", "code": concept}),
            json!({
                "resourceType": "DocumentReference",
                "status": "current",
                "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}]
            }),
            json!({
                "resourceType": "Consent",
                "status": "active",
                "scope": concept,
                "category": [concept]
            }),
            json!({
                "resourceType": "Provenance",
                "target": [subject],
                "recorded": "2021-03-04T10:00:00Z",
                "agent": [{"who": {"reference": "Practitioner/synthetic-2"}}]
            }),
            json!({
                "resourceType": "AuditEvent",
                "type": {"code": "rest"},
                "recorded": "2021-03-04T10:00:00.123+02:00",
                "agent": [{"requestor": true}],
                "source": {"observer": {"display": "synthetic"}}
            }),
            json!({"resourceType": "Practitioner"}),
            json!({"resourceType": "Organization", "name": "Synthetic Clinic"}),
        ];
        for resource in &resources {
            assert_valid(resource);
        }
    }

    #[test]
    fn transaction_bundle_is_valid() {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": UUID_1,
                    "resource": {"resourceType": "Patient", "gender": "other"},
                    "request": {"method": "POST", "url": "Patient"}
                },
                {
                    "fullUrl": UUID_2,
                    "resource": {
                        "resourceType": "Encounter",
                        "status": "planned",
                        "class": {"code": "AMB"},
                        "subject": {"reference": UUID_1}
                    },
                    "request": {"method": "POST", "url": "Encounter"}
                },
                {"request": {"method": "DELETE", "url": "Observation/synthetic-9"}}
            ]
        });
        assert_valid(&bundle);
    }

    #[test]
    fn nested_questionnaire_items_are_valid() {
        let leaf = json!({"linkId": "1.1.1", "type": "string"});
        let middle = json!({"linkId": "1.1", "type": "group", "item": [leaf]});
        let top = json!({"linkId": "1", "type": "group", "item": [middle]});
        let questionnaire =
            json!({"resourceType": "Questionnaire", "status": "draft", "item": [top]});
        assert_valid(&questionnaire);
    }

    // Resource level

    #[test]
    fn non_object_resource_is_rejected() {
        assert_issue(
            &json!([1, 2]),
            IssueCode::Structure,
            "Resource",
            "JSON object",
        );
        assert_issue(
            &json!("Patient"),
            IssueCode::Structure,
            "Resource",
            "JSON object",
        );
    }

    #[test]
    fn resource_type_must_be_known() {
        let missing = json!({"id": "a"});
        assert_issue(
            &missing,
            IssueCode::Required,
            "Resource",
            "missing resourceType",
        );
        for unknown in ["Patients", "DomainResource", "Resource"] {
            assert_issue(
                &json!({"resourceType": unknown}),
                IssueCode::Value,
                "Resource.resourceType",
                "not an R4 resource type",
            );
        }
        let number = json!({"resourceType": 7});
        assert_issue(
            &number,
            IssueCode::Structure,
            "Resource.resourceType",
            "JSON string",
        );
    }

    #[test]
    fn resource_id_must_match_id_format() {
        let long_id = "a".repeat(65);
        for bad_id in ["bad_id", "bad id", long_id.as_str()] {
            let resource = patient_with("id", json!(bad_id));
            assert_issue(&resource, IssueCode::Value, "Patient.id", "invalid id");
        }
        assert_valid(&patient_with("id", json!("A-z.09")));
        assert_valid(&patient_with("id", json!("a".repeat(64))));
    }

    #[test]
    fn meta_is_allowed_and_checked() {
        let meta = json!({
            "versionId": "3",
            "lastUpdated": "2020-01-01T00:00:00Z",
            "profile": ["http://example.org/StructureDefinition/synthetic"],
            "security": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                "code": "R"
            }]
        });
        assert_valid(&patient_with("meta", meta));
        let date_only = patient_with("meta", json!({"lastUpdated": "2020-01-01"}));
        assert_issue(
            &date_only,
            IssueCode::Value,
            "Patient.meta.lastUpdated",
            "invalid instant",
        );
    }

    // Unknown elements

    #[test]
    fn unknown_elements_are_rejected_at_every_depth() {
        let cases = [
            ("nickname", json!("x"), "Patient.nickname"),
            (
                "name",
                json!([{"family": "Synthetic", "nickname": "x"}]),
                "Patient.name[0].nickname",
            ),
            (
                "contact",
                json!([{"gender": "male", "shoeSize": 9}]),
                "Patient.contact[0].shoeSize",
            ),
            (
                "extension",
                json!([{"url": "http://example.org/x", "valueString": "a", "color": "red"}]),
                "Patient.extension[0].color",
            ),
            (
                "identifier",
                json!([{"value": "1", "resourceType": "Identifier"}]),
                "Patient.identifier[0].resourceType",
            ),
        ];
        for (member, value, expression) in cases {
            let resource = patient_with(member, value);
            assert_issue(
                &resource,
                IssueCode::Structure,
                expression,
                "unknown element",
            );
        }
    }

    #[test]
    fn unknown_element_inside_contained_is_rejected() {
        let mut resource = observation_with("performer", json!([{"reference": "#p1"}]));
        resource["contained"] = json!([{"resourceType": "Practitioner", "id": "p1", "rank": "x"}]);
        let expression = "Observation.contained[0].rank";
        assert_issue(
            &resource,
            IssueCode::Structure,
            expression,
            "unknown element",
        );
    }

    #[test]
    fn unusual_unknown_names_stay_out_of_expressions() {
        let resource = patient_with("Jane Doe 1970", json!(true));
        let issues = issues_of(&resource);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].expression, "Patient");
        assert!(issues[0].diagnostics.contains("unknown element"));
        assert!(!issues[0].diagnostics.contains("Jane"));
    }

    #[test]
    fn disallowed_choice_type_is_unknown() {
        let human_name = observation_with("valueHumanName", json!({"family": "x"}));
        let expression = "Observation.valueHumanName";
        assert_issue(
            &human_name,
            IssueCode::Structure,
            expression,
            "unknown element",
        );
        let bare = observation_with("value", json!(1));
        assert_issue(
            &bare,
            IssueCode::Structure,
            "Observation.value",
            "unknown element",
        );
    }

    // JSON shape

    #[test]
    fn repeating_element_requires_array() {
        let name = patient_with("name", json!({"family": "Synthetic"}));
        assert_issue(
            &name,
            IssueCode::Structure,
            "Patient.name",
            "expected an array",
        );
        let given = patient_with("name", json!([{"given": "Ann"}]));
        let expression = "Patient.name[0].given";
        assert_issue(
            &given,
            IssueCode::Structure,
            expression,
            "expected an array",
        );
    }

    #[test]
    fn single_element_rejects_array() {
        let gender = patient_with("gender", json!(["female"]));
        assert_issue(
            &gender,
            IssueCode::Structure,
            "Patient.gender",
            "not an array",
        );
        let status = patient_with("maritalStatus", json!([{"text": "x"}]));
        assert_issue(
            &status,
            IssueCode::Structure,
            "Patient.maritalStatus",
            "not an array",
        );
    }

    #[test]
    fn empty_containers_and_strings_are_rejected() {
        let empty_array = patient_with("name", json!([]));
        assert_issue(
            &empty_array,
            IssueCode::Structure,
            "Patient.name",
            "empty array",
        );

        let empty_item = patient_with("name", json!([{}]));
        assert_issue(
            &empty_item,
            IssueCode::Structure,
            "Patient.name[0]",
            "empty object",
        );

        let empty_object = patient_with("maritalStatus", json!({}));
        let expression = "Patient.maritalStatus";
        assert_issue(
            &empty_object,
            IssueCode::Structure,
            expression,
            "empty object",
        );

        let empty_family = patient_with("name", json!([{"family": ""}]));
        let expression = "Patient.name[0].family";
        assert_issue(&empty_family, IssueCode::Value, expression, "empty string");

        let empty_code = patient_with("gender", json!(""));
        assert_issue(
            &empty_code,
            IssueCode::Value,
            "Patient.gender",
            "empty string",
        );
    }

    #[test]
    fn object_with_only_id_is_rejected() {
        let resource = patient_with("name", json!([{"id": "n1"}]));
        assert_issue(&resource, IssueCode::Invariant, "Patient.name[0]", "ele-1");
    }

    #[test]
    fn nulls_are_rejected_outside_primitive_arrays() {
        let single = patient_with("gender", Value::Null);
        assert_issue(&single, IssueCode::Structure, "Patient.gender", "null");
        let complex = patient_with("name", json!([null]));
        let message = "null is only allowed";
        assert_issue(&complex, IssueCode::Structure, "Patient.name[0]", message);
        let primitive = patient_with("name", json!([{"given": ["Ann", null]}]));
        assert_issue(
            &primitive,
            IssueCode::Structure,
            "Patient.name[0].given[1]",
            message,
        );
    }

    #[test]
    fn null_with_matching_extension_is_allowed() {
        let masked = json!({"url": "http://example.org/x", "valueCode": "masked"});
        let name = json!([{"given": ["Ann", null], "_given": [null, {"extension": [masked]}]}]);
        assert_valid(&patient_with("name", name));
    }

    // Primitive extensions

    #[test]
    fn primitive_extension_object_is_valid() {
        let birth_time = json!({
            "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
            "valueDateTime": "1970-03-30T14:35:45-05:00"
        });
        let mut resource = patient_with("birthDate", json!("1970-03-30"));
        resource["_birthDate"] = json!({"id": "b1", "extension": [birth_time]});
        assert_valid(&resource);

        let declined = json!({"url": "http://example.org/absent", "valueCode": "asked-declined"});
        assert_valid(&patient_with("_gender", json!({"extension": [declined]})));
    }

    #[test]
    fn primitive_extension_shape_is_checked() {
        let cases = [
            (
                "_birthDate",
                json!({"value": "1970"}),
                IssueCode::Structure,
                "Patient.birthDate.value",
                "unknown element",
            ),
            (
                "_birthDate",
                json!({}),
                IssueCode::Structure,
                "Patient.birthDate",
                "empty object",
            ),
            (
                "_birthDate",
                json!({"id": "b1"}),
                IssueCode::Invariant,
                "Patient.birthDate",
                "ele-1",
            ),
            (
                "_birthDate",
                json!([{"id": "b1"}]),
                IssueCode::Structure,
                "Patient.birthDate",
                "not an array",
            ),
            (
                "_maritalStatus",
                json!({"id": "m1"}),
                IssueCode::Structure,
                "Patient.maritalStatus",
                "not a primitive",
            ),
            (
                "_shoeSize",
                json!({"id": "s1"}),
                IssueCode::Structure,
                "Patient._shoeSize",
                "unknown element",
            ),
        ];
        for (member, value, code, expression, fragment) in cases {
            assert_issue(&patient_with(member, value), code, expression, fragment);
        }
    }

    #[test]
    fn primitive_extension_arrays_align() {
        let flag = json!({"url": "http://example.org/x", "valueBoolean": true});
        let short =
            json!([{"given": ["Ann", "Bo"], "_given": [{"id": "g1", "extension": [flag]}]}]);
        let expression = "Patient.name[0].given";
        let resource = patient_with("name", short);
        assert_issue(
            &resource,
            IssueCode::Structure,
            expression,
            "differ in length",
        );

        let both_null = json!([{"given": ["Ann", null], "_given": [null, null]}]);
        let resource = patient_with("name", both_null);
        let expression = "Patient.name[0].given[1]";
        assert_issue(
            &resource,
            IssueCode::Structure,
            expression,
            "null is only allowed",
        );
        assert_issue(
            &resource,
            IssueCode::Structure,
            expression,
            "without a matching value",
        );
    }

    // Choice types

    #[test]
    fn choice_allows_only_one_type() {
        let single = patient_with("deceasedBoolean", json!(true));
        assert_valid(&single);

        let mut doubled = single.clone();
        doubled["deceasedDateTime"] = json!("2020-01-01");
        let message = "more than one type";
        assert_issue(&doubled, IssueCode::Structure, "Patient.deceased", message);

        let flag = json!({"url": "http://example.org/x", "valueBoolean": true});
        let mut mixed = single.clone();
        mixed["_deceasedDateTime"] = json!({"extension": [flag]});
        assert_issue(&mixed, IssueCode::Structure, "Patient.deceased", message);
    }

    #[test]
    fn choice_path_names_the_type() {
        let resource = observation_with("valueQuantity", json!({"value": "72"}));
        let expression = "Observation.value.ofType(Quantity).value";
        assert_issue(
            &resource,
            IssueCode::Structure,
            expression,
            "expected a JSON number",
        );
    }

    #[test]
    fn simple_quantity_has_no_comparator() {
        let dose = json!({"doseQuantity": {"value": 5, "comparator": "<"}});
        let request = json!({
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"text": "synthetic"},
            "subject": {"reference": "Patient/p1"},
            "dosageInstruction": [{"doseAndRate": [dose]}]
        });
        let expression = "MedicationRequest.dosageInstruction[0].doseAndRate[0]\
                          .dose.ofType(Quantity).comparator";
        assert_issue(
            &request,
            IssueCode::Structure,
            expression,
            "unknown element",
        );
    }

    // Cardinality

    #[test]
    fn missing_required_elements_are_reported() {
        let resource = json!({"resourceType": "Observation"});
        let expression = "Observation.status";
        assert_issue(
            &resource,
            IssueCode::Required,
            expression,
            "missing required element status",
        );
        let expression = "Observation.code";
        assert_issue(
            &resource,
            IssueCode::Required,
            expression,
            "missing required element code",
        );

        let request = json!({
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p1"}
        });
        let expression = "MedicationRequest.medication";
        assert_issue(&request, IssueCode::Required, expression, "medication[x]");
    }

    #[test]
    fn required_elements_inside_parents_are_checked() {
        let cases = [
            (
                "link",
                json!([{"type": "seealso"}]),
                "Patient.link[0].other",
            ),
            (
                "extension",
                json!([{"valueString": "x"}]),
                "Patient.extension[0].url",
            ),
            ("text", json!({"status": "generated"}), "Patient.text.div"),
        ];
        for (member, value, expression) in cases {
            let resource = patient_with(member, value);
            assert_issue(
                &resource,
                IssueCode::Required,
                expression,
                "missing required element",
            );
        }
    }

    #[test]
    fn primitive_extension_satisfies_required_element() {
        let absent = json!({
            "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
            "valueCode": "unknown"
        });
        let mut resource = observation();
        resource.as_object_mut().unwrap().remove("status");
        resource["_status"] = json!({"extension": [absent]});
        assert_valid(&resource);
    }

    // Primitive datatypes

    #[test]
    fn booleans_and_numbers_need_json_types() {
        let active = patient_with("active", json!("true"));
        assert_issue(
            &active,
            IssueCode::Structure,
            "Patient.active",
            "JSON boolean",
        );
        let births = patient_with("multipleBirthInteger", json!("2"));
        let expression = "Patient.multipleBirth.ofType(integer)";
        assert_issue(&births, IssueCode::Structure, expression, "JSON number");
        let birth_date = patient_with("birthDate", json!(1970));
        assert_issue(
            &birth_date,
            IssueCode::Structure,
            "Patient.birthDate",
            "JSON string",
        );
    }

    #[test]
    fn integer_forms_and_ranges() {
        assert!(check_number("integer", "0").is_ok());
        assert!(check_number("integer", "-2147483648").is_ok());
        assert!(check_number("integer", "2147483647").is_ok());
        assert!(check_number("integer", "2147483648").is_err());
        assert!(check_number("integer", "-2147483649").is_err());
        assert!(check_number("integer", "99999999999999999999999").is_err());
        assert!(check_number("integer", "1.0").is_err());
        assert!(check_number("integer", "1e3").is_err());
        assert!(check_number("integer", "01").is_err());
        assert!(check_number("positiveInt", "1").is_ok());
        assert!(check_number("positiveInt", "0").is_err());
        assert!(check_number("unsignedInt", "0").is_ok());
        assert!(check_number("unsignedInt", "-1").is_err());
    }

    #[test]
    fn integer_text_comes_from_json() {
        let expression = "Patient.multipleBirth.ofType(integer)";
        for text in ["2.0", "3000000000"] {
            let number: Value = serde_json::from_str(text).unwrap();
            let resource = patient_with("multipleBirthInteger", number);
            assert_issue(&resource, IssueCode::Value, expression, "invalid integer");
        }
        assert_valid(&patient_with("multipleBirthInteger", json!(2)));
    }

    #[test]
    fn decimal_forms() {
        for valid in ["0", "-0.5", "72.000", "1e3", "6.02E+23", "1.5e-7"] {
            assert!(is_decimal(valid), "{valid} should be a decimal");
        }
        for invalid in ["", "-", "01", "1.", ".5", "1e", "+1", "1.5.2"] {
            assert!(!is_decimal(invalid), "{invalid} should not be a decimal");
        }
        let precise: Value = serde_json::from_str(r#"{"value": 1.50000000000000000001}"#).unwrap();
        assert_valid(&observation_with("valueQuantity", precise));
    }

    #[test]
    fn string_forms() {
        assert!(check_text("string", "line one\nline two\ttab").is_ok());
        assert!(check_text("string", "bell\u{07}").is_err());
        assert!(check_text("markdown", "form\u{0C}feed").is_err());
        assert!(check_text("code", "in-progress").is_ok());
        assert!(check_text("code", "two words").is_ok());
        assert!(check_text("code", " leading").is_err());
        assert!(check_text("code", "trailing ").is_err());
        assert!(check_text("code", "double  space").is_err());
        assert!(check_text("uri", "http://example.org/a?b=c").is_ok());
        assert!(check_text("uri", "http://example.org/a b").is_err());
        assert!(check_text("url", "http://example.org/\n").is_err());
        assert!(check_text("canonical", "http://example.org/ValueSet/x|1.0").is_ok());
    }

    #[test]
    fn oid_and_uuid_forms() {
        assert!(check_text("oid", "urn:oid:1.2.36.146.595.217.0.1").is_ok());
        assert!(check_text("oid", "urn:oid:3.1").is_err());
        assert!(check_text("oid", "urn:oid:1").is_err());
        assert!(check_text("oid", "urn:oid:1.02").is_err());
        assert!(check_text("oid", "1.2.3").is_err());
        assert!(check_text("uuid", "urn:uuid:c757873d-ec9a-4326-a141-556f43239520").is_ok());
        assert!(check_text("uuid", "urn:uuid:C757873D-EC9A-4326-A141-556F43239520").is_err());
        assert!(check_text("uuid", "c757873d-ec9a-4326-a141-556f43239520").is_err());
        assert!(check_text("uuid", "urn:uuid:c757873d-ec9a-4326-a141").is_err());
    }

    #[test]
    fn base64_forms() {
        assert!(check_text("base64Binary", "aGVsbG8=").is_ok());
        assert!(check_text("base64Binary", "aGVs\nbG8h").is_ok());
        assert!(check_text("base64Binary", "aGVsbG8").is_err());
        assert!(check_text("base64Binary", "aGV=bG8h").is_err());
        assert!(check_text("base64Binary", "aGVsbG8*").is_err());
        assert!(check_text("base64Binary", "a===").is_err());
    }

    #[test]
    fn date_forms() {
        let valid = [
            "2023",
            "2023-02",
            "2023-02-28",
            "2024-02-29",
            "0001-01-01",
            "2000-02-29",
        ];
        for text in valid {
            assert!(check_text("date", text).is_ok(), "{text} should be a date");
        }
        let invalid = [
            "0000",
            "2023-00",
            "2023-13",
            "2023-02-29",
            "1900-02-29",
            "2023-04-31",
            "2023-1-01",
            "23-01-01",
            "2023-01-01T10:00:00Z",
            "not a date",
            "2023/01/01",
        ];
        for text in invalid {
            assert!(
                check_text("date", text).is_err(),
                "{text} should not be a date"
            );
        }
    }

    #[test]
    fn date_time_forms() {
        let valid = [
            "2023",
            "2023-05",
            "2023-05-06",
            "2023-05-06T10:11:12Z",
            "2023-05-06T10:11:12.345+14:00",
            "2023-05-06T23:59:60-05:00",
            "2023-05-06T00:00:00+13:59",
        ];
        for text in valid {
            assert!(
                check_text("dateTime", text).is_ok(),
                "{text} should be a dateTime"
            );
        }
        let invalid = [
            "2023-05-06T10:11",
            "2023-05-06T10:11Z",
            "2023-05-06T24:00:00Z",
            "2023-05-06T10:11:12+14:30",
            "2023-05-06T10:11:12+5:00",
            "2023-05T10:11:12Z",
            "2023-05-06 10:11:12Z",
            "2023-05-06T10:11:12.Z",
        ];
        for text in invalid {
            assert!(
                check_text("dateTime", text).is_err(),
                "{text} should not be a dateTime"
            );
        }
        let without_zone = check_text("dateTime", "2020-11-11T10:58:14.768528");
        assert_eq!(without_zone.unwrap_err(), DATE_TIME_ZONE_MESSAGE);
    }

    #[test]
    fn instant_and_time_forms() {
        assert!(check_text("instant", "2023-05-06T10:11:12Z").is_ok());
        assert!(check_text("instant", "2023-05-06T10:11:12.1-03:00").is_ok());
        assert!(check_text("instant", "2023-05-06T10:11:12").is_err());
        assert!(check_text("instant", "2023-05-06T10:11Z").is_err());
        assert!(check_text("instant", "2023-05-06").is_err());
        assert!(check_text("time", "10:11:12").is_ok());
        assert!(check_text("time", "10:11:12.5").is_ok());
        assert!(check_text("time", "10:11").is_err());
        assert!(check_text("time", "25:00:00").is_err());
        assert!(check_text("time", "10:11:12Z").is_err());
    }

    #[test]
    fn narrative_with_scripts_is_rejected() {
        let cases = [
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><script>alert(1)</script></div>", "script element"),
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><SCRIPT src=\"x.js\"/></div>", "script element"),
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><p onclick=\"steal()\">x</p></div>", "event attribute"),
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><img src=\"a.png\" onerror=\"x()\"/></div>", "event attribute"),
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><a href=\"java script:x\">x</a></div>", "script URL"),
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><a href=\" JavaScript:x()\">x</a></div>", "script URL"),
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><iframe src=\"https://example.org\"></iframe></div>", "iframe element"),
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><form><input/></form></div>", "form element"),
            ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><h:script xmlns:h=\"http://www.w3.org/1999/xhtml\"/></div>", "script element"),
        ];
        for (div, expected) in cases {
            let resource = patient_with("text", json!({"status": "generated", "div": div}));
            assert_issue(&resource, IssueCode::Value, "Patient.text.div", expected);
        }
        let allowed = "<div xmlns=\"http://www.w3.org/1999/xhtml\"><style>p {color: red}</style><p style=\"color:red\" title=\"see onboarding\">Only <a href=\"https://example.org/info\">one</a> <img src=\"#photo\" alt=\"online\"/> note.</p></div>";
        assert_valid(&patient_with(
            "text",
            json!({"status": "generated", "div": allowed}),
        ));
    }

    #[test]
    fn narrative_div_is_checked() {
        let div = "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>x</p></div>";
        let valid = json!({"status": "generated", "div": div});
        assert_valid(&patient_with("text", valid));
        let invalid = patient_with("text", json!({"status": "generated", "div": "<p>x</p>"}));
        assert_issue(
            &invalid,
            IssueCode::Value,
            "Patient.text.div",
            "invalid xhtml",
        );
    }

    #[test]
    fn invalid_dates_in_resources_are_reported() {
        let birth_date = patient_with("birthDate", json!("not a date"));
        assert_issue(
            &birth_date,
            IssueCode::Value,
            "Patient.birthDate",
            "invalid date",
        );
        let encounter = json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "AMB"},
            "period": {"start": "2020-11-11T10:58:14"}
        });
        assert_issue(
            &encounter,
            IssueCode::Value,
            "Encounter.period.start",
            "time zone",
        );
    }

    #[test]
    fn every_primitive_type_has_a_checker() {
        let handled = [
            "base64Binary",
            "boolean",
            "canonical",
            "code",
            "date",
            "dateTime",
            "decimal",
            "id",
            "instant",
            "integer",
            "markdown",
            "oid",
            "positiveInt",
            "string",
            "time",
            "unsignedInt",
            "uri",
            "url",
            "uuid",
            "xhtml",
        ];
        for type_name in definitions::primitive_types() {
            assert!(
                handled.contains(&type_name),
                "primitive {type_name} has no checker"
            );
        }
    }

    // Required bindings

    #[test]
    fn required_codes_are_checked() {
        let encounter = json!({
            "resourceType": "Encounter",
            "status": "completed",
            "class": {"code": "AMB"}
        });
        let url = "http://hl7.org/fhir/ValueSet/encounter-status";
        assert_issue(&encounter, IssueCode::CodeInvalid, "Encounter.status", url);

        let gender = patient_with("gender", json!("Female"));
        let fragment = "administrative-gender";
        assert_issue(&gender, IssueCode::CodeInvalid, "Patient.gender", fragment);

        let name_use = patient_with("name", json!([{"use": "nickname-ish", "family": "x"}]));
        assert_issue(
            &name_use,
            IssueCode::CodeInvalid,
            "Patient.name[0].use",
            "name-use",
        );
        assert_valid(&patient_with(
            "name",
            json!([{"use": "nickname", "family": "x"}]),
        ));
    }

    #[test]
    fn unlisted_value_sets_accept_any_code() {
        let attachment = json!([{"contentType": "application/x-synthetic"}]);
        assert_valid(&patient_with("photo", attachment));
    }

    // Contained resources and local references

    fn with_contained(contained: Value, performer: Value) -> Value {
        let mut resource = observation_with("performer", performer);
        resource["contained"] = contained;
        resource
    }

    #[test]
    fn referenced_contained_resource_is_valid() {
        let resource = with_contained(
            json!([{"resourceType": "Practitioner", "id": "p1"}]),
            json!([{"reference": "#p1"}]),
        );
        assert_valid(&resource);
    }

    #[test]
    fn contained_resource_needs_an_id() {
        let resource = with_contained(
            json!([{"resourceType": "Practitioner"}]),
            json!([{"display": "x"}]),
        );
        let expression = "Observation.contained[0].id";
        assert_issue(&resource, IssueCode::Required, expression, "has no id");
    }

    #[test]
    fn contained_resource_must_be_referenced() {
        let resource = with_contained(
            json!([{"resourceType": "Practitioner", "id": "p1"}]),
            json!([{"reference": "Practitioner/p1"}]),
        );
        assert_issue(
            &resource,
            IssueCode::Invariant,
            "Observation.contained[0]",
            "dom-3",
        );
    }

    #[test]
    fn contained_may_reference_its_container() {
        let provenance = json!({
            "resourceType": "Provenance",
            "id": "prov1",
            "target": [{"reference": "#"}],
            "recorded": "2020-01-01T00:00:00Z",
            "agent": [{"who": {"display": "synthetic"}}]
        });
        assert_valid(&observation_with("contained", json!([provenance])));

        let top_level = observation_with("performer", json!([{"reference": "#"}]));
        let expression = "Observation.performer[0].reference";
        assert_issue(
            &top_level,
            IssueCode::Invariant,
            expression,
            "to the container",
        );
    }

    #[test]
    fn canonical_local_reference_counts_as_use() {
        let resource = json!({
            "resourceType": "QuestionnaireResponse",
            "status": "completed",
            "questionnaire": "#q1",
            "contained": [{"resourceType": "Questionnaire", "id": "q1", "status": "active"}]
        });
        assert_valid(&resource);
    }

    #[test]
    fn local_reference_must_match_contained() {
        let resource = with_contained(
            json!([{"resourceType": "Practitioner", "id": "p1"}]),
            json!([{"reference": "#p1"}, {"reference": "#p2"}]),
        );
        let expression = "Observation.performer[1].reference";
        assert_issue(&resource, IssueCode::Invariant, expression, "ref-1");

        let without_contained = observation_with("subject", json!({"reference": "#missing"}));
        let expression = "Observation.subject.reference";
        assert_issue(
            &without_contained,
            IssueCode::Invariant,
            expression,
            "ref-1",
        );
    }

    #[test]
    fn contained_resources_cannot_nest() {
        let nested = json!({"resourceType": "Organization", "id": "o1"});
        let resource = with_contained(
            json!([{"resourceType": "Practitioner", "id": "p1", "contained": [nested]}]),
            json!([{"reference": "#p1"}]),
        );
        let expression = "Observation.contained[0].contained";
        assert_issue(&resource, IssueCode::Invariant, expression, "dom-2");
    }

    #[test]
    fn contained_meta_is_restricted() {
        let meta = json!({"versionId": "2", "security": [{"code": "R"}]});
        let resource = with_contained(
            json!([{"resourceType": "Practitioner", "id": "p1", "meta": meta}]),
            json!([{"reference": "#p1"}]),
        );
        let expression = "Observation.contained[0].meta";
        assert_issue(&resource, IssueCode::Invariant, expression, "dom-4");
        let expression = "Observation.contained[0].meta.security";
        assert_issue(&resource, IssueCode::Invariant, expression, "dom-5");
    }

    #[test]
    fn duplicate_contained_ids_are_rejected() {
        let resource = with_contained(
            json!([
                {"resourceType": "Practitioner", "id": "p1"},
                {"resourceType": "Organization", "id": "p1"}
            ]),
            json!([{"reference": "#p1"}]),
        );
        let expression = "Observation.contained[1].id";
        assert_issue(&resource, IssueCode::Invariant, expression, "duplicate");
    }

    #[test]
    fn bundle_entries_have_own_local_scope() {
        let with_practitioner = with_contained(
            json!([{"resourceType": "Practitioner", "id": "p1"}]),
            json!([{"reference": "#p1"}]),
        );
        let without_practitioner = observation_with("performer", json!([{"reference": "#p1"}]));
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"fullUrl": UUID_1, "resource": with_practitioner},
                {"fullUrl": UUID_2, "resource": without_practitioner}
            ]
        });
        let expression = "Bundle.entry[1].resource.performer[0].reference";
        assert_issue(&bundle, IssueCode::Invariant, expression, "ref-1");
        assert_eq!(issues_of(&bundle).len(), 1, "{:#?}", issues_of(&bundle));
    }

    // Extensions

    #[test]
    fn nested_extensions_are_valid() {
        let category = json!({"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3"});
        let extension = json!([{
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
            "extension": [
                {"url": "ombCategory", "valueCoding": category},
                {"url": "text", "valueString": "Synthetic"}
            ]
        }]);
        assert_valid(&patient_with("extension", extension.clone()));
        assert_valid(&patient_with("modifierExtension", extension));
    }

    #[test]
    fn extension_needs_value_or_children() {
        let neither = patient_with("extension", json!([{"url": "http://example.org/x"}]));
        assert_issue(
            &neither,
            IssueCode::Invariant,
            "Patient.extension[0]",
            "ext-1",
        );

        let both = json!([{
            "url": "http://example.org/x",
            "valueBoolean": true,
            "extension": [{"url": "y", "valueBoolean": false}]
        }]);
        let both = patient_with("extension", both);
        assert_issue(&both, IssueCode::Invariant, "Patient.extension[0]", "ext-1");
    }

    #[test]
    fn extension_values_are_typed() {
        let bad_date = json!([{"url": "http://example.org/x", "valueDate": "2020-02-30"}]);
        let resource = patient_with("modifierExtension", bad_date);
        let expression = "Patient.modifierExtension[0].value.ofType(date)";
        assert_issue(&resource, IssueCode::Value, expression, "invalid date");

        let meta_value = json!([{"url": "http://example.org/x", "valueMeta": {"versionId": "1"}}]);
        assert_valid(&patient_with("extension", meta_value));

        let resource_value = json!([{"url": "http://example.org/x", "valuePatient": {}}]);
        let resource = patient_with("extension", resource_value);
        let expression = "Patient.extension[0].valuePatient";
        assert_issue(
            &resource,
            IssueCode::Structure,
            expression,
            "unknown element",
        );
    }

    // Bundle invariants

    fn bundle_of(bundle_type: &str, entries: Value) -> Value {
        json!({"resourceType": "Bundle", "type": bundle_type, "entry": entries})
    }

    #[test]
    fn bundle_request_and_response_rules() {
        let patient = json!({"resourceType": "Patient"});
        let get = json!({"method": "GET", "url": "Patient"});

        let transaction = bundle_of(
            "transaction",
            json!([{"fullUrl": UUID_1, "resource": patient}]),
        );
        let expression = "Bundle.entry[0].request";
        assert_issue(&transaction, IssueCode::Invariant, expression, "bdl-3");

        let collection = bundle_of("collection", json!([{"resource": patient, "request": get}]));
        assert_issue(&collection, IssueCode::Invariant, expression, "bdl-3");

        let response = bundle_of("transaction-response", json!([{"resource": patient}]));
        let expression = "Bundle.entry[0].response";
        assert_issue(&response, IssueCode::Invariant, expression, "bdl-4");

        let search = json!([{"resource": patient, "search": {"mode": "match"}}]);
        let search = bundle_of("collection", search);
        assert_issue(
            &search,
            IssueCode::Invariant,
            "Bundle.entry[0].search",
            "bdl-2",
        );

        let mut total = bundle_of("collection", json!([{"resource": patient}]));
        total["total"] = json!(1);
        assert_issue(&total, IssueCode::Invariant, "Bundle.total", "bdl-1");

        let empty_entry = bundle_of("collection", json!([{"fullUrl": UUID_1}]));
        assert_issue(
            &empty_entry,
            IssueCode::Invariant,
            "Bundle.entry[0]",
            "bdl-5",
        );
    }

    #[test]
    fn bundle_full_url_rules() {
        let patient = json!({"resourceType": "Patient", "id": "1"});
        let expression = "Bundle.entry[0].fullUrl";

        let relative = json!([{"fullUrl": "Patient/1", "resource": patient}]);
        let relative = bundle_of("collection", relative);
        assert_issue(&relative, IssueCode::Invariant, expression, "absolute URL");

        let versioned_url = "http://example.org/fhir/Patient/1/_history/2";
        let versioned = json!([{"fullUrl": versioned_url, "resource": patient}]);
        let versioned = bundle_of("collection", versioned);
        assert_issue(&versioned, IssueCode::Invariant, expression, "bdl-8");

        let other_id =
            json!([{"fullUrl": "http://example.org/fhir/Patient/2", "resource": patient}]);
        let other_id = bundle_of("collection", other_id);
        assert_issue(&other_id, IssueCode::Invariant, expression, "type and id");

        let entry = json!({"fullUrl": "http://example.org/fhir/Patient/1", "resource": patient});
        let duplicated = bundle_of("collection", json!([entry, entry]));
        let expression = "Bundle.entry[1].fullUrl";
        assert_issue(&duplicated, IssueCode::Invariant, expression, "bdl-7");

        let mut first = entry.clone();
        first["resource"]["meta"] = json!({"versionId": "1"});
        let mut second = entry.clone();
        second["resource"]["meta"] = json!({"versionId": "2"});
        assert_valid(&bundle_of("collection", json!([first, second])));
    }

    #[test]
    fn document_and_message_bundle_rules() {
        let entries = json!([{"fullUrl": UUID_1, "resource": {"resourceType": "Patient"}}]);
        let document = bundle_of("document", entries.clone());
        assert_issue(
            &document,
            IssueCode::Invariant,
            "Bundle.identifier",
            "bdl-9",
        );
        assert_issue(
            &document,
            IssueCode::Invariant,
            "Bundle.timestamp",
            "bdl-10",
        );
        assert_issue(&document, IssueCode::Invariant, "Bundle.entry", "bdl-11");
        let message = bundle_of("message", entries);
        assert_issue(&message, IssueCode::Invariant, "Bundle.entry", "bdl-12");
    }

    #[test]
    fn bundle_entry_resources_are_validated() {
        let patient = json!({"resourceType": "Patient", "gender": "f"});
        let bundle = bundle_of(
            "collection",
            json!([{"fullUrl": UUID_1, "resource": patient}]),
        );
        let expression = "Bundle.entry[0].resource.gender";
        assert_issue(
            &bundle,
            IssueCode::CodeInvalid,
            expression,
            "administrative-gender",
        );

        let misspelled = json!([{"resource": {"resourceType": "Pateint"}}]);
        let misspelled = bundle_of("collection", misspelled);
        let expression = "Bundle.entry[0].resource.resourceType";
        assert_issue(
            &misspelled,
            IssueCode::Value,
            expression,
            "not an R4 resource type",
        );
    }

    #[test]
    fn parameters_resource_is_validated() {
        let patient = json!({"resourceType": "Patient", "birthDate": "1970-13"});
        let parameters = json!({
            "resourceType": "Parameters",
            "parameter": [{"name": "patient", "resource": patient}]
        });
        let expression = "Parameters.parameter[0].resource.birthDate";
        assert_issue(&parameters, IssueCode::Value, expression, "invalid date");
    }

    // Bounds and robustness

    #[test]
    fn deep_nesting_is_bounded() {
        let mut extension = json!({"url": "http://example.org/leaf", "valueBoolean": true});
        for _ in 0..300 {
            extension = json!({"url": "http://example.org/branch", "extension": [extension]});
        }
        let issues = issues_of(&patient_with("extension", json!([extension])));
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].code, IssueCode::TooLong);
        assert!(issues[0].diagnostics.contains("nesting exceeds"));

        let mut bundle = json!({"resourceType": "Patient"});
        for _ in 0..100 {
            bundle = bundle_of("collection", json!([{"resource": bundle}]));
        }
        let issues = issues_of(&bundle);
        let has_depth_issue = issues.iter().any(|issue| issue.code == IssueCode::TooLong);
        assert!(has_depth_issue, "{issues:#?}");
    }

    #[test]
    fn issue_count_is_bounded() {
        let mut patient = json!({"resourceType": "Patient"});
        for index in 0..500 {
            patient[format!("unknown{index}")] = json!(true);
        }
        let issues = issues_of(&patient);
        assert_eq!(issues.len(), MAX_ISSUES + 1);
        assert_eq!(issues[MAX_ISSUES].code, IssueCode::Informational);
        assert_eq!(issues[MAX_ISSUES].severity, Severity::Information);
    }

    #[test]
    fn diagnostics_never_echo_values() {
        let marker = "Synthetic Secret 0042";
        let resource = json!({
            "resourceType": "Patient",
            "id": marker,
            "gender": marker,
            "birthDate": marker,
            "active": marker,
            "multipleBirthInteger": marker,
            "name": [{"family": marker, "given": marker, "use": marker}],
            "telecom": [{"system": marker, "value": "\u{07}Synthetic Secret 0042"}],
            "text": {"status": marker, "div": marker},
            "contained": [{"resourceType": marker}],
            "extension": [{"url": marker}],
            marker: marker
        });
        let issues = issues_of(&resource);
        assert!(issues.len() >= 12, "{issues:#?}");
        for issue in &issues {
            assert!(
                !issue.diagnostics.contains("Secret"),
                "diagnostics leak a value: {issue}"
            );
            assert!(
                !issue.expression.contains("Secret"),
                "expression leaks a value: {issue}"
            );
        }
    }

    #[test]
    fn issue_codes_use_fhir_spelling() {
        assert_eq!(IssueCode::CodeInvalid.as_str(), "code-invalid");
        assert_eq!(IssueCode::NotSupported.as_str(), "not-supported");
        assert_eq!(IssueCode::Structure.as_str(), "structure");
        assert_eq!(Severity::Error.as_str(), "error");
    }

    #[test]
    fn paths_index_repeated_elements() {
        let name = json!([{"family": "x"}, {"given": ["Ann", "Bo\u{01}"]}]);
        let resource = patient_with("name", name);
        let expression = "Patient.name[1].given[1]";
        assert_issue(&resource, IssueCode::Value, expression, "control character");
    }
}
