-- Refunds and lost chargebacks by the payments they name (workers/payments.py): a purchase
-- recorded after its refund was handled (Stripe delivers events in any order) wakes that
-- refund, which found nothing to take back; a lost dispute reads what the charge's refunds
-- took before it. The names: the payment intent, the invoice (charges before API version
-- 2025-03-31), the charge (of a dispute) and the object's own id (a refunded charge).
CREATE INDEX payment_events_claw_backs ON payment_events USING gin (
    (ARRAY[payload #>> '{data,object,payment_intent}', payload #>> '{data,object,invoice}',
           payload #>> '{data,object,charge}', payload #>> '{data,object,id}']))
    WHERE type IN ('charge.refunded', 'charge.dispute.closed');
