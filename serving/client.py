"""A small client for the MeshServe service: channels (TLS, mTLS, bearer token) and
streaming generation, used by `meshserve generate --target` and the benchmark."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

import grpc

from meshserve.serving.proto import meshserve_pb2 as pb
from meshserve.serving.proto import meshserve_pb2_grpc as pb_grpc

MAX_RESPONSE_BYTES = 16 << 20


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel_credentials(tls_ca: str | None = None, tls_cert: str | None = None,
                        tls_key: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: the CA that signed the server (None: system roots) and, for
    mTLS, this client's certificate and key."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))


def channel_options(server_name: str | None = None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)
    ]
    if server_name:  # the name the server certificate is issued for, if not the host
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def open_channel(target: str, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 server_name: str | None = None) -> grpc.Channel:
    options = channel_options(server_name)
    if tls or tls_ca or tls_cert:
        return grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key),
                                   options=options)
    return grpc.insecure_channel(target, options=options)


def auth_metadata(token: str | bytes | None) -> tuple[tuple[str, str], ...]:
    if token is None:
        return ()
    if isinstance(token, bytes):
        token = token.decode("ascii")
    return (("authorization", f"Bearer {token.strip()}"),)


def read_token(path: str | None) -> str | None:
    return None if path is None else _read(path).decode("ascii").strip()


def generate(stub: pb_grpc.MeshServeStub, request: pb.GenerateRequest,
             token: str | None = None, timeout: float | None = None
             ) -> Iterator[pb.GenerateResponse]:
    """Stream the responses of one Generate call (raises grpc.RpcError on failure)."""
    return stub.Generate(request, metadata=auth_metadata(token), timeout=timeout)


def build_request(prompt: str | None = None, token_ids: Sequence[int] | None = None,
                  messages: Sequence[tuple[str, str]] | None = None,
                  **fields) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; None values stay unset. `messages` are
    (role, content) pairs of a chat."""
    request = pb.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})
    if prompt is not None:
        request.prompt = prompt
    if token_ids is not None:
        request.token_ids.extend(int(t) for t in token_ids)
    for role, content in messages or ():
        request.messages.add(role=role, content=content)
    return request


def stream_to(out: TextIO, target: str, request: pb.GenerateRequest, *, as_json: bool = False,
              token: str | None = None, timeout: float | None = None, **channel_kw) -> int:
    """Print text as it arrives (or, with as_json, one JSON object at the end).

    Returns a process exit code: 0, or 1 with the gRPC status on stderr.
    """
    ids: list[int] = []
    logprobs: list[float] = []
    text: list[str] = []
    last = None
    with open_channel(target, **channel_kw) as ch:
        stub = pb_grpc.MeshServeStub(ch)
        try:
            for response in generate(stub, request, token, timeout):
                ids.extend(response.token_ids)
                logprobs.extend(lp.logprob for lp in response.logprobs)
                text.append(response.text)
                if not as_json and response.text:
                    out.write(response.text)
                    out.flush()
                last = response
        except grpc.RpcError as e:
            if not as_json and any(text):
                out.write("\n")
            print(f"meshserve generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if as_json:
        out.write(json.dumps({
            "token_ids": ids, "logprobs": logprobs, "text": "".join(text),
            "finish_reason": last.finish_reason if last else None,
            "usage": {"prompt_tokens": last.usage.prompt_tokens,
                      "completion_tokens": last.usage.completion_tokens} if last else None,
        }) + "\n")
    elif not any(text):  # a model without a tokenizer streams ids only
        out.write(" ".join(map(str, ids)) + "\n")
    else:
        out.write("\n")
    return 0
