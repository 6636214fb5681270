#!/usr/bin/env bash
# Regenerate the Python stubs for serving/proto/meshserve.proto.
#
# Run from anywhere: `serving/proto/generate.sh` (needs grpcio-tools, a test dependency).
# The stubs are committed. Stubs from grpcio-tools X.Y carry runtime checks: they need
# grpcio >= X.Y and a protobuf runtime no older than the bundled protoc's gencode version
# (see pyproject.toml); regenerate with an older grpcio-tools to support older runtimes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# -I at the repo root makes the generated code import `serving.proto.meshserve_pb2`.
python -m grpc_tools.protoc -I. \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  serving/proto/meshserve.proto
echo "regenerated serving/proto/meshserve_pb2{.py,.pyi,_grpc.py} with grpcio-tools" \
  "$(python -c 'import grpc_tools.grpc_version as v; print(v.VERSION)')"
