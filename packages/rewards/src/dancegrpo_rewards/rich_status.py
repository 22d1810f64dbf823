"""gRPC failures with ``google.rpc`` details, bounded in size.

Every status the server sends carries a ``google.rpc.Status`` in the standard
``grpc-status-details-bin`` trailer (what ``grpcio-status``, grpc-java's ``StatusProto``,
grpc-go's ``status.FromError`` and friends read), so clients in any language need not parse
message text:

- ``INVALID_ARGUMENT``: ``google.rpc.BadRequest`` with one field violation (the field path,
  e.g. ``samples[2].media.raw.shape``, and the description).
- ``RESOURCE_EXHAUSTED`` (queue full) and ``UNAVAILABLE`` (loading, shutting down):
  ``google.rpc.RetryInfo`` with the suggested delay.
- ``NOT_FOUND`` (unknown reward): ``google.rpc.ResourceInfo``.

Client-supplied text quoted in a message goes through ``echo`` (ASCII, at most
``MAX_ECHO_CHARS``), and messages are cut at ``MAX_MESSAGE_CHARS``, so the trailers stay far
below gRPC's 8 KiB metadata limit whatever a client sends.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

#: Most characters of a client-supplied string quoted in an error message.
MAX_ECHO_CHARS = 64
#: Most characters of a status message (and of a field violation's description).
MAX_MESSAGE_CHARS = 1024
#: ``ResourceInfo.resource_type`` of a reward.
REWARD_RESOURCE_TYPE = "dancegrpo.rewards.v1.Reward"


def echo(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``value`` quoted for an error message: ASCII only, cut after ``limit`` characters."""
    if len(value) <= limit:
        return ascii(value)
    return f"{ascii(value[:limit])}... ({len(value)} characters)"


def field_key(key: str, limit: int = MAX_ECHO_CHARS) -> str:
    """A map key as a field-path segment: as is when short and printable ASCII, else quoted."""
    if len(key) <= limit and key.isascii() and key.isprintable():
        return key
    return echo(key, limit)


def _cut(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 20] + f"... ({len(text)} chars)"


class ScoreError(Exception):
    """A failed call: the gRPC status code, its message and optional rich details.

    Args:
        code: the status code.
        message: the status message (cut at ``MAX_MESSAGE_CHARS``).
        field: for ``INVALID_ARGUMENT``, the offending field's path (``""`` = the whole
            request); sent as a ``BadRequest`` field violation.
        description: the violation's description (default: ``message``).
        retry_after_s: sent as ``RetryInfo.retry_delay`` (when a retry may succeed).
        resource: for ``NOT_FOUND``, the missing reward's name (``ResourceInfo``).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: str | None = None,
        description: str | None = None,
        retry_after_s: float | None = None,
        resource: str | None = None,
    ) -> None:
        message = _cut(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.description = _cut(description) if description is not None else message
        self.retry_after_s = retry_after_s
        self.resource = resource

    def to_status_proto(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` sent in ``grpc-status-details-bin``."""
        details = []
        if self.field is not None:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.description
            )
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(round(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.resource is not None:
            details.append(
                error_details_pb2.ResourceInfo(
                    resource_type=REWARD_RESOURCE_TYPE,
                    resource_name=self.resource[:MAX_ECHO_CHARS],
                    description=self.message,
                )
            )
        packed = []
        for detail in details:
            item = any_pb2.Any()
            item.Pack(detail)
            packed.append(item)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


def invalid_argument(field: str, description: str) -> ScoreError:
    """``INVALID_ARGUMENT`` for ``field``: message ``"<field>: <description>"``."""
    message = f"{field}: {description}" if field else description
    return ScoreError(
        grpc.StatusCode.INVALID_ARGUMENT, message, field=field, description=description
    )


async def abort(context: grpc.aio.ServicerContext, error: ScoreError) -> NoReturn:
    """Ends the call with ``error``'s code, message and ``google.rpc`` details."""
    status = rpc_status.to_status(error.to_status_proto())
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
