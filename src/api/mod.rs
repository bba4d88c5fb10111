//! The HTTP API: FHIR R4 REST under `/fhir`, plus `/health`.
//!
//! [`app`] builds the router. Every handler authenticates the bearer token, checks the role's
//! permission, validates input before anything is written, and returns errors as a FHIR
//! `OperationOutcome` ([`ApiError`]). Every read of health data first appends a chart-accessed
//! event and fails with 503 when that event cannot be made durable.

mod access;
mod audit;
mod capability;
mod error;
mod json;
mod rest;
mod transaction;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use chartlog_projections::ChartProjection;
use tokio::sync::watch;

use crate::auth::{Action, Authenticator, Principal};
use crate::crypto::KeyStore;
use crate::journal::AccessJournal;
use crate::log::ownership::Role;
use crate::log::{EventLog, Frontier};
use crate::node::Node;
use crate::projector::ProjectorStatus;
use crate::writer::Writer;

pub use error::ApiError;

/// Largest request body accepted, in bytes (64 MiB): room for a transaction Bundle of a
/// patient's whole history, while a single resource is bounded by the envelope limit.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How long a request waits for the projection to reach its own write before giving up.
const READ_YOUR_WRITES_TIMEOUT: Duration = Duration::from_secs(10);

/// Maximum age of the log's end before `/health` and `/metrics` report the lag as unknown. An
/// idle projector fetches the end about every 0.7 s (a 200 ms read, then a 500 ms wait).
const END_CURRENT_FOR: Duration = Duration::from_secs(15);

/// How long the projector may retry one failure before `/health` reports `degraded`. It is
/// longer than the back-off after a short broker hiccup.
const PROJECTOR_STUCK_AFTER: Duration = Duration::from_secs(30);

/// Returns the projection's lag behind the log's end, or `None` when the end was not
/// confirmed lately, so that a node that cannot reach the log does not report a lag of 0.
fn projection_lag(
    log_end: &Frontier,
    end_age: Option<Duration>,
    applied: &Frontier,
) -> Option<u64> {
    let current = end_age.is_some_and(|age| age <= END_CURRENT_FOR);
    current.then(|| log_end.beyond(applied))
}

/// Returns whether the projector has been retrying one failure for longer than a short outage.
fn projector_stuck(status: &ProjectorStatus) -> bool {
    status
        .retrying
        .as_ref()
        .is_some_and(|retrying| retrying.since.elapsed() >= PROJECTOR_STUCK_AFTER)
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// Command submission.
    pub writer: Writer,
    /// The chart read model.
    pub projection: Arc<ChartProjection>,
    /// Keys for opening stored envelopes.
    pub keys: Arc<KeyStore>,
    /// The log, for health reporting.
    pub log: Arc<dyn EventLog>,
    /// Projector status.
    pub projector: watch::Receiver<ProjectorStatus>,
    /// Accesses waiting for the log.
    pub access_journal: Arc<AccessJournal>,
    /// Token validation.
    pub authenticator: Arc<Authenticator>,
    /// Base URL of the FHIR endpoint as clients reach it, for fullUrl and Location.
    pub base_url: Arc<str>,
    /// On Kafka, this node's role: owner of the log or standby. `None` on the embedded log.
    pub role: Option<watch::Receiver<Role>>,
    /// On Kafka, why this node's attempts to take the log over keep failing, if they do.
    pub take_over_error: Option<watch::Receiver<Option<String>>>,
}

impl AppState {
    /// Builds the handlers' state over a started node.
    pub fn new(node: &Node, authenticator: Arc<Authenticator>, base_url: &str) -> AppState {
        AppState {
            writer: node.writer.clone(),
            projection: node.projection.clone(),
            keys: node.keys.clone(),
            log: node.log.clone(),
            projector: node.projector.clone(),
            access_journal: node.access_journal.clone(),
            authenticator,
            base_url: base_url.trim_end_matches('/').into(),
            role: node.role.clone(),
            take_over_error: node.take_over_error.clone(),
        }
    }

    /// Waits until the chart projection includes every entry before `end` in each partition.
    async fn wait_for_projection(&self, end: &Frontier) -> Result<(), ApiError> {
        let mut status = self.projector.clone();
        let waited = tokio::time::timeout(
            READ_YOUR_WRITES_TIMEOUT,
            status.wait_for(|status| status.applied.covers(end) || status.halted.is_some()),
        )
        .await;
        match waited {
            Ok(Ok(status)) if status.halted.is_none() => Ok(()),
            _ => Err(ApiError::unavailable(
                "the chart projection is behind the log",
            )),
        }
    }
}

