"""The compute core: what a Forward, Backward or session step does, on the owning event loop.

Design note.

The core is the trio side (or, when embedded, the asyncio side) of the
compute service. Handlers decode requests, cross into the owning loop once
(`run_in_owner`) and call one coroutine here. Everything that touches the
model manager or the session store happens here, so asyncio tasks never use
trio-owned objects.

A `ComputeTarget` supplies models: `AsyncModelManager` leases (many models)
or a single model (`AsyncModelComputeFunction`). Forward and backward passes
run in the target's compute worker threads; a cancelled request (deadline,
client gone) abandons its thread and drops the result. A session step that
is cancelled that way leaves its cache in an unknown state, so the store
closes that session (see `_sessions`).

The blocking functions at the bottom of this file are the only code that
runs in worker threads. They take plain tensors and return plain tensors.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import sniffio
import torch
from torch import nn

from slm_trio.errors import (
    InvalidTensorError,
    ModelSplitMismatchError,
    UnsupportedRequestError,
)
from slm_trio.server._sessions import Session, SessionStore
from slm_trio.split import ModelPart

__all__ = [
    "ComputeCore",
    "ComputeTarget",
    "StepResult",
    "Timing",
    "cached_positions",
    "owner_clock",
]

_T = TypeVar("_T")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ComputeTarget(Protocol):
    """The source of models and compute threads for a `ComputeCore`."""

    def lease(self, model_id: str) -> AbstractAsyncContextManager[Any]:
        """Hold a READY model for one request."""
        ...

    async def run_compute(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` in a compute worker thread."""
        ...


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Server-side seconds spent on one request."""

    queue_seconds: float
    compute_seconds: float


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """The output of one session step."""

    hidden_states: torch.Tensor
    cached_tokens: int
    timing: Timing


class ComputeCore:
    """Run forward, backward and session steps against a `ComputeTarget`.

    Build it on the owning event loop: it keeps that loop's clock, so session
    times agree when handlers on the asyncio side of trio-asyncio read it.
    """

    def __init__(
        self, target: ComputeTarget, sessions: SessionStore, *, max_request_tokens: int
    ) -> None:
        self.target = target
        self.sessions = sessions
        self.max_request_tokens = max_request_tokens
        self.now = owner_clock()

    async def forward(
        self,
        model_id: str,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        expected_layers: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, Timing]:
        """Run the model named ``model_id`` on one batch, without gradients.

        Cancellation: abandons the worker thread and drops its result. A `ModelPart`
        stops at its next decoder layer, so the thread ends soon after.
        """
        _check_hidden(hidden, "hidden_states")
        self._check_request_tokens(hidden)
        async with self.target.lease(model_id) as model:
            _check_model(model, model_id, expected_layers)
            _check_context_length(model, model_id, hidden, position_ids, cached=0)
            submitted = time.perf_counter()
            with _stop_on_exit() as stop:
                output, started, seconds = await self.target.run_compute(
                    _forward_blocking, model, hidden, position_ids, attention_mask, None, stop
                )
        return output, Timing(queue_seconds=started - submitted, compute_seconds=seconds)

    async def backward(
        self,
        model_id: str,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        expected_layers: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, Timing]:
        """Recompute the forward with gradients and return the gradient of the input.

        The model's parameter gradients are not accumulated: the server only
        backpropagates to its input.

        Cancellation: abandons the worker thread and drops its result. A `ModelPart`
        stops at its next decoder layer, so the thread ends soon after.
        """
        _check_hidden(hidden, "hidden_states")
        _check_hidden(grad_output, "grad_output")
        if tuple(grad_output.shape) != tuple(hidden.shape):
            raise InvalidTensorError(
                f"grad_output has shape {list(grad_output.shape)}; it must match "
                f"hidden_states' shape {list(hidden.shape)}"
            )
        self._check_request_tokens(hidden)
        async with self.target.lease(model_id) as model:
            _check_model(model, model_id, expected_layers)
            _check_context_length(model, model_id, hidden, position_ids, cached=0)
            submitted = time.perf_counter()
            with _stop_on_exit() as stop:
                grad_input, started, seconds = await self.target.run_compute(
                    _backward_blocking,
                    model,
                    hidden,
                    grad_output,
                    position_ids,
                    attention_mask,
                    stop,
                )
        return grad_input, Timing(queue_seconds=started - submitted, compute_seconds=seconds)

    async def open_session(
        self,
        model_id: str,
        resume_session_id: str | None,
        expected_layers: tuple[int, int] | None = None,
    ) -> Session:
        """Open a new session on a READY model, or resume one by id.

        Raises:
            SessionError: ``resume_session_id`` is unknown, expired or attached.
            SessionBudgetError: The server already has its maximum number of sessions.
            UnsupportedRequestError: The model has no KV cache (not a `ModelPart`).
        """
        now = self.now()
        if resume_session_id is not None:
            return self.sessions.resume_nowait(resume_session_id, model_id, now=now)
        async with self.target.lease(model_id) as model:
            if not isinstance(model, ModelPart):
                raise UnsupportedRequestError(
                    f"model {model_id!r} is a {type(model).__name__}, which keeps no KV cache; "
                    "generation sessions need a trunk part (ModelConfig part='trunk')"
                )
            _check_model(model, model_id, expected_layers)
            return self.sessions.open_nowait(model_id, model, model.new_cache(), now=now)

    async def step(
        self,
        session: Session,
        step_index: int,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> StepResult:
        """Run one session step over new tokens and append them to the session's cache.

        Cancellation: abandons the worker thread; the session is then closed,
        because its cache may hold part of the step.
        """
        _check_hidden(hidden, "hidden_states")
        if hidden.dim() != 3:
            raise InvalidTensorError(
                f"hidden_states has shape {list(hidden.shape)}; "
                "expected [batch, new_tokens, hidden]"
            )
        self._check_request_tokens(hidden)
        new_tokens = int(hidden.shape[0]) * int(hidden.shape[1])
        async with self.target.lease(session.model_id) as model:
            _check_context_length(
                model, session.model_id, hidden, position_ids, cached=cached_positions(session)
            )
            store = self.sessions
            store.begin_step_nowait(session, step_index, new_tokens, model=model, now=self.now())
            completed = False
            cache_intact = False
            try:
                submitted = time.perf_counter()
                try:
                    with _stop_on_exit() as stop:
                        output, started, seconds = await self.target.run_compute(
                            _forward_blocking,
                            model,
                            hidden,
                            position_ids,
                            attention_mask,
                            session.cache,
                            stop,
                        )
                except Exception:
                    # ModelPart.forward leaves the cache as it was when it raises.
                    cache_intact = True
                    raise
                completed = True
            finally:
                store.end_step_nowait(
                    session,
                    new_tokens,
                    completed=completed,
                    cache_intact=cache_intact,
                    now=self.now(),
                )
        return StepResult(
            hidden_states=output,
            cached_tokens=cached_positions(session),
            timing=Timing(queue_seconds=started - submitted, compute_seconds=seconds),
        )

    def _check_request_tokens(self, hidden: torch.Tensor) -> None:
        """Reject a request over the server's token limit before it reaches a worker thread."""
        tokens = _token_count(hidden)
        if tokens > self.max_request_tokens:
            raise InvalidTensorError(
                f"hidden_states has {tokens} tokens (shape {list(hidden.shape)}); this server "
                f"accepts at most {self.max_request_tokens} tokens per request "
                "(ServerConfig.max_request_tokens). Split the batch or the sequence"
            )

    def close_session_nowait(self, session: Session) -> None:
        """Close a session and free its cache."""
        self.sessions.close_nowait(session.session_id)

    def detach_session_nowait(self, session: Session) -> None:
        """Keep a session whose stream ended without a close, for resuming."""
        self.sessions.detach_nowait(session, now=self.now())


