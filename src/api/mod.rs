//! The HTTP API: poem-openapi only. One file per resource, DTOs beside their handlers, one
//! error type ([`error::ApiError`]). Handlers authorize, validate, call `store`/`auth` and map
//! results; they hold no business rules of their own.
//!
//! Routes: `/api/v1/...` (the typed API), `/api/v1/openapi.json` (the spec), `/docs` (Swagger UI),
//! `/healthz` (process alive) and `/readyz` (database reachable, migrations current).

pub mod alerts;
pub mod audit;
pub mod auth;
pub mod blackouts;
pub mod body_errors;
pub mod breakers;
pub mod context;
pub mod document;
pub mod error;
pub mod executions;
pub mod intake;
pub mod jobs;
pub mod live;
pub mod optional_json;
pub mod pagination;
pub mod patch;
pub mod runbooks;
pub mod servers;
pub mod stats;
pub mod system;
pub mod system_config;
pub mod users;
pub mod webhook;

use std::sync::Arc;

use poem::http::StatusCode;
use poem::web::Data;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route, get, handler};
use poem_openapi::{OpenApiService, Tags};

use crate::config::Config;
pub use context::AppState;

/// Operation groups in the spec.
#[derive(Tags)]
pub enum Tag {
    /// Version and service metadata.
    System,
    /// Login, logout and API tokens.
    Auth,
    /// User accounts.
    Users,
    /// The audit log.
    Audit,
    /// Global settings.
    SystemConfig,
    /// The job queue: jobs, counts and workers.
    Queue,
    /// Runbook definitions, versions, YAML import/export and dry runs.
    Runbooks,
    /// Maintenance windows during which runbooks do not run.
    Blackouts,
    /// Per-runbook circuit breakers.
    CircuitBreakers,
    /// Execution statistics.
    Stats,
    /// Runs of runbooks: start, follow, cancel, approve.
    Executions,
    /// Managed servers, their credentials and connection tests.
    Servers,
    /// Alerts from Alertmanager: the webhook, its tokens, stored alerts and auto_analyze rules.
    Alerts,
}

/// The path prefix of the typed API.
pub const API_PREFIX: &str = "/api/v1";

fn service(state: &AppState) -> OpenApiService<impl poem_openapi::OpenApi, ()> {
    let apis = (
        system::SystemApi,
        auth::AuthApi {
            state: state.clone(),
        },
        users::UsersApi {
            state: state.clone(),
        },
        audit::AuditApi {
            state: state.clone(),
        },
        system_config::SystemConfigApi {
            state: state.clone(),
        },
        jobs::JobsApi {
            state: state.clone(),
        },
        runbooks::RunbooksApi {
            state: state.clone(),
        },
        blackouts::BlackoutsApi {
            state: state.clone(),
        },
        breakers::BreakersApi {
            state: state.clone(),
        },
        stats::StatsApi {
            state: state.clone(),
        },
        executions::ExecutionsApi {
            state: state.clone(),
        },
        servers::ServersApi {
            state: state.clone(),
        },
        alerts::AlertsApi {
            state: state.clone(),
        },
        webhook::WebhookApi {
            state: state.clone(),
        },
    );
    OpenApiService::new(apis, "aiops", crate::VERSION)
        .description(
            "Auto-remediation platform: Alertmanager alerts in, durable runbook workflows out. \
             Authenticate with `Authorization: Bearer <token>` from `auth_login` or `token_create`. \
             Every operation's description states the least role it needs \
             (admin > engineer > operator > viewer).",
        )
        .server(API_PREFIX)
}

/// The OpenAPI document the code emits, as pretty JSON, as served and committed (see
/// [`document`]). Needs no database.
pub fn spec_json() -> String {
    document::complete(&raw_spec_json())
}

/// poem-openapi's document, before [`document::complete`].
pub(crate) fn raw_spec_json() -> String {
    // The lazy pool never connects, but sqlx needs a runtime to create it.
    let own_runtime = match tokio::runtime::Handle::try_current() {
        Ok(_) => None,
        Err(_) => Some(
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime builds"),
        ),
    };
    let _guard = own_runtime.as_ref().map(|rt| rt.enter());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/unused")
        .expect("a constant URL parses");
    let state = AppState::new(pool, Arc::new(Config::default()))
        .expect("the default configuration names no secret key file");
    let mut spec = service(&state).spec();
    spec.push('\n');
    spec
}

