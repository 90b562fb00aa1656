"""credit-ledger: the credits ledger AI products put between their users and their models."""
