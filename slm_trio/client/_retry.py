"""Retries with exponential backoff and full jitter, for transient server errors only.

`RetryPolicy` is a frozen value with a pure `RetryPolicy.delay` method, so the backoff bounds
are testable without sleeping. `call_with_retry` runs an attempt function under a policy and an
optional overall deadline; it sleeps with `anyio.sleep`, so a test clock (trio's `MockClock`)
controls it.

Only UNAVAILABLE errors are retried: a model still loading (`ModelLoadingError`, whose
``retry_after`` hint the delay honours), a model being unloaded, a server shutting down or
restarting, and a refused or broken connection (`ServerUnavailableError`). Invalid arguments,
unknown models, internal errors and expired deadlines fail at once because a retry would fail
the same way. Callers decide which calls may be retried at all: a backward pass is never
retried, because it is a training step that must not run twice.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
from grpclib.const import Status

from slm_trio._status_map import status_for_error
from slm_trio.errors import (
    ConfigError,
    DeadlineExceededError,
    ModelLoadingError,
    RemoteError,
    ServerUnavailableError,
)

__all__ = ["RetryPolicy", "call_with_retry", "is_retryable", "remaining_timeout"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Exponents past this make every cap equal to max_backoff anyway; the bound keeps
# ``multiplier ** n`` from overflowing a float.
_MAX_EXPONENT = 64


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how long a client waits before retrying a transient error.

    The delay before retry ``n`` (1 for the first retry) is drawn uniformly from
    ``[0, cap(n))`` with ``cap(n) = min(max_backoff, initial_backoff * multiplier ** (n - 1))``
    ("full jitter"). When the server sent a ``retry-after-ms`` hint, the delay is at least that
    hint, capped at ``max_backoff``.

    Attributes:
        max_attempts: Attempts in total, the first one included; 1 disables retries.
        initial_backoff: The cap of the first retry's delay, in seconds.
        max_backoff: The largest cap of any delay, in seconds.
        multiplier: The factor by which the cap grows after each retry.
        use_retry_after: Whether to wait at least the server's ``retry-after-ms`` hint.
    """

    max_attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    use_retry_after: bool = True

    def __post_init__(self) -> None:
        if (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or self.max_attempts < 1
        ):
            raise ConfigError(
                f"max_attempts={self.max_attempts!r} is invalid; expected an integer >= 1"
            )
        for name in ("initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid; expected seconds >= 0")
        if self.max_backoff < self.initial_backoff:
            raise ConfigError(
                f"max_backoff={self.max_backoff!r} is smaller than "
                f"initial_backoff={self.initial_backoff!r}; expected max_backoff >= initial_backoff"
            )
        if (
            not isinstance(self.multiplier, (int, float))
            or not math.isfinite(self.multiplier)
            or self.multiplier < 1
        ):
            raise ConfigError(f"multiplier={self.multiplier!r} is invalid; expected a number >= 1")

    @classmethod
    def no_retries(cls) -> RetryPolicy:
        """Return a policy that makes one attempt only."""
        return cls(max_attempts=1)

    def backoff_cap(self, retry: int) -> float:
        """Return the upper bound, in seconds, of the delay before retry number ``retry`` (>= 1)."""
        if retry < 1:
            raise ValueError(f"retry={retry!r} is invalid; retries are numbered from 1")
        exponent = min(retry - 1, _MAX_EXPONENT)
        return float(min(self.max_backoff, self.initial_backoff * self.multiplier**exponent))

    def delay(self, retry: int, *, jitter: float, retry_after: float | None = None) -> float:
        """Return the delay in seconds before retry number ``retry`` (>= 1).

        Args:
            retry: 1 for the first retry, 2 for the second, and so on.
            jitter: A uniform random number in ``[0, 1)``; the delay is ``jitter * cap``.
            retry_after: The server's suggested wait in seconds, if it sent one.
        """
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter={jitter!r} is invalid; expected 0 <= jitter < 1")
        delay = jitter * self.backoff_cap(retry)
        if self.use_retry_after and retry_after is not None and math.isfinite(retry_after):
            delay = max(delay, min(max(retry_after, 0.0), self.max_backoff))
        return delay


def is_retryable(error: BaseException) -> bool:
    """Return whether ``error`` is a transient UNAVAILABLE error that a retry may fix."""
    if isinstance(error, ServerUnavailableError):
        return True
    if isinstance(error, RemoteError):
        return error.code == Status.UNAVAILABLE.name
    status = status_for_error(error)
    return status is not None and status.status == Status.UNAVAILABLE


def remaining_timeout(call_timeout: float | None, deadline: float | None) -> float | None:
    """Return the timeout in seconds for one call: ``call_timeout`` bounded by ``deadline``.

    Args:
        call_timeout: The per-call timeout in seconds, or None for none.
        deadline: The overall deadline on the `anyio.current_time` clock, or None.

    Raises:
        DeadlineExceededError: The deadline has already passed.
    """
    if deadline is None:
        return call_timeout
    left = deadline - anyio.current_time()
    if left <= 0:
        raise DeadlineExceededError(
            f"the overall deadline passed {-left:.3f} s ago; raise the timeout or shorten the work"
        )
    return left if call_timeout is None else min(call_timeout, left)


async def call_with_retry(
    attempt: Callable[[], Awaitable[_T]],
    *,
    policy: RetryPolicy,
    operation: str,
    deadline: float | None = None,
    rng: random.Random | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
    uncounted: tuple[type[Exception], ...] = (),
) -> _T:
    """Run ``attempt()`` and retry it on transient errors, as ``policy`` allows.

    Args:
        attempt: Makes one attempt; it applies its own per-call timeout.
        policy: How many attempts and how long to wait between them.
        operation: What is attempted, for logs and errors, for example ``"Describe 'm'"``.
        deadline: The overall deadline on the `anyio.current_time` clock; no retry starts
            if its delay would end after the deadline.
        rng: The source of jitter; the module's shared generator if None.
        on_retry: Called with the error before each retry's delay.
        uncounted: Retryable error classes that do not use up ``policy.max_attempts``, for
            waiting on a model that is loading; ``deadline`` still bounds them.

    Raises:
        DeadlineExceededError: The next retry would end after ``deadline``; the last error is
            the ``__cause__``.
        Exception: The error of the last attempt when it is not retryable or no attempts are
            left.

    Cancellation: cancelling stops the current attempt or delay; nothing is retried after.
    """
    source = rng if rng is not None else random
    retry = 0
    counted = 0
    while True:
        try:
            return await attempt()
        except Exception as error:
            retry += 1
            if not isinstance(error, uncounted):
                counted += 1
            if not is_retryable(error) or counted >= policy.max_attempts:
                raise
            retry_after = error.retry_after if isinstance(error, ModelLoadingError) else None
            delay = policy.delay(retry, jitter=source.random(), retry_after=retry_after)
            if deadline is not None and anyio.current_time() + delay >= deadline:
                raise DeadlineExceededError(
                    f"{operation} failed and was not retried because the deadline passes in "
                    f"less than the {delay:.3f} s backoff, after {retry} attempt(s); "
                    f"last error: {error}"
                ) from error
            logger.info(
                "rpc.retry operation=%s retry=%d delay=%.3f error=%r",
                operation,
                retry,
                delay,
                error,
            )
            if on_retry is not None:
                on_retry(error)
            await anyio.sleep(delay)