/// The caller of a request: the authenticated principal, the purpose of use and the client's
/// address.
pub struct Caller {
    /// The authenticated principal.
    pub principal: Principal,
    /// Purpose of use for this request.
    pub purpose_of_use: String,
    /// The client's address as the server saw it.
    pub client_address: String,
}

/// Purpose of use codes a client may name in `X-Purpose-Of-Use` (HL7 v3 PurposeOfUse).
const PURPOSES_OF_USE: &[&str] = &[
    "TREAT", "ETREAT", "HPAYMT", "HOPERAT", "PATRQT", "PUBHLTH", "HRESCH", "LEGAL", "COC",
];

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let authorization = parts
            .headers
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        let principal = state
            .authenticator
            .authenticate(authorization)
            .map_err(|error| {
                tracing::info!(reason = %error, "authentication failed");
                ApiError::unauthenticated()
            })?;
        let purpose_of_use = match parts.headers.get("x-purpose-of-use") {
            None => principal.default_purpose().to_owned(),
            Some(value) => {
                let text = value.to_str().unwrap_or("");
                if !PURPOSES_OF_USE.contains(&text) {
                    return Err(ApiError::invalid(
                        "X-Purpose-Of-Use",
                        "unknown purpose of use; expected an HL7 v3 PurposeOfUse code such as TREAT",
                    ));
                }
                text.to_owned()
            }
        };
        let client_address = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or_else(|| "unknown".to_owned(), |info| info.0.to_string());
        Ok(Caller {
            principal,
            purpose_of_use,
            client_address,
        })
    }
}

impl Caller {
    /// Checks that the caller may perform `action` on `resource_type`.
    ///
    /// # Errors
    ///
    /// [`ApiError`] with status 403.
    pub fn require(&self, action: Action, resource_type: &str) -> Result<(), ApiError> {
        if self.principal.may(action, resource_type) {
            Ok(())
        } else {
            tracing::info!(subject = %self.principal.subject, resource_type, ?action, "permission denied");
            Err(ApiError::forbidden(action, resource_type))
        }
    }
}

/// Returns the value of a header as text, if present and valid.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Builds the router over `state`.
pub fn app(state: AppState) -> Router {
    let fhir = Router::new()
        .route("/", post(transaction::transaction))
        .route("/metadata", get(capability::metadata))
        .route(
            "/{resource_type}",
            post(rest::create).get(rest::search_type),
        )
        .route("/{resource_type}/_history", get(rest::type_history))
        .route("/{resource_type}/_search", post(rest::search_post))
        .route(
            "/{resource_type}/{id}",
            get(rest::read_or_operation)
                .put(rest::update)
                .delete(rest::delete),
        )
        .route(
            "/{resource_type}/{id}/{operation}",
            get(rest::patient_compartment),
        )
        .route("/{resource_type}/{id}/_history/{version}", get(rest::vread))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            route_to_owner,
        ));

    Router::new()
        .nest("/fhir", fhir)
        .route("/metadata", get(capability::metadata))
        .route("/health", get(health))
        .route("/health/owner", get(health_owner))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found_path() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(outcome_for_plain_errors))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|request: &axum::http::Request<axum::body::Body>| {
                    // The matched route, never the raw path: paths carry resource ids and
                    // query strings carry search values.
                    let route = request
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map_or("unmatched", |path| path.as_str())
                        .to_owned();
                    tracing::debug_span!("request", method = %request.method(), route)
                })
                // Errors are logged where they arise, with their cause. Logged again here, every
                // 503 of a standby's `/health/owner` to a load balancer's probe would be an error.
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                ),
        )
        .with_state(state)
}

