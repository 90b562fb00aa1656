-- The refunds that failed or were canceled (charge.refund.updated, refund.updated,
-- refund.failed: a Refund object) by the payment they name, as payment_events_by_payment
-- (migration 0023) finds a charge's refunds and disputes: a claw-back subtracts the ones
-- that failed after the charge's latest refund event, and a failed refund finds the
-- other events of its refund (workers/payments.py). The same expression, word for word.
CREATE INDEX payment_events_refund_updates_by_payment ON payment_events USING gin (
    (ARRAY[payload #>> '{data,object,payment_intent}', payload #>> '{data,object,invoice}',
           payload #>> '{data,object,charge}', payload #>> '{data,object,id}',
           payload #>> '{data,object,payment,payment_intent}']))
    WHERE type IN ('charge.refund.updated', 'refund.updated', 'refund.failed');