#[handler]
fn healthz() -> poem::web::Json<serde_json::Value> {
    poem::web::Json(serde_json::json!({ "status": "alive" }))
}

#[handler]
async fn readyz(state: Data<&AppState>) -> Response {
    let mut checked = crate::store::migrations_current(&state.pool).await;
    if checked.as_ref().is_err_and(|e| e.is_connection_lost()) {
        // The connection it used was broken by a database restart, which also retired the
        // others opened before it: asked once more, on a fresh one, the answer is the
        // database's, not the stale connection's.
        checked = crate::store::migrations_current(&state.pool).await;
    }
    match checked {
        Ok(true) => poem::web::Json(serde_json::json!({ "status": "ready" })).into_response(),
        Ok(false) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "database migrations are not current; run `aiops migrate`",
        ),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "database unreachable",
            )
        }
    }
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = error::ErrorBody {
        code: code.to_owned(),
        message: message.to_owned(),
        details: None,
    };
    json_error(status, &body)
}

/// The error body exactly as the handlers' errors write it (absent details are left out, never
/// `null`, as the document declares).
fn json_error(status: StatusCode, body: &error::ErrorBody) -> Response {
    let value = poem_openapi::types::ToJSON::to_json(body).unwrap_or_default();
    poem::web::Json(value).with_status(status).into_response()
}

/// Reads the whole body up to the limit before any handler sees it, so oversized requests are
/// refused with 413 whether or not they declare a Content-Length.
async fn limit_body(max: usize, mut req: Request) -> Result<(Request, bytes::Bytes), Response> {
    if let Some(len) = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > max
    {
        return Err(error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!("request body of {len} bytes exceeds the limit of {max} bytes"),
        ));
    }
    match req.take_body().into_bytes_limit(max).await {
        Ok(bytes) => {
            req.set_body(bytes.clone());
            Ok((req, bytes))
        }
        Err(poem::error::ReadBodyError::PayloadTooLarge) => Err(error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!("request body exceeds the limit of {max} bytes"),
        )),
        Err(e) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("cannot read request body: {e}"),
        )),
    }
}

