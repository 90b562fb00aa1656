-- Ledger operations. Re-applied by migrate whenever this file changes, so every
-- statement here must be CREATE OR REPLACE.
--
-- Each public function is one whole operation run in one SQL round trip: it locks
-- the account row first (the one lock order: account, then lots, then
-- reservations), checks the idempotency key, applies the change with balanced
-- postings, stores the response under the key and returns it as jsonb.
-- Failures raise SQLSTATE class LE with a JSON DETAIL the server maps to gRPC:
--   LE001 insufficient credits      LE002 idempotency key reused
--   LE003 account not found         LE004 reservation not found
--   LE005 reservation not pending   LE006 reservation expired
--   LE007 amount exceeds hold       LE008 amount exceeds refundable
--   LE009 reservation not committed LE010 invalid argument
--   LE046 too many lots for one call

-- Signatures that changed: CREATE OR REPLACE would leave the old one beside the new.
DROP FUNCTION IF EXISTS ledger_take_from_lots(text, uuid, bigint, timestamptz, bigint);
DROP FUNCTION IF EXISTS ledger_take_from_lots(text, uuid, bigint, timestamptz, bigint, text);
DROP FUNCTION IF EXISTS ledger_new_transaction(text, text, bigint, timestamptz, uuid, text, text, text, text);
DROP FUNCTION IF EXISTS ledger_reserve(text, text, bytea, bigint, timestamptz, text, text, timestamptz);
DROP FUNCTION IF EXISTS ledger_commit(text, uuid, text, bytea, bigint, text, timestamptz);
DROP FUNCTION IF EXISTS ledger_release(text, uuid, text, bytea, text, timestamptz);
DROP FUNCTION IF EXISTS ledger_journal_page(text, bigint, text[], timestamptz, timestamptz, text, text, text[], int);
DROP FUNCTION IF EXISTS ledger_journal_page(text, bigint, text[], timestamptz, timestamptz, text, text, text[], int, bigint);
DROP FUNCTION IF EXISTS ledger_consume(text, text, bytea, bigint, text, text, timestamptz);
DROP FUNCTION IF EXISTS ledger_account_journal_reaches_back(text, bigint, timestamptz);
DROP FUNCTION IF EXISTS ledger_release_holds(text, uuid, text, timestamptz, text);
DROP FUNCTION IF EXISTS ledger_release_holds(text, uuid[], text, timestamptz, text);
-- Its result columns changed (CREATE OR REPLACE cannot change them); recreated below, as
-- the previous release's form beside the one with p_scan.
DROP FUNCTION IF EXISTS ledger_list_transactions(text, bigint, text[], timestamptz, timestamptz, text, text, text[], int, timestamptz);

