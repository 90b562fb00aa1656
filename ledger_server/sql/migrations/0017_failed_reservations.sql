-- A hold given back because its job failed ends 'failed' rather than 'released', so the
-- transaction log tells a failed activity from a cancelled one (DESIGN.md section 7:
-- status succeeded, failed, released, refunded; seed 004: "if it was failed or
-- successfully executed"). Same name: the error boundary and the docs refer to it.
ALTER TABLE reservations
    DROP CONSTRAINT reservations_status_known,
    ADD CONSTRAINT reservations_status_known
        CHECK (status IN ('pending', 'committed', 'released', 'expired', 'failed'));
