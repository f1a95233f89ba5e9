//! The intake's statement and its idempotency claims stay cheap when planned once on tables
//! believed empty (`common::postgres`, "Plans"): there a join would scan a whole index.
#![allow(clippy::unwrap_used, clippy::panic)] // test code: failing loudly is the point

use command_service::intake::INTAKE_SQL;
use common::test_support::plans::{EmptyTables, nodes, plan_on_empty_tables};
use serde_json::Value;

/// Keys shaped like the benchmark's and the clients' (a JWT subject and a UUID), so that the
/// primary key's index outgrows the one on `expires_at`, as it does in a real table.
const FILL: &str = "INSERT INTO idempotency_keys (client_id, key, fingerprint, command_id, \
     response_status, response_body, expires_at) \
     SELECT 'client-' || (g % 7), gen_random_uuid()::text, '\\x00', gen_random_uuid(), 202, \
     '\\x00', now() + interval '1 day' FROM generate_series(1, 20000) AS g";

/// The statement itself reads no table: it claims each key through the function, and its
/// inserts check conflicts through the primary keys.
#[tokio::test]
async fn the_intake_statement_reads_no_table_by_a_scan() {
    let plan = plan_on_empty_tables(
        &["idempotency_keys", "commands", "outbox"],
        FILL,
        &INTAKE_SQL,
        21,
    )
    .await;
    for node in nodes(&plan[0]["Plan"]) {
        let kind = node["Node Type"].as_str().unwrap_or_default();
        if let Some(table) = node["Relation Name"].as_str() {
            assert_eq!(kind, "ModifyTable", "{table} read by a {kind} in {plan:#}");
        }
    }
}

/// The claim's lookup inside `meridian_claim_idempotency_key` is one primary-key probe even
/// when the function's plan was made while the table was believed empty and the table has
/// grown since: measured by the buffers one claim touches (a scan of either index of 20,000
/// records would touch dozens).
#[tokio::test]
async fn a_claim_probes_its_key_however_the_table_grew_since_its_plan() {
    let mut session = EmptyTables::new(&["idempotency_keys"], FILL).await;
    let conn = &mut session.conn;
    let claim = "SELECT * FROM meridian_claim_idempotency_key($1, $2, $3)";
    // The first call plans the lookup, on the empty table.
    let (locked, fingerprint): (bool, Option<Vec<u8>>) =
        sqlx::query_as(&format!("SELECT locked, fingerprint FROM ({claim}) AS c"))
            .bind("plans-first")
            .bind("client-3")
            .bind("no-such-key")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert!(locked);
    assert_eq!(fingerprint, None);

    sqlx::raw_sql(FILL).execute(&mut *conn).await.unwrap();
    let (client, key): (String, String) =
        sqlx::query_as("SELECT client_id, key FROM idempotency_keys OFFSET 12345 LIMIT 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let explained: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) \
         SELECT * FROM meridian_claim_idempotency_key('plans-second', '{client}', '{key}')"
    ))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let top = &explained[0]["Plan"];
    let touched =
        top["Shared Hit Blocks"].as_u64().unwrap() + top["Shared Read Blocks"].as_u64().unwrap();
    assert!(
        touched <= 10,
        "one claim touched {touched} buffers: {explained:#}"
    );
    // And it found the record.
    let (fingerprint,): (Option<Vec<u8>>,) =
        sqlx::query_as(&format!("SELECT fingerprint FROM ({claim}) AS c"))
            .bind("plans-third")
            .bind(&client)
            .bind(&key)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(fingerprint.as_deref(), Some(&[0u8][..]));

    session.drop().await;
}
