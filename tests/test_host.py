"""Tests of hosting a grpclib server on trio (through trio-asyncio) and on asyncio.

The tests serve an echo implementation of the Compute service on 127.0.0.1 and
call it with a grpclib client. grpclib is asyncio-only, so under trio the client
runs on its own trio-asyncio loop (see `asyncio_bridge`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sniffio
import torch
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

from slm_trio._proto.v1 import compute_grpc, compute_pb2, tensor_pb2
from slm_trio._status_map import ERROR_TYPE_KEY, RETRY_AFTER_KEY
from slm_trio.errors import ConfigError, ModelNotFoundError
from slm_trio.server._host import GrpcHost, run_in_owner
from slm_trio.server._status import handle_errors
from slm_trio.wire import decode_tensor, encode_tensor

pytestmark = pytest.mark.anyio

AsyncioCall = Callable[..., Awaitable[Any]]


class Hooks:
    """Events in the test's backend that the echo service's "block" model waits on."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = False

    async def block(self) -> None:
        self.entered.set()
        try:
            await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise


class EchoCompute(compute_grpc.ComputeBase):
    """Echoes hidden states; the model id selects a failure or a blocking call."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks

    @handle_errors
    async def Forward(self, stream: Any) -> None:
        request = await stream.recv_message()
        if request.model_id == "boom":
            raise KeyError("/secret/path/weights.bin")
        if request.model_id == "missing":
            raise ModelNotFoundError("model 'missing' not found; load it first")
        if request.model_id == "block":
            await run_in_owner(self.hooks.block)
        await stream.send_message(compute_pb2.ForwardResponse(hidden_states=request.hidden_states))

    @handle_errors
    async def Backward(self, stream: Any) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, "no backward in the echo service")

    @handle_errors
    async def Session(self, stream: Any) -> None:
        async for request in stream:
            kind = request.WhichOneof("kind")
            if kind == "open":
                reply = compute_pb2.SessionResponse(
                    opened=compute_pb2.SessionOpened(session_id="s-1", ttl_seconds=30)
                )
            elif kind == "step":
                reply = compute_pb2.SessionResponse(
                    step_result=compute_pb2.SessionStepResult(
                        step_index=request.step.step_index,
                        hidden_states=request.step.hidden_states,
                        cached_tokens=request.step.step_index + 1,
                    )
                )
            else:
                await stream.send_message(
                    compute_pb2.SessionResponse(closed=compute_pb2.SessionClosed(session_id="s-1"))
                )
                return
            await stream.send_message(reply)


@asynccontextmanager
async def asyncio_bridge() -> AsyncIterator[AsyncioCall]:
    """Yield ``call(fn, *args)``, which runs an asyncio coroutine function from this backend."""
    if sniffio.current_async_library() == "trio":
        import trio_asyncio

        async with trio_asyncio.open_loop():

            async def through_loop(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                return await trio_asyncio.aio_as_trio(fn)(*args)

            yield through_loop
    else:

        async def direct(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
            return await fn(*args)

        yield direct


@asynccontextmanager
async def serving(
    hooks: Hooks | None = None, **host_options: Any
) -> AsyncIterator[tuple[GrpcHost, AsyncioCall, anyio.abc.TaskGroup]]:
    """Serve the echo service; yield the host, an asyncio bridge and a task group."""
    host_options.setdefault("max_message_bytes", 1 << 20)
    host = GrpcHost([EchoCompute(hooks or Hooks())], **host_options)
    with anyio.fail_after(30):
        async with asyncio_bridge() as call, anyio.create_task_group() as task_group:
            await task_group.start(host.serve)
            yield host, call, task_group
            task_group.cancel_scope.cancel()


async def _forward(port: int, model_id: str, tensor: torch.Tensor) -> torch.Tensor:
    async with Channel("127.0.0.1", port) as channel:
        request = compute_pb2.ForwardRequest(model_id=model_id, hidden_states=encode_tensor(tensor))
        reply = await compute_grpc.ComputeStub(channel).Forward(request)
    return decode_tensor(reply.hidden_states, max_elements=1 << 20, name="hidden_states")


async def _forward_error(
    port: int, model_id: str, tensor: torch.Tensor | None = None
) -> tuple[GRPCError, dict[str, str]]:
    """Call Forward expecting an error; return it and the trailing metadata."""
    if tensor is None:
        tensor = torch.ones(1)
    async with Channel("127.0.0.1", port) as channel:
        request = compute_pb2.ForwardRequest(model_id=model_id, hidden_states=encode_tensor(tensor))
        try:
            async with compute_grpc.ComputeStub(channel).Forward.open() as stream:
                await stream.send_message(request, end=True)
                await stream.recv_message()
        except GRPCError as error:
            return error, dict(stream.trailing_metadata or {})
    raise AssertionError(f"Forward({model_id!r}) succeeded")


async def test_unary_roundtrip() -> None:
    hidden = torch.randn(2, 3, 8)  # [batch, seq, hidden]
    async with serving() as (host, call, _):
        echoed = await call(_forward, host.port, "m", hidden)
    assert torch.equal(echoed, hidden)


async def _session(port: int, steps: int) -> list[compute_pb2.SessionResponse]:
    replies = []
    async with Channel("127.0.0.1", port) as channel:
        async with compute_grpc.ComputeStub(channel).Session.open() as stream:
            await stream.send_message(
                compute_pb2.SessionRequest(open=compute_pb2.SessionOpen(model_id="m"))
            )
            replies.append(await stream.recv_message())
            for index in range(steps):
                step = compute_pb2.SessionStep(
                    step_index=index, hidden_states=encode_tensor(torch.full((1, 1, 4), index))
                )
                await stream.send_message(compute_pb2.SessionRequest(step=step))
                replies.append(await stream.recv_message())
            await stream.send_message(
                compute_pb2.SessionRequest(close=compute_pb2.SessionClose()), end=True
            )
            replies.append(await stream.recv_message())
            assert await stream.recv_message() is None
    return replies


async def test_bidi_session() -> None:
    async with serving() as (host, call, _):
        replies = await call(_session, host.port, 3)
    assert [r.WhichOneof("kind") for r in replies] == [
        "opened",
        "step_result",
        "step_result",
        "step_result",
        "closed",
    ]
    assert replies[0].opened.session_id == "s-1"
    for index, reply in enumerate(replies[1:4]):
        assert reply.step_result.step_index == index
        assert reply.step_result.cached_tokens == index + 1
        hidden = decode_tensor(reply.step_result.hidden_states, max_elements=16, name="h")
        assert torch.equal(hidden, torch.full((1, 1, 4), float(index)))


async def _health(port: int, service: str) -> int:
    async with Channel("127.0.0.1", port) as channel:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=service))
    return int(reply.status)


async def test_health_updates() -> None:
    hooks = Hooks()
    service = EchoCompute(hooks)
    status = ServiceStatus()
    health = Health({service: [status]})
    host = GrpcHost([service], health=health, max_message_bytes=1 << 20)
    with anyio.fail_after(30):
        async with asyncio_bridge() as call, anyio.create_task_group() as task_group:
            port = await task_group.start(host.serve)
            assert await call(_health, port, "slm_trio.v1.Compute") == HealthCheckResponse.UNKNOWN
            status.set(True)
            assert await call(_health, port, "slm_trio.v1.Compute") == HealthCheckResponse.SERVING
            assert await call(_health, port, "") == HealthCheckResponse.SERVING
            status.set(False)
            assert await call(_health, port, "") == HealthCheckResponse.NOT_SERVING
            task_group.cancel_scope.cancel()


async def _reflect(port: int, requests: list[ServerReflectionRequest]) -> list[Any]:
    async with Channel("127.0.0.1", port) as channel:
        async with ServerReflectionStub(channel).ServerReflectionInfo.open() as stream:
            replies = []
            for request in requests:
                await stream.send_message(request)
                replies.append(await stream.recv_message())
            await stream.end()
    return replies


async def test_reflection_lists_services() -> None:
    requests = [
        ServerReflectionRequest(list_services=""),
        ServerReflectionRequest(file_containing_symbol="slm_trio.v1.Compute"),
    ]
    async with serving() as (host, call, _):
        listing, symbol = await call(_reflect, host.port, requests)
    # grpclib's reflection lists the services it was given, not itself.
    names = {service.name for service in listing.list_services_response.service}
    assert names == {"slm_trio.v1.Compute", "grpc.health.v1.Health"}
    [raw] = symbol.file_descriptor_response.file_descriptor_proto
    descriptor = FileDescriptorProto.FromString(raw)
    assert descriptor.name == "slm_trio/_proto/v1/compute.proto"
    assert [s.name for s in descriptor.service] == ["Compute"]


async def test_oversized_rejected_keeps_serving() -> None:
    oversized = torch.zeros(2 << 20, dtype=torch.uint8).view(torch.float32)  # 2 MiB of data
    async with serving(max_message_bytes=1 << 20) as (host, call, _):
        error, _ = await call(_forward_error_with_tensor, host.port, oversized)
        assert error.status == Status.RESOURCE_EXHAUSTED
        assert "larger than the server's maximum of 1048576 bytes" in (error.message or "")
        assert host.statistics().rejected_oversized == 1
        small = torch.arange(4.0)
        assert torch.equal(await call(_forward, host.port, "m", small), small)


async def test_oversized_log_lines_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slm_trio.server import _host
    from slm_trio.server._status import RejectionLogLimiter

    monkeypatch.setattr(_host, "_size_rejections", RejectionLogLimiter(3600.0))
    caplog.set_level(logging.INFO, logger="slm_trio.server._host")
    oversized = torch.zeros(2 << 20, dtype=torch.uint8).view(torch.float32)  # 2 MiB of data
    async with serving(max_message_bytes=1 << 20) as (host, call, _):
        for _ in range(3):
            error, _ = await call(_forward_error_with_tensor, host.port, oversized)
            assert error.status == Status.RESOURCE_EXHAUSTED
        assert host.statistics().rejected_oversized == 3
    lines = [r.getMessage() for r in caplog.records if "rpc.message_too_large" in r.getMessage()]
    assert len(lines) == 1
    assert "method=/slm_trio.v1.Compute/Forward " in lines[0]
    assert "held_back=0" in lines[0]


async def test_message_cap_boundary() -> None:
    tensor = torch.ones(64)
    request = compute_pb2.ForwardRequest(model_id="m", hidden_states=encode_tensor(tensor))
    async with serving(max_message_bytes=request.ByteSize()) as (host, call, _):
        assert torch.equal(await call(_forward, host.port, "m", tensor), tensor)
        # One byte longer: the model id grows from "m" to "mm".
        error, _ = await call(_forward_error_with_tensor, host.port, tensor, "mm")
    assert error.status == Status.RESOURCE_EXHAUSTED


def _request_bytes(model_id: str, tensor: torch.Tensor) -> int:
    """Return the size of the Forward request message, as its gRPC prefix declares it."""
    request = compute_pb2.ForwardRequest(model_id=model_id, hidden_states=encode_tensor(tensor))
    return request.ByteSize()


async def _wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds; the caller's `fail_after` bounds the wait."""
    while not predicate():
        await anyio.sleep(0.01)


