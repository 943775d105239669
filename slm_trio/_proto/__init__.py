"""Generated protobuf and grpclib modules; regenerate with `python protos/generate.py`."""
