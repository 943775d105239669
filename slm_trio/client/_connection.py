"""One grpclib channel, callable from trio or asyncio code.

Design note.

grpclib runs only on asyncio. `open_connection` checks the caller's async library with
`sniffio`. Under asyncio the channel runs natively on the running loop. Under trio it opens a
trio-asyncio loop for the lifetime of the connection and builds the `Channel` on that loop,
because grpclib binds the loop it is built on. `Connection.run` then runs each grpclib
coroutine there with `trio_asyncio.aio_as_trio`. It passes the loop explicitly, so any trio
task may call it.

Every coroutine that touches grpclib runs on the asyncio side and turns grpclib's exceptions
into slm_trio's before they cross back (`translate_errors`), so callers only see
`slm_trio.errors` classes:

- a status from the server becomes the class its ``slm-error`` trailer names (see
  `slm_trio._status_map`), DEADLINE_EXCEEDED becomes `DeadlineExceededError`;
- a refused, reset or lost connection becomes `ServerUnavailableError`;
- grpclib's own deadline (``asyncio.TimeoutError``) becomes `DeadlineExceededError`.

Cancellation crosses the bridge in both directions: cancelling the trio caller cancels the
asyncio task. A connection belongs to the event loop that opened it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar, TypeVarTuple, Unpack, cast

import anyio
import h2.exceptions
import sniffio
from google.protobuf.message import Message
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import decode_metadata

from slm_trio._http2 import TunedChannel
from slm_trio._status_map import status_to_exception
from slm_trio.errors import (
    DeadlineExceededError,
    RemoteError,
    ServerUnavailableError,
    SlmTrioError,
)

__all__ = [
    "Connection",
    "deadline_as_error",
    "open_connection",
    "translate_errors",
    "wire_bytes",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")

# A gRPC message travels behind a 5-byte prefix: a compressed flag and a 4-byte length.
_MESSAGE_PREFIX_BYTES = 5


def wire_bytes(message: Message) -> int:
    """Return the bytes a message occupies on a gRPC stream, prefix included.

    HTTP/2 frame headers and HPACK-encoded headers are not counted.
    """
    return int(message.ByteSize()) + _MESSAGE_PREFIX_BYTES


class Connection:
    """A grpclib `Channel` to one server, and the bridge that calls it from the caller's loop.

    Build it with `open_connection`. Use `run` to call a coroutine function that uses
    `channel`, and `unary` for a unary call with error translation and byte counts.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        channel: Channel,
        bridge: Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]],
        library: str,
    ) -> None:
        self.host = host
        self.port = port
        self.channel = channel
        self.library = library
        self._bridge = bridge

    def __repr__(self) -> str:
        return f"<Connection {self.address} library={self.library}>"

    @property
    def address(self) -> str:
        """The server's ``host:port``."""
        return f"{self.host}:{self.port}"

    async def run(self, fn: Callable[[Unpack[_Args]], Awaitable[_T]], *args: *_Args) -> _T:
        """Run ``await fn(*args)`` on the channel's asyncio loop and return its result.

        Cancellation: cancelling the caller cancels ``fn``.
        """
        return cast(_T, await self._bridge(fn)(*args))

    async def unary(
        self,
        method: Any,
        request: Message,
        *,
        call_timeout: float | None,
        name: str,
    ) -> tuple[Any, int, int]:
        """Make a unary call and return ``(reply, bytes_sent, bytes_received)``.

        Args:
            method: A unary method of a generated stub, for example ``stub.Forward``.
            request: The request message.
            call_timeout: Seconds the call may take; the server receives it as ``grpc-timeout``.
            name: The method name for errors, for example ``"Compute.Forward"``.

        Raises:
            DeadlineExceededError: ``call_timeout`` passed.
            ServerUnavailableError: The connection was refused or broke.
            SlmTrioError: The server returned an error status.
        """
        with deadline_as_error(call_timeout, f"{name} on {self.address}"):
            reply = await self.run(_unary_call, method, request, call_timeout, name, self.address)
        return reply, wire_bytes(request), wire_bytes(reply)

    async def aclose(self) -> None:
        """Close the channel's connection; idempotent.

        Cancellation: shielded, because it only closes a socket.
        """
        with anyio.CancelScope(shield=True):
            await self.run(_close_channel, self.channel)


@asynccontextmanager
async def open_connection(
    host: str, port: int, *, config: Configuration | None = None
) -> AsyncIterator[Connection]:
    """Open a connection to ``host:port`` for the current async library, trio or asyncio.

    Nothing is sent until the first call, so this succeeds even if the server is down;
    calls then fail with `ServerUnavailableError`.

    Raises:
        RuntimeError: The current async library is neither trio nor asyncio.
    """
    library = sniffio.current_async_library()
    if library == "trio":
        try:
            async with _open_trio_connection(host, port, config) as connection:
                yield connection
        except BaseExceptionGroup as group:
            # trio-asyncio's loop runs a nursery, which wraps whatever the caller's block
            # raises in an exception group; callers expect the exception itself.
            single = _only_exception(group)
            if single is None:
                raise
            raise single from single.__cause__
    elif library == "asyncio":
        channel = await _make_channel(host, port, config)
        connection = Connection(
            host=host, port=port, channel=channel, bridge=_in_child_task, library=library
        )
        try:
            yield connection
        finally:
            await connection.aclose()
    else:
        raise RuntimeError(f"slm_trio clients run on trio or asyncio, not {library!r}")


