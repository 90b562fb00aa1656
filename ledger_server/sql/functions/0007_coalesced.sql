-- The hot-account path (issue 7). Every write to one account holds its row lock until
-- it commits, so one account takes at most one transaction per commit latency. When
-- calls for one account queue up behind each other, the server sends them here as one
-- batch: one transaction, one commit, each call in a savepoint of its own so a refused
-- one (insufficient credits, a reused key) changes nothing and the others go on.
--
-- p_requests: [{key, hash (hex), amount, usage, feature, comment}] in arrival order.
-- Returns one element per request, in order: {"ok": <response>} or
-- {"error": {"sqlstate", "message", "detail", "constraint"}} for the server's one
-- error boundary to translate as if the call had run alone.
CREATE OR REPLACE FUNCTION ledger_consume_batch(p_account text, p_requests jsonb, p_now timestamptz)
    RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
    -- An array appended in place; a jsonb array concatenated per call is copied each time.
    results jsonb[] := '{}';
    state text;
    message text;
    detail text;
    constraint_name text;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(p_requests) LOOP
        BEGIN
            results := array_append(results, jsonb_build_object('ok', ledger_consume(
                p_account, r ->> 'key', decode(r ->> 'hash', 'hex'), (r ->> 'amount')::bigint,
                CASE WHEN jsonb_typeof(r -> 'usage') = 'object' THEN r -> 'usage' END,
                r ->> 'feature', r ->> 'comment', p_now)));
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
                                    detail = PG_EXCEPTION_DETAIL,
                                    constraint_name = CONSTRAINT_NAME;
            results := array_append(results, jsonb_build_object('error', jsonb_build_object(
                'sqlstate', state, 'message', message, 'detail', nullif(detail, ''),
                'constraint', nullif(constraint_name, ''))));
        END;
    END LOOP;
    RETURN to_jsonb(results);
END $$;
