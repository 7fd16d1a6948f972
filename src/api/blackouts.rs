//! Blackout windows: CRUD (engineer), read (viewer), and "is this runbook/server blacked out now,
//! and why" (viewer).

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, param::Path, param::Query, payload::Json};
use uuid::Uuid;

use crate::domain::Role;
use crate::domain::blackout::{self, Recurrence, RunbookSelector, ServerSelector};
use crate::store::{self, StoreError, blackouts::BlackoutFields, blackouts::BlackoutRow};

use super::Tag;
use super::context::{AppState, BearerAuth};
use super::error::ApiError;
use super::pagination::Page;

/// How a window repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum RecurrenceName {
    /// Once, from start_time to end_time.
    None,
    /// Every day at the local time of start_time.
    Daily,
    /// Every week on the weekday and local time of start_time.
    Weekly,
    /// Every month on the day and local time of start_time.
    Monthly,
    /// At each fire time of `recurrence_pattern.cron`.
    Cron,
}

impl From<RecurrenceName> for Recurrence {
    fn from(r: RecurrenceName) -> Self {
        match r {
            RecurrenceName::None => Recurrence::None,
            RecurrenceName::Daily => Recurrence::Daily,
            RecurrenceName::Weekly => Recurrence::Weekly,
            RecurrenceName::Monthly => Recurrence::Monthly,
            RecurrenceName::Cron => Recurrence::Cron,
        }
    }
}

fn recurrence_name(s: &str) -> RecurrenceName {
    match s {
        "daily" => RecurrenceName::Daily,
        "weekly" => RecurrenceName::Weekly,
        "monthly" => RecurrenceName::Monthly,
        "cron" => RecurrenceName::Cron,
        _ => RecurrenceName::None,
    }
}

/// Timezone, cron expression and end of a recurring series.
#[derive(Debug, Clone, Default, Object)]
#[oai(deny_unknown_fields)]
pub struct RecurrencePattern {
    /// IANA timezone of the wall-clock times (default UTC).
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub timezone: Option<String>,
    /// Cron expression, required for `cron` windows: `min hour dom month dow` read as Unix cron
    /// (day of week 0 or 7 is Sunday, 1 Monday; when both the day of month and the day of week
    /// are restricted, a day matching either fires), on the wall clock of `timezone`.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub cron: Option<String>,
    /// No occurrence starts at or after this instant.
    #[oai(skip_serializing_if_is_none)]
    #[oai(nullable)]
    pub until: Option<DateTime<Utc>>,
}

/// Which servers a window covers (union of the criteria; all empty = every server).
#[derive(Debug, Clone, Default, Object)]
#[oai(deny_unknown_fields)]
pub struct AffectedServers {
    /// Specific servers.
    #[oai(default, nullable)]
    pub server_ids: Vec<Uuid>,
    /// Server tags: `name` or `name=value`.
    #[oai(default, nullable)]
    pub tags: Vec<String>,
    /// Server environments.
    #[oai(default, nullable)]
    pub environments: Vec<String>,
}

/// Which runbooks a window covers (union; all empty = every runbook).
#[derive(Debug, Clone, Default, Object)]
#[oai(deny_unknown_fields)]
pub struct AffectedRunbooks {
    /// Specific runbooks.
    #[oai(default, nullable)]
    pub ids: Vec<Uuid>,
    /// Runbook categories.
    #[oai(default, nullable)]
    pub categories: Vec<String>,
}

/// A window as written by clients.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct BlackoutWindowInput {
    /// Name (1 to 200 characters).
    #[oai(validator(min_length = 1, max_length = 200))]
    pub name: String,
    /// Purpose.
    #[oai(nullable)]
    pub description: Option<String>,
    /// Start of the first occurrence.
    pub start_time: DateTime<Utc>,
    /// End of the first occurrence; must be after start_time.
    pub end_time: DateTime<Utc>,
    /// Repetition (default none).
    #[oai(nullable)]
    pub recurrence: Option<RecurrenceName>,
    /// Timezone, cron and end of the series.
    #[oai(nullable)]
    pub recurrence_pattern: Option<RecurrencePattern>,
    /// Covered servers (default: all).
    #[oai(nullable)]
    pub affected_servers: Option<AffectedServers>,
    /// Covered runbooks (default: all).
    #[oai(nullable)]
    pub affected_runbooks: Option<AffectedRunbooks>,
    /// Whether the window is in force (default true).
    #[oai(nullable)]
    pub enabled: Option<bool>,
}

