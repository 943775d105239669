"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

Pure torch functions with no event-loop state; the split client calls them in its worker
thread right after the top part's forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slm_trio.errors import ConfigError

__all__ = ["SamplingConfig", "select_tokens"]


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Settings that choose the next token.

    Attributes:
        temperature: 0 selects the most likely token (greedy decoding). A positive value
            divides the logits before sampling, so values below 1 sharpen the distribution
            and values above 1 flatten it.
        top_k: Sample only among the ``top_k`` most likely tokens; None for no limit.
        top_p: Sample only among the most likely tokens whose probabilities sum to at least
            ``top_p`` (nucleus sampling), with ``0 < top_p <= 1``; None for no limit.
        seed: Seed of the sampling generator, for reproducible samples; None for a random one.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        temperature = self.temperature
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise ConfigError(
                f"temperature={temperature!r} is invalid; expected 0 (greedy) or a positive number"
            )
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise ConfigError(f"top_k={self.top_k!r} is invalid; expected an integer >= 1 or None")
        if self.top_p is not None and (
            not isinstance(self.top_p, (int, float))
            or isinstance(self.top_p, bool)
            or not 0 < self.top_p <= 1
        ):
            raise ConfigError(f"top_p={self.top_p!r} is invalid; expected 0 < top_p <= 1 or None")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ConfigError(f"seed={self.seed!r} is invalid; expected an integer or None")

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is always chosen."""
        return self.temperature == 0


def select_tokens(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Choose one token per row.

    Args:
        logits: ``[batch, vocab]`` scores of the next token.
        config: Greedy or sampled decoding, and its filters.
        generator: The random generator for sampling; unused for greedy decoding.

    Returns:
        ``[batch]`` int64 token ids.
    """
    if config.greedy:
        return logits.argmax(dim=-1)

    scores = logits.float() / config.temperature  # [batch, vocab]
    if config.top_k is not None and config.top_k < scores.shape[-1]:
        # The k-th largest score of each row; everything below it is excluded.
        kth = torch.topk(scores, config.top_k, dim=-1).values[..., -1:]  # [batch, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if config.top_p is not None and config.top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # [batch, vocab]
        probs = sorted_scores.softmax(dim=-1)
        # Probability mass of the tokens strictly more likely than each token: a token is kept
        # while that mass is below top_p, so the most likely token is always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    probs = scores.softmax(dim=-1)  # [batch, vocab]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
