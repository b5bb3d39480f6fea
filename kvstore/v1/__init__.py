"""Generated protobuf and gRPC code for the kvstore.v1 API (built from proto/ by setup.py)."""
