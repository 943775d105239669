"""The generation loop of the split client: local bottom and top, remote trunk session.

Design note.

One generation (`TokenStream`) owns two local KV caches (bottom and top), one server-side
session holding the trunk's cache, and the history of every bottom output the trunk has
consumed. Each step runs, in order:

1. the bottom over the new tokens, in a worker thread (``[batch, new]`` ids to
   ``[batch, new, hidden]``);
2. one session step per chunk of the new tokens, on the event loop (the prompt is cut into
   chunks of at most ``max_step_bytes``);
3. the top and token selection, in a worker thread.

Worker threads are never abandoned on cancellation, because a thread that kept running would
write into a cache the next step reads. The client's `anyio.CapacityLimiter` bounds how many
local forwards run at once.

Session loss. A step can fail with `SessionError` (the server lost or expired the session)
or with a retryable error (the stream or connection broke, the server restarted or is loading
the model). The run then drops the stream and rebuilds the trunk cache. It first tries to
resume the old session by id, and keeps it only if the server reports the cached length it
reported after the last step the history contains. Otherwise it opens a fresh session and
replays the history's hidden states. Then it resends the step that failed. The local caches
never change during a rebuild, so the tokens produced are those of an uninterrupted run.
Opening is retried with the client's `RetryPolicy`, and at most ``max_attempts`` rebuilds in
a row are tried before the error propagates.

Padding. A batch is left-padded; its attention mask covers every cached and new position and
travels as bool. Positions count real tokens only (``cumsum(mask) - 1``), so a padded row
computes what it computes alone. A finished row keeps receiving the pad token.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
import torch

from slm_trio.client._connection import deadline_as_error
from slm_trio.client._results import GenerationResult, GenerationStats, StepTiming, TokenStep
from slm_trio.client._retry import RetryPolicy, call_with_retry, is_retryable, remaining_timeout
from slm_trio.client._sampling import SamplingConfig, select_tokens
from slm_trio.client._transport import TrunkReply, TrunkSession, TrunkTransport
from slm_trio.errors import ConfigError, SessionError
from slm_trio.split import ModelPart, PartCache

__all__ = ["GenerationContext", "GenerationSpec", "TokenStream", "decode_new_text", "prepare_batch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerationContext:
    """The parts, transport and settings a generation borrows from its split client."""

    transport: TrunkTransport
    model_id: str
    bottom: ModelPart
    top: ModelPart
    tokenizer: Any | None
    limiter: anyio.CapacityLimiter
    retry: RetryPolicy
    call_timeout: float | None
    rng: random.Random
    max_step_bytes: int
    resume_sessions: bool
    # The server's limit on rows times new positions per step, or None for none known.
    max_step_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class GenerationSpec:
    """One validated generation request.

    Attributes:
        rows: Each prompt's token ids, non-empty.
        max_new_tokens: The maximum number of tokens generated per row.
        sampling: How tokens are chosen.
        stop_token_ids: Tokens that end a row; the token is kept in the output.
        pad_token_id: The token that fills padding and finished rows.
        timeout: Seconds the whole generation may take, from entering the stream; None for
            no limit.
    """

    rows: list[list[int]]
    max_new_tokens: int
    sampling: SamplingConfig
    stop_token_ids: frozenset[int]
    pad_token_id: int
    timeout: float | None


def prepare_batch(
    rows: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token rows into one batch.

    Returns:
        ``(input_ids, attention_mask, position_ids)``, each ``[batch, longest]`` int64.
        Padding positions get position 1, as transformers does; they are masked anyway.
    """
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, longest - len(row) :] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).masked_fill(attention_mask == 0, 1)
    return input_ids, attention_mask, position_ids


