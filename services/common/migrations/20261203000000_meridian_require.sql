-- meridian_require(ok, message): true when `ok` is, else an error with SQLSTATE MRD01.
--
-- A single statement is its own transaction, so a statement whose data-modifying parts
-- (`WITH … AS (UPDATE … RETURNING …)`) did not all do what was expected can undo every one
-- of them by raising an error in its last line. The processor writes a batch's statuses,
-- documents and events that way, in one round trip instead of six (services/processor,
-- `apply::commit_plan_sql`); MRD01 tells it that a guard did not hold. VOLATILE (the
-- default), so the planner never evaluates or skips it early.
CREATE FUNCTION meridian_require(ok boolean, message text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION USING ERRCODE = 'MRD01', MESSAGE = message;
    END IF;
    RETURN true;
END
$$;
