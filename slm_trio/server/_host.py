"""Host a grpclib server inside the current anyio backend.

grpclib runs only on asyncio. Under trio, `GrpcHost.serve` opens a trio-asyncio
loop and runs every grpclib call (build, start, drain, close) on it as an asyncio
coroutine through `trio_asyncio.aio_as_trio`. The `Server` must be built on that
loop because it binds the running loop when it is constructed. Under asyncio the
server runs natively on the running loop.

Handlers run as asyncio tasks in both cases. Under trio-asyncio the current
async library inside a handler is asyncio, so anyio calls there use anyio's
asyncio backend and objects that trio code created (locks, events, the manager)
must not be touched directly. A handler reaches them through `run_in_owner`,
which crosses into trio once with `trio_asyncio.trio_as_aio`.

The host wraps every method handler it serves:

- a message size cap for every service, health and reflection included. grpclib
  has no maximum message size and buffers whatever length a message's 5-byte
  prefix declares, so the cap reads the prefix and rejects an oversized message
  with RESOURCE_EXHAUSTED before its body is read. Until then HTTP/2 flow control
  bounds what the server buffers to its stream window (4 MiB by default in grpclib 0.4);
- a budget of request-message bytes in flight for every service, because the
  size cap bounds one message but not how many arrive at once. A call reserves a
  message's declared length when its prefix arrives and keeps it until the call
  ends or reads its next message. A message that would take the total over the
  budget is rejected with RESOURCE_EXHAUSTED and a ``retry-after-ms`` hint before
  its body is read, unless no other request bytes are in flight;
- for the caller's services (not health or reflection), an in-flight count and a
  gate that rejects new calls with UNAVAILABLE once a stop has begun.

Stopping: cancelling the scope around `serve` closes the server at once. A
graceful stop (`graceful_stop`) first closes the listening socket and rejects new
calls, waits up to its grace period for in-flight calls of the caller's services,
then does the same. Closing cancels the handlers still running, waits for them for
at most `close_timeout` seconds, shielded from cancellation, then sends GOAWAY on
every connection and closes it. grpclib's own `Server.close()` neither sends
GOAWAY nor closes connections. GOAWAY is sent only at the end, because a grpclib
0.4 client that receives it terminates every stream on that connection, in-flight
ones included.

NOTE: the host relies on grpclib 0.4 internals, each covered by tests/test_host.py:
``Server._protocol_factory`` and ``Server._server`` (to track connections and
close the listening socket), ``server.Stream._stream`` (for the size cap), and
the ``connection``/``processor`` attributes of ``H2Protocol``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, TypeVarTuple, cast

import anyio
import h2.exceptions
import sniffio
from anyio.abc import TaskStatus
from grpclib.config import Configuration
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError, ProtocolError
from grpclib.health.service import Health
from grpclib.protocol import H2Protocol
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server, Stream

from slm_trio._http2 import TunedH2Protocol
from slm_trio._status_map import RETRY_AFTER_KEY
from slm_trio.errors import ConfigError, listen_error
from slm_trio.server._status import REJECTION_LOG_INTERVAL, RejectionLogLimiter

__all__ = ["GrpcHost", "HostStatistics", "Servable", "run_in_owner"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
_Args = TypeVarTuple("_Args")

# The gRPC length-prefixed message header: a compressed flag (1 byte) and the
# message length (4 bytes, big-endian).
_PREFIX = struct.Struct(">?I")

# The wait suggested to a client whose message did not fit in the budget of
# request bytes in flight, in milliseconds.
# NOTE: a fixed estimate. The host does not know when the calls in flight will end.
_OVER_BUDGET_RETRY_AFTER_MS = 1000

# One INFO line per method and kind of size rejection every REJECTION_LOG_INTERVAL
# seconds, so that a client repeating oversized requests adds one line per interval.
_size_rejections = RejectionLogLimiter(REJECTION_LOG_INTERVAL)


class Servable(Protocol):
    """A grpclib service: the generated ``*Base`` classes, `Health`, `ServerReflection`."""

    def __mapping__(self) -> Mapping[str, Handler]: ...


@dataclass(frozen=True, kw_only=True)
class HostStatistics:
    """Counters of a `GrpcHost`, as `GrpcHost.statistics` returns them."""

    in_flight: int
    connections: int
    rejected_while_stopping: int
    rejected_oversized: int
    rejected_over_budget: int
    request_bytes_in_flight: int


# The trio-asyncio loop of the host that runs the current handler, set in each
# handler's task when the host runs under trio; None everywhere else.
_TRIO_HOST_LOOP: ContextVar[asyncio.AbstractEventLoop | None] = ContextVar(
    "slm_trio_trio_host_loop", default=None
)


async def run_in_owner(fn: Callable[[*_Args], Awaitable[_T]], *args: *_Args) -> _T:
    """Run ``await fn(*args)`` in the backend that owns the server's objects.

    Inside a handler that a `GrpcHost` serves under trio, ``fn`` runs as a trio
    task through `trio_asyncio.trio_as_aio`, so it may use trio-owned objects
    such as the model manager. Under plain asyncio, and anywhere else, it is
    awaited in place.

    Cancellation: cancelling the handler cancels ``fn``; a result that ``fn``
    returns after the cancellation is lost.
    """
    loop = _TRIO_HOST_LOOP.get()
    if loop is not None and sniffio.current_async_library() == "asyncio":
        import trio_asyncio

        result = await trio_asyncio.trio_as_aio(fn, loop=loop)(*args)
        return cast(_T, result)
    return await fn(*args)


class GrpcHost:
    """A grpclib server that runs inside the current anyio backend, trio or asyncio.

    Typical use in a task group::

        host = GrpcHost([ComputeService(...)], port=0, max_message_bytes=64 << 20)
        port = await task_group.start(host.serve)
        ...
        await host.graceful_stop(grace_period=10)

    A host serves once: after `serve` returns, build a new one.

    Args:
        services: The grpclib services to serve, for example subclasses of the
            generated ``ComputeBase``. Health and reflection are added.
        host: The address to bind; ``127.0.0.1`` keeps the server local.
        port: The TCP port; 0 picks a free one, reported by `serve`.
        health: The health service, which the caller keeps updating; a default
            one reports SERVING for the whole server.
        max_message_bytes: The largest request message accepted, in bytes.
        max_request_bytes_in_flight: The budget of request-message bytes that
            calls on this host may hold at once, in bytes. ``None`` means four
            times ``max_message_bytes``. A message that would exceed it is
            rejected with RESOURCE_EXHAUSTED, except when no other request
            bytes are in flight.
        close_timeout: Seconds that closing waits for cancelled handlers to exit.
        config: grpclib's HTTP/2 settings (flow-control windows, keepalive).
    """

    def __init__(
        self,
        services: Collection[Servable],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health: Health | None = None,
        max_message_bytes: int,
        max_request_bytes_in_flight: int | None = None,
        close_timeout: float = 5.0,
        config: Configuration | None = None,
    ) -> None:
        _check_byte_count("max_message_bytes", max_message_bytes)
        if max_request_bytes_in_flight is None:
            max_request_bytes_in_flight = 4 * max_message_bytes
        _check_byte_count("max_request_bytes_in_flight", max_request_bytes_in_flight)
        if not math.isfinite(close_timeout) or close_timeout <= 0:
            raise ConfigError(
                f"close_timeout={close_timeout!r} is invalid; expected a positive number of seconds"
            )
        self._services = list(services)
        self._host = host
        self._requested_port = port
        self._health = health if health is not None else Health()
        self._max_message_bytes = max_message_bytes
        self._max_request_bytes_in_flight = max_request_bytes_in_flight
        self._close_timeout = close_timeout
        self._config = config

        self._port: int | None = None
        self._runner: _AsyncioRunner | None = None
        self._used = False
        self._grace_period: float | None = None
        self._stop_requested: anyio.Event | None = None
        self._stopped: anyio.Event | None = None

    def __repr__(self) -> str:
        if self._runner is None:
            state = "stopped" if self._used else "not started"
        elif self._grace_period is not None:
            state = "stopping"
        else:
            state = "serving"
        address = f"{self._host}:{self._port if self._port is not None else self._requested_port}"
        return f"<GrpcHost {address} {state}>"

    @property
    def port(self) -> int:
        """The bound TCP port; raises RuntimeError before `serve` has started."""
        if self._port is None:
            raise RuntimeError("GrpcHost.port is unknown until serve() has started")
        return self._port

    def statistics(self) -> HostStatistics:
        """Return the current counters; all zero before `serve` starts."""
        runner = self._runner
        if runner is None:
            return HostStatistics(
                in_flight=0,
                connections=0,
                rejected_while_stopping=0,
                rejected_oversized=0,
                rejected_over_budget=0,
                request_bytes_in_flight=0,
            )
        return runner.statistics()

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until the surrounding scope is cancelled or a graceful stop finishes.

        Reports the bound port through ``task_status.started(port)``, so use it
        with ``await task_group.start(host.serve)``.

        Raises:
            OSError: if the address cannot be bound.
            RuntimeError: if this host has served before, or the current async
                library is neither trio nor asyncio.

        Cancellation: cancelling the surrounding scope closes the server at once,
        cancelling in-flight handlers. Closing is shielded and waits at most
        `close_timeout` seconds, then `serve` re-raises the cancellation.

        NOTE: under trio, leaving the trio-asyncio loop also waits for trio code
        that handlers started through `run_in_owner`. Such code that ignores
        cancellation (a worker thread that is not abandoned) delays `serve`
        beyond `close_timeout`.
        """
        if self._used:
            raise RuntimeError("this GrpcHost has already served; create a new one")
        self._used = True
        self._stop_requested = anyio.Event()
        self._stopped = anyio.Event()
        if self._grace_period is not None:
            self._stop_requested.set()  # `request_stop` came before `serve`
        try:
            library = sniffio.current_async_library()
            if library == "trio":
                await self._serve_on_trio(task_status)
            elif library == "asyncio":
                await self._serve_with(_call_directly, task_status, under_trio=False)
            else:
                raise RuntimeError(f"GrpcHost runs on trio or asyncio, not {library!r}")
        finally:
            self._runner = None
            self._stopped.set()

    async def _serve_on_trio(self, task_status: TaskStatus[int]) -> None:
        import trio_asyncio

        try:
            async with trio_asyncio.open_loop():
                await self._serve_with(trio_asyncio.aio_as_trio, task_status, under_trio=True)
        except BaseExceptionGroup as group:
            # The loop's nurseries are an implementation detail: re-raise a lone
            # exception (a bind error, a cancellation) as itself.
            lone: BaseException = group
            while isinstance(lone, BaseExceptionGroup) and len(lone.exceptions) == 1:
                lone = lone.exceptions[0]
            if lone is group or isinstance(lone, BaseExceptionGroup):
                raise
            raise lone from None

    async def _serve_with(
        self,
        to_current_library: Callable[[Any], Any],
        task_status: TaskStatus[int],
        *,
        under_trio: bool,
    ) -> None:
        """Run the server; ``to_current_library`` adapts asyncio coroutines to the caller."""
        runner = _AsyncioRunner(
            self._services,
            health=self._health,
            max_message_bytes=self._max_message_bytes,
            max_request_bytes_in_flight=self._max_request_bytes_in_flight,
            config=self._config,
        )
        self._port = await to_current_library(runner.start)(
            self._host, self._requested_port, under_trio=under_trio
        )
        self._runner = runner
        logger.info("grpc.listening host=%s port=%d", self._host, self._port)
        try:
            task_status.started(self._port)
            assert self._stop_requested is not None
            await self._stop_requested.wait()
            grace_period = self._grace_period
            assert grace_period is not None
            logger.info("grpc.draining port=%d grace_period=%.3g", self._port, grace_period)
            await to_current_library(runner.drain)(grace_period)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._close_timeout) as scope:
                await to_current_library(runner.close)()
            if scope.cancelled_caught:
                logger.warning(
                    "grpc.close_timed_out port=%d close_timeout=%.3g in_flight=%d",
                    self._port,
                    self._close_timeout,
                    runner.statistics().in_flight,
                )
            logger.info("grpc.stopped port=%d", self._port)

    def request_stop(self, grace_period: float) -> None:
        """Start a graceful stop without waiting for it; see `graceful_stop`.

        Only the first request's grace period counts. Call this from the backend
        that runs `serve` (from a handler under trio, through `run_in_owner`).
        """
        if not math.isfinite(grace_period) or grace_period < 0:
            raise ConfigError(f"grace_period={grace_period!r} is invalid; expected seconds >= 0")
        if self._grace_period is not None:
            return
        self._grace_period = grace_period
        if self._runner is not None:
            # Close the gate now, so calls that arrive before `serve` wakes up are rejected too.
            self._runner.begin_stopping()
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def graceful_stop(self, grace_period: float) -> None:
        """Stop serving, letting in-flight calls finish within ``grace_period`` seconds.

        The listening socket closes at once and new calls to the caller's services
        get UNAVAILABLE. Calls still running after the grace period are cancelled.
        Returns once `serve` has returned; returns at once if it is not running.

        Cancellation: cancelling this call stops the wait only; the stop goes on.
        """
        self.request_stop(grace_period)
        if self._stopped is not None:
            await self._stopped.wait()