class TokenStream:
    """A generation that yields one `TokenStep` per new token as it is produced.

    Use it as ``async with client.stream(...) as tokens: async for step in tokens: ...``;
    the context manager owns the server-side session and closes it on exit. After the
    iteration ends, `result` returns the whole generation.

    Cancellation: cancelling the iteration stops after the current local forward; leaving
    the context manager then resets the session's stream.
    """

    def __init__(self, context: GenerationContext, spec: GenerationSpec) -> None:
        self._context = context
        self._spec = spec
        self._run: _GenerationRun | None = None
        self._deadline: float | None = None
        self._state = "new"

    def __repr__(self) -> str:
        return f"<TokenStream rows={len(self._spec.rows)} state={self._state}>"

    async def __aenter__(self) -> TokenStream:
        if self._state != "new":
            raise RuntimeError("a TokenStream can be entered once; call client.stream() again")
        self._state = "running"
        if self._spec.timeout is not None:
            self._deadline = anyio.current_time() + self._spec.timeout
        self._run = _GenerationRun(self._context, self._spec, deadline=self._deadline)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._state == "running":
            self._state = "stopped"
        if self._run is not None:
            await self._run.aclose()

    def __aiter__(self) -> TokenStream:
        if self._run is None:
            raise RuntimeError(
                "iterate a TokenStream inside its context manager: "
                "async with client.stream(...) as tokens: async for step in tokens"
            )
        return self

    async def __anext__(self) -> TokenStep:
        run = self._run
        if run is None:
            raise RuntimeError("iterate a TokenStream inside its context manager")
        if run.done:
            self._state = "finished"
            raise StopAsyncIteration
        timeout = remaining_timeout(None, self._deadline)
        with deadline_as_error(timeout, "generation"):
            step = await run.next_step()
        if run.done:
            self._state = "finished"
        return step

    def result(self) -> GenerationResult:
        """Return the generation's outcome once the iteration has ended.

        Raises:
            RuntimeError: The generation has not finished.
        """
        if self._run is None or not self._run.done:
            raise RuntimeError("the generation has not finished; iterate the stream to its end")
        return self._run.result()


