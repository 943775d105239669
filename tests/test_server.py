"""Integration tests of AsyncManagedServer and AsyncGRPCComputeServer on 127.0.0.1.

Each test starts a real server in its own task group and calls it with a real
grpclib client, on trio (server and client through trio-asyncio) and on
asyncio. Models are tiny: plain modules from a fake loader, and real trunk
parts of a tiny Llama saved by a fixture and loaded by the real loader.
Blocking models wait on `threading.Event`s, so no test depends on timing.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import sniffio
import torch
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest
from torch import nn

from slm_trio._proto.v1 import compute_grpc, compute_pb2, management_grpc, management_pb2
from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.errors import ComputeInterruptedError, ModelCapacityError, ServerStartError
from slm_trio.loading import load_model
from slm_trio.server import AsyncGRPCComputeServer, AsyncManagedServer, AsyncModelComputeFunction
from slm_trio.wire import decode_tensor, encode_tensor, model_config_to_proto

pytestmark = pytest.mark.anyio

Call = Callable[..., Awaitable[Any]]


class Scale(nn.Module):
    """Multiplies hidden states by a constant, so a reply shows which model ran."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.factor


class Blocking(nn.Module):
    """Waits for `release` before returning its input; `entered` is set when it starts."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.release.wait(30)
        return hidden.clone()


class Models:
    """The fake loader's models, and gates that hold loads back."""

    def __init__(self) -> None:
        self.blocking = Blocking()
        self.load_gates: dict[str, threading.Event] = {}
        # Models built by a test, by model_path.
        self.preloaded: dict[str, Any] = {}

    def loader(self, config: ModelConfig, progress: Callable[[float], None]) -> Any:
        path = config.model_path
        if path in self.preloaded:
            return self.preloaded[path]
        if not path.startswith("fake:"):
            return load_model(config, progress)
        gate = self.load_gates.get(config.model_id)
        if gate is not None:
            progress(0.5)
            gate.wait(30)
        name = path.removeprefix("fake:")
        if name == "blocking":
            return self.blocking
        if name == "identity":
            return nn.Identity()
        return Scale(float(name))


def fake(model_id: str, name: str) -> ModelConfig:
    return ModelConfig(model_id=model_id, model_path=f"fake:{name}")


def trunk_config(model_dir: Path, model_id: str = "llama-trunk", layers=(1, 3)) -> ModelConfig:
    return ModelConfig(model_id=model_id, model_path=str(model_dir), part="trunk", layers=layers)