/// Sends every FHIR request but `metadata` to the node that owns the Kafka log: a standby
/// that has found the owner responds with 307 to the owner's URL (the method and body go with a 307).
/// Every read appends its access event, so reads go to the owner too. While no owner is known
/// (the group is deciding, or the broker is away), the node serves requests itself: its writes
/// answer 503, and its reads are served with their accesses journaled. On every log, writes
/// answer 503 while the projector is halted.
async fn route_to_owner(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;

    // A write responds only once the projection includes it. With the projector halted it
    // would be appended and still get 503, so a retry would append it again.
    if is_write(&request) && state.projector.borrow().halted.is_some() {
        if let Some(refusal) = unauthenticated(&state, &request) {
            return refusal;
        }
        return ApiError::unavailable(
            "the chart projection stopped at a log entry that failed its checks; writes are rejected until an operator repairs the log (see /health)",
        )
        .into_response();
    }
    let Some(role) = &state.role else {
        return next.run(request).await;
    };
    if request.uri().path() == "/metadata" {
        return next.run(request).await;
    }
    let owner_url = match &*role.borrow() {
        Role::Standby {
            owner_url: Some(owner_url),
        } => Some(owner_url.clone()),
        _ => None,
    };
    let Some(owner_url) = owner_url else {
        // No owner known. This node's writer state is empty or stale unless it owns the log,
        // so a write checked against it would get a wrong result (a missing reference,
        // a stale version). Writes are rejected until the log is taken over; reads are served.
        if is_write(&request) && !state.log.is_owner() {
            if let Some(refusal) = unauthenticated(&state, &request) {
                return refusal;
            }
            return ApiError::unavailable(
                "no owner of the log is known at the moment; retry shortly",
            )
            .into_response();
        }
        return next.run(request).await;
    };
    if owner_url.trim_end_matches('/') == &*state.base_url {
        // Another member publishes this node's own URL: a redirect would come back here.
        tracing::error!(
            "the node that owns the log publishes this node's base URL; give every node its own --base-url"
        );
        return ApiError::unavailable(
            "invalid configuration: the log's owner has this node's base URL",
        )
        .into_response();
    }
    // Inside the nested router the path no longer has the `/fhir` prefix, which the owner's
    // base URL carries instead. The base itself (a transaction) is the root path here.
    let path = match request.uri().path() {
        "/" => "",
        path => path,
    };
    let query = request
        .uri()
        .query()
        .map_or(String::new(), |query| format!("?{query}"));
    let location = format!("{}{path}{query}", owner_url.trim_end_matches('/'));
    match axum::http::HeaderValue::from_str(&location) {
        Ok(value) => {
            let mut response = ApiError::redirect().into_response();
            response
                .headers_mut()
                .insert(axum::http::header::LOCATION, value);
            response
        }
        Err(_) => {
            tracing::error!(
                "the owner of the log publishes a base URL that is not a valid header value"
            );
            ApiError::unavailable("the owner of the log has an invalid base URL").into_response()
        }
    }
}

/// Returns the 401 response for a request without a valid bearer token, so that a client
/// whose token is wrong learns that first, rather than a 503 that a retry cannot cure.
fn unauthenticated(
    state: &AppState,
    request: &axum::extract::Request,
) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;

    let authorization = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok());
    match state.authenticator.authenticate(authorization) {
        Ok(_) => None,
        Err(error) => {
            tracing::info!(reason = %error, "authentication failed");
            Some(ApiError::unauthenticated().into_response())
        }
    }
}

/// Returns whether a FHIR request changes the record: every method but GET and HEAD, except
/// a search sent as a POST.
fn is_write(request: &axum::extract::Request) -> bool {
    let method = request.method();
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return false;
    }
    !(method == axum::http::Method::POST && request.uri().path().ends_with("/_search"))
}

/// `GET /health/owner`: 200 on the node that writes the log, 503 on every other, so a load
/// balancer in front of several nodes can send clients to the owner alone.
async fn health_owner(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;

    let role = state.role.as_ref().map(|role| role.borrow().clone());
    let is_owner = matches!(role, None | Some(Role::Owner)) && state.writer.is_healthy();
    let name = role.as_ref().map_or("owner", Role::name);
    let code = if is_owner {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(serde_json::json!({"role": name, "accepting_writes": is_owner})),
    )
        .into_response()
}

/// Returns whether a write sent to this node now would be appended: it owns the log, its
/// writer's last append succeeded and its projector runs. `/health` and `/metrics` both
/// report this value, so they cannot disagree.
fn accepts_writes(state: &AppState, status: &ProjectorStatus) -> bool {
    let is_owner = state
        .role
        .as_ref()
        .is_none_or(|role| *role.borrow() == Role::Owner);
    is_owner && state.writer.is_healthy() && status.halted.is_none()
}

