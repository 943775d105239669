"""Specification of AsyncModelManager, with a fake loader the tests control.

The fake loader runs in the manager's worker thread like a real one, but
waits on events (or sleeps on the event loop's clock) that the test owns, so
every test is deterministic on both backends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest
import trio
import trio.testing

from slm_trio.config import ModelConfig
from slm_trio.errors import (
    ManagerClosedError,
    ModelCapacityError,
    ModelConflictError,
    ModelLoadError,
    ModelLoadingError,
    ModelLoadTimeoutError,
    ModelNotFoundError,
    ModelUnloadingError,
)
from slm_trio.manager import AsyncModelManager, ModelState


@dataclass(eq=False)
class FakeModel:
    model_id: str
    generation: int


@dataclass
class Plan:
    """How the fake loader behaves for one model id."""

    gate: anyio.Event | None = None
    # A gate the thread waits on without the event loop: anyio cancels an
    # abandoned thread's calls into the loop, so a thread that must outlive
    # its cancelled caller waits on this instead.
    thread_gate: threading.Event | None = None
    sleep: float = 0.0
    error: Exception | None = None
    steps: int = 1
    # False models a loader that never reports progress, so it cannot stop early.
    report_progress: bool = True


@dataclass
class FakeLoader:
    plans: dict[str, Plan] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    created: list[FakeModel] = field(default_factory=list)
    released: list[FakeModel] = field(default_factory=list)
    entered: dict[str, anyio.Event] = field(default_factory=dict)
    released_event: threading.Event = field(default_factory=threading.Event)
    finished: int = 0
    condition: threading.Condition = field(default_factory=threading.Condition)

    def plan(self, model_id: str, **kwargs: Any) -> Plan:
        self.plans[model_id] = Plan(**kwargs)
        return self.plans[model_id]

    def __call__(self, config: ModelConfig, progress: Callable[[float], None]) -> FakeModel:
        try:
            return self._load(config, progress)
        finally:
            with self.condition:
                self.finished += 1
                self.condition.notify_all()

    def wait_idle(self) -> None:
        """Block until every loader call has returned or raised."""
        with self.condition:
            self.condition.wait_for(lambda: self.finished == len(self.calls), timeout=10)

    def _load(self, config: ModelConfig, progress: Callable[[float], None]) -> FakeModel:
        self.calls.append(config.model_id)
        entered = self.entered.get(config.model_id)
        if entered is not None:
            anyio.from_thread.run_sync(entered.set)
        plan = self.plans.get(config.model_id, Plan())
        for step in range(plan.steps):
            if plan.gate is not None:
                anyio.from_thread.run(plan.gate.wait)
            if plan.thread_gate is not None:
                plan.thread_gate.wait(10)
            if plan.sleep:
                anyio.from_thread.run(anyio.sleep, plan.sleep / plan.steps)
            if plan.report_progress:
                progress((step + 1) / plan.steps)
        if plan.error is not None:
            raise plan.error
        model = FakeModel(config.model_id, len(self.created))
        self.created.append(model)
        return model

    def release(self, model: FakeModel) -> None:
        with self.condition:
            self.released.append(model)
            self.condition.notify_all()
        self.released_event.set()

    def wait_all_released(self, keep: int = 0) -> None:
        """Block until all but ``keep`` created models are released (releases run in threads)."""
        with self.condition:
            self.condition.wait_for(lambda: len(self.live()) <= keep, timeout=10)

    def live(self) -> list[FakeModel]:
        return [m for m in self.created if m not in self.released]


def config(model_id: str, **kwargs: Any) -> ModelConfig:
    return ModelConfig(model_id=model_id, model_path=f"/models/{model_id}", **kwargs)


def make_manager(loader: FakeLoader, **kwargs: Any) -> AsyncModelManager:
    return AsyncModelManager(loader=loader, releaser=loader.release, **kwargs)


def states(manager: AsyncModelManager) -> dict[str, str]:
    return {info.model_id: info.state.value for info in manager.list_models_nowait()}


async def wait_for_state(manager: AsyncModelManager, model_id: str, state: str) -> None:
    while states(manager).get(model_id) != state:
        await anyio.lowlevel.checkpoint()


# -- loading ------------------------------------------------------------------


@pytest.mark.anyio
async def test_load_publishes_ready_model() -> None:
    loader = FakeLoader()
    manager = make_manager(loader)

    info = await manager.load_model(config("a"))

    assert info.state is ModelState.READY
    assert info.progress == 1.0
    assert info.load_seconds is not None
    assert (await manager.get_model("a")) is loader.created[0]
    await manager.shutdown()
    assert loader.released == loader.created


@pytest.mark.anyio
async def test_loads_of_different_ids_overlap() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    loader.plan("a", gate=gate)
    loader.plan("b", gate=gate)
    loader.entered = {"a": anyio.Event(), "b": anyio.Event()}

    async with make_manager(loader, max_load_workers=2) as manager:
        handle_a = manager.start_load(config("a"))
        handle_b = manager.start_load(config("b"))
        # Both loader threads are inside the loader at once.
        await loader.entered["a"].wait()
        await loader.entered["b"].wait()
        assert states(manager) == {"a": "LOADING", "b": "LOADING"}
        gate.set()
        await handle_a.wait()
        await handle_b.wait()
        assert states(manager) == {"a": "READY", "b": "READY"}


@pytest.mark.anyio
async def test_list_models_answers_while_loading() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    loader.plan("a", gate=gate, steps=4)
    loader.entered = {"a": anyio.Event()}

    async with make_manager(loader) as manager:
        handle = manager.start_load(config("a"))
        assert states(manager) == {"a": "LOADING"}
        await loader.entered["a"].wait()
        polls = 0
        while not handle.done:
            infos = await manager.list_models()
            assert [i.state for i in infos] in ([ModelState.LOADING], [ModelState.READY])
            polls += 1
            if polls == 3:
                gate.set()
        assert polls >= 3
        assert (await handle.wait()).state is ModelState.READY


@pytest.mark.anyio
async def test_duplicate_loads_coalesce() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    loader.plan("a", gate=gate)
    results = []

    async with make_manager(loader) as manager:

        async def load() -> None:
            results.append(await manager.load_model(config("a")))

        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            tg.start_soon(load)
            tg.start_soon(load)
            await wait_for_state(manager, "a", "LOADING")
            gate.set()

        assert loader.calls == ["a"]
        assert [r.state for r in results] == [ModelState.READY] * 3
        assert manager.get_statistics().loads_joined == 2


@pytest.mark.anyio
async def test_load_of_ready_id_equal_config_is_noop() -> None:
    loader = FakeLoader()
    async with make_manager(loader) as manager:
        await manager.load_model(config("a"))
        info = await manager.load_model(config("a"))
        assert info.state is ModelState.READY
        assert loader.calls == ["a"]


@pytest.mark.anyio
async def test_load_of_ready_id_other_config_conflicts() -> None:
    loader = FakeLoader()
    async with make_manager(loader) as manager:
        await manager.load_model(config("a"))
        with pytest.raises(ModelConflictError, match="'a'.*reload_model"):
            await manager.load_model(config("a", dtype="float16"))
        assert states(manager) == {"a": "READY"}


@pytest.mark.anyio
async def test_failed_load_leaves_no_placeholder() -> None:
    loader = FakeLoader()
    loader.plan("a", error=OSError("disk on fire"))
    async with make_manager(loader) as manager:
        with pytest.raises(ModelLoadError, match="disk on fire"):
            await manager.load_model(config("a"))

        info = manager.get_info("a")
        assert info.state is ModelState.FAILED
        assert info.reason is not None and "disk on fire" in info.reason
        assert manager.get_statistics().models_loading == 0
        with pytest.raises(ModelNotFoundError, match="failed to load: .*disk on fire"):
            await manager.get_model("a")

        # The id can be loaded again, and the FAILED record is replaced.
        loader.plan("a")
        info = await manager.load_model(config("a"))
        assert info.state is ModelState.READY
        assert states(manager) == {"a": "READY"}


@pytest.mark.anyio
async def test_failed_load_reason_is_cut() -> None:
    loader = FakeLoader()
    loader.plan("a", error=OSError("no such file: " + "p" * 1_000_000))
    async with make_manager(loader) as manager:
        with pytest.raises(ModelLoadError):
            await manager.load_model(config("a"))

        (info,) = await manager.list_models()
    assert info.reason is not None
    assert info.reason.startswith("no such file: ppp")
    assert info.reason.endswith("... (999014 more characters cut)")
    assert len(info.reason) < 1100


@pytest.mark.anyio
async def test_failed_load_error_reaches_joined_waiters() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    loader.plan("a", gate=gate, error=OSError("bad checkpoint"))
    errors: list[BaseException] = []

    async with make_manager(loader) as manager:

        async def load() -> None:
            try:
                await manager.load_model(config("a"))
            except ModelLoadError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            tg.start_soon(load)
            await wait_for_state(manager, "a", "LOADING")
            gate.set()

    assert len(errors) == 2
    assert errors[0] is not errors[1]
    assert all("bad checkpoint" in str(e) for e in errors)


@pytest.mark.trio
async def test_load_timeout_leaves_no_placeholder(autojump_clock: trio.testing.MockClock) -> None:
    loader = FakeLoader()
    loader.plan("a", sleep=60.0, steps=6)
    manager = make_manager(loader)

    with pytest.raises(ModelLoadTimeoutError, match=r"'a' timed out after 5 s"):
        await manager.load_model(config("a", load_timeout=5.0))

    assert states(manager) == {"a": "FAILED"}
    # The abandoned thread stops at its next progress report: nothing was created.
    await anyio.to_thread.run_sync(loader.wait_idle)
    assert loader.live() == []
    assert loader.created == []

    loader.plan("a")
    assert (await manager.load_model(config("a"))).state is ModelState.READY
    await manager.shutdown()


@pytest.mark.trio
async def test_manager_load_timeout_applies(autojump_clock: trio.testing.MockClock) -> None:
    loader = FakeLoader()
    loader.plan("a", sleep=3.0)
    manager = make_manager(loader, load_timeout=1.0)
    with pytest.raises(ModelLoadTimeoutError, match="after 1 s"):
        await manager.load_model(config("a"))
    await manager.shutdown()


@pytest.mark.anyio
async def test_caller_cancel_leaves_no_placeholder() -> None:
    loader = FakeLoader()
    gate = threading.Event()
    loader.plan("a", thread_gate=gate, report_progress=False)
    loader.entered = {"a": anyio.Event()}
    manager = make_manager(loader)

    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.load_model, config("a"))
        await loader.entered["a"].wait()
        tg.cancel_scope.cancel()

    assert states(manager) == {}
    stats = manager.get_statistics()
    assert stats.loads_cancelled == 1
    assert stats.models_loading == 0

    # The abandoned thread finishes later; it releases what it loaded.
    gate.set()
    await anyio.to_thread.run_sync(loader.wait_idle)
    assert len(loader.created) == 1
    assert loader.live() == []
    assert manager.get_statistics().released_after_abandon == 1

    loader.plan("a")
    assert (await manager.load_model(config("a"))).state is ModelState.READY
    await manager.shutdown()


@pytest.mark.anyio
async def test_cancelled_load_fails_joined_waiters() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    loader.plan("a", gate=gate)
    errors: list[BaseException] = []
    manager = make_manager(loader)

    async def join() -> None:
        try:
            await manager.load_model(config("a"))
        except ModelLoadError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as tg:
            # The first load_model call owns the load; the second one joins.
            tg.start_soon(manager.load_model, config("a"))
            await wait_for_state(manager, "a", "LOADING")
            outer.start_soon(join)
            await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()

    assert len(errors) == 1
    assert "cancelled" in str(errors[0])
    assert states(manager) == {}
    gate.set()
    await manager.shutdown()


class CancelAfterSteps(trio.abc.Instrument):
    """Cancel a scope after the watched task has run a given number of steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.task: trio.lowlevel.Task | None = None
        self.scope: trio.CancelScope | None = None

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task and self.scope is not None:
            self.steps -= 1
            if self.steps == 0:
                self.scope.cancel()


