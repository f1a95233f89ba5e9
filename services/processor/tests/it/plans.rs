//! The processor's batch statements find their rows by primary key even when planned once on
//! tables believed empty (`common::postgres`, "Plans"): there a join would scan whole indexes.

use common::test_support::plans::{plan_on_empty_tables, probes};
use processor::apply::{SNAPSHOT_MANY_SQL, SNAPSHOT_SQL, commit_plan_sql};

const TABLES: [&str; 2] = ["commands", "documents"];

/// Rows shaped like the pipeline's, so that the indexes have the sizes of a used table.
const FILL: &str = "INSERT INTO commands (id, client_id, type, collection, document_id) \
     SELECT gen_random_uuid(), 'client', 'create', 'orders', 'order-' || g \
     FROM generate_series(1, 20000) AS g; \
     INSERT INTO documents (collection, id, version, data, last_command_id) \
     SELECT 'orders', 'order-' || g, 1, '{}', gen_random_uuid() FROM generate_series(1, 20000) AS g";

#[tokio::test]
async fn snapshots_probe_commands_and_documents_by_key() {
    for (sql, params) in [(SNAPSHOT_SQL, 3), (SNAPSHOT_MANY_SQL, 3)] {
        let plan = plan_on_empty_tables(&TABLES, FILL, sql, params).await;
        probes(&plan, "commands", &["id"]).unwrap();
        probes(&plan, "documents", &["collection", "id"]).unwrap();
    }
}

#[tokio::test]
async fn batch_writes_find_their_rows_by_key() {
    let table = common::outbox::OutboxTable::new(processor::OUTBOX_TABLE).unwrap();
    let sql = commit_plan_sql(table);
    let plan = plan_on_empty_tables(&TABLES, FILL, &sql, 23).await;
    probes(&plan, "commands", &["id"]).unwrap();
    probes(&plan, "documents", &["collection", "id"]).unwrap();
}
