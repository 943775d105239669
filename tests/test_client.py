"""Tests of the split client: generation, streaming, batches, session rebuilds, the wire.

Most tests drive the client through `FakeTrunk`, an in-process transport that runs a trunk
part directly and can inject faults. The tests marked "grpc" run a real server on 127.0.0.1.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from slm_trio.client import (
    RemoteModel,
    RetryPolicy,
    SplitClient,
    TokenStep,
    TrunkReply,
    open_management_client,
    open_split_client,
)
from slm_trio.client._generation import decode_new_text
from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidTensorError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelSplitMismatchError,
    ServerUnavailableError,
    SessionError,
    SessionStepError,
)
from slm_trio.split import ModelPart, split_model

LAYERS = (1, 3)


# The fake transport ------------------------------------------------------------------------


@dataclass
class _ServerSession:
    cache: Any
    next_step: int = 0
    tokens: int = 0


class FakeTrunk:
    """An in-process `TrunkTransport` over a trunk part, with hooks that inject faults.

    ``step_faults`` maps the server-wide step number (0 for the first step ever) to a fault:
    ``"break"`` breaks the stream before the step runs, ``"lose"`` runs the step but loses
    its reply, ``"expire"`` drops the session first. `restart` drops every session and
    breaks every open stream, as a server restart does.
    """

    address = "fake-trunk"

    def __init__(self, trunk: ModelPart, *, model_id: str = "tiny", part: str = "trunk") -> None:
        self.trunk = trunk
        self.model_id = model_id
        self.part = part
        self.sessions: dict[str, _ServerSession] = {}
        self.epoch = 0
        self.describe_errors: list[Exception] = []
        self.open_errors: list[Exception] = []
        self.forward_errors: list[Exception] = []
        self.step_faults: dict[int, str] = {}
        self.step_delay = 0.0
        self.steps = 0
        self.opened = 0
        self.resumed = 0
        self.closed = 0
        self.aborted = 0
        self.forward_calls = 0
        self.backward_calls = 0
        self.describe_calls = 0

    def restart(self) -> None:
        self.epoch += 1
        self.sessions.clear()

    async def describe(self, model_id: str, *, call_timeout: float | None) -> RemoteModel:
        self.describe_calls += 1
        if self.describe_errors:
            raise self.describe_errors.pop(0)
        if model_id != self.model_id:
            raise ModelNotFoundError(f"model {model_id!r} is not loaded")
        trunk = self.trunk
        return RemoteModel(
            model_id=model_id,
            model_type=trunk.model_type,
            part=self.part,
            hidden_size=trunk.hidden_size,
            num_hidden_layers=trunk.num_hidden_layers,
            layer_range=trunk.layer_range,
            vocab_size=trunk.vocab_size,
            dtype="float32",
        )

    async def open_session(
        self, model_id: str, *, resume_session_id: str | None, call_timeout: float | None
    ) -> FakeSession:
        if self.open_errors:
            raise self.open_errors.pop(0)
        if resume_session_id is not None:
            state = self.sessions.get(resume_session_id)
            if state is None:
                raise SessionError(f"session {resume_session_id!r} is unknown or expired")
            self.resumed += 1
            return FakeSession(self, resume_session_id, state.tokens)
        self.opened += 1
        session_id = f"s{self.opened}"
        self.sessions[session_id] = _ServerSession(cache=self.trunk.new_cache())
        return FakeSession(self, session_id, 0)

    async def forward(
        self,
        model_id: str,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        call_timeout: float | None,
    ) -> TrunkReply:
        self.forward_calls += 1
        if self.forward_errors:
            raise self.forward_errors.pop(0)
        with torch.no_grad():
            output = self.trunk(
                hidden_states, position_ids=position_ids, attention_mask=attention_mask
            )
        return _reply(hidden_states, output, None)

    async def backward(
        self,
        model_id: str,
        hidden_states: torch.Tensor,
        grad_output: torch.Tensor,
        *,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        call_timeout: float | None,
    ) -> TrunkReply:
        self.backward_calls += 1
        raise ServerUnavailableError("the connection broke during Backward")


class FakeSession:
    def __init__(self, fake: FakeTrunk, session_id: str, cached_tokens: int) -> None:
        self.fake = fake
        self._session_id = session_id
        self._cached_tokens = cached_tokens
        self.epoch = fake.epoch
        self.done = False

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def cached_tokens(self) -> int:
        return self._cached_tokens

    async def step(
        self,
        step_index: int,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        call_timeout: float | None,
    ) -> TrunkReply:
        fake = self.fake
        if self.done or self.epoch != fake.epoch:
            raise ServerUnavailableError("the session stream broke")
        if fake.step_delay:
            await anyio.sleep(fake.step_delay)

        number = fake.steps
        fake.steps += 1
        fault = fake.step_faults.pop(number, None)
        if fault == "break":
            self.done = True
            raise ServerUnavailableError("the session stream broke")
        if fault == "expire":
            fake.sessions.pop(self._session_id, None)
        state = fake.sessions.get(self._session_id)
        if state is None:
            raise SessionError(f"session {self._session_id!r} is unknown or expired")
        if step_index != state.next_step:
            raise SessionStepError(f"expected step_index={state.next_step}, got {step_index}")

        with torch.no_grad():
            output = fake.trunk(
                hidden_states,
                position_ids=position_ids,
                attention_mask=attention_mask,
                cache=state.cache,
            )
        state.next_step += 1
        state.tokens = state.cache.batch_size * state.cache.seq_length
        if fault == "lose":
            self.done = True
            raise ServerUnavailableError("the session stream broke before the reply")
        return _reply(hidden_states, output, state.tokens)

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.fake.closed += 1
            self.fake.sessions.pop(self._session_id, None)

    async def abort(self) -> None:
        if not self.done:
            self.done = True
            self.fake.aborted += 1


def _reply(sent: torch.Tensor, output: torch.Tensor, cached: int | None) -> TrunkReply:
    return TrunkReply(
        tensor=output,
        server_seconds=0.001,
        cached_tokens=cached,
        bytes_sent=sent.numel() * sent.element_size(),
        bytes_received=output.numel() * output.element_size(),
    )


# Fixtures ----------------------------------------------------------------------------------


@dataclass
class Tiny:
    """A tiny whole model, split in process at `LAYERS`."""

    whole: Any
    bottom: ModelPart
    trunk: ModelPart
    top: ModelPart
    path: Path
    model_type: str
    greedy_cache: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """The whole model's own greedy generation, end-of-sequence included."""
        ids = torch.tensor([prompt])
        with torch.no_grad():
            output = self.whole.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=0,
            )
        return list(output[0, len(prompt) :].tolist())