async def test_request_budget_rejects_concurrent() -> None:
    hooks = Hooks()
    tensor = torch.ones(10_000)  # 40 kB of float32 data
    held_bytes = _request_bytes("block", tensor)
    budget = held_bytes + 1000
    results: dict[str, Any] = {}
    finished = anyio.Event()
    async with serving(hooks, max_request_bytes_in_flight=budget) as (host, call, task_group):
        port = host.port

        async def in_flight() -> None:
            results["echo"] = await call(_forward, port, "block", tensor)
            finished.set()

        task_group.start_soon(in_flight)
        await hooks.entered.wait()
        assert host.statistics().request_bytes_in_flight == held_bytes

        error, metadata = await call(_forward_error, port, "m", tensor)
        assert error.status == Status.RESOURCE_EXHAUSTED
        message = error.message or ""
        assert f"request message of {_request_bytes('m', tensor)} bytes" in message
        assert f"{held_bytes} bytes of other request messages are in flight" in message
        assert f"the server's budget is {budget} bytes" in message
        assert "retry after 1000 ms or send smaller messages" in message
        assert metadata[RETRY_AFTER_KEY] == "1000"
        statistics = host.statistics()
        assert statistics.rejected_over_budget == 1
        assert statistics.rejected_oversized == 0
        assert statistics.request_bytes_in_flight == held_bytes

        hooks.release.set()
        await finished.wait()
        assert torch.equal(results["echo"], tensor)
        assert host.statistics().request_bytes_in_flight == 0
        # With the first call's bytes released, the same message now fits.
        assert torch.equal(await call(_forward, port, "m", tensor), tensor)
        assert host.statistics().rejected_over_budget == 1


