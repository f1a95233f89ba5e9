//! Plans of the services' statements as their sessions make them (see
//! [`crate::postgres::Postgres::connect_lazy`], "Plans"): once, generically, and here on tables
//! the planner believes empty — the state in which a plan that scans a table instead of
//! probing it by key looks cheapest.

use serde_json::Value;
use sqlx::Connection as _;

use crate::config::{PostgresConfig, Vars};
use crate::postgres::Postgres;

/// A service session (its planner settings) in which each of `tables` is a copy of the
/// migrated table (`LIKE … INCLUDING ALL`, in a schema of its own first on the search path)
/// that the planner believes empty: filled by `fill` (any statements on the unqualified table
/// names; empty for none), analysed full, then emptied and vacuumed. That is the state of a
/// service's table after a clean-up, or of a queue: no rows, column statistics of a full
/// table, and index files of their full size, which is what decides between two indexes that
/// both look as if they held nothing. [`EmptyTables::drop`] removes the schema.
pub struct EmptyTables {
    /// The session.
    pub conn: sqlx::PgConnection,
    schema: String,
}

impl EmptyTables {
    /// Sets up `tables` as described on [`EmptyTables`].
    pub async fn new(tables: &[&str], fill: &str) -> Self {
        let config: PostgresConfig = Vars::from_env().parse().unwrap();
        let postgres = Postgres::connect_lazy(&config).unwrap();
        crate::schema::MIGRATOR.run(postgres.pool()).await.unwrap();
        let mut conn = postgres.pool().acquire().await.unwrap().detach();
        let schema = format!("plans_{}", uuid::Uuid::new_v4().simple());
        let mut setup = format!("CREATE SCHEMA {schema}; SET search_path = {schema}, public;");
        for table in tables {
            setup.push_str(&format!(
                "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL);"
            ));
        }
        setup.push_str(fill);
        for table in tables {
            setup.push_str(&format!(
                ";ANALYZE {schema}.{table}; DELETE FROM {schema}.{table}"
            ));
        }
        run(&mut conn, &setup).await;
        for table in tables {
            // Not in a transaction block, so one statement per call.
            run(&mut conn, &format!("VACUUM {schema}.{table}")).await;
        }
        Self { conn, schema }
    }

    /// Drops the schema and closes the session.
    pub async fn drop(mut self) {
        run(
            &mut self.conn,
            &format!("DROP SCHEMA {} CASCADE", self.schema),
        )
        .await;
        self.conn.close().await.unwrap();
    }
}

/// The generic plan (`EXPLAIN (FORMAT JSON)`) of `sql`, which has `params` parameters, in a
/// session on `tables` believed empty (see [`EmptyTables`]).
pub async fn plan_on_empty_tables(tables: &[&str], fill: &str, sql: &str, params: usize) -> Value {
    let mut session = EmptyTables::new(tables, fill).await;
    run(&mut session.conn, &format!("PREPARE planned AS {sql}")).await;
    let args = vec!["NULL"; params].join(", ");
    let plan: Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) EXECUTE planned({args})"))
        .fetch_one(&mut session.conn)
        .await
        .unwrap();
    run(&mut session.conn, "DEALLOCATE planned").await;
    session.drop().await;
    plan
}

/// Runs `sql` (one or more statements, no parameters) on `conn`; panics on failure.
async fn run(conn: &mut sqlx::PgConnection, sql: &str) {
    sqlx::raw_sql(sql).execute(conn).await.unwrap();
}

/// Checks that `plan` reads no table by a sequential scan and reads `table` only by probes:
/// scans of its primary key (`<table>_pkey`, directly or as the one bitmap index scan of a
/// bitmap heap scan) whose index condition constrains every column of `key`, or scans by row
/// location (TID). Returns what breaks the rule, with the plan.
pub fn probes(plan: &Value, table: &str, key: &[&str]) -> Result<(), String> {
    let primary_key = format!("{table}_pkey");
    let mut reads = 0;
    for node in nodes(&plan[0]["Plan"]) {
        let kind = node["Node Type"].as_str().unwrap_or_default();
        if kind == "Seq Scan" {
            return Err(format!("a sequential scan in {plan:#}"));
        }
        if node["Relation Name"].as_str() != Some(table) || kind == "ModifyTable" {
            continue;
        }
        reads += 1;
        // The node that reads the index: the scan itself, or under a bitmap heap scan (which
        // ANALYZE's sample can make look cheaper for one row) its one bitmap index scan.
        let index_node = match kind {
            "Tid Scan" if node["TID Cond"].is_string() => continue,
            "Index Scan" | "Index Only Scan" => node,
            "Bitmap Heap Scan" => match node["Plans"].as_array().map(Vec::as_slice) {
                Some([child]) if child["Node Type"] == "Bitmap Index Scan" => child,
                _ => return Err(format!("{table} read by a combined bitmap in {plan:#}")),
            },
            _ => return Err(format!("{table} read by a {kind} in {plan:#}")),
        };
        let index = index_node["Index Name"].as_str().unwrap_or_default();
        if index != primary_key {
            return Err(format!(
                "{table} read through {index}, not {primary_key}, in {plan:#}"
            ));
        }
        let Some(condition) = index_node["Index Cond"].as_str() else {
            return Err(format!(
                "{table} read by a {kind} without a key condition in {plan:#}"
            ));
        };
        if let Some(column) = key
            .iter()
            .find(|c| !condition.contains(&format!("({c} = ")))
        {
            return Err(format!(
                "{table} read by a {kind} whose condition {condition:?} leaves out {column} in {plan:#}"
            ));
        }
    }
    if reads == 0 {
        return Err(format!("{table} is not read in {plan:#}"));
    }
    Ok(())
}

/// Every node of the plan tree under `node` (`plan[0]["Plan"]` of an `EXPLAIN (FORMAT JSON)`),
/// depth first.
pub fn nodes(node: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    collect(node, &mut all);
    all
}

fn collect<'p>(node: &'p Value, into: &mut Vec<&'p Value>) {
    into.push(node);
    for child in node["Plans"].as_array().into_iter().flatten() {
        collect(child, into);
    }
}