/// A stored window.
#[derive(Debug, Clone, Object)]
pub struct BlackoutWindow {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Purpose.
    #[oai(skip_serializing_if_is_none)]
    pub description: Option<String>,
    /// Start of the first occurrence.
    pub start_time: DateTime<Utc>,
    /// End of the first occurrence.
    pub end_time: DateTime<Utc>,
    /// Repetition.
    pub recurrence: RecurrenceName,
    /// Timezone, cron and end of the series.
    pub recurrence_pattern: RecurrencePattern,
    /// Covered servers.
    pub affected_servers: AffectedServers,
    /// Covered runbooks.
    pub affected_runbooks: AffectedRunbooks,
    /// In force.
    pub enabled: bool,
    /// Whether an occurrence is active now.
    pub active_now: bool,
    /// Creator.
    #[oai(skip_serializing_if_is_none)]
    pub created_by: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

fn to_dto(row: BlackoutRow, now: DateTime<Utc>) -> BlackoutWindow {
    let window = row.to_window().ok();
    let pattern: RecurrencePattern = row
        .recurrence_pattern
        .as_ref()
        .map(|p| RecurrencePattern {
            timezone: p["timezone"].as_str().map(str::to_owned),
            cron: p["cron"].as_str().map(str::to_owned),
            until: p["until"]
                .as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|d| d.with_timezone(&Utc)),
        })
        .unwrap_or_default();
    let servers = window
        .as_ref()
        .map(|w| w.servers.clone())
        .unwrap_or_default();
    let runbooks = window
        .as_ref()
        .map(|w| w.runbooks.clone())
        .unwrap_or_default();
    BlackoutWindow {
        id: row.id,
        name: row.name,
        description: row.description,
        start_time: row.start_time,
        end_time: row.end_time,
        recurrence: recurrence_name(&row.recurrence),
        recurrence_pattern: pattern,
        affected_servers: AffectedServers {
            server_ids: servers.server_ids,
            tags: servers.tags,
            environments: servers.environments,
        },
        affected_runbooks: AffectedRunbooks {
            ids: runbooks.ids,
            categories: runbooks.categories,
        },
        enabled: row.enabled,
        active_now: window.and_then(|w| w.active_at(now)).is_some(),
        created_by: row.created_by,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

/// Validated, canonical JSON for the store.
struct Prepared {
    recurrence: Recurrence,
    pattern: Option<serde_json::Value>,
    servers: serde_json::Value,
    runbooks: serde_json::Value,
}

fn prepare(input: &BlackoutWindowInput) -> Result<Prepared, ApiError> {
    let name = input.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "must be 1 to 200 characters"));
    }
    let recurrence: Recurrence = input.recurrence.unwrap_or(RecurrenceName::None).into();
    let pattern = input.recurrence_pattern.as_ref().map(|p| {
        let mut map = serde_json::Map::new();
        if let Some(tz) = &p.timezone {
            map.insert("timezone".into(), tz.clone().into());
        }
        if let Some(cron) = &p.cron {
            map.insert("cron".into(), cron.clone().into());
        }
        if let Some(until) = p.until {
            map.insert("until".into(), until.to_rfc3339().into());
        }
        serde_json::Value::Object(map)
    });
    let parsed = blackout::parse_pattern(recurrence, pattern.as_ref())
        .map_err(|e| ApiError::invalid(&e.field, e.reason))?;
    // Nor would a schedule that never fires (31 February), or not before the series ends.
    if let Some(spec) = &parsed.cron
        && !spec.fires_after(parsed.timezone, input.start_time, parsed.until)
    {
        return Err(ApiError::invalid(
            "recurrence_pattern.cron",
            "never fires at or after start_time (before `until`), so the window would never \
             black anything out",
        ));
    }
    // A series that ends before it begins would be stored and never black anything out.
    if let Some(until) = parsed.until
        && until <= input.start_time
    {
        return Err(ApiError::invalid(
            "recurrence_pattern.until",
            format!(
                "must be after start_time ({}): no occurrence could begin before it",
                input.start_time.to_rfc3339()
            ),
        ));
    }
    let servers = input.affected_servers.clone().unwrap_or_default();
    let servers = ServerSelector {
        server_ids: servers.server_ids,
        tags: servers.tags,
        environments: servers.environments,
    };
    if let Some((i, _)) = servers
        .tags
        .iter()
        .enumerate()
        .find(|(_, t)| t.trim().is_empty())
    {
        return Err(ApiError::invalid(
            &format!("affected_servers.tags[{i}]"),
            "must not be empty",
        ));
    }
    let runbooks = input.affected_runbooks.clone().unwrap_or_default();
    let runbooks = RunbookSelector {
        ids: runbooks.ids,
        categories: runbooks.categories,
    };
    Ok(Prepared {
        recurrence,
        pattern,
        servers: servers.to_json(),
        runbooks: runbooks.to_json(),
    })
}