async def test_request_budget_admits_lone_message() -> None:
    tensor = torch.ones(10_000)  # 40 kB, larger than the whole budget
    async with serving(max_request_bytes_in_flight=1024) as (host, call, _):
        assert torch.equal(await call(_forward, host.port, "m", tensor), tensor)
        statistics = host.statistics()
    assert statistics.rejected_over_budget == 0
    assert statistics.request_bytes_in_flight == 0


async def test_request_budget_stream_holds_latest() -> None:
    # Each step message is below the budget, and ten of them are well above it.
    step_bytes = compute_pb2.SessionRequest(
        step=compute_pb2.SessionStep(
            step_index=9, hidden_states=encode_tensor(torch.full((1, 1, 4), 9))
        )
    ).ByteSize()
    budget = 3 * step_bytes
    async with serving(max_request_bytes_in_flight=budget) as (host, call, _):
        replies = await call(_session, host.port, 10)
        statistics = host.statistics()
    assert [r.WhichOneof("kind") for r in replies].count("step_result") == 10
    assert statistics.rejected_over_budget == 0
    assert statistics.request_bytes_in_flight == 0


async def test_request_budget_released_on_failure() -> None:
    tensor = torch.ones(1000)
    oversized = torch.ones(300_000)  # 1.2 MB, over the 1 MiB message cap
    # A budget below one message: a leaked reservation would reject every later call.
    async with serving(max_request_bytes_in_flight=1024) as (host, call, _):
        for model_id, status in [
            ("boom", Status.INTERNAL),
            ("missing", Status.NOT_FOUND),
        ]:
            error, _ = await call(_forward_error, host.port, model_id, tensor)
            assert error.status == status
            assert host.statistics().request_bytes_in_flight == 0, model_id
        error, _ = await call(_forward_error, host.port, "m", oversized)
        assert error.status == Status.RESOURCE_EXHAUSTED
        assert torch.equal(await call(_forward, host.port, "m", tensor), tensor)
        statistics = host.statistics()
    assert statistics.rejected_oversized == 1
    assert statistics.request_bytes_in_flight == 0


