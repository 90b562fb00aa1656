"""RQ jobs and schedules of the credit ledger."""
