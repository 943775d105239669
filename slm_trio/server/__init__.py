"""The gRPC server of slm_trio: hosting, services and the exception-to-status mapping."""
