-- Payments and their refunds and lost chargebacks by the payments they name
-- (workers/payments.py): a purchase recorded after its refund was handled (Stripe delivers
-- events in any order) wakes that refund, which found nothing to take back; a refund or a
-- dispute reads what the charge's other refunds and disputes returned, and what was paid.
-- The names: the payment intent (an invoice payment's under payment), the invoice (charges
-- and invoices before API version 2025-03-31), the charge (of a dispute) and the object's
-- own id (a refunded charge, an invoice).
CREATE INDEX payment_events_by_payment ON payment_events USING gin (
    (ARRAY[payload #>> '{data,object,payment_intent}', payload #>> '{data,object,invoice}',
           payload #>> '{data,object,charge}', payload #>> '{data,object,id}',
           payload #>> '{data,object,payment,payment_intent}']))
    WHERE type IN ('charge.refunded', 'charge.dispute.closed', 'checkout.session.completed',
                   'checkout.session.async_payment_succeeded', 'invoice.paid',
                   'invoice_payment.paid');