def _make_tiny(
    make_config: Callable[..., Any], model_type: str, root: Path, initializer_range: float
) -> Tiny:
    # A wide initialisation makes greedy outputs varied instead of one repeated token.
    torch.manual_seed(3)
    config = make_config(model_type, initializer_range=initializer_range)
    whole = AutoModelForCausalLM.from_config(config).eval()
    path = root / f"{model_type}-{initializer_range}"
    whole.save_pretrained(path)
    parts = split_model(whole, LAYERS)
    return Tiny(
        whole=whole,
        bottom=parts.bottom,
        trunk=parts.trunk,
        top=parts.top,
        path=path,
        model_type=model_type,
    )


@pytest.fixture(scope="module")
def tiny_models(
    tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Any]
) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("client-models")
    return {
        "llama": _make_tiny(tiny_config, "llama", root, 1.0),
        "gpt2": _make_tiny(tiny_config, "gpt2", root, 1.0),
        # Stops early on its end-of-sequence token for some prompts.
        "llama-eos": _make_tiny(tiny_config, "llama", root, 0.3),
    }


@pytest.fixture
def tiny(tiny_models: dict[str, Tiny]) -> Tiny:
    return tiny_models["llama"]


def _client(tiny: Tiny, fake: FakeTrunk | None = None, **options: Any) -> SplitClient:
    fake = fake if fake is not None else FakeTrunk(tiny.trunk)
    model = RemoteModel(
        model_id="tiny",
        model_type=tiny.trunk.model_type,
        part="trunk",
        hidden_size=tiny.trunk.hidden_size,
        num_hidden_layers=tiny.trunk.num_hidden_layers,
        layer_range=tiny.trunk.layer_range,
        vocab_size=tiny.trunk.vocab_size,
        dtype="float32",
    )
    options.setdefault("rng", random.Random(0))
    options.setdefault("retry", RetryPolicy(initial_backoff=0.001, max_backoff=0.01))
    return SplitClient(transport=fake, model=model, bottom=tiny.bottom, top=tiny.top, **options)


PROMPT = [5, 6, 7, 8, 9]
OTHER_PROMPT = [10, 11, 12]


# Generation --------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
async def test_generate_equals_whole_model(tiny_models: dict[str, Tiny], model_type: str) -> None:
    tiny = tiny_models[model_type]
    client = _client(tiny)
    result = await client.generate(PROMPT, max_new_tokens=16)
    assert result.tokens == tiny.greedy(PROMPT, 16)
    assert result.prompt_token_ids == [PROMPT]


