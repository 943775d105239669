"""The split client: bottom and top run here, the trunk on a server.

`open_split_client` connects to a server and describes the trunk to learn its layer range
``[s1, s2)``. It then loads the bottom (embeddings and layers ``[0, s1)``), the top (layers
``[s2, N)``, final norm and LM head) and the tokenizer from the client's own copy of the
checkpoint, in worker threads. Only hidden states cross the wire; raw text, token ids and
logits stay in this process.

The client works from trio and from asyncio code (see `slm_trio.client._connection`) and
belongs to the event loop that opened it. Several generations may run at once on one client:
each has its own caches and session, and local forwards share one worker-thread limiter.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch

from slm_trio.client._connection import deadline_as_error, open_connection
from slm_trio.client._generation import (
    GenerationContext,
    GenerationSpec,
    TokenStream,
    validate_rows,
)
from slm_trio.client._management import ManagementClient
from slm_trio.client._results import ForwardResult, GenerationResult, StepTiming, TrunkResult
from slm_trio.client._retry import RetryPolicy, call_with_retry, remaining_timeout
from slm_trio.client._sampling import SamplingConfig
from slm_trio.client._transport import (
    GrpcTrunkTransport,
    RemoteModel,
    TrunkTransport,
    check_trunk,
)
from slm_trio.config import DType, ModelConfig
from slm_trio.errors import ConfigError, ModelLoadingError
from slm_trio.split import ModelPart

__all__ = ["Prompt", "SplitClient", "open_split_client"]

logger = logging.getLogger(__name__)

#: One prompt as text or token ids, or a batch of them.
Prompt = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
#: A chat conversation: messages with ``role`` and ``content`` keys.
Messages = Sequence[Mapping[str, str]]

# Session steps larger than this are cut into several steps, well below the server's default
# maximum message size of 64 MiB.
_DEFAULT_MAX_STEP_BYTES = 16 * 1024 * 1024


class SplitClient:
    """Runs a model's bottom and top locally and its trunk on a server.

    Build one with `open_split_client` (gRPC) or `SplitClient.create` (any transport).

    Attributes:
        model: The trunk's facts as the server described them.
        bottom: The local bottom part (embeddings and layers ``[0, s1)``).
        top: The local top part (layers ``[s2, N)``, final norm, LM head).
        tokenizer: The tokenizer, or None if the client was built without one; text prompts
            then fail and results have empty texts.
        management: Management calls on the same connection, when the client has one.
    """

    def __init__(
        self,
        *,
        transport: TrunkTransport,
        model: RemoteModel,
        bottom: ModelPart,
        top: ModelPart,
        tokenizer: Any | None = None,
        retry: RetryPolicy | None = None,
        call_timeout: float | None = 60.0,
        max_step_bytes: int = _DEFAULT_MAX_STEP_BYTES,
        resume_sessions: bool = True,
        local_workers: int = 1,
        rng: random.Random | None = None,
        management: ManagementClient | None = None,
    ) -> None:
        check_parts(model, bottom, top, transport.address)
        _check_timeout("call_timeout", call_timeout)
        if isinstance(max_step_bytes, bool) or not isinstance(max_step_bytes, int):
            raise ConfigError(f"max_step_bytes={max_step_bytes!r} is invalid; expected bytes")
        if max_step_bytes < 1024:
            raise ConfigError(
                f"max_step_bytes={max_step_bytes!r} is too small; expected at least 1024 bytes"
            )
        self.model = model
        self.bottom = bottom
        self.top = top
        self.tokenizer = tokenizer
        self.management = management
        self.retry = retry if retry is not None else RetryPolicy()
        self.call_timeout = call_timeout
        self._transport = transport
        self._max_step_bytes = max_step_bytes
        self._resume_sessions = resume_sessions
        self._limiter = anyio.CapacityLimiter(local_workers)
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        start, stop = self.model.layer_range
        return (
            f"<SplitClient model_id={self.model.model_id!r} trunk=[{start}, {stop}) "
            f"of {self.model.num_hidden_layers} on {self._transport.address}>"
        )

    @classmethod
    async def create(
        cls,
        transport: TrunkTransport,
        model_id: str,
        *,
        checkpoint: str | Path | None = None,
        bottom: ModelPart | None = None,
        top: ModelPart | None = None,
        tokenizer: Any | None = None,
        load_tokenizer: bool = True,
        dtype: DType = "float32",
        device: str = "cpu",
        retry: RetryPolicy | None = None,
        call_timeout: float | None = 60.0,
        connect_timeout: float | None = 300.0,
        **options: Any,
    ) -> SplitClient:
        """Describe the trunk through ``transport`` and build a client around it.

        Args:
            transport: How to reach the trunk.
            model_id: The trunk's id on the server.
            checkpoint: The client's copy of the model (Hugging Face directory, ``.gguf`` or
                state-dict file), from which the bottom, top and tokenizer are loaded.
            bottom: An already built bottom part; with ``top``, no checkpoint is needed.
            top: An already built top part.
            tokenizer: An already built tokenizer.
            load_tokenizer: Whether to load the tokenizer from ``checkpoint`` when
                ``tokenizer`` is None.
            dtype: The dtype of the parts loaded from ``checkpoint``.
            device: The device of the parts loaded from ``checkpoint``.
            retry: The retry policy for transient errors.
            call_timeout: Seconds each call to the server may take; None for no limit.
            connect_timeout: Seconds to wait for the trunk to be ready (it may be loading),
                in total; None for no limit.
            **options: Further `SplitClient` arguments (``max_step_bytes``,
                ``resume_sessions``, ``local_workers``, ``rng``, ``management``).

        Raises:
            ConfigError: Neither a checkpoint nor both parts are given, or the parts do not
                fit the trunk.
            ModelNotFoundError: The server has no model ``model_id``.
            DeadlineExceededError: The trunk was not ready within ``connect_timeout``.

        Cancellation: stops waiting; a local load already in a worker thread finishes first.
        """
        if (bottom is None) != (top is None):
            raise ConfigError("give both bottom= and top=, or neither and a checkpoint=")
        if bottom is None and checkpoint is None:
            raise ConfigError(
                "a split client needs checkpoint= (its own copy of the model) or the parts "
                "bottom= and top="
            )
        _check_timeout("connect_timeout", connect_timeout)
        policy = retry if retry is not None else RetryPolicy()
        rng = options.pop("rng", None) or random.Random()
        model = await describe_when_ready(
            transport,
            model_id,
            retry=policy,
            call_timeout=call_timeout,
            ready_timeout=connect_timeout,
            rng=rng,
        )
        check_trunk(model, transport.address)
        if bottom is None or top is None:
            assert checkpoint is not None
            bottom, top, loaded_tokenizer = await load_local_parts(
                model,
                checkpoint,
                dtype=dtype,
                device=device,
                load_tokenizer=tokenizer is None and load_tokenizer,
            )
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        return cls(
            transport=transport,
            model=model,
            bottom=bottom,
            top=top,
            tokenizer=tokenizer,
            retry=policy,
            call_timeout=call_timeout,
            rng=rng,
            **options,
        )

    # Prompts ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Tokenize ``text`` without adding special tokens.

        Raises:
            ConfigError: The client has no tokenizer.
        """
        tokenizer = self._require_tokenizer("encode text")
        return list(tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Turn token ids back into text, skipping special tokens.

        Raises:
            ConfigError: The client has no tokenizer.
        """
        tokenizer = self._require_tokenizer("decode tokens")
        return str(tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def chat_prompt(
        self, messages: str | Messages, *, system_prompt: str | None = None
    ) -> list[int]:
        """Apply the tokenizer's chat template and return the prompt's token ids.

        Args:
            messages: A user message, or a conversation of ``{"role", "content"}`` messages.
            system_prompt: A system message put first, for a single user message.

        Raises:
            ConfigError: The client has no tokenizer, or the tokenizer has no chat template.
        """
        tokenizer = self._require_tokenizer("apply a chat template")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                "the tokenizer has no chat template; pass chat=False and a plain prompt, "
                "or use an instruct model's checkpoint"
            )
        if isinstance(messages, str):
            conversation = [{"role": "user", "content": messages}]
            if system_prompt is not None:
                conversation.insert(0, {"role": "system", "content": system_prompt})
        else:
            conversation = [dict(message) for message in messages]
        encoded = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [int(token) for token in encoded["input_ids"]]

    # Generation -------------------------------------------------------------------------

    def stream(
        self,
        prompts: Prompt,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        stop_on_eos: bool = True,
        chat: bool = False,
        system_prompt: str | None = None,
        timeout: float | None = None,
    ) -> TokenStream:
        """Start a generation that yields each token as it is produced.

        Use it as::

            async with client.stream("What is the capital of France?", chat=True) as tokens:
                async for step in tokens:
                    print(step.text, end="", flush=True)
            result = tokens.result()

        Args:
            prompts: A prompt (text or token ids) or a batch of prompts; a batch is
                left-padded and each row stops on its own.
            max_new_tokens: The maximum number of tokens generated per row.
            temperature: 0 for greedy decoding, else the sampling temperature.
            top_k: Sample among the ``top_k`` most likely tokens only.
            top_p: Sample among the most likely tokens holding ``top_p`` of the probability.
            seed: Seed for reproducible sampling.
            stop_token_ids: Tokens that end a row, besides end-of-sequence tokens.
            stop_on_eos: Whether the model's end-of-sequence tokens end a row.
            chat: Whether to wrap each text prompt in the tokenizer's chat template as a
                user message, with the generation prompt added.
            system_prompt: A system message for ``chat`` prompts.
            timeout: Seconds the whole generation may take; None for no limit. Each call to
                the server is also bounded by the client's ``call_timeout``.

        Raises:
            ConfigError: An argument is invalid, a prompt is empty or too long, or text is
                given without a tokenizer.
        """
        spec = self._generation_spec(
            prompts,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            stop_token_ids=stop_token_ids,
            stop_on_eos=stop_on_eos,
            chat=chat,
            system_prompt=system_prompt,
            timeout=timeout,
        )
        return TokenStream(self._generation_context(), spec)

    async def generate(self, prompts: Prompt, **kwargs: Any) -> GenerationResult:
        """Generate to the end and return the result; takes the arguments of `stream`.

        Raises:
            ConfigError: An argument is invalid.
            DeadlineExceededError: ``timeout`` or a call's timeout passed.
            ServerUnavailableError: The server stayed unreachable through every retry.
            SlmTrioError: The server rejected a request.

        Cancellation: stops after the current local forward and resets the session's stream.
        """
        async with self.stream(prompts, **kwargs) as tokens:
            async for _ in tokens:
                pass
        return tokens.result()

    # Single passes ------------------------------------------------------------------------

    async def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> ForwardResult:
        """Compute logits for token ids ``[batch, seq]`` through bottom, trunk and top.

        No caches are used. The trunk call is retried on transient errors.

        Raises:
            InvalidTensorError: A tensor has the wrong shape or values.
        """
        started = time.perf_counter()
        positions: torch.Tensor | None = None
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(dim=-1) - 1).masked_fill(
                attention_mask == 0, 1
            )
        hidden, bottom_seconds = await self._in_thread(
            _forward_no_cache, self.bottom, input_ids, positions, attention_mask
        )
        trunk = await self.trunk_forward(
            hidden, position_ids=positions, attention_mask=attention_mask
        )
        logits, top_seconds = await self._in_thread(
            _forward_no_cache, self.top, trunk.tensor, positions, attention_mask
        )
        timing = StepTiming.measured(
            client_seconds=bottom_seconds + top_seconds,
            server_seconds=trunk.timing.server_seconds,
            total_seconds=time.perf_counter() - started,
            bytes_sent=trunk.timing.bytes_sent,
            bytes_received=trunk.timing.bytes_received,
        )
        return ForwardResult(logits=logits, timing=timing)

    async def trunk_forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TrunkResult:
        """Run the remote trunk on hidden states ``[batch, seq, hidden]`` (``Compute.Forward``).

        Retried on transient errors; each attempt is bounded by the client's ``call_timeout``.
        To bound the call and its retries together, wrap it in `anyio.fail_after`.
        """

        async def attempt() -> TrunkResult:
            started = time.perf_counter()
            with deadline_as_error(self.call_timeout, f"Forward on {self._transport.address}"):
                reply = await self._transport.forward(
                    self.model.model_id,
                    hidden_states,
                    position_ids=position_ids,
                    attention_mask=attention_mask,
                    call_timeout=self.call_timeout,
                )
            return TrunkResult(tensor=reply.tensor, timing=_call_timing(reply, started))

        return await call_with_retry(
            attempt,
            policy=self.retry,
            operation=f"Forward on model {self.model.model_id!r}",
            rng=self._rng,
        )

    async def trunk_backward(
        self,
        hidden_states: torch.Tensor,
        grad_output: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TrunkResult:
        """Backpropagate ``grad_output`` through the remote trunk (``Compute.Backward``).

        Returns the gradient with respect to ``hidden_states``. Never retried, because a
        training step must not run twice.
        """
        started = time.perf_counter()
        with deadline_as_error(self.call_timeout, f"Backward on {self._transport.address}"):
            reply = await self._transport.backward(
                self.model.model_id,
                hidden_states,
                grad_output,
                position_ids=position_ids,
                attention_mask=attention_mask,
                call_timeout=self.call_timeout,
            )
        return TrunkResult(tensor=reply.tensor, timing=_call_timing(reply, started))

    # Internals ----------------------------------------------------------------------------

    def _require_tokenizer(self, action: str) -> Any:
        if self.tokenizer is None:
            raise ConfigError(
                f"this client has no tokenizer to {action}; open it with a checkpoint or "
                "tokenizer=, or pass token ids"
            )
        return self.tokenizer

    def _generation_context(self) -> GenerationContext:
        return GenerationContext(
            transport=self._transport,
            model_id=self.model.model_id,
            bottom=self.bottom,
            top=self.top,
            tokenizer=self.tokenizer,
            limiter=self._limiter,
            retry=self.retry,
            call_timeout=self.call_timeout,
            rng=self._rng,
            max_step_bytes=self._step_bytes(),
            resume_sessions=self._resume_sessions,
            max_step_tokens=self.model.max_request_tokens,
        )

    def _step_bytes(self) -> int:
        """Return the hidden-state bytes per session step: ours, bounded by the server's cap."""
        server_max = self.model.max_message_bytes
        if server_max is None:
            return self._max_step_bytes
        # A quarter of the message stays free for position ids, the mask and the framing.
        return max(1, min(self._max_step_bytes, server_max * 3 // 4))

    def _generation_spec(
        self,
        prompts: Prompt,
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        stop_token_ids: Sequence[int],
        stop_on_eos: bool,
        chat: bool,
        system_prompt: str | None,
        timeout: float | None,
    ) -> GenerationSpec:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} is invalid; expected an integer")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} is invalid; expected >= 1")
        _check_timeout("timeout", timeout)
        rows = [self._prompt_ids(prompt, chat, system_prompt) for prompt in _as_batch(prompts)]
        validate_rows(rows, self.bottom.vocab_size)
        self._check_length(rows, max_new_tokens)
        stops = {int(token) for token in stop_token_ids}
        eos = self.eos_token_ids()
        if stop_on_eos:
            stops |= eos
        return GenerationSpec(
            rows=rows,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_token_ids=frozenset(stops),
            pad_token_id=self._pad_token_id(eos),
            timeout=timeout,
        )

    def _prompt_ids(self, prompt: str | Sequence[int], chat: bool, system: str | None) -> list[int]:
        if isinstance(prompt, str):
            return self.chat_prompt(prompt, system_prompt=system) if chat else self.encode(prompt)
        return list(prompt)

    def _check_length(self, rows: list[list[int]], max_new_tokens: int) -> None:
        limit = getattr(self.bottom.config, "max_position_embeddings", None)
        if not isinstance(limit, int):
            return
        longest = max(len(row) for row in rows)
        if longest + max_new_tokens > limit:
            raise ConfigError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's {limit} positions; shorten the prompt or lower max_new_tokens"
            )

    def eos_token_ids(self) -> set[int]:
        """Return the end-of-sequence token ids of the tokenizer and the model's config."""
        ids: set[int] = set()
        candidates: list[Any] = [getattr(self.bottom.config, "eos_token_id", None)]
        if self.tokenizer is not None:
            candidates.append(getattr(self.tokenizer, "eos_token_id", None))
        for candidate in candidates:
            if isinstance(candidate, int):
                ids.add(candidate)
            elif isinstance(candidate, (list, tuple)):
                ids.update(int(token) for token in candidate)
        return ids

    def _pad_token_id(self, eos: set[int]) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        if pad is None:
            pad = getattr(self.bottom.config, "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < self.bottom.vocab_size:
            return pad
        # Any id works: padding is masked, and a finished row's tokens are not used.
        return min(eos) if eos else 0

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


def _as_batch(prompts: Prompt) -> list[str | Sequence[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            return [prompts.tolist()]
        return [row for row in prompts.tolist()]
    items = list(prompts)
    if not items:
        raise ConfigError("prompts is empty; give a prompt or a non-empty batch")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _forward_no_cache(
    part: ModelPart,
    inputs: torch.Tensor,
    positions: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    with torch.no_grad():
        output = part(inputs, position_ids=positions, attention_mask=mask)
    return output, time.perf_counter() - started


def _call_timing(reply: Any, started: float) -> StepTiming:
    return StepTiming.measured(
        client_seconds=0.0,
        server_seconds=reply.server_seconds,
        total_seconds=time.perf_counter() - started,
        bytes_sent=reply.bytes_sent,
        bytes_received=reply.bytes_received,
    )


def _check_timeout(name: str, value: float | None) -> None:
    if value is None:
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name}={value!r} is invalid; expected a positive number of seconds")


def check_parts(model: RemoteModel, bottom: ModelPart, top: ModelPart, address: str) -> None:
    """Check that local ``bottom`` and ``top`` parts fit around the remote trunk ``model``.

    Raises:
        ConfigError: A part has the wrong kind, layers, width or architecture.
    """
    start, stop = model.layer_range
    total = model.num_hidden_layers
    expected = {"bottom": (bottom, (0, start)), "top": (top, (stop, total))}
    for kind, (part, layers) in expected.items():
        if not isinstance(part, ModelPart) or part.kind != kind:
            raise ConfigError(f"{kind}={part!r} is invalid; expected a {kind} ModelPart")
        if part.layer_range != layers or part.num_hidden_layers != total:
            raise ConfigError(
                f"the local {kind} has layers {part.layer_range} of {part.num_hidden_layers}, "
                f"but the trunk {model.model_id!r} on {address} has [{start}, {stop}) of "
                f"{total}, so the {kind} must hold {layers}; load it with layers=({start}, {stop})"
            )
        if part.hidden_size != model.hidden_size or part.model_type != model.model_type:
            raise ConfigError(
                f"the local {kind} is a {part.model_type!r} model of hidden size "
                f"{part.hidden_size}, but the trunk {model.model_id!r} on {address} is a "
                f"{model.model_type!r} model of hidden size {model.hidden_size}; "
                "use the same checkpoint on both sides"
            )


async def describe_when_ready(
    transport: TrunkTransport,
    model_id: str,
    *,
    retry: RetryPolicy,
    call_timeout: float | None,
    ready_timeout: float | None,
    rng: random.Random,
) -> RemoteModel:
    """Describe ``model_id``, waiting while it loads, for at most ``ready_timeout`` seconds.

    A model that is still loading is polled with the policy's backoff however many attempts
    that takes, because a load can take minutes. ``ready_timeout`` bounds that wait, and None
    waits without limit. Other transient errors (a server not listening yet)
    get the policy's ``max_attempts``.

    Raises:
        DeadlineExceededError: The model was not ready within ``ready_timeout``.
        ServerUnavailableError: The server stayed unreachable through every retry.
        ModelNotFoundError: The server has no such model.
        ModelLoadError: The model's load failed.
    """
    deadline = None if ready_timeout is None else anyio.current_time() + ready_timeout
    attempts = 0

    async def attempt() -> RemoteModel:
        nonlocal attempts
        attempts += 1
        timeout = remaining_timeout(call_timeout, deadline)
        with deadline_as_error(timeout, f"Describe {model_id!r} on {transport.address}"):
            return await transport.describe(model_id, call_timeout=timeout)

    model = await call_with_retry(
        attempt,
        policy=retry,
        operation=f"Describe {model_id!r}",
        deadline=deadline,
        rng=rng,
        uncounted=(ModelLoadingError,),
    )
    logger.info(
        "client.trunk_ready model_id=%s layers=%s address=%s attempts=%d",
        model_id,
        model.layer_range,
        transport.address,
        attempts,
    )
    return model


async def load_local_parts(
    model: RemoteModel,
    checkpoint: str | Path,
    *,
    dtype: DType,
    device: str,
    load_tokenizer: bool,
) -> tuple[ModelPart, ModelPart, Any | None]:
    """Load the bottom, top and tokenizer that fit around the trunk ``model``.

    The loads run in worker threads, one after another (they compete for the same CPU).

    Cancellation: a load already running in a worker thread finishes first.
    """
    # Imported here because loading pulls in transformers' model registry.
    from slm_trio import loading

    layers = model.layer_range
    parts: list[ModelPart] = []
    for kind in ("bottom", "top"):
        config = ModelConfig(
            model_id=f"{model.model_id}:{kind}",
            model_path=str(checkpoint),
            model_type=model.model_type,
            part=kind,
            layers=layers,
            dtype=dtype,
            device=device,
        )
        part = await anyio.to_thread.run_sync(loading.load_model, config)
        if not isinstance(part, ModelPart):
            raise ConfigError(f"loading {kind} from {str(checkpoint)!r} did not return a part")
        parts.append(part)
    tokenizer = None
    if load_tokenizer:
        config = ModelConfig(model_id=f"{model.model_id}:tokenizer", model_path=str(checkpoint))
        tokenizer = await anyio.to_thread.run_sync(loading.load_tokenizer, config)
    return parts[0], parts[1], tokenizer


@asynccontextmanager
async def open_split_client(
    host: str,
    port: int,
    model_id: str,
    *,
    checkpoint: str | Path | None = None,
    bottom: ModelPart | None = None,
    top: ModelPart | None = None,
    tokenizer: Any | None = None,
    retry: RetryPolicy | None = None,
    call_timeout: float | None = 60.0,
    connect_timeout: float | None = 300.0,
    **options: Any,
) -> AsyncIterator[SplitClient]:
    """Connect to the trunk ``model_id`` on ``host:port`` and yield a ready split client.

    Works from trio and asyncio code. See `SplitClient.create` for the arguments.

    Example::

        async with open_split_client(
            "127.0.0.1", 50051, "smollm2-trunk", checkpoint="SmolLM2-135M-Instruct.Q4_1.gguf"
        ) as client:
            result = await client.generate("What is the capital of France?", chat=True)
            print(result.text)

    Raises:
        ConfigError: The arguments are invalid or the parts do not fit the trunk.
        ModelNotFoundError: The server has no model ``model_id``.
        DeadlineExceededError: The trunk was not ready within ``connect_timeout``.
        ServerUnavailableError: The server stayed unreachable through every retry.
    """
    async with open_connection(host, port) as connection:
        management = ManagementClient(connection, retry=retry, call_timeout=call_timeout)
        client = await SplitClient.create(
            GrpcTrunkTransport(connection),
            model_id,
            checkpoint=checkpoint,
            bottom=bottom,
            top=top,
            tokenizer=tokenizer,
            retry=retry,
            call_timeout=call_timeout,
            connect_timeout=connect_timeout,
            management=management,
            **options,
        )
        yield client
