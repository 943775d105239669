"""The management client: load, unload, list and describe models on a server, and check health.

Every call has a per-call timeout. List, Describe and Load are retried on UNAVAILABLE errors
under the client's `RetryPolicy`, because repeating them is harmless: a Load of an id that is
already loading with the same config joins that load. Unload is not retried. A health check is
not retried either, so that it reports the server's state at the time of the call.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from grpclib.health.v1 import health_grpc, health_pb2

from slm_trio._proto.v1 import management_grpc, management_pb2
from slm_trio.client._connection import Connection, open_connection
from slm_trio.client._retry import RetryPolicy, call_with_retry
from slm_trio.client._transport import RemoteModel, remote_model_from_describe
from slm_trio.config import ModelConfig
from slm_trio.errors import ModelNotFoundError, RemoteError, SlmTrioError
from slm_trio.wire import model_config_to_proto

__all__ = ["ManagementClient", "ModelDescription", "ModelStatus", "open_management_client"]


@dataclass(frozen=True, kw_only=True)
class ModelStatus:
    """One model entry of a server, as List, Load and Describe return it.

    Attributes:
        model_id: The model's id.
        state: ``"LOADING"``, ``"READY"``, ``"UNLOADING"`` or ``"FAILED"``.
        reason: Why the model is in this state, for example a failed load's error.
        progress: Load progress from 0.0 to 1.0 while loading, if the loader reports it.
        part: ``"full"``, ``"bottom"``, ``"trunk"`` or ``"top"``; empty without a config.
        layers: The split points ``(s1, s2)``, or None.
        dtype: The configured dtype, for example ``"float32"``.
        device: The configured device, for example ``"cpu"``.
        load_seconds: Seconds the load took, once ready.
        active_requests: Requests using the model now.
        seconds_in_state: Seconds since the entry last changed state.
    """

    model_id: str
    state: str
    reason: str | None
    progress: float | None
    part: str
    layers: tuple[int, int] | None
    dtype: str
    device: str
    load_seconds: float | None
    active_requests: int
    seconds_in_state: float

    @classmethod
    def from_proto(cls, info: management_pb2.ModelInfo) -> ModelStatus:
        """Build a status from a `ModelInfo` message."""
        return cls(
            model_id=info.model_id,
            state=management_pb2.ModelState.Name(info.state).removeprefix("MODEL_STATE_"),
            reason=info.reason if info.HasField("reason") else None,
            progress=info.progress if info.HasField("progress") else None,
            part=info.part,
            layers=(info.layers.s1, info.layers.s2) if info.HasField("layers") else None,
            dtype=info.dtype,
            device=info.device,
            load_seconds=info.load_seconds if info.HasField("load_seconds") else None,
            active_requests=info.active_requests,
            seconds_in_state=info.seconds_in_state,
        )


@dataclass(frozen=True, kw_only=True)
class ModelDescription:
    """A model's status and, once it is ready, its architecture facts."""

    status: ModelStatus
    facts: RemoteModel | None


