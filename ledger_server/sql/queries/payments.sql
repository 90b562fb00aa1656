-- Named queries of payments (issue 5): BillingService.CreateCheckoutSession and
-- ListPaymentEvents, the webhook receiver and the payment jobs (workers/payments.py).
-- Credits move only through ledger functions (sources.sql, claw_back_purchase).

-- name: checkout_prepare
SELECT ledger_checkout_prepare(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                               %(kind)s::text, %(pack_id)s::text, %(amount_minor)s::bigint,
                               %(currency)s::text, %(plan_id)s::text, %(now)s::timestamptz)

-- name: record_checkout_session
SELECT ledger_record_checkout_session(%(session_id)s::text, %(account_id)s::text, %(key)s::text,
                                      %(hash)s::bytea, %(kind)s::text, %(pack_id)s::text,
                                      %(plan_id)s::text, %(amount_minor)s::bigint,
                                      %(currency)s::text, %(credits_micros)s::bigint,
                                      %(bonus_micros)s::bigint, %(url)s::text,
                                      %(now)s::timestamptz)

-- name: fulfil_checkout
SELECT ledger_fulfil_checkout(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                              %(session_id)s::text, %(external_ref)s::text, %(now)s::timestamptz)

-- name: claw_back_purchase
SELECT ledger_claw_back_purchase(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                                 %(external_refs)s::text[], %(refunded_minor)s::bigint,
                                 %(paid_minor)s::bigint, %(comment)s::text, %(now)s::timestamptz)

-- name: insert_payment_event
-- The webhook receiver: a new event is stored once; a duplicate delivery returns no row.
INSERT INTO payment_events (event_id, type, account_id, payload, received_at)
VALUES (%(event_id)s, %(type)s, nullif(%(account_id)s, ''), %(payload)s, %(now)s)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id

-- name: start_payment_event
-- A job run begins: counts the attempt and shows it in the payment log. Waits for a
-- run holding the row (its transaction) to finish; then finds it processed: no row.
UPDATE payment_events
   SET status = 'processing', attempts = attempts + 1, last_attempt_at = now()
 WHERE event_id = %(event_id)s AND status IN ('received', 'processing', 'failed')
RETURNING attempts

-- name: lock_payment_event
-- Inside the job's transaction, before any account lock (nothing locks an event after
-- an account, so this order cannot deadlock).
SELECT type, payload, status, account_id FROM payment_events
 WHERE event_id = %(event_id)s
   FOR UPDATE

-- name: finish_payment_event
UPDATE payment_events
   SET status = %(status)s, account_id = coalesce(nullif(%(account_id)s, ''), account_id),
       credits_micros = %(credits_micros)s, idempotency_key = %(idempotency_key)s,
       last_error = %(note)s, processed_at = %(now)s
 WHERE event_id = %(event_id)s