-- The small SQL helpers below are STABLE, not IMMUTABLE: their bodies call stable functions
-- (extract on a timestamptz, jsonb_build_object), and PostgreSQL inlines a SQL function
-- into the statement calling it only when it is declared no stricter than its body; not
-- inlined, each call runs an executor of its own (~10% of a batch's instructions).
CREATE OR REPLACE FUNCTION ledger_micros(ts timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (extract(epoch FROM ts) * 1000000)::bigint
$$;

CREATE OR REPLACE FUNCTION ledger_fail(code text, message text, detail jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, DETAIL = detail::text;
END $$;

-- Posting numbers (postings.posting_no) and a reservation's lot numbers
-- (reservation_lots.seq) are smallint (migration 0001), and widening them would rewrite the
-- largest tables under an exclusive lock. So one journal entry posts at most 32,768 times
-- (numbers 0 to this): a call that would post more is refused with LE046 (TOO_MANY_LOTS)
-- and the most it can move at once, for the caller to split it. Overflowing, it failed
-- with 22003, which reads as BALANCE_LIMIT: untrue, and no hint what to do.
CREATE OR REPLACE FUNCTION ledger_last_posting_no() RETURNS int
LANGUAGE sql IMMUTABLE AS $$
    SELECT 32767
$$;

CREATE OR REPLACE FUNCTION ledger_fail_too_many_lots(
    p_most_lots bigint, p_most_micros bigint, p_requested bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_fail('LE046',
        'the amount draws on more of the account''s lots than one call can take: '
        || 'move at most max_amount_micros per call', jsonb_build_object(
            'max_lots', p_most_lots, 'max_amount_micros', p_most_micros,
            'requested_micros', p_requested));
END $$;

-- Balances as the API shows them: the one definition of that shape.
CREATE OR REPLACE FUNCTION ledger_balance_values_json(
    p_account text, p_balance bigint, p_held bigint, p_reward bigint, now_ts timestamptz)
    RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'account_id', p_account,
        'balance_micros', p_balance,
        'available_micros', p_balance - p_held,
        'held_micros', p_held,
        'reward_balance_micros', p_reward,
        'as_of', ledger_micros(now_ts))
$$;

-- What an account's overdraft lot has lost: its debt (migration 0011).
CREATE OR REPLACE FUNCTION ledger_overdraft_debt(p_account text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT amount_micros - remaining_micros FROM lots
     WHERE account_id = p_account AND source = 'overdraft'
$$;

-- Balances from a locked (or freshly read) account row. With an overdraft limit the
-- balance shown is below the lots' sum by the limit (the overdraft lot holds the unused
-- part of it), and the debt is what the overdraft lot has lost; the available credits are
-- the same either way. Without one, the fields are absent (0). No sub-select here: a SQL
-- function with one is not inlined where it is called, and every answer calls this one
-- (bench.sql_cost: a Balance cost 2.4 times the instructions with one).
CREATE OR REPLACE FUNCTION ledger_balance_json(a accounts, now_ts timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT ledger_balance_values_json(a.account_id, a.balance_micros, a.held_micros,
                                      a.reward_balance_micros, now_ts)
           || CASE WHEN a.overdraft_limit_micros = 0 THEN '{}'::jsonb ELSE jsonb_build_object(
                  'balance_micros', a.balance_micros - a.overdraft_limit_micros,
                  'overdraft_limit_micros', a.overdraft_limit_micros,
                  'debt_micros', ledger_overdraft_debt(a.account_id))
              END
$$;

CREATE OR REPLACE FUNCTION ledger_lot_json(l lots) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'lot_id', l.lot_id::text,
        'account_id', l.account_id,
        'source', l.source,
        'balance_kind', l.balance_kind,
        'amount_micros', l.amount_micros,
        'remaining_micros', l.remaining_micros,
        'held_micros', l.held_micros,
        'expired_micros', l.expired_micros,
        'expires_at', ledger_micros(l.expires_at),
        'priority', l.priority,
        'external_ref', coalesce(l.external_ref, ''),
        'created_at', ledger_micros(l.created_at),
        'parent_lot_id', coalesce(l.parent_lot_id::text, ''))
$$;

-- One lot of a reservation as the API shows it: the one definition of that shape, for the
-- reservation read back and for the lots a Reserve, Consume or Commit has just written.
CREATE OR REPLACE FUNCTION ledger_reservation_lot_json(
    p_lot bigint, p_source text, p_held bigint, p_committed bigint, p_refunded bigint DEFAULT 0,
    p_refund_expired bigint DEFAULT 0) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'lot_id', p_lot::text,
        'source', p_source,
        'held_micros', p_held,
        'committed_micros', p_committed,
        'refunded_micros', p_refunded,
        'refund_expired_micros', p_refund_expired)
$$;

-- A reservation as the API shows it, from its row and its lots (as ledger_take_lots
-- returns them).
CREATE OR REPLACE FUNCTION ledger_reservation_row_json(r reservations, p_lots jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'reservation_id', r.reservation_id::text,
        'account_id', r.account_id,
        'status', r.status,
        'held_micros', r.held_micros,
        'committed_micros', r.committed_micros,
        'refunded_micros', r.refunded_micros,
        'expires_at', ledger_micros(r.expires_at),
        'created_at', ledger_micros(r.created_at),
        'finalized_at', ledger_micros(r.finalized_at),
        'feature', coalesce(r.feature, ''),
        'comment', coalesce(r.comment, ''),
        'charge_transaction_id', coalesce(r.charge_transaction_id::text, ''),
        'model', coalesce(r.model, ''),
        'usage', r.usage,
        'lots', coalesce(p_lots, '[]'::jsonb))
$$;

CREATE OR REPLACE FUNCTION ledger_reservation_json(p_account text, p_reservation uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT ledger_reservation_row_json(r, (
            SELECT jsonb_agg(ledger_reservation_lot_json(
                       rl.lot_id, l.source, rl.held_micros, rl.committed_micros,
                       rl.refunded_micros, rl.refund_expired_micros) ORDER BY rl.seq)
              FROM reservation_lots rl
              JOIN lots l ON l.account_id = rl.account_id AND l.lot_id = rl.lot_id
             WHERE rl.account_id = r.account_id AND rl.reservation_id = r.reservation_id))
      FROM reservations r
     WHERE r.account_id = p_account AND r.reservation_id = p_reservation
$$;

-- The status a journal entry shows (TransactionStatus): a hold follows its
-- reservation; a charge shows its refunds; everything else succeeded.
CREATE OR REPLACE FUNCTION ledger_transaction_status(
    p_kind text, p_reservation_status text, p_committed bigint, p_refunded bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_kind = 'hold' THEN CASE p_reservation_status
            WHEN 'pending' THEN 'pending' WHEN 'committed' THEN 'committed'
            WHEN 'failed' THEN 'failed' ELSE 'released' END
        WHEN p_kind = 'charge' AND coalesce(p_refunded, 0) > 0 THEN
            CASE WHEN p_refunded >= coalesce(p_committed, 0) THEN 'refunded' ELSE 'partially_refunded' END
        ELSE 'succeeded'
    END
$$;

-- A reservation's status in an error message ('failed' reads as what happened to it).
CREATE OR REPLACE FUNCTION ledger_status_words(p_status text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_status WHEN 'failed' THEN 'released (its job failed)' ELSE p_status END
$$;

-- Returns the stored response of a retried request, NULL for a new key, and fails
-- when the key was used for a different request. Call with the account locked.
CREATE OR REPLACE FUNCTION ledger_idempotent_replay(
    p_account text, p_key text, p_operation text, p_hash bytea) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    k idempotency_keys;
BEGIN
    SELECT * INTO k FROM idempotency_keys
     WHERE account_id = p_account AND idempotency_key = p_key;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF k.operation <> p_operation OR k.request_hash <> p_hash THEN
        PERFORM ledger_fail('LE002', 'idempotency key was used for a different request',
            jsonb_build_object('idempotency_key', p_key, 'original_operation', k.operation));
    END IF;
    RETURN k.response || jsonb_build_object('replayed', true);
END $$;

CREATE OR REPLACE FUNCTION ledger_idempotent_store(
    p_account text, p_key text, p_operation text, p_hash bytea, p_response jsonb,
    p_now timestamptz) RETURNS jsonb
LANGUAGE sql AS $$
    INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash, response, created_at)
    VALUES (p_account, p_key, p_operation, p_hash, p_response, p_now);
    SELECT p_response || jsonb_build_object('replayed', false);
$$;

CREATE OR REPLACE FUNCTION ledger_new_transaction(
    p_account text, p_kind text, p_amount bigint, p_now timestamptz,
    p_reservation uuid DEFAULT NULL, p_feature text DEFAULT NULL, p_comment text DEFAULT NULL,
    p_actor text DEFAULT NULL, p_external_ref text DEFAULT NULL, p_model text DEFAULT NULL,
    p_usage jsonb DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$
    INSERT INTO journal_transactions (account_id, kind, amount_micros, reservation_id, feature,
                                      comment, actor, external_ref, created_at, model, usage)
    VALUES (p_account, p_kind, p_amount, p_reservation, nullif(p_feature, ''),
            nullif(p_comment, ''), nullif(p_actor, ''), nullif(p_external_ref, ''), p_now,
            nullif(p_model, ''), p_usage)
    RETURNING transaction_id
$$;

-- The amount to hold or charge, and its pricing: p_usage ({feature, model,
-- quantities}) priced by the rate card (or p_snapshot's prices), else p_amount as is.
CREATE OR REPLACE FUNCTION ledger_priced(p_amount bigint, p_usage jsonb, p_snapshot jsonb DEFAULT NULL)
    RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_usage IS NULL THEN
        RETURN jsonb_build_object('cost_micros', p_amount);
    END IF;
    RETURN ledger_price_usage(p_usage ->> 'feature', coalesce(p_usage ->> 'model', ''),
                              p_usage -> 'quantities', p_snapshot);  -- 0003_pricing.sql
END $$;

CREATE OR REPLACE FUNCTION ledger_post(
    p_account text, p_transaction bigint, p_no int, p_ledger_account text,
    p_lot bigint, p_source text, p_amount bigint, p_memo text DEFAULT NULL) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, lot_id, source,
                          amount_micros, memo)
    SELECT p_account, p_transaction, p_no, p_ledger_account, p_lot, p_source, p_amount, p_memo
     WHERE p_amount <> 0
$$;

-- Adds a lot to an account inside transaction p_txn: the lot, its account-side
-- posting (number p_posting_no) and the account's balance. The caller posts the
-- other side (issuance for a grant, the source lots for a transfer).
CREATE OR REPLACE FUNCTION ledger_add_lot(
    p_account text, p_txn bigint, p_posting_no int, p_amount bigint, p_source text,
    p_balance_kind text, p_expires_at timestamptz, p_external_ref text, p_parent_lot bigint,
    p_now timestamptz) RETURNS lots
LANGUAGE plpgsql AS $$
DECLARE
    l lots;
    prio smallint;
    overdraft_limit bigint;
BEGIN
    SELECT priority INTO prio FROM credit_sources WHERE source = p_source;
    IF NOT FOUND THEN
        PERFORM ledger_fail('LE010', 'unknown credit source',
            jsonb_build_object('field', 'source', 'violation', 'unknown credit source ' || p_source));
    END IF;
    -- An administrator's order (setting consumption.priorities) before the ledger's. Read
    -- directly, not by ledger_setting: a database whose settings predate the key (a server
    -- of the previous release wrote them) grants in the ledger's order instead of failing.
    prio := coalesce((SELECT (value ->> p_source)::smallint FROM settings
                       WHERE key = 'consumption.priorities'), prio);
    INSERT INTO lots (account_id, source, balance_kind, amount_micros, remaining_micros, priority,
                      expires_at, created_at, external_ref, parent_lot_id, grant_transaction_id)
    VALUES (p_account, p_source, p_balance_kind, p_amount, p_amount, prio, p_expires_at, p_now,
            nullif(p_external_ref, ''), p_parent_lot, p_txn)
    RETURNING * INTO l;
    PERFORM ledger_post(p_account, p_txn, p_posting_no, 'account:' || p_balance_kind, l.lot_id,
                        p_source, p_amount);
    UPDATE accounts
       SET balance_micros = balance_micros + CASE WHEN p_balance_kind = 'main' THEN p_amount ELSE 0 END,
           reward_balance_micros = reward_balance_micros
                                   + CASE WHEN p_balance_kind = 'reward' THEN p_amount ELSE 0 END,
           next_maintenance_at = least(next_maintenance_at, p_expires_at)
     WHERE account_id = p_account
    RETURNING overdraft_limit_micros INTO overdraft_limit;
    IF overdraft_limit > 0 AND p_balance_kind = 'main' AND p_source <> 'overdraft' THEN
        PERFORM ledger_settle_overdraft(p_account, p_now);
        SELECT * INTO l FROM lots WHERE account_id = p_account AND lot_id = l.lot_id;
    END IF;
    RETURN l;
END $$;

-- Moves p_amount of unheld credits out of the account's live lots of one balance kind
-- (never the overdraft lot), in consumption order, each posted to p_txn from posting
-- p_posting_no on; the caller posts where they go. Returns the next posting number. Call
-- with the account row locked, for no more than those lots hold.
CREATE OR REPLACE FUNCTION ledger_move_out_of_lots(
    p_account text, p_balance_kind text, p_amount bigint, p_txn bigint, p_posting_no int,
    p_memo text, p_now timestamptz) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    due bigint := p_amount;
    take bigint;
    n int := p_posting_no;
    r record;
BEGIN
    FOR r IN
        SELECT lot_id, source, remaining_micros - held_micros AS unheld FROM lots
         WHERE account_id = p_account AND balance_kind = p_balance_kind AND NOT depleted
           AND source <> 'overdraft' AND (expires_at IS NULL OR expires_at > p_now)
           AND remaining_micros > held_micros
         ORDER BY priority, expires_at, lot_id
           FOR UPDATE
    LOOP
        take := least(r.unheld, due);
        UPDATE lots SET remaining_micros = remaining_micros - take
         WHERE account_id = p_account AND lot_id = r.lot_id;
        PERFORM ledger_post(p_account, p_txn, n, 'account:' || p_balance_kind, r.lot_id, r.source,
                            -take, p_memo);
        n := n + 1;
        due := due - take;
        EXIT WHEN due = 0;
    END LOOP;
    RETURN n;
END $$;

-- An overdraft debt never stands beside spendable credits: whatever makes main credits
-- spendable while the account owes (a grant, a hold given back, a refund, a commit that
-- drew on the overdraft while other credits were free) pays the debt back from them at
-- once, in consumption order, as TRANSFER transactions into the overdraft lot. The
-- balance does not move; the debt and those lots' remaining credits fall. Call with the
-- account row locked, from accounts with an overdraft limit (the callers read it).
-- One TRANSFER per p_lots_per_entry lots paid from: each posts once and the overdraft lot
-- after them, numbered within smallint (ledger_last_posting_no). Holds timed out together
-- can free more lots than one entry numbers, and the repayment runs in the maintenance
-- every call on the account runs first: one entry failed them all.
DROP FUNCTION IF EXISTS ledger_settle_overdraft(text, timestamptz);
CREATE OR REPLACE FUNCTION ledger_settle_overdraft(
    p_account text, p_now timestamptz, p_lots_per_entry int DEFAULT 32767) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    o lots;
    debt bigint;
    total bigint;
    txn bigint;
    n int;
BEGIN
    SELECT * INTO o FROM lots WHERE account_id = p_account AND source = 'overdraft';
    IF NOT FOUND OR o.amount_micros = o.remaining_micros THEN
        RETURN;
    END IF;
    debt := o.amount_micros - o.remaining_micros;
    LOOP
        -- The lots ledger_move_out_of_lots takes next, in its order.
        SELECT least(debt, coalesce(sum(unheld), 0)) INTO total
          FROM (SELECT remaining_micros - held_micros AS unheld FROM lots
                 WHERE account_id = p_account AND balance_kind = 'main' AND NOT depleted
                   AND source <> 'overdraft' AND (expires_at IS NULL OR expires_at > p_now)
                   AND remaining_micros > held_micros
                 ORDER BY priority, expires_at, lot_id
                 LIMIT p_lots_per_entry) next_lots;
        EXIT WHEN total = 0;
        txn := ledger_new_transaction(p_account, 'transfer', total, p_now, NULL, NULL,
                                      'overdraft repayment');
        n := ledger_move_out_of_lots(p_account, 'main', total, txn, 0, 'overdraft repayment',
                                     p_now);
        -- The overdraft lot last, after the lots it is paid from (all under the account's lock).
        UPDATE lots SET remaining_micros = remaining_micros + total
         WHERE account_id = p_account AND lot_id = o.lot_id;
        PERFORM ledger_post(p_account, txn, n, 'account:main', o.lot_id, o.source, total,
                            'overdraft repayment');
        debt := debt - total;
        -- Fewer lots than an entry takes: the debt is paid or no credits are left.
        EXIT WHEN n < p_lots_per_entry;
    END LOOP;
END $$;

-- Grants p_amount of p_source as one GRANT transaction: a new lot and the issuance
-- posting of its source. Returns the lot.
CREATE OR REPLACE FUNCTION ledger_grant_lot(
    p_account text, p_amount bigint, p_source text, p_balance_kind text, p_expires_at timestamptz,
    p_external_ref text, p_comment text, p_actor text, p_now timestamptz) RETURNS lots
LANGUAGE plpgsql AS $$
DECLARE
    txn bigint;
    l lots;
BEGIN
    IF p_source = 'overdraft' THEN  -- only ledger_set_overdraft_limit makes that lot
        PERFORM ledger_fail('LE010', 'overdraft credits are not granted', jsonb_build_object(
            'field', 'source', 'violation', 'OVERDRAFT is set by the overdraft limit'));
    END IF;
    txn := ledger_new_transaction(p_account, 'grant', p_amount, p_now, NULL, NULL, p_comment,
                                  p_actor, p_external_ref);
    l := ledger_add_lot(p_account, txn, 0, p_amount, p_source, p_balance_kind, p_expires_at,
                        p_external_ref, NULL, p_now);
    PERFORM ledger_post(p_account, txn, 1, 'issuance:' || p_source, NULL, p_source, -p_amount);
    RETURN l;
END $$;

-- Moves the unheld credits of the account's lots that expired by p_now into
-- breakage, in one EXPIRY transaction. Held credits of an expired lot stay until
-- their reservation settles (they were held while the lot was valid); settling
-- calls this again. Returns the credits expired.
-- Its earlier forms (without p_alert, without p_released): CREATE OR REPLACE would leave
-- them beside this one.
DROP FUNCTION IF EXISTS ledger_expire_due_lots(text, timestamptz);
DROP FUNCTION IF EXISTS ledger_expire_due_lots(text, timestamptz, boolean);
DROP FUNCTION IF EXISTS ledger_expire_due_lots(text, timestamptz, boolean, boolean);
-- p_alert: check the low-balance threshold for the expiry; false when the caller checks the
-- whole of what it did once (a commit, maintenance that grants a month's allowance next).
-- p_released: the credits expiring are the ones a settled hold just freed: they were held,
-- not expired, when their lot expired, so they expire now. Their postings say so ('released
-- after its lot expired'), and the reports date them at the transaction, not back at the
-- lot's expiry as other expiries (a closed day's figures would change after the fact).
-- The caller journals what had expired unheld before, apart (ledger_maintain).
-- One EXPIRY transaction per p_lots_per_entry lots, in lot order: each lot posts twice and
-- posting numbers are smallint, so one entry for 16,384 lots or more failed, and with it
-- every call on the account, which expires what is due first (helper-65).
CREATE OR REPLACE FUNCTION ledger_expire_due_lots(
    p_account text, p_now timestamptz, p_alert boolean DEFAULT true,
    p_released boolean DEFAULT false, p_lots_per_entry int DEFAULT 16000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    l lots;
    txn bigint;
    n int;
    total bigint := 0;
    main_total bigint := 0;
    part bigint;
    part_main bigint;
    after_lot bigint := 0;
    last_lot bigint;
BEGIN
    PERFORM 1 FROM lots
     WHERE account_id = p_account AND NOT depleted AND remaining_micros > held_micros
       AND expires_at IS NOT NULL AND expires_at <= p_now
     ORDER BY lot_id
       FOR UPDATE;
    LOOP
        SELECT coalesce(sum(unheld), 0),
               coalesce(sum(unheld) FILTER (WHERE balance_kind = 'main'), 0), max(lot_id)
          INTO part, part_main, last_lot
          FROM (SELECT lot_id, balance_kind, remaining_micros - held_micros AS unheld
                  FROM lots
                 WHERE account_id = p_account AND NOT depleted AND remaining_micros > held_micros
                   AND expires_at IS NOT NULL AND expires_at <= p_now AND lot_id > after_lot
                 ORDER BY lot_id
                 LIMIT p_lots_per_entry) due;
        EXIT WHEN last_lot IS NULL;
        txn := ledger_new_transaction(p_account, 'expiry', -part, p_now,
                                      p_comment => 'expired credits moved to breakage');
        n := 0;
        FOR l IN
            SELECT * FROM lots
             WHERE account_id = p_account AND NOT depleted AND remaining_micros > held_micros
               AND expires_at IS NOT NULL AND expires_at <= p_now
               AND lot_id > after_lot AND lot_id <= last_lot
             ORDER BY lot_id
        LOOP
            UPDATE lots
               SET remaining_micros = held_micros,
                   expired_micros = expired_micros + (l.remaining_micros - l.held_micros)
             WHERE account_id = p_account AND lot_id = l.lot_id;
            PERFORM ledger_post(p_account, txn, n, 'account:' || l.balance_kind, l.lot_id,
                                l.source, -(l.remaining_micros - l.held_micros),
                                CASE WHEN p_released THEN 'released after its lot expired'
                                     ELSE 'lot expired' END);
            PERFORM ledger_post(p_account, txn, n + 1, 'breakage', NULL, l.source,
                                l.remaining_micros - l.held_micros);
            n := n + 2;
        END LOOP;
        total := total + part;
        main_total := main_total + part_main;
        after_lot := last_lot;
    END LOOP;
    IF total = 0 THEN
        RETURN 0;
    END IF;
    UPDATE accounts
       SET balance_micros = balance_micros - main_total,
           reward_balance_micros = reward_balance_micros - (total - main_total)
     WHERE account_id = p_account
    RETURNING * INTO a;
    IF main_total > 0 AND p_alert THEN
        -- Expiry lowers the balance like a charge: a crossing is alerted; its email is
        -- queued by the sweeper (0006).
        PERFORM ledger_low_balance_check(a, a.balance_micros + main_total, txn, p_now);
    END IF;
    RETURN total;
END $$;

-- How long after its expires_at a pending hold is still left pending by maintenance done
-- on behalf of other calls (any call's ledger_lock_account, the sweeper's ledger_sweep).
-- A call is judged at the time the server received it (its p_now), but it takes the account
-- lock only later, and meanwhile a call received after it (a Balance read, which does not
-- queue) or a sweep at the worker's later clock may lock the account first: timing the hold
-- out at that later time refused a Commit received before the expiry RESERVATION_EXPIRED and
-- the finished job went unbilled. So the grace covers the longest a received call waits
-- before its statement takes the lock:
--   - in the group-commit queue (server/group_commit.py) until its caller's deadline at most:
--     a waiting call whose deadline passes is dropped, not run (the client library's deadline
--     is 10 s, retries included);
--   - then the batch's wait for a pool connection, at most the pool's 30 s time-out
--     (db/deadlines.py, DeadlinePool), which a batch waits however short its calls' deadlines
--     once the latest of them is that long;
--   - then the batch's statement, lock waits and the calls before it included, at most the
--     statement time-out cap (LEDGER_STATEMENT_TIMEOUT_MS, 5 s; db/deadlines.py).
-- 10 + 30 + 5 = 45 s, rounded up to a minute. A call with no deadline or a longer one, or
-- with LEDGER_STATEMENT_TIMEOUT_MS=0, had no such bound: a Commit received in time that
-- reached the account after the grace found its hold returned and was refused. So the server
-- bounds each of those waits by three quarters of the grace, MAX_WAIT (db/waits.py, whose
-- HOLD_GRACE the server checks is this at start-up): a call that waited that long is refused
-- WAITED_TOO_LONG having changed nothing, and its statement's time-out is what it has left;
-- the last quarter is for clocks of other servers and workers running ahead. A call's own
-- reservation expired at its receipt is refused (ledger_commit) or timed out (ledger_release). During the grace the hold's credits stay held (Balance
-- reports them so) and the hold reads pending; after it the next maintenance or sweep
-- returns them (ledger_next_maintenance schedules it). Immutable: inlined as a constant.
CREATE OR REPLACE FUNCTION ledger_hold_grace() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
    SELECT interval '1 minute'
$$;

-- The earliest future moment a lot of the account expires, one of its
-- reservations times out (its expiry and the grace, ledger_hold_grace) or its monthly
-- allowance falls due (NULL: nothing).
CREATE OR REPLACE FUNCTION ledger_next_maintenance(p_account text, p_now timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(expires_at) FROM lots
          WHERE account_id = p_account AND NOT depleted
            AND expires_at IS NOT NULL AND expires_at > p_now),
        (SELECT min(expires_at) + ledger_hold_grace() FROM reservations
          WHERE account_id = p_account AND status = 'pending'),
        (SELECT monthly_free_next_at FROM accounts WHERE account_id = p_account))
$$;

-- Returns pending reservations' holds to their lots; p_status is 'released', 'failed'
-- (released because the job failed) or 'expired' (time-to-live passed). Journals one
-- RELEASE transaction per reservation, in the order of p_reservations. Set-based, so that a backlog of timed-out holds costs
-- a few statements: a loop of one release per hold updated the same account and lot
-- rows once per hold, and PostgreSQL walks every version its own transaction made of a
-- row, so the loop was quadratic (4,000 holds on one lot took 1.1 s and a large enough
-- backlog outlasted every call's statement time-out).
-- p_alert false: the caller checks the low balance itself (ledger_maintain, once over
-- every expiry and the month's new allowance).
CREATE OR REPLACE FUNCTION ledger_release_holds(
    p_account text, p_reservations uuid[], p_status text, p_now timestamptz, p_comment text,
    p_alert boolean DEFAULT true)
    RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    lot_ids bigint[];
    unholds bigint[];
    total bigint;
    any_lot_expired boolean;
    returned_expiry timestamptz;
    overdraft_limit bigint;
BEGIN
    SELECT array_agg(lot_id), array_agg(held) INTO lot_ids, unholds
      FROM (SELECT rl.lot_id, sum(rl.held_micros) AS held FROM reservation_lots rl
             WHERE rl.account_id = p_account AND rl.reservation_id = ANY (p_reservations)
             GROUP BY rl.lot_id) per_lot;
    -- lot_id = ANY: looked up by key, never a join over all the account's lots.
    WITH unheld AS (
        UPDATE lots l SET held_micros = l.held_micros - u.held
          FROM unnest(lot_ids, unholds) AS u(lot_id, held)
         WHERE l.account_id = p_account AND l.lot_id = ANY (lot_ids) AND l.lot_id = u.lot_id
        RETURNING l.expires_at)
    SELECT coalesce(bool_or(expires_at <= p_now), false),
           min(expires_at) FILTER (WHERE expires_at > p_now)
      INTO any_lot_expired, returned_expiry
      FROM unheld;
    WITH released AS (
        UPDATE reservations SET status = p_status, finalized_at = p_now
         WHERE account_id = p_account AND reservation_id = ANY (p_reservations)
        RETURNING reservation_id, held_micros, feature, model),
    journal AS (
        -- The reservation's feature and model, as its hold's entry: listed by either.
        INSERT INTO journal_transactions (account_id, kind, amount_micros, reservation_id,
                                          feature, model, comment, created_at)
        SELECT p_account, 'release', r.held_micros, r.reservation_id, r.feature, r.model,
               nullif(p_comment, ''), p_now
          FROM released r
          JOIN unnest(p_reservations) WITH ORDINALITY AS wanted(reservation_id, position)
            ON wanted.reservation_id = r.reservation_id
         ORDER BY wanted.position)
    SELECT coalesce(sum(held_micros), 0) INTO total FROM released;
    UPDATE accounts
       SET held_micros = held_micros - total,
           next_maintenance_at = least(next_maintenance_at, returned_expiry)
     WHERE account_id = p_account
    RETURNING overdraft_limit_micros INTO overdraft_limit;
    IF any_lot_expired THEN
        PERFORM ledger_expire_due_lots(p_account, p_now, p_alert, p_released => true);
    END IF;
    IF overdraft_limit > 0 THEN
        PERFORM ledger_settle_overdraft(p_account, p_now);
    END IF;
END $$;

-- Applies what is due for the account: timed-out reservations are released (those
-- expired a grace before p_now, ledger_hold_grace: maintenance runs on behalf of any call
-- and of the sweeper, whose times may be later than that of a call on the hold still on its
-- way), expired lots moved to breakage, then a due monthly allowance granted. Call with
-- the account row locked.
CREATE OR REPLACE FUNCTION ledger_maintain(p_account text, p_now timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    timed_out uuid[] := ARRAY(
        SELECT reservation_id FROM reservations
         WHERE account_id = p_account AND status = 'pending'
           AND expires_at <= p_now - ledger_hold_grace()
         ORDER BY expires_at, reservation_id);
    balance_before bigint;
    expired bigint;
    a accounts;
BEGIN
    -- One low-balance check over every expiry (those of timed-out holds' credits too) and
    -- the month's allowance together: the allowance that ends and the one that begins at
    -- the same moment are no crossing (helper-62: with a hold timed out at the month's end,
    -- the old allowance's expiry alerted on its own before the new one came).
    SELECT balance_micros INTO balance_before FROM accounts WHERE account_id = p_account;
    PERFORM ledger_stretch_allowance(p_account, p_now);  -- before anything expires (0002)
    IF cardinality(timed_out) > 0 THEN
        -- What expired unheld is journaled first, dated back to its lots' expiry by the
        -- reports; what the releases free on expired lots expires after it, dated now.
        PERFORM ledger_expire_due_lots(p_account, p_now, false);
        PERFORM ledger_release_holds(p_account, timed_out, 'expired', p_now,
                                     'time-to-live passed', false);
    END IF;
    expired := ledger_expire_due_lots(p_account, p_now, false);
    PERFORM ledger_monthly_allowance(p_account, p_now);  -- sql/functions/0002_sources.sql
    IF expired > 0 OR cardinality(timed_out) > 0 THEN
        SELECT * INTO a FROM accounts WHERE account_id = p_account;
        IF a.balance_micros < balance_before THEN
            PERFORM ledger_low_balance_check(
                a, balance_before,
                (SELECT max(transaction_id) FROM journal_transactions
                  WHERE account_id = p_account AND kind = 'expiry'),
                p_now);  -- 0006
        END IF;
    END IF;
    UPDATE accounts SET next_maintenance_at = ledger_next_maintenance(p_account, p_now)
     WHERE account_id = p_account;
END $$;

-- Locks the account row (the first lock of every operation) and applies due
-- expiries, so every check below sees only live credits.
CREATE OR REPLACE FUNCTION ledger_lock_account(p_account text, p_now timestamptz) RETURNS accounts
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
BEGIN
    SELECT * INTO a FROM accounts WHERE account_id = p_account FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM ledger_fail('LE003', 'account not found', jsonb_build_object('account_id', p_account));
    END IF;
    IF a.next_maintenance_at <= p_now THEN
        PERFORM ledger_maintain(p_account, p_now);
        SELECT * INTO a FROM accounts WHERE account_id = p_account;
    END IF;
    RETURN a;
END $$;

-- Reads the account, applying due expiries first when there are any (then under
-- the row lock); NULL when the account does not exist.
CREATE OR REPLACE FUNCTION ledger_read_account(p_account text, p_now timestamptz) RETURNS accounts
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
BEGIN
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    IF FOUND AND a.next_maintenance_at <= p_now THEN
        a := ledger_lock_account(p_account, p_now);
    END IF;
    RETURN a;
END $$;

-- ledger_read_account for an account that must exist: LE003 (NOT_FOUND) when it does not.
CREATE OR REPLACE FUNCTION ledger_read_existing_account(p_account text, p_now timestamptz)
    RETURNS accounts
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
BEGIN
    a := ledger_read_account(p_account, p_now);
    IF a.account_id IS NULL THEN
        PERFORM ledger_fail('LE003', 'account not found', jsonb_build_object('account_id', p_account));
    END IF;
    RETURN a;
END $$;

CREATE OR REPLACE FUNCTION ledger_require_available(a accounts, p_amount bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF a.balance_micros - a.held_micros < p_amount THEN
        PERFORM ledger_fail('LE001', 'insufficient credits', jsonb_build_object(
            'available_micros', a.balance_micros - a.held_micros,
            'requested_micros', p_amount));
    END IF;
END $$;

-- The system account a charge's revenue goes to: one per feature (DESIGN.md section 4),
-- 'revenue' for a charge that names none. SQL, immutable: inlined where it is used.
CREATE OR REPLACE FUNCTION ledger_revenue_account(p_feature text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce('revenue:' || nullif(p_feature, ''), 'revenue')
$$;

-- Takes p_amount from the account's live main lots in consumption order, locking
-- each lot it takes from. With p_charge_txn NULL the credits are held for the
-- reservation; otherwise they are spent at once, posted to that transaction
-- against p_counter_account (the feature's revenue for charges, 'adjustment' for admin
-- debits). p_reservation NULL records no reservation lots (admin debits).
-- Returns the reservation's lots as ledger_reservation_json shows them.
-- Call after ledger_require_available.
CREATE OR REPLACE FUNCTION ledger_take_lots(
    p_account text, p_reservation uuid, p_amount bigint, p_now timestamptz, p_charge_txn bigint,
    p_counter_account text DEFAULT 'revenue') RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    -- A declared cursor is planned for a fast start (cursor_tuple_fraction): the walk in
    -- index order, never a sort of all the account's lots, whatever the statistics say.
    lots_in_order CURSOR FOR
        SELECT lot_id, source, remaining_micros, held_micros FROM lots
         WHERE account_id = p_account AND balance_kind = 'main' AND NOT depleted
           AND (expires_at IS NULL OR expires_at > p_now)
         ORDER BY priority, expires_at, lot_id
           FOR UPDATE;
    lot record;
    need bigint := p_amount;
    take bigint;
    -- Lots numbered 0 on, and a charge's revenue posted after them.
    most_lots int := ledger_last_posting_no();
    lot_ids bigint[] := '{}';
    sources text[] := '{}';
    takes bigint[] := '{}';
    lots_json jsonb;
BEGIN
    IF need = 0 THEN
        RETURN '[]'::jsonb;
    END IF;
    -- The cursor reads (and locks) lots only until they cover the amount, so an account
    -- with thousands of lots costs what one with a few does.
    FOR lot IN lots_in_order LOOP
        take := least(lot.remaining_micros - lot.held_micros, need);
        CONTINUE WHEN take <= 0;
        IF cardinality(lot_ids) = most_lots THEN
            PERFORM ledger_fail_too_many_lots(most_lots, p_amount - need, p_amount);
        END IF;
        lot_ids := lot_ids || lot.lot_id;
        sources := sources || lot.source;
        takes := takes || take;
        need := need - take;
        EXIT WHEN need = 0;
    END LOOP;
    IF need > 0 THEN
        -- Unreachable after ledger_require_available; a guard against a broken invariant.
        RAISE EXCEPTION 'lots do not cover the available balance of %', p_account
            USING ERRCODE = 'LE101';
    END IF;
    -- Then one statement for all of them: the lots, the postings, the reservation's lots.
    WITH taken AS (
        SELECT t.lot_id, t.source, t.micros, (t.n - 1)::smallint AS seq,
               CASE WHEN p_charge_txn IS NULL THEN 0 ELSE t.micros END AS spent
          FROM unnest(lot_ids, sources, takes) WITH ORDINALITY AS t(lot_id, source, micros, n)
    ), lots_taken AS (
        UPDATE lots l
           SET held_micros = l.held_micros + t.micros - t.spent,
               remaining_micros = l.remaining_micros - t.spent
          FROM taken t
         -- "= ANY": the plan looks up the lots taken, not the account's every lot.
         WHERE l.account_id = p_account AND l.lot_id = ANY (lot_ids) AND l.lot_id = t.lot_id
    ), posted AS (
        INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, lot_id,
                              source, amount_micros)
        SELECT p_account, p_charge_txn, seq, 'account:main', lot_id, source, -micros
          FROM taken WHERE p_charge_txn IS NOT NULL
        UNION ALL
        SELECT p_account, p_charge_txn, cardinality(lot_ids), p_counter_account, NULL, NULL,
               p_amount
         WHERE p_charge_txn IS NOT NULL
    ), reserved AS (
        INSERT INTO reservation_lots (account_id, reservation_id, lot_id, seq, held_micros,
                                      committed_micros)
        SELECT p_account, p_reservation, lot_id, seq, micros, spent
          FROM taken WHERE p_reservation IS NOT NULL
    )
    SELECT jsonb_agg(ledger_reservation_lot_json(lot_id, source, micros, spent) ORDER BY seq)
      INTO lots_json FROM taken;
    RETURN lots_json;
END $$;

CREATE OR REPLACE FUNCTION ledger_grant(
    p_account text, p_key text, p_hash bytea, p_amount bigint, p_source text,
    p_expires_at timestamptz, p_balance_kind text, p_external_ref text, p_comment text,
    p_actor text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    l lots;
    replay jsonb;
BEGIN
    PERFORM ledger_open_account(p_account, '', p_now);  -- sql/functions/0002_sources.sql
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'grant', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    -- Checked here, after the replay lookup: a retry sent after the expiry still gets
    -- the original response.
    IF p_expires_at <= p_now THEN
        PERFORM ledger_fail('LE010', 'expires_at is not in the future', jsonb_build_object(
            'field', 'expires_at', 'violation', 'must be in the future'));
    END IF;
    l := ledger_grant_lot(p_account, p_amount, p_source, p_balance_kind, p_expires_at,
                          p_external_ref, p_comment, p_actor, p_now);
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    RETURN ledger_idempotent_store(p_account, p_key, 'grant', p_hash, jsonb_build_object(
        'lot', ledger_lot_json(l),
        'transaction_id', l.grant_transaction_id::text,
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

CREATE OR REPLACE FUNCTION ledger_balance(p_account text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
BEGIN
    -- Not ledger_read_existing_account: one PL/pgSQL call fewer on the busiest read
    -- (bench.sql_cost: 9% of a Balance's database instructions).
    a := ledger_read_account(p_account, p_now);
    IF a.account_id IS NULL OR a.overdraft_limit_micros <> 0 THEN
        IF a.account_id IS NULL THEN
            PERFORM ledger_fail('LE003', 'account not found',
                                jsonb_build_object('account_id', p_account));
        END IF;
        -- The debt is read from the overdraft lot: with the account row, in one statement,
        -- so both come from one snapshot. Read in the next statement, without the account's
        -- lock, it could show a charge or grant the row did not (helper-87: a balance of 0
        -- beside a debt of 1 credit).
        RETURN (SELECT ledger_balance_json(x, p_now) FROM accounts x
                 WHERE x.account_id = p_account);
    END IF;
    RETURN ledger_balance_json(a, p_now);
END $$;

-- With p_usage, the usage is priced by the current rate card, its cost held and the
-- priced usage kept with the reservation for its Commit.
CREATE OR REPLACE FUNCTION ledger_reserve(
    p_account text, p_key text, p_hash bytea, p_amount bigint, p_usage jsonb,
    p_expires_at timestamptz, p_feature text, p_comment text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r reservations;
    replay jsonb;
    res uuid := gen_random_uuid();
    txn bigint;
    usage jsonb;
    amount bigint;
    priced jsonb;
    lots_json jsonb;
    feature text := coalesce(p_usage ->> 'feature', p_feature);
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'reserve', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    priced := ledger_priced(p_amount, p_usage);
    amount := (priced ->> 'cost_micros')::bigint;
    usage := CASE WHEN p_usage IS NULL THEN NULL ELSE priced END;
    PERFORM ledger_require_available(a, amount);
    txn := ledger_new_transaction(p_account, 'hold', amount, p_now, res, feature, p_comment, NULL,
                                  NULL, p_usage ->> 'model', usage);
    INSERT INTO reservations (account_id, reservation_id, status, held_micros, expires_at,
                              created_at, feature, model, comment, usage, hold_transaction_id)
    VALUES (p_account, res, 'pending', amount, p_expires_at, p_now, nullif(feature, ''),
            nullif(p_usage ->> 'model', ''), nullif(p_comment, ''), usage, txn)
    RETURNING * INTO r;
    lots_json := ledger_take_lots(p_account, res, amount, p_now, NULL);
    UPDATE accounts
       SET held_micros = held_micros + amount,
           next_maintenance_at = least(next_maintenance_at, p_expires_at + ledger_hold_grace())
     WHERE account_id = p_account
    RETURNING * INTO a;
    RETURN ledger_idempotent_store(p_account, p_key, 'reserve', p_hash, jsonb_build_object(
        'reservation', ledger_reservation_row_json(r, lots_json),
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

-- Locks a reservation for a state change and checks it is pending. With p_now (the call's
-- own time), a hold pending past its expiry then (left pending by others' maintenance for
-- its grace, ledger_hold_grace) is refused as expired too.
DROP FUNCTION IF EXISTS ledger_pending_reservation(text, uuid);
CREATE OR REPLACE FUNCTION ledger_pending_reservation(
    p_account text, p_reservation uuid, p_now timestamptz DEFAULT NULL)
    RETURNS reservations
LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
BEGIN
    SELECT * INTO r FROM reservations
     WHERE account_id = p_account AND reservation_id = p_reservation FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM ledger_fail('LE004', 'reservation not found',
            jsonb_build_object('reservation_id', p_reservation::text));
    END IF;
    -- Within the grace the hold is still held: saying it was returned sent callers to
    -- count credits that Balance still showed held.
    IF r.status = 'expired' OR (r.status = 'pending' AND r.expires_at <= p_now) THEN
        PERFORM ledger_fail('LE006', CASE WHEN r.status = 'expired'
                THEN 'reservation expired: its time-to-live passed and the hold was returned'
                ELSE 'reservation expired: its time-to-live passed; the hold is still held until '
                     || 'a Release returns it, or the account''s next call or sweep once a grace of '
                     || ledger_hold_grace()::text || ' past expired_at has passed' END,
            jsonb_build_object('reservation_id', p_reservation::text,
                               'expired_at', to_char(r.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                               'hold_returned', (r.status = 'expired')::text));
    END IF;
    IF r.status <> 'pending' THEN
        PERFORM ledger_fail('LE005', 'reservation is ' || ledger_status_words(r.status),
            jsonb_build_object('reservation_id', p_reservation::text, 'status', r.status));
    END IF;
    RETURN r;
END $$;

-- With p_usage (the actual usage), the charge is priced at the reservation's prices
-- when it was made from a usage description, else by the current rate card.
CREATE OR REPLACE FUNCTION ledger_commit(
    p_account text, p_reservation uuid, p_key text, p_hash bytea, p_amount bigint,
    p_usage jsonb, p_comment text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r reservations;
    replay jsonb;
    txn bigint;
    amount bigint;
    priced jsonb;
    actual jsonb := p_usage;
    alert bigint;
    any_lot_expired boolean;
    returned_expiry timestamptz;
    lots_json jsonb;
    lot_ids bigint[];
    balance_before bigint;
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'commit', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    balance_before := a.balance_micros;
    -- Judged at the Commit's own time: received after the expiry, it is refused, though
    -- the hold is within its grace.
    r := ledger_pending_reservation(p_account, p_reservation, p_now);
    -- A usage leaves the hold's feature and model out or names them: one naming another
    -- than the hold named is refused and nothing changes. Taken, it would price the charge
    -- as another feature (model) and file the charge, its refunds and the reservation under
    -- it while the hold's entry stays under the first: filtering by either would list half
    -- of the reservation. A hold priced from a usage was priced for its model, none being one.
    IF nullif(actual ->> 'feature', '') <> coalesce(r.feature, actual ->> 'feature') THEN
        PERFORM ledger_fail('LE010', 'the usage names another feature than the hold',
            jsonb_build_object('field', 'usage.feature', 'violation',
                               format('must be the hold''s feature (%s) or empty', r.feature)));
    END IF;
    IF nullif(actual ->> 'model', '')
           <> coalesce(r.model, CASE WHEN r.usage IS NULL THEN actual ->> 'model' END, '') THEN
        PERFORM ledger_fail('LE010', 'the usage names another model than the hold',
            jsonb_build_object('field', 'usage.model', 'violation', CASE
                WHEN r.model IS NULL THEN 'must be empty: the hold was priced for no model'
                ELSE format('must be the hold''s model (%s) or empty', r.model) END));
    END IF;
    IF actual IS NOT NULL AND r.usage IS NOT NULL THEN
        -- The usage is the reservation's feature and model; only the quantities are new.
        actual := jsonb_build_object('feature', r.usage ->> 'feature', 'model', r.usage ->> 'model',
                                     'quantities', actual -> 'quantities');
    ELSIF actual IS NOT NULL THEN
        -- A hold of an amount, settled by usage: what the usage leaves out is the hold's.
        -- One that named no feature (or model) takes the usage's, as does the reservation
        -- below; its hold's entry, written without, is listed under them (ledger_entry_feature).
        actual := actual || jsonb_build_object(
            'feature', coalesce(nullif(actual ->> 'feature', ''), r.feature, ''),
            'model', coalesce(nullif(actual ->> 'model', ''), r.model, ''));
        IF actual ->> 'feature' = '' THEN  -- bad input, not a rate card without the feature
            PERFORM ledger_fail('LE010', 'the usage names no feature, nor does the hold',
                jsonb_build_object('field', 'usage.feature', 'violation',
                                   'is required when the hold names no feature'));
        END IF;
    END IF;
    priced := ledger_priced(p_amount, actual, r.usage);
    amount := (priced ->> 'cost_micros')::bigint;
    IF amount > r.held_micros THEN
        PERFORM ledger_fail('LE007', 'commit amount exceeds the held amount', jsonb_build_object(
            'reservation_id', p_reservation::text, 'held_micros', r.held_micros,
            'requested_micros', amount));
    END IF;
    txn := ledger_new_transaction(p_account, 'charge', -amount, p_now, p_reservation,
                                  coalesce(actual ->> 'feature', r.feature),
                                  coalesce(nullif(p_comment, ''), r.comment), NULL, NULL,
                                  coalesce(actual ->> 'model', r.model),
                                  -- A charge of an amount was not priced by the rate card:
                                  -- the hold's estimate stays the hold's, not the charge's.
                                  CASE WHEN actual IS NULL THEN NULL ELSE priced END);
    SELECT array_agg(lot_id ORDER BY seq) INTO lot_ids
      FROM reservation_lots WHERE account_id = p_account AND reservation_id = p_reservation;
    -- One statement: the charge is taken from the held lots in their order (what is not
    -- used goes back), the reservation's lots record it, the postings journal it. Lots are
    -- found by "= ANY (lot_ids)": the plan looks up those, not the account's every lot.
    WITH held AS (
        SELECT rl.lot_id, rl.seq, rl.held_micros, l.source, l.expires_at,
               greatest(0, least(rl.held_micros, amount - (sum(rl.held_micros)
                   OVER (ORDER BY rl.seq) - rl.held_micros)))::bigint AS used
          FROM reservation_lots rl
          JOIN lots l ON l.account_id = p_account AND l.lot_id = ANY (lot_ids)
                     AND l.lot_id = rl.lot_id
         WHERE rl.account_id = p_account AND rl.reservation_id = p_reservation
    ), lots_charged AS (
        UPDATE lots l
           SET held_micros = l.held_micros - h.held_micros,
               remaining_micros = l.remaining_micros - h.used
          FROM held h
         WHERE l.account_id = p_account AND l.lot_id = ANY (lot_ids) AND l.lot_id = h.lot_id
    ), reserved_charged AS (
        UPDATE reservation_lots rl SET committed_micros = h.used
          FROM held h
         WHERE rl.account_id = p_account AND rl.reservation_id = p_reservation
           AND rl.lot_id = h.lot_id AND h.used > 0
    ), posted AS (
        INSERT INTO postings (account_id, transaction_id, posting_no, ledger_account, lot_id,
                              source, amount_micros)
        SELECT p_account, txn, (row_number() OVER (ORDER BY seq) - 1)::smallint, 'account:main',
               lot_id, source, -used
          FROM held WHERE used > 0
        UNION ALL
        SELECT p_account, txn, (SELECT count(*) FROM held WHERE used > 0)::smallint,
               ledger_revenue_account(coalesce(actual ->> 'feature', r.feature)), NULL, NULL,
               amount
         WHERE amount <> 0
    )
    SELECT coalesce(bool_or(expires_at <= p_now), false),
           min(expires_at) FILTER (WHERE held_micros > used AND expires_at > p_now),
           jsonb_agg(ledger_reservation_lot_json(lot_id, source, held_micros, used) ORDER BY seq)
      INTO any_lot_expired, returned_expiry, lots_json
      FROM held;
    UPDATE reservations
       SET status = 'committed', committed_micros = amount, finalized_at = p_now,
           charge_transaction_id = txn,
           usage = CASE WHEN actual IS NULL THEN usage ELSE priced END,
           feature = coalesce(actual ->> 'feature', feature),
           model = coalesce(nullif(actual ->> 'model', ''), model)
     WHERE account_id = p_account AND reservation_id = p_reservation
    RETURNING * INTO r;
    -- What goes back to a lot expiring later is expired in time even when a call of a
    -- later time applied the lot's expiry before this one ran (it left the held part, and
    -- the account's next maintenance moved past the lot); as ledger_release_holds.
    UPDATE accounts
       SET held_micros = held_micros - r.held_micros, balance_micros = balance_micros - amount,
           next_maintenance_at = least(next_maintenance_at, returned_expiry)
     WHERE account_id = p_account
    RETURNING * INTO a;
    IF any_lot_expired THEN
        -- The unused part of a hold on a lot that expired meanwhile expires now (the
        -- commit's own check below covers it).
        PERFORM ledger_expire_due_lots(p_account, p_now, false, p_released => true);
        SELECT * INTO a FROM accounts WHERE account_id = p_account;
    END IF;
    IF a.overdraft_limit_micros > 0 THEN
        PERFORM ledger_settle_overdraft(p_account, p_now);
    END IF;
    alert := ledger_low_balance_check(a, balance_before, txn, p_now);  -- 0006
    RETURN ledger_idempotent_store(p_account, p_key, 'commit', p_hash, jsonb_build_object(
        'reservation', ledger_reservation_row_json(r, lots_json),
        'transaction_id', txn::text,
        'low_balance_alert_id', alert,
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

-- What a Release leaves: the reservation's status, and the journal's comment (the caller's
-- reason, else why). One place for ledger_release and the set of 0010_release_set.sql.
CREATE OR REPLACE FUNCTION ledger_release_status(p_job_failed boolean) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_job_failed THEN 'failed' ELSE 'released' END
$$;

CREATE OR REPLACE FUNCTION ledger_release_comment(p_job_failed boolean, p_reason text)
    RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(nullif(p_reason, ''),
                    CASE WHEN p_job_failed THEN 'job failed' ELSE 'released by caller' END)
$$;

CREATE OR REPLACE FUNCTION ledger_release(
    p_account text, p_reservation uuid, p_key text, p_hash bytea, p_reason text,
    p_now timestamptz, p_job_failed boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'release', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    -- A hold past its expiry at the Release's own time, left pending for its grace
    -- (ledger_hold_grace), times out now, as maintenance at this time did before the grace.
    IF EXISTS (SELECT 1 FROM reservations WHERE account_id = p_account
                  AND reservation_id = p_reservation AND status = 'pending'
                  AND expires_at <= p_now) THEN
        PERFORM ledger_release_holds(p_account, ARRAY[p_reservation], 'expired', p_now,
                                     'time-to-live passed');
    END IF;
    -- A reservation that timed out has already given its hold back, which is what
    -- Release asks for: answer with it as it is (status EXPIRED).
    IF NOT EXISTS (SELECT 1 FROM reservations WHERE account_id = p_account
                      AND reservation_id = p_reservation AND status = 'expired') THEN
        PERFORM ledger_pending_reservation(p_account, p_reservation);
        PERFORM ledger_release_holds(
            p_account, ARRAY[p_reservation],
            ledger_release_status(p_job_failed), p_now,
            ledger_release_comment(p_job_failed, p_reason));
    END IF;
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    RETURN ledger_idempotent_store(p_account, p_key, 'release', p_hash, jsonb_build_object(
        'reservation', ledger_reservation_json(p_account, p_reservation),
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

-- How a refund of p_amount spreads over a committed reservation's lots: last-charged
-- lot first, each taking back at most what was charged from it and not yet refunded.
CREATE OR REPLACE FUNCTION ledger_refund_plan(
    p_account text, p_reservation uuid, p_amount bigint, p_now timestamptz)
    RETURNS TABLE (lot_id bigint, source text, expires_at timestamptz, give bigint, expired boolean)
LANGUAGE sql STABLE AS $$
    SELECT lot_id, source, expires_at,
           least(refundable_here, p_amount - (running - refundable_here)),
           expires_at IS NOT NULL AND expires_at <= p_now
      FROM (SELECT rl.lot_id, l.source, l.expires_at, rl.seq,
                   rl.committed_micros - rl.refunded_micros AS refundable_here,
                   sum(rl.committed_micros - rl.refunded_micros) OVER (ORDER BY rl.seq DESC) AS running
              FROM reservation_lots rl
              JOIN lots l ON l.account_id = rl.account_id AND l.lot_id = rl.lot_id
             WHERE rl.account_id = p_account AND rl.reservation_id = p_reservation
               AND rl.committed_micros > rl.refunded_micros) plan
     WHERE running - refundable_here < p_amount
     ORDER BY seq DESC
$$;

-- What a refund of p_amount posts before the revenue's posting, as ledger_refund posts it
-- (once for each lot, twice more for a lot expired since; the overdraft lot's step once
-- more for a refund lot and p_overdraft_postings for the lots that repaid its debt), and
-- the most a refund can give back with the revenue's posting numbered within smallint
-- (ledger_last_posting_no): the steps, last-charged lot first, whose postings fit.
CREATE OR REPLACE FUNCTION ledger_refund_fit(
    p_account text, p_reservation uuid, p_amount bigint, p_now timestamptz,
    p_overdraft_postings int,
    OUT expired_part bigint, OUT overdraft_give bigint, OUT postings bigint,
    OUT most_lots bigint, OUT most_micros bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(give) FILTER (WHERE expired), 0),
           coalesce(sum(give) FILTER (WHERE source = 'overdraft'), 0),
           coalesce(max(posted), 0),
           count(*) FILTER (WHERE posted <= ledger_last_posting_no()),
           coalesce(max(upto) FILTER (WHERE posted <= ledger_last_posting_no()), 0)
      FROM (SELECT source, give, expired, sum(give) OVER w AS upto,
                   sum(CASE WHEN expired THEN 3 ELSE 1 END
                       + CASE WHEN source = 'overdraft' THEN 1 + p_overdraft_postings ELSE 0 END)
                       OVER w AS posted
              FROM ledger_refund_plan(p_account, p_reservation, p_amount, p_now)
                   WITH ORDINALITY AS plan(lot_id, source, expires_at, give, expired, k)
            WINDOW w AS (ORDER BY k)) steps
$$;

-- Where a refund's credits go that the overdraft lot has no room for: its debt was repaid
-- since the charge, by transfers (ledger_settle_overdraft, postings 'overdraft repayment')
-- out of the account's main lots, so those lots paid for the charge in the end. They get
-- back what their repayments took and no refund has given back yet ('overdraft repayment
-- refunded'), the latest repayment's lot first, up to p_overflow. Without this the credits
-- became a free, permanent refund lot: purchased credits came back as free ones
-- (helper-51's review). What no repayment accounts for is the caller's to place.
CREATE OR REPLACE FUNCTION ledger_overdraft_refund_returns(
    p_account text, p_overflow bigint, p_now timestamptz)
    RETURNS TABLE (lot_id bigint, source text, expires_at timestamptz, give bigint,
                   expired boolean)
LANGUAGE sql STABLE AS $$
    WITH moved AS (
        SELECT p.lot_id,
               coalesce(sum(-p.amount_micros)
                   FILTER (WHERE t.kind = 'transfer' AND p.memo = 'overdraft repayment'), 0)
               - coalesce(sum(p.amount_micros)
                   FILTER (WHERE t.kind = 'refund' AND p.memo = 'overdraft repayment refunded'),
                   0) AS open,
               max(p.transaction_id)
                   FILTER (WHERE t.kind = 'transfer' AND p.memo = 'overdraft repayment') AS latest
          FROM postings p
          JOIN journal_transactions t
            ON t.account_id = p.account_id AND t.transaction_id = p.transaction_id
         WHERE p.account_id = p_account AND p.lot_id IS NOT NULL
           AND p.memo IN ('overdraft repayment', 'overdraft repayment refunded')
           AND ((t.kind = 'transfer' AND p.amount_micros < 0)
                OR (t.kind = 'refund' AND p.amount_micros > 0))
         GROUP BY p.lot_id
    ), ordered AS (
        SELECT m.lot_id, m.open, m.latest,
               sum(m.open) OVER (ORDER BY m.latest DESC, m.lot_id DESC) AS running
          FROM moved m
         WHERE m.open > 0
    )
    SELECT o.lot_id, l.source, l.expires_at,
           least(o.open, p_overflow - (o.running - o.open))::bigint,
           l.expires_at IS NOT NULL AND l.expires_at <= p_now
      FROM ordered o
      JOIN lots l ON l.account_id = p_account AND l.lot_id = o.lot_id
     WHERE o.running - o.open < p_overflow
     ORDER BY o.latest DESC, o.lot_id DESC
$$;

-- Gives committed credits back to the lots they came from, last-charged lot first.
-- The part that returns to a lot which expired meanwhile expires at once.
CREATE OR REPLACE FUNCTION ledger_refund(
    p_account text, p_reservation uuid, p_key text, p_hash bytea, p_amount bigint,
    p_reason text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r reservations;
    step record;
    replay jsonb;
    txn bigint;
    refundable bigint;
    amount bigint;
    expired_part bigint;
    next_expiry timestamptz;
    overflow bigint;
    overflow_total bigint := 0;
    overdraft_give bigint;
    overdraft_overflow bigint := 0;
    untraced bigint;
    back record;
    n int := 0;
    returns_expired bigint;
    returns_postings int := 0;
    fit record;
    -- What this refund put back into live lots, lot by lot (ledger_settle_claw_backs).
    returned_lots bigint[] := '{}';
    returned_micros bigint[] := '{}';
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'refund', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    SELECT * INTO r FROM reservations
     WHERE account_id = p_account AND reservation_id = p_reservation FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM ledger_fail('LE004', 'reservation not found',
            jsonb_build_object('reservation_id', p_reservation::text));
    END IF;
    IF r.status <> 'committed' THEN
        PERFORM ledger_fail('LE009', 'only committed reservations can be refunded; this one is '
            || ledger_status_words(r.status),
            jsonb_build_object('reservation_id', p_reservation::text, 'status', r.status));
    END IF;
    refundable := r.committed_micros - r.refunded_micros;
    amount := coalesce(p_amount, refundable);
    IF amount <= 0 OR amount > refundable THEN
        PERFORM ledger_fail('LE008', 'refund exceeds what is left to refund', jsonb_build_object(
            'reservation_id', p_reservation::text, 'refundable_micros', refundable,
            'requested_micros', amount));
    END IF;

    fit := ledger_refund_fit(p_account, p_reservation, amount, p_now, 0);
    expired_part := fit.expired_part;
    overdraft_give := fit.overdraft_give;
    -- The overdraft lot takes back only what its debt still is; the rest goes to the lots
    -- that repaid the debt, and what goes to an expired one expires at once too.
    IF overdraft_give > 0 THEN
        SELECT greatest(overdraft_give - (o.amount_micros - o.remaining_micros), 0)
          INTO overdraft_overflow
          FROM lots o WHERE o.account_id = p_account AND o.source = 'overdraft' FOR UPDATE;
        SELECT coalesce(sum(b.give) FILTER (WHERE b.expired), 0),
               coalesce(sum(CASE WHEN b.expired THEN 3 ELSE 1 END), 0)
          INTO returns_expired, returns_postings
          FROM ledger_overdraft_refund_returns(p_account, overdraft_overflow, p_now) b;
        expired_part := expired_part + returns_expired;
        IF returns_postings > 0 THEN
            fit := ledger_refund_fit(p_account, p_reservation, amount, p_now, returns_postings);
        END IF;
    END IF;
    IF fit.postings > ledger_last_posting_no() THEN
        PERFORM ledger_fail_too_many_lots(fit.most_lots, fit.most_micros, amount);
    END IF;

    -- The reservation's model too (its charge's, ledger_commit): listed by it as the charge.
    txn := ledger_new_transaction(p_account, 'refund', amount - expired_part, p_now, p_reservation,
                                  r.feature, coalesce(nullif(p_reason, ''), 'refund'),
                                  p_model => r.model);
    FOR step IN SELECT * FROM ledger_refund_plan(p_account, p_reservation, amount, p_now) LOOP
        -- Credits charged from the overdraft lot go back into it as far as its debt
        -- goes; a debt repaid since leaves no room, and the rest goes back to the lots
        -- that repaid it (ledger_overdraft_refund_returns).
        -- An account has one overdraft lot: its step is the overdraft_give found above.
        overflow := CASE WHEN step.source = 'overdraft' THEN overdraft_overflow ELSE 0 END;
        UPDATE lots
           SET remaining_micros = remaining_micros
                                  + CASE WHEN step.expired THEN 0 ELSE step.give - overflow END,
               expired_micros = expired_micros + CASE WHEN step.expired THEN step.give ELSE 0 END
         WHERE account_id = p_account AND lot_id = step.lot_id;
        UPDATE reservation_lots
           SET refunded_micros = refunded_micros + step.give,
               refund_expired_micros = refund_expired_micros
                                       + CASE WHEN step.expired THEN step.give ELSE 0 END
         WHERE account_id = p_account AND reservation_id = p_reservation AND lot_id = step.lot_id;
        PERFORM ledger_post(p_account, txn, n, 'account:main', step.lot_id, step.source,
                            step.give - overflow, 'refund');
        n := n + 1;
        IF NOT step.expired AND step.give > overflow THEN
            returned_lots := returned_lots || step.lot_id;
            returned_micros := returned_micros || (step.give - overflow);
        END IF;
        IF overflow > 0 THEN
            untraced := overflow;
            FOR back IN SELECT * FROM ledger_overdraft_refund_returns(p_account, overflow, p_now)
            LOOP
                UPDATE lots
                   SET remaining_micros = remaining_micros
                                          + CASE WHEN back.expired THEN 0 ELSE back.give END,
                       expired_micros = expired_micros
                                        + CASE WHEN back.expired THEN back.give ELSE 0 END
                 WHERE account_id = p_account AND lot_id = back.lot_id;
                PERFORM ledger_post(p_account, txn, n, 'account:main', back.lot_id, back.source,
                                    back.give, 'overdraft repayment refunded');
                n := n + 1;
                IF back.expired THEN
                    PERFORM ledger_post(p_account, txn, n, 'account:main', back.lot_id,
                                        back.source, -back.give,
                                        'refunded into an expired lot: expired at once');
                    PERFORM ledger_post(p_account, txn, n + 1, 'breakage', NULL, back.source,
                                        back.give,
                                        'refunded into an expired lot: expired at once');
                    n := n + 2;
                ELSE
                    next_expiry := least(next_expiry, back.expires_at);
                    returned_lots := returned_lots || back.lot_id;
                    returned_micros := returned_micros || back.give;
                END IF;
                untraced := untraced - back.give;
            END LOOP;
            -- What no recorded repayment accounts for: a refund lot, as before.
            IF untraced > 0 THEN
                PERFORM ledger_add_lot(p_account, txn, n, untraced, 'refund', 'main', NULL, NULL,
                                       step.lot_id, p_now);
                n := n + 1;
                overflow_total := overflow_total + untraced;
            END IF;
        END IF;
        IF NOT step.expired THEN
            next_expiry := least(next_expiry, step.expires_at);
        ELSE
            PERFORM ledger_post(p_account, txn, n, 'account:main', step.lot_id, step.source, -step.give,
                                'refunded into an expired lot: expired at once');
            PERFORM ledger_post(p_account, txn, n + 1, 'breakage', NULL, step.source, step.give,
                                'refunded into an expired lot: expired at once');
            n := n + 2;
        END IF;
    END LOOP;
    -- Back out of the account the charge's revenue went to (a charge of an earlier release
    -- went to 'revenue').
    PERFORM ledger_post(p_account, txn, n,
                        coalesce((SELECT p.ledger_account FROM postings p
                                   WHERE p.account_id = p_account
                                     AND p.transaction_id = r.charge_transaction_id
                                     AND p.lot_id IS NULL AND p.ledger_account LIKE 'revenue%'
                                   LIMIT 1), 'revenue'),
                        NULL, NULL, -amount, 'refund');
    UPDATE reservations SET refunded_micros = refunded_micros + amount
     WHERE account_id = p_account AND reservation_id = p_reservation;
    UPDATE accounts
       -- ledger_add_lot counted the refund lots already.
       SET balance_micros = balance_micros + amount - expired_part - overflow_total,
           next_maintenance_at = least(next_maintenance_at, next_expiry)
     WHERE account_id = p_account
    RETURNING * INTO a;
    -- Credits back in the lots of a payment refunded since go where its refund sent the
    -- rest (0004_payments.sql), before they could repay an overdraft.
    IF ledger_settle_claw_backs(p_account, returned_lots, returned_micros, p_now) > 0 THEN
        SELECT * INTO a FROM accounts WHERE account_id = p_account;
    END IF;
    IF a.overdraft_limit_micros > 0 THEN
        PERFORM ledger_settle_overdraft(p_account, p_now);
    END IF;
    RETURN ledger_idempotent_store(p_account, p_key, 'refund', p_hash, jsonb_build_object(
        'reservation', ledger_reservation_json(p_account, p_reservation),
        'transaction_id', txn::text,
        'refunded_micros', amount,
        'expired_micros', expired_part,
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

CREATE OR REPLACE FUNCTION ledger_consume(
    p_account text, p_key text, p_hash bytea, p_amount bigint, p_usage jsonb, p_feature text,
    p_comment text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    r reservations;
    replay jsonb;
    res uuid := gen_random_uuid();
    txn bigint;
    amount bigint;
    priced jsonb;
    usage jsonb;
    lots_json jsonb;
    alert bigint;
    feature text := coalesce(p_usage ->> 'feature', p_feature);
    balance_before bigint;
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'consume', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    priced := ledger_priced(p_amount, p_usage);
    amount := (priced ->> 'cost_micros')::bigint;
    usage := CASE WHEN p_usage IS NULL THEN NULL ELSE priced END;
    PERFORM ledger_require_available(a, amount);
    balance_before := a.balance_micros;
    txn := ledger_new_transaction(p_account, 'charge', -amount, p_now, res, feature, p_comment,
                                  NULL, NULL, p_usage ->> 'model', usage);
    -- A Consume is a reservation made and committed at once: Refund finds it like any other.
    INSERT INTO reservations (account_id, reservation_id, status, held_micros, committed_micros,
                              expires_at, created_at, finalized_at, feature, model, comment, usage,
                              charge_transaction_id)
    VALUES (p_account, res, 'committed', amount, amount, p_now, p_now, p_now,
            nullif(feature, ''), nullif(p_usage ->> 'model', ''), nullif(p_comment, ''), usage, txn)
    RETURNING * INTO r;
    lots_json := ledger_take_lots(p_account, res, amount, p_now, txn,
                                  ledger_revenue_account(feature));
    UPDATE accounts SET balance_micros = balance_micros - amount
     WHERE account_id = p_account
    RETURNING * INTO a;
    alert := ledger_low_balance_check(a, balance_before, txn, p_now);  -- 0006
    RETURN ledger_idempotent_store(p_account, p_key, 'consume', p_hash, jsonb_build_object(
        'reservation', ledger_reservation_row_json(r, lots_json),
        'transaction_id', txn::text,
        'low_balance_alert_id', alert,
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

CREATE OR REPLACE FUNCTION ledger_get_reservation(p_account text, p_reservation uuid, p_now timestamptz)
    RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
BEGIN
    PERFORM ledger_read_account(p_account, p_now);
    r := ledger_reservation_json(p_account, p_reservation);
    IF r IS NULL THEN
        PERFORM ledger_fail('LE004', 'reservation not found',
            jsonb_build_object('reservation_id', p_reservation::text));
    END IF;
    RETURN r;
END $$;

-- One page of an account's journal, newest first, with postings and status, after the
-- account's due maintenance (so expiries that fell due show), in one round trip. Keyset on
-- transaction_id: per account, ids grow in commit order because every write to an account
-- holds its row lock.
-- ListLots in one round trip: the account's due maintenance, then a page in consumption
-- order, keyset (priority, expiry or infinity, lot_id) after the given position.
CREATE OR REPLACE FUNCTION ledger_list_lots(
    p_account text, p_include_inactive boolean, p_after_priority smallint,
    p_after_expires bigint, p_after_lot bigint, p_limit int, p_now timestamptz)
    RETURNS TABLE (lot jsonb, priority smallint, expires_micros bigint, lot_id bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_read_existing_account(p_account, p_now);
    -- EXECUTE, as for ListTransactions: planned for this call's position, so an account
    -- with thousands of lots is walked in index order from the position. The position's
    -- expiry is rebuilt in whole seconds plus microseconds: an interval times a bigint is
    -- computed in double precision, inexact past 2^53 microseconds (the year 2255).
    RETURN QUERY EXECUTE $query$
        SELECT ledger_lot_json(l), l.priority, ledger_micros(l.expires_at), l.lot_id
          FROM lots l
         WHERE l.account_id = $1
           AND ($2 OR (l.remaining_micros > 0 AND (l.expires_at IS NULL OR l.expires_at > $7)))
           AND ($5 IS NULL
                OR (l.priority, coalesce(l.expires_at, 'infinity'::timestamptz), l.lot_id)
                   > ($3, coalesce('epoch'::timestamptz + ($4 / 1000000) * interval '1 second'
                                       + ($4 % 1000000) * interval '1 microsecond',
                                   'infinity'::timestamptz), $5))
         ORDER BY l.priority, coalesce(l.expires_at, 'infinity'::timestamptz), l.lot_id
         LIMIT $6
    $query$ USING p_account, p_include_inactive, p_after_priority, p_after_expires, p_after_lot,
                  p_limit, p_now;
END $$;

-- One account's page with no filter, newest first from the position (ledger_journal_read's
-- commonest call): a static statement, so PL/pgSQL plans it once per connection and keeps
-- the plan. Planned anew on every call, as EXECUTE does, its planning took 0.4-0.5 ms of a
-- 1.9 ms page (the bench's far page). A kept plan must be right for every account and
-- position, and only one is: the account's primary key read backwards from the position,
-- which stops once the page is full. Sorting the account's entries found by another index
-- looks as cheap to the planner when it judges by a typical account (a generic plan) or by
-- stale statistics, and it took that plan in the tests; for an account of a million
-- entries it reads and sorts them all. No sort allowed, no other plan gives the order. The
-- same columns and joins as ledger_journal_read's statement (tests/test_journal.py checks
-- that both list alike).
-- The model an entry is listed (and filtered) under: its own, or for a refund or release
-- written before they carried their reservation's model (ledger_refund, ledger_release_holds),
-- the reservation's: the same entries match a model whenever they were written. So for the
-- hold of an amount that named none, settled by a usage naming one (ledger_commit): the
-- reservation took it after the hold's entry was written.
CREATE OR REPLACE FUNCTION ledger_entry_model(p_kind text, p_model text, p_reservation_model text)
    RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(p_model, CASE WHEN p_kind IN ('refund', 'release', 'hold')
                                  THEN p_reservation_model END)
$$;

-- The feature an entry is listed (and filtered) under: its own, or for the hold of an
-- amount that named none, settled by a usage naming one (ledger_commit), the reservation's,
-- which its charge, refunds and reports carry: filtering by it lists the whole reservation.
CREATE OR REPLACE FUNCTION ledger_entry_feature(
    p_kind text, p_feature text, p_reservation_feature text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(p_feature, CASE WHEN p_kind = 'hold' THEN p_reservation_feature END)
$$;

CREATE OR REPLACE FUNCTION ledger_account_journal_page(
    p_account text, p_before bigint, p_limit int)
    RETURNS TABLE (transaction_id bigint, account_id text, kind text, amount_micros bigint,
                   reservation_id text, feature text, model text, usage jsonb, comment text,
                   actor text, external_ref text, created_micros bigint, status text,
                   posting_accounts text[], posting_lots bigint[], posting_sources text[],
                   posting_amounts bigint[], posting_memos text[])
LANGUAGE plpgsql STABLE
SET enable_sort = off
AS $$
BEGIN
    RETURN QUERY
        SELECT t.transaction_id, t.account_id, t.kind, t.amount_micros, t.reservation_id::text,
               ledger_entry_feature(t.kind, t.feature, r.feature),
               ledger_entry_model(t.kind, t.model, r.model), t.usage, t.comment,
               t.actor, t.external_ref,
               ledger_micros(t.created_at),
               ledger_transaction_status(t.kind, r.status, r.committed_micros, r.refunded_micros),
               p.accounts, p.lots, p.sources, p.amounts, p.memos
          FROM journal_transactions t
          LEFT JOIN reservations r ON r.account_id = t.account_id AND r.reservation_id = t.reservation_id
          CROSS JOIN LATERAL (
              SELECT array_agg(pp.ledger_account ORDER BY pp.posting_no) AS accounts,
                     array_agg(pp.lot_id ORDER BY pp.posting_no) AS lots,
                     array_agg(pp.source ORDER BY pp.posting_no) AS sources,
                     array_agg(pp.amount_micros ORDER BY pp.posting_no) AS amounts,
                     array_agg(pp.memo ORDER BY pp.posting_no) AS memos
                FROM postings pp
               WHERE pp.account_id = t.account_id AND pp.transaction_id = t.transaction_id) p
         WHERE t.account_id = p_account
           AND t.transaction_id < coalesce(p_before, 9223372036854775807)
         ORDER BY t.transaction_id DESC
         LIMIT p_limit;
END $$;

-- A page of the journal, newest first: one account's (p_account), or every account's (NULL:
-- the platform-wide log of ReportService.ListJournal, paged by journal_transactions_newest_first).
-- p_scan bounds how many entries (below p_before) the page reads, matching or not (NULL: no
-- bound); the filters apply to those. A page that read its stretch without filling ends
-- with a marker row, all NULL but transaction_id: the last entry read, below which the next
-- page reads on. There is none when nothing is left below, or, with p_start, nothing below
-- was made since then. One snapshot (STABLE), so the stretch and where it ended agree.
CREATE OR REPLACE FUNCTION ledger_journal_read(
    p_account text, p_before bigint, p_kinds text[], p_start timestamptz, p_end timestamptz,
    p_feature text, p_model text, p_statuses text[], p_limit int, p_scan int DEFAULT NULL)
    RETURNS TABLE (transaction_id bigint, account_id text, kind text, amount_micros bigint,
                   reservation_id text, feature text, model text, usage jsonb, comment text,
                   actor text, external_ref text, created_micros bigint, status text,
                   posting_accounts text[], posting_lots bigint[], posting_sources text[],
                   posting_amounts bigint[], posting_memos text[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    listed bigint;
    read_down_to bigint;
BEGIN
    -- One account's page with no filter (ListTransactions' usual call): a static statement,
    -- planned once per connection (ledger_account_journal_page).
    IF p_account IS NOT NULL AND p_scan IS NULL AND p_kinds IS NULL AND p_start IS NULL
       AND p_end IS NULL AND p_feature IS NULL AND p_model IS NULL AND p_statuses IS NULL THEN
        RETURN QUERY SELECT * FROM ledger_account_journal_page(p_account, p_before, p_limit);
        RETURN;
    END IF;
    -- EXECUTE: planned for the values of this call. A cached generic plan cannot know
    -- whether a page starts at the newest entry or deep in the journal; the one PostgreSQL
    -- picked read all of a 1,000,000-entry account for its first page (5 s). Planned with
    -- the values, "$1 IS NULL" folds away. Every account's page walks the journal by
    -- -transaction_id (journal_transactions_newest_first, migration 0016), one account's
    -- by its primary key.
    IF p_end IS NOT NULL AND p_before IS NULL THEN
        p_before := CASE WHEN p_account IS NULL THEN ledger_journal_walk_top(p_end)
                         ELSE ledger_account_journal_top(p_account, p_end) END;
    END IF;
    RETURN QUERY EXECUTE format($query$
        SELECT t.transaction_id, t.account_id, t.kind, t.amount_micros, t.reservation_id::text,
               ledger_entry_feature(t.kind, t.feature, r.feature),
               ledger_entry_model(t.kind, t.model, r.model), t.usage, t.comment,
               t.actor, t.external_ref,
               ledger_micros(t.created_at),
               ledger_transaction_status(t.kind, r.status, r.committed_micros, r.refunded_micros),
               p.accounts, p.lots, p.sources, p.amounts, p.memos
          FROM %3$s t
          LEFT JOIN reservations r ON r.account_id = t.account_id AND r.reservation_id = t.reservation_id
          -- Each array in posting order, so the arrays line up element by element.
          CROSS JOIN LATERAL (
              SELECT array_agg(pp.ledger_account ORDER BY pp.posting_no) AS accounts,
                     array_agg(pp.lot_id ORDER BY pp.posting_no) AS lots,
                     array_agg(pp.source ORDER BY pp.posting_no) AS sources,
                     array_agg(pp.amount_micros ORDER BY pp.posting_no) AS amounts,
                     array_agg(pp.memo ORDER BY pp.posting_no) AS memos
                FROM postings pp
               WHERE pp.account_id = t.account_id AND pp.transaction_id = t.transaction_id) p
         WHERE ($1 IS NULL OR t.account_id = $1)
           AND %1$s
           AND ($3 IS NULL OR t.kind = ANY ($3))
           AND ($4 IS NULL OR t.created_at >= $4)
           AND ($5 IS NULL OR t.created_at < $5)
           AND ($6 IS NULL OR ledger_entry_feature(t.kind, t.feature, r.feature) = $6)
           AND ($7 IS NULL OR ledger_entry_model(t.kind, t.model, r.model) = $7)
           AND ($8 IS NULL OR ledger_transaction_status(t.kind, r.status,
                    r.committed_micros, r.refunded_micros) = ANY ($8))
         ORDER BY %2$s
         LIMIT $9
    $query$,
        CASE WHEN p_scan IS NOT NULL THEN 'true'  -- the stretch below is bounded by $2
             WHEN p_account IS NULL THEN '-t.transaction_id > -coalesce($2, 9223372036854775807)'
             ELSE 't.transaction_id < coalesce($2, 9223372036854775807)' END,
        -- The stretch's own order, by its column: ordered by an expression over the
        -- subquery's output the planner sorted all of it (244 ms for a first page).
        CASE WHEN p_account IS NOT NULL THEN 't.transaction_id DESC'
             WHEN p_scan IS NOT NULL THEN 't.newest_first' ELSE '-t.transaction_id' END,
        -- A stretch of one account's entries goes down its primary key; every account's,
        -- down journal_transactions_newest_first.
        CASE WHEN p_scan IS NULL THEN 'journal_transactions'
             WHEN p_account IS NOT NULL THEN
                 '(SELECT j.* FROM journal_transactions j
                    WHERE j.account_id = $1 AND j.transaction_id < coalesce($2, 9223372036854775807)
                    ORDER BY j.transaction_id DESC LIMIT $10)'
             ELSE '(SELECT j.*, -j.transaction_id AS newest_first FROM journal_transactions j
                     WHERE -j.transaction_id > -coalesce($2, 9223372036854775807)
                     ORDER BY -j.transaction_id LIMIT $10)' END)
    USING p_account, p_before, p_kinds, p_start, p_end, p_feature, p_model, p_statuses, p_limit,
          p_scan;
    GET DIAGNOSTICS listed = ROW_COUNT;
    IF p_scan IS NULL OR listed >= p_limit THEN
        RETURN;
    END IF;
    -- Short: the stretch was read to its end. Where that was (none: it read to the oldest).
    IF p_account IS NULL THEN
        SELECT j.transaction_id INTO read_down_to FROM journal_transactions j
         WHERE -j.transaction_id > -coalesce(p_before, 9223372036854775807)
         ORDER BY -j.transaction_id OFFSET p_scan - 1 LIMIT 1;
    ELSE
        SELECT j.transaction_id INTO read_down_to FROM journal_transactions j
         WHERE j.account_id = p_account
           AND j.transaction_id < coalesce(p_before, 9223372036854775807)
         ORDER BY j.transaction_id DESC OFFSET p_scan - 1 LIMIT 1;
    END IF;
    IF read_down_to IS NULL OR (p_start IS NOT NULL AND NOT CASE
            WHEN p_account IS NULL THEN ledger_journal_reaches_back(read_down_to, p_start)
            ELSE ledger_account_journal_reaches_back(p_account, read_down_to, p_start, p_scan) END) THEN
        RETURN;
    END IF;
    transaction_id := read_down_to;
    RETURN NEXT;
END $$;

-- The form of the previous release (no marker row: its servers found where a stretch
-- ended themselves, and map every row), kept so that they keep working during a rolling
-- deploy; drop it in the release after.
CREATE OR REPLACE FUNCTION ledger_journal_page(
    p_account text, p_before bigint, p_kinds text[], p_start timestamptz, p_end timestamptz,
    p_feature text, p_model text, p_statuses text[], p_limit int, p_scan int DEFAULT NULL)
    RETURNS TABLE (transaction_id bigint, account_id text, kind text, amount_micros bigint,
                   reservation_id text, feature text, model text, usage jsonb, comment text,
                   actor text, external_ref text, created_micros bigint, status text,
                   posting_accounts text[], posting_lots bigint[], posting_sources text[],
                   posting_amounts bigint[], posting_memos text[])
LANGUAGE sql STABLE AS $$
    SELECT * FROM ledger_journal_read(p_account, p_before, p_kinds, p_start, p_end, p_feature,
                                      p_model, p_statuses, p_limit, p_scan) page
     WHERE page.kind IS NOT NULL
$$;

-- Where one account's first page up to p_end starts (NULL: at its newest entry). Reading
-- down through every entry the account made since p_end would take 741 ms for the bench's
-- account of 1,000,000 entries (a statement time-out at ten times that). Where it made
-- that many (counted up to a bound, on its own index by time), the page starts where every
-- account's walk does (ledger_journal_walk_top, 7-16 ms); most accounts are spared the
-- search.
CREATE OR REPLACE FUNCTION ledger_account_journal_top(p_account text, p_end timestamptz)
    RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF (SELECT count(*) FROM (SELECT FROM journal_transactions j
                               WHERE j.account_id = p_account AND j.created_at >= p_end
                               LIMIT 20000) since_end) = 20000 THEN
        RETURN ledger_journal_walk_top(p_end);
    END IF;
    RETURN NULL;
END $$;

-- Whether a walk of one account's log from p_start on may go on below p_below: true when
-- one of the account's entries below it was made at or after p_start, or when the first
-- p_cap of the account's entries since p_start (by time) do not tell. Read on
-- journal_transactions_account_time from p_start up, the first part stops at the first such
-- entry, which in a walk not yet at its end is among the oldest since then. Where none is,
-- it reads at most p_cap entries and then counts at most p_cap in the index alone: a page
-- past the end costs a bounded read (an account with more than p_cap entries since p_start
-- or a clock that ran far behind is walked on to its oldest entry, stretch by stretch,
-- instead of reading all of them on one page). Down the primary key instead ("+ 0" keeps
-- it off that index), none found would read all of the account's history below the page.
-- Sequential scans off: asked as a plain EXISTS, the planner reckoned a few matches among
-- many rows and that a scan finds one at once, where none matched and the scan read the
-- whole journal (104 ms on the bench's, 1.5 million entries, for an hour's start_time).
-- Ordered by time and limited, as here, it takes the index by itself; the setting keeps
-- it so.
CREATE OR REPLACE FUNCTION ledger_account_journal_reaches_back(
    p_account text, p_below bigint, p_start timestamptz, p_cap int) RETURNS boolean
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT EXISTS (SELECT 1 FROM (SELECT j.transaction_id FROM journal_transactions j
                                   WHERE j.account_id = p_account AND j.created_at >= p_start
                                   ORDER BY j.created_at LIMIT p_cap) since
                    WHERE since.transaction_id + 0 < p_below)
        OR (SELECT count(*) FROM (SELECT FROM journal_transactions j
                                   WHERE j.account_id = p_account AND j.created_at >= p_start
                                   LIMIT p_cap) since) = p_cap
$$;

-- Whether any entry below p_below was made at or after p_start: where a walk of every
-- account's log from p_start on (ListJournal) can end, however long the journal below.
-- Ids and times need not follow each other, so this asks the journal, through the BRIN
-- index over both (journal_transactions_id_created, migration 0019), which keeps only the
-- ranges where ids below and times since overlap: 0.05 ms on the bench's journal of a
-- million entries. The planner does not take it by itself: it reckons the two conditions
-- independent, so that a quarter of the journal matches and a sequential scan finds a row
-- at once, where none matches and that scan reads the whole journal (76 ms there).
-- Hence the settings: with sequential and plain index scans off, a bitmap scan is left,
-- and that index is the one that fits both conditions.
CREATE OR REPLACE FUNCTION ledger_journal_reaches_back(p_below bigint, p_start timestamptz)
    RETURNS boolean
LANGUAGE sql STABLE
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_indexonlyscan = off
AS $$
    SELECT EXISTS (SELECT 1 FROM journal_transactions
                    WHERE transaction_id < p_below AND created_at >= p_start)
$$;

-- Where a walk of every account's log up to p_end (ListJournal's end_time) starts: the
-- lowest id at and above which no entry was made before p_end (0 for none). Nothing there
-- can match, however much the platform wrote since p_end, so the first page starts below
-- it instead of reading down through all of that, stretch by stretch. When the newest
-- entry was made before p_end (a walk up to now), that is the id above it, read from
-- journal_transactions_newest_first (0016); otherwise ledger_journal_search_top looks for it.
-- The newest id is the snapshot's own, so the bound holds however ids are drawn.
CREATE OR REPLACE FUNCTION ledger_journal_walk_top(p_end timestamptz) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    newest journal_transactions;
BEGIN
    SELECT * INTO newest FROM journal_transactions ORDER BY -transaction_id LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;
    ELSIF newest.created_at < p_end THEN
        RETURN newest.transaction_id + 1;
    END IF;
    RETURN ledger_journal_search_top(p_end, newest.transaction_id);
END $$;

-- The lowest id at and above which no entry was made before p_end, given p_hi, an id at
-- and above which none was: a binary search over the ids, each step one probe of the
-- BRIN index over ids and times (migration 0019) under ledger_journal_reaches_back's
-- settings, 7-16 ms for the whole search on the bench's journal of a million entries. Ids
-- and times need not follow each other; the search assumes nothing of it, since "some
-- entry at or above this id was made before p_end" only turns false as the id grows.
CREATE OR REPLACE FUNCTION ledger_journal_search_top(p_end timestamptz, p_hi bigint)
    RETURNS bigint
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_indexonlyscan = off
AS $$
DECLARE
    -- The answer lies in [lo, hi]: no entry at or above hi was made before p_end, and
    -- one at lo - 1 or above was (or lo = 0).
    lo bigint := 0;
    hi bigint := p_hi;
    mid bigint;
BEGIN
    WHILE lo < hi LOOP
        mid := lo + (hi - lo) / 2;
        IF EXISTS (SELECT 1 FROM journal_transactions
                    WHERE transaction_id >= mid AND transaction_id < hi AND created_at < p_end) THEN
            lo := mid + 1;
        ELSE
            hi := mid;
        END IF;
    END LOOP;
    RETURN hi;
END $$;

-- The first (lowest) id of the entries made at or after p_start, NULL for none: where the
-- summary of every account starts reading the postings (reports.sql). min() over the
-- entries since p_start reads all of them, a pass over the whole journal for a period that
-- starts before most of it (107 ms on the bench's million entries); this is a binary search
-- over the ids below the snapshot's newest, each step a probe of the BRIN index over ids
-- and times (migration 0019) under ledger_journal_reaches_back's settings: 14-37 ms
-- there, and the summary 5-10% faster. PARALLEL RESTRICTED, as it is: the summary's plan
-- may use parallel workers elsewhere (left at the default, unsafe, it would not, and ran
-- 10-15% slower than with min()).
CREATE OR REPLACE FUNCTION ledger_journal_first_since(p_start timestamptz) RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED AS $$
DECLARE
    newest bigint;
BEGIN
    SELECT transaction_id INTO newest FROM journal_transactions ORDER BY -transaction_id LIMIT 1;
    IF newest IS NULL OR NOT ledger_journal_reaches_back(newest + 1, p_start) THEN
        RETURN NULL;
    END IF;
    RETURN ledger_journal_search_first(p_start, newest + 1);
END $$;

-- The lowest id made at or after p_start, given p_hi, above one that was.
CREATE OR REPLACE FUNCTION ledger_journal_search_first(p_start timestamptz, p_hi bigint)
    RETURNS bigint
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_indexonlyscan = off
AS $$
DECLARE
    -- No entry below lo was made since p_start; one below hi was. Where hi = lo + 1, that
    -- one is lo.
    lo bigint := 0;
    hi bigint := p_hi;
    mid bigint;
BEGIN
    WHILE hi - lo > 1 LOOP
        mid := lo + (hi - lo) / 2;
        IF EXISTS (SELECT 1 FROM journal_transactions
                    WHERE transaction_id >= lo AND transaction_id < mid
                      AND created_at >= p_start) THEN
            hi := mid;
        ELSE
            lo := mid;
        END IF;
    END LOOP;
    RETURN lo;
END $$;

CREATE OR REPLACE FUNCTION ledger_list_transactions(
    p_account text, p_before bigint, p_kinds text[], p_start timestamptz, p_end timestamptz,
    p_feature text, p_model text, p_statuses text[], p_limit int, p_scan int, p_now timestamptz)
    -- Columns, and the postings as parallel arrays, rather than one jsonb per entry: building
    -- and parsing that jsonb cost more than the rest of a page (bench: 3.2 -> 1.4 ms in the
    -- database for 100 entries, and no JSON for the server to parse).
    RETURNS TABLE (transaction_id bigint, account_id text, kind text, amount_micros bigint,
                   reservation_id text, feature text, model text, usage jsonb, comment text,
                   actor text, external_ref text, created_micros bigint, status text,
                   posting_accounts text[], posting_lots bigint[], posting_sources text[],
                   posting_amounts bigint[], posting_memos text[])
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ledger_read_existing_account(p_account, p_now);
    RETURN QUERY SELECT * FROM ledger_journal_read(p_account, p_before, p_kinds, p_start, p_end,
                                                   p_feature, p_model, p_statuses, p_limit, p_scan);
END $$;

-- The form of the previous release (no p_scan: pages read until they fill, no marker row),
-- kept so that its servers keep working during a rolling deploy; drop it in the release after.
CREATE OR REPLACE FUNCTION ledger_list_transactions(
    p_account text, p_before bigint, p_kinds text[], p_start timestamptz, p_end timestamptz,
    p_feature text, p_model text, p_statuses text[], p_limit int, p_now timestamptz)
    RETURNS TABLE (transaction_id bigint, account_id text, kind text, amount_micros bigint,
                   reservation_id text, feature text, model text, usage jsonb, comment text,
                   actor text, external_ref text, created_micros bigint, status text,
                   posting_accounts text[], posting_lots bigint[], posting_sources text[],
                   posting_amounts bigint[], posting_memos text[])
LANGUAGE sql AS $$
    SELECT * FROM ledger_list_transactions(p_account, p_before, p_kinds, p_start, p_end,
                                           p_feature, p_model, p_statuses, p_limit, NULL, p_now)
$$;
