"""Measure the round-trip latency and throughput of tensors through an echo Forward call.

Compares five servers on loopback, each in its own process, with the client in
this process:

- ``grpclib-trio``: grpclib hosted by `GrpcHost` in a trio nursery (trio-asyncio);
- ``grpclib-trio-cross``: the same, and the handler also crosses into trio once
  with `run_in_owner`, as handlers that use the model manager do;
- ``grpclib-asyncio``: the same host on plain asyncio;
- ``grpclib-stock``: grpclib's own `Server` on asyncio, without the HTTP/2
  tuning of `slm_trio._http2`, called with grpclib's own `Channel`;
- ``grpcio``: a grpcio ``grpc.aio`` server with a grpcio client.

The three hosted servers are called with `TunedChannel`, the channel that the
slm_trio client uses.

Every server decodes the request tensor with `decode_tensor` and encodes the reply
with `encode_tensor`, and every client encodes and decodes, so each call pays
the codec as the real Forward path does. The payloads are float32 tensors of
64 KiB, 1 MiB and 4 MiB. Throughput is payload bytes per second of round trips
(each round trip carries the payload out and back). Needs the ``dev`` extra (grpcio).

Usage:
    python bench/wire_roundtrip.py [--quick]

Prints a table and writes bench/results/wire_roundtrip.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slm_trio._proto.v1 import compute_grpc, compute_pb2
from slm_trio.wire import decode_tensor, encode_tensor

FORWARD = "/slm_trio.v1.Compute/Forward"
SIZES = {"64 KiB": 64 << 10, "1 MiB": 1 << 20, "4 MiB": 4 << 20}
MAX_MESSAGE_BYTES = 64 << 20
MAX_ELEMENTS = MAX_MESSAGE_BYTES // 4
RESULTS = Path(__file__).resolve().parent / "results" / "wire_roundtrip.json"
SERVERS = ("grpclib-trio", "grpclib-trio-cross", "grpclib-asyncio", "grpclib-stock", "grpcio")


def _echo(request: compute_pb2.ForwardRequest) -> compute_pb2.ForwardResponse:
    hidden = decode_tensor(request.hidden_states, max_elements=MAX_ELEMENTS, name="hidden_states")
    return compute_pb2.ForwardResponse(hidden_states=encode_tensor(hidden))


class EchoCompute(compute_grpc.ComputeBase):
    def __init__(self, *, cross_into_trio: bool = False) -> None:
        self._cross_into_trio = cross_into_trio

    async def Forward(self, stream: Any) -> None:
        request = await stream.recv_message()
        if self._cross_into_trio:
            from anyio.lowlevel import checkpoint

            from slm_trio.server._host import run_in_owner

            await run_in_owner(checkpoint)
        await stream.send_message(_echo(request))

    async def Backward(self, stream: Any) -> None:
        raise NotImplementedError

    async def Session(self, stream: Any) -> None:
        raise NotImplementedError


async def _serve_grpclib(cross_into_trio: bool) -> None:
    import anyio

    from slm_trio.server._host import GrpcHost

    service = EchoCompute(cross_into_trio=cross_into_trio)
    host = GrpcHost([service], max_message_bytes=MAX_MESSAGE_BYTES)
    async with anyio.create_task_group() as task_group:
        port = await task_group.start(host.serve)
        print(port, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        task_group.cancel_scope.cancel()


async def _serve_grpclib_stock() -> None:
    from grpclib.server import Server

    server = Server([EchoCompute()])
    await server.start("127.0.0.1", 0)
    assert server._server is not None and server._server.sockets
    print(server._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.to_thread(sys.stdin.read)
    server.close()
    await server.wait_closed()


async def _serve_grpcio() -> None:
    import grpc

    handler = grpc.method_handlers_generic_handler(
        "slm_trio.v1.Compute",
        {
            "Forward": grpc.unary_unary_rpc_method_handler(
                _grpcio_forward,
                request_deserializer=compute_pb2.ForwardRequest.FromString,
                response_serializer=compute_pb2.ForwardResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server(options=_grpcio_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await server.stop(grace=None)


async def _grpcio_forward(request: compute_pb2.ForwardRequest, context: Any) -> Any:
    return _echo(request)


def _grpcio_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def serve(kind: str) -> None:
    """Run one server until stdin closes; print its port first."""
    import anyio

    if kind == "grpclib-trio":
        anyio.run(_serve_grpclib, False, backend="trio")
    elif kind == "grpclib-trio-cross":
        anyio.run(_serve_grpclib, True, backend="trio")
    elif kind == "grpclib-asyncio":
        anyio.run(_serve_grpclib, False, backend="asyncio")
    elif kind == "grpclib-stock":
        asyncio.run(_serve_grpclib_stock())
    else:
        asyncio.run(_serve_grpcio())


async def _time_grpclib(
    port: int, tensor: torch.Tensor, warmup: int, samples: int, *, stock: bool
) -> list[float]:
    from grpclib.client import Channel

    from slm_trio._http2 import TunedChannel

    channel_type = Channel if stock else TunedChannel
    async with channel_type("127.0.0.1", port) as channel:
        stub = compute_grpc.ComputeStub(channel)
        latencies = []
        for index in range(warmup + samples):
            start = time.perf_counter()
            request = compute_pb2.ForwardRequest(
                model_id="bench", hidden_states=encode_tensor(tensor)
            )
            reply = await stub.Forward(request)
            decode_tensor(reply.hidden_states, max_elements=MAX_ELEMENTS, name="hidden_states")
            if index >= warmup:
                latencies.append(time.perf_counter() - start)
    return latencies


def _time_grpcio(port: int, tensor: torch.Tensor, warmup: int, samples: int) -> list[float]:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=_grpcio_options()) as channel:
        forward = channel.unary_unary(
            FORWARD,
            request_serializer=compute_pb2.ForwardRequest.SerializeToString,
            response_deserializer=compute_pb2.ForwardResponse.FromString,
        )
        latencies = []
        for index in range(warmup + samples):
            start = time.perf_counter()
            request = compute_pb2.ForwardRequest(
                model_id="bench", hidden_states=encode_tensor(tensor)
            )
            reply = forward(request)
            decode_tensor(reply.hidden_states, max_elements=MAX_ELEMENTS, name="hidden_states")
            if index >= warmup:
                latencies.append(time.perf_counter() - start)
    return latencies


def _start_server(kind: str) -> tuple[subprocess.Popen[str], int]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    return server, int(server.stdout.readline())


def _time_batch(kind: str, port: int, tensor: torch.Tensor, samples: int) -> list[float]:
    warmup = 3
    if kind == "grpcio":
        return _time_grpcio(port, tensor, warmup, samples)
    stock = kind == "grpclib-stock"
    return asyncio.run(_time_grpclib(port, tensor, warmup, samples, stock=stock))


def measure(*, quick: bool, rounds: int = 5) -> dict[str, dict[str, dict[str, float]]]:
    """Time every server and payload size; return the figures by server, then payload.

    All servers run at once, idle between batches. Each round times one batch per
    payload size and server in turn, so that load from other processes on the
    machine spreads over all servers instead of skewing one.

    A first round is not counted. It brings every process to its steady state:
    glibc's allocator maps fresh pages for large buffers until its thresholds
    adapt to them, which made grpcio's first 1 MiB round trips about three
    times slower than the later ones.
    """
    servers = {kind: _start_server(kind) for kind in SERVERS}
    latencies: dict[str, dict[str, list[float]]] = {kind: {} for kind in SERVERS}
    try:
        for round_index in range(rounds + 1):
            for label, payload_bytes in SIZES.items():
                tensor = torch.randn(payload_bytes // 4)  # [elements] float32
                total = (200 if quick else 2000) * (64 << 10) // payload_bytes
                per_round = max(4, total // rounds)
                for kind, (_, port) in servers.items():
                    batch = _time_batch(kind, port, tensor, per_round)
                    if round_index > 0:
                        latencies[kind].setdefault(label, []).extend(batch)
    finally:
        for process, _ in servers.values():
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=30)

    results: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in SERVERS}
    for kind in SERVERS:
        for label, payload_bytes in SIZES.items():
            samples = latencies[kind][label]
            results[kind][label] = {
                "payload_bytes": payload_bytes,
                "samples": len(samples),
                "p50_ms": statistics.median(samples) * 1e3,
                "p90_ms": statistics.quantiles(samples, n=10)[-1] * 1e3,
                "throughput_mb_s": payload_bytes / statistics.fmean(samples) / 1e6,
            }
    return results


def _print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    header = (
        f"{'payload':>8} | {'server':>18} | {'p50 ms':>8} | {'p90 ms':>8} | "
        f"{'MB/s':>8} | {'p50 / grpcio':>12}"
    )
    print(header)
    print("-" * len(header))
    for label in SIZES:
        reference = results["grpcio"][label]["p50_ms"]
        for kind in SERVERS:
            row = results[kind][label]
            print(
                f"{label:>8} | {kind:>18} | {row['p50_ms']:8.2f} | {row['p90_ms']:8.2f} | "
                f"{row['throughput_mb_s']:8.1f} | {row['p50_ms'] / reference:12.2f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="take about 10x fewer samples")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0

    torch.manual_seed(0)
    results = measure(quick=args.quick)
    _print_table(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "wire_roundtrip",
        "setup": (
            "loopback; each server in its own process, the client in the bench process; "
            "5 interleaved rounds per server and payload size after one uncounted round"
        ),
        "load_average_at_end": os.getloadavg(),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "results": results,
        "ratio_p50_vs_grpcio": {
            kind: {
                label: results[kind][label]["p50_ms"] / results["grpcio"][label]["p50_ms"]
                for label in SIZES
            }
            for kind in SERVERS
        },
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
