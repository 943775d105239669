"""Tests of the client's retry policy: which errors retry, backoff bounds, deadlines."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio

from slm_trio.client import RetryPolicy, is_retryable
from slm_trio.client._retry import call_with_retry, remaining_timeout
from slm_trio.config import ModelConfig
from slm_trio.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidTensorError,
    LoadCancelledError,
    ManagerClosedError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelUnloadingError,
    RemoteError,
    ServerUnavailableError,
    SessionError,
    SlmTrioError,
)


def test_policy_cap_grows_then_saturates() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    caps = [policy.backoff_cap(retry) for retry in range(1, 8)]
    assert caps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_policy_cap_huge_retry_number() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=3.0, multiplier=10.0)
    assert policy.backoff_cap(10_000) == 3.0


@pytest.mark.parametrize("retry", [1, 2, 3, 5, 8, 20])
@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.999999])
def test_policy_delay_full_jitter_bounds(retry: int, jitter: float) -> None:
    policy = RetryPolicy(initial_backoff=0.2, max_backoff=5.0, multiplier=2.0)
    cap = policy.backoff_cap(retry)
    delay = policy.delay(retry, jitter=jitter)
    assert 0.0 <= delay < cap or (cap == 0 and delay == 0)
    assert delay == pytest.approx(jitter * cap)
    assert delay <= policy.max_backoff


def test_policy_delay_random_jitter_spread() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=1.0)
    rng = random.Random(7)
    delays = [policy.delay(1, jitter=rng.random()) for _ in range(1000)]
    assert min(delays) >= 0.0
    assert max(delays) < 1.0
    # Full jitter spreads delays over the whole range, not around the cap.
    assert min(delays) < 0.05
    assert max(delays) > 0.95


def test_policy_delay_honours_retry_after() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=5.0)
    assert policy.delay(1, jitter=0.0, retry_after=2.5) == 2.5
    assert policy.delay(1, jitter=0.5, retry_after=0.01) == pytest.approx(0.05)


def test_policy_delay_caps_retry_after() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=5.0)
    assert policy.delay(1, jitter=0.0, retry_after=3600.0) == 5.0


def test_policy_delay_ignores_retry_after_when_off() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=5.0, use_retry_after=False)
    assert policy.delay(1, jitter=0.0, retry_after=2.5) == 0.0


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 2.0])
def test_policy_delay_rejects_bad_jitter(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy().delay(1, jitter=jitter)


def test_policy_delay_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match="retry=0"):
        RetryPolicy().delay(0, jitter=0.5)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial_backoff": -1.0}, "initial_backoff"),
        ({"max_backoff": float("inf")}, "max_backoff"),
        ({"initial_backoff": 2.0, "max_backoff": 1.0}, "max_backoff"),
        ({"multiplier": 0.5}, "multiplier"),
    ],
)
def test_policy_rejects_invalid(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        RetryPolicy(**fields)


def test_policy_no_retries() -> None:
    assert RetryPolicy.no_retries().max_attempts == 1


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ModelLoadingError("loading", retry_after=1.0), True),
        (ModelUnloadingError("unloading"), False),
        (ManagerClosedError("shutting down"), True),
        (LoadCancelledError("cancelled"), True),
        (ServerUnavailableError("connection refused"), True),
        (RemoteError("server stopping", code="UNAVAILABLE"), True),
        (RemoteError("bug", code="INTERNAL"), False),
        (RemoteError("unknown", code="UNKNOWN"), False),
        (InvalidTensorError("bad shape"), False),
        (ConfigError("bad field"), False),
        (ModelNotFoundError("no such model"), False),
        (SessionError("expired"), False),
        (DeadlineExceededError("too slow"), False),
        (SlmTrioError("base"), False),
        (RuntimeError("not ours"), False),
    ],
)
def test_is_retryable(error: BaseException, retryable: bool) -> None:
    assert is_retryable(error) is retryable


class _Flaky:
    """An attempt function that raises the given errors one by one, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.times: list[float] = []

    async def __call__(self) -> str:
        self.calls += 1
        self.times.append(anyio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.trio
async def test_call_with_retry_recovers(autojump_clock: trio.testing.MockClock) -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=4.0, multiplier=2.0)
    attempt = _Flaky(ServerUnavailableError("refused"), RemoteError("stopping", code="UNAVAILABLE"))
    started = trio.current_time()
    result = await call_with_retry(attempt, policy=policy, operation="test", rng=random.Random(1))
    assert result == "ok"
    assert attempt.calls == 3
    gaps = [b - a for a, b in zip([started, *attempt.times], attempt.times, strict=False)][1:]
    assert 0.0 <= gaps[0] < policy.backoff_cap(1)
    assert 0.0 <= gaps[1] < policy.backoff_cap(2)


@pytest.mark.trio
async def test_call_with_retry_honours_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=10.0)
    attempt = _Flaky(ModelLoadingError("loading", retry_after=3.0))
    await call_with_retry(attempt, policy=policy, operation="test", rng=random.Random(1))
    assert attempt.times[1] - attempt.times[0] >= 3.0


