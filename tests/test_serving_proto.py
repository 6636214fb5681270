"""The committed gRPC stubs are exactly what serving/proto/generate.sh produces, and
import under the installed protobuf/grpcio runtimes."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.serving_fixtures import REPO

STUBS = tuple(f"{name}_pb2{ext}" for name in ("meshserve", "internal")
              for ext in (".py", ".pyi", "_grpc.py"))


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    for name in ("meshserve.proto", "internal.proto", "generate.sh"):  # written beside it
        shutil.copy(os.path.join(REPO, "serving", "proto", name), tmp_path / name)
    subprocess.run(["bash", str(tmp_path / "generate.sh")], check=True, capture_output=True)
    for name in STUBS:
        fresh = (tmp_path / name).read_text()
        with open(os.path.join(REPO, "serving", "proto", name)) as f:
            assert f.read() == fresh, f"{name} is stale: run serving/proto/generate.sh"


def test_stubs_import_and_describe_the_service():
    from meshserve.serving.proto import meshserve_pb2 as pb
    from meshserve.serving.proto import meshserve_pb2_grpc  # noqa: F401 - the grpcio version check

    service = pb.DESCRIPTOR.services_by_name["MeshServe"]
    assert service.full_name == "meshserve.v1.MeshServe"
    assert {m.name for m in service.methods} == {
        "Generate", "Tokenize", "Detokenize", "GetServerInfo", "StartProfile", "StopProfile"}
    assert service.methods_by_name["Generate"].server_streaming
    fields = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    for name in ("temperature", "top_p", "seed", "max_tokens", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "logprobs", "prompt"):
        assert fields[name].has_presence, name  # unset differs from zero
