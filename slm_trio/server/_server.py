"""The servers: `AsyncManagedServer` (many models, a manager) and `AsyncGRPCComputeServer` (one).

Design note.

A server is an async context manager that owns one task group. Entering it
starts the grpclib host as a task of that group, through trio-asyncio under
trio and natively under asyncio. The session expiry loop and, when
configured, the metrics endpoint run as tasks of the same group. The managed
server also enters its manager, whose own task group owns background loads.
Leaving it stops them in order: the host stops accepting and lets in-flight
requests finish within the grace period, then the task group is cancelled
and the manager unloads everything.

Three ways to run one:

- ``async with AsyncManagedServer(config) as server:`` for scoped use;
- ``port = await nursery.start(server.serve)``, which serves until
  cancelled, `stop` is called, or SIGINT/SIGTERM arrives;
- ``await server.start()`` ... ``await server.wait_for_termination()`` /
  ``await server.stop()`` for code migrating from the replaced servers. The
  task that calls `start` must be the one that leaves: `stop` called from
  another task only requests the stop, and the starting task finishes it in
  `wait_for_termination`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import torch
from anyio.abc import TaskStatus
from torch import nn

from slm_trio._proto.v1 import management_pb2
from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.errors import ConfigError, ModelNotFoundError
from slm_trio.manager import AsyncModelManager, Loader, ModelInfo, ModelState, Releaser
from slm_trio.server._compute import ComputeService
from slm_trio.server._core import ComputeCore, ComputeTarget, _forward_blocking
from slm_trio.server._host import GrpcHost, HostStatistics, Servable
from slm_trio.server._management import (
    ManagementService,
    ServerHealth,
    manager_model_state,
)
from slm_trio.server._metrics import ServerMetrics, serve_metrics
from slm_trio.server._sessions import SessionStore

__all__ = ["AsyncGRPCComputeServer", "AsyncManagedServer", "AsyncModelComputeFunction"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class _ServerBase:
    """The lifecycle both servers share. Subclasses build the services."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.sessions = SessionStore(
            ttl=config.session_ttl,
            max_sessions=config.max_sessions,
            max_cached_tokens=config.max_cached_tokens,
        )
        self._task_group: anyio.abc.TaskGroup | None = None
        self._host: GrpcHost | None = None
        self._port: int | None = None
        self._metrics_port: int | None = None
        self._stopping = False
        self._stop_requested: anyio.Event | None = None
        self._owner_task: int | None = None
        self._entered = False
        self._grace_period = config.grace_period
        self.metrics: ServerMetrics | None = None

    def __repr__(self) -> str:
        state = "serving" if self._port is not None and not self._stopping else "stopped"
        port = self._port if self._port is not None else self.config.port
        return f"<{type(self).__name__} {self.config.host}:{port} {state}>"

    @property
    def port(self) -> int:
        """The bound gRPC port (useful with ``port=0``); raises RuntimeError before start."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__}.port is unknown until the server starts")
        return self._port

    @property
    def address(self) -> str:
        """The ``host:port`` clients connect to."""
        return f"{self.config.host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port, or None when metrics are off."""
        return self._metrics_port

    def host_statistics(self) -> HostStatistics:
        """Return the gRPC host's counters (in-flight calls, connections, rejections)."""
        if self._host is None:
            return HostStatistics(
                in_flight=0,
                connections=0,
                rejected_while_stopping=0,
                rejected_oversized=0,
                rejected_over_budget=0,
                request_bytes_in_flight=0,
            )
        return self._host.statistics()

    # -- hooks for subclasses --------------------------------------------------

    def _build_services(self, core: ComputeCore, metrics: ServerMetrics) -> list[Servable]:
        raise NotImplementedError

    def _compute_target(self) -> ComputeTarget:
        raise NotImplementedError

    def _list_models(self) -> list[ModelInfo]:
        raise NotImplementedError

    def _health(self) -> ServerHealth:
        raise NotImplementedError

    def _is_known_model(self, model_id: str) -> bool:
        raise NotImplementedError

    async def _enter_owned(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start what the subclass owns, before the host starts serving."""

    async def _exit_owned(self) -> None:
        """Stop what the subclass owns, after the host has stopped."""

    async def _after_listen(self) -> None:
        """Run once the host is serving (preloads)."""

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> _ServerBase:
        if self._entered:
            raise RuntimeError(f"this {type(self).__name__} was already started; create a new one")
        self._entered = True
        self._stop_requested = anyio.Event()
        self._owner_task = anyio.get_current_task().id
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            await self._enter_owned(task_group)
            core = ComputeCore(
                self._compute_target(),
                self.sessions,
                max_request_tokens=self.config.max_request_tokens,
            )
            self.metrics = ServerMetrics(
                list_models=self._list_models,
                sessions=self.sessions,
                is_known_model=self._is_known_model,
            )
            self._host = GrpcHost(
                self._build_services(core, self.metrics),
                host=self.config.host,
                port=self.config.port,
                health=self._health(),
                max_message_bytes=self.config.max_message_bytes,
                max_request_bytes_in_flight=self.config.max_request_bytes_in_flight,
            )
            self._port = await task_group.start(self._host.serve)
            task_group.start_soon(self.sessions.run_expiry)
            if self.config.metrics_port is not None:
                self._metrics_port = await task_group.start(
                    _serve_metrics_task, self.metrics, self.config.host, self.config.metrics_port
                )
            logger.info(
                "server.started address=%s:%d metrics_port=%s",
                self.config.host,
                self._port,
                self._metrics_port,
            )
            await self._after_listen()
        except BaseException as exc:
            await self._close(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._close(exc_type, exc, tb)

    async def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group, self._task_group = self._task_group, None
        if task_group is None:
            return None
        self._stopping = True
        try:
            with anyio.CancelScope(shield=True):
                if self._host is not None:
                    # Stop accepting, let in-flight requests finish, then cancel the rest.
                    await self._host.graceful_stop(self._grace_period)
        finally:
            try:
                # The manager's task group was entered after ours, so it exits first.
                # Its shutdown is shielded on its own.
                await self._exit_owned()
            finally:
                task_group.cancel_scope.cancel()
                try:
                    result = await task_group.__aexit__(exc_type, exc, tb)
                except BaseExceptionGroup as group:
                    # A task group wraps the body's own exception in a group;
                    # callers of a context manager expect the exception itself.
                    if exc is not None and group.exceptions == (exc,):
                        raise exc from None
                    raise
                finally:
                    logger.info("server.stopped port=%s", self._port)
        return result

    async def serve(
        self,
        *,
        handle_signals: bool = True,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled, `stop` is called, or SIGINT/SIGTERM arrives.

        Reports the bound port through ``task_status.started(port)``, so use it
        with ``port = await nursery.start(server.serve)``.

        Args:
            handle_signals: Stop gracefully on SIGINT/SIGTERM (main thread only).
                The signals are caught from before the server starts listening.

        Cancellation: cancelling the caller stops the server; in-flight
        requests still get the grace period, shielded.
        """
        with _stop_signals(handle_signals) as signals:
            async with self:
                task_status.started(self.port)
                await self._wait_for_stop(signals)

    async def start(self) -> None:
        """Start serving and return; for code migrating from the replaced servers.

        Finish with `wait_for_termination` or `stop` in the same task.
        """
        await self.__aenter__()

    async def wait_for_termination(self, *, handle_signals: bool = True) -> None:
        """Wait until `stop` is requested or SIGINT/SIGTERM arrives, then stop.

        Cancellation: stops the server, shielded, and re-raises.
        """
        if self._task_group is None:
            raise RuntimeError("call start() before wait_for_termination()")
        try:
            with _stop_signals(handle_signals) as signals:
                await self._wait_for_stop(signals)
        finally:
            await self._close(None, None, None)

    async def stop(self, grace_period: float | None = None) -> None:
        """Stop serving: stop accepting, let in-flight requests finish, then cancel the rest.

        From the task that called `start`, this stops the server and returns
        when it has stopped. From any other task it only requests the stop,
        which `wait_for_termination` or `serve` carries out.

        Args:
            grace_period: Seconds in-flight requests get; defaults to the config's.
        """
        if grace_period is not None:
            if not grace_period >= 0:
                raise ConfigError(f"grace_period={grace_period!r} is invalid; expected >= 0")
            self._grace_period = grace_period
        if self._stop_requested is not None:
            self._stop_requested.set()
        if self._task_group is not None and anyio.get_current_task().id == self._owner_task:
            await self._close(None, None, None)

    async def _wait_for_stop(self, signals: AsyncIterator[int] | None) -> None:
        assert self._stop_requested is not None
        stop_requested = self._stop_requested
        if signals is None:
            await stop_requested.wait()
            return
        async with anyio.create_task_group() as waiter:

            async def watch_signals() -> None:
                async for signum in signals:
                    logger.info("server.signal signal=%s", signal.Signals(signum).name)
                    stop_requested.set()
                    return

            waiter.start_soon(watch_signals)
            await stop_requested.wait()
            waiter.cancel_scope.cancel()


@contextmanager
def _stop_signals(enabled: bool) -> Iterator[AsyncIterator[int] | None]:
    """Catch SIGINT and SIGTERM while the block runs, when enabled and on the main thread."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield None
        return
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        yield signals


async def _serve_metrics_task(
    metrics: ServerMetrics,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    await serve_metrics(metrics, host=host, port=port, task_status=task_status)


class AsyncManagedServer(_ServerBase):
    """A gRPC server that hosts several models and loads and unloads them while it serves.

    Args:
        config: Address, limits and models to preload; keyword arguments
            override its fields, for example ``AsyncManagedServer(port=0)``.
        loader: The blocking loader the manager uses (defaults to the checkpoint loader).
        releaser: The blocking function that frees a dropped model.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        loader: Loader | None = None,
        releaser: Releaser | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = ServerConfig(**overrides)
        elif overrides:
            config = ServerConfig.from_dict({**_config_fields(config), **overrides})
        super().__init__(config)
        self.manager = AsyncModelManager(
            max_models=config.max_models,
            max_load_workers=config.max_load_workers,
            max_compute_workers=config.max_compute_workers,
            loader=loader,
            releaser=releaser,
            load_timeout=config.load_timeout,
            lease_drain_timeout=config.lease_drain_timeout,
        )
        # A generation session uses its model between requests, so LRU
        # eviction must skip models with open sessions.
        self.manager.add_eviction_guard(self.sessions.has_sessions_nowait)

    async def __aenter__(self) -> AsyncManagedServer:
        await super().__aenter__()
        return self

    def _compute_target(self) -> ComputeTarget:
        return self.manager

    def _list_models(self) -> list[ModelInfo]:
        return self.manager.list_models_nowait()

    def _is_known_model(self, model_id: str) -> bool:
        return manager_model_state(self.manager)(model_id) is not None

    def _health(self) -> ServerHealth:
        return ServerHealth(
            is_serving=lambda: not self._stopping,
            model_state=manager_model_state(self.manager),
        )

    def _build_services(self, core: ComputeCore, metrics: ServerMetrics) -> list[Servable]:
        self.manager.add_listener(metrics.on_manager_event)
        return [
            ComputeService(core, metrics, max_tensor_elements=self.config.max_tensor_elements),
            ManagementService(
                self.manager,
                self.sessions,
                metrics,
                now=core.now,
                limits=management_pb2.ServerLimits(
                    max_message_bytes=self.config.max_message_bytes,
                    max_request_tokens=self.config.max_request_tokens,
                ),
            ),
        ]

    async def _enter_owned(self, task_group: anyio.abc.TaskGroup) -> None:
        await self.manager.__aenter__()

    async def _exit_owned(self) -> None:
        await self.manager.__aexit__(None, None, None)

    async def _after_listen(self) -> None:
        for model in self.config.models:
            self.manager.start_load(model)

    async def load_model(self, config: ModelConfig) -> ModelInfo:
        """Load a model and wait until it is READY; see `AsyncModelManager.load_model`."""
        return await self.manager.load_model(config)

    async def unload_model(self, model_id: str) -> None:
        """Unload a model and close its sessions; see `AsyncModelManager.unload_model`."""
        await self.manager.unload_model(model_id)
        self.sessions.close_for_model_nowait(model_id)

    async def list_models(self) -> list[ModelInfo]:
        """Return every model in any state; never waits for a load."""
        return await self.manager.list_models()


def _config_fields(config: ServerConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


class AsyncModelComputeFunction:
    """Serve one model: a trunk `ModelPart`, or any module mapping hidden states to hidden states.

    Call it directly (``await compute_fn(hidden)``) or give it to
    `AsyncGRPCComputeServer`. Its forward passes run in worker threads
    behind a limiter of its own.

    Args:
        model: The module. A `ModelPart` trunk also serves generation sessions.
        device: Where the model runs, for example ``"cpu"`` or ``"cuda:0"``.
        model_id: The id requests must name.
        max_workers: Worker threads for forward and backward passes.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        *,
        model_id: str = "default",
        max_workers: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers!r} is invalid; expected >= 1")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.model_id = model_id
        self.max_workers = max_workers
        self._limiter: anyio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return (
            f"<AsyncModelComputeFunction model_id={self.model_id!r} "
            f"model={type(self.model).__name__} device={self.device}>"
        )

    async def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the model on ``hidden`` in a worker thread and return its output on the CPU.

        Cancellation: abandons the worker thread; its result is dropped.
        """
        output, _, _ = await self.run_compute(
            _forward_blocking, self.model, hidden, None, None, None
        )
        return output

    @asynccontextmanager
    async def _lease(self, model_id: str) -> Any:
        if model_id != self.model_id:
            raise ModelNotFoundError(
                f"model {model_id!r} is not served here; this server serves {self.model_id!r}"
            )
        yield self.model

    def lease(self, model_id: str) -> AbstractAsyncContextManager[Any]:
        """Hold the model for one request; raise `ModelNotFoundError` for any other id."""
        return self._lease(model_id)

    async def run_compute(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` in one of this function's worker threads."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_workers)
        return await anyio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=True
        )


class AsyncGRPCComputeServer(_ServerBase):
    """A gRPC server for one model, wrapped in an `AsyncModelComputeFunction`.

    Args:
        compute_fn: The model to serve.
        host: The address to bind; ``127.0.0.1`` by default.
        port: The TCP port; 0 picks a free one (read `port` after start).
        config: Limits (message size, sessions, grace period); host and port
            arguments override its fields.
    """

    def __init__(
        self,
        compute_fn: AsyncModelComputeFunction,
        host: str | None = None,
        port: int | None = None,
        *,
        config: ServerConfig | None = None,
    ) -> None:
        if not isinstance(compute_fn, AsyncModelComputeFunction):
            raise TypeError(
                "compute_fn must be an AsyncModelComputeFunction, not "
                f"{type(compute_fn).__name__}; wrap the model with AsyncModelComputeFunction(model)"
            )
        fields = _config_fields(config or ServerConfig())
        if host is not None:
            fields["host"] = host
        if port is not None:
            fields["port"] = port
        super().__init__(ServerConfig.from_dict(fields))
        self.compute_fn = compute_fn

    async def __aenter__(self) -> AsyncGRPCComputeServer:
        await super().__aenter__()
        return self

    def _compute_target(self) -> ComputeTarget:
        return self.compute_fn

    def _list_models(self) -> list[ModelInfo]:
        return []

    def _is_known_model(self, model_id: str) -> bool:
        return model_id == self.compute_fn.model_id

    def _health(self) -> ServerHealth:
        return ServerHealth(
            is_serving=lambda: not self._stopping,
            model_state=lambda i: ModelState.READY if i == self.compute_fn.model_id else None,
        )

    def _build_services(self, core: ComputeCore, metrics: ServerMetrics) -> list[Servable]:
        return [ComputeService(core, metrics, max_tensor_elements=self.config.max_tensor_elements)]
