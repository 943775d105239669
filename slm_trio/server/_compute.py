"""The grpclib handlers of the compute service: Forward, Backward and Session.

Handlers run as asyncio tasks (natively, or inside trio-asyncio under trio).
Each one decodes and validates its request on the spot, crosses into the
owning loop once with `run_in_owner` to call the `ComputeCore`, and encodes
the response. Errors go through `map_errors`, the one place that turns
exceptions into gRPC status codes.
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from slm_trio._proto.v1 import compute_pb2
from slm_trio._proto.v1.compute_grpc import ComputeBase
from slm_trio.errors import SlmTrioError
from slm_trio.server._core import ComputeCore, Timing, cached_positions
from slm_trio.server._host import run_in_owner
from slm_trio.server._metrics import ServerMetrics
from slm_trio.server._status import map_errors
from slm_trio.wire import decode_optional_tensor, decode_tensor, encode_tensor

__all__ = ["ComputeService"]


def _timing(timing: Timing, started: float) -> compute_pb2.ServerTiming:
    return compute_pb2.ServerTiming(
        queue_seconds=timing.queue_seconds,
        compute_seconds=timing.compute_seconds,
        total_seconds=time.perf_counter() - started,
    )


def _invalid(message: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, message)


class ComputeService(ComputeBase):
    """The ``slm_trio.v1.Compute`` service over a `ComputeCore`.

    Args:
        core: The compute core, owned by the server's event loop.
        metrics: Where request counts and latencies go.
        max_tensor_elements: The maximum number of elements in one request tensor.
    """

    def __init__(
        self, core: ComputeCore, metrics: ServerMetrics, *, max_tensor_elements: int
    ) -> None:
        self._core = core
        self._metrics = metrics
        self._max_elements = max_tensor_elements

    def _decode(self, message: Any, field: str) -> Any:
        if not message.HasField(field):
            raise _invalid(f"{field} is missing; the request must carry it")
        return decode_tensor(getattr(message, field), max_elements=self._max_elements, name=field)

    def _decode_optional(self, message: Any, field: str) -> Any:
        return decode_optional_tensor(message, field, max_elements=self._max_elements)

    async def Forward(
        self, stream: Stream[compute_pb2.ForwardRequest, compute_pb2.ForwardResponse]
    ) -> None:
        """Run a model's trunk on one batch of hidden states."""
        async with map_errors(stream, method="Compute.Forward"):
            with self._metrics.observe("Forward") as observation:
                started = time.perf_counter()
                request = await stream.recv_message()
                if request is None:
                    raise _invalid("the Forward call carried no request message")
                observation.model_id = request.model_id
                hidden = self._decode(request, "hidden_states")
                position_ids = self._decode_optional(request, "position_ids")
                attention_mask = self._decode_optional(request, "attention_mask")
                output, timing = await run_in_owner(
                    self._core.forward,
                    request.model_id,
                    hidden,
                    position_ids,
                    attention_mask,
                    _expected_layers(request),
                )
                await stream.send_message(
                    compute_pb2.ForwardResponse(
                        hidden_states=encode_tensor(output, name="hidden_states"),
                        timing=_timing(timing, started),
                    )
                )

    async def Backward(
        self, stream: Stream[compute_pb2.BackwardRequest, compute_pb2.BackwardResponse]
    ) -> None:
        """Backpropagate a gradient through a model's trunk."""
        async with map_errors(stream, method="Compute.Backward"):
            with self._metrics.observe("Backward") as observation:
                started = time.perf_counter()
                request = await stream.recv_message()
                if request is None:
                    raise _invalid("the Backward call carried no request message")
                observation.model_id = request.model_id
                hidden = self._decode(request, "hidden_states")
                grad_output = self._decode(request, "grad_output")
                position_ids = self._decode_optional(request, "position_ids")
                attention_mask = self._decode_optional(request, "attention_mask")
                grad_input, timing = await run_in_owner(
                    self._core.backward,
                    request.model_id,
                    hidden,
                    grad_output,
                    position_ids,
                    attention_mask,
                    _expected_layers(request),
                )
                await stream.send_message(
                    compute_pb2.BackwardResponse(
                        grad_input=encode_tensor(grad_input, name="grad_input"),
                        timing=_timing(timing, started),
                    )
                )

    async def Session(
        self, stream: Stream[compute_pb2.SessionRequest, compute_pb2.SessionResponse]
    ) -> None:
        """Run one generation session: open, steps, close."""
        async with map_errors(stream, method="Compute.Session"):
            with self._metrics.observe("Session") as observation:
                await self._run_session(stream, observation)

    async def _run_session(
        self,
        stream: Stream[compute_pb2.SessionRequest, compute_pb2.SessionResponse],
        observation: Any,
    ) -> None:
        first = await stream.recv_message()
        if first is None:
            return
        kind = first.WhichOneof("kind")
        if kind != "open":
            raise _invalid(f"the first message of a session must be 'open', got {kind!r}")
        model_id = first.open.model_id
        observation.model_id = model_id
        resume_id = (
            first.open.resume_session_id if first.open.HasField("resume_session_id") else None
        )
        session = await run_in_owner(
            self._core.open_session, model_id, resume_id, _expected_layers(first.open)
        )
        closed = False
        try:
            await self._serve_session(stream, session, model_id)
            closed = True
        except (SlmTrioError, GRPCError, DecodeError):
            # The server rejected a request: the client will not resume this
            # session, so free its cache now instead of after the TTL.
            self._core.close_session_nowait(session)
            closed = True
            raise
        finally:
            if not closed:
                # The stream broke or was cancelled: keep the session for resuming.
                self._core.detach_session_nowait(session)

    async def _serve_session(
        self,
        stream: Stream[compute_pb2.SessionRequest, compute_pb2.SessionResponse],
        session: Any,
        model_id: str,
    ) -> None:
        """Send the opened message, then run steps until a close or the end of the stream."""
        await stream.send_message(
            compute_pb2.SessionResponse(
                opened=compute_pb2.SessionOpened(
                    session_id=session.session_id,
                    ttl_seconds=self._core.sessions.ttl,
                    cached_tokens=cached_positions(session),
                )
            )
        )
        while True:
            request = await stream.recv_message()
            if request is None:
                # The client ended its side without a close: keep the session.
                self._core.detach_session_nowait(session)
                return
            kind = request.WhichOneof("kind")
            if kind == "step":
                response = await self._step(session, request.step, model_id)
                await stream.send_message(response)
            elif kind == "close":
                self._core.close_session_nowait(session)
                await stream.send_message(
                    compute_pb2.SessionResponse(
                        closed=compute_pb2.SessionClosed(session_id=session.session_id)
                    )
                )
                return
            else:
                raise _invalid(
                    f"session {session.session_id!r} is already open; expected 'step' or "
                    f"'close', got {kind!r}"
                )

    async def _step(
        self, session: Any, step: compute_pb2.SessionStep, model_id: str
    ) -> compute_pb2.SessionResponse:
        with self._metrics.observe("SessionStep") as observation:
            observation.model_id = model_id
            started = time.perf_counter()
            hidden = self._decode(step, "hidden_states")
            position_ids = self._decode_optional(step, "position_ids")
            attention_mask = self._decode_optional(step, "attention_mask")
            result = await run_in_owner(
                self._core.step, session, step.step_index, hidden, position_ids, attention_mask
            )
            return compute_pb2.SessionResponse(
                step_result=compute_pb2.SessionStepResult(
                    step_index=step.step_index,
                    hidden_states=encode_tensor(result.hidden_states, name="hidden_states"),
                    cached_tokens=result.cached_tokens,
                    server_seconds=time.perf_counter() - started,
                )
            )


def _expected_layers(message: Any) -> tuple[int, int] | None:
    """Return a request's ``expected_layers`` as ``(start, stop)``, or None when unset."""
    if not message.HasField("expected_layers"):
        return None
    layers = message.expected_layers
    return int(layers.start), int(layers.stop)
