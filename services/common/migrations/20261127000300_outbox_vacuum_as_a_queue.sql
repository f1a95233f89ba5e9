-- The outbox tables are queues: every row is inserted, read once and deleted within
-- milliseconds, thousands of times a second. With the default thresholds (20 % of a table
-- that is nearly empty by the time statistics are taken) autovacuum runs late and throttled,
-- and the dead rows the relay must step over pile up. Vacuum them after a fixed number of
-- changes, without cost-based throttling.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE processor_outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
