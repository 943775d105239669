"""The trunk transport: how a split client reaches the trunk, and its gRPC implementation.

`TrunkTransport` and `TrunkSession` are the seam between the split client's generation loop
and the wire. `GrpcTrunkTransport` implements them over a `Connection`: Describe on the
Management service, Forward and Backward as unary calls, and a generation session as one
``Compute.Session`` bidirectional stream on which every request gets exactly one response.
Another implementation (an in-process trunk, a test double) only has to keep the same
contract: tensors in, tensors out, errors as `slm_trio.errors` classes.

A session's stream is driven from one task at a time. When a step fails or is cancelled the
stream is in an unknown state, so the caller must `abort` it, which resets the stream and
leaves the server-side session resumable by id until the server's TTL passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import torch
from grpclib.client import Stream
from grpclib.exceptions import GRPCError, StreamTerminatedError

from slm_trio._proto.v1 import compute_grpc, compute_pb2, management_grpc, management_pb2
from slm_trio.client._connection import (
    Connection,
    deadline_as_error,
    translate_errors,
    wire_bytes,
)
from slm_trio.errors import (
    ConfigError,
    InvalidTensorError,
    ModelLoadError,
    ModelLoadingError,
    ModelUnloadingError,
    ServerUnavailableError,
)
from slm_trio.wire import decode_tensor, encode_tensor

__all__ = [
    "GrpcTrunkSession",
    "GrpcTrunkTransport",
    "RemoteModel",
    "TrunkReply",
    "TrunkSession",
    "TrunkTransport",
]

logger = logging.getLogger(__name__)

# How long a client waits before asking again about a model that Describe reports as loading.
_LOADING_RETRY_AFTER = 0.5
# How long closing a session may take before the stream is reset instead, in seconds.
_CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True, kw_only=True)
class RemoteModel:
    """Architecture facts of a model part that a server holds, as Describe returns them.

    Attributes:
        model_id: The id requests use.
        model_type: The transformers ``model_type``, for example ``"llama"``.
        part: The part the server holds, ``"trunk"`` for a split client.
        hidden_size: The width of the hidden states.
        num_hidden_layers: The layers of the whole model.
        layer_range: The layers ``[start, stop)`` the server holds.
        vocab_size: The vocabulary size of the whole model.
        dtype: The torch dtype name of the server's weights, for example ``"float32"``.
        max_message_bytes: The largest request message the server accepts, in bytes, or
            None when the server does not report it.
        max_request_tokens: The most tokens (rows times new positions) the server accepts
            in one request, or None when the server does not report it.
    """

    model_id: str
    model_type: str
    part: str
    hidden_size: int
    num_hidden_layers: int
    layer_range: tuple[int, int]
    vocab_size: int
    dtype: str
    max_message_bytes: int | None = None
    max_request_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class TrunkReply:
    """The trunk's reply to one forward, backward or session step.

    Attributes:
        tensor: The trunk's hidden states ``[batch, seq, hidden]``, or the gradient with
            respect to the input for a backward pass. Read-only: it may share memory with
            the received message.
        server_seconds: Time the server spent on the request, from receipt to reply.
        cached_tokens: Positions per row in the session's KV cache after a step; None
            outside sessions.
        bytes_sent: gRPC message bytes of the request.
        bytes_received: gRPC message bytes of the reply.
    """

    tensor: torch.Tensor
    server_seconds: float
    cached_tokens: int | None
    bytes_sent: int
    bytes_received: int


class TrunkSession(Protocol):
    """One open generation session: a KV cache of the trunk on the server."""

    @property
    def session_id(self) -> str:
        """The server's id of the session, for resuming it."""
        ...

    @property
    def cached_tokens(self) -> int:
        """Positions per row the server had cached when the session opened (0 when new)."""
        ...

    async def step(
        self,
        step_index: int,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        call_timeout: float | None,
    ) -> TrunkReply:
        """Run the trunk over new tokens and append them to the session's cache."""
        ...

    async def aclose(self) -> None:
        """Close the session on the server and free its cache."""
        ...

    async def abort(self) -> None:
        """Drop the connection to the session without closing it, so it can be resumed."""
        ...


