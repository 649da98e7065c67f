"""Generated gRPC/protobuf modules of the paramserver wire protocol, version 1 (built, not committed)."""
