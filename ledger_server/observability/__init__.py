"""Observability: Prometheus metrics, structured JSON logs with a request id, and the
health of the database as the gRPC health service reports it."""