async def test_request_budget_released_on_client_cancel() -> None:
    hooks = Hooks()
    tensor = torch.ones(1000)
    # A budget below one message: a leaked reservation would reject every later call.
    async with serving(hooks, max_request_bytes_in_flight=1024) as (host, call, task_group):
        port = host.port
        client_scope = anyio.CancelScope()

        async def in_flight() -> None:
            with client_scope:
                await call(_forward, port, "block", tensor)

        task_group.start_soon(in_flight)
        await hooks.entered.wait()
        assert host.statistics().request_bytes_in_flight == _request_bytes("block", tensor)

        client_scope.cancel()
        await _wait_until(lambda: host.statistics().in_flight == 0)
        assert hooks.cancelled
        assert host.statistics().request_bytes_in_flight == 0
        assert torch.equal(await call(_forward, port, "m", tensor), tensor)
        assert host.statistics().request_bytes_in_flight == 0


async def _forward_error_with_tensor(
    port: int, tensor: torch.Tensor, model_id: str = "m"
) -> tuple[GRPCError, None]:
    async with Channel("127.0.0.1", port) as channel:
        request = compute_pb2.ForwardRequest(model_id=model_id, hidden_states=encode_tensor(tensor))
        try:
            await compute_grpc.ComputeStub(channel).Forward(request)
        except GRPCError as error:
            return error, None
    raise AssertionError("the oversized request succeeded")


async def test_unexpected_error_internal() -> None:
    async with serving() as (host, call, _):
        error, metadata = await call(_forward_error, host.port, "boom")
    assert error.status == Status.INTERNAL
    assert error.message is not None
    assert error.message.startswith("internal server error (error id ")
    assert "secret" not in error.message
    assert ERROR_TYPE_KEY not in metadata


async def test_mapped_error_metadata() -> None:
    async with serving() as (host, call, _):
        error, metadata = await call(_forward_error, host.port, "missing")
    assert error.status == Status.NOT_FOUND
    assert error.message == "model 'missing' not found; load it first"
    assert metadata[ERROR_TYPE_KEY] == "ModelNotFoundError"