async fn health(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;

    let status = state.projector.borrow().clone();
    let log_end = state.log.end_position().borrow().clone();
    let end_age = state.log.end_age();
    let lag = projection_lag(&log_end, end_age, &status.applied);
    let end_age_ms = end_age.map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    let stuck = projector_stuck(&status);
    let role = state.role.as_ref().map(|role| role.borrow().clone());
    let writer_healthy = state.writer.is_healthy();
    let accepting = accepts_writes(&state, &status);
    let journaled = *state.access_journal.pending().borrow();
    // A standby that has found the owner is healthy, because it follows the log and sends
    // clients there. One that has found none cannot have a write served anywhere.
    let no_owner_known = matches!(
        role,
        Some(Role::Undecided | Role::Standby { owner_url: None })
    );
    // An owner that publishes this node's own base URL cannot be redirected to, so this node
    // rejects writes with 503 as if no owner were known.
    let owner_has_own_url = matches!(
        &role,
        Some(Role::Standby { owner_url: Some(owner_url) })
            if owner_url.trim_end_matches('/') == &*state.base_url
    );
    // Only the owner appends, so only the owner's last append matters for health.
    let is_owner = matches!(role, None | Some(Role::Owner));
    let (code, node_state) = if status.halted.is_some()
        || stuck
        || (is_owner && !writer_healthy)
        || journaled > 0
        || no_owner_known
        || owner_has_own_url
    {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "degraded")
    } else {
        (axum::http::StatusCode::OK, "ok")
    };
    let mut ownership = match &role {
        None => serde_json::Value::Null,
        Some(Role::Standby { owner_url }) => {
            serde_json::json!({"role": "standby", "owner_url": owner_url})
        }
        Some(role) => serde_json::json!({"role": role.name()}),
    };
    // The reason names charts and positions, never contents.
    let take_over_error = state
        .take_over_error
        .as_ref()
        .and_then(|error| error.borrow().clone());
    if let (Some(fields), Some(error)) = (ownership.as_object_mut(), take_over_error) {
        fields.insert("take_over_error".into(), error.into());
    }
    if let (Some(fields), true) = (ownership.as_object_mut(), owner_has_own_url) {
        let problem = "the owner publishes this node's base URL, so clients cannot be redirected to it; give every node its own --base-url";
        fields.insert("problem".into(), problem.into());
    }
    let body = serde_json::json!({
        "status": node_state,
        "log": {
            "backend": state.log.backend_name(),
            "end_position": log_end.total(),
            "partition_ends": log_end.offsets(),
            "accepting_writes": accepting,
            "ownership": ownership,
        },
        "access_journal": {"pending": journaled, "quarantined": *state.access_journal.quarantined().borrow()},
        "projections": {"chart": {
            "applied_position": status.applied.total(),
            "applied_positions": status.applied.offsets(),
            "lag_events": lag,
            "end_age_ms": end_age_ms,
            "halted": status.halted.is_some(),
            "retrying": status.retrying.as_ref().map(|retrying| serde_json::json!({
                "for_seconds": retrying.since.elapsed().as_secs(),
                "attempts": retrying.attempts,
                "reason": retrying.reason,
            })),
        }},
    });
    (code, axum::Json(body)).into_response()
}