@asynccontextmanager
async def _open_trio_connection(
    host: str, port: int, config: Configuration | None
) -> AsyncIterator[Connection]:
    import trio_asyncio

    async with trio_asyncio.open_loop() as loop:

        def bridge(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            return cast(Callable[..., Awaitable[Any]], trio_asyncio.aio_as_trio(fn, loop=loop))

        channel = await bridge(_make_channel)(host, port, config)
        connection = Connection(
            host=host, port=port, channel=channel, bridge=bridge, library="trio"
        )
        try:
            yield connection
        finally:
            await connection.aclose()


def _only_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """Return the one exception inside nested single-member groups, or None."""
    current: BaseException = group
    while isinstance(current, BaseExceptionGroup):
        if len(current.exceptions) != 1:
            return None
        current = current.exceptions[0]
    return current


def _in_child_task(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Run each call of ``fn`` in a task of its own on the running asyncio loop.

    When a connection breaks, grpclib calls ``cancel()`` on every task waiting on it and turns
    the cancellation into `StreamTerminatedError`, but never calls ``uncancel()``. In the
    caller's own task that stale cancel request would later cancel an unrelated scope, so
    grpclib only gets the child task. Cancelling the caller cancels the child.
    """

    async def call(*args: Any) -> Any:
        return await asyncio.ensure_future(fn(*args))

    return call


async def _make_channel(host: str, port: int, config: Configuration | None) -> Channel:
    # Built inside a coroutine so that grpclib binds the running asyncio loop.
    return TunedChannel(host, port, config=config)


async def _close_channel(channel: Channel) -> None:
    channel.close()


@contextmanager
def deadline_as_error(timeout: float | None, what: str) -> Iterator[None]:
    """Cancel the block after ``timeout`` seconds and raise `DeadlineExceededError` naming ``what``.

    None means no timeout.
    """
    if timeout is None:
        yield
        return
    try:
        with anyio.fail_after(timeout):
            yield
    except TimeoutError as exc:
        if isinstance(exc, DeadlineExceededError):
            raise
        raise DeadlineExceededError(
            f"{what} timed out after {timeout:.3f} s; raise the timeout or check the server's load"
        ) from exc


@contextmanager
def translate_errors(
    name: str, address: str, stream: Stream[Any, Any] | None = None
) -> Iterator[None]:
    """Turn grpclib and socket errors raised in the block into slm_trio errors.

    Runs on the asyncio side. ``stream`` provides the status and trailing metadata of a
    failed call.
    """
    try:
        yield
    except GRPCError as exc:
        metadata = stream.trailing_metadata if stream is not None else None
        raise _status_error(exc, metadata, name, address) from exc
    except (StreamTerminatedError, h2.exceptions.ProtocolError) as exc:
        # A server that ends a stream with an error while the client is still sending resets
        # the stream after its trailers. The status in those trailers is the real error.
        status = _status_of_reset_stream(stream) if stream is not None else None
        if status is not None:
            raise _status_error(status[0], status[1], name, address) from exc
        raise ServerUnavailableError(
            f"the connection to {address} broke during {name}: {exc}; retry once the server is back"
        ) from exc
    except TimeoutError as exc:
        # grpclib's deadline raises asyncio.TimeoutError; in Python 3.11 that is TimeoutError,
        # a subclass of OSError, so it must be caught before the OSError clause.
        if isinstance(exc, DeadlineExceededError):
            raise
        raise DeadlineExceededError(f"{name} on {address} passed its deadline") from exc
    except OSError as exc:
        raise ServerUnavailableError(
            f"could not reach the server at {address} for {name}: {exc}; "
            "check that it is running and the address is right"
        ) from exc


def _status_error(
    exc: GRPCError, metadata: Mapping[str, Any] | None, name: str, address: str
) -> SlmTrioError:
    trailers = {key: str(value) for key, value in metadata.items()} if metadata else None
    error = status_to_exception(exc, trailers)
    if isinstance(error, RemoteError) and error.code == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(f"{name} on {address}: {error}")
    return error


def _status_of_reset_stream(
    stream: Stream[Any, Any],
) -> tuple[GRPCError, Mapping[str, Any]] | None:
    """Return the error status and trailing metadata a reset stream received, if any."""
    # NOTE: grpclib 0.4 keeps the received headers and trailers on the private ``_stream``
    # and checks them in the private ``_maybe_raise``, which its own ``__aexit__`` calls
    # for the same purpose.
    h2_stream = getattr(stream, "_stream", None)
    if h2_stream is None:
        return None
    trailers = h2_stream.trailers
    if trailers is None and h2_stream.headers is not None:
        # A trailers-only response carries the status in its headers.
        if "grpc-status" in dict(h2_stream.headers):
            trailers = h2_stream.headers
    if trailers is None:
        return None
    try:
        stream._maybe_raise()
    except GRPCError as error:
        return error, decode_metadata(trailers)
    return None


async def _unary_call(
    method: Any, request: Message, call_timeout: float | None, name: str, address: str
) -> Any:
    stream = method.open(timeout=call_timeout)
    with translate_errors(name, address, stream):
        async with stream:
            await stream.send_message(request, end=True)
            reply = await stream.recv_message()
        if reply is None:
            # The server ended the call without a reply or an error status.
            raise ServerUnavailableError(f"{address} ended {name} without a reply; retry")
        return reply
