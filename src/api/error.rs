//! The one JSON error body of the API and its mapping from every lower-layer error.

use poem_openapi::{ApiResponse, Object, payload::Json};

use crate::auth::AuthError;
use crate::store::StoreError;

/// Where an error came from, when it concerns one field of the request.
#[derive(Debug, Clone, Default, Object)]
pub struct ErrorDetails {
    /// The offending field, as a path into the request (`role`, `steps[2].timeout_seconds`).
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
    /// Why the field was refused.
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
    /// 1-based line in a YAML request body, when the error has a position.
    #[oai(skip_serializing_if_is_none)]
    pub line: Option<u32>,
    /// 1-based column in a YAML request body, when the error has a position.
    #[oai(skip_serializing_if_is_none)]
    pub column: Option<u32>,
}

/// The body of every error response.
#[derive(Debug, Clone, Object)]
pub struct ErrorBody {
    /// Stable machine-readable code (`not_found`, `validation_failed`, ...).
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// The offending field, when there is one.
    #[oai(skip_serializing_if_is_none)]
    pub details: Option<ErrorDetails>,
}

/// Every error an operation can answer with.
#[derive(Debug, ApiResponse)]
#[oai(bad_request_handler = "bad_request_from_parse")]
pub enum ApiError {
    /// The request could not be parsed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No valid bearer token.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The caller's role is too low.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// The resource does not exist.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The request conflicts with the current state (duplicate name, wrong state).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The request body exceeds the configured size limit.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The request body is not of a media type the operation takes (see its `requestBody`).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The request parsed but a field is invalid.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// Too many attempts; retry later (after `Retry-After` seconds, when given).
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] Option<u32>),
    /// An unexpected failure; details are in the server log.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// A dependency (the database) is unavailable; retry later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

fn body(code: &str, message: impl Into<String>, field: Option<&str>) -> Json<ErrorBody> {
    Json(ErrorBody {
        code: code.to_owned(),
        message: message.into(),
        details: field.map(|f| ErrorDetails {
            field: Some(f.to_owned()),
            ..Default::default()
        }),
    })
}

/// Extracts the field name from poem-openapi's parse error messages, which quote it.
fn field_from_parse_message(message: &str) -> Option<String> {
    // Only backquoted names are fields; double-quoted ones are poem-openapi's type names
    // (`"integer(uint64)"`, `"ServerCreate"`), which would mislead as a field.
    for marker in ["field `", "parameter `"] {
        if let Some(start) = message.find(marker) {
            let rest = &message[start + marker.len()..];
            let end = rest.find(['`', '"'])?;
            let field = &rest[..end];
            if !field.is_empty() {
                return Some(field.to_owned());
            }
        }
    }
    None
}

fn bad_request_from_parse(err: poem::Error) -> ApiError {
    let message = err.to_string();
    if err.status() == poem::http::StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge(body("payload_too_large", message, None));
    }
    if err.status() == poem::http::StatusCode::UNSUPPORTED_MEDIA_TYPE {
        return ApiError::UnsupportedMediaType(body("unsupported_media_type", message, None));
    }
    if err.status() == poem::http::StatusCode::UNAUTHORIZED {
        // No credentials at all: said as a bad token is.
        return ApiError::Unauthorized(body(
            "unauthorized",
            crate::auth::AuthError::Unauthenticated.to_string(),
            None,
        ));
    }
    let field = field_from_parse_message(&message);
    ApiError::BadRequest(Json(ErrorBody {
        code: "bad_request".to_owned(),
        details: field.map(|f| ErrorDetails {
            field: Some(f),
            reason: Some(message.clone()),
            ..Default::default()
        }),
        message,
    }))
}

impl ApiError {
    /// 404 for a resource kind and id.
    pub fn not_found(what: &str, id: impl std::fmt::Display) -> Self {
        ApiError::NotFound(body("not_found", format!("{what} {id} not found"), None))
    }

    /// 422 naming the field and the reason.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ApiError::Unprocessable(Json(ErrorBody::field_problem(
            "validation_failed",
            Some(field),
            reason.into(),
        )))
    }

    /// 403 for a request the caller's role may not make with this field as given (the field
    /// named, and why).
    pub fn forbidden_field(field: &str, reason: impl Into<String>) -> Self {
        ApiError::Forbidden(Json(ErrorBody::field_problem(
            "forbidden",
            Some(field),
            reason.into(),
        )))
    }

    /// 400 or 422 for a problem in a document body, with the field path and, when known, the
    /// line and column in the YAML. `syntax` selects 400 (unreadable) over 422 (invalid).
    pub fn document(
        syntax: bool,
        message: impl Into<String>,
        field: Option<&str>,
        reason: impl Into<String>,
        position: Option<(u32, u32)>,
    ) -> Self {
        let body = Json(ErrorBody {
            code: if syntax {
                "bad_request"
            } else {
                "validation_failed"
            }
            .to_owned(),
            message: message.into(),
            details: Some(ErrorDetails {
                field: field.map(str::to_owned),
                reason: Some(reason.into()),
                line: position.map(|p| p.0),
                column: position.map(|p| p.1),
            }),
        });
        if syntax {
            ApiError::BadRequest(body)
        } else {
            ApiError::Unprocessable(body)
        }
    }

    /// 409 with a message.
    pub fn conflict(message: impl Into<String>, field: Option<&str>) -> Self {
        ApiError::Conflict(body("conflict", message, field))
    }

    /// 500, logging the cause once here so callers need not.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        ApiError::Internal(body("internal", "internal server error", None))
    }

    /// The status code, for logs and tests.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized(_) => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Unprocessable(_) => 422,
            ApiError::TooManyRequests(..) => 429,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
        }
    }
}

