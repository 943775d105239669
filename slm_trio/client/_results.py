"""Result types of the split client: timings, streamed steps and generation results."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ForwardResult",
    "GenerationResult",
    "GenerationStats",
    "StepTiming",
    "TokenStep",
    "TrunkResult",
]


@dataclass(frozen=True, kw_only=True)
class StepTiming:
    """The time and bytes spent on one call, one step or a sum of them.

    Attributes:
        client_seconds: Compute on the client: the bottom and top parts and token selection.
        server_seconds: Time the server reported for its requests, from receipt to reply.
        network_seconds: The rest of the wall time: the network, message encoding and
            decoding, and handing work to and from worker threads.
        total_seconds: Wall time.
        bytes_sent: gRPC message bytes sent to the server (HTTP/2 framing not counted).
        bytes_received: gRPC message bytes received from the server.
    """

    client_seconds: float = 0.0
    server_seconds: float = 0.0
    network_seconds: float = 0.0
    total_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    def __add__(self, other: StepTiming) -> StepTiming:
        return StepTiming(
            client_seconds=self.client_seconds + other.client_seconds,
            server_seconds=self.server_seconds + other.server_seconds,
            network_seconds=self.network_seconds + other.network_seconds,
            total_seconds=self.total_seconds + other.total_seconds,
            bytes_sent=self.bytes_sent + other.bytes_sent,
            bytes_received=self.bytes_received + other.bytes_received,
        )

    @classmethod
    def measured(
        cls,
        *,
        client_seconds: float,
        server_seconds: float,
        total_seconds: float,
        bytes_sent: int,
        bytes_received: int,
    ) -> StepTiming:
        """Build a timing whose network time is the wall time left after client and server."""
        return cls(
            client_seconds=client_seconds,
            server_seconds=server_seconds,
            network_seconds=max(0.0, total_seconds - client_seconds - server_seconds),
            total_seconds=total_seconds,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
        )


@dataclass(frozen=True, kw_only=True)
class TokenStep:
    """One decoding step of a streamed generation: the token chosen for each row.

    Attributes:
        index: 0 for the first new token, then one more per step.
        token_ids: The new token of each row, or None for a row that finished earlier.
        texts: The text each row's new token adds; empty for a finished row, and for a token
            that completes a character only later.
        finished: Whether each row has finished, this step included.
        timing: The time and bytes of this step. The first step includes the prompt.
    """

    index: int
    token_ids: tuple[int | None, ...]
    texts: tuple[str, ...]
    finished: tuple[bool, ...]
    timing: StepTiming

    @property
    def token_id(self) -> int | None:
        """The first row's new token, for single-prompt generation."""
        return self.token_ids[0]

    @property
    def text(self) -> str:
        """The text the first row's new token adds, for single-prompt generation."""
        return self.texts[0]


@dataclass(frozen=True, kw_only=True)
class GenerationStats:
    """Counters and timings of one generation.

    Attributes:
        rows: Prompts in the batch.
        prompt_tokens: Prompt tokens over all rows, padding excluded.
        new_tokens: Generated tokens over all rows.
        steps: Forward steps through the three parts, the prompt step included.
        prefill: The step over the prompt.
        decode: The sum of the steps after the prompt.
        session_rebuilds: How often the server-side session was lost and rebuilt.
        retries: Calls retried after a transient error.
    """

    rows: int
    prompt_tokens: int
    new_tokens: int
    steps: int
    prefill: StepTiming
    decode: StepTiming
    session_rebuilds: int
    retries: int

    @property
    def total(self) -> StepTiming:
        """The prompt step and the decode steps together."""
        return self.prefill + self.decode

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time, the prompt step included."""
        seconds = self.total.total_seconds
        return self.new_tokens / seconds if seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the steps after the prompt step, which made one token per row."""
        tokens = self.new_tokens - min(self.rows, self.new_tokens)
        seconds = self.decode.total_seconds
        return tokens / seconds if seconds > 0 else 0.0

    @property
    def bytes_per_token(self) -> tuple[float, float]:
        """Bytes sent and received per generated token, the prompt included."""
        if self.new_tokens == 0:
            return (0.0, 0.0)
        total = self.total
        return (total.bytes_sent / self.new_tokens, total.bytes_received / self.new_tokens)


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """The outcome of a generation, one entry per prompt.

    Attributes:
        prompt_token_ids: Each prompt's token ids, without padding.
        token_ids: Each row's generated token ids, the stop token included.
        texts: Each row's generated text, special tokens skipped; empty without a tokenizer.
        finish_reasons: ``"stop"`` when a stop or end-of-sequence token ended the row,
            ``"length"`` when ``max_new_tokens`` did.
        stats: Counters and timings.
    """

    prompt_token_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    stats: GenerationStats

    @property
    def text(self) -> str:
        """The first row's text, for single-prompt generation."""
        return self.texts[0]

    @property
    def tokens(self) -> list[int]:
        """The first row's generated token ids, for single-prompt generation."""
        return self.token_ids[0]


@dataclass(frozen=True, kw_only=True)
class TrunkResult:
    """The trunk's output for one forward or backward call.

    Attributes:
        tensor: Hidden states ``[batch, seq, hidden]`` for a forward call, the gradient with
            respect to the input hidden states for a backward call. Read-only.
        timing: Time and bytes of the call (no client compute).
    """

    tensor: torch.Tensor
    timing: StepTiming


@dataclass(frozen=True, kw_only=True)
class ForwardResult:
    """Logits of a full forward pass through bottom, trunk and top.

    Attributes:
        logits: ``[batch, seq, vocab]``.
        timing: Time and bytes of the pass.
    """

    logits: torch.Tensor
    timing: StepTiming