@pytest.mark.trio
async def test_call_with_retry_max_attempts(autojump_clock: trio.testing.MockClock) -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.5)
    attempt = _Flaky(*[ServerUnavailableError(f"refused {i}") for i in range(5)])
    with pytest.raises(ServerUnavailableError, match="refused 2"):
        await call_with_retry(attempt, policy=policy, operation="test")
    assert attempt.calls == 3


@pytest.mark.trio
@pytest.mark.parametrize(
    "error",
    [
        InvalidTensorError("bad shape"),
        ModelNotFoundError("no such model"),
        RemoteError("bug", code="INTERNAL"),
        DeadlineExceededError("too slow"),
    ],
)
async def test_call_with_retry_not_retried(
    autojump_clock: trio.testing.MockClock, error: Exception
) -> None:
    attempt = _Flaky(error)
    with pytest.raises(type(error)):
        await call_with_retry(attempt, policy=RetryPolicy(), operation="test")
    assert attempt.calls == 1


@pytest.mark.trio
async def test_call_with_retry_deadline_stops(autojump_clock: trio.testing.MockClock) -> None:
    policy = RetryPolicy(max_attempts=100, initial_backoff=1.0, max_backoff=1.0)
    attempt = _Flaky(*[ModelLoadingError("loading", retry_after=1.0) for _ in range(100)])
    deadline = trio.current_time() + 3.5
    with pytest.raises(DeadlineExceededError, match="deadline") as caught:
        await call_with_retry(attempt, policy=policy, operation="test", deadline=deadline)
    assert isinstance(caught.value.__cause__, ModelLoadingError)
    assert trio.current_time() <= deadline
    assert attempt.calls == 4


@pytest.mark.trio
async def test_call_with_retry_reports_retries(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[BaseException] = []
    attempt = _Flaky(ServerUnavailableError("a"), ServerUnavailableError("b"))
    await call_with_retry(attempt, policy=RetryPolicy(), operation="test", on_retry=seen.append)
    assert [str(error) for error in seen] == ["a", "b"]


@pytest.mark.trio
async def test_remaining_timeout(autojump_clock: trio.testing.MockClock) -> None:
    now = trio.current_time()
    assert remaining_timeout(None, None) is None
    assert remaining_timeout(5.0, None) == 5.0
    assert remaining_timeout(5.0, now + 2.0) == pytest.approx(2.0)
    assert remaining_timeout(1.0, now + 2.0) == 1.0
    assert remaining_timeout(None, now + 2.0) == pytest.approx(2.0)
    await trio.sleep(3.0)
    with pytest.raises(DeadlineExceededError, match="deadline passed"):
        remaining_timeout(5.0, now + 2.0)


# A server returning UNAVAILABLE while its model loads ---------------------------------------


@pytest.mark.anyio
async def test_generate_retries_while_model_loads(
    tiny_model_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from slm_trio.client import GrpcTrunkTransport, RemoteModel, SplitClient
    from slm_trio.client._connection import open_connection
    from slm_trio.loading import load_model
    from slm_trio.server import AsyncManagedServer
    from slm_trio.split import ModelPart

    path = str(tiny_model_dirs["llama"])
    layers = (1, 3)
    released = threading.Event()

    def gated_loader(config: ModelConfig, progress: Any) -> Any:
        # Blocks in the manager's worker thread until the test has seen a retry.
        released.wait(timeout=60)
        return load_model(config, progress)

    bottom = load_model(ModelConfig(model_id="b", model_path=path, part="bottom", layers=layers))
    top = load_model(ModelConfig(model_id="t", model_path=path, part="top", layers=layers))
    assert isinstance(bottom, ModelPart)
    assert isinstance(top, ModelPart)
    facts = RemoteModel(
        model_id="tiny",
        model_type="llama",
        part="trunk",
        hidden_size=bottom.hidden_size,
        num_hidden_layers=bottom.num_hidden_layers,
        layer_range=layers,
        vocab_size=bottom.vocab_size,
        dtype="float32",
    )
    trunk = ModelConfig(model_id="tiny", model_path=path, part="trunk", layers=layers)
    caplog.set_level(logging.INFO, logger="slm_trio.client")

    async with AsyncManagedServer(port=0, loader=gated_loader) as server:
        handle = server.manager.start_load(trunk)
        async with open_connection("127.0.0.1", server.port) as connection:
            client = SplitClient(
                transport=GrpcTrunkTransport(connection),
                model=facts,
                bottom=bottom,
                top=top,
                retry=RetryPolicy(max_attempts=50, initial_backoff=0.05, max_backoff=0.2),
            )
            async with anyio.create_task_group() as task_group:

                async def release_after_first_retry() -> None:
                    while not any("rpc.retry" in r.getMessage() for r in caplog.records):
                        await anyio.sleep(0.01)
                    released.set()

                task_group.start_soon(release_after_first_retry)
                result = await client.generate([5, 6, 7], max_new_tokens=4)
            await handle.wait()

    retries = [r.getMessage() for r in caplog.records if "rpc.retry" in r.getMessage()]
    assert retries
    assert all("ModelLoadingError" in message for message in retries)
    assert result.stats.retries == len(retries)
    assert len(result.tokens) == 4
