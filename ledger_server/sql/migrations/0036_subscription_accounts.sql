-- The account each Stripe subscription belongs to, once known: the account whose checkout
-- session created it, else the one its first applied paid invoice named. The payment jobs
-- took the account from the metadata of each event (the invoice's, the subscription's)
-- before what the ledger had linked, and that metadata is the merchant's to write (and a
-- customer may be shared by several accounts): an invoice naming another account credited
-- it with the subscription's period and made the subscription its own. Every subscription
-- event is now for this account; a paid invoice or plan change naming another fails
-- (workers/payments.py).
-- One account per subscription: two first invoices naming two accounts at once cannot
-- both be linked.
CREATE TABLE subscription_accounts (
    subscription_ref text        NOT NULL,
    account_id       text        COLLATE "C" NOT NULL,
    linked_at        timestamptz NOT NULL,
    CONSTRAINT subscription_accounts_one_per_subscription PRIMARY KEY (subscription_ref)
);

-- What the previous release read as the link (account_for_subscription: the latest checkout
-- session of the subscription); then the account of its earliest applied paid invoice (the
-- one its metadata named first: a later one naming another account, the defect, does not
-- count); then the account whose subscription it is. One pass over the applied invoice
-- events, once.
INSERT INTO subscription_accounts (subscription_ref, account_id, linked_at)
SELECT DISTINCT ON (subscription_ref) subscription_ref, account_id, created_at
  FROM checkout_sessions
 WHERE subscription_ref IS NOT NULL
 ORDER BY subscription_ref, created_at DESC;

-- The subscription of an invoice: `subscription` (an id or the expanded object) before API
-- version 2025-03-31, `parent.subscription_details.subscription` since
-- (workers/payments.py, _invoice_subscription).
INSERT INTO subscription_accounts (subscription_ref, account_id, linked_at)
SELECT DISTINCT ON (subscription_ref) subscription_ref, account_id, received_at
  FROM (SELECT CASE jsonb_typeof(sub) WHEN 'string' THEN sub #>> '{}'
                                      WHEN 'object' THEN sub ->> 'id' END AS subscription_ref,
               account_id, received_at
          FROM (SELECT coalesce(nullif(payload #> '{data,object,subscription}', 'null'),
                                payload #> '{data,object,parent,subscription_details,subscription}',
                                payload #> '{data,object,subscription_details,subscription}') AS sub,
                       account_id, received_at
                  FROM payment_events
                 WHERE type = 'invoice.paid' AND status = 'processed' AND account_id IS NOT NULL)
               invoices) paid
 WHERE subscription_ref <> ''
 ORDER BY subscription_ref, received_at
    ON CONFLICT ON CONSTRAINT subscription_accounts_one_per_subscription DO NOTHING;

INSERT INTO subscription_accounts (subscription_ref, account_id, linked_at)
SELECT DISTINCT ON (external_ref) external_ref, account_id, updated_at
  FROM subscriptions
 WHERE external_ref IS NOT NULL
 ORDER BY external_ref, updated_at, account_id
    ON CONFLICT ON CONSTRAINT subscription_accounts_one_per_subscription DO NOTHING;