@pytest.mark.anyio
async def test_generate_stops_on_eos(tiny_models: dict[str, Tiny]) -> None:
    tiny = tiny_models["llama-eos"]
    client = _client(tiny)
    result = await client.generate(PROMPT, max_new_tokens=30)
    expected = tiny.greedy(PROMPT, 30)
    assert expected[-1] == 2, "the test model should stop on its end-of-sequence token"
    assert result.tokens == expected
    assert result.finish_reasons == ["stop"]


@pytest.mark.anyio
async def test_generate_stop_token_ids(tiny: Tiny) -> None:
    client = _client(tiny)
    full = await client.generate(PROMPT, max_new_tokens=12)
    stop = full.tokens[3]
    result = await client.generate(PROMPT, max_new_tokens=12, stop_token_ids=[stop])
    assert result.tokens == full.tokens[: full.tokens.index(stop) + 1]
    assert result.finish_reasons == ["stop"]


@pytest.mark.anyio
async def test_generate_length_reason(tiny: Tiny) -> None:
    result = await _client(tiny).generate(PROMPT, max_new_tokens=3, stop_on_eos=False)
    assert len(result.tokens) == 3
    assert result.finish_reasons == ["length"]
    assert result.stats.steps == 3
    assert result.stats.new_tokens == 3
    assert result.stats.prompt_tokens == len(PROMPT)


@pytest.mark.anyio
async def test_stream_order_equals_generate(tiny: Tiny) -> None:
    client = _client(tiny)
    expected = await client.generate(PROMPT, max_new_tokens=10)
    steps: list[TokenStep] = []
    async with client.stream(PROMPT, max_new_tokens=10) as tokens:
        async for step in tokens:
            steps.append(step)
    assert [step.index for step in steps] == list(range(len(steps)))
    assert [step.token_id for step in steps] == expected.tokens
    assert tokens.result().token_ids == expected.token_ids
    assert steps[-1].finished == (True,)
    assert not any(step.finished[0] for step in steps[:-1])


@pytest.mark.anyio
async def test_stream_requires_context(tiny: Tiny) -> None:
    stream = _client(tiny).stream(PROMPT, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="async with"):
        stream.__aiter__()
    with pytest.raises(RuntimeError, match="has not finished"):
        stream.result()


@pytest.mark.anyio
async def test_stream_stopped_early_closes_session(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake)
    async with client.stream(PROMPT, max_new_tokens=10) as tokens:
        async for step in tokens:
            if step.index == 2:
                break
    assert fake.closed == 1
    assert fake.sessions == {}
    with pytest.raises(RuntimeError, match="has not finished"):
        tokens.result()


