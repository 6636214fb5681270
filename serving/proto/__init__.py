"""Generated gRPC stubs for meshserve.v1 (regenerate with serving/proto/generate.sh)."""
