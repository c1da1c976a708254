"""gRPC servicers: thin adapters from the wire to the transport-free core; the only code that knows status codes."""
