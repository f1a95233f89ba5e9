-- meridian_claim_idempotency_key(lock_name, client_id, key): the command service's claim on
-- one request's (client, Idempotency-Key), for a statement that writes a whole batch of
-- requests at once (services/command-service, intake).
--
-- It takes the transaction-scoped advisory lock named `lock_name` (held by a request in
-- progress) without waiting; only if it got it does it read the key's record, and returns
-- the record only if it has not expired. The read runs after the lock is taken and, this
-- being a VOLATILE PL/pgSQL function, with a snapshot of its own: under READ COMMITTED it
-- sees a record committed by the lock's previous holder even when that commit came after
-- the calling statement began (the statement's own snapshot would not, and the request
-- would be written a second time). The record is looked up by its whole primary key and
-- nothing else, so every plan of the lookup is one probe of that key; the expiry is checked
-- afterwards.
CREATE FUNCTION meridian_claim_idempotency_key(
    lock_name text,
    claim_client_id text,
    claim_key text,
    OUT locked boolean,
    OUT fingerprint bytea,
    OUT response_status smallint,
    OUT response_location text,
    OUT response_body bytea
) LANGUAGE plpgsql AS $$
DECLARE
    expires timestamptz;
BEGIN
    locked := pg_try_advisory_xact_lock(hashtextextended(lock_name, 0));
    IF NOT locked THEN
        RETURN;
    END IF;
    SELECT k.fingerprint, k.response_status, k.response_location, k.response_body, k.expires_at
      INTO fingerprint, response_status, response_location, response_body, expires
      FROM idempotency_keys AS k
     WHERE k.client_id = claim_client_id AND k.key = claim_key;
    IF expires IS NULL OR expires <= now() THEN
        fingerprint := NULL;
        response_status := NULL;
        response_location := NULL;
        response_body := NULL;
    END IF;
END
$$;