def cached_positions(session: Session) -> int:
    """Return the positions per row that the session's KV cache holds."""
    cache = session.cache
    return int(cache.seq_length) if cache is not None else 0


def owner_clock() -> Callable[[], float]:
    """Return the current event loop's monotonic clock, usable from both sides of trio-asyncio."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.current_time
    return asyncio.get_running_loop().time


def _check_hidden(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise InvalidTensorError(
            f"{name} has dtype {tensor.dtype}; expected float32, float16 or bfloat16"
        )


def _token_count(hidden: torch.Tensor) -> int:
    """Count the tokens in hidden states: the product of every dimension but the last (hidden)."""
    return math.prod(int(size) for size in hidden.shape[:-1])


def _check_context_length(
    model: Any,
    model_id: str,
    hidden: torch.Tensor,
    position_ids: torch.Tensor | None,
    *,
    cached: int,
) -> None:
    """Reject sequences longer than the model's context, counting the positions already cached.

    Position ids past the context are rejected too: rotary models accept any value but
    were never trained on them.
    """
    limit = model.max_positions if isinstance(model, ModelPart) else None
    if limit is None or hidden.dim() != 3:
        return
    if position_ids is not None and position_ids.numel() > 0:
        highest = int(position_ids.max())
        if highest >= limit:
            raise InvalidTensorError(
                f"position id {highest} is out of range; model {model_id!r} accepts positions "
                f"0 to {limit - 1} (max_position_embeddings)"
            )
    new = int(hidden.shape[1])
    if cached + new <= limit:
        return
    if cached == 0:
        raise InvalidTensorError(
            f"hidden_states has {new} positions per row, but model {model_id!r} accepts at "
            f"most {limit} (max_position_embeddings). Send a shorter sequence"
        )
    raise InvalidTensorError(
        f"hidden_states has {new} new positions per row and the session's cache contains "
        f"{cached}, but model {model_id!r} accepts at most {limit} positions "
        "(max_position_embeddings). Open a new session or send fewer tokens"
    )


def _check_model(model: Any, model_id: str, expected_layers: tuple[int, int] | None) -> None:
    """Reject a model that is not a trunk, or a trunk split at other points than expected."""
    if not isinstance(model, ModelPart):
        return
    if model.kind != "trunk":
        raise UnsupportedRequestError(
            f"model {model_id!r} is a {model.kind} part; the server runs hidden states through "
            "trunk parts only (load it with part='trunk')"
        )
    layers = tuple(model.layer_range)
    if expected_layers is not None and layers != expected_layers:
        raise ModelSplitMismatchError(
            f"model {model_id!r} serves layers [{layers[0]}, {layers[1]}), but the request was "
            f"built for layers [{expected_layers[0]}, {expected_layers[1]}): the model was "
            "reloaded with other split points. Open a new client so that its parts fit the model"
        )


@contextmanager
def _stop_on_exit() -> Iterator[threading.Event]:
    """Yield an event that is set when the block exits, normally or by cancellation.

    The event goes to the worker thread, which checks it between decoder layers: an
    abandoned thread then stops early instead of finishing work whose result is dropped.
    """
    stop = threading.Event()
    try:
        yield stop
    finally:
        stop.set()


# -- blocking work, run in compute worker threads ------------------------------------------


def _prepare(model: nn.Module, tensor: torch.Tensor | None, *, float_: bool) -> torch.Tensor | None:
    if tensor is None:
        return None
    device = _model_device(model)
    if float_:
        return tensor.to(device=device, dtype=_model_dtype(model))
    return tensor.to(device=device)


def _model_device(model: nn.Module) -> torch.device:
    if isinstance(model, ModelPart):
        return model.device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    if isinstance(model, ModelPart):
        return model.dtype
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _call_model(
    model: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Any,
    stop: threading.Event | None,
) -> torch.Tensor:
    if isinstance(model, ModelPart):
        result: torch.Tensor = model(
            hidden,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            should_stop=stop.is_set if stop is not None else None,
        )
        return result
    # A plain module (AsyncModelComputeFunction) takes the hidden states alone.
    output = model(hidden)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, not a tensor")
    return output


def _forward_blocking(
    model: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Any,
    stop: threading.Event | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Return ``(output, start time, compute seconds)``; the output has the input's dtype.

    A `ModelPart` checks ``stop`` before each decoder layer and raises
    `ComputeInterruptedError` once it is set.
    """
    started = time.perf_counter()
    with torch.inference_mode():
        # [batch, seq, hidden] in the model's dtype and device.
        inputs = _prepare(model, hidden, float_=True)
        assert inputs is not None
        output = _call_model(
            model,
            inputs,
            _prepare(model, position_ids, float_=False),
            _prepare(model, attention_mask, float_=False),
            cache,
            stop,
        )
        output = output.to(device="cpu", dtype=hidden.dtype)
    return output, started, time.perf_counter() - started


def _backward_blocking(
    model: nn.Module,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    stop: threading.Event,
) -> tuple[torch.Tensor, float, float]:
    """Return ``(grad_input, start time, compute seconds)`` in the input's dtype."""
    started = time.perf_counter()
    with torch.enable_grad():
        inputs = _prepare(model, hidden, float_=True)
        assert inputs is not None
        inputs = inputs.detach().requires_grad_(True)
        output = _call_model(
            model,
            inputs,
            _prepare(model, position_ids, float_=False),
            _prepare(model, attention_mask, float_=False),
            None,
            stop,
        )
        grad = _prepare(model, grad_output, float_=True)
        assert grad is not None
        if not output.requires_grad:
            # A part with no layers is the identity: the gradient passes through.
            grad_input = grad
        else:
            # autograd.grad leaves the parameters' .grad untouched.
            (grad_input,) = torch.autograd.grad(output, inputs, grad.to(output.dtype))
    return (
        grad_input.detach().to(device="cpu", dtype=hidden.dtype),
        started,
        (time.perf_counter() - started),
    )
