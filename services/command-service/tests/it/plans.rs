//! The intake's idempotency lookup probes the table by key even when planned once on a table
//! believed empty (`common::postgres`, "Plans"): there a join would scan a whole index.

use command_service::intake::STORED_KEYS_SQL;
use common::test_support::plans::{plan_on_empty_tables, probes};

/// Keys shaped like the benchmark's and the clients' (a JWT subject and a UUID), so that the
/// primary key's index outgrows the one on `expires_at`, as it does in a real table.
const FILL: &str = "INSERT INTO idempotency_keys (client_id, key, fingerprint, command_id, \
     response_status, response_body, expires_at) \
     SELECT 'client-' || (g % 7), gen_random_uuid()::text, '\\x00', gen_random_uuid(), 202, \
     '\\x00', now() + interval '1 day' FROM generate_series(1, 20000) AS g";

#[tokio::test]
async fn the_idempotency_lookup_probes_by_client_and_key() {
    let plan = plan_on_empty_tables(&["idempotency_keys"], FILL, STORED_KEYS_SQL, 2).await;
    probes(&plan, "idempotency_keys", &["client_id", "key"]).unwrap();
}
