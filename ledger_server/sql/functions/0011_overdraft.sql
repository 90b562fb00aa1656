-- Overdraft limits (DESIGN section 3; the model is in migration 0011_overdraft.sql).

-- Replaced by ledger_settle_overdraft (0001_ledger.sql) before it was released.
DROP FUNCTION IF EXISTS ledger_repay_overdraft(lots, timestamptz);
-- Its first form, before it took an idempotency key.
DROP FUNCTION IF EXISTS ledger_set_overdraft_limit(text, bigint, text, text, timestamptz);

-- Sets an account's overdraft limit. Raising it grows the overdraft lot (made on first
-- use) by the difference; lowering it shrinks the lot by its unused credits only, so a
-- limit never goes below the debt and the holds on the overdraft (LE043 otherwise). One
-- OVERDRAFT transaction records the change: the account's side on the overdraft lot, the
-- other side on the 'overdraft' system account. The balance shown (the lots' sum less the
-- limit) does not move; the available credits move by the change itself. Setting the limit
-- it has changes nothing and answers with no transaction. The limit is absolute, but a
-- retry must still answer the first response: replayed, a late retry would undo a change
-- made after it.
CREATE OR REPLACE FUNCTION ledger_set_overdraft_limit(
    p_account text, p_key text, p_hash bytea, p_limit bigint, p_reason text, p_actor text,
    p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    o lots;
    change bigint;
    txn bigint;
    replay jsonb;
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'set_overdraft_limit', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    change := p_limit - a.overdraft_limit_micros;
    IF change = 0 THEN
        RETURN ledger_idempotent_store(p_account, p_key, 'set_overdraft_limit', p_hash,
            jsonb_build_object('transaction_id', '', 'balance', ledger_balance_json(a, p_now)),
            p_now);
    END IF;
    SELECT * INTO o FROM lots WHERE account_id = p_account AND source = 'overdraft' FOR UPDATE;
    IF change < 0 AND o.remaining_micros - o.held_micros < -change THEN
        PERFORM ledger_fail('LE043', 'the overdraft limit cannot go below what is in use',
            jsonb_build_object(
                'field', 'overdraft_limit_micros',
                'overdraft_limit_micros', a.overdraft_limit_micros,
                'in_use_micros', o.amount_micros - o.remaining_micros + o.held_micros,
                'requested_micros', p_limit));
    END IF;
    txn := ledger_new_transaction(p_account, 'overdraft', change, p_now, NULL, NULL, p_reason,
                                  p_actor);
    IF o.lot_id IS NULL THEN
        PERFORM ledger_add_lot(p_account, txn, 0, change, 'overdraft', 'main', NULL, NULL, NULL,
                               p_now);
    ELSE
        UPDATE lots
           SET amount_micros = amount_micros + change, remaining_micros = remaining_micros + change
         WHERE account_id = p_account AND lot_id = o.lot_id;
        PERFORM ledger_post(p_account, txn, 0, 'account:main', o.lot_id, 'overdraft', change);
        UPDATE accounts SET balance_micros = balance_micros + change WHERE account_id = p_account;
    END IF;
    PERFORM ledger_post(p_account, txn, 1, 'overdraft', NULL, 'overdraft', -change);
    UPDATE accounts SET overdraft_limit_micros = p_limit WHERE account_id = p_account
    RETURNING * INTO a;
    RETURN ledger_idempotent_store(p_account, p_key, 'set_overdraft_limit', p_hash,
        jsonb_build_object('transaction_id', txn::text, 'balance', ledger_balance_json(a, p_now)),
        p_now);
END $$;