/// The whole HTTP application: API, spec, Swagger UI and probes, with one JSON error body for
/// every error and the request body limit applied.
pub fn app(state: AppState) -> impl Endpoint {
    let api = service(&state);
    let raw = api.spec();
    let document = document::complete(&raw);
    // Swagger UI embeds the document it shows; it shows the completed one.
    let docs_html = api.swagger_ui_html().replacen(&raw, &document, 1);
    let schemas = Arc::new(body_errors::BodySchemas::new(&document));
    let spec = poem::endpoint::make_sync(move |_| {
        Response::builder()
            .content_type("application/json")
            .body(document.clone())
    });
    let docs = poem::endpoint::make_sync(move |_| poem::web::Html(docs_html.clone()));
    let max = state.config.max_body_bytes;
    let pool = state.pool.clone();
    Route::new()
        .nest(API_PREFIX, api)
        .at(format!("{API_PREFIX}/openapi.json"), spec)
        .at("/docs", docs)
        .at("/healthz", get(healthz))
        .at("/readyz", get(readyz))
        .data(state)
        .around(move |ep, req| {
            let schemas = schemas.clone();
            let pool = pool.clone();
            async move {
                let method = req.method().as_str().to_owned();
                let path = req.uri().path().to_owned();
                let operation = path.strip_prefix(API_PREFIX).unwrap_or(&path).to_owned();
                let credentials = req
                    .headers()
                    .get(poem::http::header::AUTHORIZATION)
                    .cloned();
                // Two sets of credentials: which one was meant is not for the server to guess.
                if req
                    .headers()
                    .get_all(poem::http::header::AUTHORIZATION)
                    .iter()
                    .nth(1)
                    .is_some()
                {
                    return Ok(json_error(
                        StatusCode::BAD_REQUEST,
                        &error::ErrorBody::field_problem(
                            "bad_request",
                            Some("Authorization"),
                            "is given more than once; give one".to_owned(),
                        ),
                    ));
                }
                let (req, body) = match limit_body(max, req).await {
                    Ok(read) => read,
                    // A body over the limit is answered 413 only to a caller who may call the
                    // operation: one without credentials, or whose credentials do not
                    // authenticate or fall short of its role, learns that first.
                    Err(resp) if resp.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                        return Ok(refused_by_credentials(
                            &schemas,
                            &pool,
                            &method,
                            &operation,
                            credentials.as_ref(),
                        )
                        .await
                        .unwrap_or(resp));
                    }
                    Err(resp) => return Ok(resp),
                };
                let query = req.uri().query().map(str::to_owned);
                let json_body = req
                    .content_type()
                    .is_some_and(|c| c.starts_with("application/json"));
                // A NUL character anywhere; then a query parameter the operation does not
                // declare; then the body held to the document's types, since
                // poem-openapi reads a number or a boolean sent for a string field as its text
                // (`"name": false` becomes "false").
                // A request without credentials to an operation that needs them is answered
                // 401 by the operation, before anything about its input.
                let anonymous = credentials.is_none() && schemas.secured(&method, &operation);
                let refused = if anonymous {
                    None
                } else {
                    nul_in_request(&schemas, &operation, query.as_deref(), json_body, &body)
                        .or_else(|| {
                            schemas.undeclared_query_parameter(
                                &method,
                                &operation,
                                query.as_deref(),
                            )
                        })
                        .or_else(|| match (json_body, body.is_empty()) {
                            (true, false) => schemas.diagnose(&method, &operation, &body),
                            (true, true) => schemas.empty_body_problem(&method, &operation),
                            (false, _) => None,
                        })
                };
                let resp = 'answer: {
                    if let Some(offence) = refused {
                        break 'answer offence_response(offence);
                    }
                    match ep.call(req).await {
                        Ok(resp) => resp.into_response(),
                        Err(err) if err.is_from_response() => err.into_response(),
                        Err(err) => {
                            let status = err.status();
                            if status.is_server_error() {
                                tracing::error!(error = %err, "request failed");
                            }
                            let mut error_body = error::poem_error_body(&err);
                            // No such route, or not with this method: say which request it was.
                            // A path or query parameter that did not parse: named as the
                            // operation declares it, with what its value should be.
                            if err.is::<poem::error::NotFoundError>() {
                                error_body.message = format!("no endpoint {method} {path}");
                            } else if err.is::<poem::error::MethodNotAllowedError>() {
                                let allowed = schemas.allowed_methods(&operation).join(", ");
                                error_body.message =
                                    format!("{path} does not take {method} (it takes {allowed})");
                                let mut resp = json_error(status, &error_body);
                                if let Ok(value) = allowed.parse() {
                                    resp.headers_mut().insert(poem::http::header::ALLOW, value);
                                }
                                break 'answer resp;
                            } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
                                let takes =
                                    schemas.body_media_types(&method, &operation).join(", ");
                                error_body.message =
                                    format!("{}; it takes {takes}", error_body.message);
                            } else if status == StatusCode::BAD_REQUEST
                                && let Some(problem) = schemas.parameter_problem(
                                    &method,
                                    &operation,
                                    query.as_deref(),
                                    &error_body.message,
                                )
                            {
                                break 'answer offence_response(problem);
                            }
                            json_error(status, &error_body)
                        }
                    }
                };
                // Credentials that do not authenticate are answered 401 before anything about
                // the input, as missing ones are, and a role below the operation's least 403: a
                // caller with a revoked or mistyped token, or without the right, learns that
                // first. Checked only for requests refused for their input, which an operation
                // refuses before it authorizes (parameters and bodies are read first); an
                // answer after a successful authorization is kept.
                if credentials.is_some()
                    && matches!(resp.status().as_u16(), 400 | 415 | 422)
                    && let Some(refusal) = refused_by_credentials(
                        &schemas,
                        &pool,
                        &method,
                        &operation,
                        credentials.as_ref(),
                    )
                    .await
                {
                    return Ok(refusal);
                }
                Ok(resp)
            }
        })
}