async def test_graceful_stop_finishes_in_flight() -> None:
    hooks = Hooks()
    results: dict[str, Any] = {}
    hidden = torch.arange(6.0).reshape(1, 2, 3)
    async with serving(hooks) as (host, call, task_group):
        port = host.port
        # A connection opened before the stop, to send a call during the stop.
        channel: Channel = await call(_open_channel, port)
        assert torch.equal(await call(_forward_on, channel, hidden), hidden)

        async def in_flight() -> None:
            results["echo"] = await call(_forward, port, "block", hidden)

        task_group.start_soon(in_flight)
        await hooks.entered.wait()
        assert host.statistics().in_flight == 1

        stopped = anyio.Event()

        async def stop() -> None:
            await host.graceful_stop(grace_period=60)
            stopped.set()

        host.request_stop(grace_period=60)
        task_group.start_soon(stop)
        with pytest.raises(GRPCError) as rejected:
            await call(_forward_on, channel, hidden)
        assert rejected.value.status == Status.UNAVAILABLE
        assert host.statistics().rejected_while_stopping == 1
        assert not stopped.is_set()

        hooks.release.set()
        await stopped.wait()
        assert torch.equal(results["echo"], hidden)
        assert not hooks.cancelled
        with pytest.raises(OSError):
            await call(_forward, port, "m", hidden)
        channel.close()


async def test_grace_expiry_cancels() -> None:
    hooks = Hooks()
    results: dict[str, Any] = {}
    async with serving(hooks) as (host, call, task_group):
        port = host.port

        async def in_flight() -> None:
            results["error"] = await call(_forward_error, port, "block")

        task_group.start_soon(in_flight)
        await hooks.entered.wait()
        await host.graceful_stop(grace_period=0)
        assert hooks.cancelled
        # The client task may still be reading the status; the task group waits for it.
    error, _ = results["error"]
    assert error.status == Status.UNAVAILABLE
    assert "the server stopped before the call finished" in (error.message or "")


async def test_cancel_scope_closes() -> None:
    hooks = Hooks()
    results: dict[str, Any] = {}
    host = GrpcHost([EchoCompute(hooks)], max_message_bytes=1 << 20)
    with anyio.fail_after(30):
        async with asyncio_bridge() as call, anyio.create_task_group() as outer:
            async with anyio.create_task_group() as server_group:
                port = await server_group.start(host.serve)

                async def in_flight() -> None:
                    results["error"] = await call(_forward_error, port, "block")

                outer.start_soon(in_flight)
                await hooks.entered.wait()
                server_group.cancel_scope.cancel()
            assert hooks.cancelled
            assert repr(host) == f"<GrpcHost 127.0.0.1:{port} stopped>"
            with pytest.raises(OSError):
                await call(_forward, port, "m", torch.ones(1))
    error, _ = results["error"]
    assert error.status == Status.UNAVAILABLE


async def test_idle_connection_closed_on_stop() -> None:
    async with serving() as (host, call, _task_group):
        channel: Channel = await call(_open_channel, host.port)
        try:
            assert torch.equal(await call(_forward_on, channel, torch.ones(2)), torch.ones(2))
            assert host.statistics().connections == 1
            await host.graceful_stop(grace_period=5)
            # An open connection would still serve calls after grpclib's Server.close().
            # The host closed it: the call fails on the lost connection, or on
            # reconnecting if the channel has already noticed the loss.
            with pytest.raises((OSError, StreamTerminatedError)):
                await call(_forward_on, channel, torch.ones(2))
        finally:
            channel.close()


async def _open_channel(port: int) -> Channel:
    return Channel("127.0.0.1", port)


async def _forward_on(channel: Channel, tensor: torch.Tensor) -> torch.Tensor:
    request = compute_pb2.ForwardRequest(model_id="m", hidden_states=encode_tensor(tensor))
    reply = await compute_grpc.ComputeStub(channel).Forward(request)
    return decode_tensor(reply.hidden_states, max_elements=1 << 20, name="hidden_states")


async def test_stop_requested_before_serve() -> None:
    host = GrpcHost([EchoCompute(Hooks())], max_message_bytes=1024)
    host.request_stop(grace_period=0)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as task_group:
            port = await task_group.start(host.serve)
        # The task group exits only because serve returned on its own.
    assert repr(host) == f"<GrpcHost 127.0.0.1:{port} stopped>"


