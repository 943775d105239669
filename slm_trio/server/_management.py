"""The model-management service (Load, Unload, List, Describe) and the health service.

Both run as grpclib handlers on the asyncio side. Management calls cross into
the owning loop once with `run_in_owner`. Loads start in the manager's task
group, so a client that disconnects while waiting does not cancel the load,
and no other RPC waits for it.

Health is computed from the manager's table, read synchronously on the spot:
the server as a whole (service ``""``, or a service name of ours) is SERVING
until a stop begins, and a model id used as the service name is SERVING only
while that model is READY.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Stream

from slm_trio._proto.v1 import management_pb2
from slm_trio._proto.v1.management_grpc import ManagementBase
from slm_trio._status_map import truncate_status_message
from slm_trio.errors import ModelNotFoundError
from slm_trio.manager import AsyncModelManager, ModelInfo, ModelState
from slm_trio.server._host import run_in_owner
from slm_trio.server._metrics import ServerMetrics
from slm_trio.server._sessions import SessionStore
from slm_trio.server._status import map_errors
from slm_trio.split import ModelPart
from slm_trio.wire import model_config_from_proto, model_info_to_proto

__all__ = ["ManagementService", "ServerHealth", "model_facts"]

_OUR_SERVICES = ("slm_trio.v1.Compute", "slm_trio.v1.Management")

# Seconds between two status checks of a health Watch stream.
_WATCH_INTERVAL = 1.0


class ManagementService(ManagementBase):
    """The ``slm_trio.v1.Management`` service over an `AsyncModelManager`."""

    def __init__(
        self,
        manager: AsyncModelManager,
        sessions: SessionStore,
        metrics: ServerMetrics,
        *,
        now: Callable[[], float],
        limits: management_pb2.ServerLimits | None = None,
    ) -> None:
        self._manager = manager
        self._sessions = sessions
        self._metrics = metrics
        self._now = now
        self._limits = limits

    async def Load(
        self, stream: Stream[management_pb2.LoadRequest, management_pb2.LoadResponse]
    ) -> None:
        """Start a load, and wait for it when the request sets ``wait``."""
        async with map_errors(stream, method="Management.Load"):
            with self._metrics.observe("Load") as observation:
                request = await stream.recv_message()
                if request is None or not request.HasField("config"):
                    raise GRPCError(Status.INVALID_ARGUMENT, "LoadRequest.config is missing")
                config = model_config_from_proto(request.config)
                observation.model_id = config.model_id
                info = await run_in_owner(self._load, config, request.wait, request.replace)
                await stream.send_message(
                    management_pb2.LoadResponse(model=model_info_to_proto(info, now=self._now()))
                )

    async def _load(self, config: Any, wait: bool, replace: bool) -> ModelInfo:
        if replace and self._is_ready(config.model_id):
            if wait:
                return await self._manager.reload_model(config.model_id, config)
            return self._manager.start_reload(config.model_id, config)
        handle = self._manager.start_load(config)
        if wait:
            return await handle.wait()
        return self._manager.get_info(config.model_id)

    def _is_ready(self, model_id: str) -> bool:
        try:
            return self._manager.get_info(model_id).state is ModelState.READY
        except ModelNotFoundError:
            return False

    async def Unload(
        self, stream: Stream[management_pb2.UnloadRequest, management_pb2.UnloadResponse]
    ) -> None:
        """Unload a model once its in-flight requests finish, and close its sessions."""
        async with map_errors(stream, method="Management.Unload"):
            with self._metrics.observe("Unload") as observation:
                request = await stream.recv_message()
                if request is None:
                    raise GRPCError(Status.INVALID_ARGUMENT, "the Unload call carried no request")
                observation.model_id = request.model_id
                await run_in_owner(self._unload, request.model_id)
                await stream.send_message(management_pb2.UnloadResponse(model_id=request.model_id))

    async def _unload(self, model_id: str) -> None:
        await self._manager.unload_model(model_id)
        self._sessions.close_for_model_nowait(model_id)

    async def List(
        self, stream: Stream[management_pb2.ListRequest, management_pb2.ListResponse]
    ) -> None:
        """List every model in any state; never waits for a load."""
        async with map_errors(stream, method="Management.List"):
            with self._metrics.observe("List"):
                await stream.recv_message()
                now = self._now()
                infos = self._manager.list_models_nowait()
                await stream.send_message(
                    management_pb2.ListResponse(
                        models=[model_info_to_proto(info, now=now) for info in infos]
                    )
                )

    async def Describe(
        self, stream: Stream[management_pb2.DescribeRequest, management_pb2.DescribeResponse]
    ) -> None:
        """Return one model's state and, once it is READY, its architecture facts."""
        async with map_errors(stream, method="Management.Describe"):
            with self._metrics.observe("Describe") as observation:
                request = await stream.recv_message()
                if request is None:
                    raise GRPCError(Status.INVALID_ARGUMENT, "the Describe call carried no request")
                observation.model_id = request.model_id
                response = await run_in_owner(self._describe, request.model_id)
                await stream.send_message(response)

    async def _describe(self, model_id: str) -> management_pb2.DescribeResponse:
        info = self._manager.get_info(model_id)
        response = management_pb2.DescribeResponse(model=model_info_to_proto(info, now=self._now()))
        if self._limits is not None:
            response.limits.CopyFrom(self._limits)
        if info.state is ModelState.READY:
            async with self._manager.lease(model_id) as model:
                response.facts.CopyFrom(model_facts(model))
        return response


