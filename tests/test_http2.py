"""Tests of the HTTP/2 tuning that server and client connections get.

The in-memory tests drive two ``h2`` connections by hand, without sockets. The
loopback tests serve an echo Compute service with `GrpcHost` on 127.0.0.1 and
call it with the tuned channel, stock grpclib and, where installed, grpcio.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import sniffio
import torch
from grpclib.client import Channel
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RemoteSettingsChanged
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame

from slm_trio._http2 import (
    MAX_FRAME_SIZE,
    TunedChannel,
    _QuietDataFrame,
    _QuietFrameBuffer,
    tune_h2_connection,
)
from slm_trio._proto.v1 import compute_grpc, compute_pb2
from slm_trio.server._host import GrpcHost
from slm_trio.wire import decode_tensor, encode_tensor

REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "127.0.0.1"),
    (":path", "/slm_trio.v1.Compute/Forward"),
]


def _pair() -> tuple[H2Connection, H2Connection]:
    """A stock client connection and a tuned server connection, both initiated."""
    client = H2Connection(H2Configuration(client_side=True))
    server = H2Connection(H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    tune_h2_connection(server)
    return client, server


@pytest.mark.parametrize("size", [0, 16_383, 1 << 24])
def test_frame_size_out_of_range_is_rejected(size: int) -> None:
    connection = H2Connection(H2Configuration(client_side=False))
    with pytest.raises(ValueError, match=f"max_frame_size .* got {size}"):
        tune_h2_connection(connection, max_frame_size=size)


def test_tuned_connection_advertises_frame_size() -> None:
    client, server = _pair()

    events = client.receive_data(server.data_to_send())

    changed = [e for e in events if isinstance(e, RemoteSettingsChanged)]
    assert changed[-1].changed_settings[SettingCodes.MAX_FRAME_SIZE].new_value == MAX_FRAME_SIZE
    assert client.max_outbound_frame_size == MAX_FRAME_SIZE


def test_large_frame_after_settings_ack() -> None:
    """A peer may send large frames right after its acknowledgement, in the same read."""
    client, server = _pair()
    client.receive_data(server.data_to_send())  # the client acknowledges our SETTINGS
    payload = bytes(range(256)) * 200  # 51,200 bytes: one frame, over 16 KiB, in the 64 KiB window
    client.send_headers(1, REQUEST_HEADERS)
    client.send_data(1, payload, end_stream=True)

    # Preface, SETTINGS, the acknowledgement, HEADERS and the large DATA frame in one read.
    events = server.receive_data(client.data_to_send())

    received = [e for e in events if isinstance(e, DataReceived)]
    assert len(received) == 1
    assert received[0].data == payload


def test_received_data_frames_have_short_repr() -> None:
    buffer = _QuietFrameBuffer(server=False)
    buffer.max_frame_size = MAX_FRAME_SIZE
    frame = DataFrame(1, b"\x01" * 200_000)
    buffer.add_data(frame.serialize())

    received = next(buffer)

    assert type(received) is _QuietDataFrame
    assert isinstance(received, DataFrame)
    assert repr(received) == "_QuietDataFrame(stream_id=1, flags=[]): <200000 bytes>"


def test_tuned_connection_uses_quiet_frames() -> None:
    """Fails when an h2 version drops the dispatch table the quiet frames rely on."""
    _, server = _pair()

    assert isinstance(server.incoming_buffer, _QuietFrameBuffer)


# Loopback: the tuned server with tuned, stock and grpcio clients.


class EchoCompute(compute_grpc.ComputeBase):
    async def Forward(self, stream: Any) -> None:
        request = await stream.recv_message()
        await stream.send_message(compute_pb2.ForwardResponse(hidden_states=request.hidden_states))

    async def Backward(self, stream: Any) -> None:
        raise NotImplementedError

    async def Session(self, stream: Any) -> None:
        raise NotImplementedError


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[int, Callable[..., Awaitable[Any]]]]:
    """Serve the echo service; yield its port and a way to run asyncio coroutines."""
    host = GrpcHost([EchoCompute()], max_message_bytes=8 << 20)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as task_group:
            port = await task_group.start(host.serve)
            if sniffio.current_async_library() == "trio":
                import trio_asyncio

                async with trio_asyncio.open_loop():

                    async def through_loop(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                        return await trio_asyncio.aio_as_trio(fn)(*args)

                    yield port, through_loop
            else:

                async def direct(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                    return await fn(*args)

                yield port, direct
            task_group.cancel_scope.cancel()


async def _echo(channel_type: type[Channel], port: int, tensor: torch.Tensor) -> dict[str, Any]:
    async with channel_type("127.0.0.1", port) as channel:
        request = compute_pb2.ForwardRequest(model_id="m", hidden_states=encode_tensor(tensor))
        reply = await compute_grpc.ComputeStub(channel).Forward(request)
        connection = channel._protocol.connection._connection  # type: ignore[union-attr]
        return {
            "tensor": decode_tensor(reply.hidden_states, max_elements=1 << 22, name="reply"),
            "client_sends_up_to": connection.max_outbound_frame_size,
        }


@pytest.mark.anyio
@pytest.mark.parametrize("channel_type", [TunedChannel, Channel], ids=["tuned", "stock"])
async def test_loopback_echo_of_one_mebibyte(channel_type: type[Channel]) -> None:
    tensor = torch.randn(1 << 18)  # [elements] float32, 1 MiB
    async with serving() as (port, call):
        result = await call(_echo, channel_type, port, tensor)

    assert torch.equal(result["tensor"], tensor)
    assert result["client_sends_up_to"] == MAX_FRAME_SIZE


def test_grpcio_client_against_tuned_server() -> None:
    grpc = pytest.importorskip("grpc")
    tensor = torch.randn(1 << 18)  # [elements] float32, 1 MiB

    async def main() -> None:
        async with serving() as (port, _):
            reply = await anyio.to_thread.run_sync(_grpcio_forward, grpc, port, tensor)
        assert torch.equal(decode_tensor(reply, max_elements=1 << 22, name="reply"), tensor)

    anyio.run(main, backend="trio")


def _grpcio_forward(grpc: Any, port: int, tensor: torch.Tensor) -> Any:
    options = [("grpc.max_receive_message_length", 8 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        forward = channel.unary_unary(
            "/slm_trio.v1.Compute/Forward",
            request_serializer=compute_pb2.ForwardRequest.SerializeToString,
            response_deserializer=compute_pb2.ForwardResponse.FromString,
        )
        request = compute_pb2.ForwardRequest(model_id="m", hidden_states=encode_tensor(tensor))
        return forward(request, timeout=30).hidden_states