/// The field a unique constraint protects, for the 409 body.
fn field_of_constraint(constraint: &str) -> Option<&str> {
    let trimmed = constraint.strip_suffix("_key")?;
    let (_, column) = trimmed.split_once('_')?;
    // users_username_key -> username; system_config_pkey is not a named field.
    Some(column.rsplit_once('_').map_or(column, |(_, c)| c))
}

/// The column of a foreign key named `<table>_<column>_fkey`, as PostgreSQL names them, for
/// the columns the API writes (`runbook_id`, `server_id`, `initiated_by`: the column's last two
/// words).
fn field_of_foreign_key(constraint: &str) -> String {
    let words: Vec<&str> = constraint
        .strip_suffix("_fkey")
        .unwrap_or(constraint)
        .split('_')
        .collect();
    words[words.len().saturating_sub(2)..].join("_")
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::from(&e)
    }
}

impl From<&StoreError> for ApiError {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::Conflict(c) => {
                // The constraint's name stays in the logs; the caller learns the field.
                tracing::debug!(constraint = %c, "unique constraint refused a write");
                let reason = "is already used by another record";
                let field = field_of_constraint(c);
                ApiError::Conflict(Json(ErrorBody {
                    code: "conflict".to_owned(),
                    message: match field {
                        Some(f) => format!("{f} {reason}"),
                        None => "conflicts with an existing record".to_owned(),
                    },
                    details: field.map(|f| ErrorDetails {
                        field: Some(f.to_owned()),
                        reason: Some(reason.to_owned()),
                        ..Default::default()
                    }),
                }))
            }
            // A referenced row that went away while the request ran (a runbook deleted while a
            // run of it was being started): the caller learns the field, as for a unique key.
            StoreError::ForeignKey(c) => {
                tracing::debug!(constraint = %c, "foreign key refused a write");
                ApiError::invalid(
                    &field_of_foreign_key(c),
                    "refers to a record that does not exist (any more)",
                )
            }
            StoreError::Check(c) => ApiError::invalid(c, "violates a constraint"),
            // The pool gave up, or the server went away (a restart, an administrator's
            // termination): the database, not the request, failed.
            StoreError::Database(db)
                if matches!(db, sqlx::Error::PoolClosed) || e.is_connection_lost() =>
            {
                tracing::error!(error = %e, "database unavailable");
                ApiError::Unavailable(body("unavailable", "database unavailable", None))
            }
            StoreError::Database(_) => ApiError::internal(e),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from(e).into()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidCredentials | AuthError::Inactive | AuthError::Unauthenticated => {
                ApiError::Unauthorized(body("unauthorized", e.to_string(), None))
            }
            AuthError::Throttled { retry_after } => ApiError::TooManyRequests(
                body("too_many_requests", e.to_string(), None),
                Some(u32::try_from(crate::auth::retry_seconds(retry_after)).unwrap_or(u32::MAX)),
            ),
            AuthError::Busy => {
                ApiError::TooManyRequests(body("too_many_requests", e.to_string(), None), Some(1))
            }
            AuthError::Forbidden { .. } => {
                ApiError::Forbidden(body("forbidden", e.to_string(), None))
            }
            AuthError::Store(s) => s.into(),
        }
    }
}

impl ErrorBody {
    /// A body naming `field` (when known) and why it was refused; the message says both.
    pub fn field_problem(code: &str, field: Option<&str>, reason: String) -> ErrorBody {
        ErrorBody {
            code: code.to_owned(),
            message: match field {
                Some(f) => format!("{f}: {reason}"),
                None => reason.clone(),
            },
            details: Some(ErrorDetails {
                field: field.map(str::to_owned),
                reason: Some(reason),
                ..Default::default()
            }),
        }
    }
}

/// Turns any error poem raises outside our handlers (unknown route, wrong method, body too
/// large, missing credentials) into the same JSON body.
pub fn poem_error_body(err: &poem::Error) -> ErrorBody {
    let status = err.status();
    let code = match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "validation_failed",
        429 => "too_many_requests",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "error",
    };
    let message = if status.is_server_error() {
        "internal server error".to_owned()
    } else if status == poem::http::StatusCode::UNAUTHORIZED {
        // No credentials at all: said as a bad token is.
        crate::auth::AuthError::Unauthenticated.to_string()
    } else {
        err.to_string()
    };
    ErrorBody {
        code: code.to_owned(),
        details: field_from_parse_message(&message).map(|f| ErrorDetails {
            field: Some(f),
            ..Default::default()
        }),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_keys_map_to_their_column() {
        for (constraint, field) in [
            ("runbook_executions_runbook_id_fkey", "runbook_id"),
            ("runbook_executions_server_id_fkey", "server_id"),
            ("runbook_executions_initiated_by_fkey", "initiated_by"),
        ] {
            assert_eq!(field_of_foreign_key(constraint), field);
        }
    }

    #[test]
    fn constraint_names_map_to_fields() {
        assert_eq!(field_of_constraint("users_username_key"), Some("username"));
        assert_eq!(field_of_constraint("users_email_key"), Some("email"));
        assert_eq!(
            field_of_constraint("users_lower_username_key"),
            Some("username")
        );
        assert_eq!(field_of_constraint("users_lower_email_key"), Some("email"));
        assert_eq!(
            field_of_constraint("server_credentials_lower_name_key"),
            Some("name")
        );
    }

    #[test]
    fn parse_messages_name_fields() {
        assert_eq!(
            field_from_parse_message("failed to parse parameter `limit`: bad"),
            Some("limit".to_owned())
        );
        assert_eq!(
            field_from_parse_message(
                "parse request payload error: failed to parse \"integer(uint64)\": invalid integer"
            ),
            None
        );
    }
}
