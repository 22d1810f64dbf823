"""Method handlers whose request parsing cannot raise: bytes protobuf cannot parse get
``INVALID_ARGUMENT``, never ``UNKNOWN``.

gRPC runs a handler's ``request_deserializer`` before any interceptor or handler code sees
the message; when it raises, grpc answers ``UNKNOWN: Unexpected <class 'DecodeError'>``,
logs a traceback and skips the interceptors' metrics. ``SafeRegistrar(server)`` stands in
for the server when a service registers itself (``add_XServicer_to_server(servicer,
SafeRegistrar(server))``) and rewrites each handler:

- its deserializer returns an ``UndecodableRequest`` instead of raising (same parse, the
  bytes are not copied again);
- its behaviour ends such a call with ``INVALID_ARGUMENT`` and a ``google.rpc.BadRequest``
  (field ``""``: the whole message), for unary and streaming requests alike.

Interceptors see the ``UndecodableRequest`` (to count and log it) before the behaviour runs.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc

from dancegrpo_rewards.rich_status import abort, invalid_argument


class UndecodableRequest:
    """Stands in for a request message whose bytes could not be parsed."""

    __slots__ = ("type_name", "size", "error")

    def __init__(self, type_name: str, size: int, error: BaseException) -> None:
        self.type_name = type_name
        self.size = size
        self.error = error

    def description(self) -> str:
        """What went wrong, for the client (no traceback)."""
        return (
            f"not a valid {self.type_name} ({self.size} bytes): "
            f"{type(self.error).__name__}: {self.error}"
        )


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    message_class = getattr(deserializer, "__self__", None)  # generated: Message.FromString
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


def safe_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer`` that returns an ``UndecodableRequest`` instead of raising."""
    type_name = _type_name(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, and anything a parser may raise
            return UndecodableRequest(type_name, len(data), exc)

    return deserialize


async def _reject(context: grpc.aio.ServicerContext, request: UndecodableRequest) -> None:
    await abort(context, invalid_argument("", request.description()))


async def _checked_stream(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is UndecodableRequest:
            await _reject(context, request)
        yield request


def _wrap_unary_request(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream_out(request, context):
            if type(request) is UndecodableRequest:
                await _reject(context, request)
            async for response in behavior(request, context):
                yield response

        return stream_out

    async def unary_out(request, context):
        if type(request) is UndecodableRequest:
            await _reject(context, request)
        return await behavior(request, context)

    return unary_out


def _wrap_stream_request(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream_out(requests, context):
            async for response in behavior(_checked_stream(requests, context), context):
                yield response

        return stream_out

    async def unary_out(requests, context):
        return await behavior(_checked_stream(requests, context), context)

    return unary_out


def safe_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that cannot raise (see the module docstring).

    Handlers without a deserializer (raw bytes) or with synchronous behaviours are returned
    unchanged.
    """
    if handler.request_deserializer is None:
        return handler
    behavior = handler.unary_unary or handler.unary_stream
    behavior = behavior or handler.stream_unary or handler.stream_stream
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler
    wrap = _wrap_stream_request if handler.request_streaming else _wrap_unary_request
    kwargs = {
        "request_deserializer": safe_deserializer(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **kwargs)


class _SafeGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers go through ``safe_handler`` (cached)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._cache: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is None:
            found = self._inner.service(handler_call_details)
            if found is None:
                return None  # not cached: clients choose method names
            cached = self._cache[method] = safe_handler(found)
        return cached


class SafeRegistrar:
    """Registers services on ``server`` with ``safe_handler`` applied to every method.

    Pass it where generated code expects a server: ``add_XServicer_to_server(servicer,
    SafeRegistrar(server))``.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_SafeGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(
        self, service_name: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        safe = {name: safe_handler(handler) for name, handler in handlers.items()}
        self._server.add_registered_method_handlers(service_name, safe)
