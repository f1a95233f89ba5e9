-- no-transaction
-- (sqlx: DROP INDEX CONCURRENTLY cannot run inside a transaction block.)
--
-- commands_document_idx (collection, document_id) served no statement: every query and update
-- reaches `commands` by its primary key (see the plan tests). It cost a B-tree entry for every
-- accepted command: inserting 200,000 such rows wrote 340 instead of 259 WAL bytes per row and
-- took 1.40 instead of 1.03 s on the development machine. Dropped concurrently, so writers are
-- never queued behind an exclusive lock on `commands`; an older release does not need it
-- either (it never used it), and ignores this migration (common::schema).
DROP INDEX CONCURRENTLY IF EXISTS commands_document_idx;
