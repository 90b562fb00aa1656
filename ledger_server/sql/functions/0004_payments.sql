-- Payments (issue 5): Checkout Session rules and records, and the claw-back of a
-- refunded purchase. Same conventions as 0001_ledger.sql; further SQLSTATEs:
--   LE040 purchase not found (a refund of a payment this ledger never fulfilled)
--   LE041 the pack or plan has no payment provider price id
--   LE042 subscription plan inactive
--   LE045 plan in use (its provider price cannot change)

CREATE OR REPLACE FUNCTION ledger_checkout_session_json(c checkout_sessions) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'session_id', c.session_id,
        'account_id', c.account_id,
        'kind', c.kind,
        'pack_id', coalesce(c.pack_id, ''),
        'plan_id', coalesce(c.plan_id, ''),
        'amount_minor', c.amount_minor,
        'currency', c.currency,
        'url', c.url,
        'create_time', ledger_micros(c.created_at))
$$;

-- Before a Checkout Session is created at the provider: a retry under the same key
-- gets the stored session ({"replay": session}); else the same rules as the grant
-- the payment will lead to (pack on sale, free users allowed, recharge minimum and
-- currency, plan on sale) are checked now, so nobody pays for what the ledger would
-- refuse. Returns what the provider needs: price id or amount, currency. Reads only.
CREATE OR REPLACE FUNCTION ledger_checkout_prepare(
    p_account text, p_key text, p_hash bytea, p_kind text, p_pack text, p_amount_minor bigint,
    p_currency text, p_plan text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    existing checkout_sessions;
    used_by text;
    p credit_packs;
    plan subscription_plans;
    current_plan text;
    quote jsonb;
BEGIN
    SELECT * INTO existing FROM checkout_sessions
     WHERE account_id = p_account AND idempotency_key = p_key;
    IF FOUND THEN
        IF existing.request_hash <> p_hash THEN
            PERFORM ledger_fail('LE002', 'idempotency key was used for a different request',
                jsonb_build_object('idempotency_key', p_key,
                                   'original_operation', 'create_checkout_session'));
        END IF;
        RETURN jsonb_build_object('replay', ledger_checkout_session_json(existing));
    END IF;
    -- One key namespace per account: a key a ledger operation took is not a checkout's.
    SELECT k.operation INTO used_by FROM idempotency_keys k
     WHERE k.account_id = p_account AND k.idempotency_key = p_key;
    IF FOUND THEN
        PERFORM ledger_fail('LE002', 'idempotency key was used for a different request',
            jsonb_build_object('idempotency_key', p_key, 'original_operation', used_by));
    END IF;
    IF p_kind = 'pack' THEN
        SELECT * INTO p FROM credit_packs WHERE pack_id = p_pack;
        IF NOT FOUND THEN
            PERFORM ledger_fail('LE021', 'no such credit pack', jsonb_build_object('pack_id', p_pack));
        END IF;
        IF NOT p.active THEN
            PERFORM ledger_fail('LE022', 'the credit pack is not on sale',
                jsonb_build_object('pack_id', p_pack));
        END IF;
        IF NOT (ledger_setting('purchase.allow_free_users'))::boolean
           AND NOT EXISTS (SELECT 1 FROM subscriptions s
                            WHERE s.account_id = p_account AND ledger_subscribed(s, p_now)) THEN
            PERFORM ledger_fail('LE023', 'only subscribers may buy credit packs',
                jsonb_build_object('setting', 'purchase.allow_free_users'));
        END IF;
        IF coalesce(p.provider_price_id, '') = '' THEN
            PERFORM ledger_fail('LE041', 'the credit pack has no payment provider price',
                jsonb_build_object('pack_id', p_pack));
        END IF;
        RETURN jsonb_build_object('kind', 'pack', 'pack_id', p.pack_id, 'price_id', p.provider_price_id,
                                  'amount_minor', p.price_minor, 'currency', p.currency,
                                  'credits_micros', p.credits_micros);
    ELSIF p_kind = 'recharge' THEN
        quote := ledger_recharge_quote(p_amount_minor, p_currency, 'recharge.');  -- minimum, currency
        RETURN jsonb_build_object('kind', 'recharge', 'amount_minor', p_amount_minor,
                                  'currency', upper(p_currency),
                                  'credits_micros', (quote ->> 'credits_micros')::bigint,
                                  'bonus_micros', (quote ->> 'bonus_micros')::bigint);
    ELSIF p_kind = 'subscription' THEN
        -- The plan first, as the pack above: an unknown plan is PLAN_NOT_FOUND for every
        -- account, not ALREADY_SUBSCRIBED for a subscriber (helper-153's review).
        plan := ledger_find_plan(p_plan);
        -- One subscription an account (the subscriptions row follows one): a second would be
        -- charged beside the first, and its upgrade carry-over never made.
        SELECT s.plan_id INTO current_plan FROM subscriptions s
         WHERE s.account_id = p_account AND ledger_subscribed(s, p_now);
        IF FOUND THEN
            PERFORM ledger_fail('LE044',
                'the account has a subscription already: change its plan with the payment provider',
                jsonb_build_object('plan_id', current_plan));
        END IF;
        IF NOT plan.active THEN
            PERFORM ledger_fail('LE042', 'the subscription plan is not on sale',
                jsonb_build_object('plan_id', p_plan));
        END IF;
        IF coalesce(plan.provider_price_id, '') = '' THEN
            PERFORM ledger_fail('LE041', 'the subscription plan has no payment provider price',
                jsonb_build_object('plan_id', p_plan));
        END IF;
        RETURN jsonb_build_object('kind', 'subscription', 'plan_id', plan.plan_id,
                                  'price_id', plan.provider_price_id,
                                  'amount_minor', plan.price_minor, 'currency', plan.currency,
                                  'credits_micros', plan.credits_micros);
    END IF;
    PERFORM ledger_fail('LE010', 'unknown checkout kind',
        jsonb_build_object('field', 'purchase', 'violation', 'pack_id, recharge or plan_id is required'));
    RETURN NULL;
END $$;

-- Its first form, before it recorded what a one-time checkout sold.
DROP FUNCTION IF EXISTS ledger_record_checkout_session(
    text, text, text, bytea, text, text, text, bigint, text, text, timestamptz);

-- Stores the session the provider created, with what a one-time checkout sold (credits and
-- bonus as prepared; NULL for a subscription). Two racing requests under one key (or a
-- retry after the provider answered but before this insert) store one row; both get it.
CREATE OR REPLACE FUNCTION ledger_record_checkout_session(
    p_session text, p_account text, p_key text, p_hash bytea, p_kind text, p_pack text,
    p_plan text, p_amount_minor bigint, p_currency text, p_credits bigint, p_bonus bigint,
    p_url text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    c checkout_sessions;
    used_by text;
BEGIN
    INSERT INTO checkout_sessions (session_id, account_id, idempotency_key, request_hash, kind,
                                   pack_id, plan_id, amount_minor, currency, credits_micros,
                                   bonus_micros, url, created_at)
    VALUES (p_session, p_account, p_key, p_hash, p_kind, nullif(p_pack, ''), nullif(p_plan, ''),
            p_amount_minor, upper(p_currency), p_credits, p_bonus, p_url, p_now)
    ON CONFLICT DO NOTHING;
    SELECT * INTO c FROM checkout_sessions WHERE account_id = p_account AND idempotency_key = p_key;
    IF NOT FOUND THEN
        -- The provider returned a session stored under another key: its idempotency key
        -- is derived from (account, key), so this is a bug, not a race.
        RAISE EXCEPTION 'checkout session % is stored under another idempotency key', p_session;
    END IF;
    IF c.request_hash <> p_hash THEN  -- two checkouts of one key, prepared at once
        PERFORM ledger_fail('LE002', 'idempotency key was used for a different request',
            jsonb_build_object('idempotency_key', p_key,
                               'original_operation', 'create_checkout_session'));
    END IF;
    -- The key joins the account's ledger keys, so a Consume, Grant, ... sent with it later
    -- is refused as a different request (their lookup compares the operation); the row
    -- names the session, and a checkout's retry reads checkout_sessions. A ledger
    -- operation that took the key since ledger_checkout_prepare wins: this session is not
    -- recorded, and Stripe lets the unrecorded one expire unpaid.
    INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash, response,
                                  created_at)
    VALUES (p_account, p_key, 'create_checkout_session', p_hash,
            jsonb_build_object('session_id', c.session_id), p_now)
    ON CONFLICT ON CONSTRAINT idempotency_keys_one_per_account DO NOTHING;
    SELECT k.operation INTO used_by FROM idempotency_keys k
     WHERE k.account_id = p_account AND k.idempotency_key = p_key;
    IF used_by <> 'create_checkout_session' THEN
        PERFORM ledger_fail('LE002', 'idempotency key was used for a different request',
            jsonb_build_object('idempotency_key', p_key, 'original_operation', used_by));
    END IF;
    RETURN ledger_checkout_session_json(c);
END $$;

-- The lots' side of a claw-back (ledger_claw_back_purchase, ledger_settle_claw_backs), in
-- its ADJUSTMENT p_txn: the purchase's lot, its bonus lot and the carry-over lots (p_carry:
-- [{lot_id, micros}]) each lose what is taken, posted against the source's issuance account
-- (the audit counts the carry-over ones under the purchase by their memo). Returns what the
-- main balance lost.
CREATE OR REPLACE FUNCTION ledger_post_claw_back(
    p_account text, p_txn bigint, l lots, p_take bigint, bl lots, p_take_bonus bigint,
    p_carry jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    step record;
    n int := 4;
    main_taken bigint := 0;
BEGIN
    IF p_take > 0 THEN
        UPDATE lots SET remaining_micros = remaining_micros - p_take
         WHERE account_id = p_account AND lot_id = l.lot_id;
        PERFORM ledger_post(p_account, p_txn, 0, 'account:' || l.balance_kind, l.lot_id,
                            l.source, -p_take, 'refund: unspent credits clawed back');
        PERFORM ledger_post(p_account, p_txn, 1, 'issuance:' || l.source, NULL, l.source, p_take);
        main_taken := main_taken + CASE WHEN l.balance_kind = 'main' THEN p_take ELSE 0 END;
    END IF;
    IF p_take_bonus > 0 THEN
        UPDATE lots SET remaining_micros = remaining_micros - p_take_bonus
         WHERE account_id = p_account AND lot_id = bl.lot_id;
        PERFORM ledger_post(p_account, p_txn, 2, 'account:' || bl.balance_kind, bl.lot_id,
                            bl.source, -p_take_bonus, 'refund: bonus share clawed back');
        PERFORM ledger_post(p_account, p_txn, 3, 'issuance:' || bl.source, NULL, bl.source,
                            p_take_bonus);
        main_taken := main_taken + CASE WHEN bl.balance_kind = 'main' THEN p_take_bonus ELSE 0 END;
    END IF;
    FOR step IN SELECT (e ->> 'lot_id')::bigint AS lot_id, (e ->> 'micros')::bigint AS micros
                  FROM jsonb_array_elements(p_carry) e LOOP
        UPDATE lots SET remaining_micros = remaining_micros - step.micros
         WHERE account_id = p_account AND lot_id = step.lot_id;
        PERFORM ledger_post(p_account, p_txn, n, 'account:main', step.lot_id,
                            'subscription_carry_over', -step.micros,
                            'refund: carried-over credits clawed back');
        PERFORM ledger_post(p_account, p_txn, n + 1, 'issuance:subscription', NULL,
                            'subscription_carry_over', step.micros);
        n := n + 2;
        main_taken := main_taken + step.micros;  -- carry-over lots are main credits
    END LOOP;
    RETURN main_taken;
END $$;

-- A subscription period's credits that an upgrade carried over (0002
-- ledger_change_subscription_plan, its postings' memo 'carried over to the new period')
-- live on in the carry-over lots that upgrade made, and in those a later upgrade made from
-- them: the lots a claw-back of the purchase may take them from.
CREATE OR REPLACE FUNCTION ledger_carry_over_lots(p_account text, p_lot bigint)
    RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE chain (lot_id) AS (
        SELECT p_lot
        UNION
        SELECT carry.lot_id
          FROM chain c
          JOIN postings p ON p.account_id = p_account AND p.lot_id = c.lot_id
                         AND p.memo = 'carried over to the new period'
          JOIN lots carry ON carry.account_id = p_account
                         AND carry.grant_transaction_id = p.transaction_id
                         AND carry.source = 'subscription_carry_over')
    SELECT lot_id FROM chain WHERE lot_id <> p_lot
$$;

-- How much of a purchase's credits its carry-over lots may still give back: what its lot
-- carried out, less what claw-backs of the purchase took from them (net of what a failed
-- refund gave back there, ledger_restore_claw_back).
CREATE OR REPLACE FUNCTION ledger_carry_over_room(p_account text, pu purchases) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (SELECT coalesce(-sum(p.amount_micros), 0)
              FROM postings p
             WHERE p.account_id = p_account AND p.lot_id = pu.lot_id
               AND p.memo = 'carried over to the new period')
         - (SELECT coalesce(-sum(p.amount_micros), 0)
              FROM postings p
              JOIN journal_transactions t ON t.account_id = p.account_id
                                         AND t.transaction_id = p.transaction_id
             WHERE p.account_id = p_account AND t.kind = 'adjustment'
               AND t.external_ref = pu.external_ref
               AND p.memo IN ('refund: carried-over credits clawed back',
                              'refund failed: carried-over credits given back'))
$$;

-- The purchase the first of p_external_refs that one of the account's purchases has paid,
-- locked, and the share of its credits and of its bonus that p_refunded_minor of
-- p_paid_minor returns: what a claw-back takes (ledger_claw_back_purchase) and what the
-- restore of a failed refund gives back down to (ledger_restore_claw_back). Call with the
-- account row locked.
CREATE OR REPLACE FUNCTION ledger_purchase_share(
    p_account text, p_external_refs text[], p_refunded_minor bigint, p_paid_minor bigint,
    OUT pu purchases, OUT share_credits bigint, OUT share_bonus bigint)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT * INTO pu FROM purchases
     WHERE account_id = p_account AND external_ref = ANY (p_external_refs)
     ORDER BY array_position(p_external_refs, external_ref)
     LIMIT 1
       FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM ledger_fail('LE040', 'no purchase of the account was paid by this payment',
            jsonb_build_object('account_id', p_account,
                               'external_ref', array_to_string(p_external_refs, ',')));
    END IF;
    IF p_paid_minor <= 0 OR p_refunded_minor < 0 THEN
        PERFORM ledger_fail('LE010', 'refund amounts out of range', jsonb_build_object(
            'field', 'amount_refunded', 'violation', 'must be between 0 and the amount paid'));
    END IF;
    -- Shares in numeric: credits (up to 2^63) times an amount would overflow bigint.
    share_credits := floor(pu.credits_micros::numeric * least(p_refunded_minor, p_paid_minor)
                           / p_paid_minor)::bigint;
    share_bonus := floor(pu.bonus_micros::numeric * least(p_refunded_minor, p_paid_minor)
                         / p_paid_minor)::bigint;
END $$;

-- A refunded payment (charge.refunded) takes back the refunded share of what it
-- bought, limited to what is still there: the purchase lot's unspent, unheld credits
-- and the same share of its bonus lot's. amount_refunded is cumulative, so the share
-- is computed over the whole purchase and what earlier refunds took is subtracted;
-- the balance never goes below zero and never below what is held. One ADJUSTMENT
-- transaction: each lot -x, its source's issuance account +x. Idempotent by key.
CREATE OR REPLACE FUNCTION ledger_claw_back_purchase(
    p_account text, p_key text, p_hash bytea, p_external_refs text[], p_refunded_minor bigint,
    p_paid_minor bigint, p_comment text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    share record;
    pu purchases;
    l lots;
    bl lots;
    share_credits bigint;
    share_bonus bigint;
    take bigint := 0;
    take_bonus bigint := 0;
    carry_wanted bigint := 0;
    carry_take bigint := 0;
    carry_takes jsonb := '[]';
    cl lots;
    txn bigint;
    main_taken bigint;
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'claw_back_purchase', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    share := ledger_purchase_share(p_account, p_external_refs, p_refunded_minor, p_paid_minor);
    pu := share.pu;
    share_credits := share.share_credits;
    share_bonus := share.share_bonus;
    SELECT * INTO l FROM lots WHERE account_id = p_account AND lot_id = pu.lot_id FOR UPDATE;
    take := greatest(least(share_credits - pu.clawed_back_micros, l.remaining_micros - l.held_micros), 0);
    IF pu.bonus_lot_id IS NOT NULL THEN
        SELECT * INTO bl FROM lots WHERE account_id = p_account AND lot_id = pu.bonus_lot_id FOR UPDATE;
        take_bonus := greatest(least(share_bonus - pu.bonus_clawed_back_micros,
                                     bl.remaining_micros - bl.held_micros), 0);
    END IF;
    -- What the share still asks for beyond the purchase's lot is taken from its carry-over
    -- lots only, up to what its lot gave them less what its earlier refunds took there.
    IF pu.kind = 'subscription' AND share_credits - pu.clawed_back_micros - take > 0 THEN
        carry_wanted := least(share_credits - pu.clawed_back_micros - take,
                              ledger_carry_over_room(p_account, pu));
    END IF;
    IF carry_wanted > 0 THEN
        FOR cl IN
            SELECT l2.* FROM lots l2
             WHERE l2.account_id = p_account
               AND l2.lot_id IN (SELECT ledger_carry_over_lots(p_account, pu.lot_id))
               AND l2.remaining_micros > l2.held_micros
               AND (l2.expires_at IS NULL OR l2.expires_at > p_now)
             ORDER BY l2.lot_id DESC
               FOR UPDATE
        LOOP
            EXIT WHEN carry_take >= carry_wanted;
            carry_takes := carry_takes || jsonb_build_object(
                'lot_id', cl.lot_id,
                'micros', least(carry_wanted - carry_take, cl.remaining_micros - cl.held_micros));
            carry_take := carry_take + least(carry_wanted - carry_take,
                                             cl.remaining_micros - cl.held_micros);
        END LOOP;
    END IF;
    IF take + take_bonus + carry_take > 0 THEN
        txn := ledger_new_transaction(p_account, 'adjustment', -(take + take_bonus + carry_take),
                                      p_now, p_comment => p_comment,
                                      p_external_ref => pu.external_ref);
        main_taken := ledger_post_claw_back(p_account, txn, l, take, bl, take_bonus, carry_takes);
        UPDATE accounts SET balance_micros = balance_micros - main_taken
         WHERE account_id = p_account;
        UPDATE purchases
           SET clawed_back_micros = clawed_back_micros + take + carry_take,
               bonus_clawed_back_micros = bonus_clawed_back_micros + take_bonus
         WHERE account_id = p_account AND purchase_id = pu.purchase_id;
    END IF;
    -- What the share asks beyond what was unspent stays owed (ledger_settle_claw_backs).
    UPDATE purchases
       SET claw_back_owed_micros = greatest(share_credits - clawed_back_micros, 0),
           bonus_claw_back_owed_micros = greatest(share_bonus - bonus_clawed_back_micros, 0)
     WHERE account_id = p_account AND purchase_id = pu.purchase_id;
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    IF take + take_bonus + carry_take > 0 THEN
        -- A claw-back lowers the balance like a charge: a crossing is alerted (0006).
        PERFORM ledger_low_balance_check(a, a.balance_micros + take + take_bonus + carry_take,
                                         txn, p_now);
    END IF;
    RETURN ledger_idempotent_store(p_account, p_key, 'claw_back_purchase', p_hash, jsonb_build_object(
        'purchase_id', pu.purchase_id::text,
        'external_ref', pu.external_ref,
        'clawed_back_micros', take + carry_take,
        'bonus_clawed_back_micros', take_bonus,
        'refunded_share_micros', share_credits + share_bonus,
        'transaction_id', coalesce(txn::text, ''),
        'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

-- A refund that failed or was canceled (charge.refund.updated, refund.failed) after
-- charge.refunded took its share: the share is now that of what the charge's refunds and
-- lost disputes still return (p_refunded_minor of p_paid_minor), and what the purchase's
-- claw-backs took beyond it goes back to the lots it was taken from (the purchase's lot,
-- its bonus lot, a subscription period's carry-over lots), in place: each keeps its kind
-- and expiry, so a pack's credits come back for good and a period's only until its end,
-- and a later refund of the payment finds them where a claw-back takes from. A lot that
-- has expired since gets nothing (its credits would have expired with it), and that part
-- stays taken. What is owed shrinks to the new share. One ADJUSTMENT under the purchase's
-- external_ref (the audit nets it with its claw-backs); none when nothing is given back.
-- Idempotent by key.
CREATE OR REPLACE FUNCTION ledger_restore_claw_back(
    p_account text, p_key text, p_hash bytea, p_external_refs text[], p_refunded_minor bigint,
    p_paid_minor bigint, p_comment text, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    replay jsonb;
    share record;
    pu purchases;
    share_credits bigint;
    share_bonus bigint;
    wanted bigint;
    bonus_wanted bigint;
    step record;
    part bigint;
    given bigint := 0;
    bonus_given bigint := 0;
    plan jsonb := '[]';
    txn bigint;
    n int := 0;
BEGIN
    a := ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, 'restore_claw_back', p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    share := ledger_purchase_share(p_account, p_external_refs, p_refunded_minor, p_paid_minor);
    pu := share.pu;
    share_credits := share.share_credits;
    share_bonus := share.share_bonus;
    wanted := greatest(pu.clawed_back_micros - share_credits, 0);
    bonus_wanted := greatest(pu.bonus_clawed_back_micros - share_bonus, 0);
    -- What the claw-backs took from each lot, net of what was given back before; the
    -- longest-lived lots first (a carry-over lot outlives the period's own).
    FOR step IN
        SELECT l.lot_id, l.source, l.balance_kind, -sum(p.amount_micros) AS taken
          FROM journal_transactions t
          JOIN postings p ON p.account_id = t.account_id AND p.transaction_id = t.transaction_id
          JOIN lots l ON l.account_id = p.account_id AND l.lot_id = p.lot_id
         WHERE t.account_id = p_account AND t.kind = 'adjustment'
           AND t.external_ref = pu.external_ref
           AND (l.expires_at IS NULL OR l.expires_at > p_now)
         GROUP BY l.lot_id, l.source, l.balance_kind, l.expires_at
        HAVING sum(p.amount_micros) < 0
         ORDER BY l.expires_at DESC NULLS FIRST, l.lot_id DESC
    LOOP
        EXIT WHEN given >= wanted AND bonus_given >= bonus_wanted;
        IF step.lot_id = pu.bonus_lot_id THEN
            part := least(step.taken, bonus_wanted - bonus_given);
            bonus_given := bonus_given + greatest(part, 0);
        ELSE
            part := least(step.taken, wanted - given);
            given := given + greatest(part, 0);
        END IF;
        CONTINUE WHEN part <= 0;
        plan := plan || jsonb_build_object('lot_id', step.lot_id, 'source', step.source,
                                           'kind', step.balance_kind, 'micros', part);
    END LOOP;
    IF given + bonus_given > 0 THEN
        txn := ledger_new_transaction(p_account, 'adjustment', given + bonus_given, p_now,
                                      p_comment => p_comment, p_external_ref => pu.external_ref);
        FOR step IN SELECT (e ->> 'lot_id')::bigint AS lot_id, e ->> 'source' AS source,
                           e ->> 'kind' AS balance_kind, (e ->> 'micros')::bigint AS micros
                      FROM jsonb_array_elements(plan) e LOOP
            UPDATE lots SET remaining_micros = remaining_micros + step.micros
             WHERE account_id = p_account AND lot_id = step.lot_id;
            PERFORM ledger_post(p_account, txn, n, 'account:' || step.balance_kind, step.lot_id,
                                step.source, step.micros,
                                CASE step.source WHEN 'subscription_carry_over'
                                    THEN 'refund failed: carried-over credits given back'
                                    ELSE 'refund failed: credits given back' END);
            -- The issuance account the claw-back credited (ledger_post_claw_back).
            PERFORM ledger_post(p_account, txn, n + 1,
                                CASE step.source WHEN 'subscription_carry_over'
                                    THEN 'issuance:subscription'
                                    ELSE 'issuance:' || step.source END,
                                NULL, step.source, -step.micros);
            n := n + 2;
            UPDATE accounts
               SET balance_micros = balance_micros
                                    + CASE WHEN step.balance_kind = 'main' THEN step.micros ELSE 0 END,
                   reward_balance_micros = reward_balance_micros
                                    + CASE WHEN step.balance_kind = 'reward' THEN step.micros ELSE 0 END,
                   next_maintenance_at = least(next_maintenance_at,
                       (SELECT l.expires_at FROM lots l
                         WHERE l.account_id = p_account AND l.lot_id = step.lot_id))
             WHERE account_id = p_account;
        END LOOP;
    END IF;
    UPDATE purchases
       SET clawed_back_micros = clawed_back_micros - given,
           bonus_clawed_back_micros = bonus_clawed_back_micros - bonus_given,
           claw_back_owed_micros = greatest(share_credits - (clawed_back_micros - given), 0),
           bonus_claw_back_owed_micros = greatest(share_bonus - (bonus_clawed_back_micros
                                                                 - bonus_given), 0)
     WHERE account_id = p_account AND purchase_id = pu.purchase_id;
    SELECT * INTO a FROM accounts WHERE account_id = p_account;
    IF given + bonus_given > 0 AND a.overdraft_limit_micros > 0 THEN
        -- Credits spendable again repay a debt first, as a grant's would (ledger_add_lot).
        PERFORM ledger_settle_overdraft(p_account, p_now);
        SELECT * INTO a FROM accounts WHERE account_id = p_account;
    END IF;
    RETURN ledger_idempotent_store(p_account, p_key, 'restore_claw_back', p_hash,
        jsonb_build_object(
            'purchase_id', pu.purchase_id::text,
            'external_ref', pu.external_ref,
            'restored_micros', given,
            'bonus_restored_micros', bonus_given,
            'refunded_share_micros', share_credits + share_bonus,
            'transaction_id', coalesce(txn::text, ''),
            'balance', ledger_balance_json(a, p_now)), p_now);
END $$;

-- Takes what refunded payments still owe (purchases.claw_back_owed_micros: their share
-- beyond what was unspent when the refund came) out of what a Refund just returned to
-- their lots (p_lots, p_micros: live lots and the credits each got back): an ADJUSTMENT per
-- purchase, as the claw-back itself. A subscription period's credits an upgrade carried
-- over are its too (ledger_claw_back_purchase follows them into the carry-over chain): what
-- a Refund returns to a carry-over lot of that chain is taken as well, up to what the
-- period's lot gave the chain less what its claw-backs took from it, as the claw-back caps
-- it (helper-96: only the purchase's own lots were settled, and a subscriber kept credits
-- a refunded payment had carried over). Only what came back by a Refund: the credits a
-- payment's refund found held stay the customer's when released, as README says. Call with
-- the account row locked.
DROP FUNCTION IF EXISTS ledger_settle_claw_backs(text, timestamptz);  -- never released
CREATE OR REPLACE FUNCTION ledger_settle_claw_backs(
    p_account text, p_lots bigint[], p_micros bigint[], p_now timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    pu purchases;
    l lots;
    bl lots;
    cl lots;
    take bigint;
    take_bonus bigint;
    carry_wanted bigint;
    carry_take bigint;
    part bigint;
    carry_takes jsonb;
    -- What the Refund returned to each lot that no purchase has taken yet: one carry-over
    -- lot may hold the carried credits of several purchases (a second upgrade carries the
    -- first's carry-over lot and the first upgrade's own credits into one).
    left_micros bigint[] := p_micros;
    used bigint;
    txn bigint;
    main_taken bigint;
    taken bigint := 0;
BEGIN
    IF cardinality(p_lots) = 0 THEN
        RETURN 0;
    END IF;
    FOR pu IN
        SELECT * FROM purchases
         WHERE account_id = p_account
           AND (claw_back_owed_micros > 0 OR bonus_claw_back_owed_micros > 0)
           AND (lot_id = ANY (p_lots) OR bonus_lot_id = ANY (p_lots) OR kind = 'subscription')
         ORDER BY purchase_id
           FOR UPDATE
    LOOP
        SELECT * INTO l FROM lots WHERE account_id = p_account AND lot_id = pu.lot_id FOR UPDATE;
        take := greatest(least(
            pu.claw_back_owed_micros,
            (SELECT coalesce(sum(r.micros), 0) FROM unnest(p_lots, p_micros) AS r(lot_id, micros)
              WHERE r.lot_id = pu.lot_id),
            l.remaining_micros - l.held_micros), 0);
        take_bonus := 0;
        IF pu.bonus_lot_id IS NOT NULL THEN
            SELECT * INTO bl FROM lots
             WHERE account_id = p_account AND lot_id = pu.bonus_lot_id FOR UPDATE;
            take_bonus := greatest(least(
                pu.bonus_claw_back_owed_micros,
                (SELECT coalesce(sum(r.micros), 0)
                   FROM unnest(p_lots, p_micros) AS r(lot_id, micros)
                  WHERE r.lot_id = pu.bonus_lot_id),
                bl.remaining_micros - bl.held_micros), 0);
        END IF;
        carry_take := 0;
        carry_takes := '[]';
        IF pu.kind = 'subscription' AND pu.claw_back_owed_micros - take > 0 THEN
            -- As ledger_claw_back_purchase takes them.
            carry_wanted := least(pu.claw_back_owed_micros - take,
                                  ledger_carry_over_room(p_account, pu));
            IF carry_wanted > 0 THEN
                FOR cl IN
                    SELECT l2.* FROM lots l2
                     WHERE l2.account_id = p_account
                       AND l2.lot_id IN (SELECT ledger_carry_over_lots(p_account, pu.lot_id))
                       AND l2.lot_id = ANY (p_lots)
                       AND l2.remaining_micros > l2.held_micros
                       AND (l2.expires_at IS NULL OR l2.expires_at > p_now)
                     ORDER BY l2.lot_id DESC
                       FOR UPDATE
                LOOP
                    EXIT WHEN carry_take >= carry_wanted;
                    part := least(carry_wanted - carry_take, cl.remaining_micros - cl.held_micros,
                                  (SELECT coalesce(sum(r.micros), 0)
                                     FROM unnest(p_lots, left_micros) AS r(lot_id, micros)
                                    WHERE r.lot_id = cl.lot_id));
                    CONTINUE WHEN part <= 0;
                    carry_takes := carry_takes || jsonb_build_object('lot_id', cl.lot_id,
                                                                     'micros', part);
                    carry_take := carry_take + part;
                    -- Used up: what another purchase carried into this lot finds the rest.
                    FOR i IN 1 .. cardinality(p_lots) LOOP
                        EXIT WHEN part = 0;
                        CONTINUE WHEN p_lots[i] <> cl.lot_id;
                        used := least(part, left_micros[i]);
                        left_micros[i] := left_micros[i] - used;
                        part := part - used;
                    END LOOP;
                END LOOP;
            END IF;
        END IF;
        CONTINUE WHEN take + take_bonus + carry_take = 0;
        txn := ledger_new_transaction(p_account, 'adjustment', -(take + take_bonus + carry_take),
                                      p_now,
                                      p_comment => 'refunded payment: credits clawed back as they came back',
                                      p_external_ref => pu.external_ref);
        main_taken := ledger_post_claw_back(p_account, txn, l, take, bl, take_bonus, carry_takes);
        UPDATE accounts SET balance_micros = balance_micros - main_taken
         WHERE account_id = p_account;
        UPDATE purchases
           SET clawed_back_micros = clawed_back_micros + take + carry_take,
               bonus_clawed_back_micros = bonus_clawed_back_micros + take_bonus,
               claw_back_owed_micros = claw_back_owed_micros - take - carry_take,
               bonus_claw_back_owed_micros = bonus_claw_back_owed_micros - take_bonus
         WHERE account_id = p_account AND purchase_id = pu.purchase_id;
        taken := taken + take + take_bonus + carry_take;
    END LOOP;
    RETURN taken;
END $$;

-- The payment of a one-time checkout this ledger prepared (checkout.session.completed):
-- grants what the session sold, as PurchasePack or Recharge would have answered, under the
-- event's key. The sale rules are not asked again: they held when the session was made,
-- and the customer has paid since. NULL when the session is not one of those (made
-- elsewhere, for a subscription, or stored before what it sold was): the caller falls back
-- to the checkout's metadata.
CREATE OR REPLACE FUNCTION ledger_fulfil_checkout(
    p_account text, p_key text, p_hash bytea, p_session text, p_external_ref text,
    p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    c checkout_sessions;
    replay jsonb;
    operation text;
BEGIN
    SELECT * INTO c FROM checkout_sessions
     WHERE session_id = p_session AND account_id = p_account AND credits_micros IS NOT NULL;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    operation := CASE c.kind WHEN 'pack' THEN 'purchase_pack' ELSE 'recharge' END;
    PERFORM ledger_open_account(p_account, '', p_now);
    PERFORM ledger_lock_account(p_account, p_now);
    replay := ledger_idempotent_replay(p_account, p_key, operation, p_hash);
    IF replay IS NOT NULL THEN
        RETURN replay;
    END IF;
    RETURN ledger_idempotent_store(p_account, p_key, operation, p_hash,
        CASE c.kind
            WHEN 'pack' THEN ledger_sell_pack(p_account, c.pack_id, c.credits_micros,
                                              c.amount_minor, c.currency, p_external_ref, p_now)
            ELSE ledger_sell_recharge(p_account, c.amount_minor, c.currency, c.credits_micros,
                                      c.bonus_micros, p_external_ref, p_now)
        END, p_now);
END $$;

-- Before UpdateSubscriptionPlan: a plan's provider price does not change while anyone may
-- still pay the old one (helper-99). A running subscription's renewals (ledger_subscribed:
-- its renewal grace included) and a checkout session's first invoice name the old price,
-- which then no plan has: invoice.paid failed and was retried for ever, the credits paid for
-- withheld. A checkout session counts for 24 hours, the longest a Stripe Checkout Session
-- stays open. The admin creates a plan for the new price instead. Locks the plan row, so
-- two updates of one plan take turns; other fields change freely.
CREATE OR REPLACE FUNCTION ledger_require_plan_price_change_allowed(
    p_plan text, p_price text, p_now timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    old_price text;
BEGIN
    SELECT coalesce(provider_price_id, '') INTO old_price FROM subscription_plans
     WHERE plan_id = p_plan FOR UPDATE;
    IF NOT FOUND OR old_price = '' OR old_price = coalesce(p_price, '') THEN
        RETURN;  -- no such plan (PLAN_NOT_FOUND follows), no price yet, or the same one
    END IF;
    IF EXISTS (SELECT FROM subscriptions s
                WHERE s.plan_id = p_plan AND ledger_subscribed(s, p_now))
       OR EXISTS (SELECT FROM checkout_sessions c
                   WHERE c.plan_id = p_plan AND c.created_at > p_now - interval '24 hours') THEN
        PERFORM ledger_fail('LE045',
            'the plan has subscribers or open checkouts paying its provider price: '
            'create a plan for the new price instead',
            jsonb_build_object('plan_id', p_plan));
    END IF;
END $$;