class ManagementClient:
    """Calls to a server's Management service. Build it with `open_management_client`.

    Args:
        connection: The connection to the server.
        retry: The retry policy for List, Describe and Load.
        call_timeout: Seconds each call may take; None for no limit.
        rng: The source of retry jitter; a fresh generator if None.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        retry: RetryPolicy | None = None,
        call_timeout: float | None = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._connection = connection
        self._stub = management_grpc.ManagementStub(connection.channel)
        self._health_stub = health_grpc.HealthStub(connection.channel)
        self.retry = retry if retry is not None else RetryPolicy()
        self.call_timeout = call_timeout
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        return f"<ManagementClient {self._connection.address}>"

    @property
    def address(self) -> str:
        """The server's ``host:port``."""
        return self._connection.address

    async def list_models(self) -> list[ModelStatus]:
        """Return every model the server holds, in any state.

        Cancellation: stops the call; nothing changes on the server.
        """

        async def attempt() -> management_pb2.ListResponse:
            reply, _, _ = await self._connection.unary(
                self._stub.List,
                management_pb2.ListRequest(),
                call_timeout=self.call_timeout,
                name="Management.List",
            )
            return reply  # type: ignore[no-any-return]

        reply = await call_with_retry(
            attempt, policy=self.retry, operation="Management.List", rng=self._rng
        )
        return [ModelStatus.from_proto(info) for info in reply.models]

    async def describe_model(self, model_id: str) -> ModelDescription:
        """Return one model's status and, if it is ready, its facts.

        Raises:
            ModelNotFoundError: The server has no model with this id.

        Cancellation: stops the call; nothing changes on the server.
        """

        async def attempt() -> management_pb2.DescribeResponse:
            reply, _, _ = await self._connection.unary(
                self._stub.Describe,
                management_pb2.DescribeRequest(model_id=model_id),
                call_timeout=self.call_timeout,
                name="Management.Describe",
            )
            return reply  # type: ignore[no-any-return]

        reply = await call_with_retry(
            attempt, policy=self.retry, operation=f"Describe {model_id!r}", rng=self._rng
        )
        facts: RemoteModel | None = None
        if reply.HasField("facts"):
            try:
                facts = remote_model_from_describe(model_id, reply)
            except SlmTrioError:
                facts = None
        return ModelDescription(status=ModelStatus.from_proto(reply.model), facts=facts)

    async def load_model(
        self,
        config: ModelConfig,
        *,
        wait: bool = True,
        replace: bool = False,
        call_timeout: float | None = None,
    ) -> ModelStatus:
        """Ask the server to load a model and return its entry.

        Args:
            config: What to load; ``model_path`` is a path on the server's machine.
            wait: If true, return once the model is ready or its load failed; if false,
                return as soon as the load has started.
            replace: If true and the id is READY, load ``config`` again and swap it in.
                The old model serves requests until then, and stays if the new load fails.
            call_timeout: Seconds this call may take. The default is the client's call timeout
                when ``wait`` is false, and no limit when it is true, because loads can take
                minutes.

        Raises:
            ModelLoadError: The load failed (with ``wait``), for example a missing tensor.
            ModelConflictError: The id is loaded with another config and ``replace`` is false,
                or a reload of the id is already running.
            ModelCapacityError: The server has no room and nothing can be evicted.
            ConfigError: The server rejected a config field.

        Cancellation: stops waiting; the server decides whether the load goes on.
        """
        if call_timeout is None and not wait:
            call_timeout = self.call_timeout
        request = management_pb2.LoadRequest(
            config=model_config_to_proto(config), wait=wait, replace=replace
        )

        async def attempt() -> management_pb2.LoadResponse:
            reply, _, _ = await self._connection.unary(
                self._stub.Load, request, call_timeout=call_timeout, name="Management.Load"
            )
            return reply  # type: ignore[no-any-return]

        reply = await call_with_retry(
            attempt, policy=self.retry, operation=f"Load {config.model_id!r}", rng=self._rng
        )
        return ModelStatus.from_proto(reply.model)

    async def unload_model(self, model_id: str) -> None:
        """Unload a model and close its generation sessions. Not retried.

        The server rejects new requests for the model at once, waits for its in-flight
        requests for at most its ``lease_drain_timeout``, then removes the model and closes
        its sessions. A generation in progress on the model fails at its next step.

        Raises:
            ModelNotFoundError: The server has no model with this id.

        Cancellation: stops waiting; the unload may still happen on the server.
        """
        await self._connection.unary(
            self._stub.Unload,
            management_pb2.UnloadRequest(model_id=model_id),
            call_timeout=self.call_timeout,
            name="Management.Unload",
        )

    async def check_health(self, service: str = "") -> str:
        """Call the standard ``grpc.health.v1.Health/Check`` and return the serving status.

        Args:
            service: ``""`` for the whole server, or a model id. A model id is SERVING only
                while that model is READY.

        Returns:
            The status name: ``"SERVING"``, ``"NOT_SERVING"`` or ``"UNKNOWN"``.

        Raises:
            ModelNotFoundError: The server has no model or service named ``service``.
            ServerUnavailableError: The server cannot be reached. Not retried.

        Cancellation: stops the call; nothing changes on the server.
        """
        try:
            reply, _, _ = await self._connection.unary(
                self._health_stub.Check,
                health_pb2.HealthCheckRequest(service=service),
                call_timeout=self.call_timeout,
                name="Health.Check",
            )
        except RemoteError as exc:
            # The health service sends a plain NOT_FOUND status, which carries no slm_trio
            # error class in its trailers.
            if exc.code != "NOT_FOUND":
                raise
            raise ModelNotFoundError(
                f"the server at {self.address} has no model or service named {service!r}"
            ) from exc
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@asynccontextmanager
async def open_management_client(
    host: str,
    port: int,
    *,
    retry: RetryPolicy | None = None,
    call_timeout: float | None = 30.0,
) -> AsyncIterator[ManagementClient]:
    """Open a management client to ``host:port``, from trio or asyncio code.

    Nothing is sent until the first call.
    """
    async with open_connection(host, port) as connection:
        yield ManagementClient(connection, retry=retry, call_timeout=call_timeout)