@pytest.mark.trio
async def test_cancel_at_every_await_point_keeps_table_consistent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancel a load after 1, 2, 3, ... scheduling steps until one completes."""
    for steps in range(1, 200):
        loader = FakeLoader()
        loader.plan("a", sleep=1.0, steps=2)
        manager = make_manager(loader, max_models=1)
        await manager.load_model(config("old"))
        instrument = CancelAfterSteps(steps)
        trio.lowlevel.add_instrument(instrument)
        completed = False
        try:
            with trio.CancelScope() as scope:
                instrument.task = trio.lowlevel.current_task()
                instrument.scope = scope
                await manager.load_model(config("a"))
                completed = True
        finally:
            trio.lowlevel.remove_instrument(instrument)

        # Let abandoned loader threads and release threads run to their end.
        await trio.to_thread.run_sync(loader.wait_idle)
        ready_count = manager.get_statistics().models_ready
        await trio.to_thread.run_sync(loader.wait_all_released, ready_count)
        table = states(manager)
        assert "LOADING" not in table.values(), (steps, table)
        assert manager.get_statistics().models_ready <= 1
        if completed:
            assert table == {"a": "READY"}
        else:
            assert "a" not in table or table["a"] == "READY"
        live = loader.live()
        ready = [m for m in live if states(manager).get(m.model_id) == "READY"]
        assert live == ready, (steps, live, table)
        await manager.shutdown()
        # Under the autojump clock a release thread may outlive the shutdown's
        # bounded wait; it still runs to its end.
        await trio.to_thread.run_sync(loader.wait_all_released)
        assert loader.live() == []
        if completed and steps > 5:
            break
    assert completed


# -- eviction and leases --------------------------------------------------------


@pytest.mark.anyio
async def test_lru_evicts_least_recently_used() -> None:
    loader = FakeLoader()
    async with make_manager(loader, max_models=2) as manager:
        await manager.load_model(config("a"))
        await manager.load_model(config("b"))
        async with manager.lease("a"):
            pass
        await manager.load_model(config("c"))
        assert states(manager) == {"a": "READY", "c": "READY"}
        assert manager.get_statistics().evictions == 1
        assert [m.model_id for m in loader.released] == ["b"]


@pytest.mark.anyio
async def test_lru_skips_leased_model() -> None:
    loader = FakeLoader()
    async with make_manager(loader, max_models=2) as manager:
        await manager.load_model(config("a"))
        await manager.load_model(config("b"))
        async with manager.lease("a"):
            async with manager.lease("b"):
                pass
            # "a" is the least recently used model, but it is leased.
            await manager.load_model(config("c"))
            assert states(manager) == {"a": "READY", "c": "READY"}
        assert [m.model_id for m in loader.released] == ["b"]


@pytest.mark.anyio
async def test_lru_never_evicts_leased_or_loading() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    async with make_manager(loader, max_models=2) as manager:
        await manager.load_model(config("a"))
        loader.plan("b", gate=gate)
        handle_b = manager.start_load(config("b"))
        async with manager.lease("a"):
            # "a" is leased and "b" is loading: neither may be evicted.
            await manager.load_model(config("c"))
            assert states(manager) == {"a": "READY", "b": "LOADING", "c": "READY"}
            gate.set()
            await handle_b.wait()
        # Publishing "b" evicted "c", the only READY model without a lease.
        assert states(manager) == {"a": "READY", "b": "READY"}
        assert manager.get_statistics().models_ready <= 2


@pytest.mark.anyio
async def test_full_table_of_leased_models_rejects_load() -> None:
    loader = FakeLoader()
    async with make_manager(loader, max_models=1) as manager:
        await manager.load_model(config("a"))
        async with manager.lease("a"):
            with pytest.raises(ModelCapacityError, match="'b'.*max_models"):
                await manager.load_model(config("b"))
        assert states(manager) == {"a": "READY", "b": "FAILED"}
        # The model loaded for "b" was released, not leaked.
        assert [m.model_id for m in loader.released] == ["b"]


@pytest.mark.anyio
async def test_ready_count_never_exceeds_max_models() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    for name in "bcde":
        loader.plan(name, gate=gate)
    async with make_manager(loader, max_models=2, max_load_workers=4) as manager:
        await manager.load_model(config("a"))
        handles = [manager.start_load(config(n)) for n in "bcde"]
        gate.set()
        while not all(h.done for h in handles):
            assert manager.get_statistics().models_ready <= 2
            await anyio.lowlevel.checkpoint()
        assert manager.get_statistics().models_ready == 2
        # Evicted models are released in worker threads after the loads end.
        await anyio.to_thread.run_sync(loader.wait_all_released, 2)
        assert len(loader.live()) == 2


@pytest.mark.anyio
async def test_lease_rejects_loading_and_unknown() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    loader.plan("a", gate=gate)
    async with make_manager(loader) as manager:
        handle = manager.start_load(config("a"))
        with pytest.raises(ModelLoadingError, match="'a' is still loading") as info:
            async with manager.lease("a"):
                pass
        assert info.value.retry_after > 0
        with pytest.raises(ModelNotFoundError, match="'nope' is not loaded"):
            async with manager.lease("nope"):
                pass
        gate.set()
        await handle.wait()


@pytest.mark.anyio
async def test_unload_waits_for_leases() -> None:
    loader = FakeLoader()
    release_lease = anyio.Event()
    leased = anyio.Event()
    async with make_manager(loader) as manager:
        await manager.load_model(config("a"))

        async def hold() -> None:
            async with manager.lease("a"):
                leased.set()
                await release_lease.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await leased.wait()
            tg.start_soon(manager.unload_model, "a")
            await wait_for_state(manager, "a", "UNLOADING")
            with pytest.raises(ModelUnloadingError, match="'a' is being unloaded"):
                async with manager.lease("a"):
                    pass
            assert loader.released == []
            release_lease.set()

        assert states(manager) == {}
        assert [m.model_id for m in loader.released] == ["a"]


@pytest.mark.trio
async def test_unload_drain_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    loader = FakeLoader()
    manager = make_manager(loader, lease_drain_timeout=3.0)
    await manager.load_model(config("a"))
    async with manager.lease("a"):
        before = trio.current_time()
        await manager.unload_model("a")
        # 3 s of draining, plus whatever the autojump clock adds while the
        # release thread runs.
        assert trio.current_time() - before >= 3.0
        assert states(manager) == {}
    await manager.shutdown()


@pytest.mark.anyio
async def test_unload_cancels_loading_model() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    loader.plan("a", gate=gate)
    loader.entered = {"a": anyio.Event()}
    async with make_manager(loader) as manager:
        handle = manager.start_load(config("a"))
        await loader.entered["a"].wait()
        await manager.unload_model("a")
        assert states(manager) == {}
        with pytest.raises(ModelLoadError, match="cancelled"):
            await handle.wait()
        gate.set()
    await anyio.to_thread.run_sync(loader.wait_idle)
    assert loader.live() == []


@pytest.mark.anyio
async def test_unload_unknown_raises() -> None:
    async with make_manager(FakeLoader()) as manager:
        with pytest.raises(ModelNotFoundError, match="'ghost'"):
            await manager.unload_model("ghost")


# -- reload ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_reload_swaps_model() -> None:
    loader = FakeLoader()
    async with make_manager(loader) as manager:
        await manager.load_model(config("a"))
        first = await manager.get_model("a")
        info = await manager.reload_model("a", config("a", dtype="float16"))
        assert info.config is not None and info.config.dtype == "float16"
        assert (await manager.get_model("a")) is not first
        assert loader.released == [first]


@pytest.mark.anyio
async def test_failed_reload_keeps_old_model() -> None:
    loader = FakeLoader()
    async with make_manager(loader) as manager:
        await manager.load_model(config("a"))
        first = await manager.get_model("a")
        loader.plan("a", error=RuntimeError("corrupt"))
        with pytest.raises(ModelLoadError, match="corrupt"):
            await manager.reload_model("a")
        assert states(manager) == {"a": "READY"}
        assert (await manager.get_model("a")) is first


@pytest.mark.anyio
async def test_start_reload_swaps_in_background() -> None:
    loader = FakeLoader()
    async with make_manager(loader) as manager:
        await manager.load_model(config("a"))
        first = await manager.get_model("a")
        gate = anyio.Event()
        loader.plan("a", gate=gate)

        info = manager.start_reload("a")
        assert info.state is ModelState.READY
        assert info.reloading
        with pytest.raises(ModelConflictError, match="already reloading"):
            manager.start_reload("a")
        assert (await manager.get_model("a")) is first

        gate.set()
        while manager.get_info("a").reloading:
            await anyio.sleep(0.01)
        assert (await manager.get_model("a")) is not first
        assert first in loader.released


@pytest.mark.anyio
async def test_start_reload_failure_keeps_old_model(caplog: pytest.LogCaptureFixture) -> None:
    loader = FakeLoader()
    async with make_manager(loader) as manager:
        await manager.load_model(config("a"))
        first = await manager.get_model("a")
        loader.plan("a", error=RuntimeError("corrupt"))

        manager.start_reload("a")
        while manager.get_info("a").reloading:
            await anyio.sleep(0.01)

        assert states(manager) == {"a": "READY"}
        assert (await manager.get_model("a")) is first
    assert "model.reload_failed model_id=a reason=" in caplog.text


@pytest.mark.anyio
async def test_start_reload_rejects_unknown_id() -> None:
    async with make_manager(FakeLoader()) as manager:
        with pytest.raises(ModelNotFoundError):
            manager.start_reload("missing")


# -- lifecycle ------------------------------------------------------------------


@pytest.mark.anyio
async def test_plain_style_without_context_manager() -> None:
    loader = FakeLoader()
    manager = make_manager(loader, max_models=5)
    await manager.load_model(config("a"))
    assert [i.model_id for i in await manager.list_models()] == ["a"]
    with pytest.raises(RuntimeError, match="start_load needs the manager's task group"):
        manager.start_load(config("b"))
    await manager.shutdown()
    await manager.shutdown()
    assert loader.live() == []
    with pytest.raises(ManagerClosedError):
        await manager.load_model(config("a"))


@pytest.mark.anyio
async def test_shutdown_with_loads_in_flight() -> None:
    loader = FakeLoader()
    gate = threading.Event()
    loader.plan("b", thread_gate=gate, report_progress=False)
    loader.plan("c", thread_gate=gate)
    loader.entered = {"b": anyio.Event(), "c": anyio.Event()}
    manager = make_manager(loader)
    async with manager:
        await manager.load_model(config("a"))
        manager.start_load(config("b"))
        manager.start_load(config("c"))
        await loader.entered["b"].wait()
        await loader.entered["c"].wait()

    assert manager.list_models_nowait() == []
    assert [m.model_id for m in loader.released] == ["a"]
    gate.set()
    # "b" returns its model later and its thread releases it; "c" reports
    # progress, learns it was cancelled and stops without a model.
    await anyio.to_thread.run_sync(loader.wait_idle)
    assert [m.model_id for m in loader.created] == ["a", "b"]
    assert loader.live() == []


@pytest.mark.anyio
async def test_shutdown_cancels_plain_load_in_other_task() -> None:
    loader = FakeLoader()
    gate = anyio.Event()
    loader.plan("a", gate=gate)
    manager = make_manager(loader)
    errors: list[BaseException] = []

    async def load() -> None:
        try:
            await manager.load_model(config("a"))
        except ModelLoadError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        await wait_for_state(manager, "a", "LOADING")
        await manager.shutdown()

    assert len(errors) == 1
    assert "shutting down" in str(errors[0])
    assert manager.list_models_nowait() == []
    gate.set()


@pytest.mark.anyio
async def test_statistics_and_repr() -> None:
    loader = FakeLoader()
    async with make_manager(loader, max_models=3) as manager:
        await manager.load_model(config("a"))
        async with manager.lease("a"):
            stats = manager.get_statistics()
            assert stats.active_leases == 1
        assert stats.models_ready == 1
        assert stats.loads_succeeded == 1
        assert repr(manager) == "<AsyncModelManager ready=1/3 loading=0 closed=False>"
        sample = await manager.sample_resources()
        assert sample.rss_bytes is not None and sample.rss_bytes > 0


@pytest.mark.anyio
async def test_listener_sees_events() -> None:
    loader = FakeLoader()
    events: list[tuple[str, str]] = []
    async with make_manager(loader, max_models=1) as manager:
        manager.add_listener(lambda e: events.append((e.kind, e.model_id)))
        await manager.load_model(config("a"))
        await manager.load_model(config("b"))
        await manager.unload_model("b")
    assert events == [
        ("load_started", "a"),
        ("loaded", "a"),
        ("load_started", "b"),
        ("evicted", "a"),
        ("loaded", "b"),
        ("unloaded", "b"),
    ]


@pytest.mark.anyio
async def test_run_compute_uses_worker_thread() -> None:
    async with make_manager(FakeLoader(), max_compute_workers=1) as manager:
        loop_thread = threading.get_ident()
        worker = await manager.run_compute(threading.get_ident)
        assert worker != loop_thread


def test_constructor_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="max_models=0 is invalid"):
        AsyncModelManager(max_models=0)
    with pytest.raises(ValueError, match="load_timeout=-1 is invalid"):
        AsyncModelManager(load_timeout=-1)


@pytest.mark.anyio
async def test_eviction_guard_protects_model() -> None:
    loader = FakeLoader()
    async with make_manager(loader, max_models=2) as manager:
        manager.add_eviction_guard(lambda model_id: model_id == "a")
        await manager.load_model(config("a"))
        await manager.load_model(config("b"))
        # "a" is least recently used, but its guard keeps it.
        await manager.load_model(config("c"))
        assert states(manager) == {"a": "READY", "c": "READY"}
