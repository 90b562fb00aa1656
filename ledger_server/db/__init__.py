"""PostgreSQL access: the pool, named queries, migrations and the error boundary."""