/// `GET /metrics`: the node's state in the Prometheus text format. Labels name projections
/// and backends only, never ids of patients or resources.
async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::response::Response {
    use std::fmt::Write;

    use axum::response::IntoResponse;

    let status = state.projector.borrow().clone();
    let log_end = state.log.end_position().borrow().clone();
    let mut body = String::new();
    let mut metric = |kind: &str, name: &str, help: &str, labels: &str, value: u64| {
        let _ = writeln!(body, "# HELP {name} {help}");
        let _ = writeln!(body, "# TYPE {name} {kind}");
        let _ = writeln!(body, "{name}{labels} {value}");
    };
    metric(
        "gauge",
        "chartlog_log_end_position",
        "Positions one past the last entry of each partition of the log, summed.",
        "",
        log_end.total(),
    );
    metric(
        "counter",
        "chartlog_log_readers_replaced_total",
        "Log readers whose client was replaced after it fetched nothing while its partition contained more.",
        "",
        state.log.readers_replaced(),
    );
    metric(
        "gauge",
        "chartlog_log_partitions",
        "Partitions of the log.",
        "",
        u64::from(state.log.partitions()),
    );
    metric(
        "gauge",
        "chartlog_projection_applied_position",
        "Next position the projection will apply in each partition, summed.",
        "{projection=\"chart\"}",
        status.applied.total(),
    );
    let lag = projection_lag(&log_end, state.log.end_age(), &status.applied);
    metric(
        "gauge",
        "chartlog_projection_lag_known",
        "1 when the log's end was confirmed in the last 15 s, so that the lag below is current.",
        "{projection=\"chart\"}",
        u64::from(lag.is_some()),
    );
    metric(
        "gauge",
        "chartlog_projection_retrying_seconds",
        "Seconds the projection has been retrying an entry it could not read or open; 0 when it is not.",
        "{projection=\"chart\"}",
        status
            .retrying
            .as_ref()
            .map_or(0, |retrying| retrying.since.elapsed().as_secs()),
    );
    metric(
        "gauge",
        "chartlog_projection_halted",
        "1 when the projection stopped on an entry that failed its checks.",
        "{projection=\"chart\"}",
        u64::from(status.halted.is_some()),
    );
    metric(
        "gauge",
        "chartlog_log_accepting_writes",
        "1 when this node owns the log, its writer's last append succeeded and its projector runs.",
        "",
        u64::from(accepts_writes(&state, &status)),
    );
    metric(
        "gauge",
        "chartlog_log_owner",
        "1 when this node writes the log: always on the embedded log; on Kafka, while the owner group assigns it the partition.",
        "",
        u64::from(
            state
                .role
                .as_ref()
                .is_none_or(|role| *role.borrow() == Role::Owner),
        ),
    );
    metric(
        "gauge",
        "chartlog_access_journal_pending",
        "Accesses of reads served while the log was unreachable, waiting to be recorded on it.",
        "",
        *state.access_journal.pending().borrow(),
    );
    metric(
        "gauge",
        "chartlog_access_journal_quarantined",
        "Journaled accesses that can never be recorded on the log (altered, or their chart's data key is gone), kept aside for an operator.",
        "",
        *state.access_journal.quarantined().borrow(),
    );
    let counters = state.writer.append_counters();
    metric(
        "counter",
        "chartlog_log_appends_total",
        "Batches the writer appended: Kafka transactions, or syncs of the embedded log.",
        "",
        counters.batches.load(std::sync::atomic::Ordering::Relaxed),
    );
    metric(
        "counter",
        "chartlog_log_appended_events_total",
        "Events in those batches.",
        "",
        counters.events.load(std::sync::atomic::Ordering::Relaxed),
    );
    // An unknown lag is written as NaN rather than 0, so a node cut off from the log does not
    // look caught up.
    let lag_value = lag.map_or_else(|| "NaN".to_owned(), |lag| lag.to_string());
    let _ = writeln!(body, "# HELP chartlog_projection_lag_positions Log positions not yet applied to the projection; on Kafka this counts transaction markers too. NaN while the log's end is unknown.");
    let _ = writeln!(body, "# TYPE chartlog_projection_lag_positions gauge");
    let _ = writeln!(
        body,
        "chartlog_projection_lag_positions{{projection=\"chart\"}} {lag_value}"
    );
    let mut response = (axum::http::StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        "content-type",
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Turns error responses that axum's extractors produce as plain text (a body over the size
/// limit, for one) into OperationOutcomes, so every error a client sees has the FHIR shape.
async fn outcome_for_plain_errors(response: axum::response::Response) -> axum::response::Response {
    use axum::response::IntoResponse;

    let status = response.status();
    // FHIR errors and the JSON of /health pass as they are; only plain-text errors change.
    let is_json = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value.starts_with("application/fhir+json") || value.starts_with("application/json")
        });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let diagnostics = match status {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            format!("request body exceeds the limit of {MAX_BODY_BYTES} bytes")
        }
        axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "unsupported Content-Type; send application/fhir+json".to_owned()
        }
        other => format!("request rejected with status {}", other.as_u16()),
    };
    let outcome = serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": diagnostics}],
    });
    let mut replaced = (status, outcome.to_string()).into_response();
    replaced.headers_mut().insert(
        "content-type",
        axum::http::HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    replaced
}
