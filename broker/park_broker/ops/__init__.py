"""What operators watch: logs, Prometheus metrics, gRPC reflection."""
