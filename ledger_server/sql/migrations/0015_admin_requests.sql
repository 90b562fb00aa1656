-- Idempotency keys of the administrators' changes that move no credits (catalogue, rate
-- card, settings, redemption batches, alert thresholds): a retry with the same key answers
-- the first response, the same key with another request is refused. The response is the
-- serialized response message. A key is claimed by inserting its row first, in the change's
-- own transaction: a concurrent retry waits for that transaction, then finds the answer (or,
-- if the change failed, claims the key itself).
CREATE TABLE admin_requests (
    idempotency_key text COLLATE "C" PRIMARY KEY,
    operation       text        NOT NULL,
    request_hash    bytea       NOT NULL,
    -- NULL only inside the transaction that claimed the key (the answer is stored at its end).
    response        bytea,
    actor           text,
    created_at      timestamptz NOT NULL
);