class TrunkTransport(Protocol):
    """The calls through which a split client reaches a trunk: describe, run, open sessions."""

    @property
    def address(self) -> str:
        """Where the trunk runs, for messages, for example ``"127.0.0.1:50051"``."""
        ...

    async def describe(self, model_id: str, *, call_timeout: float | None) -> RemoteModel:
        """Return the facts of a ready model; a loading one raises `ModelLoadingError`."""
        ...

    async def open_session(
        self, model_id: str, *, resume_session_id: str | None, call_timeout: float | None
    ) -> TrunkSession:
        """Open a session, or reattach to ``resume_session_id`` with its cache."""
        ...

    async def forward(
        self,
        model_id: str,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        call_timeout: float | None,
    ) -> TrunkReply:
        """Run the trunk over a full sequence batch without a cache."""
        ...

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
        """Backpropagate ``grad_output`` through the trunk and return the input gradient."""
        ...


class GrpcTrunkTransport:
    """`TrunkTransport` over a gRPC `Connection` to a slm_trio server.

    The transport remembers the layers that Describe reported for each model id and
    sends them with every Forward, Backward and session open of that id. A server whose
    model was reloaded with other split points then rejects the request with
    `ModelSplitMismatchError` instead of returning hidden states that do not fit the
    client's own parts.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._compute = compute_grpc.ComputeStub(connection.channel)
        self._management = management_grpc.ManagementStub(connection.channel)
        self._described_layers: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return f"<GrpcTrunkTransport {self.address}>"

    @property
    def address(self) -> str:
        """The server's ``host:port``."""
        return self._connection.address

    async def describe(self, model_id: str, *, call_timeout: float | None) -> RemoteModel:
        """Describe ``model_id`` and return its facts once it is ready.

        Raises:
            ModelLoadingError: The model is still loading (retryable).
            ModelUnloadingError: The model is being unloaded.
            ModelLoadError: The model's last load failed; the message has the reason.
            ModelNotFoundError: The server has no model with this id.
        """
        reply, _, _ = await self._connection.unary(
            self._management.Describe,
            management_pb2.DescribeRequest(model_id=model_id),
            call_timeout=call_timeout,
            name="Management.Describe",
        )
        model = remote_model_from_describe(model_id, reply)
        # Only the first Describe counts: the client's parts were built for those layers.
        self._described_layers.setdefault(model_id, model.layer_range)
        return model

    def _set_expected_layers(self, message: Any, model_id: str) -> None:
        layers = self._described_layers.get(model_id)
        if layers is not None:
            message.expected_layers.start, message.expected_layers.stop = layers

    async def open_session(
        self, model_id: str, *, resume_session_id: str | None, call_timeout: float | None
    ) -> GrpcTrunkSession:
        """Open a ``Compute.Session`` stream and its session on the server.

        Raises:
            SessionError: ``resume_session_id`` is unknown, expired or in use.
            ModelLoadingError: The model is still loading (retryable).
            ServerUnavailableError: The server cannot be reached (retryable).
        """
        request = compute_pb2.SessionRequest(open=compute_pb2.SessionOpen(model_id=model_id))
        if resume_session_id is not None:
            request.open.resume_session_id = resume_session_id
        self._set_expected_layers(request.open, model_id)
        with deadline_as_error(call_timeout, f"opening a session on {self.address}"):
            stream, reply = await self._connection.run(
                _open_session_stream, self._compute, request, self.address
            )
        if reply.WhichOneof("kind") != "opened":
            await self._connection.run(_abort_stream, stream)
            raise ServerUnavailableError(
                f"{self.address} responded to a session open with {reply.WhichOneof('kind')!r} "
                "instead of 'opened'; is it a slm_trio server of the same version?"
            )
        opened = reply.opened
        return GrpcTrunkSession(
            connection=self._connection,
            stream=stream,
            session_id=opened.session_id,
            ttl_seconds=opened.ttl_seconds,
            cached_tokens=int(opened.cached_tokens),
            bytes_sent=wire_bytes(request),
            bytes_received=wire_bytes(reply),
        )

    async def forward(
        self,
        model_id: str,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        call_timeout: float | None,
    ) -> TrunkReply:
        """Run ``Compute.Forward`` on hidden states ``[batch, seq, hidden]``."""
        request = compute_pb2.ForwardRequest(
            model_id=model_id, hidden_states=encode_tensor(hidden_states, name="hidden_states")
        )
        _set_optional_tensors(request, position_ids=position_ids, attention_mask=attention_mask)
        self._set_expected_layers(request, model_id)
        reply, sent, received = await self._connection.unary(
            self._compute.Forward, request, call_timeout=call_timeout, name="Compute.Forward"
        )
        tensor = _decode_like(reply.hidden_states, hidden_states, "hidden_states", self.address)
        return TrunkReply(
            tensor=tensor,
            server_seconds=reply.timing.total_seconds,
            cached_tokens=None,
            bytes_sent=sent,
            bytes_received=received,
        )

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
        """Run ``Compute.Backward``; the reply's tensor is the gradient for ``hidden_states``."""
        request = compute_pb2.BackwardRequest(
            model_id=model_id,
            hidden_states=encode_tensor(hidden_states, name="hidden_states"),
            grad_output=encode_tensor(grad_output, name="grad_output"),
        )
        _set_optional_tensors(request, position_ids=position_ids, attention_mask=attention_mask)
        self._set_expected_layers(request, model_id)
        reply, sent, received = await self._connection.unary(
            self._compute.Backward, request, call_timeout=call_timeout, name="Compute.Backward"
        )
        tensor = _decode_like(reply.grad_input, hidden_states, "grad_input", self.address)
        return TrunkReply(
            tensor=tensor,
            server_seconds=reply.timing.total_seconds,
            cached_tokens=None,
            bytes_sent=sent,
            bytes_received=received,
        )


