"""The one place where a handler's exception becomes a gRPC status.

Every handler runs inside `map_errors` (or is decorated with `handle_errors`):

- an slm_trio error with a mapping (see `slm_trio._status_map`) ends the call
  with its status, its message and the ``slm-error`` / ``retry-after-ms``
  trailing metadata;
- a `GRPCError` raised on purpose, and grpclib's `StreamTerminatedError` for a
  stream the client reset, pass through to grpclib unchanged;
- a request message that protobuf cannot decode ends the call with
  INVALID_ARGUMENT;
- anything else ends the call with INTERNAL and a generic message with an
  error id. The traceback goes to the server log under the same id;
- cancellation (`asyncio.CancelledError`, `trio.Cancelled`) and other
  `BaseException`s are never caught.

An exception group with exactly one exception in it is treated as that exception,
so a handler whose trio code raised through a nursery still gets a precise status.

A mapped error is logged at INFO as ``rpc.rejected``, at most once per method and
status every `REJECTION_LOG_INTERVAL` seconds, and the next line counts the ones
held back. A client that repeats a bad request adds one INFO line per interval.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

import h2.exceptions
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.server import Stream

from slm_trio._status_map import ErrorStatus, status_for_error, truncate_status_message

__all__ = ["handle_errors", "map_errors"]

logger = logging.getLogger(__name__)

# Seconds between two INFO lines for rejections of one method with one status.
REJECTION_LOG_INTERVAL = 10.0

_Service = TypeVar("_Service")
_Handler = Callable[[_Service, Any], Awaitable[None]]


def map_errors(stream: Stream[Any, Any], *, method: str) -> AbstractAsyncContextManager[None]:
    """Return an async context manager that ends the call with the status an exception maps to.

    Args:
        stream: The handler's grpclib stream, used to send the status.
        method: The method name for the log, for example ``"Compute.Forward"``.
    """
    return _ErrorMapper(stream, method=method)


class _ErrorMapper(AbstractAsyncContextManager[None]):
    def __init__(self, stream: Stream[Any, Any], *, method: str) -> None:
        self._stream = stream
        self._method = method

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        error = _single_exception(exc)
        if isinstance(error, (GRPCError, StreamTerminatedError)):
            if error is exc:
                return False
            raise error from exc

        reply = status_for_error(error)
        if reply is None and isinstance(error, DecodeError):
            reply = ErrorStatus(
                status=Status.INVALID_ARGUMENT,
                message=f"the request message could not be decoded: {error}; "
                "check that the client uses the slm_trio.v1 protos",
            )
        if reply is None:
            reply = self._internal_error(exc)
        else:
            _log_rejection(self._method, reply)
        await self._send(reply)
        return True

    def _internal_error(self, exc: BaseException) -> ErrorStatus:
        error_id = secrets.token_hex(4)
        logger.error(
            "rpc.internal_error method=%s error_id=%s", self._method, error_id, exc_info=exc
        )
        return ErrorStatus(
            status=Status.INTERNAL,
            message=f"internal server error (error id {error_id}); the server log has the details",
        )

    async def _send(self, reply: ErrorStatus) -> None:
        try:
            await self._stream.send_trailing_metadata(
                status=reply.status,
                status_message=truncate_status_message(reply.message),
                metadata=reply.metadata,
            )
        except (ProtocolError, h2.exceptions.StreamClosedError) as send_error:
            # The handler already ended the call, or the client went away.
            logger.debug(
                "rpc.status_not_sent method=%s status=%s error=%r",
                self._method,
                reply.status.name,
                send_error,
            )


def handle_errors(handler: _Handler[_Service]) -> _Handler[_Service]:
    """Decorate a grpclib handler method so that its exceptions go through `map_errors`.

    The log names the method by its qualified name, for example ``ComputeService.Forward``.
    """

    @functools.wraps(handler)
    async def wrapper(self: _Service, stream: Stream[Any, Any]) -> None:
        async with map_errors(stream, method=handler.__qualname__):
            await handler(self, stream)

    return wrapper


class RejectionLogLimiter:
    """Allow one log line per key and interval, and count the lines held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[tuple[str, Status], float] = {}
        self._held_back: dict[tuple[str, Status], int] = {}

    def allow_nowait(self, key: tuple[str, Status], now: float) -> int | None:
        """Return the lines held back since the last one if a line may go out now, else None."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held_back.pop(key, 0)


_rejections = RejectionLogLimiter(REJECTION_LOG_INTERVAL)


def _log_rejection(method: str, reply: ErrorStatus) -> None:
    held_back = _rejections.allow_nowait((method, reply.status), time.monotonic())
    if held_back is None:
        logger.debug("rpc.rejected method=%s status=%s", method, reply.status.name)
        return
    logger.info(
        "rpc.rejected method=%s status=%s held_back=%d message=%s",
        method,
        reply.status.name,
        held_back,
        reply.message[:200],
    )


def _single_exception(exc: Exception) -> Exception:
    """Return the only exception inside nested exception groups, or ``exc`` itself."""
    current: Exception = exc
    while isinstance(current, ExceptionGroup) and len(current.exceptions) == 1:
        current = current.exceptions[0]
    return current
