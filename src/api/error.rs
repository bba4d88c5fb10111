//! `ApiError`: every failure of the HTTP API as a status code and a FHIR `OperationOutcome`.
//!
//! Texts name elements, parameters and ids, never values a client sent, because those can be
//! health data. For 5xx responses the client gets a generic text and the log gets the cause.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::Action;
use crate::command::CommandError;
use crate::fhir::validate::ValidationIssue;
use crate::writer::WriteError;

/// One issue of an OperationOutcome.
#[derive(Debug, Clone)]
pub struct Issue {
    /// `error` or `fatal`.
    pub severity: &'static str,
    /// FHIR issue-type code.
    pub code: String,
    /// FHIRPath of the element at fault, if any.
    pub expression: Option<String>,
    /// Description of the problem, without client values.
    pub diagnostics: String,
}

/// An error returned to the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The issues.
    pub issues: Vec<Issue>,
    /// Seconds after which a retry may succeed (sets Retry-After).
    pub retry_after_seconds: Option<u64>,
    /// Whether to send a WWW-Authenticate challenge.
    pub challenge: bool,
}

impl ApiError {
    fn single(
        status: StatusCode,
        code: &str,
        expression: Option<&str>,
        diagnostics: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            issues: vec![Issue {
                severity: "error",
                code: code.to_owned(),
                expression: expression.map(str::to_owned),
                diagnostics: diagnostics.into(),
            }],
            retry_after_seconds: None,
            challenge: false,
        }
    }

    /// 401 with a Bearer challenge.
    pub fn unauthenticated() -> ApiError {
        let mut error = Self::single(
            StatusCode::UNAUTHORIZED,
            "login",
            None,
            "a valid bearer token is required",
        );
        error.challenge = true;
        error
    }

    /// 403 for an action the caller's roles do not permit.
    pub fn forbidden(action: Action, resource_type: &str) -> ApiError {
        Self::single(
            StatusCode::FORBIDDEN,
            "forbidden",
            None,
            format!("the token's roles do not permit {action:?} on {resource_type}"),
        )
    }

    /// 400 for an invalid request element or parameter.
    pub fn invalid(expression: &str, diagnostics: impl Into<String>) -> ApiError {
        Self::single(
            StatusCode::BAD_REQUEST,
            "invalid",
            Some(expression),
            diagnostics,
        )
    }

    /// 400 for a body that is not JSON.
    pub fn malformed_json(reason: impl Into<String>) -> ApiError {
        Self::single(StatusCode::BAD_REQUEST, "structure", None, reason)
    }

    /// 422 for a rule that the content breaks (for example a reference to nothing).
    pub fn unprocessable(
        code: &str,
        expression: Option<&str>,
        diagnostics: impl Into<String>,
    ) -> ApiError {
        Self::single(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            expression,
            diagnostics,
        )
    }

    /// 404 for an unknown resource.
    pub fn not_found(resource_type: &str, id: &str) -> ApiError {
        Self::single(
            StatusCode::NOT_FOUND,
            "not-found",
            None,
            format!("{resource_type}/{id} not found"),
        )
    }

    /// 404 for an unknown path or resource type.
    pub fn not_found_path() -> ApiError {
        Self::single(
            StatusCode::NOT_FOUND,
            "not-supported",
            None,
            "no such endpoint or resource type",
        )
    }

    /// 410 for a deleted resource.
    pub fn gone(resource_type: &str, id: &str) -> ApiError {
        Self::single(
            StatusCode::GONE,
            "deleted",
            None,
            format!("{resource_type}/{id} is deleted"),
        )
    }

    /// 412 for a failed precondition.
    pub fn precondition(diagnostics: impl Into<String>) -> ApiError {
        Self::single(
            StatusCode::PRECONDITION_FAILED,
            "conflict",
            None,
            diagnostics,
        )
    }

    /// 409 for a conflicting write.
    pub fn conflict(diagnostics: impl Into<String>) -> ApiError {
        Self::single(StatusCode::CONFLICT, "conflict", None, diagnostics)
    }

    /// 413 for a resource too large to store.
    pub fn too_large(diagnostics: impl Into<String>) -> ApiError {
        Self::single(StatusCode::PAYLOAD_TOO_LARGE, "too-long", None, diagnostics)
    }

    /// 415 for a body that is not declared as JSON.
    pub fn unsupported_media_type() -> ApiError {
        Self::single(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            None,
            "unsupported Content-Type; send application/fhir+json",
        )
    }

    /// 405 for a method the endpoint does not offer.
    pub fn method_not_allowed() -> ApiError {
        Self::single(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            None,
            "method not allowed on this endpoint",
        )
    }

    /// 503 with Retry-After.
    pub fn unavailable(diagnostics: impl Into<String>) -> ApiError {
        let mut error = Self::single(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            None,
            diagnostics,
        );
        error.retry_after_seconds = Some(1);
        error
    }

    /// 307 to the node that owns the log; the caller sets `Location`.
    pub fn redirect() -> ApiError {
        let mut error = Self::single(
            StatusCode::TEMPORARY_REDIRECT,
            "transient",
            None,
            "this node stands by; the node that writes the log serves this request at the address in Location",
        );
        error.issues[0].severity = "information";
        error
    }

    /// 500; the detail goes to the log only.
    pub fn internal(context: &'static str, detail: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %detail, context, "internal error");
        Self::single(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            None,
            "internal error",
        )
    }

    /// 400 or 422 from validation issues: structure problems are 400, rule violations 422.
    pub fn from_validation(issues: Vec<ValidationIssue>) -> ApiError {
        let issues: Vec<Issue> = issues
            .into_iter()
            .map(|issue| Issue {
                severity: "error",
                code: issue.code.as_str().to_owned(),
                expression: Some(issue.expression),
                diagnostics: issue.diagnostics,
            })
            .collect();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            issues,
            retry_after_seconds: None,
            challenge: false,
        }
    }

    /// Prefixes every issue's expression, for errors inside a Bundle entry.
    pub fn within(mut self, prefix: &str) -> ApiError {
        for issue in &mut self.issues {
            issue.diagnostics = format!("{prefix}: {}", issue.diagnostics);
        }
        self
    }

    /// Returns the OperationOutcome resource.
    pub fn outcome(&self) -> serde_json::Value {
        let issues: Vec<serde_json::Value> = self
            .issues
            .iter()
            .map(|issue| {
                let mut value = serde_json::json!({
                    "severity": issue.severity,
                    "code": issue.code,
                    "diagnostics": issue.diagnostics,
                });
                if let Some(expression) = &issue.expression {
                    value["expression"] = serde_json::json!([expression]);
                }
                value
            })
            .collect();
        serde_json::json!({"resourceType": "OperationOutcome", "issue": issues})
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> ApiError {
        match &error {
            CommandError::NotFound {
                resource_type,
                resource_id,
            } => ApiError::unprocessable(
                "not-found",
                None,
                format!("{resource_type}/{resource_id} not found"),
            ),
            CommandError::Gone {
                resource_type,
                resource_id,
            } => ApiError::gone(resource_type, resource_id),
            CommandError::VersionConflict { .. } => ApiError::precondition(error.to_string()),
            CommandError::AlreadyExists { .. } => ApiError::conflict(error.to_string()),
            CommandError::DanglingReference { .. } => {
                ApiError::unprocessable("not-found", None, error.to_string())
            }
            CommandError::ChartChange { .. } => {
                ApiError::unprocessable("business-rule", None, error.to_string())
            }
            CommandError::TooLarge { .. } => ApiError::too_large(error.to_string()),
            CommandError::CommandIdReused(_) => ApiError::conflict(error.to_string()),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(error: WriteError) -> ApiError {
        match error {
            WriteError::Rejected(command) => command.into(),
            WriteError::Append(cause) => {
                tracing::error!(error = %cause, "write failed: log append");
                ApiError::unavailable("the log is not accepting writes; retry later")
            }
            WriteError::KeyStore(cause) => ApiError::internal("data key creation", &cause),
            WriteError::Stopped => ApiError::unavailable("writes are unavailable on this node"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.outcome().to_string();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/fhir+json; charset=utf-8"),
        );
        if let Some(seconds) = self.retry_after_seconds {
            headers.insert("retry-after", HeaderValue::from(seconds));
        }
        if self.challenge {
            headers.insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer realm=\"chartlog\", error=\"invalid_token\""),
            );
        }
        response
    }
}
