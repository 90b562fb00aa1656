-- Which payment paid which invoice (invoice_payment.paid). Since API version 2025-03-31 a
-- charge no longer names its invoice, so a refund of a subscription payment names only the
-- payment intent, while the period's purchase is recorded under the invoice: this table
-- joins the two. Like payment_events it belongs to no account (a provider's fact).
CREATE TABLE invoice_payments (
    payment_ref text        NOT NULL,
    invoice_ref text        NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (payment_ref, invoice_ref)
);
