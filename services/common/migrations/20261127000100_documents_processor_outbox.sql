-- The document write model and the processor's own outbox (the processor applies commands
-- here; see services/processor).

-- The write model: one row per document ever written. A delete keeps the row as a tombstone
-- (deleted, data NULL) with its version bumped, so a re-created document continues the version
-- sequence and no event about an older version can ever look newer than the delete.
CREATE TABLE documents (
    collection      text        NOT NULL,
    id              text        NOT NULL,
    version         bigint      NOT NULL CHECK (version >= 1), -- +1 per applied change
    data            jsonb,                                     -- NULL once deleted
    deleted         boolean     NOT NULL DEFAULT false,
    last_command_id uuid        NOT NULL,                      -- the command that wrote this version
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, id),
    CHECK (deleted = (data IS NULL))
);

-- The processor's outbox (events), shaped like `outbox` so common::outbox relays it; a table
-- of its own so the processor's relay and the command service's relay each lead their own.
CREATE TABLE processor_outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text        NOT NULL,
    message_key  text        NOT NULL,
    message_type text        NOT NULL,
    command_id   uuid,
    payload      jsonb       NOT NULL,
    traceparent  text,
    tracestate   text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER processor_outbox_notify AFTER INSERT ON processor_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION meridian_outbox_notify();
