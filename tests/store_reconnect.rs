//! Pooled connections after a database restart: the first operation that finds its connection
//! broken fails, and the pool then hands out no other connection opened before that, so the
//! restart costs this process one failed operation instead of one per pooled connection.
//!
//! It needs a server of its own to restart, so it starts a private cluster with the product's
//! embedded-PostgreSQL code, whatever `DATABASE_URL` says.

mod procs;

use aiops::startup::embedded_pg::EmbeddedPostgres;
use aiops::store;

#[tokio::test]
async fn a_restart_costs_one_failed_operation_not_one_per_pooled_connection() {
    let dir =
        std::env::temp_dir().join(format!("aiops-reconnect-{}", uuid::Uuid::new_v4().simple()));
    let pg = EmbeddedPostgres::start(&dir, None)
        .await
        .expect("start a private cluster");
    let pgdata = pg.pgdata().to_path_buf();
    let pool = store::connect(&pg.url(), 5).await.unwrap();
    store::migrate(&pool).await.unwrap();
    // Five connections, all idle in the pool.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pool.acquire().await.unwrap());
    }
    for conn in &mut held {
        store::runbooks::runbook_names(conn).await.unwrap();
    }
    drop(held);
    // Connections go back to the pool in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pool.num_idle() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} idle",
            pool.num_idle()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // The server crashes and comes back.
    procs::crash_postmaster(&pgdata, "QUIT").await;
    drop(pg);
    let pg = EmbeddedPostgres::start(&dir, None)
        .await
        .expect("restart the cluster");

    let mut failed = Vec::new();
    for _ in 0..5 {
        let mut conn = pool.acquire().await.unwrap();
        if let Err(e) = store::runbooks::runbook_names(&mut conn).await {
            assert!(e.is_connection_lost(), "{e}");
            // An API caller hears that the database, not its request, failed.
            assert_eq!(aiops::api::error::ApiError::from(&e).status(), 503, "{e}");
            failed.push(e.to_string());
        }
    }
    assert!(
        failed.len() <= 1,
        "every stale pooled connection failed an operation: {failed:?}"
    );

    // The readiness check's query retires stale connections the same way.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pool.acquire().await.unwrap());
    }
    drop(held);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    procs::crash_postmaster(&pgdata, "QUIT").await;
    drop(pg);
    let pg = EmbeddedPostgres::start(&dir, None)
        .await
        .expect("restart the cluster again");
    let mut failed = 0;
    for _ in 0..5 {
        match store::migrations_current(&pool).await {
            Ok(current) => assert!(current),
            Err(e) => {
                assert!(e.is_connection_lost(), "{e}");
                failed += 1;
            }
        }
    }
    assert!(
        failed <= 1,
        "{failed} readiness checks failed after the restart"
    );
    pool.close().await;
    pg.stop().await.expect("stop the private cluster");
    let _ = std::fs::remove_dir_all(&dir);
}
