-- Group commit for the charging calls (issue 7): Consume, Reserve and Commit, and the calls
-- that give credits back, Release and Refund. Each is a small transaction whose fixed costs
-- (the round trip, the statement start, the commit and its WAL flush) are as large as its
-- work, and every write to one account holds that account's row lock until it commits.
-- When such calls queue up in the server (server/group_commit.py), they come here as one
-- batch: one round trip, one transaction, one commit. The Consumes and Reserves sure to
-- succeed are written together first (0008_take_set.sql), and so are the Commits
-- (0009_commit_set.sql); every other call runs in a savepoint of its own, so a refused one
-- (insufficient credits, a reused key, an unknown reservation) changes nothing and the
-- others go on. A batch may hold calls for many accounts and several calls for one account.
--
-- Lock order: the calls run in account_id order (C collation), a stable sort, so one
-- account's calls keep their arrival order (a Commit after the Reserve it settles), and two
-- batches lock the accounts they share in the same order and cannot deadlock. Within each
-- call the one order of 0001_ledger.sql holds (account, then lots, then reservations).
--
-- p_requests: [{op, account, key, hash (hex), now, and per op: amount (consume, reserve,
-- commit, refund), usage and comment (consume, reserve, commit), feature (consume,
-- reserve), expires_at (reserve), reservation_id (commit, release, refund), reason
-- (release, refund), job_failed (release)}] in arrival order; op defaults to consume. A
-- call run by itself runs at its own "now" (when the server received it; p_now, the
-- batch's latest, when absent). The set paths judge at p_now: an account with anything due
-- by then (a hold or lot expiring, a time-out) is left to the call-by-call path, so what
-- they take is sure at each call's own time too. Returns one element per request, in that
-- order: {"ok": <response>} or {"error": {"sqlstate", "message", "detail", "constraint"}}
-- for the server's one error boundary to translate as if the call had run alone.
-- (ledger_consume_batch keeps the name of its first use, Consume alone.)

CREATE OR REPLACE FUNCTION ledger_batch_call(r jsonb, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    op text := coalesce(r ->> 'op', 'consume');
    usage jsonb := CASE WHEN jsonb_typeof(r -> 'usage') = 'object' THEN r -> 'usage' END;
    -- The call's own time (when the server received it): a Commit sent before its hold
    -- expired is not refused because a later call in the batch came after the expiry.
    -- (Nor because a later call or sweep locked the account first: their maintenance
    -- leaves a hold pending for a grace past its expiry, ledger_hold_grace in 0001.)
    call_now timestamptz := coalesce((r ->> 'now')::timestamptz, p_now);
BEGIN
    IF op = 'consume' THEN
        RETURN ledger_consume(r ->> 'account', r ->> 'key', decode(r ->> 'hash', 'hex'),
                              (r ->> 'amount')::bigint, usage, r ->> 'feature', r ->> 'comment',
                              call_now);
    ELSIF op = 'reserve' THEN
        RETURN ledger_reserve(r ->> 'account', r ->> 'key', decode(r ->> 'hash', 'hex'),
                              (r ->> 'amount')::bigint, usage, (r ->> 'expires_at')::timestamptz,
                              r ->> 'feature', r ->> 'comment', call_now);
    ELSIF op = 'commit' THEN
        RETURN ledger_commit(r ->> 'account', (r ->> 'reservation_id')::uuid, r ->> 'key',
                             decode(r ->> 'hash', 'hex'), (r ->> 'amount')::bigint, usage,
                             r ->> 'comment', call_now);
    ELSIF op = 'release' THEN
        RETURN ledger_release(r ->> 'account', (r ->> 'reservation_id')::uuid, r ->> 'key',
                              decode(r ->> 'hash', 'hex'), r ->> 'reason', call_now,
                              coalesce((r ->> 'job_failed')::boolean, false));
    ELSIF op = 'refund' THEN
        RETURN ledger_refund(r ->> 'account', (r ->> 'reservation_id')::uuid, r ->> 'key',
                             decode(r ->> 'hash', 'hex'), (r ->> 'amount')::bigint,
                             r ->> 'reason', call_now);
    END IF;
    RAISE EXCEPTION 'no such operation in a batch: %', op USING ERRCODE = 'LE101';
END $$;

CREATE OR REPLACE FUNCTION ledger_consume_batch(p_requests jsonb, p_now timestamptz)
    RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    -- Filled in place by position; a jsonb array concatenated per call is copied each time.
    results jsonb[] := array_fill(NULL::jsonb, ARRAY[jsonb_array_length(p_requests)]);
    state text;
    message text;
    detail text;
    constraint_name text;
    -- current_setting, not the pg_settings view: the view builds every setting's row.
    timeout_ms bigint := extract(epoch FROM current_setting('statement_timeout')::interval) * 1000;
    lock_ms bigint := greatest(timeout_ms / 4, 1);
    left_ms bigint;
    -- The answer of the call that gave up waiting for an account's lock, by account: the
    -- account's later calls get it at once instead of waiting again each.
    unreachable jsonb := '{}';
BEGIN
    -- A call that waits for a lock held elsewhere (another server's transaction) gives up
    -- alone, well before the statement time-out would roll the whole batch back.
    IF timeout_ms > 0 THEN
        PERFORM set_config('lock_timeout', lock_ms::text, true);
    END IF;
    -- The plain Consumes and Reserves sure to succeed, written together (0008_take_set.sql);
    -- when that cannot be done (a lock wait timed out, say), every call goes one by one below.
    BEGIN
        results := ledger_take_set(p_requests, p_now);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
        RAISE LOG 'ledger_take_set: % %; the batch goes call by call', state, message;
    END;
    FOR r IN
        SELECT req, n FROM jsonb_array_elements(p_requests) WITH ORDINALITY AS t(req, n)
         ORDER BY req ->> 'account' COLLATE "C", n
    LOOP
        CONTINUE WHEN results[r.n] IS NOT NULL;
        IF unreachable ? (r.req ->> 'account') THEN
            results[r.n] := unreachable -> (r.req ->> 'account');
            CONTINUE;
        END IF;
        -- Every wait comes out of one budget, three quarters of the statement's time: past
        -- it, a locked account's calls give up at once and the rest of the batch commits.
        IF timeout_ms > 0 THEN
            left_ms := timeout_ms * 3 / 4
                       - (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::bigint;
            IF left_ms < lock_ms THEN
                lock_ms := greatest(left_ms, 1);
                PERFORM set_config('lock_timeout', lock_ms::text, true);
            END IF;
        END IF;
        BEGIN
            results[r.n] := jsonb_build_object('ok', ledger_batch_call(r.req, p_now));
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
                                    detail = PG_EXCEPTION_DETAIL,
                                    constraint_name = CONSTRAINT_NAME;
            results[r.n] := jsonb_build_object('error', jsonb_build_object(
                'sqlstate', state, 'message', message, 'detail', nullif(detail, ''),
                'constraint', nullif(constraint_name, '')));
            IF state = '55P03' THEN  -- lock_not_available
                unreachable := unreachable || jsonb_build_object(r.req ->> 'account', results[r.n]);
            END IF;
        END;
    END LOOP;
    RETURN to_jsonb(results);
END $$;

-- The form of the previous release (one account, given apart), kept so that its servers
-- keep working during a rolling deploy; drop it in the release after.
CREATE OR REPLACE FUNCTION ledger_consume_batch(p_account text, p_requests jsonb, p_now timestamptz)
    RETURNS jsonb
LANGUAGE sql AS $$
    SELECT ledger_consume_batch(
        coalesce((SELECT jsonb_agg(req || jsonb_build_object('account', p_account) ORDER BY n)
                    FROM jsonb_array_elements(p_requests) WITH ORDINALITY AS t(req, n)), '[]'),
        p_now)
$$;