-- name: processed_payment_response
-- What the ledger answered a processed event (stored under the event's idempotency key):
-- the credits it granted, for the metrics, whichever run of the job applied it.
SELECT k.operation, k.response
  FROM payment_events e
  JOIN idempotency_keys k ON k.account_id = e.account_id AND k.idempotency_key = e.idempotency_key
 WHERE e.event_id = %(event_id)s AND e.status = 'processed'

-- name: fail_payment_event
UPDATE payment_events
   SET status = 'failed', last_error = %(error)s
 WHERE event_id = %(event_id)s AND status NOT IN ('processed', 'ignored')

-- name: stalled_payment_events
-- The sweeper: unfinished events older than the threshold, skipping those a job is
-- processing right now (its transaction holds the row). An event tried before (failed, or
-- left processing by a job that died) while its attempts are below the limit, and past
-- it once its last attempt is older than parked_before: retried slowly, never given up,
-- and one that kills its worker each time runs hourly, not every sweep. Events not yet
-- failed come first.
SELECT event_id, status, attempts FROM payment_events
 WHERE status IN ('received', 'processing', 'failed')
   AND received_at < %(before)s
   AND (status = 'received' OR attempts < %(max_attempts)s
        OR coalesce(last_attempt_at, received_at) < %(parked_before)s)
 ORDER BY status = 'failed', received_at
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED

-- name: payment_event_status
SELECT status, attempts, credits_micros, coalesce(last_error, '') FROM payment_events
 WHERE event_id = %(event_id)s

-- name: subscription_plan_of_prices
-- The plan of a subscription's prices (an invoice's line, or its items), one lookup for
-- invoice.paid and customer.subscription.updated so the two agree (helper-99: invoice.paid
-- took the first plan by id, updated the highest ranked). A price is one plan's: one active
-- plan has it (migration 0030), but an inactive plan may share it, and a database from
-- before 0030 may have several active ones; of those, the subscription's own plan (its
-- renewal stays on its plan, active or not), else the plan its checkout session was
-- prepared for (its first invoice), else the active one (helper-102: a new subscriber
-- whose invoice came before its checkout's event got a retired plan of higher rank), else
-- the highest ranked. Of the items' plans, the one
-- of the highest rank (two plan items are an upgrade or downgrade made in two steps, the
-- new item added before the old one is removed: the higher is the plan the customer pays
-- for either way, and the later event, with one plan item left, decides a downgrade).
WITH chosen AS (
    SELECT (SELECT s.plan_id FROM subscriptions s
             WHERE s.account_id = %(account_id)s AND s.external_ref = %(subscription_ref)s)
               AS subscribed,
           (SELECT c.plan_id FROM checkout_sessions c
             WHERE c.subscription_ref = %(subscription_ref)s AND c.plan_id IS NOT NULL
             ORDER BY c.created_at DESC
             LIMIT 1) AS checked_out
)
SELECT plan_id
  FROM (SELECT DISTINCT ON (p.provider_price_id) p.plan_id, p.rank, p.active
          FROM subscription_plans p CROSS JOIN chosen
         WHERE p.provider_price_id = ANY(%(price_ids)s::text[])
         ORDER BY p.provider_price_id, p.plan_id = chosen.subscribed DESC NULLS LAST,
                  p.plan_id = chosen.checked_out DESC NULLS LAST, p.active DESC, p.rank DESC,
                  p.plan_id) plan_of_price
 ORDER BY rank DESC, active DESC, plan_id
 LIMIT 1

-- name: current_subscription_plan
SELECT plan_id, current_period_start FROM subscriptions WHERE account_id = %(account_id)s

-- name: record_subscription_plan
SELECT ledger_record_subscription_plan(%(account_id)s::text, %(plan_id)s::text,
                                       %(period_start)s::timestamptz, %(now)s::timestamptz)

-- name: end_subscription
SELECT ledger_end_subscription(%(account_id)s::text, %(subscription_ref)s::text,
                               %(ended_at)s::timestamptz, %(now)s::timestamptz)

-- name: subscription_end
-- The stored customer.subscription.deleted event of the subscription, applied or not yet
-- (payment_events_subscription_ends): its subscription object and when it was created.
SELECT payload #> '{data,object}', (payload ->> 'created')::bigint
  FROM payment_events
 WHERE type = 'customer.subscription.deleted'
   AND payload #>> '{data,object,id}' = %(subscription_ref)s
 ORDER BY (payload ->> 'created')::bigint
 LIMIT 1

-- name: subscription_account
-- The account the subscription belongs to (migration 0036), if linked yet; else the one
-- its latest checkout session was for (as migration 0036 links them): a previous release's
-- worker, still running during a rolling deploy, records the session but no link.
SELECT account_id FROM (
    SELECT account_id, 0 AS choice FROM subscription_accounts
     WHERE subscription_ref = %(subscription_ref)s
    UNION ALL
    (SELECT account_id, 1 FROM checkout_sessions
      WHERE subscription_ref = %(subscription_ref)s
      ORDER BY created_at DESC
      LIMIT 1)
) known
 ORDER BY choice
 LIMIT 1

-- name: link_subscription_account
-- The first link of a subscription stands: a second account is not linked (the caller
-- reads the link back and refuses the event). One waiting on another job's uncommitted
-- link of the subscription reads that job's account once it commits. Taken before any
-- account lock (lock order: event rows, then the account).
INSERT INTO subscription_accounts (subscription_ref, account_id, linked_at)
VALUES (%(subscription_ref)s, %(account_id)s, %(now)s)
    ON CONFLICT ON CONSTRAINT subscription_accounts_one_per_subscription DO NOTHING

-- name: unfinished_event_paid_by
-- Another stored event not yet applied whose object is paid by one of these references (a
-- checkout by its payment intent, an invoice by its id, an invoice payment by its payment
-- intent), or a customer.subscription.updated of the subscription and period of a plan
-- change these references reach (its purchase is recorded under
-- '<subscription>:<plan>:<period start>', which an upgrade's proration invoice pays): a
-- refund of it waits for it (helper-96: handled first, it found no purchase and was ignored).
-- Only unfinished rows are read (payment_events_sweep).
SELECT event_id FROM payment_events
 WHERE status IN ('received', 'processing', 'failed') AND event_id <> %(event_id)s
   -- Payments only: two refunds of one payment must not wait for each other.
   AND ((type IN ('checkout.session.completed', 'checkout.session.async_payment_succeeded',
                  'invoice.paid', 'invoice_payment.paid')
         AND (payload #>> '{data,object,payment_intent}' = ANY (%(external_refs)s::text[])
              OR payload #>> '{data,object,id}' = ANY (%(external_refs)s::text[])
              OR payload #>> '{data,object,payment,payment_intent}'
                 = ANY (%(external_refs)s::text[])))
        OR (type = 'customer.subscription.updated'
            AND EXISTS (
                SELECT 1 FROM unnest(%(external_refs)s::text[]) AS r(ref)
                 WHERE starts_with(r.ref, (payload #>> '{data,object,id}') || ':')
                   AND right(r.ref, length(coalesce(
                           payload #>> '{data,object,current_period_start}',
                           payload #>> '{data,object,items,data,0,current_period_start}')) + 1)
                       = ':' || coalesce(
                           payload #>> '{data,object,current_period_start}',
                           payload #>> '{data,object,items,data,0,current_period_start}'))))
 LIMIT 1

-- name: newer_subscription_update
-- A customer.subscription.updated event of the same subscription and period created after
-- this one (payment_events_subscription_updates); the period start is on the subscription
-- before API version 2025-03-31, on its first item since.
SELECT event_id FROM payment_events
 WHERE type = 'customer.subscription.updated'
   AND payload #>> '{data,object,id}' = %(subscription_ref)s
   AND (payload ->> 'created')::bigint > %(created)s
   AND coalesce(payload #>> '{data,object,current_period_start}',
                payload #>> '{data,object,items,data,0,current_period_start}')::bigint
       IS NOT DISTINCT FROM %(period_start)s::bigint
 LIMIT 1

-- name: wake_subscription_updates
-- A subscription's period was paid: its customer.subscription.updated events that failed
-- waiting for it (EventNotReady) go back to 'received', so the sweeper re-queues them even
-- if their retries are spent (payment_events_subscription_updates).
UPDATE payment_events SET status = 'received'
 WHERE type = 'customer.subscription.updated' AND status = 'failed'
   AND payload #>> '{data,object,id}' = %(subscription_ref)s

-- name: wake_claw_backs
-- A purchase, or the link of an invoice to the payment that paid it, was recorded: the
-- refunds and lost chargebacks of those payments that were handled before it, and found
-- nothing to take back, run again (the sweeper re-queues them). Those being run too: one
-- may have passed its check for the payment's unfinished events before this one was stored
-- and be waiting for the account, where it will find no purchase. Its run holds its row
-- (lock_payment_event), so this waits for the run to end and reads its status then: woken
-- if it ended ignored. (Lock order: event rows, then the account; neither run waits on an
-- event row while holding an account.)
-- payment_events_by_payment (migration 0023): its expression word for word.
UPDATE payment_events SET status = 'received', processed_at = NULL
 WHERE type IN ('charge.refunded', 'charge.dispute.closed')
   AND status IN ('ignored', 'processing')
   AND ARRAY[payload #>> '{data,object,payment_intent}', payload #>> '{data,object,invoice}',
             payload #>> '{data,object,charge}', payload #>> '{data,object,id}',
             payload #>> '{data,object,payment,payment_intent}']
       && %(external_refs)s::text[]

-- name: charge_returns
-- What the charge's applied refunds and lost disputes return, this event's included: the
-- cumulative amount refunded of its latest charge.refunded (by when Stripe made the event;
-- of two made at once, the larger), less the refunds that failed or were canceled after
-- that event though made before it (it counted them; Stripe leaves a failed refund out of
-- the charge's amount refunded from then on, so a later event does not), each refund once;
-- the lost disputes' amounts, added up; and the charge's amount as its refunds give it.
-- A failed refund counts once stored, applied or not: whichever of it and the refund's
-- charge.refunded comes last settles the share. Run under the account's lock: two
-- claw-backs of one account see each other's outcome.
-- payment_events_by_payment (migration 0023) and payment_events_refund_updates_by_payment
-- (0033): their expression word for word.
WITH returns AS (
    SELECT type, payload FROM payment_events
     WHERE type IN ('charge.refunded', 'charge.dispute.closed')
       AND (status = 'processed' OR event_id = %(event_id)s)
       AND upper(payload #>> '{data,object,currency}') = %(currency)s
       AND ARRAY[payload #>> '{data,object,payment_intent}', payload #>> '{data,object,invoice}',
                 payload #>> '{data,object,charge}', payload #>> '{data,object,id}',
                 payload #>> '{data,object,payment,payment_intent}']
           && %(external_refs)s::text[]
), latest AS (
    SELECT (payload ->> 'created')::bigint AS created,
           (payload #>> '{data,object,amount_refunded}')::bigint AS refunded
      FROM returns
     WHERE type = 'charge.refunded'
     ORDER BY 1 DESC NULLS LAST, 2 DESC
     LIMIT 1
), failed AS (
    SELECT DISTINCT ON (payload #>> '{data,object,id}')
           (payload #>> '{data,object,amount}')::bigint AS amount,
           coalesce((payload #>> '{data,object,created}')::bigint, 0) AS refund_created,
           (payload ->> 'created')::bigint AS failed_at
      FROM payment_events
     WHERE type IN ('charge.refund.updated', 'refund.updated', 'refund.failed')
       AND payload #>> '{data,object,status}' IN ('failed', 'canceled')
       AND upper(payload #>> '{data,object,currency}') = %(currency)s
       AND ARRAY[payload #>> '{data,object,payment_intent}', payload #>> '{data,object,invoice}',
                 payload #>> '{data,object,charge}', payload #>> '{data,object,id}',
                 payload #>> '{data,object,payment,payment_intent}']
           && %(external_refs)s::text[]
     ORDER BY payload #>> '{data,object,id}', (payload ->> 'created')::bigint
)
SELECT greatest((SELECT refunded FROM latest)
                - (SELECT coalesce(sum(f.amount), 0) FROM failed f, latest l
                    WHERE f.refund_created <= l.created AND f.failed_at > l.created), 0),
       coalesce(sum((payload #>> '{data,object,amount}')::bigint)
           FILTER (WHERE type = 'charge.dispute.closed'), 0)::bigint,
       max((payload #>> '{data,object,amount}')::bigint) FILTER (WHERE type = 'charge.refunded')
  FROM returns

-- name: refund_failure_applied
-- Another applied event saying this refund failed (Stripe sends charge.refund.updated, and
-- refund.failed to endpoints of API version 2024-10-28 and later, for one failure).
SELECT event_id FROM payment_events
 WHERE type IN ('charge.refund.updated', 'refund.updated', 'refund.failed')
   AND status = 'processed' AND event_id <> %(event_id)s
   AND payload #>> '{data,object,id}' = %(refund_id)s
   AND ARRAY[payload #>> '{data,object,payment_intent}', payload #>> '{data,object,invoice}',
             payload #>> '{data,object,charge}', payload #>> '{data,object,id}',
             payload #>> '{data,object,payment,payment_intent}']
       && ARRAY[%(refund_id)s::text]
 LIMIT 1

-- name: restore_claw_back
SELECT ledger_restore_claw_back(%(account_id)s::text, %(key)s::text, %(hash)s::bytea,
                                %(external_refs)s::text[], %(refunded_minor)s::bigint,
                                %(paid_minor)s::bigint, %(comment)s::text, %(now)s::timestamptz)

-- name: amount_paid
-- What the applied event of the payment says was paid (a checkout's amount_total, an
-- invoice's or an invoice payment's amount_paid), in the currency asked; none when unknown.
-- payment_events_by_payment (migration 0023): its expression word for word.
SELECT coalesce(payload #>> '{data,object,amount_total}',
                payload #>> '{data,object,amount_paid}')::bigint
  FROM payment_events
 WHERE type IN ('checkout.session.completed', 'checkout.session.async_payment_succeeded',
                'invoice.paid', 'invoice_payment.paid')
   AND status = 'processed'
   AND coalesce(upper(payload #>> '{data,object,currency}'), %(currency)s) = %(currency)s
   AND coalesce(payload #>> '{data,object,amount_total}',
                payload #>> '{data,object,amount_paid}') IS NOT NULL
   AND ARRAY[payload #>> '{data,object,payment_intent}', payload #>> '{data,object,invoice}',
             payload #>> '{data,object,charge}', payload #>> '{data,object,id}',
             payload #>> '{data,object,payment,payment_intent}']
       && %(external_refs)s::text[]
 ORDER BY received_at
 LIMIT 1

-- name: lock_claw_back_account
-- Claw-backs of one account one at a time from their reading of the charge's other
-- refunds and disputes (charge_returns) to their commit. The account row, as every
-- ledger call of the account takes it first.
SELECT 1 FROM accounts WHERE account_id = %(account_id)s FOR UPDATE

-- name: plan_change_period
-- The account's subscription period (its end: the period's, or when it ended early).
SELECT current_period_start, current_period_end, external_ref FROM subscriptions
 WHERE account_id = %(account_id)s

-- name: record_invoice_payment
INSERT INTO invoice_payments (payment_ref, invoice_ref, created_at)
VALUES (%(payment_ref)s, %(invoice_ref)s, %(now)s)
ON CONFLICT DO NOTHING

-- name: invoices_paid_by
-- What these payments paid: invoices, and what an invoice paid in turn (an upgrade's
-- proration invoice pays the plan change, recorded under a reference of its own).
WITH RECURSIVE paid (ref, depth, created_at) AS (
    SELECT invoice_ref, 1, created_at FROM invoice_payments
     WHERE payment_ref = ANY (%(external_refs)s::text[])
    UNION
    SELECT i.invoice_ref, p.depth + 1, i.created_at
      FROM paid p JOIN invoice_payments i ON i.payment_ref = p.ref
     WHERE p.depth < 3
)
SELECT ref FROM paid GROUP BY ref ORDER BY min(depth), min(created_at), ref

-- name: payments_reaching
-- The payments that paid these references, and what paid those in turn (invoices_paid_by
-- the other way round): the payment intents of an invoice, and of a plan change the
-- proration invoice that paid it and its payment intents.
WITH RECURSIVE paying (ref, depth) AS (
    SELECT payment_ref, 1 FROM invoice_payments WHERE invoice_ref = ANY (%(refs)s::text[])
    UNION
    SELECT i.payment_ref, p.depth + 1
      FROM paying p JOIN invoice_payments i ON i.invoice_ref = p.ref
     WHERE p.depth < 3
)
SELECT DISTINCT ref FROM paying

-- name: account_for_payment
SELECT account_id FROM purchases
 WHERE external_ref = ANY (%(external_refs)s::text[])
 ORDER BY created_at
 LIMIT 1

-- name: checkout_session_account
SELECT account_id FROM checkout_sessions WHERE session_id = %(session_id)s

-- name: lock_payment_ref
-- One checkout event of a payment at a time decides whether another account has it (the
-- job's transaction holds it; taken before any account lock).
SELECT pg_advisory_xact_lock(hashtextextended('payment:' || %(external_ref)s::text, 0))

-- name: complete_checkout_session
UPDATE checkout_sessions
   SET completed_at = coalesce(completed_at, %(now)s),
       subscription_ref = coalesce(nullif(%(subscription_ref)s, ''), subscription_ref)
 WHERE session_id = %(session_id)s

-- name: list_payment_events
-- Newest first; keyset on (received_at, event_id). %(account_id)s / %(status)s NULL: all.
SELECT event_id, type, status, attempts, coalesce(last_error, ''), credits_micros,
       coalesce(account_id, ''), ledger_micros(received_at), ledger_micros(processed_at)
  FROM payment_events
 WHERE (%(account_id)s::text IS NULL OR account_id = %(account_id)s::text)
   AND (%(status)s::text IS NULL OR status = %(status)s::text)
   AND (%(before_time)s::bigint IS NULL
        OR (received_at, event_id) < (timestamptz 'epoch' + %(before_time)s::bigint * interval '1 microsecond',
                                      %(before_id)s::text))
 ORDER BY received_at DESC, event_id DESC
 LIMIT %(limit)s

-- name: checkout_stripe_attempt
-- The Stripe key a checkout asks under next (server/stripe_checkout.py).
SELECT attempt FROM checkout_stripe_attempts
 WHERE account_id = %(account_id)s::text AND idempotency_key = %(key)s::text

-- name: checkout_stripe_answered
-- Stripe answered an attempt of the checkout with an error: the next asks under a
-- fresh key. Two failures of one attempt racing move it on once.
INSERT INTO checkout_stripe_attempts (account_id, idempotency_key, attempt, answered_at)
VALUES (%(account_id)s::text, %(key)s::text, %(attempt)s::integer + 1, %(now)s::timestamptz)
ON CONFLICT ON CONSTRAINT checkout_stripe_attempts_pkey DO UPDATE
   SET attempt = greatest(checkout_stripe_attempts.attempt, EXCLUDED.attempt),
       answered_at = EXCLUDED.answered_at
RETURNING attempt

-- name: prune_checkout_stripe_attempts
-- At most `limit` attempt rows no checkout needs any more (migration 0038): settled ones
-- whose last answer is older than settled_before, and the others older than
-- unsettled_before. Rows a checkout is writing are passed over.
WITH old AS (
    SELECT a.account_id, a.idempotency_key
      FROM checkout_stripe_attempts a
     WHERE a.answered_at < %(settled_before)s::timestamptz
       AND (a.answered_at < %(unsettled_before)s::timestamptz
            OR EXISTS (SELECT 1 FROM idempotency_keys k
                        WHERE k.account_id = a.account_id
                          AND k.idempotency_key = a.idempotency_key))
     ORDER BY a.answered_at
     LIMIT %(limit)s::int
       FOR UPDATE SKIP LOCKED
)
DELETE FROM checkout_stripe_attempts a
 USING old
 WHERE a.account_id = old.account_id AND a.idempotency_key = old.idempotency_key