def _check_byte_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} is invalid; expected int")
    if value < 1:
        raise ConfigError(f"{name}={value!r} is invalid; expected at least 1 byte")


def _call_directly(fn: _F) -> _F:
    """Return ``fn`` as it is: under asyncio the runner's coroutines need no adapter."""
    return fn


class _HostedServer(Server):
    """A grpclib `Server` that tracks its connections and can stop accepting alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = TunedH2Protocol.like(super()._protocol_factory())
        self._protocols.add(protocol)
        return protocol

    def bound_port(self) -> int:
        server = cast("asyncio.Server | None", self._server)
        if server is None or not server.sockets:
            raise RuntimeError("the server is not listening")
        return int(server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def open_connections(self) -> int:
        return sum(1 for protocol in self._protocols if _is_open(protocol))

    def close_connections(self) -> None:
        for protocol in list(self._protocols):
            if not _is_open(protocol):
                continue
            connection = protocol.connection
            try:
                # GOAWAY with NO_ERROR asks clients to open a new connection for later calls.
                connection._connection.close_connection()
                connection.flush()
            except h2.exceptions.ProtocolError:
                pass
            protocol.processor.close("server stopped")


def _is_open(protocol: H2Protocol) -> bool:
    connection = getattr(protocol, "connection", None)
    return connection is not None and not connection.is_closing()


class _AsyncioRunner:
    """The asyncio side of a host: every method runs on the asyncio loop."""

    def __init__(
        self,
        services: Collection[Servable],
        *,
        health: Health,
        max_message_bytes: int,
        max_request_bytes_in_flight: int,
        config: Configuration | None,
    ) -> None:
        self._services = services
        self._health = health
        self._max_message_bytes = max_message_bytes
        self._request_budget = _RequestBudget(max_request_bytes_in_flight)
        self._config = config
        self._server: _HostedServer | None = None
        self._stopping = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._rejected_while_stopping = 0
        self._rejected_oversized = 0
        self._trio_loop: asyncio.AbstractEventLoop | None = None

    def statistics(self) -> HostStatistics:
        server = self._server
        return HostStatistics(
            in_flight=self._in_flight,
            connections=server.open_connections() if server is not None else 0,
            rejected_while_stopping=self._rejected_while_stopping,
            rejected_oversized=self._rejected_oversized,
            rejected_over_budget=self._request_budget.rejected,
            request_bytes_in_flight=self._request_budget.bytes_in_flight,
        )

    async def start(self, host: str, port: int, *, under_trio: bool) -> int:
        if under_trio:
            self._trio_loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        standard = ServerReflection.extend([*self._services, self._health])[len(self._services) :]
        served: list[Servable] = [self._guarded(s, gated=True) for s in self._services]
        served += [self._guarded(s, gated=False) for s in standard]
        server = _HostedServer(served, config=self._config)
        try:
            await server.start(host, port)
        except OSError as exc:
            raise listen_error("gRPC", host, port, exc) from exc
        self._server = server
        return server.bound_port()

    def begin_stopping(self) -> None:
        """Reject new calls to the caller's services from now on (a plain flag, no I/O)."""
        self._stopping = True

    async def drain(self, grace_period: float) -> None:
        self._stopping = True
        server = self._server
        assert server is not None and self._idle is not None
        server.stop_accepting()
        if self._in_flight == 0:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), grace_period)
        except TimeoutError:
            logger.warning(
                "grpc.grace_period_expired grace_period=%.3g cancelling=%d",
                grace_period,
                self._in_flight,
            )

    async def close(self) -> None:
        self._stopping = True
        server = self._server
        if server is None:
            return
        try:
            server.close()
            await server.wait_closed()
        finally:
            server.close_connections()

    def _guarded(self, service: Servable, *, gated: bool) -> Servable:
        mapping = {
            name: Handler(
                self._guard_method(name, handler.func, gated=gated),
                handler.cardinality,
                handler.request_type,
                handler.reply_type,
            )
            for name, handler in service.__mapping__().items()
        }
        return _Mapped(mapping)

    def _guard_method(
        self, name: str, func: Callable[[Stream[Any, Any]], Awaitable[None]], *, gated: bool
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def guarded(stream: Stream[Any, Any]) -> None:
            if self._trio_loop is not None:
                _TRIO_HOST_LOOP.set(self._trio_loop)
            reader = self._cap_message_size(stream, name)
            try:
                await self._call_handler(stream, name, func, gated=gated)
            finally:
                reader.release_nowait()

        return guarded

    async def _call_handler(
        self,
        stream: Stream[Any, Any],
        name: str,
        func: Callable[[Stream[Any, Any]], Awaitable[None]],
        *,
        gated: bool,
    ) -> None:
        if not gated:
            await func(stream)
            return
        if self._stopping:
            self._rejected_while_stopping += 1
            logger.debug("rpc.rejected_stopping method=%s", name)
            raise GRPCError(
                Status.UNAVAILABLE, "the server is shutting down; retry on another server"
            )
        assert self._idle is not None
        self._in_flight += 1
        self._idle.clear()
        try:
            await func(stream)
        except asyncio.CancelledError:
            if self._stopping:
                await self._send_stopped_status(stream, name)
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _send_stopped_status(self, stream: Stream[Any, Any], method: str) -> None:
        """Tell the client of a call that the stop cancelled to retry elsewhere.

        Without this the client would see only the connection close and could not
        tell a server stop from a failure.
        """
        try:
            await stream.send_trailing_metadata(
                status=Status.UNAVAILABLE,
                status_message="the server stopped before the call finished; retry the call",
            )
        except (ProtocolError, h2.exceptions.StreamClosedError) as error:
            logger.debug("rpc.status_not_sent method=%s error=%r", method, error)

    def _cap_message_size(self, stream: Stream[Any, Any], method: str) -> _CappedReader:
        h2_stream = stream._stream
        reader = _CappedReader(
            h2_stream.recv_data,
            self._max_message_bytes,
            self._request_budget,
            stream=stream,
            method=method,
            on_reject=self._count,
        )
        # grpclib reads every message as recv_data(5) for the prefix, then
        # recv_data(length) for the body; the reader sits between the two.
        setattr(h2_stream, "recv_data", reader)  # noqa: B010 - assigning to a method
        return reader

    def _count(self) -> None:
        self._rejected_oversized += 1


class _Mapped:
    def __init__(self, mapping: Mapping[str, Handler]) -> None:
        self._mapping = dict(mapping)

    def __mapping__(self) -> Mapping[str, Handler]:
        return self._mapping


class _RequestBudget:
    """The request-message bytes that the calls on one host have reserved, and their maximum.

    Every method is synchronous, and the host's handlers all run on one asyncio
    loop, so a check and the reservation that follows it cannot interleave.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_in_flight = 0
        self.rejected = 0

    def try_reserve_nowait(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` and return True, or count a rejection and return False."""
        # An empty budget admits any one message, so a budget smaller than the
        # message size cap cannot reject a message forever.
        if self.bytes_in_flight > 0 and self.bytes_in_flight + nbytes > self.max_bytes:
            self.rejected += 1
            return False
        self.bytes_in_flight += nbytes
        return True

    def release_nowait(self, nbytes: int) -> None:
        self.bytes_in_flight -= nbytes
        assert self.bytes_in_flight >= 0, f"released {nbytes} bytes more than were reserved"


class _CappedReader:
    """Replace an h2 stream's ``recv_data`` to check each message's prefix before its body.

    The reader rejects a message longer than ``max_bytes``, and a message that
    does not fit in ``budget``. It keeps the budget reservation of the call's
    latest message until `release_nowait`, which the host calls when the call ends.
    """

    def __init__(
        self,
        read: Callable[[int], Awaitable[bytes]],
        max_bytes: int,
        budget: _RequestBudget,
        *,
        stream: Stream[Any, Any],
        method: str,
        on_reject: Callable[[], None],
    ) -> None:
        self._read = read
        self._max_bytes = max_bytes
        self._budget = budget
        self._stream = stream
        self._method = method
        self._on_reject = on_reject
        self._next_is_prefix = True
        self._reserved = 0

    def release_nowait(self) -> None:
        """Return this call's reserved bytes to the budget."""
        self._budget.release_nowait(self._reserved)
        self._reserved = 0

    async def __call__(self, size: int) -> bytes:
        if not self._next_is_prefix:
            self._next_is_prefix = True
            return await self._read(size)
        if size != _PREFIX.size:
            # A grpclib version that reads messages differently would bypass the cap.
            raise RuntimeError(
                f"grpclib read {size} bytes where a {_PREFIX.size}-byte message prefix was "
                "expected; the message size cap does not support this grpclib version"
            )
        data = await self._read(size)
        if len(data) < _PREFIX.size:
            return data  # end of stream
        compressed, length = _PREFIX.unpack(data)
        if compressed:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
        if length > self._max_bytes:
            self._on_reject()
            held_back = _size_rejections.allow_nowait(
                (f"{self._method} too large", Status.RESOURCE_EXHAUSTED), time.monotonic()
            )
            if held_back is not None:
                logger.info(
                    "rpc.message_too_large method=%s message_bytes=%d max_message_bytes=%d "
                    "held_back=%d",
                    self._method,
                    length,
                    self._max_bytes,
                    held_back,
                )
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"request message of {length} bytes is larger than the server's maximum of "
                f"{self._max_bytes} bytes; send smaller batches",
            )
        # A streaming handler has finished with its previous message once it reads
        # the next, so a call keeps the reservation of its latest message only.
        self.release_nowait()
        if not self._budget.try_reserve_nowait(length):
            await self._reject_over_budget(length)
        self._reserved = length
        self._next_is_prefix = False
        return data

    async def _reject_over_budget(self, length: int) -> None:
        """End the call with RESOURCE_EXHAUSTED and a retry hint, then raise to stop the handler."""
        in_flight = self._budget.bytes_in_flight
        max_in_flight = self._budget.max_bytes
        held_back = _size_rejections.allow_nowait(
            (f"{self._method} over budget", Status.RESOURCE_EXHAUSTED), time.monotonic()
        )
        if held_back is not None:
            logger.info(
                "rpc.request_budget_exceeded method=%s message_bytes=%d "
                "request_bytes_in_flight=%d max_request_bytes_in_flight=%d held_back=%d",
                self._method,
                length,
                in_flight,
                max_in_flight,
                held_back,
            )
        message = (
            f"request message of {length} bytes was rejected because {in_flight} bytes of "
            f"other request messages are in flight and the server's budget is "
            f"{max_in_flight} bytes; retry after {_OVER_BUDGET_RETRY_AFTER_MS} ms or send "
            "smaller messages"
        )
        # grpclib sends no custom trailing metadata for a raised GRPCError, so the
        # status is sent here. grpclib's Stream.__aexit__ then suppresses the
        # GRPCError raised below, because the trailers are already sent.
        try:
            await self._stream.send_trailing_metadata(
                status=Status.RESOURCE_EXHAUSTED,
                status_message=message,
                metadata={RETRY_AFTER_KEY: str(_OVER_BUDGET_RETRY_AFTER_MS)},
            )
        except (ProtocolError, h2.exceptions.StreamClosedError) as error:
            logger.debug("rpc.status_not_sent method=%s error=%r", self._method, error)
        raise GRPCError(Status.RESOURCE_EXHAUSTED, message)