async def test_serve_once() -> None:
    async with serving() as (host, _, _task_group):
        with pytest.raises(RuntimeError, match="already served"):
            await host.serve()


async def test_run_in_owner_direct() -> None:
    async def add(a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a + b

    assert await run_in_owner(add, 2, 3) == 5


async def test_bind_failure() -> None:
    async with serving() as (host, _, _task_group):
        second = GrpcHost([EchoCompute(Hooks())], port=host.port, max_message_bytes=1024)
        with pytest.raises(OSError, match="address already in use"):
            await second.serve()


def test_host_repr_and_port() -> None:
    host = GrpcHost([EchoCompute(Hooks())], port=0, max_message_bytes=1024)
    assert repr(host) == "<GrpcHost 127.0.0.1:0 not started>"
    with pytest.raises(RuntimeError, match="unknown until serve"):
        _ = host.port
    assert host.statistics().in_flight == 0


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"max_message_bytes": 0}, r"max_message_bytes=0 is invalid"),
        ({"max_message_bytes": 1.5}, r"max_message_bytes=1\.5 is invalid"),
        ({"max_message_bytes": 1024, "close_timeout": 0}, r"close_timeout=0 is invalid"),
        (
            {"max_message_bytes": 1024, "max_request_bytes_in_flight": 0},
            r"max_request_bytes_in_flight=0 is invalid",
        ),
    ],
)
def test_host_invalid_options(options: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        GrpcHost([], **options)


def test_request_stop_invalid() -> None:
    host = GrpcHost([], max_message_bytes=1024)
    with pytest.raises(ConfigError, match=r"grace_period=-1 is invalid"):
        host.request_stop(-1)


# A server in its own process, so that its peak RSS shows only what serving cost.
_RSS_SERVER = textwrap.dedent(
    """
    import json, resource, sys
    import anyio
    sys.path.insert(0, {tests_dir!r})
    from test_host import EchoCompute, Hooks
    from slm_trio.server._host import GrpcHost

    async def main():
        host = GrpcHost([EchoCompute(Hooks())], max_message_bytes={max_bytes})
        async with anyio.create_task_group() as task_group:
            port = await task_group.start(host.serve)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({{"port": port}}), flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            stats = host.statistics()
            print(json.dumps({{"peak_kib_before": before, "peak_kib_after": after,
                              "rejected": stats.rejected_oversized}}), flush=True)
            await host.graceful_stop(5)

    anyio.run(main, backend={backend!r})
    """
)


def _rss_client(port: int, payload_bytes: int) -> tuple[str, bool]:
    """Send an oversized request, then a small one; return the status and the echo check."""
    import asyncio

    async def main() -> tuple[str, bool]:
        async with Channel("127.0.0.1", port) as channel:
            stub = compute_grpc.ComputeStub(channel)
            big = compute_pb2.ForwardRequest(
                model_id="m", hidden_states=tensor_pb2.Tensor(data=bytes(payload_bytes))
            )
            try:
                await stub.Forward(big)
                status = "OK"
            except GRPCError as error:
                status = error.status.name
            small = compute_pb2.ForwardRequest(
                model_id="m", hidden_states=encode_tensor(torch.ones(3))
            )
            reply = await stub.Forward(small)
            return status, len(reply.hidden_states.data) == 12

    return asyncio.run(main())


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_oversized_server_memory(backend: str) -> None:
    payload = 256 << 20
    script = _RSS_SERVER.format(
        tests_dir=os.path.dirname(__file__), max_bytes=1 << 20, backend=backend
    )
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        assert server.stdin is not None and server.stdout is not None
        try:
            port = json.loads(server.stdout.readline())["port"]
            status, served_after = _rss_client(port, payload)
            server.stdin.write("\n")
            server.stdin.flush()
            report = json.loads(server.stdout.readline())
        finally:
            server.stdin.close()
            returncode = server.wait(timeout=60)
    assert status == "RESOURCE_EXHAUSTED"
    assert served_after
    assert report["rejected"] == 1
    assert returncode == 0
    growth_mib = (report["peak_kib_after"] - report["peak_kib_before"]) / 1024
    # The 4 MiB HTTP/2 windows bound what the server buffers before it rejects.
    assert growth_mib < 32, f"server peak RSS grew by {growth_mib:.1f} MiB"