/// The 401 or 403 a caller gets before anything about its request for an operation (a path
/// relative to the API prefix) it may not call: no credentials, credentials that do not
/// authenticate (user bearer tokens, or the Alertmanager webhook's tokens), or a role below the
/// operation's. `None` when the caller may call it, it is public or unknown, or that cannot be
/// told now.
async fn refused_by_credentials(
    schemas: &body_errors::BodySchemas,
    pool: &sqlx::PgPool,
    method: &str,
    operation: &str,
    credentials: Option<&poem::http::HeaderValue>,
) -> Option<Response> {
    if !schemas.secured(method, operation) {
        return None;
    }
    let webhook = schemas.webhook_secured(method, operation);
    match credentials {
        None if webhook => Some(webhook::unauthorized().into_response()),
        None => {
            Some(error::ApiError::from(crate::auth::AuthError::Unauthenticated).into_response())
        }
        Some(c) if webhook => webhook::credentials_refused(pool, c).await,
        Some(c) if schemas.bearer_secured(method, operation) => {
            credentials_refused(pool, c, schemas.least_role(method, operation)).await
        }
        Some(_) => None,
    }
}

/// What an operation that takes bearer tokens and needs role `least` answers to `credentials`
/// (an `Authorization` header) before anything else: 401 for something that is not a bearer
/// token or does not authenticate (unknown, expired, revoked, its user deactivated), 403 for a
/// caller whose role is below `least`. `None` when the caller may call the operation, or when
/// that cannot be told now (the database failed): then the answer already given stands.
async fn credentials_refused(
    pool: &sqlx::PgPool,
    credentials: &poem::http::HeaderValue,
    least: Option<crate::domain::role::Role>,
) -> Option<Response> {
    use crate::auth::AuthError;
    let token = credentials.to_str().ok().and_then(|value| {
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let refusal = match token {
        None => AuthError::Unauthenticated,
        Some(token) => match crate::auth::authenticate(pool, token).await {
            Err(AuthError::Unauthenticated) => AuthError::Unauthenticated,
            Err(_) => return None,
            Ok(identity) => match least {
                Some(least) => crate::auth::require(&identity, least).err()?,
                None => return None,
            },
        },
    };
    Some(error::ApiError::from(refusal).into_response())
}

/// A NUL character anywhere in a path or query parameter or a JSON body (PostgreSQL can keep
/// none): the field it is in, as the operation names it, and why it is refused.
fn nul_in_request(
    schemas: &body_errors::BodySchemas,
    operation: &str,
    query: Option<&str>,
    json_body: bool,
    body: &[u8],
) -> Option<body_errors::Offence> {
    let refused = |field: String, reason: &str| body_errors::Offence {
        field: Some(field),
        reason: reason.to_owned(),
        invalid_value: true,
    };
    if let Some(name) = schemas.parameter_with_nul(operation, query) {
        return Some(refused(name, crate::domain::text::NUL_REASON));
    }
    // JSON can only carry a NUL as the escape `\u0000`: bodies without one are not parsed here.
    if !json_body || !body.windows(6).any(|w| w == b"\\u0000") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let at = crate::domain::text::first_nul(&value)?;
    let field = if at.path.is_empty() {
        "body".to_owned()
    } else {
        at.path.clone()
    };
    Some(refused(field, at.reason()))
}

/// The error response for what does not fit the document: a value of the right type that is not
/// allowed (outside a declared bound, unstorable text) is invalid (422), like the values handlers
/// refuse; anything else is a bad request (400). Either names the field and the reason.
fn offence_response(offence: body_errors::Offence) -> Response {
    let (status, code) = if offence.invalid_value {
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    } else {
        (StatusCode::BAD_REQUEST, "bad_request")
    };
    json_error(
        status,
        &error::ErrorBody::field_problem(code, offence.field.as_deref(), offence.reason),
    )
}