class _GenerationRun:
    """The state of one generation; see the module's design note."""

    def __init__(
        self, context: GenerationContext, spec: GenerationSpec, *, deadline: float | None
    ) -> None:
        self._context = context
        self._spec = spec
        self._deadline = deadline
        rows = len(spec.rows)
        input_ids, mask, positions = prepare_batch(spec.rows, spec.pad_token_id)
        self._prompt_ids = input_ids  # [batch, prompt]
        self._prompt_positions = positions  # [batch, prompt]
        self._mask = mask  # [batch, positions so far]
        self._next_positions = positions[:, -1] + 1  # [batch]
        self._next_tokens: torch.Tensor | None = None  # [batch]
        self._bottom_cache: PartCache = context.bottom.new_cache()
        self._top_cache: PartCache = context.top.new_cache()
        self._generator = torch.Generator()
        seed = spec.sampling.seed
        self._generator.manual_seed(seed if seed is not None else context.rng.getrandbits(63))

        # The bottom outputs the trunk has consumed, for replaying into a new session.
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._history_positions = 0
        self._session: TrunkSession | None = None
        self._session_steps = 0  # steps the server has completed on the session
        self._session_positions = 0  # positions per row the server has cached
        # The session's step count and the server's `cached_tokens` value (in the server's
        # own unit) when its cache last matched the history. A resumed session must match them.
        self._confirmed_steps = 0
        self._confirmed_cached: int | None = 0
        self._reported_cached: int | None = 0
        self._resume_id: str | None = None
        self._session_clean = True

        self._generated: list[list[int]] = [[] for _ in range(rows)]
        # Incremental detokenization per row: the text of tokens [prefix, read) was streamed
        # already, and the next step decodes only from ``prefix`` on.
        self._prefix_offsets = [0] * rows
        self._read_offsets = [0] * rows
        self._reasons: list[str | None] = [None] * rows
        self._index = 0
        self.done = False

        self._prefill = StepTiming()
        self._decode = StepTiming()
        self._steps = 0
        self._rebuilds = 0
        self._retries = 0
        self._step_server_seconds = 0.0
        self._step_bytes_sent = 0
        self._step_bytes_received = 0

    # Steps ------------------------------------------------------------------------------

    async def next_step(self) -> TokenStep:
        started = time.perf_counter()
        self._step_server_seconds = 0.0
        self._step_bytes_sent = 0
        self._step_bytes_received = 0
        bottom, top = self._context.bottom, self._context.top

        if self._next_tokens is None:
            input_ids, positions = self._prompt_ids, self._prompt_positions
        else:
            input_ids = self._next_tokens.unsqueeze(1)  # [batch, 1]
            positions = self._next_positions.unsqueeze(1)  # [batch, 1]
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            self._next_positions = self._next_positions + 1
        mask = self._mask

        self._session_clean = False
        hidden, bottom_seconds = await self._local(
            _forward_part, bottom, input_ids, positions, mask, self._bottom_cache
        )
        trunk_output = await self._trunk(hidden, positions)
        finished = torch.tensor([reason is not None for reason in self._reasons])
        tokens, top_seconds = await self._local(
            _forward_top_and_select,
            top,
            trunk_output,
            positions,
            mask,
            self._top_cache,
            self._spec.sampling,
            self._generator,
            finished,
            self._spec.pad_token_id,
        )
        self._session_clean = True
        self._next_tokens = tokens
        step = self._record_tokens(tokens.tolist())

        timing = StepTiming.measured(
            client_seconds=bottom_seconds + top_seconds,
            server_seconds=self._step_server_seconds,
            total_seconds=time.perf_counter() - started,
            bytes_sent=self._step_bytes_sent,
            bytes_received=self._step_bytes_received,
        )
        if self._steps == 0:
            self._prefill = timing
        else:
            self._decode = self._decode + timing
        self._steps += 1
        if self.done:
            await self._close_session()
        return TokenStep(
            index=step[0], token_ids=step[1], texts=step[2], finished=step[3], timing=timing
        )

    def _record_tokens(
        self, tokens: list[int]
    ) -> tuple[int, tuple[int | None, ...], tuple[str, ...], tuple[bool, ...]]:
        index = self._index
        self._index += 1
        new_ids: list[int | None] = []
        texts: list[str] = []
        for row, token in enumerate(tokens):
            if self._reasons[row] is not None:
                new_ids.append(None)
                texts.append("")
                continue
            self._generated[row].append(token)
            new_ids.append(token)
            texts.append(self._new_text(row))
            if token in self._spec.stop_token_ids:
                self._reasons[row] = "stop"
            elif len(self._generated[row]) >= self._spec.max_new_tokens:
                self._reasons[row] = "length"
        finished = tuple(reason is not None for reason in self._reasons)
        self.done = all(finished)
        return index, tuple(new_ids), tuple(texts), finished

    def _new_text(self, row: int) -> str:
        tokenizer = self._context.tokenizer
        if tokenizer is None:
            return ""
        text, self._prefix_offsets[row], self._read_offsets[row] = decode_new_text(
            tokenizer, self._generated[row], self._prefix_offsets[row], self._read_offsets[row]
        )
        return text

    async def _local(self, fn: Any, *args: Any) -> Any:
        # Not abandoned on cancellation: the thread writes into a cache that later steps read.
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._context.limiter)

    # The trunk ---------------------------------------------------------------------------

    async def _trunk(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the trunk over new tokens in the session, rebuilding the session if it is lost."""
        policy = self._context.retry
        failures = 0
        while True:
            try:
                if self._session is None:
                    await self._open_session()
                output = await self._send(hidden, positions)
            except Exception as error:
                if not (isinstance(error, SessionError) or is_retryable(error)):
                    raise
                failures += 1
                await self._drop_session(error)
                if failures >= policy.max_attempts:
                    raise
                self._rebuilds += 1
                logger.info(
                    "session.rebuild model_id=%s attempt=%d positions=%d error=%r",
                    self._context.model_id,
                    failures,
                    self._history_positions,
                    error,
                )
                if failures > 1:
                    await self._back_off(failures - 1, error)
                continue
            self._history.append((hidden, positions))
            self._history_positions += hidden.shape[1]
            self._confirm()
            return output

    async def _back_off(self, retry: int, error: BaseException) -> None:
        delay = self._context.retry.delay(retry, jitter=self._context.rng.random())
        if self._deadline is not None and anyio.current_time() + delay >= self._deadline:
            raise error
        await anyio.sleep(delay)

    async def _send(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Send new tokens' hidden states ``[batch, new, hidden]`` as one or more session steps."""
        session = self._session
        assert session is not None
        rows, length, width = hidden.shape
        chunk = max(1, self._context.max_step_bytes // (rows * width * hidden.element_size()))
        if self._context.max_step_tokens is not None:
            chunk = min(chunk, max(1, self._context.max_step_tokens // rows))
        send_mask = not bool(self._mask.all())
        outputs = []
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            cached = self._session_positions + stop - start
            mask = self._mask[:, :cached].to(torch.bool) if send_mask else None
            timeout = remaining_timeout(self._context.call_timeout, self._deadline)
            with deadline_as_error(timeout, f"session step on {self._context.transport.address}"):
                reply = await session.step(
                    self._session_steps,
                    hidden[:, start:stop],
                    positions[:, start:stop],
                    mask,
                    call_timeout=timeout,
                )
            self._session_steps += 1
            self._session_positions += stop - start
            self._reported_cached = reply.cached_tokens
            self._note(reply)
            outputs.append(reply.tensor)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _note(self, reply: TrunkReply) -> None:
        self._step_server_seconds += reply.server_seconds
        self._step_bytes_sent += reply.bytes_sent
        self._step_bytes_received += reply.bytes_received

    def _confirm(self) -> None:
        """Record that the session's cache now contains exactly the history."""
        self._confirmed_steps = self._session_steps
        self._confirmed_cached = self._reported_cached

    async def _open_session(self) -> None:
        """Resume the lost session if the server still has all of it, else open and replay."""
        expected = self._history_positions
        if self._resume_id is not None:
            resume_id, self._resume_id = self._resume_id, None
            session = await self._try_resume(resume_id)
            if session is not None:
                # The server's count is compared in its own unit, as its last step reported it,
                # so a step whose reply was lost (the server ran it) is detected here.
                if self._confirmed_cached is not None and (
                    session.cached_tokens == self._confirmed_cached
                ):
                    self._session = session
                    self._session_steps = self._confirmed_steps
                    self._session_positions = expected
                    self._reported_cached = self._confirmed_cached
                    logger.info("session.resumed session_id=%s positions=%d", resume_id, expected)
                    return
                logger.info(
                    "session.resume_mismatch session_id=%s cached=%d expected=%s",
                    resume_id,
                    session.cached_tokens,
                    self._confirmed_cached,
                )
                await session.aclose()

        session = await self._open(None)
        self._session = session
        self._session_steps = 0
        self._session_positions = 0
        self._reported_cached = session.cached_tokens
        if self._history:
            # Replay everything the lost session had consumed, in as few steps as fit.
            hidden = torch.cat([h for h, _ in self._history], dim=1)  # [batch, history, hidden]
            positions = torch.cat([p for _, p in self._history], dim=1)  # [batch, history]
            await self._send(hidden, positions)
            logger.info(
                "session.replayed session_id=%s positions=%d steps=%d",
                session.session_id,
                expected,
                self._session_steps,
            )
        self._confirm()

    async def _try_resume(self, session_id: str) -> TrunkSession | None:
        try:
            return await self._open(session_id)
        except SessionError as error:
            logger.info("session.resume_failed session_id=%s error=%r", session_id, error)
            return None

    async def _open(self, resume_session_id: str | None) -> TrunkSession:
        context = self._context

        async def attempt() -> TrunkSession:
            timeout = remaining_timeout(context.call_timeout, self._deadline)
            with deadline_as_error(timeout, f"opening a session on {context.transport.address}"):
                return await context.transport.open_session(
                    context.model_id, resume_session_id=resume_session_id, call_timeout=timeout
                )

        return await call_with_retry(
            attempt,
            policy=context.retry,
            operation=f"opening a session on model {context.model_id!r}",
            deadline=self._deadline,
            rng=context.rng,
            on_retry=self._count_retry,
        )

    def _count_retry(self, error: BaseException) -> None:
        self._retries += 1

    async def _drop_session(self, error: BaseException) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        await session.abort()
        # A session the server no longer has cannot be resumed.
        resumable = self._context.resume_sessions and not isinstance(error, SessionError)
        self._resume_id = session.session_id if resumable else None

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if self._session_clean:
            await session.aclose()
        else:
            await session.abort()

    async def aclose(self) -> None:
        """Close the session, or reset its stream if a step was interrupted; idempotent."""
        await self._close_session()

    # Result -----------------------------------------------------------------------------

    def result(self) -> GenerationResult:
        prompt_tokens = sum(len(row) for row in self._spec.rows)
        stats = GenerationStats(
            rows=len(self._spec.rows),
            prompt_tokens=prompt_tokens,
            new_tokens=sum(len(row) for row in self._generated),
            steps=self._steps,
            prefill=self._prefill,
            decode=self._decode,
            session_rebuilds=self._rebuilds,
            retries=self._retries,
        )
        tokenizer = self._context.tokenizer
        texts = [
            str(tokenizer.decode(row, skip_special_tokens=True)) if tokenizer is not None else ""
            for row in self._generated
        ]
        return GenerationResult(
            prompt_token_ids=[list(row) for row in self._spec.rows],
            token_ids=[list(row) for row in self._generated],
            texts=texts,
            finish_reasons=[reason or "length" for reason in self._reasons],
            stats=stats,
        )


# Worker-thread functions ------------------------------------------------------------------


def _forward_part(
    part: ModelPart,
    inputs: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache: PartCache,
) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    with torch.no_grad():
        output = part(inputs, position_ids=positions, attention_mask=mask, cache=cache)
    return output, time.perf_counter() - started


def _forward_top_and_select(
    top: ModelPart,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache: PartCache,
    sampling: SamplingConfig,
    generator: torch.Generator,
    finished: torch.Tensor,
    pad_token_id: int,
) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    with torch.no_grad():
        logits = top(hidden, position_ids=positions, attention_mask=mask, cache=cache)
        # Only the last position's scores choose the next token.
        tokens = select_tokens(logits[:, -1, :].float(), sampling, generator)  # [batch]
        tokens = tokens.masked_fill(finished, pad_token_id)
    return tokens, time.perf_counter() - started


def validate_rows(rows: list[list[int]], vocab_size: int) -> None:
    """Check that every prompt is non-empty and its ids are in the vocabulary.

    Raises:
        ConfigError: A prompt is empty or has an id outside ``[0, vocab_size)``.
    """
    for index, row in enumerate(rows):
        if not row:
            raise ConfigError(f"prompt {index} is empty; every prompt needs at least one token")
        for token in row:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
                raise ConfigError(
                    f"prompt {index} has token id {token!r}; expected integers in "
                    f"[0, {vocab_size}) (the vocabulary size)"
                )


def decode_new_text(
    tokenizer: Any, token_ids: list[int], prefix: int, read: int
) -> tuple[str, int, int]:
    """Return the text that the newest tokens add, and the offsets for the next call.

    The text of ``token_ids[prefix:read]`` was returned already. Both decodes here start
    at ``prefix``, so a tokenizer that drops the leading space of a sequence drops it from
    both, and their difference is the new text. Decoding a short window instead of the
    whole row keeps streaming linear in the number of tokens.

    Returns:
        ``(text, prefix, read)``: the text is empty, and the offsets unchanged, while the
        tokens end inside a multi-byte character or add no printable text.
    """
    before = str(tokenizer.decode(token_ids[prefix:read], skip_special_tokens=True))
    text = str(tokenizer.decode(token_ids[prefix:], skip_special_tokens=True))
    if len(text) <= len(before) or text.endswith("\ufffd"):
        return "", prefix, read
    return text[len(before) :], read, len(token_ids)
