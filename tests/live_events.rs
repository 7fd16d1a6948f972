//! Live execution events: appends notify only executions some stream watches, and a stream
//! registers itself as a watcher while it is open.

mod common;

use std::time::{Duration, Instant};

use aiops::store::executions::{event_append, watcher_register, watcher_remove};
use serde_json::json;
use sqlx::postgres::PgListener;
use uuid::Uuid;

/// Two executions that stay pending (approval required, no worker).
async fn two_pending(app: &common::TestApp) -> (Uuid, Uuid) {
    let runbook = app
        .runbook_from_yaml(
            "name: waits\nmode: manual\nrequires_approval: true\nsteps:\n  - {name: s, command: 'true'}\n",
        )
        .await;
    let a = app.start_execution(json!({ "runbook_id": runbook })).await;
    let b = app.start_execution(json!({ "runbook_id": runbook })).await;
    (a, b)
}

/// A connection listening on the live events' channel.
async fn events_listener(app: &common::TestApp) -> PgListener {
    let mut listener = PgListener::connect_with(&app.pool).await.unwrap();
    listener
        .listen(aiops::engine::EVENTS_CHANNEL)
        .await
        .unwrap();
    listener
}

async fn next_notified(listener: &mut PgListener) -> Uuid {
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a notification arrives")
        .unwrap();
    n.payload().parse().unwrap()
}

#[tokio::test]
async fn appends_notify_only_watched_executions() {
    let app = common::spawn_app().await;
    let (a, b) = two_pending(&app).await;
    let mut listener = events_listener(&app).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let watcher = Uuid::new_v4();

    // Nobody watches `a`; `b` is watched. Notifications arrive in commit order, so the first
    // one being `b`'s proves `a`'s append sent none.
    event_append(&mut conn, a, None, "stdout", "unwatched\n")
        .await
        .unwrap();
    watcher_register(&mut conn, b, watcher).await.unwrap();
    event_append(&mut conn, b, None, "stdout", "watched\n")
        .await
        .unwrap();
    assert_eq!(next_notified(&mut listener).await, b);

    // Roles swapped: the watcher of `b` leaves, one of `a` arrives.
    watcher_remove(&mut conn, b, watcher).await.unwrap();
    event_append(&mut conn, b, None, "stdout", "no longer watched\n")
        .await
        .unwrap();
    watcher_register(&mut conn, a, watcher).await.unwrap();
    event_append(&mut conn, a, None, "stdout", "watched now\n")
        .await
        .unwrap();
    assert_eq!(next_notified(&mut listener).await, a);

    // An expired registration notifies nothing.
    sqlx::query("UPDATE execution_watchers SET expires_at = now() - interval '1 second'")
        .execute(&mut *conn)
        .await
        .unwrap();
    event_append(&mut conn, a, None, "stdout", "expired\n")
        .await
        .unwrap();
    watcher_register(&mut conn, b, watcher).await.unwrap();
    event_append(&mut conn, b, None, "stdout", "fresh\n")
        .await
        .unwrap();
    assert_eq!(next_notified(&mut listener).await, b);
}