/// Refuses ids in the selectors that name no runbook or server: such a window would never
/// cover what its author meant. Ids the window already holds (`stored`, on an update) are
/// kept without the check: a server or runbook deleted since must not make its window
/// impossible to edit or disable.
async fn check_references(
    conn: &mut sqlx::PgConnection,
    input: &BlackoutWindowInput,
    stored: Option<&store::blackouts::BlackoutRow>,
) -> Result<(), ApiError> {
    let held = |selector: Option<&serde_json::Value>, key: &str| -> Vec<Uuid> {
        selector
            .and_then(|s| s.get(key))
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().and_then(|s| s.parse().ok()))
            .collect()
    };
    let held_runbooks = held(stored.map(|r| &r.affected_runbooks), "ids");
    let held_servers = held(stored.map(|r| &r.affected_servers), "server_ids");
    // New ids only, with their positions in the input.
    let new = |ids: &[Uuid], held: &[Uuid]| -> (Vec<usize>, Vec<Uuid>) {
        ids.iter()
            .enumerate()
            .filter(|(_, id)| !held.contains(id))
            .map(|(i, id)| (i, *id))
            .unzip()
    };
    let (runbook_at, runbook_ids) = new(
        input
            .affected_runbooks
            .as_ref()
            .map(|r| r.ids.as_slice())
            .unwrap_or_default(),
        &held_runbooks,
    );
    let (server_at, server_ids) = new(
        input
            .affected_servers
            .as_ref()
            .map(|s| s.server_ids.as_slice())
            .unwrap_or_default(),
        &held_servers,
    );
    if runbook_ids.is_empty() && server_ids.is_empty() {
        return Ok(());
    }
    match store::blackouts::blackout_missing_references(conn, &runbook_ids, &server_ids).await? {
        (Some(i), _) => Err(ApiError::invalid(
            &format!("affected_runbooks.ids[{}]", runbook_at[i]),
            format!("no runbook has the id {}", runbook_ids[i]),
        )),
        (None, Some(i)) => Err(ApiError::invalid(
            &format!("affected_servers.server_ids[{}]", server_at[i]),
            format!("no server has the id {}", server_ids[i]),
        )),
        (None, None) => Ok(()),
    }
}

fn map_store(e: StoreError) -> ApiError {
    match e {
        StoreError::Check(c) if c == "blackout_windows_end_after_start" => {
            ApiError::invalid("end_time", "must be after start_time")
        }
        other => other.into(),
    }
}

/// A window active for the checked runbook/server.
#[derive(Debug, Object)]
pub struct ActiveBlackout {
    /// The window.
    pub window_id: Uuid,
    /// Its name.
    pub name: String,
    /// Start of the current occurrence.
    pub occurrence_start: DateTime<Utc>,
    /// End of the current occurrence.
    pub occurrence_end: DateTime<Utc>,
    /// A sentence saying why.
    pub reason: String,
}