def model_facts(model: Any) -> management_pb2.ModelFacts:
    """Describe a loaded model: a `ModelPart`, a transformers model, or a plain module."""
    if isinstance(model, ModelPart):
        start, stop = model.layer_range
        return management_pb2.ModelFacts(
            model_type=model.model_type,
            hidden_size=model.hidden_size,
            num_hidden_layers=model.num_hidden_layers,
            layer_start=start,
            layer_stop=stop,
            vocab_size=model.vocab_size,
            torch_dtype=str(model.dtype).removeprefix("torch."),
        )
    config = getattr(model, "config", None)
    facts = management_pb2.ModelFacts()
    if config is not None:
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        facts.model_type = str(getattr(config, "model_type", ""))
        facts.hidden_size = int(getattr(config, "hidden_size", 0) or 0)
        facts.num_hidden_layers = layers
        facts.layer_stop = layers
        facts.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
    dtype = getattr(model, "dtype", None)
    if dtype is not None:
        facts.torch_dtype = str(dtype).removeprefix("torch.")
    return facts


class ServerHealth(Health):
    """The `grpc.health.v1.Health` service, computed from the server's state and model table.

    Args:
        is_serving: Whether the server accepts requests (False once a stop begins).
        model_state: The state of a model id, or None when the id is unknown.
    """

    def __init__(
        self,
        *,
        is_serving: Callable[[], bool],
        model_state: Callable[[str], ModelState | None],
    ) -> None:
        super().__init__()
        self._is_serving = is_serving
        self._model_state = model_state

    def status(self, service: str) -> HealthCheckResponse.ServingStatus.ValueType:
        """Return the serving status of ``service``: ours, a model id, or ``""``."""
        serving = self._is_serving()
        if service == "" or service in _OUR_SERVICES:
            return HealthCheckResponse.SERVING if serving else HealthCheckResponse.NOT_SERVING
        state = self._model_state(service)
        if state is None:
            return HealthCheckResponse.SERVICE_UNKNOWN
        if serving and state is ModelState.READY:
            return HealthCheckResponse.SERVING
        return HealthCheckResponse.NOT_SERVING

    async def Check(self, stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        request = await stream.recv_message()
        service = request.service if request is not None else ""
        status = self.status(service)
        if status == HealthCheckResponse.SERVICE_UNKNOWN:
            await stream.send_trailing_metadata(
                status=Status.NOT_FOUND,
                status_message=truncate_status_message(f"unknown service or model {service!r}"),
            )
            return
        await stream.send_message(HealthCheckResponse(status=status))

    async def Watch(self, stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        request = await stream.recv_message()
        service = request.service if request is not None else ""
        last: int | None = None
        while True:
            status = self.status(service)
            if status != last:
                await stream.send_message(HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(_WATCH_INTERVAL)


def manager_model_state(manager: AsyncModelManager) -> Callable[[str], ModelState | None]:
    """Return a function that reads one model's state from ``manager`` without awaiting."""

    def state(model_id: str) -> ModelState | None:
        try:
            return manager.get_info(model_id).state
        except ModelNotFoundError:
            return None

    return state