class GrpcTrunkSession:
    """`TrunkSession` on one ``Compute.Session`` stream; built by `GrpcTrunkTransport`.

    Attributes:
        bytes_sent: gRPC message bytes sent on this stream so far.
        bytes_received: gRPC message bytes received on this stream so far.
    """

    def __init__(
        self,
        *,
        connection: Connection,
        stream: Stream[Any, Any],
        session_id: str,
        ttl_seconds: float,
        cached_tokens: int,
        bytes_sent: int,
        bytes_received: int,
    ) -> None:
        self._connection = connection
        self._stream = stream
        self._session_id = session_id
        self.ttl_seconds = ttl_seconds
        self._cached_tokens = cached_tokens
        self.bytes_sent = bytes_sent
        self.bytes_received = bytes_received
        self._done = False

    def __repr__(self) -> str:
        state = "done" if self._done else "open"
        return f"<GrpcTrunkSession {self._session_id} {state} on {self._connection.address}>"

    @property
    def session_id(self) -> str:
        """The server's id of the session."""
        return self._session_id

    @property
    def cached_tokens(self) -> int:
        """Positions per row the server had cached when the session opened."""
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
        """Send one step and wait for its result.

        Args:
            step_index: 0 for the session's first step, then one more for each.
            hidden_states: ``[batch, new, hidden]`` bottom output of the new tokens.
            position_ids: ``[batch, new]`` positions of the new tokens.
            attention_mask: ``[batch, cached + new]`` padding mask, or None for all ones.
            call_timeout: Seconds the step may take.

        Raises:
            SessionError: The server no longer has the session or rejected the step index.
            ServerUnavailableError: The stream or the connection broke.
            DeadlineExceededError: ``call_timeout`` passed; abort the session afterwards.

        Cancellation: the stream's state is then unknown; call `abort`.
        """
        if self._done:
            raise ServerUnavailableError(
                f"session {self._session_id!r} has no open stream; open or resume the session"
            )
        step = compute_pb2.SessionStep(
            step_index=step_index,
            hidden_states=encode_tensor(hidden_states, name="hidden_states"),
            position_ids=encode_tensor(position_ids, name="position_ids"),
        )
        if attention_mask is not None:
            step.attention_mask.CopyFrom(encode_tensor(attention_mask, name="attention_mask"))
        request = compute_pb2.SessionRequest(step=step)
        with deadline_as_error(
            call_timeout, f"session step {step_index} on {self._connection.address}"
        ):
            reply = await self._connection.run(
                _exchange, self._stream, request, "Compute.Session step", self._connection.address
            )
        self.bytes_sent += wire_bytes(request)
        self.bytes_received += wire_bytes(reply)
        if reply.WhichOneof("kind") != "step_result":
            raise ServerUnavailableError(
                f"{self._connection.address} responded to step {step_index} with "
                f"{reply.WhichOneof('kind')!r} instead of 'step_result'"
            )
        result = reply.step_result
        if result.step_index != step_index:
            raise ServerUnavailableError(
                f"{self._connection.address} responded to step {step_index} with the result of "
                f"step {result.step_index}; the session stream is out of order"
            )
        tensor = _decode_like(
            result.hidden_states, hidden_states, "hidden_states", self._connection.address
        )
        return TrunkReply(
            tensor=tensor,
            server_seconds=result.server_seconds,
            cached_tokens=int(result.cached_tokens),
            bytes_sent=wire_bytes(request),
            bytes_received=wire_bytes(reply),
        )

    async def aclose(self) -> None:
        """Close the session on the server, then end the stream; idempotent.

        A failure to close (the server is gone) is logged and ignored: the server frees the
        session when its TTL passes.

        Cancellation: shielded and bounded by a few seconds, after which the stream is reset.
        """
        if self._done:
            return
        self._done = True
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                try:
                    await self._connection.run(
                        _close_stream, self._stream, self._connection.address
                    )
                    return
                except Exception as exc:
                    logger.debug(
                        "session.close_failed session_id=%s error=%r", self._session_id, exc
                    )
            await self._connection.run(_abort_stream, self._stream)

    async def abort(self) -> None:
        """Reset the stream without closing the session; idempotent.

        Cancellation: shielded; resetting a stream does not wait for the server.
        """
        if self._done:
            return
        self._done = True
        with anyio.CancelScope(shield=True):
            await self._connection.run(_abort_stream, self._stream)