/// Whether a runbook (on a server) is blacked out at an instant.
#[derive(Debug, Object)]
pub struct BlackoutStatus {
    /// True when at least one window is active.
    pub blacked_out: bool,
    /// The instant checked.
    pub at: DateTime<Utc>,
    /// The active windows.
    pub windows: Vec<ActiveBlackout>,
}

/// A page of windows.
#[derive(Debug, Object)]
pub struct BlackoutWindowPage {
    /// Windows.
    pub items: Vec<BlackoutWindow>,
    /// Matching windows.
    pub total: i64,
    /// Page size used.
    pub limit: i64,
    /// Offset used.
    pub offset: i64,
}

#[derive(ApiResponse)]
enum Created {
    /// Created.
    #[oai(status = 201)]
    Created(Json<BlackoutWindow>),
}

#[derive(ApiResponse)]
enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    NoContent,
}

/// Blackout window endpoints.
pub struct BlackoutsApi {
    /// Shared state.
    pub state: AppState,
}

#[OpenApi(tag = "Tag::Blackouts")]
impl BlackoutsApi {
    /// List blackout windows.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/blackout-windows",
        method = "get",
        operation_id = "blackout_list"
    )]
    async fn blackout_list(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Only enabled (true) or disabled (false) windows.
        enabled: Query<Option<bool>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<i64>>,
        /// Rows to skip (default 0).
        #[oai(validator(minimum(value = "0")))]
        offset: Query<Option<i64>>,
    ) -> Result<Json<BlackoutWindowPage>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let page = Page::parse(limit.0, offset.0)?;
        let mut conn = store::read_snapshot(&self.state.pool).await?;
        let (rows, total) =
            store::blackouts::blackout_list(&mut conn, enabled.0, page.limit, page.offset).await?;
        let now = Utc::now();
        Ok(Json(BlackoutWindowPage {
            items: rows.into_iter().map(|r| to_dto(r, now)).collect(),
            total,
            limit: page.limit,
            offset: page.offset,
        }))
    }

    /// Create a blackout window.
    ///
    /// Least role: engineer.
    #[oai(
        path = "/blackout-windows",
        method = "post",
        operation_id = "blackout_create"
    )]
    async fn blackout_create(
        &self,
        req: &Request,
        auth: BearerAuth,
        body: Json<BlackoutWindowInput>,
    ) -> Result<Created, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let p = prepare(&body.0)?;
        let mut tx = self.state.pool.begin().await?;
        check_references(&mut tx, &body.0, None).await?;
        let row = store::blackouts::blackout_create(
            &mut tx,
            &fields(&body.0, &p),
            Some(caller.identity.user_id),
        )
        .await
        .map_err(map_store)?;
        caller
            .record(
                &mut tx,
                caller.audit(
                    "blackout_create",
                    "blackout_window",
                    Some(row.id),
                    serde_json::json!({ "name": row.name, "recurrence": row.recurrence }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Created::Created(Json(to_dto(row, Utc::now()))))
    }

    /// Whether a runbook on a server is blacked out now (or at `at`), and why.
    ///
    /// Without `server_id` the question is about a run on a worker's own host, which only
    /// windows for every server cover; without `runbook_id`, about every runbook on the server,
    /// which only windows for every runbook cover.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/blackout-windows/check",
        method = "get",
        operation_id = "blackout_check"
    )]
    async fn blackout_check(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// The runbook (optional: without it, windows for every runbook).
        runbook_id: Query<Option<Uuid>>,
        /// The server (optional: without it, a worker's own host).
        server_id: Query<Option<Uuid>>,
        /// The instant to check (default now).
        at: Query<Option<DateTime<Utc>>>,
    ) -> Result<Json<BlackoutStatus>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let at = at.0.unwrap_or_else(Utc::now);
        let mut conn = self.state.pool.acquire().await?;
        let runbook = match runbook_id.0 {
            Some(id) => Some(
                store::blackouts::blackout_runbook_facts(&mut conn, id)
                    .await?
                    .ok_or_else(|| ApiError::not_found("runbook", id))?,
            ),
            None => None,
        };
        let server = match server_id.0 {
            Some(id) => Some(
                store::blackouts::blackout_server_facts(&mut conn, id)
                    .await?
                    .ok_or_else(|| ApiError::not_found("server", id))?,
            ),
            None => None,
        };
        let active =
            store::blackouts::blackout_active_for(&mut conn, runbook.as_ref(), server.as_ref(), at)
                .await?;
        Ok(Json(BlackoutStatus {
            blacked_out: !active.is_empty(),
            at,
            windows: active
                .into_iter()
                .map(|(w, o)| ActiveBlackout {
                    window_id: w.id,
                    reason: w.describe(&o),
                    name: w.name,
                    occurrence_start: o.start,
                    occurrence_end: o.end,
                })
                .collect(),
        }))
    }

    /// Get a blackout window.
    ///
    /// Least role: viewer.
    #[oai(
        path = "/blackout-windows/:id",
        method = "get",
        operation_id = "blackout_get"
    )]
    async fn blackout_get(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Window id.
        id: Path<Uuid>,
    ) -> Result<Json<BlackoutWindow>, ApiError> {
        self.state.authorize(req, &auth, Role::Viewer).await?;
        let mut conn = self.state.pool.acquire().await?;
        let row = store::blackouts::blackout_get(&mut conn, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("blackout window", id.0))?;
        Ok(Json(to_dto(row, Utc::now())))
    }

    /// Replace a blackout window.
    ///
    /// Least role: engineer.
    #[oai(
        path = "/blackout-windows/:id",
        method = "put",
        operation_id = "blackout_update"
    )]
    async fn blackout_update(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Window id.
        id: Path<Uuid>,
        body: Json<BlackoutWindowInput>,
    ) -> Result<Json<BlackoutWindow>, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let p = prepare(&body.0)?;
        let mut tx = self.state.pool.begin().await?;
        let before = store::blackouts::blackout_lock(&mut tx, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("blackout window", id.0))?;
        check_references(&mut tx, &body.0, Some(&before)).await?;
        let row = store::blackouts::blackout_update(&mut tx, id.0, &fields(&body.0, &p))
            .await
            .map_err(map_store)?
            .ok_or_else(|| ApiError::not_found("blackout window", id.0))?;
        let now = Utc::now();
        let written = |row: BlackoutWindow| {
            let mut value = poem_openapi::types::ToJSON::to_json(&row).unwrap_or_default();
            if let Some(fields) = value.as_object_mut() {
                // What was written, not when it was read.
                fields.remove("active_now");
                fields.remove("updated_at");
            }
            value
        };
        caller
            .record(
                &mut tx,
                caller.audit(
                    "blackout_update",
                    "blackout_window",
                    Some(row.id),
                    serde_json::json!({
                        "name": row.name,
                        "enabled": row.enabled,
                        "before": written(to_dto(before, now)),
                        "after": written(to_dto(row.clone(), now)),
                    }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Json(to_dto(row, Utc::now())))
    }

    /// Delete a blackout window.
    ///
    /// Least role: engineer.
    #[oai(
        path = "/blackout-windows/:id",
        method = "delete",
        operation_id = "blackout_delete"
    )]
    async fn blackout_delete(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// Window id.
        id: Path<Uuid>,
    ) -> Result<Deleted, ApiError> {
        let caller = self.state.authorize(req, &auth, Role::Engineer).await?;
        let mut tx = self.state.pool.begin().await?;
        let Some(name) = store::blackouts::blackout_delete(&mut tx, id.0).await? else {
            return Err(ApiError::not_found("blackout window", id.0));
        };
        caller
            .record(
                &mut tx,
                caller.audit(
                    "blackout_delete",
                    "blackout_window",
                    Some(id.0),
                    serde_json::json!({ "name": name }),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(Deleted::NoContent)
    }
}

fn fields<'a>(input: &'a BlackoutWindowInput, p: &'a Prepared) -> BlackoutFields<'a> {
    BlackoutFields {
        name: input.name.trim(),
        description: input.description.as_deref(),
        start_time: input.start_time,
        end_time: input.end_time,
        recurrence: p.recurrence.as_str(),
        recurrence_pattern: p.pattern.as_ref(),
        affected_servers: &p.servers,
        affected_runbooks: &p.runbooks,
        enabled: input.enabled.unwrap_or(true),
    }
}
