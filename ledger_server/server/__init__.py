"""The gRPC server: services, the error boundary, health and reflection."""
