"""Bad requests against a real AsyncManagedServer: each gets a precise status and loses nothing.

Every case in `CASES` sends one malformed or unserviceable request and names
the status and a fragment of the message the client must get. After the
table, the server still serves a good request, its model table is as it
was, no session or in-flight request is left behind, and repeating the whole
table 1,000 times does not grow the process's memory.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import sniffio
import torch
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from torch import nn

from slm_trio._proto.v1 import (
    compute_grpc,
    compute_pb2,
    management_grpc,
    management_pb2,
    tensor_pb2,
)
from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.loading import load_model
from slm_trio.server import AsyncManagedServer
from slm_trio.wire import encode_tensor

pytestmark = pytest.mark.anyio

MAX_MESSAGE_BYTES = 256 * 1024
MAX_TENSOR_ELEMENTS = 32 * 1024
# The tiny trunk accepts 64 positions (max_position_embeddings), and these limits are below it.
MAX_CACHED_TOKENS = 48
MAX_REQUEST_TOKENS = 128


class Garbage:
    """A request "message" whose bytes are not a valid protobuf encoding."""

    def SerializeToString(self) -> bytes:
        return b"\xff\xff\xff\xff\x0f"


def tensor(dtype: int, shape: list[int], data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def forward_request(model_id: str = "trunk", **fields: Any) -> compute_pb2.ForwardRequest:
    fields.setdefault("hidden_states", encode_tensor(torch.zeros(1, 2, 32)))
    return compute_pb2.ForwardRequest(model_id=model_id, **fields)


def open_request(model_id: str = "trunk", resume: str | None = None) -> compute_pb2.SessionRequest:
    message = compute_pb2.SessionOpen(model_id=model_id)
    if resume is not None:
        message.resume_session_id = resume
    return compute_pb2.SessionRequest(open=message)


def step_request(index: int, tokens: int = 1, start: int = 0) -> compute_pb2.SessionRequest:
    return compute_pb2.SessionRequest(
        step=compute_pb2.SessionStep(
            step_index=index,
            hidden_states=encode_tensor(torch.zeros(1, tokens, 32)),
            position_ids=encode_tensor(torch.arange(start, start + tokens).unsqueeze(0)),
        )
    )


# -- calls (asyncio side) ---------------------------------------------------------------


async def unary(channel: Channel, method: str, request: Any) -> None:
    if method.startswith("Management."):
        stub: Any = management_grpc.ManagementStub(channel)
    else:
        stub = compute_grpc.ComputeStub(channel)
    await getattr(stub, method.split(".")[1])(request)


async def garbage(channel: Channel) -> None:
    method = UnaryUnaryMethod(
        channel, "/slm_trio.v1.Compute/Forward", Garbage, compute_pb2.ForwardResponse
    )
    await method(Garbage())


async def session(channel: Channel, requests: list[compute_pb2.SessionRequest]) -> None:
    async with compute_grpc.ComputeStub(channel).Session.open() as stream:
        for request in requests:
            await stream.send_message(request)
            await stream.recv_message()
        await stream.end()
        await stream.recv_message()


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Channel], Awaitable[None]]
    status: Status
    message: str


def case(name: str, status: Status, message: str, fn: Callable[..., Any], *args: Any) -> Case:
    """Build a case that calls ``fn(channel, *args)``."""

    async def call(channel: Channel) -> None:
        await fn(channel, *args)

    return Case(name, call, status, message)


FLOAT32 = tensor_pb2.DTYPE_FLOAT32
INVALID = Status.INVALID_ARGUMENT

CASES = [
    case(
        "byte length mismatch",
        INVALID,
        "hidden_states.data has 10 bytes",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=tensor(FLOAT32, [1, 2, 32], b"\0" * 10)),
    ),
    case(
        "negative dimension",
        INVALID,
        "hidden_states",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=tensor(FLOAT32, [1, -2, 32], b"")),
    ),
    case(
        "huge dimensions",
        INVALID,
        str(MAX_TENSOR_ELEMENTS),
        unary,
        "Compute.Forward",
        forward_request(hidden_states=tensor(FLOAT32, [1 << 40, 1 << 40, 32], b"")),
    ),
    case(
        "unknown dtype",
        INVALID,
        "hidden_states.dtype",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=tensor(99, [1, 2, 32], b"\0" * 256)),
    ),
    case(
        "missing hidden states",
        INVALID,
        "hidden_states is missing",
        unary,
        "Compute.Forward",
        compute_pb2.ForwardRequest(model_id="trunk"),
    ),
    case(
        "integer hidden states",
        INVALID,
        "torch.int64",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=encode_tensor(torch.zeros(1, 2, 32, dtype=torch.int64))),
    ),
    case(
        "wrong hidden size",
        INVALID,
        "16",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=encode_tensor(torch.zeros(1, 2, 16))),
    ),
    case(
        "rank too high",
        INVALID,
        "hidden_states",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=encode_tensor(torch.zeros([1] * 9))),
    ),
    case(
        "position ids shape",
        INVALID,
        "position_ids",
        unary,
        "Compute.Forward",
        forward_request(position_ids=encode_tensor(torch.arange(3).unsqueeze(0))),
    ),
    case(
        "unknown model",
        Status.NOT_FOUND,
        "'ghost' is not loaded",
        unary,
        "Compute.Forward",
        forward_request("ghost"),
    ),
    case(
        "huge model id",
        Status.NOT_FOUND,
        "(message truncated)",
        unary,
        "Management.Describe",
        management_pb2.DescribeRequest(model_id="a" * 20_000),
    ),
    case(
        "model still loading",
        Status.UNAVAILABLE,
        "'slow' is still loading",
        unary,
        "Compute.Forward",
        forward_request("slow"),
    ),
    case(
        "bottom part gets hidden states",
        Status.FAILED_PRECONDITION,
        "bottom part",
        unary,
        "Compute.Forward",
        forward_request("bottom"),
    ),
    case(
        "garbage bytes in message",
        INVALID,
        "could not be decoded",
        garbage,
    ),
    case(
        "message over the cap",
        Status.RESOURCE_EXHAUSTED,
        f"maximum of {MAX_MESSAGE_BYTES} bytes",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=encode_tensor(torch.zeros(MAX_MESSAGE_BYTES // 4 + 10))),
    ),
    case(
        "backward gradient shape",
        INVALID,
        "grad_output has shape [1, 3, 32]",
        unary,
        "Compute.Backward",
        compute_pb2.BackwardRequest(
            model_id="trunk",
            hidden_states=encode_tensor(torch.zeros(1, 2, 32)),
            grad_output=encode_tensor(torch.zeros(1, 3, 32)),
        ),
    ),
    case(
        "load with invalid dtype",
        INVALID,
        "dtype='float64' is invalid",
        unary,
        "Management.Load",
        management_pb2.LoadRequest(
            config=management_pb2.ModelConfig(model_id="x", model_path="/m", dtype="float64")
        ),
    ),
    case(
        "describe unknown model",
        Status.NOT_FOUND,
        "'nobody' is not loaded",
        unary,
        "Management.Describe",
        management_pb2.DescribeRequest(model_id="nobody"),
    ),
    case(
        "session id unknown",
        Status.NOT_FOUND,
        "unknown or expired",
        session,
        [open_request(resume="0123456789abcdef")],
    ),
    case(
        "session first message not open",
        INVALID,
        "first message of a session must be 'open'",
        session,
        [step_request(0)],
    ),
    case(
        "session step out of order",
        Status.FAILED_PRECONDITION,
        "expected step_index=0, got step_index=5",
        session,
        [open_request(), step_request(5)],
    ),
    case(
        "session on a module without cache",
        Status.FAILED_PRECONDITION,
        "keeps no KV cache",
        session,
        [open_request("plain")],
    ),
    case(
        "forward longer than the context",
        INVALID,
        "65 positions per row, but model 'trunk' accepts at most 64",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=encode_tensor(torch.zeros(1, 65, 32))),
    ),
    case(
        "position id past the context",
        INVALID,
        "position id 1000000000000000 is out of range; model 'trunk' accepts positions 0 to 63",
        unary,
        "Compute.Forward",
        forward_request(
            hidden_states=encode_tensor(torch.zeros(1, 2, 32)),
            position_ids=encode_tensor(torch.tensor([[0, 10**15]])),
        ),
    ),
    case(
        "forward built for other split points",
        Status.FAILED_PRECONDITION,
        "model 'trunk' serves layers [1, 3), but the request was built for layers [0, 2)",
        unary,
        "Compute.Forward",
        forward_request(expected_layers=compute_pb2.LayerRange(start=0, stop=2)),
    ),
    case(
        "session open for other split points",
        Status.FAILED_PRECONDITION,
        "built for layers [2, 4)",
        session,
        [
            compute_pb2.SessionRequest(
                open=compute_pb2.SessionOpen(
                    model_id="trunk", expected_layers=compute_pb2.LayerRange(start=2, stop=4)
                )
            )
        ],
    ),
    case(
        "request over the token limit",
        INVALID,
        f"150 tokens (shape [3, 50, 32]); this server accepts at most {MAX_REQUEST_TOKENS}",
        unary,
        "Compute.Forward",
        forward_request(hidden_states=encode_tensor(torch.zeros(3, 50, 32))),
    ),
    case(
        "session step past the context",
        INVALID,
        "20 new positions per row and the session's cache contains 45",
        session,
        # Positions 40-59 are in range, but 45 cached and 20 new positions exceed 64.
        [open_request(), step_request(0, tokens=45), step_request(1, tokens=20, start=40)],
    ),
    case(
        "session over the token budget",
        Status.RESOURCE_EXHAUSTED,
        "KV-cache budget",
        session,
        [open_request(), step_request(0, tokens=MAX_CACHED_TOKENS + 1)],
    ),
]


# -- harness -----------------------------------------------------------------------------


@asynccontextmanager
async def bad_input_server(
    model_dir: Path,
) -> AsyncIterator[tuple[AsyncManagedServer, Callable[..., Awaitable[Any]], threading.Event]]:
    gate = threading.Event()

    def loader(config: ModelConfig, progress: Callable[[float], None]) -> Any:
        if config.model_path == "fake:plain":
            return nn.Identity()
        if config.model_path == "fake:slow":
            gate.wait(60)
            return nn.Identity()
        return load_model(config, progress)

    server = AsyncManagedServer(
        ServerConfig(
            port=0,
            max_message_bytes=MAX_MESSAGE_BYTES,
            max_tensor_elements=MAX_TENSOR_ELEMENTS,
            max_cached_tokens=MAX_CACHED_TOKENS,
            max_request_tokens=MAX_REQUEST_TOKENS,
        ),
        loader=loader,
    )
    with anyio.fail_after(600):
        async with client(server) as call, server:
            for config in (
                ModelConfig(
                    model_id="trunk", model_path=str(model_dir), part="trunk", layers=(1, 3)
                ),
                ModelConfig(
                    model_id="bottom", model_path=str(model_dir), part="bottom", layers=(1, 3)
                ),
                ModelConfig(model_id="plain", model_path="fake:plain"),
            ):
                await server.load_model(config)
            server.manager.start_load(ModelConfig(model_id="slow", model_path="fake:slow"))
            try:
                yield server, call, gate
            finally:
                gate.set()


@asynccontextmanager
async def client(server: AsyncManagedServer) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Yield ``call(fn, *args)`` that runs an asyncio coroutine on a channel to ``server``."""

    async def with_channel(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async with Channel("127.0.0.1", server.port) as channel:
            return await fn(channel, *args)

    if sniffio.current_async_library() == "trio":
        import trio_asyncio

        async with trio_asyncio.open_loop():

            async def through_loop(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                return await trio_asyncio.aio_as_trio(with_channel)(fn, *args)

            yield through_loop
    else:

        async def direct(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
            # A task of its own: grpclib cancels its calling task natively.
            return await asyncio.ensure_future(with_channel(fn, *args))

        yield direct


async def run_case(channel: Channel, bad: Case) -> tuple[Status, str]:
    try:
        await bad.call(channel)
    except GRPCError as error:
        return error.status, error.message or ""
    raise AssertionError(f"case {bad.name!r} succeeded")


async def run_table(channel: Channel, repetitions: int) -> list[tuple[str, Status, str]]:
    outcomes = []
    for _ in range(repetitions):
        for bad in CASES:
            status, message = await run_case(channel, bad)
            outcomes.append((bad.name, status, message))
    return outcomes


async def good_forward(channel: Channel) -> torch.Tensor:
    reply = await compute_grpc.ComputeStub(channel).Forward(forward_request())
    return torch.frombuffer(bytearray(reply.hidden_states.data), dtype=torch.float32)


def assert_nothing_left(server: AsyncManagedServer) -> None:
    states = {i.model_id: i.state.value for i in server.manager.list_models_nowait()}
    assert states == {"bottom": "READY", "plain": "READY", "slow": "LOADING", "trunk": "READY"}
    assert all(i.active_leases == 0 for i in server.manager.list_models_nowait())
    assert server.sessions.statistics().sessions == 0
    assert server.sessions.statistics().cached_tokens == 0
    assert server.host_statistics().in_flight == 0


# -- tests ---------------------------------------------------------------------------------


def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 15
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
async def test_bad_input_status(bad: Case, tiny_model_dirs: dict[str, Path]) -> None:
    async with bad_input_server(tiny_model_dirs["llama"]) as (server, call, _):
        status, message = await call(run_case, bad)
        assert status == bad.status, message
        assert bad.message in message

        # The server keeps serving and nothing is left behind.
        assert (await call(good_forward)).numel() == 2 * 32
        assert_nothing_left(server)


async def test_expired_session_id(tiny_model_dirs: dict[str, Path]) -> None:
    async def keep_session(channel: Channel) -> str:
        async with compute_grpc.ComputeStub(channel).Session.open() as stream:
            await stream.send_message(open_request())
            opened = (await stream.recv_message()).opened
            await stream.send_message(step_request(0, tokens=3))
            await stream.recv_message()
            await stream.cancel()
        return str(opened.session_id)

    async with bad_input_server(tiny_model_dirs["llama"]) as (server, call, _):
        session_id = await call(keep_session)
        while server.sessions.get_nowait(session_id).attached:
            await anyio.sleep(0.01)
        last_active = server.sessions.get_nowait(session_id).last_active
        assert server.sessions.expire_nowait(now=last_active + server.sessions.ttl + 1)

        try:
            await call(session, [open_request(resume=session_id)])
        except GRPCError as error:
            assert error.status == Status.NOT_FOUND
            assert f"session {session_id!r} was closed because it was idle for more than" in (
                error.message or ""
            )
        else:
            raise AssertionError("resuming an expired session succeeded")
        assert_nothing_left(server)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_bad_input_memory_flat(tiny_model_dirs: dict[str, Path]) -> None:
    """Repeat the whole table 1,000 times; memory and server state stay flat."""
    process = psutil.Process()
    async with bad_input_server(tiny_model_dirs["llama"]) as (server, call, _):
        # Warm up allocator pools, metric label sets and caches first.
        await call(run_table, 50)
        gc.collect()
        before = process.memory_info().rss

        outcomes = await call(run_table, 1000)

        gc.collect()
        grown = process.memory_info().rss - before
        expected = {c.name: c.status for c in CASES}
        assert all(status == expected[name] for name, status, _ in outcomes)
        assert len(outcomes) == 1000 * len(CASES)
        assert (await call(good_forward)).numel() == 2 * 32
        assert_nothing_left(server)
    # 21,000 failed requests; a leak of one 256 KiB message each would be gigabytes.
    assert grown < 48 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"
