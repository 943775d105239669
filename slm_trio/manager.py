"""The model manager: a table of models that loads and unloads while requests run.

Design note.

The manager owns a table of entries keyed by model id. An entry is a LOADING
placeholder, a READY model, or an UNLOADING model whose leases are draining.
Failed loads leave no entry: they leave a small FAILED record (bounded, kept
only so `list_models` can show the reason) that counts against nothing and is
replaced by the next load of that id.

Every state change is a short synchronous method whose name ends in
``_nowait``: place a placeholder, publish a model, choose an LRU victim,
acquire or drop a lease. None of them awaits, so the table is consistent at
every checkpoint whatever gets cancelled. Each returns the work left to do
(a model to release, an event to wait on) and the async caller does that work
afterwards, outside any lock. There is no lock: the event loop is the lock.

Blocking work runs in worker threads behind two `anyio.CapacityLimiter`s the
manager owns: one for loads and one for compute (forward and backward passes).
Both are abandoned on cancellation, so a cancelled caller returns at once. An
abandoned load thread keeps running until its loader returns or next reports
progress, when the progress callback raises `LoadCancelledError`. A model the
thread returns after that is released by the thread itself (`_LoadJob`), so
no path leaks a model.

Loads run in the task that awaits `load_model`, or, after
`start_load`, in the task group the manager opens in ``async with``. Each load
runs inside its own cancel scope, stored on its entry, so `shutdown` and
`unload_model` can cancel it from any task. Cleanup after a failed or
cancelled load is shielded and bounded by `_CLEANUP_TIMEOUT`.

The manager is backend-neutral (anyio): it runs on trio and on asyncio, but
one instance belongs to the event loop that first used it. Code running in a
grpclib handler under trio-asyncio must cross into trio before calling it.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from slm_trio.config import ModelConfig
from slm_trio.errors import (
    LoadCancelledError,
    ManagerClosedError,
    ModelCapacityError,
    ModelConflictError,
    ModelLoadError,
    ModelLoadingError,
    ModelLoadTimeoutError,
    ModelNotFoundError,
    ModelUnloadingError,
    SlmTrioError,
)

__all__ = [
    "AsyncModelManager",
    "LoadHandle",
    "Loader",
    "ManagerEvent",
    "ManagerStatistics",
    "ModelInfo",
    "ModelState",
    "ProgressCallback",
    "Releaser",
    "ResourceSample",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ProgressCallback = Callable[[float], None]
"""Called by a loader with the fraction loaded, 0.0 to 1.0; it may raise `LoadCancelledError`."""

Loader = Callable[[ModelConfig, ProgressCallback], Any]
"""A blocking function that loads a model; the manager runs it in a worker thread."""

Releaser = Callable[[Any], None]
"""A blocking function that frees a model the manager no longer holds."""

# Seconds that cleanup after a cancelled or failed load may take. Cleanup is
# shielded from cancellation, so it needs a bound of its own.
_CLEANUP_TIMEOUT = 10.0

# FAILED records kept for `list_models`; older ones are dropped first.
_MAX_FAILURE_RECORDS = 64


class ModelState(enum.Enum):
    """The state of a model in the manager's table."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A snapshot of one table entry, as `list_models` returns it.

    Times come from the event loop's monotonic clock (`anyio.current_time`).
    """

    model_id: str
    state: ModelState
    config: ModelConfig | None
    reason: str | None = None
    progress: float | None = None
    created_at: float
    updated_at: float
    load_seconds: float | None = None
    active_leases: int = 0
    last_used_at: float | None = None
    reloading: bool = False


@dataclass(frozen=True, kw_only=True)
class ManagerStatistics:
    """Counters and gauges of a manager, as `get_statistics` returns them."""

    max_models: int
    models_ready: int
    models_loading: int
    models_unloading: int
    models_failed: int
    active_leases: int
    loads_started: int
    loads_succeeded: int
    loads_failed: int
    loads_cancelled: int
    loads_joined: int
    evictions: int
    unloads: int
    released_after_abandon: int


@dataclass(frozen=True, kw_only=True)
class ResourceSample:
    """Process memory, sampled in a worker thread by `sample_resources`."""

    rss_bytes: int | None


@dataclass(frozen=True, kw_only=True)
class ManagerEvent:
    """One change in the table, passed to listeners added with `add_listener`.

    `kind` is one of ``load_started``, ``loaded``, ``load_failed``,
    ``load_cancelled``, ``reloaded``, ``evicted``, ``unloaded``.
    """

    kind: str
    model_id: str
    seconds: float | None = None
    reason: str | None = None


class _LoadJob:
    """The hand-over point between a loader thread and the event loop.

    The thread and the loop agree under `_lock` on who owns the loaded model:
    the loop claims it with `claim`, or abandons the job with `abandon`. If the
    job is abandoned first, the thread releases the model itself when the
    loader returns. If the model arrived first, `abandon` returns it to the
    loop for release.
    """

    def __init__(self, config: ModelConfig, loader: Loader, releaser: Releaser) -> None:
        self.config = config
        self.progress: float | None = None
        self.released_by_thread = False
        self._loader = loader
        self._releaser = releaser
        self._lock = threading.Lock()
        self._abandoned = False
        self._result: Any = None
        self._has_result = False

    def report_progress(self, fraction: float) -> None:
        """Record progress; raise `LoadCancelledError` once the job is abandoned."""
        if self._abandoned:
            raise LoadCancelledError(f"load of model {self.config.model_id!r} was cancelled")
        if math.isfinite(fraction):
            self.progress = min(1.0, max(0.0, float(fraction)))

    def run(self) -> None:
        """Run the loader; called in a worker thread."""
        model = self._loader(self.config, self.report_progress)
        with self._lock:
            if not self._abandoned:
                self._result = model
                self._has_result = True
                return
        # The loop abandoned this load, so no other code can reach this model.
        self.released_by_thread = True
        self._releaser(model)

    def claim(self) -> Any:
        """Take the loaded model; called on the loop after `run` returned."""
        with self._lock:
            model, self._result, self._has_result = self._result, None, False
            return model

    def abandon(self) -> tuple[bool, Any]:
        """Mark the job abandoned; return ``(True, model)`` if a model must be released."""
        with self._lock:
            self._abandoned = True
            if not self._has_result:
                return False, None
            model, self._result, self._has_result = self._result, None, False
            return True, model


@dataclass(eq=False, kw_only=True)
class _Entry:
    """A mutable row of the table; only `_nowait` methods change it."""

    model_id: str
    config: ModelConfig
    state: ModelState
    created_at: float
    updated_at: float
    model: Any = None
    leases: int = 0
    last_used_at: float | None = None
    use_order: int = 0
    load_seconds: float | None = None
    job: _LoadJob | None = None
    load_scope: anyio.CancelScope | None = None
    # Set when the current load attempt ends, successfully or not.
    load_done: anyio.Event = field(default_factory=anyio.Event)
    load_error: BaseException | None = None
    # Set when the last lease of an UNLOADING entry is dropped.
    drained: anyio.Event | None = None
    reloading: bool = False

    def snapshot(self) -> ModelInfo:
        progress = self.job.progress if self.job is not None else None
        return ModelInfo(
            model_id=self.model_id,
            state=self.state,
            config=self.config,
            progress=1.0 if self.state is ModelState.READY and not self.reloading else progress,
            created_at=self.created_at,
            updated_at=self.updated_at,
            load_seconds=self.load_seconds,
            active_leases=self.leases,
            last_used_at=self.last_used_at,
            reloading=self.reloading,
        )


class LoadHandle:
    """A load started in the background with `AsyncModelManager.start_load`."""

    def __init__(self, manager: AsyncModelManager, entry: _Entry) -> None:
        self._manager = manager
        self._entry = entry
        self.model_id = entry.model_id

    def __repr__(self) -> str:
        return f"<LoadHandle model_id={self.model_id!r} done={self.done}>"

    @property
    def done(self) -> bool:
        """Whether the load has finished, successfully or not."""
        return self._entry.load_done.is_set()

    async def wait(self) -> ModelInfo:
        """Wait for the load and return the model's info.

        Raises:
            ModelLoadError: The load failed, timed out, or was cancelled.

        Cancellation: cancelling the waiter does not cancel the load; use `cancel`.
        """
        await self._entry.load_done.wait()
        return self._manager._outcome(self._entry, joined=True)

    def cancel(self) -> None:
        """Cancel the load if it is still running; its placeholder is removed."""
        if self._entry.load_scope is not None:
            self._entry.load_scope.cancel()


def _default_loader(config: ModelConfig, progress: ProgressCallback) -> Any:
    from slm_trio.loading import load_model

    return load_model(config, progress)


def _default_releaser(model: Any) -> None:
    # Dropping the manager's reference frees CPU memory once requests holding
    # the model finish; cached CUDA blocks need an explicit empty_cache.
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _read_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return None


class AsyncModelManager:
    """Load, serve and unload models without ever blocking the event loop.

    Use it as an async context manager, whose task group owns loads started
    with `start_load`, or create it directly and call `shutdown` at the end::

        async with AsyncModelManager(max_models=5) as manager:
            await manager.load_model(config)
            async with manager.lease("smollm2-trunk") as model:
                ...

    Args:
        max_models: The maximum number of READY models; loading beyond it
            evicts the least recently used model that is not leased.
        max_load_workers: Worker threads for loads; loads beyond it queue.
        max_compute_workers: Worker threads for `run_compute`.
        loader: A blocking ``loader(config, progress)`` that returns a model;
            the default reads checkpoints with `slm_trio.loading.load_model`.
        releaser: A blocking ``releaser(model)`` called once for every model the
            manager drops.
        load_timeout: Default seconds a load may take, unless its config sets one.
        lease_drain_timeout: Seconds `unload_model` waits for leases to end
            before it removes the model anyway.
    """

    def __init__(
        self,
        max_models: int = 5,
        max_load_workers: int = 2,
        max_compute_workers: int = 2,
        *,
        loader: Loader | None = None,
        releaser: Releaser | None = None,
        load_timeout: float | None = None,
        lease_drain_timeout: float = 30.0,
    ) -> None:
        for name, value in (
            ("max_models", max_models),
            ("max_load_workers", max_load_workers),
            ("max_compute_workers", max_compute_workers),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; expected an integer >= 1")
        if load_timeout is not None and not load_timeout > 0:
            raise ValueError(f"load_timeout={load_timeout!r} is invalid; expected seconds > 0")
        if not lease_drain_timeout > 0:
            raise ValueError(
                f"lease_drain_timeout={lease_drain_timeout!r} is invalid; expected seconds > 0"
            )
        self.max_models = max_models
        self.max_load_workers = max_load_workers
        self.max_compute_workers = max_compute_workers
        self.load_timeout = load_timeout
        self.lease_drain_timeout = lease_drain_timeout
        self._loader: Loader = loader or _default_loader
        self._releaser: Releaser = releaser or _default_releaser
        self._entries: dict[str, _Entry] = {}
        self._failures: OrderedDict[str, ModelInfo] = OrderedDict()
        self._listeners: list[Callable[[ManagerEvent], None]] = []
        self._eviction_guards: list[Callable[[str], bool]] = []
        self._use_counter = 0
        self._closed = False
        self._task_group: anyio.abc.TaskGroup | None = None
        # Limiters bind to the running event loop, so they are made on first use.
        self._load_limiter: anyio.CapacityLimiter | None = None
        self._compute_limiter: anyio.CapacityLimiter | None = None
        # Guards counters that abandoned loader threads also update.
        self._counter_lock = threading.Lock()
        self._counters = dict.fromkeys(
            (
                "loads_started",
                "loads_succeeded",
                "loads_failed",
                "loads_cancelled",
                "loads_joined",
                "evictions",
                "unloads",
                "released_after_abandon",
            ),
            0,
        )

    def __repr__(self) -> str:
        states = [e.state.value for e in self._entries.values()]
        return (
            f"<AsyncModelManager ready={states.count('READY')}/{self.max_models} "
            f"loading={states.count('LOADING')} closed={self._closed}>"
        )

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> AsyncModelManager:
        self._check_open()
        if self._task_group is not None:
            raise RuntimeError("this AsyncModelManager is already entered; enter it once")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, self._task_group = self._task_group, None
        try:
            await self.shutdown()
        finally:
            if task_group is not None:
                task_group.cancel_scope.cancel()
                try:
                    await task_group.__aexit__(exc_type, exc, tb)
                except BaseExceptionGroup as group:
                    # The task group wraps the body's own exception in a group;
                    # callers of a context manager expect the exception itself.
                    if exc is not None and group.exceptions == (exc,):
                        raise exc from None
                    raise
        return None

    async def shutdown(self) -> None:
        """Cancel loads in flight, unload every model and close the manager.

        Idempotent: later calls return at once. Leases still held keep their
        model object alive until they end, but the manager no longer lists it.

        Cancellation: the cleanup is shielded and bounded, so it completes even
        when the caller is cancelled.
        """
        if self._closed and not self._entries:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT * 2):
            loading = [e for e in self._entries.values() if e.state is ModelState.LOADING]
            for entry in loading:
                if entry.load_scope is not None:
                    entry.load_scope.cancel()
            for entry in loading:
                await entry.load_done.wait()
            for model_id in list(self._entries):
                entry = self._entries.pop(model_id)
                if entry.model is not None:
                    model, entry.model = entry.model, None
                    await self._release(model)
                    self._counters["unloads"] += 1
                    self._emit("unloaded", model_id)
        self._entries.clear()
        self._failures.clear()
        logger.info("manager.shutdown")

    # -- loading -------------------------------------------------------------

    async def load_model(self, config: ModelConfig) -> ModelInfo:
        """Load a model and wait until it is READY.

        A load of an id that is already loading joins that load and gets its
        result or its error. A load of a READY id with an equal config returns
        at once; with a different config it raises (use `reload_model`).

        Returns:
            The model's info once it is READY.

        Raises:
            ModelConflictError: The id is READY or UNLOADING with another config.
            ModelLoadError: The loader failed (`CheckpointError` and other
                subclasses pass through), or the load timed out
                (`ModelLoadTimeoutError`) or was cancelled by `shutdown`.
            ModelCapacityError: Every READY model is leased, so no room could be made.
            ManagerClosedError: The manager was shut down.

        Cancellation: cancelling the caller cancels the load it started (and
        joined waiters get `ModelLoadError`); a caller that joined another load
        stops waiting without cancelling it. The placeholder is always removed.
        """
        entry, started = self._begin_load_nowait(config)
        if started:
            await self._run_load(entry)
            return self._outcome(entry, joined=False)
        await entry.load_done.wait()
        return self._outcome(entry, joined=True)

    def start_load(self, config: ModelConfig) -> LoadHandle:
        """Start a load in the manager's task group and return at once.

        The placeholder is in the table when this returns, so `list_models`
        shows the model as LOADING right away. A failed background load is
        logged and recorded as FAILED; `LoadHandle.wait` raises its error.

        Raises:
            RuntimeError: The manager is not entered with ``async with``, so no
                task group can own the load.
        """
        if self._task_group is None:
            raise RuntimeError(
                "start_load needs the manager's task group; use "
                "`async with AsyncModelManager(...) as manager:` or await load_model instead"
            )
        entry, started = self._begin_load_nowait(config)
        if started:
            self._task_group.start_soon(self._run_background_load, entry)
        return LoadHandle(self, entry)

    async def reload_model(self, model_id: str, config: ModelConfig | None = None) -> ModelInfo:
        """Load a model again, from a new config if given, and swap it in.

        The old model keeps serving while the new one loads; if the new load
        fails, the old model stays READY and the error is raised.

        Raises:
            ModelNotFoundError: No READY model has this id.
            ModelConflictError: A reload of this id is already running, or
                ``config.model_id`` differs from ``model_id``.
            ModelLoadError: The new load failed; the old model still serves.

        Cancellation: cancelling the caller abandons the new load and keeps the old model.
        """
        entry, config, job = self._begin_reload_nowait(model_id, config)
        return await self._run_reload(entry, config, job)

    def start_reload(self, model_id: str, config: ModelConfig | None = None) -> ModelInfo:
        """Start `reload_model` in the manager's task group and return at once.

        The returned info has ``reloading`` set. A failed reload is logged and
        keeps the old model READY.

        Raises:
            ModelNotFoundError: No READY model has this id.
            ModelConflictError: A reload of this id is already running, or
                ``config.model_id`` differs from ``model_id``.
            RuntimeError: The manager is not entered with ``async with``.
        """
        if self._task_group is None:
            raise RuntimeError(
                "start_reload needs the manager's task group; use "
                "`async with AsyncModelManager(...) as manager:` or await reload_model instead"
            )
        entry, config, job = self._begin_reload_nowait(model_id, config)
        self._task_group.start_soon(self._run_background_reload, entry, config, job)
        return entry.snapshot()

    def _begin_reload_nowait(
        self, model_id: str, config: ModelConfig | None
    ) -> tuple[_Entry, ModelConfig, _LoadJob]:
        self._check_open()
        entry = self._entries.get(model_id)
        if entry is None or entry.state is not ModelState.READY:
            raise ModelNotFoundError(self._not_ready_message(model_id))
        config = config or entry.config
        if config.model_id != model_id:
            raise ModelConflictError(
                f"reload_model({model_id!r}) got a config for model_id={config.model_id!r}; "
                "the ids must match"
            )
        if entry.reloading:
            raise ModelConflictError(f"model {model_id!r} is already reloading; wait for it")
        job = _LoadJob(config, self._loader, self._release_in_thread)
        entry.reloading, entry.job = True, job
        return entry, config, job

    async def _run_reload(self, entry: _Entry, config: ModelConfig, job: _LoadJob) -> ModelInfo:
        model_id = entry.model_id
        started_at = anyio.current_time()
        self._emit("load_started", model_id)
        try:
            model = await self._load_in_thread(job, config)
        except BaseException as exc:
            self._emit("load_failed", model_id, reason=_describe(exc))
            raise self._wrap_load_error(model_id, config, exc) from exc
        finally:
            entry.reloading, entry.job = False, None
        old_model = self._swap_model_nowait(entry, model, config, anyio.current_time() - started_at)
        self._emit("reloaded", model_id, seconds=entry.load_seconds)
        if old_model is not None:
            with anyio.CancelScope(shield=True):
                await self._release(old_model)
        return entry.snapshot()

    async def _run_background_reload(
        self, entry: _Entry, config: ModelConfig, job: _LoadJob
    ) -> None:
        try:
            await self._run_reload(entry, config, job)
        except Exception as exc:
            # Raising would cancel the manager's task group; the old model still serves.
            logger.warning(
                "model.reload_failed model_id=%s reason=%s", entry.model_id, _describe(exc)
            )

    def _swap_model_nowait(
        self, entry: _Entry, model: Any, config: ModelConfig, seconds: float
    ) -> Any:
        if self._entries.get(entry.model_id) is not entry or entry.state is not ModelState.READY:
            # Unloaded while the new model loaded: the new model is the one to drop.
            return model
        old_model, entry.model, entry.config = entry.model, model, config
        entry.load_seconds = seconds
        entry.updated_at = anyio.current_time()
        return old_model

    def _begin_load_nowait(self, config: ModelConfig) -> tuple[_Entry, bool]:
        """Place a placeholder, or find the load to join; return ``(entry, started)``."""
        self._check_open()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, not {type(config).__name__}")
        entry = self._entries.get(config.model_id)
        if entry is not None:
            if entry.state is ModelState.LOADING:
                if entry.config != config:
                    raise ModelConflictError(
                        f"model {config.model_id!r} is already loading with another config; "
                        "wait for it, unload it, then load the new config"
                    )
                self._counters["loads_joined"] += 1
                return entry, False
            if entry.state is ModelState.READY and entry.config == config:
                return entry, False
            raise ModelConflictError(
                f"model {config.model_id!r} is already {entry.state.value} with another config; "
                "reload it to replace it (slm-trio models load --replace, reload_model in "
                "Python, or a Load request with replace set), or unload it first"
            )
        now = anyio.current_time()
        entry = _Entry(
            model_id=config.model_id,
            config=config,
            state=ModelState.LOADING,
            created_at=now,
            updated_at=now,
        )
        entry.job = _LoadJob(config, self._loader, self._release_in_thread)
        self._entries[config.model_id] = entry
        self._failures.pop(config.model_id, None)
        self._counters["loads_started"] += 1
        self._emit("load_started", config.model_id)
        logger.info("model.load_started model_id=%s part=%s", config.model_id, config.part)
        return entry, True

    async def _run_background_load(self, entry: _Entry) -> None:
        await self._run_load(entry)
        # Errors are recorded on the entry for LoadHandle.wait, and logged in
        # _finish_load_nowait; raising here would cancel the manager's task group.

    async def _run_load(self, entry: _Entry) -> None:
        """Run one load attempt to its end; errors go on the entry, and only cancellation raises."""
        job = entry.job
        if job is None:
            raise RuntimeError(f"internal error: entry {entry.model_id!r} has no load job")
        model: Any = None
        error: BaseException | None = None
        started_at = anyio.current_time()
        try:
            with anyio.CancelScope() as scope:
                entry.load_scope = scope
                model = await self._load_in_thread(job, entry.config)
            if scope.cancelled_caught:
                error = LoadCancelledError(self._cancel_reason(entry))
        except BaseException as exc:
            error = exc
            if not isinstance(exc, Exception):
                # The caller itself is cancelled: finish the bookkeeping, then re-raise.
                self._finish_load_nowait(entry, None, exc, started_at)
                raise
        entry.load_scope = None
        to_release = self._finish_load_nowait(entry, model, error, started_at)
        if to_release:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                for victim in to_release:
                    await self._release(victim)

    async def _load_in_thread(self, job: _LoadJob, config: ModelConfig) -> Any:
        """Run ``job`` in a load worker thread, bounded by the load timeout."""
        timeout = config.load_timeout or self.load_timeout
        try:
            with anyio.fail_after(timeout):
                # Abandon on cancel: a loader cannot be interrupted, and a
                # cancelled caller must not wait minutes for it. The job makes
                # the abandoned thread release what it loads.
                await anyio.to_thread.run_sync(
                    job.run, limiter=self._limiter("load"), abandon_on_cancel=True
                )
        except TimeoutError as exc:
            self._abandon(job)
            raise ModelLoadTimeoutError(
                f"loading model {config.model_id!r} timed out after {timeout:g} s; "
                "raise load_timeout if the checkpoint is large"
            ) from exc
        except BaseException:
            self._abandon(job)
            raise
        return job.claim()

    def _abandon(self, job: _LoadJob) -> None:
        must_release, model = job.abandon()
        if must_release:
            # The thread finished just as the load was cancelled; nobody else
            # can reach this model, so drop it here (release is synchronous
            # bookkeeping plus an optional cache flush).
            self._release_in_thread(model)

    def _finish_load_nowait(
        self, entry: _Entry, model: Any, error: BaseException | None, started_at: float
    ) -> list[Any]:
        """Publish or discard the result of a load; return models to release."""
        now = anyio.current_time()
        entry.load_error = error
        entry.job = None
        to_release: list[Any] = []
        in_table = self._entries.get(entry.model_id) is entry
        if error is None and in_table:
            victim = self._make_room_nowait(exclude=entry)
            if victim is None and self._count_ready() >= self.max_models:
                error = ModelCapacityError(
                    f"cannot load model {entry.model_id!r}: all {self.max_models} READY models "
                    "are serving requests; raise max_models or unload one"
                )
                entry.load_error = error
            else:
                if victim is not None:
                    to_release.append(victim)
                self._use_counter += 1
                entry.model, entry.state = model, ModelState.READY
                entry.updated_at = entry.last_used_at = now
                entry.use_order = self._use_counter
                entry.load_seconds = now - started_at
                self._counters["loads_succeeded"] += 1
                self._emit("loaded", entry.model_id, seconds=entry.load_seconds)
                logger.info(
                    "model.loaded model_id=%s seconds=%.3f", entry.model_id, entry.load_seconds
                )
                entry.load_done.set()
                return to_release
        if model is not None:
            to_release.append(model)
        if error is None:
            # Unloaded or shut down while loading.
            error = LoadCancelledError(self._cancel_reason(entry))
            entry.load_error = error
        if in_table:
            del self._entries[entry.model_id]
        reason = _describe(error)
        cancelled = isinstance(error, LoadCancelledError) or not isinstance(error, Exception)
        if cancelled:
            self._counters["loads_cancelled"] += 1
            self._emit("load_cancelled", entry.model_id, reason=reason)
            logger.info("model.load_cancelled model_id=%s", entry.model_id)
        else:
            self._counters["loads_failed"] += 1
            self._record_failure_nowait(entry, reason, now)
            self._emit("load_failed", entry.model_id, reason=reason)
            logger.warning("model.load_failed model_id=%s reason=%s", entry.model_id, reason)
        entry.load_done.set()
        return to_release

    def _record_failure_nowait(self, entry: _Entry, reason: str, now: float) -> None:
        self._failures.pop(entry.model_id, None)
        self._failures[entry.model_id] = ModelInfo(
            model_id=entry.model_id,
            state=ModelState.FAILED,
            config=entry.config,
            reason=reason,
            created_at=entry.created_at,
            updated_at=now,
        )
        while len(self._failures) > _MAX_FAILURE_RECORDS:
            self._failures.popitem(last=False)

    def _outcome(self, entry: _Entry, *, joined: bool) -> ModelInfo:
        """Return the info of a finished load, or raise its error for this waiter."""
        error = entry.load_error
        if error is None:
            return entry.snapshot()
        if not isinstance(error, Exception):
            error = LoadCancelledError(f"load of model {entry.model_id!r} was cancelled")
        raise self._wrap_load_error(entry.model_id, entry.config, error, joined=joined)

    def _wrap_load_error(
        self, model_id: str, config: ModelConfig, error: BaseException, *, joined: bool = False
    ) -> BaseException:
        if not isinstance(error, Exception):
            return error
        if isinstance(error, LoadCancelledError):
            wrapped: Exception = ModelLoadError(str(error))
        elif isinstance(error, SlmTrioError) and not joined:
            return error
        elif isinstance(error, SlmTrioError):
            # Each waiter gets its own exception object; the original is the cause.
            try:
                wrapped = type(error)(str(error))
            except TypeError:
                wrapped = ModelLoadError(str(error))
        else:
            wrapped = ModelLoadError(
                f"loading model {model_id!r} from {config.model_path!r} failed: {_describe(error)}"
            )
        wrapped.__cause__ = error
        return wrapped

    def _cancel_reason(self, entry: _Entry) -> str:
        if self._closed:
            return f"load of model {entry.model_id!r} was cancelled: the manager is shutting down"
        return f"load of model {entry.model_id!r} was cancelled"

    # -- eviction ------------------------------------------------------------

    def _count_ready(self) -> int:
        return sum(e.state is ModelState.READY for e in self._entries.values())

    def _make_room_nowait(self, *, exclude: _Entry) -> Any:
        """Evict the LRU idle model if the table is full; return its model or None."""
        if self._count_ready() < self.max_models:
            return None
        candidates = [
            e
            for e in self._entries.values()
            if e is not exclude
            and e.state is ModelState.READY
            and e.leases == 0
            and not e.reloading
            and not any(guard(e.model_id) for guard in self._eviction_guards)
        ]
        if not candidates:
            return None
        victim = min(candidates, key=lambda e: e.use_order)
        del self._entries[victim.model_id]
        victim.state = ModelState.UNLOADING
        model, victim.model = victim.model, None
        self._counters["evictions"] += 1
        self._emit("evicted", victim.model_id)
        logger.info("model.evicted model_id=%s for=%s", victim.model_id, exclude.model_id)
        return model

    # -- leases and lookups --------------------------------------------------

    @asynccontextmanager
    async def lease(self, model_id: str) -> AsyncIterator[Any]:
        """Hold a READY model for the duration of a request.

        While any lease is held the model is never evicted, and `unload_model`
        waits for it.

        Raises:
            ModelNotFoundError: No model has this id (or its load failed).
            ModelLoadingError: The model is still loading; retry after `retry_after` s.
            ModelUnloadingError: The model is being unloaded.
        """
        entry = self._acquire_lease_nowait(model_id)
        try:
            yield entry.model
        finally:
            self._drop_lease_nowait(entry)

    @contextmanager
    def lease_nowait(self, model_id: str) -> Iterator[Any]:
        """Like `lease`, as a plain context manager for synchronous callers on the loop."""
        entry = self._acquire_lease_nowait(model_id)
        try:
            yield entry.model
        finally:
            self._drop_lease_nowait(entry)

    def _acquire_lease_nowait(self, model_id: str) -> _Entry:
        self._check_open()
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFoundError(self._not_ready_message(model_id))
        if entry.state is ModelState.LOADING:
            progress = entry.job.progress if entry.job is not None else None
            shown = f" ({progress:.0%} loaded)" if progress is not None else ""
            raise ModelLoadingError(
                f"model {model_id!r} is still loading{shown}; retry in a few seconds",
                retry_after=1.0,
            )
        if entry.state is ModelState.UNLOADING:
            raise ModelUnloadingError(
                f"model {model_id!r} is being unloaded; load it again to use it"
            )
        entry.leases += 1
        self._use_counter += 1
        entry.use_order = self._use_counter
        entry.last_used_at = anyio.current_time()
        return entry

    def _drop_lease_nowait(self, entry: _Entry) -> None:
        entry.leases -= 1
        if entry.leases == 0 and entry.drained is not None:
            entry.drained.set()

    def _not_ready_message(self, model_id: str) -> str:
        failure = self._failures.get(model_id)
        if failure is not None:
            return f"model {model_id!r} failed to load: {failure.reason}; fix it and load it again"
        known = ", ".join(repr(i) for i in sorted(self._entries)) or "none"
        return f"model {model_id!r} is not loaded; loaded models: {known}"

    async def get_model(self, model_id: str) -> Any:
        """Return a READY model without leasing it (prefer `lease` for requests).

        Raises:
            ModelNotFoundError, ModelLoadingError, ModelUnloadingError: as for `lease`.
        """
        with self.lease_nowait(model_id) as model:
            return model

    def get_info(self, model_id: str) -> ModelInfo:
        """Return the info of one model, including a FAILED record.

        Raises:
            ModelNotFoundError: The id is neither in the table nor recently failed.
        """
        entry = self._entries.get(model_id)
        if entry is not None:
            return entry.snapshot()
        failure = self._failures.get(model_id)
        if failure is not None:
            return failure
        raise ModelNotFoundError(self._not_ready_message(model_id))

    def list_models_nowait(self) -> list[ModelInfo]:
        """Return a snapshot of every entry and FAILED record, sorted by id."""
        infos = {e.model_id: e.snapshot() for e in self._entries.values()}
        for model_id, failure in self._failures.items():
            infos.setdefault(model_id, failure)
        return [infos[i] for i in sorted(infos)]

    async def list_models(self) -> list[ModelInfo]:
        """Return a snapshot of every model; never waits for a load.

        Cancellation: a checkpoint only; nothing changes.
        """
        await anyio.lowlevel.checkpoint()
        return self.list_models_nowait()

    # -- unloading -----------------------------------------------------------

    async def unload_model(self, model_id: str) -> None:
        """Unload a model, cancelling its load or waiting for its leases first.

        New leases are rejected at once. In-flight requests get up to
        `lease_drain_timeout` seconds to finish; after that the model is
        removed anyway (requests still running keep their reference).

        Raises:
            ModelNotFoundError: No model or FAILED record has this id.

        Cancellation: the model is removed from the table even if the caller
        is cancelled while leases drain.
        """
        entry = self._entries.get(model_id)
        if entry is None:
            if self._failures.pop(model_id, None) is not None:
                return
            raise ModelNotFoundError(self._not_ready_message(model_id))
        if entry.state is ModelState.LOADING:
            if entry.load_scope is not None:
                entry.load_scope.cancel()
            # Remove it now so the finishing load discards its model.
            del self._entries[model_id]
            self._counters["unloads"] += 1
            self._emit("unloaded", model_id)
            logger.info("model.unloaded model_id=%s while=loading", model_id)
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                await entry.load_done.wait()
            return
        if entry.state is ModelState.UNLOADING:
            if entry.drained is not None:
                await entry.drained.wait()
            return
        drained = self._begin_unload_nowait(entry)
        try:
            if drained is not None:
                with anyio.move_on_after(self.lease_drain_timeout) as scope:
                    await drained.wait()
                if scope.cancelled_caught:
                    logger.warning(
                        "model.unload_drain_timeout model_id=%s leases=%d seconds=%g",
                        model_id,
                        entry.leases,
                        self.lease_drain_timeout,
                    )
        finally:
            model = self._finish_unload_nowait(entry)
            if model is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT):
                    await self._release(model)

    def _begin_unload_nowait(self, entry: _Entry) -> anyio.Event | None:
        entry.state = ModelState.UNLOADING
        entry.updated_at = anyio.current_time()
        if entry.leases == 0:
            return None
        entry.drained = anyio.Event()
        return entry.drained

    def _finish_unload_nowait(self, entry: _Entry) -> Any:
        if self._entries.get(entry.model_id) is entry:
            del self._entries[entry.model_id]
        if entry.drained is not None:
            entry.drained.set()
        model, entry.model = entry.model, None
        self._counters["unloads"] += 1
        self._emit("unloaded", entry.model_id)
        logger.info("model.unloaded model_id=%s", entry.model_id)
        return model

    # -- compute and resources -----------------------------------------------

    async def run_compute(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run blocking compute (a forward or backward pass) in a compute worker thread.

        Cancellation: the thread is abandoned and its result dropped, so a
        request past its deadline returns at once. The thread itself runs to
        its end; state it mutates (a KV cache) must be treated as broken.
        """
        return await anyio.to_thread.run_sync(
            fn, *args, limiter=self._limiter("compute"), abandon_on_cancel=True
        )

    async def sample_resources(self) -> ResourceSample:
        """Read the process's resident memory in a worker thread."""
        rss = await anyio.to_thread.run_sync(_read_rss_bytes, abandon_on_cancel=True)
        return ResourceSample(rss_bytes=rss)

    def get_statistics(self) -> ManagerStatistics:
        """Return counters and gauges; never blocks or awaits."""
        states = [e.state for e in self._entries.values()]
        return ManagerStatistics(
            max_models=self.max_models,
            models_ready=states.count(ModelState.READY),
            models_loading=states.count(ModelState.LOADING),
            models_unloading=states.count(ModelState.UNLOADING),
            models_failed=len(self._failures),
            active_leases=sum(e.leases for e in self._entries.values()),
            **self._counters,
        )

    def add_eviction_guard(self, guard: Callable[[str], bool]) -> None:
        """Never evict a model while ``guard(model_id)`` is true.

        The server uses this for models with open generation sessions, which
        use their model between requests. The guard runs on the event loop
        and must not block.
        """
        self._eviction_guards.append(guard)

    def add_listener(self, listener: Callable[[ManagerEvent], None]) -> None:
        """Call ``listener(event)`` on the event loop for every table change."""
        self._listeners.append(listener)

    # -- helpers -------------------------------------------------------------

    def _limiter(self, kind: str) -> anyio.CapacityLimiter:
        if kind == "load":
            if self._load_limiter is None:
                self._load_limiter = anyio.CapacityLimiter(self.max_load_workers)
            return self._load_limiter
        if self._compute_limiter is None:
            self._compute_limiter = anyio.CapacityLimiter(self.max_compute_workers)
        return self._compute_limiter

    async def _release(self, model: Any) -> None:
        try:
            await anyio.to_thread.run_sync(self._releaser, model, abandon_on_cancel=True)
        except Exception:
            logger.exception("model.release_failed")

    def _release_in_thread(self, model: Any) -> None:
        with self._counter_lock:
            self._counters["released_after_abandon"] += 1
        self._releaser(model)

    def _emit(
        self, kind: str, model_id: str, *, seconds: float | None = None, reason: str | None = None
    ) -> None:
        event = ManagerEvent(kind=kind, model_id=model_id, seconds=seconds, reason=reason)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("manager.listener_failed event=%s", kind)

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError("this AsyncModelManager was shut down; create a new one")


# A FAILED entry keeps its reason until the model is loaded again, and every list_models
# call returns it, so a loader error that quotes a huge input is cut before it is stored
# or logged.
_MAX_REASON_CHARS = 1000


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if len(text) <= _MAX_REASON_CHARS:
        return text
    cut = len(text) - _MAX_REASON_CHARS
    return f"{text[:_MAX_REASON_CHARS]}... ({cut} more characters cut)"
