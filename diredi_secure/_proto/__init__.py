"""Generated protobuf and gRPC code (``make protos``). Never edited by hand; see scripts/gen_protos.py."""