def remote_model_from_describe(
    model_id: str, reply: management_pb2.DescribeResponse
) -> RemoteModel:
    """Build a `RemoteModel` from a Describe reply, or raise for a model that is not ready.

    Raises:
        ModelLoadingError: The model is loading.
        ModelUnloadingError: The model is being unloaded.
        ModelLoadError: The model's load failed.
    """
    info = reply.model
    state = management_pb2.ModelState.Name(info.state).removeprefix("MODEL_STATE_")
    reason = f": {info.reason}" if info.HasField("reason") else ""
    if state == "LOADING":
        progress = f" ({info.progress:.0%} done)" if info.HasField("progress") else ""
        raise ModelLoadingError(
            f"model {model_id!r} is still loading{progress}", retry_after=_LOADING_RETRY_AFTER
        )
    if state == "UNLOADING":
        raise ModelUnloadingError(f"model {model_id!r} is being unloaded{reason}")
    if state == "FAILED":
        raise ModelLoadError(f"model {model_id!r} failed to load{reason}; load it again")
    if state != "READY" or not reply.HasField("facts"):
        raise ModelLoadError(
            f"model {model_id!r} is in state {state} without architecture facts; "
            "the server must report a READY model with facts"
        )
    facts = reply.facts
    return RemoteModel(
        model_id=info.model_id or model_id,
        model_type=facts.model_type,
        part=info.part,
        hidden_size=facts.hidden_size,
        num_hidden_layers=facts.num_hidden_layers,
        layer_range=(facts.layer_start, facts.layer_stop),
        vocab_size=facts.vocab_size,
        dtype=facts.torch_dtype,
        max_message_bytes=reply.limits.max_message_bytes or None,
        max_request_tokens=reply.limits.max_request_tokens or None,
    )