async fn watchers_of(app: &common::TestApp, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM execution_watchers WHERE execution_id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_open_stream_watches_its_execution_and_gets_new_events() {
    let app = common::spawn_app().await;
    let (a, _) = two_pending(&app).await;
    let mut resp = app
        .client
        .get(app.api(&format!("/executions/{a}/events")))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(watchers_of(&app, a).await, 1);

    // An event appended while the stream is open reaches it.
    let mut conn = app.pool.acquire().await.unwrap();
    let appended = event_append(&mut conn, a, None, "stdout", "hello-live\n")
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("hello-live") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("the stream sends the appended event")
            .unwrap()
            .expect("the stream stays open while the execution is pending");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains(&format!("id: {appended}")), "{seen}");

    // Closing the stream ends its registration.
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(30);
    while watchers_of(&app, a).await != 0 {
        assert!(Instant::now() < deadline, "the watcher outlived its stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn live_events_older_than_the_retention_are_pruned_by_their_scheduled_job() {
    let app = common::spawn_app().await;
    let (a, _) = two_pending(&app).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let mut old = Vec::new();
    for n in 0..3 {
        old.push(
            event_append(&mut conn, a, None, "stdout", &format!("old {n}\n"))
                .await
                .unwrap(),
        );
    }
    let recent = event_append(&mut conn, a, None, "stdout", "recent\n")
        .await
        .unwrap();
    sqlx::query(
        "UPDATE execution_events SET created_at = now() - interval '8 days' WHERE id = ANY($1)",
    )
    .bind(&old)
    .execute(&mut *conn)
    .await
    .unwrap();
    let kept_before: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM execution_events WHERE NOT id = ANY($1) ORDER BY id")
            .bind(&old)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert!(kept_before.contains(&recent));

    // The product's registry schedules the prune; a worker with a 7-day retention runs it.
    common::run_scheduled_job(&app.pool, aiops::engine::prune::KIND).await;
    let left: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM execution_events WHERE id = ANY($1) OR id = $2")
            .bind(&old)
            .bind(recent)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(left, vec![recent]);
    // Every other event is still there (the worker may have added some: the executions' start
    // jobs ran too).
    let still: i64 = sqlx::query_scalar("SELECT count(*) FROM execution_events WHERE id = ANY($1)")
        .bind(&kept_before)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        still as usize,
        kept_before.len(),
        "only the old events went"
    );
}

#[tokio::test]
async fn one_append_statement_notifies_each_watched_execution_it_touches() {
    let app = common::spawn_app().await;
    let (a, b) = two_pending(&app).await;
    let runbook: Uuid =
        sqlx::query_scalar("SELECT runbook_id FROM runbook_executions WHERE id = $1")
            .bind(a)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let c = app.start_execution(json!({ "runbook_id": runbook })).await;
    let mut listener = events_listener(&app).await;
    let mut conn = app.pool.acquire().await.unwrap();
    watcher_register(&mut conn, a, Uuid::new_v4())
        .await
        .unwrap();
    watcher_register(&mut conn, c, Uuid::new_v4())
        .await
        .unwrap();

    // One statement: two rows of `a`, one of the unwatched `b`, one of `c`.
    sqlx::query(
        "INSERT INTO execution_events (execution_id, kind, data) \
         SELECT e, 'stdout', 'line' FROM unnest($1::uuid[]) AS e",
    )
    .bind(vec![a, a, b, c])
    .execute(&mut *conn)
    .await
    .unwrap();
    let mut got = vec![
        next_notified(&mut listener).await,
        next_notified(&mut listener).await,
    ];
    got.sort();
    let mut want = vec![a, c];
    want.sort();
    assert_eq!(got, want);
    // Nothing else was sent for that statement: the next notification is the next append's.
    event_append(&mut conn, c, None, "stdout", "next\n")
        .await
        .unwrap();
    assert_eq!(next_notified(&mut listener).await, c);
}

#[tokio::test]
async fn deleting_an_execution_deletes_its_events() {
    let app = common::spawn_app().await;
    let (a, b) = two_pending(&app).await;
    let mut conn = app.pool.acquire().await.unwrap();
    for id in [a, b] {
        event_append(&mut conn, id, None, "stdout", "line\n")
            .await
            .unwrap();
    }
    let count = |id: Uuid| {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM execution_events WHERE execution_id = $1",
        )
        .bind(id)
    };
    let b_before = count(b).fetch_one(&mut *conn).await.unwrap();
    assert!(count(a).fetch_one(&mut *conn).await.unwrap() > 0);
    // Executions are never deleted by the product; by hand, their events go with them.
    sqlx::query("DELETE FROM runbook_executions WHERE id = $1")
        .bind(a)
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(count(a).fetch_one(&mut *conn).await.unwrap(), 0);
    assert_eq!(count(b).fetch_one(&mut *conn).await.unwrap(), b_before);
}
