"""The ledger's rules on the Python side: validation, idempotency fingerprints,
page tokens, and the calls into the SQL functions that hold the money logic."""
