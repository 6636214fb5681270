"""Bearer-token authentication for every RPC except health checks.

The token is compared in constant time (hmac.compare_digest) so response timing does
not reveal how much of a guessed token was right. Health stays open so that load
balancers and orchestrators can probe without credentials; reflection needs the token
like everything else (it describes the API).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
MAX_TOKEN_BYTES = 4096


def read_token_file(path: str) -> bytes:
    """The token is the file's content without surrounding whitespace."""
    with open(path, "rb") as f:
        token = f.read(MAX_TOKEN_BYTES + 1).strip()
    if not token:
        raise ValueError(f"--auth-token-file {path} is empty")
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"--auth-token-file {path} is longer than {MAX_TOKEN_BYTES} bytes")
    if any(c < 0x21 or c > 0x7E for c in token):
        raise ValueError(f"--auth-token-file {path}: the token must be printable ASCII")
    return token


def bearer_matches(values, expected: bytes) -> bool:
    """Exactly one authorization value, equal to `expected` (b"Bearer <token>"), compared
    in constant time; shared by gRPC metadata and HTTP headers."""
    if len(values) != 1:
        return False
    value = values[0]
    value = value.encode("latin-1", "replace") if isinstance(value, str) else bytes(value)
    return hmac.compare_digest(value, expected)


def _denier(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED.

    No request deserializer: the unauthenticated payload is never parsed.
    """

    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: bytes, on_reject: Callable[[str], None] | None = None):
        self._expected = b"Bearer " + token
        self._on_reject = on_reject

    def _authorized(self, metadata) -> bool:
        return bearer_matches([v for k, v in (metadata or ()) if k == "authorization"],
                              self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX) or self._authorized(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self._on_reject is not None:
            self._on_reject(method)
        return _denier(handler, "missing or invalid bearer token in 'authorization' metadata")
