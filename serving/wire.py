"""Registering gRPC services so that a request that is not a valid protobuf message gets
INVALID_ARGUMENT.

The generated `add_*Servicer_to_server` functions deserialize with `FromString`, and grpc
answers a DecodeError there with UNKNOWN ("Unexpected DecodeError ..."): to a client a
server-side bug, not the bad input it is. Here the deserializer turns a message that
does not parse into a `Malformed` placeholder, and each method first refuses that
placeholder with INVALID_ARGUMENT (and `on_malformed`, which counts it). The method
table comes from the service descriptor, so a method added to the .proto is covered.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType

import grpc
from google.protobuf.message import DecodeError


class Malformed:
    """A request whose bytes did not parse as its message type."""

    def __init__(self, type_name: str, error: str):
        self.type_name, self.error = type_name, error

    @property
    def message(self) -> str:
        return f"the request is not a valid {self.type_name} message: {self.error}"[:300]


def _deserializer(message_class) -> Callable[[bytes], object]:
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:  # RuntimeError: recursion depth
            return Malformed(name, str(e) or type(e).__name__)

    return parse


def _guard(fn, on_malformed: Callable[[Malformed], None]):
    async def refuse(request: Malformed, context) -> None:
        on_malformed(request)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    if inspect.isasyncgenfunction(fn):
        async def stream(request, context):
            if isinstance(request, Malformed):
                await refuse(request, context)
            async for response in fn(request, context):
                yield response
        return stream

    async def call(request, context):
        if isinstance(request, Malformed):
            await refuse(request, context)
        return await fn(request, context)
    return call


def add_service(server: grpc.aio.Server, servicer, messages: ModuleType, service_name: str,
                on_malformed: Callable[[Malformed], None] = lambda _m: None) -> None:
    """Register `servicer`'s methods of `service_name` (defined in the generated
    `messages` module) on `server`. Unary-request methods only (client streams are
    parsed message by message inside grpc)."""
    service = messages.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streams are not supported")
        request_class = getattr(messages, method.input_type.name)
        response_class = getattr(messages, method.output_type.name)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(
            _guard(getattr(servicer, method.name), on_malformed),
            request_deserializer=_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