def _set_optional_tensors(
    request: Any, *, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> None:
    if position_ids is not None:
        request.position_ids.CopyFrom(encode_tensor(position_ids, name="position_ids"))
    if attention_mask is not None:
        request.attention_mask.CopyFrom(encode_tensor(attention_mask, name="attention_mask"))


def _decode_like(message: Any, sent: torch.Tensor, name: str, address: str) -> torch.Tensor:
    """Decode a reply tensor that must have the shape of the tensor ``sent``."""
    expected = tuple(sent.shape)
    tensor = decode_tensor(message, max_elements=max(1, sent.numel()), name=name)
    if tuple(tensor.shape) != expected or not tensor.dtype.is_floating_point:
        raise InvalidTensorError(
            f"{address} returned {name} of shape {tuple(tensor.shape)} and dtype {tensor.dtype}; "
            f"expected floating point of shape {expected}"
        )
    return tensor


def check_trunk(model: RemoteModel, address: str) -> None:
    """Check that ``model`` is a trunk a split client can use.

    Raises:
        ConfigError: The server holds another part of the model.
    """
    if model.part != "trunk":
        raise ConfigError(
            f"model {model.model_id!r} on {address} is part={model.part!r}; a split client "
            "needs the server to hold the trunk, so load it with part='trunk'"
        )


# The coroutines below run on the asyncio side of the connection.


class _Aborted(Exception):
    """Passed to a grpclib stream's ``__aexit__`` so that it resets the stream."""


async def _open_session_stream(
    stub: compute_grpc.ComputeStub, request: compute_pb2.SessionRequest, address: str
) -> tuple[Stream[Any, Any], compute_pb2.SessionResponse]:
    stream = stub.Session.open()
    await stream.__aenter__()
    try:
        reply = await _exchange(stream, request, "Compute.Session open", address)
    except BaseException:
        await _abort_stream(stream)
        raise
    return stream, reply


async def _exchange(
    stream: Stream[Any, Any], request: compute_pb2.SessionRequest, name: str, address: str
) -> compute_pb2.SessionResponse:
    with translate_errors(name, address, stream):
        await stream.send_message(request)
        reply = await stream.recv_message()
        if reply is None:
            # The server ended the stream, and its trailers carry the status with the reason.
            await stream.end()
            await stream.recv_trailing_metadata()
            raise ServerUnavailableError(f"{address} ended the session stream during {name}")
        return reply  # type: ignore[no-any-return]


async def _close_stream(stream: Stream[Any, Any], address: str) -> None:
    request = compute_pb2.SessionRequest(close=compute_pb2.SessionClose())
    with translate_errors("Compute.Session close", address, stream):
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
        if reply is not None and reply.WhichOneof("kind") != "closed":
            logger.debug("session.close_unexpected_reply kind=%s", reply.WhichOneof("kind"))
        await stream.__aexit__(None, None, None)


async def _abort_stream(stream: Stream[Any, Any]) -> None:
    error = _Aborted()
    try:
        await stream.__aexit__(_Aborted, error, None)
    except (GRPCError, StreamTerminatedError, OSError, _Aborted) as exc:
        logger.debug("session.abort_error error=%r", exc)
