-- Outbox wake-ups move out of the writing transactions (common::outbox::Waker): a NOTIFY in
-- a transaction serialises its commit with every other notifying transaction's, which capped
-- command intake at one WAL flush at a time.
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP TRIGGER IF EXISTS processor_outbox_notify ON processor_outbox;
DROP FUNCTION IF EXISTS meridian_outbox_notify();