@asynccontextmanager
async def client_bridge() -> AsyncIterator[Call]:
    """Yield ``call(fn, *args)``, which runs an asyncio client coroutine from this backend."""
    if sniffio.current_async_library() == "trio":
        import trio_asyncio

        async with trio_asyncio.open_loop():

            async def through_loop(fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
                return await trio_asyncio.aio_as_trio(functools.partial(fn, **kw))(*args)

            yield through_loop
    else:

        async def direct(fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
            # grpclib cancels the calling task natively at a deadline or on
            # stream.cancel() and never uncancels it. That would break the test
            # task's anyio cancel scopes, so each call gets a task of its own.
            return await asyncio.ensure_future(fn(*args, **kw))

        yield direct


@asynccontextmanager
async def managed(models: Models, **options: Any) -> AsyncIterator[tuple[AsyncManagedServer, Call]]:
    """Serve a managed server on a free loopback port; yield it and a client bridge."""
    options.setdefault("port", 0)
    options.setdefault("grace_period", 5.0)
    server = AsyncManagedServer(ServerConfig(**options), loader=models.loader)
    with anyio.fail_after(120):
        async with client_bridge() as call, server:
            yield server, call


# -- client coroutines (asyncio side) ------------------------------------------------------


async def forward(
    port: int,
    model_id: str,
    hidden: torch.Tensor,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 - grpclib's own per-call deadline
    **tensors: torch.Tensor,
) -> torch.Tensor:
    async with Channel("127.0.0.1", port) as channel:
        request = compute_pb2.ForwardRequest(model_id=model_id, hidden_states=encode_tensor(hidden))
        for name, tensor in tensors.items():
            getattr(request, name).CopyFrom(encode_tensor(tensor))
        reply = await compute_grpc.ComputeStub(channel).Forward(request, timeout=timeout)
    return decode_tensor(reply.hidden_states, max_elements=1 << 24, name="hidden_states")


async def slow_forward(port: int, model_id: str, hidden: torch.Tensor) -> torch.Tensor:
    """Forward with a 0.2 s deadline, to a model that blocks until the test releases it."""
    return await forward(port, model_id, hidden, timeout=0.2)


async def expect_error(
    port: int, method: str, request: Any, stub: str = "compute"
) -> tuple[Status, str, dict[str, str]]:
    """Call a unary method expecting an error; return its status, message and metadata."""
    async with Channel("127.0.0.1", port) as channel:
        if stub == "compute":
            service: Any = compute_grpc.ComputeStub(channel)
        else:
            service = management_grpc.ManagementStub(channel)
        stream = getattr(service, method).open()
        try:
            async with stream:
                await stream.send_message(request, end=True)
                await stream.recv_message()
        except GRPCError as error:
            return error.status, error.message or "", dict(stream.trailing_metadata or {})
    raise AssertionError(f"{method} succeeded")


async def list_models(port: int) -> dict[str, management_pb2.ModelInfo]:
    async with Channel("127.0.0.1", port) as channel:
        reply = await management_grpc.ManagementStub(channel).List(management_pb2.ListRequest())
    return {m.model_id: m for m in reply.models}


async def load(
    port: int, config: ModelConfig, wait: bool, replace: bool = False
) -> management_pb2.ModelInfo:
    async with Channel("127.0.0.1", port) as channel:
        reply = await management_grpc.ManagementStub(channel).Load(
            management_pb2.LoadRequest(
                config=model_config_to_proto(config), wait=wait, replace=replace
            )
        )
    return reply.model


async def describe(port: int, model_id: str) -> management_pb2.DescribeResponse:
    async with Channel("127.0.0.1", port) as channel:
        return await management_grpc.ManagementStub(channel).Describe(
            management_pb2.DescribeRequest(model_id=model_id)
        )


async def health(port: int, service: str) -> Any:
    async with Channel("127.0.0.1", port) as channel:
        try:
            reply = await HealthStub(channel).Check(HealthCheckRequest(service=service))
        except GRPCError as error:
            return error.status
    return reply.status


async def session_run(
    port: int,
    model_id: str,
    chunks: list[torch.Tensor],
    *,
    close: bool = True,
    resume: str | None = None,
    first_step: int = 0,
) -> tuple[compute_pb2.SessionOpened, list[torch.Tensor]]:
    """Open (or resume) a session, send one step per chunk, then close it if ``close``."""
    outputs = []
    async with Channel("127.0.0.1", port) as channel:
        async with compute_grpc.ComputeStub(channel).Session.open() as stream:
            open_message = compute_pb2.SessionOpen(model_id=model_id)
            if resume is not None:
                open_message.resume_session_id = resume
            await stream.send_message(compute_pb2.SessionRequest(open=open_message))
            opened = (await stream.recv_message()).opened
            start = opened.cached_tokens
            for index, chunk in enumerate(chunks):
                length = chunk.shape[1]
                positions = torch.arange(start, start + length).unsqueeze(0)
                step = compute_pb2.SessionStep(
                    step_index=first_step + index,
                    hidden_states=encode_tensor(chunk),
                    position_ids=encode_tensor(positions),
                )
                await stream.send_message(compute_pb2.SessionRequest(step=step))
                reply = await stream.recv_message()
                outputs.append(
                    decode_tensor(reply.step_result.hidden_states, max_elements=1 << 20, name="h")
                )
                start += length
            if close:
                await stream.send_message(
                    compute_pb2.SessionRequest(close=compute_pb2.SessionClose()), end=True
                )
                reply = await stream.recv_message()
                assert reply.WhichOneof("kind") == "closed"
            else:
                await stream.end()
                await stream.cancel()
    return opened, outputs


async def session_error(
    port: int, requests: list[compute_pb2.SessionRequest]
) -> tuple[Status, str]:
    """Send session requests one by one until the server ends the stream with an error."""
    async with Channel("127.0.0.1", port) as channel:
        try:
            async with compute_grpc.ComputeStub(channel).Session.open() as stream:
                for request in requests:
                    await stream.send_message(request)
                    await stream.recv_message()
                await stream.end()
                await stream.recv_message()
        except GRPCError as error:
            return error.status, error.message or ""
    raise AssertionError("the session ended without an error")


# -- routing, dtypes, management --------------------------------------------------------


async def test_requests_reach_named_model() -> None:
    models = Models()
    async with managed(models) as (server, call):
        await server.load_model(fake("double", "2"))
        await server.load_model(fake("triple", "3"))
        hidden = torch.randn(2, 3, 4)  # [batch, seq, hidden]

        doubled = await call(forward, server.port, "double", hidden)
        tripled = await call(forward, server.port, "triple", hidden)

        assert torch.allclose(doubled, hidden * 2)
        assert torch.allclose(tripled, hidden * 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_dtype_round_trip_exact(dtype: torch.dtype, tiny_model_dirs: dict[str, Path]) -> None:
    models = Models()
    async with managed(models) as (server, call):
        await server.load_model(fake("identity", "identity"))
        # A trunk with no layers is the identity, through the real split engine.
        await server.load_model(trunk_config(tiny_model_dirs["llama"], "empty-trunk", (2, 2)))
        hidden = torch.randn(1, 5, 32).to(dtype)

        for model_id in ("identity", "empty-trunk"):
            echoed = await call(forward, server.port, model_id, hidden)
            assert echoed.dtype == dtype
            assert torch.equal(echoed, hidden)


async def test_trunk_forward_matches_in_process(tiny_model_dirs: dict[str, Path]) -> None:
    models = Models()
    config = trunk_config(tiny_model_dirs["llama"])
    part = load_model(config)
    async with managed(models) as (server, call):
        await server.load_model(config)
        hidden = torch.randn(2, 6, 32)

        remote = await call(forward, server.port, "llama-trunk", hidden)

        with torch.inference_mode():
            local = part(hidden)
        assert torch.allclose(remote, local, atol=1e-6)


async def test_backward_returns_input_gradient(tiny_model_dirs: dict[str, Path]) -> None:
    models = Models()
    config = trunk_config(tiny_model_dirs["llama"])
    part = load_model(config)
    hidden = torch.randn(1, 4, 32)
    grad_output = torch.randn(1, 4, 32)

    async def backward(port: int) -> torch.Tensor:
        async with Channel("127.0.0.1", port) as channel:
            reply = await compute_grpc.ComputeStub(channel).Backward(
                compute_pb2.BackwardRequest(
                    model_id="llama-trunk",
                    hidden_states=encode_tensor(hidden),
                    grad_output=encode_tensor(grad_output),
                )
            )
        return decode_tensor(reply.grad_input, max_elements=1 << 20, name="grad_input")

    async with managed(models) as (server, call):
        await server.load_model(config)
        remote = await call(backward, server.port)

    local_input = hidden.clone().requires_grad_(True)
    part(local_input).backward(grad_output)
    assert local_input.grad is not None
    assert torch.allclose(remote, local_input.grad, atol=1e-5)


async def test_describe_reports_trunk_facts(tiny_model_dirs: dict[str, Path]) -> None:
    async with managed(Models()) as (server, call):
        await server.load_model(trunk_config(tiny_model_dirs["llama"]))
        reply = await call(describe, server.port, "llama-trunk")
    assert reply.model.state == management_pb2.MODEL_STATE_READY
    assert reply.facts.model_type == "llama"
    assert (reply.facts.layer_start, reply.facts.layer_stop) == (1, 3)
    assert reply.facts.num_hidden_layers == 4
    assert reply.facts.hidden_size == 32
    assert reply.limits.max_message_bytes == ServerConfig().max_message_bytes
    assert reply.limits.max_request_tokens == ServerConfig().max_request_tokens


async def test_list_and_health_answer_during_load() -> None:
    models = Models()
    gate = models.load_gates["slow"] = threading.Event()
    async with managed(models) as (server, call):
        info = await call(load, server.port, fake("slow", "2"), False)
        assert info.state == management_pb2.MODEL_STATE_LOADING

        # While the load runs, listing, health and other requests get responses.
        listed = await call(list_models, server.port)
        assert listed["slow"].state == management_pb2.MODEL_STATE_LOADING
        assert await call(health, server.port, "") == HealthCheckResponse.SERVING
        assert await call(health, server.port, "slow") == HealthCheckResponse.NOT_SERVING
        assert await call(health, server.port, "nope") == Status.NOT_FOUND
        status, message, metadata = await call(
            expect_error,
            server.port,
            "Forward",
            compute_pb2.ForwardRequest(
                model_id="slow", hidden_states=encode_tensor(torch.ones(1, 1, 2))
            ),
        )
        assert status == Status.UNAVAILABLE
        assert "'slow' is still loading" in message
        assert int(metadata["retry-after-ms"]) > 0

        gate.set()
        while (await call(list_models, server.port))[
            "slow"
        ].state != management_pb2.MODEL_STATE_READY:
            await anyio.sleep(0.01)
        assert await call(health, server.port, "slow") == HealthCheckResponse.SERVING


async def test_load_and_unload_over_wire() -> None:
    async with managed(Models()) as (server, call):
        info = await call(load, server.port, fake("m", "4"), True)
        assert info.state == management_pb2.MODEL_STATE_READY
        assert torch.equal(
            await call(forward, server.port, "m", torch.ones(1, 1, 2)), 4 * torch.ones(1, 1, 2)
        )

        async def unload(port: int) -> None:
            async with Channel("127.0.0.1", port) as channel:
                await management_grpc.ManagementStub(channel).Unload(
                    management_pb2.UnloadRequest(model_id="m")
                )

        await call(unload, server.port)
        assert await call(list_models, server.port) == {}


async def test_load_with_replace_swaps_model() -> None:
    models = Models()
    ones = torch.ones(1, 1, 2)
    async with managed(models) as (server, call):
        await call(load, server.port, fake("m", "2"), True)

        # Without replace, another config for a READY id is a conflict.
        status, message, _ = await call(
            expect_error,
            server.port,
            "Load",
            management_pb2.LoadRequest(config=model_config_to_proto(fake("m", "3")), wait=True),
            "management",
        )
        assert status == Status.ALREADY_EXISTS
        assert "Load request with replace set" in message

        info = await call(load, server.port, fake("m", "3"), True, True)
        assert info.state == management_pb2.MODEL_STATE_READY
        assert torch.equal(await call(forward, server.port, "m", ones), 3 * ones)

        # A reload that has not finished leaves the old model serving.
        gate = models.load_gates["m"] = threading.Event()
        info = await call(load, server.port, fake("m", "5"), False, True)
        assert info.state == management_pb2.MODEL_STATE_READY
        assert torch.equal(await call(forward, server.port, "m", ones), 3 * ones)
        gate.set()
        while not torch.equal(await call(forward, server.port, "m", ones), 5 * ones):
            await anyio.sleep(0.01)

        # A failed reload keeps the old model.
        broken = ModelConfig(model_id="m", model_path="/nonexistent/model.gguf")
        status, message, _ = await call(
            expect_error,
            server.port,
            "Load",
            management_pb2.LoadRequest(
                config=model_config_to_proto(broken), wait=True, replace=True
            ),
            "management",
        )
        assert status != Status.OK
        assert "/nonexistent/model.gguf" in message
        assert torch.equal(await call(forward, server.port, "m", ones), 5 * ones)
        assert (await call(list_models, server.port))["m"].state == management_pb2.MODEL_STATE_READY


async def test_failed_load_reported_with_reason() -> None:
    async with managed(Models()) as (server, call):
        config = ModelConfig(model_id="broken", model_path="/nonexistent/model.gguf")
        status, message, _ = await call(
            expect_error,
            server.port,
            "Load",
            management_pb2.LoadRequest(config=model_config_to_proto(config), wait=True),
            "management",
        )
        assert status in (Status.FAILED_PRECONDITION, Status.NOT_FOUND, Status.INVALID_ARGUMENT)
        assert "/nonexistent/model.gguf" in message
        listed = await call(list_models, server.port)
        assert listed["broken"].state == management_pb2.MODEL_STATE_FAILED
        assert "/nonexistent/model.gguf" in listed["broken"].reason


async def test_reflection_lists_our_services() -> None:
    async def services(port: int) -> list[str]:
        async with Channel("127.0.0.1", port) as channel:
            stub = ServerReflectionStub(channel)
            async with stub.ServerReflectionInfo.open() as stream:
                await stream.send_message(ServerReflectionRequest(list_services=""), end=True)
                reply = await stream.recv_message()
        return [s.name for s in reply.list_services_response.service]

    async with managed(Models()) as (server, call):
        names = await call(services, server.port)
    assert "slm_trio.v1.Compute" in names
    assert "slm_trio.v1.Management" in names
    assert "grpc.health.v1.Health" in names


# -- deadlines and stopping ----------------------------------------------------------------


async def test_deadline_cancels_slow_compute() -> None:
    models = Models()
    async with managed(models) as (server, call):
        await server.load_model(fake("blocking", "blocking"))

        # grpclib's client raises TimeoutError at its own deadline, or the
        # server's DEADLINE_EXCEEDED if that arrives first.
        with pytest.raises((GRPCError, TimeoutError)) as info:
            await call(slow_forward, server.port, "blocking", torch.ones(1, 1, 2))
        if isinstance(info.value, GRPCError):
            assert info.value.status == Status.DEADLINE_EXCEEDED

        # The handler is gone and the lease dropped, although the thread still runs.
        assert models.blocking.entered.is_set()
        while server.host_statistics().in_flight:
            await anyio.sleep(0.01)
        assert server.manager.get_info("blocking").active_leases == 0
        models.blocking.release.set()

        # The server keeps serving.
        await server.load_model(fake("double", "2"))
        assert torch.equal(
            await call(forward, server.port, "double", torch.ones(1, 1, 2)), 2 * torch.ones(1, 1, 2)
        )


class GatedLayer(nn.Module):
    """Runs ``layer`` once ``release`` is set; ``entered`` is set when the call starts."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.entered = threading.Event()
        self.release = threading.Event()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.release.wait(30)
        return self.layer(*args, **kwargs)


class CountingLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.layer(*args, **kwargs)


async def test_deadline_stops_worker_between_layers(tiny_model_dirs: dict[str, Path]) -> None:
    part = load_model(trunk_config(tiny_model_dirs["llama"]))  # layers 1 and 2
    gated = GatedLayer(part.model.layers["1"])
    counting = CountingLayer(part.model.layers["2"])
    part.model.layers["1"], part.model.layers["2"] = gated, counting

    # Record how the worker thread's pass over the layers ended.
    outcome: list[BaseException | None] = []
    done = threading.Event()
    run_layers = part._run_layers

    def recorded_run_layers(*args: Any) -> Any:
        try:
            result = run_layers(*args)
        except BaseException as error:
            outcome.append(error)
            raise
        else:
            outcome.append(None)
            return result
        finally:
            done.set()

    part._run_layers = recorded_run_layers  # type: ignore[method-assign]
    models = Models()
    models.preloaded["preloaded:gated"] = part
    async with managed(models) as (server, call):
        await server.load_model(
            ModelConfig(model_id="gated", model_path="preloaded:gated", part="trunk", layers=(1, 3))
        )

        with pytest.raises((GRPCError, TimeoutError)):
            await call(slow_forward, server.port, "gated", torch.ones(1, 2, 32))
        assert gated.entered.is_set()

        # The request is gone; the thread finishes its layer and stops before the next.
        gated.release.set()
        assert await anyio.to_thread.run_sync(done.wait, 30)
        assert len(outcome) == 1
        assert isinstance(outcome[0], ComputeInterruptedError)
        assert counting.calls == 0

        # The server keeps serving the same model.
        reply = await call(forward, server.port, "gated", torch.ones(1, 2, 32))
        assert reply.shape == (1, 2, 32)
        assert counting.calls == 1


async def test_stop_lets_in_flight_finish() -> None:
    models = Models()
    server = AsyncManagedServer(ServerConfig(port=0, grace_period=30.0), loader=models.loader)
    results: list[torch.Tensor] = []
    with anyio.fail_after(60):
        async with client_bridge() as call, anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            await server.load_model(fake("blocking", "blocking"))

            async def request() -> None:
                results.append(await call(forward, port, "blocking", torch.ones(1, 1, 2)))

            tg.start_soon(request)
            await anyio.to_thread.run_sync(models.blocking.entered.wait, 30)
            await server.stop()
            # Stopping: the socket is closed while the in-flight request still runs.
            while server.host_statistics().rejected_while_stopping == 0:
                with pytest.raises((GRPCError, ConnectionError, OSError)):
                    await call(forward, port, "blocking", torch.ones(1, 1, 2))
                break
            models.blocking.release.set()
    assert len(results) == 1
    assert torch.equal(results[0], torch.ones(1, 1, 2))


async def test_start_stop_migration_style() -> None:
    server = AsyncManagedServer(port=0, loader=Models().loader)
    await server.start()
    await server.load_model(fake("double", "2"))
    assert [m.model_id for m in await server.list_models()] == ["double"]
    assert repr(server).startswith("<AsyncManagedServer 127.0.0.1:")
    await server.stop()
    assert server.manager.list_models_nowait() == []


async def test_single_model_server() -> None:
    compute_fn = AsyncModelComputeFunction(Scale(5.0), model_id="five")
    async with client_bridge() as call, AsyncGRPCComputeServer(compute_fn, port=0) as server:
        hidden = torch.randn(1, 2, 3)
        assert torch.allclose(await call(forward, server.port, "five", hidden), hidden * 5)
        status, message, _ = await call(
            expect_error,
            server.port,
            "Forward",
            compute_pb2.ForwardRequest(model_id="six", hidden_states=encode_tensor(hidden)),
        )
        assert status == Status.NOT_FOUND
        assert "'six'" in message
        assert await call(health, server.port, "five") == HealthCheckResponse.SERVING
    assert torch.allclose(await compute_fn(hidden), hidden * 5)


async def test_metrics_endpoint_serves_counters() -> None:
    async def scrape(port: int) -> str:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            await stream.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            try:
                while True:
                    data += await stream.receive()
            except anyio.EndOfStream:
                pass
        return data.decode()

    async with managed(Models(), metrics_port=0) as (server, call):
        await server.load_model(fake("double", "2"))
        await call(forward, server.port, "double", torch.ones(1, 1, 2))
        assert server.metrics_port is not None
        text = await scrape(server.metrics_port)
    assert text.startswith("HTTP/1.1 200 OK")
    assert 'slm_trio_requests_total{code="OK",model_id="double",rpc="Forward"} 1.0' in text
    assert 'slm_trio_models{state="READY"} 1.0' in text
    assert "slm_trio_model_load_seconds_count" in text
    assert "slm_trio_sessions 0.0" in text
    assert 'slm_trio_sessions_closed_total{reason="reclaimed"} 0.0' in text
    assert "slm_trio_session_budget_rejections_total 0.0" in text


# -- sessions --------------------------------------------------------------------------


async def test_session_steps_match_full_forward(tiny_model_dirs: dict[str, Path]) -> None:
    config = trunk_config(tiny_model_dirs["llama"])
    part = load_model(config)
    hidden = torch.randn(1, 8, 32)
    with torch.inference_mode():
        expected = part(hidden)
    chunks = [hidden[:, :5], hidden[:, 5:6], hidden[:, 6:7], hidden[:, 7:8]]

    async with managed(Models()) as (server, call):
        await server.load_model(config)
        opened, outputs = await call(session_run, server.port, "llama-trunk", chunks)
        assert opened.cached_tokens == 0
        assert server.sessions.statistics().sessions == 0

    assert torch.allclose(torch.cat(outputs, dim=1), expected, atol=1e-5)


async def test_session_resume_after_broken_stream(tiny_model_dirs: dict[str, Path]) -> None:
    config = trunk_config(tiny_model_dirs["llama"])
    part = load_model(config)
    hidden = torch.randn(1, 6, 32)
    with torch.inference_mode():
        expected = part(hidden)

    async with managed(Models()) as (server, call):
        await server.load_model(config)
        opened, first = await call(
            session_run, server.port, "llama-trunk", [hidden[:, :4]], close=False
        )
        while server.sessions.get_nowait(opened.session_id).attached:
            await anyio.sleep(0.01)
        resumed, rest = await call(
            session_run,
            server.port,
            "llama-trunk",
            [hidden[:, 4:5], hidden[:, 5:6]],
            resume=opened.session_id,
            first_step=1,
        )
        assert resumed.session_id == opened.session_id
        assert resumed.cached_tokens == 4

    assert torch.allclose(torch.cat(first + rest, dim=1), expected, atol=1e-5)


async def test_session_budget_and_expiry(tiny_model_dirs: dict[str, Path]) -> None:
    config = trunk_config(tiny_model_dirs["llama"])
    async with managed(Models(), max_cached_tokens=6, session_ttl=30.0) as (server, call):
        await server.load_model(config)
        first, _ = await call(
            session_run, server.port, "llama-trunk", [torch.randn(1, 4, 32)], close=False
        )
        assert server.sessions.statistics().cached_tokens == 4
        while server.sessions.get_nowait(first.session_id).attached:
            await anyio.sleep(0.01)

        # A second session needs 4 more tokens (8 > 6): the first one's stream is gone, so
        # the server reclaims it instead of rejecting the new work.
        second, _ = await call(
            session_run, server.port, "llama-trunk", [torch.randn(1, 4, 32)], close=False
        )
        assert server.sessions.statistics().reclaimed == 1
        assert server.sessions.statistics().cached_tokens == 4
        status, message = await call(session_error, server.port, [resume_request(first)])
        assert status == Status.NOT_FOUND
        assert "KV-cache budget was full and its stream had broken" in message

        # A step that cannot fit even after reclaiming is rejected, and nothing is reclaimed.
        status, message = await call(
            session_error,
            server.port,
            [
                compute_pb2.SessionRequest(open=compute_pb2.SessionOpen(model_id="llama-trunk")),
                compute_pb2.SessionRequest(
                    step=compute_pb2.SessionStep(
                        step_index=0, hidden_states=encode_tensor(torch.randn(1, 7, 32))
                    )
                ),
            ],
        )
        assert status == Status.RESOURCE_EXHAUSTED
        assert "KV-cache budget" in message
        # The rejected session was closed at once; only the second one remains.
        assert server.sessions.statistics().sessions == 1
        assert server.sessions.statistics().reclaimed == 1

        # Expiry frees the tokens; resuming an expired session fails with NOT_FOUND.
        while server.sessions.get_nowait(second.session_id).attached:
            await anyio.sleep(0.01)
        expired = server.sessions.expire_nowait(
            now=server.sessions.get_nowait(second.session_id).last_active + 31
        )
        assert second.session_id in expired
        assert server.sessions.statistics().cached_tokens == 0
        status, message = await call(session_error, server.port, [resume_request(second)])
        assert status == Status.NOT_FOUND
        assert "closed because it was idle for more than 30 s" in message


def resume_request(opened: compute_pb2.SessionOpened) -> compute_pb2.SessionRequest:
    resume = compute_pb2.SessionOpen(model_id="llama-trunk", resume_session_id=opened.session_id)
    return compute_pb2.SessionRequest(open=resume)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_sigterm_stops_serve() -> None:
    server = AsyncManagedServer(port=0, loader=Models().loader)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            os.kill(os.getpid(), signal.SIGTERM)
    # serve returned on its own: the task group did not need cancelling.
    assert not tg.cancel_scope.cancel_called
    assert repr(server).endswith(" stopped>")


async def test_body_error_not_wrapped() -> None:
    with pytest.raises(ValueError, match="from the body"):
        async with AsyncManagedServer(port=0, loader=Models().loader):
            raise ValueError("from the body")


async def test_open_session_blocks_eviction(tiny_model_dirs: dict[str, Path]) -> None:
    async with managed(Models(), max_models=1) as (server, call):
        await server.load_model(trunk_config(tiny_model_dirs["llama"], "a"))
        await call(session_run, server.port, "a", [torch.randn(1, 3, 32)], close=False)
        while not server.sessions.has_sessions_nowait("a") or any(
            s.attached for s in server.sessions._sessions.values()
        ):
            await anyio.sleep(0.01)
        # The only READY model has an open session, so there is no room for "b".
        with pytest.raises(ModelCapacityError):
            await server.load_model(fake("b", "2"))
        assert server.manager.get_info("a").state.value == "READY"


@pytest.mark.parametrize("which", ["port", "metrics_port"])
async def test_busy_port_error_names_address(which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        options: dict[str, Any] = {"port": 0, which: port}
        listener = "gRPC" if which == "port" else "metrics"
        server = AsyncManagedServer(ServerConfig(**options), loader=Models().loader)

        with pytest.raises(
            ServerStartError, match=f"could not listen for {listener} on 127.0.0.1:{port}"
        ):
            async with server:
                pass

        # The failed start leaves nothing running: the same object reports no port.
        assert server.metrics_port is None


async def test_invalid_host_error_names_host() -> None:
    server = AsyncManagedServer(ServerConfig(host="256.1.1.1", port=0), loader=Models().loader)
    with pytest.raises(ServerStartError, match="could not listen for gRPC on 256.1.1.1:0"):
        async with server:
            pass
