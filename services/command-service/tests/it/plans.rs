//! The intake's idempotency lookup probes the table by key even when planned once on a table
//! believed empty (`common::postgres`, "Plans"): there a join would scan the whole index.

use command_service::intake::STORED_KEYS_SQL;
use common::test_support::plans::{plan_on_empty_tables, probes};

#[tokio::test]
async fn the_idempotency_lookup_probes_by_client_and_key() {
    let plan = plan_on_empty_tables(&["idempotency_keys"], STORED_KEYS_SQL, 2).await;
    probes(&plan, "idempotency_keys", &["client_id", "key"]).unwrap();
}
