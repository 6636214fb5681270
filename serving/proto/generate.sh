#!/usr/bin/env bash
# Regenerate the Python stubs for serving/proto/meshserve.proto and internal.proto.
#
# Run from anywhere: `serving/proto/generate.sh` (needs grpcio-tools, a test dependency).
# The stubs are committed. Stubs from grpcio-tools X.Y carry runtime checks: they need
# grpcio >= X.Y and a protobuf runtime no older than the bundled protoc's gencode version
# (see pyproject.toml); regenerate with an older grpcio-tools to support older runtimes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The installed module is meshserve.serving.proto.meshserve_pb2: protoc derives the
# generated imports from the .proto's path below -I, so compile it at that path.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/meshserve/serving/proto"
cp "$here/meshserve.proto" "$here/internal.proto" "$work/meshserve/serving/proto/"
(cd "$work" && python -m grpc_tools.protoc -I. \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  meshserve/serving/proto/meshserve.proto meshserve/serving/proto/internal.proto)
for name in meshserve internal; do
  cp "$work"/meshserve/serving/proto/${name}_pb2{.py,.pyi,_grpc.py} "$here/"
done
echo "regenerated serving/proto/{meshserve,internal}_pb2{.py,.pyi,_grpc.py} with grpcio-tools" \
  "$(python -c 'import grpc_tools.grpc_version as v; print(v.VERSION)')"
