"""gRPC server interceptors: per-RPC metrics and logs, and bearer-token authentication."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Collection

import grpc

from dancegrpo_proto import SERVICE_NAME
from dancegrpo_rewards.metrics import ServiceMetrics

log = logging.getLogger("dancegrpo_rewards.rpc")

_SERVICE_PREFIX = f"/{SERVICE_NAME}/"
#: Methods callable without a token, so load balancers and kubelet probes need no secret.
AUTH_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
UNKNOWN_REWARD_LABEL = "_unknown"


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Records metrics and one log line per ``RewardService`` RPC.

    Successful calls log at DEBUG, failures at WARNING (INTERNAL at ERROR). Reward labels
    are limited to hosted names so a client cannot grow the metric cardinality.
    """

    def __init__(self, metrics: ServiceMetrics, hosted: Collection[str]) -> None:
        self._metrics = metrics
        self._hosted = frozenset(hosted)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method_path = handler_call_details.method
        if handler is None or handler.unary_unary is None:
            return handler
        if not method_path.startswith(_SERVICE_PREFIX):
            return handler
        method = method_path[len(_SERVICE_PREFIX) :]
        behavior = handler.unary_unary

        async def observed(request, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            reward = ""
            if method == "Score":
                reward = request.reward if request.reward in self._hosted else UNKNOWN_REWARD_LABEL
            failure: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._record(method, reward, request, context, failure, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _record(
        self,
        method: str,
        reward: str,
        request,
        context: grpc.aio.ServicerContext,
        failure: BaseException | None,
        seconds: float,
    ) -> None:
        code = context.code()
        if code is None:
            if failure is None:
                code = grpc.StatusCode.OK
            elif isinstance(failure, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        name = code.name
        self._metrics.observe_rpc(method, reward, name, seconds)
        fields = {
            "method": method,
            "reward": reward,
            "code": name,
            "latency_ms": round(seconds * 1000, 3),
            "peer": context.peer(),
        }
        if method == "Score":
            fields["samples"] = len(request.samples)
            if request.request_id:
                fields["request_id"] = request.request_id
        if name == "OK":
            log.debug("rpc", extra={"fields": fields})
        else:
            fields["details"] = context.details()
            level = logging.ERROR if name in ("INTERNAL", "UNKNOWN") else logging.WARNING
            log.log(level, "rpc failed", extra={"fields": fields})


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` with ``UNAUTHENTICATED``.

    Health checks are exempt (``AUTH_EXEMPT_PREFIXES``). Tokens are compared in constant time.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must be non-empty")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(AUTH_EXEMPT_PREFIXES):
            return handler
        if self._authorized(handler_call_details):
            return handler
        return _denying_handler(handler)


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"

    async def deny_unary(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny_unary, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