@pytest.mark.anyio
async def test_generate_closes_session(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    await _client(tiny, fake).generate(PROMPT, max_new_tokens=4)
    assert fake.opened == 1
    assert fake.closed == 1
    assert fake.aborted == 0
    assert fake.sessions == {}


@pytest.mark.anyio
async def test_batch_equals_single_runs(tiny: Tiny) -> None:
    client = _client(tiny)
    batch = await client.generate([PROMPT, OTHER_PROMPT], max_new_tokens=12)
    first = await client.generate(PROMPT, max_new_tokens=12)
    second = await client.generate(OTHER_PROMPT, max_new_tokens=12)
    assert batch.token_ids == [first.tokens, second.tokens]
    assert batch.finish_reasons == first.finish_reasons + second.finish_reasons
    assert batch.prompt_token_ids == [PROMPT, OTHER_PROMPT]
    assert batch.stats.rows == 2


@pytest.mark.anyio
async def test_batch_finished_row_keeps_padding(tiny_models: dict[str, Tiny]) -> None:
    tiny = tiny_models["llama-eos"]
    client = _client(tiny)
    short = await client.generate(PROMPT, max_new_tokens=20)
    long = await client.generate(OTHER_PROMPT, max_new_tokens=20)
    assert len(short.tokens) < len(long.tokens), "the rows should finish at different steps"

    steps: list[TokenStep] = []
    async with client.stream([PROMPT, OTHER_PROMPT], max_new_tokens=20) as tokens:
        async for step in tokens:
            steps.append(step)
    result = tokens.result()
    assert result.token_ids == [short.tokens, long.tokens]
    assert len(steps) == len(long.tokens)
    finished_at = len(short.tokens)
    assert all(step.token_ids[0] is None for step in steps[finished_at:])
    assert all(step.finished[0] for step in steps[finished_at - 1 :])


@pytest.mark.anyio
async def test_sampling_seed_reproducible(tiny: Tiny) -> None:
    client = _client(tiny)
    options: dict[str, Any] = {"max_new_tokens": 12, "temperature": 1.5, "stop_on_eos": False}
    first = await client.generate(PROMPT, seed=11, **options)
    again = await client.generate(PROMPT, seed=11, **options)
    others = [await client.generate(PROMPT, seed=seed, **options) for seed in range(4)]
    assert first.tokens == again.tokens
    assert any(other.tokens != first.tokens for other in others)


@pytest.mark.anyio
async def test_sampling_top_k_one_is_greedy(tiny: Tiny) -> None:
    client = _client(tiny)
    greedy = await client.generate(PROMPT, max_new_tokens=8)
    sampled = await client.generate(PROMPT, max_new_tokens=8, temperature=2.0, top_k=1, seed=5)
    tiny_p = await client.generate(PROMPT, max_new_tokens=8, temperature=2.0, top_p=1e-6, seed=5)
    assert sampled.tokens == greedy.tokens
    assert tiny_p.tokens == greedy.tokens


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"timeout": 0}, "timeout"),
    ],
)
async def test_generate_rejects_invalid_options(
    tiny: Tiny, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        await _client(tiny).generate(PROMPT, **kwargs)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "prompts is empty"),
        ([[5, 6], []], "prompt 1 is empty"),
        ([5, 100], "token id 100"),
        ([5, -1], "token id -1"),
        ("hello", "no tokenizer"),
    ],
)
async def test_generate_rejects_invalid_prompt(tiny: Tiny, prompt: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        await _client(tiny).generate(prompt, max_new_tokens=2)


@pytest.mark.anyio
async def test_generate_rejects_too_long(tiny: Tiny) -> None:
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        await _client(tiny).generate(list(range(3, 63)), max_new_tokens=8)


@pytest.mark.anyio
async def test_generate_timing(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    result = await _client(tiny, fake).generate(PROMPT, max_new_tokens=5, stop_on_eos=False)
    stats = result.stats
    hidden_bytes = tiny.trunk.hidden_size * 4
    assert stats.prefill.bytes_sent == len(PROMPT) * hidden_bytes
    assert stats.decode.bytes_sent == 4 * hidden_bytes
    assert stats.total.bytes_received == stats.total.bytes_sent
    assert stats.total.server_seconds == pytest.approx(0.005)
    assert stats.total.client_seconds > 0
    assert stats.total.total_seconds >= stats.total.client_seconds
    assert stats.total.network_seconds >= 0
    assert stats.bytes_per_token == (9 * hidden_bytes / 5, 9 * hidden_bytes / 5)
    assert stats.tokens_per_second > 0


@pytest.mark.anyio
async def test_prompt_chunked_by_step_bytes(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    # 8 positions per session step: a position of one row is 32 floats of 4 bytes.
    client = _client(tiny, fake, max_step_bytes=1024)
    expected = await _client(tiny).generate(PROMPT * 3, max_new_tokens=4, stop_on_eos=False)
    result = await client.generate(PROMPT * 3, max_new_tokens=4, stop_on_eos=False)
    assert result.tokens == expected.tokens
    assert result.stats.steps == 4
    # The 15-token prompt took two session steps, each new token one.
    assert fake.steps == 5


# Session loss ------------------------------------------------------------------------------


async def _stream_with(
    client: SplitClient, prompt: list[int], steps: int, on_step: Callable[[int], None]
) -> list[int]:
    tokens_out: list[int] = []
    async with client.stream(prompt, max_new_tokens=steps, stop_on_eos=False) as tokens:
        async for step in tokens:
            assert step.token_id is not None
            tokens_out.append(step.token_id)
            on_step(step.index)
    return tokens_out


@pytest.mark.anyio
async def test_session_restart_replays(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake)
    expected = await client.generate(PROMPT, max_new_tokens=12, stop_on_eos=False)
    fake.opened = 0

    def restart_at_four(index: int) -> None:
        if index == 4:
            fake.restart()

    tokens = await _stream_with(client, PROMPT, 12, restart_at_four)
    assert tokens == expected.tokens
    assert fake.opened == 2
    assert fake.resumed == 0


@pytest.mark.anyio
@pytest.mark.parametrize("prompts", [PROMPT, [PROMPT, OTHER_PROMPT]], ids=["one", "batch"])
async def test_session_break_resumes(tiny: Tiny, prompts: Any) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake)
    expected = await client.generate(prompts, max_new_tokens=10, stop_on_eos=False)
    fake.opened = 0
    fake.steps = 0
    fake.step_faults = {5: "break"}
    async with client.stream(prompts, max_new_tokens=10, stop_on_eos=False) as tokens:
        async for _ in tokens:
            pass
    result = tokens.result()
    assert result.token_ids == expected.token_ids
    assert fake.opened == 1
    assert fake.resumed == 1
    # Resuming keeps the server's cache, so nothing is replayed: one step per token plus
    # the broken one.
    assert fake.steps == 11
    assert result.stats.session_rebuilds == 1


@pytest.mark.anyio
async def test_session_lost_reply_replays(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake)
    expected = await client.generate(PROMPT, max_new_tokens=10, stop_on_eos=False)
    fake.opened = 0
    fake.steps = 0
    fake.step_faults = {5: "lose"}
    result = await client.generate(PROMPT, max_new_tokens=10, stop_on_eos=False)
    assert result.tokens == expected.tokens
    # The resumed session held one step more than the client had, so it was replaced.
    assert fake.resumed == 1
    assert fake.opened == 2
    assert result.stats.session_rebuilds == 1


@pytest.mark.anyio
async def test_session_expired_replays(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake)
    expected = await client.generate([PROMPT, OTHER_PROMPT], max_new_tokens=10)
    fake.opened = 0
    fake.steps = 0
    fake.step_faults = {3: "expire", 7: "expire"}
    result = await client.generate([PROMPT, OTHER_PROMPT], max_new_tokens=10)
    assert result.token_ids == expected.token_ids
    assert fake.opened == 3
    assert fake.resumed == 0
    assert result.stats.session_rebuilds == 2


@pytest.mark.anyio
async def test_session_resume_disabled(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake, resume_sessions=False)
    expected = await client.generate(PROMPT, max_new_tokens=8, stop_on_eos=False)
    fake.opened = 0
    fake.steps = 0
    fake.step_faults = {4: "break"}
    result = await client.generate(PROMPT, max_new_tokens=8, stop_on_eos=False)
    assert result.tokens == expected.tokens
    assert fake.resumed == 0
    assert fake.opened == 2


@pytest.mark.anyio
async def test_session_rebuild_retries_open(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake)
    expected = await client.generate(PROMPT, max_new_tokens=8, stop_on_eos=False)

    def restart_while_down(index: int) -> None:
        if index == 2:
            fake.restart()
            fake.open_errors = [
                ServerUnavailableError("connection refused"),
                ModelLoadingError("model 'tiny' is loading", retry_after=0.001),
            ]

    tokens = await _stream_with(client, PROMPT, 8, restart_while_down)
    assert tokens == expected.tokens


@pytest.mark.anyio
async def test_session_rebuild_gives_up(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(
        tiny, fake, retry=RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001)
    )

    def go_down(index: int) -> None:
        if index == 1:
            fake.restart()
            fake.open_errors = [ServerUnavailableError(f"refused {i}") for i in range(20)]

    with pytest.raises(ServerUnavailableError, match="refused"):
        await _stream_with(client, PROMPT, 8, go_down)


@pytest.mark.anyio
async def test_session_invalid_argument_not_rebuilt(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake)
    fake.open_errors = [InvalidTensorError("hidden_states is invalid")]
    with pytest.raises(InvalidTensorError):
        await client.generate(PROMPT, max_new_tokens=4)
    assert fake.opened == 0


@pytest.mark.trio
async def test_generate_deadline(autojump_clock: trio.testing.MockClock, tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    fake.step_delay = 2.0
    client = _client(tiny, fake)
    started = trio.current_time()
    with pytest.raises(DeadlineExceededError):
        await client.generate(PROMPT, max_new_tokens=10, stop_on_eos=False, timeout=5.0)
    assert trio.current_time() - started == pytest.approx(5.0)


@pytest.mark.trio
async def test_generate_call_timeout(autojump_clock: trio.testing.MockClock, tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    fake.step_delay = 2.0
    client = _client(tiny, fake, call_timeout=1.0)
    with pytest.raises(DeadlineExceededError, match="timed out after 1.000 s"):
        await client.generate(PROMPT, max_new_tokens=3)


@pytest.mark.anyio
async def test_generate_cancelled_aborts_session(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    client = _client(tiny, fake)
    with anyio.CancelScope() as scope:
        async with client.stream(PROMPT, max_new_tokens=10) as tokens:
            async for step in tokens:
                if step.index == 1:
                    fake.step_delay = 100.0
                    scope.cancel()
    assert scope.cancelled_caught
    assert fake.aborted + fake.closed == 1


# Creating a client -------------------------------------------------------------------------


@pytest.mark.trio
async def test_create_waits_while_loading(
    autojump_clock: trio.testing.MockClock, tiny: Tiny
) -> None:
    fake = FakeTrunk(tiny.trunk)
    fake.describe_errors = [ModelLoadingError("loading", retry_after=2.0) for _ in range(3)]
    started = trio.current_time()
    client = await SplitClient.create(fake, "tiny", bottom=tiny.bottom, top=tiny.top)
    assert fake.describe_calls == 4
    assert trio.current_time() - started >= 6.0
    assert client.model.layer_range == LAYERS


@pytest.mark.trio
async def test_create_connect_timeout(autojump_clock: trio.testing.MockClock, tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    fake.describe_errors = [ModelLoadingError("loading", retry_after=1.0) for _ in range(100)]
    started = trio.current_time()
    with pytest.raises(DeadlineExceededError):
        await SplitClient.create(
            fake, "tiny", bottom=tiny.bottom, top=tiny.top, connect_timeout=10.0
        )
    assert trio.current_time() - started <= 10.0


@pytest.mark.anyio
async def test_create_not_found(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    with pytest.raises(ModelNotFoundError):
        await SplitClient.create(fake, "missing", bottom=tiny.bottom, top=tiny.top)
    assert fake.describe_calls == 1


@pytest.mark.anyio
async def test_create_rejects_wrong_split(tiny: Tiny) -> None:
    other = split_model(tiny.whole, (2, 3))
    with pytest.raises(ConfigError, match=r"must hold \(0, 1\)"):
        await SplitClient.create(FakeTrunk(tiny.trunk), "tiny", bottom=other.bottom, top=other.top)


@pytest.mark.anyio
async def test_create_rejects_other_architecture(tiny_models: dict[str, Tiny]) -> None:
    gpt2 = tiny_models["gpt2"]
    llama = tiny_models["llama"]
    with pytest.raises(ConfigError, match="same checkpoint"):
        await SplitClient.create(FakeTrunk(llama.trunk), "tiny", bottom=gpt2.bottom, top=gpt2.top)


@pytest.mark.anyio
async def test_create_rejects_full_model(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk, part="full")
    with pytest.raises(ConfigError, match="part='trunk'"):
        await SplitClient.create(fake, "tiny", bottom=tiny.bottom, top=tiny.top)


@pytest.mark.anyio
async def test_create_needs_parts_or_checkpoint(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    with pytest.raises(ConfigError, match="checkpoint="):
        await SplitClient.create(fake, "tiny")
    with pytest.raises(ConfigError, match="both bottom= and top="):
        await SplitClient.create(fake, "tiny", bottom=tiny.bottom)


@pytest.mark.anyio
async def test_create_loads_parts_from_checkpoint(tiny: Tiny) -> None:
    client = await SplitClient.create(
        FakeTrunk(tiny.trunk), "tiny", checkpoint=tiny.path, load_tokenizer=False
    )
    assert client.bottom.layer_range == (0, LAYERS[0])
    assert client.top.layer_range == (LAYERS[1], 4)
    result = await client.generate(PROMPT, max_new_tokens=8)
    assert result.tokens == tiny.greedy(PROMPT, 8)


# Single passes -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_forward_equals_whole_model(tiny: Tiny) -> None:
    ids = torch.tensor([PROMPT, [0, 0, *OTHER_PROMPT]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    result = await _client(tiny).forward(ids, attention_mask=mask)
    with torch.no_grad():
        expected = tiny.whole(ids, attention_mask=mask).logits
    torch.testing.assert_close(result.logits[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.logits[1, 2:], expected[1, 2:], atol=1e-5, rtol=1e-5)


@pytest.mark.anyio
async def test_trunk_forward_retried(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    fake.forward_errors = [ServerUnavailableError("refused"), ServerUnavailableError("refused")]
    hidden = torch.randn(1, 4, tiny.trunk.hidden_size)
    result = await _client(tiny, fake).trunk_forward(hidden)
    assert fake.forward_calls == 3
    assert result.tensor.shape == hidden.shape


@pytest.mark.anyio
async def test_trunk_backward_not_retried(tiny: Tiny) -> None:
    fake = FakeTrunk(tiny.trunk)
    hidden = torch.randn(1, 4, tiny.trunk.hidden_size)
    with pytest.raises(ServerUnavailableError):
        await _client(tiny, fake).trunk_backward(hidden, torch.ones_like(hidden))
    assert fake.backward_calls == 1


# Over gRPC, against a real server on 127.0.0.1 -------------------------------------------------


@asynccontextmanager
async def _serve(tiny: Tiny, *, port: int = 0, **config: Any) -> AsyncIterator[Any]:
    from slm_trio.server import AsyncManagedServer

    settings = ServerConfig(port=port, grace_period=0.2, **config)
    async with AsyncManagedServer(settings) as server:
        await server.load_model(
            ModelConfig(model_id="tiny", model_path=str(tiny.path), part="trunk", layers=LAYERS)
        )
        yield server


@pytest.mark.anyio
async def test_grpc_generate_equals_whole_model(tiny: Tiny) -> None:
    async with (
        _serve(tiny) as server,
        open_split_client(
            "127.0.0.1", server.port, "tiny", checkpoint=tiny.path, load_tokenizer=False
        ) as client,
    ):
        single = await client.generate(PROMPT, max_new_tokens=12)
        batch = await client.generate([PROMPT, OTHER_PROMPT], max_new_tokens=12)
        other = await client.generate(OTHER_PROMPT, max_new_tokens=12)
        streamed = []
        async with client.stream(PROMPT, max_new_tokens=12) as tokens:
            async for step in tokens:
                streamed.append(step.token_id)
    assert single.tokens == tiny.greedy(PROMPT, 12)
    assert streamed == single.tokens
    assert batch.token_ids == [single.tokens, other.tokens]
    assert single.stats.total.bytes_sent > 0
    assert single.stats.total.server_seconds > 0


@pytest.mark.anyio
async def test_grpc_steps_fit_server_limits(tiny: Tiny) -> None:
    prompt = PROMPT * 3
    async with (
        _serve(tiny, max_message_bytes=2048, max_request_tokens=4) as server,
        open_split_client(
            "127.0.0.1", server.port, "tiny", checkpoint=tiny.path, load_tokenizer=False
        ) as client,
    ):
        assert client.model.max_message_bytes == 2048
        assert client.model.max_request_tokens == 4
        result = await client.generate(prompt, max_new_tokens=6, stop_on_eos=False)
        # Two rows per step leave 2 positions per step for the prompt of the batch.
        batch = await client.generate([prompt, prompt[:5]], max_new_tokens=3, stop_on_eos=False)
    assert result.tokens == tiny.greedy(prompt, 6)
    assert batch.token_ids[0] == tiny.greedy(prompt, 3)


@pytest.mark.anyio
async def test_grpc_reload_with_other_split_rejected(tiny: Tiny) -> None:
    async with (
        _serve(tiny) as server,
        open_split_client(
            "127.0.0.1", server.port, "tiny", checkpoint=tiny.path, load_tokenizer=False
        ) as client,
    ):
        before = await client.generate(PROMPT, max_new_tokens=3)
        assert before.tokens == tiny.greedy(PROMPT, 3)

        # Reloaded with other split points, the trunk no longer fits the client's parts.
        await server.manager.reload_model(
            "tiny",
            ModelConfig(model_id="tiny", model_path=str(tiny.path), part="trunk", layers=(1, 2)),
        )
        with pytest.raises(ModelSplitMismatchError, match=r"serves layers \[1, 2\)"):
            await client.generate(PROMPT, max_new_tokens=3)
        with pytest.raises(ModelSplitMismatchError, match=r"built for layers \[1, 3\)"):
            await client.trunk_forward(torch.zeros(1, 2, 32))


@pytest.mark.anyio
async def test_grpc_server_restart_continues(tiny: Tiny) -> None:
    stop_first = anyio.Event()
    second_ready = anyio.Event()
    done = anyio.Event()

    async def run_servers(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with _serve(tiny) as first:
            port = first.port
            task_status.started(port)
            await stop_first.wait()
        # A new server on the same port, with the same model and no sessions.
        async with _serve(tiny, port=port):
            second_ready.set()
            await done.wait()

    async with anyio.create_task_group() as task_group:
        port = await task_group.start(run_servers)
        async with open_split_client(
            "127.0.0.1",
            port,
            "tiny",
            checkpoint=tiny.path,
            load_tokenizer=False,
            retry=RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.5),
        ) as client:
            expected = await client.generate(PROMPT, max_new_tokens=12, stop_on_eos=False)
            got: list[int] = []
            async with client.stream(PROMPT, max_new_tokens=12, stop_on_eos=False) as tokens:
                async for step in tokens:
                    assert step.token_id is not None
                    got.append(step.token_id)
                    if step.index == 4:
                        stop_first.set()
                        await second_ready.wait()
            result = tokens.result()
        done.set()
    assert got == expected.tokens
    assert result.stats.session_rebuilds >= 1


@pytest.mark.anyio
async def test_grpc_management_calls(tiny: Tiny) -> None:
    async with _serve(tiny) as server, open_management_client("127.0.0.1", server.port) as admin:
        listed = await admin.list_models()
        assert [(m.model_id, m.state, m.part, m.layers) for m in listed] == [
            ("tiny", "READY", "trunk", LAYERS)
        ]
        described = await admin.describe_model("tiny")
        assert described.facts is not None
        assert described.facts.layer_range == LAYERS
        assert described.facts.num_hidden_layers == 4
        config = ModelConfig(
            model_id="tiny-b", model_path=str(tiny.path), part="trunk", layers=(0, 2)
        )
        loaded = await admin.load_model(config)
        assert loaded.state == "READY"
        await admin.unload_model("tiny-b")
        with pytest.raises(ModelNotFoundError):
            await admin.describe_model("tiny-b")


@pytest.mark.anyio
async def test_grpc_backward_matches_autograd(tiny: Tiny) -> None:
    hidden = torch.randn(1, 4, tiny.trunk.hidden_size)
    grad_output = torch.randn_like(hidden)
    async with (
        _serve(tiny) as server,
        open_split_client(
            "127.0.0.1", server.port, "tiny", bottom=tiny.bottom, top=tiny.top
        ) as client,
    ):
        forward = await client.trunk_forward(hidden)
        backward = await client.trunk_backward(hidden, grad_output)
    leaf = hidden.clone().requires_grad_(True)
    output = tiny.trunk(leaf)
    output.backward(grad_output)
    assert leaf.grad is not None
    torch.testing.assert_close(forward.tensor, output.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backward.tensor, leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.anyio
async def test_grpc_server_down(tiny: Tiny) -> None:
    async with _serve(tiny) as server:
        port = server.port
    with pytest.raises(ServerUnavailableError, match="could not reach"):
        async with open_split_client(
            "127.0.0.1",
            port,
            "tiny",
            bottom=tiny.bottom,
            top=tiny.top,
            retry=RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01),
        ):
            pass


# Incremental detokenization ------------------------------------------------------------------


class ByteTokenizer:
    """One token per UTF-8 byte. Like SentencePiece, decoding drops one leading space."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace").removeprefix(" ")


def stream_texts(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Feed ``token_ids`` one at a time to `decode_new_text`, and return each step's text."""
    texts, prefix, read = [], 0, 0
    for count in range(1, len(token_ids) + 1):
        text, prefix, read = decode_new_text(tokenizer, token_ids[:count], prefix, read)
        texts.append(text)
    return texts


def test_decode_new_text_joins_to_whole_text() -> None:
    tokenizer = ByteTokenizer()
    token_ids = tokenizer.encode("Hello wörld, 你好 👋 and  two spaces")

    texts = stream_texts(tokenizer, token_ids)

    assert "".join(texts) == tokenizer.decode(token_ids)
    assert "\ufffd" not in "".join(texts)
    # The 4-byte emoji arrives as one piece, after its last byte.
    assert "👋" in texts


def test_decode_new_text_window_stays_short() -> None:
    class CountingTokenizer(ByteTokenizer):
        longest = 0

        def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(token_ids))
            return super().decode(token_ids, skip_special_tokens)

    tokenizer = CountingTokenizer()
    stream_texts(tokenizer, tokenizer.encode("word " * 200))

    assert tokenizer.longest <= 2


# The real model ----------------------------------------------------------------------------

SMOLLM2_LAYERS = (4, 26)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2_parts(smollm2_path: Path) -> dict[str, Any]:
    """SmolLM2's bottom, trunk and top at layers (4, 26), and its tokenizer, loaded once."""
    from slm_trio.loading import load_model, load_tokenizer

    parts: dict[str, Any] = {}
    for kind in ("bottom", "trunk", "top"):
        config = ModelConfig(
            model_id=f"smollm2-{kind}",
            model_path=str(smollm2_path),
            part=kind,  # type: ignore[arg-type]
            layers=SMOLLM2_LAYERS,
        )
        parts[kind] = load_model(config)
    parts["tokenizer"] = load_tokenizer(
        ModelConfig(model_id="smollm2", model_path=str(smollm2_path))
    )
    return parts


@pytest.mark.slow
def test_smollm2_stream_text_equals_decode(smollm2_parts: dict[str, Any]) -> None:
    tokenizer = smollm2_parts["tokenizer"]
    text = "The capital of France is Paris.\n  Indented, 你好, naïve café 👋!"
    token_ids = tokenizer.encode(text, add_special_tokens=False)

    texts = stream_texts(tokenizer, token_ids)

    assert "".join(texts) == tokenizer.decode(token_ids, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.anyio
async def test_smollm2_answer_equals_whole_model(
    smollm2_parts: dict[str, Any], smollm2_whole: Any
) -> None:
    from slm_trio.server import AsyncManagedServer

    def preloaded(config: ModelConfig, progress: Any) -> Any:
        return smollm2_parts["trunk"]

    trunk = ModelConfig(
        model_id="smollm2", model_path="preloaded", part="trunk", layers=SMOLLM2_LAYERS
    )
    async with (
        AsyncManagedServer(port=0, loader=preloaded) as server,
    ):
        await server.load_model(trunk)
        async with open_split_client(
            "127.0.0.1",
            server.port,
            "smollm2",
            bottom=smollm2_parts["bottom"],
            top=smollm2_parts["top"],
            tokenizer=smollm2_parts["tokenizer"],
        ) as client:
            result = await client.generate(QUESTION, chat=True, max_new_tokens=30)
            prompt = client.chat_prompt(QUESTION)

    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = smollm2_whole.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30
        )
    assert result.tokens == expected[0, len(prompt) :].tolist()
    assert "Paris" in result.text
