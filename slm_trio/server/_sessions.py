"""Generation sessions: server-side KV caches, their budget and their expiry.

Design note.

A session holds the trunk's KV cache for one batch of sequences, so a client
sends only the new tokens' hidden states on each step. A session rides one
bidirectional stream; when the stream breaks without a close, the session
stays for `ttl` seconds so the client can resume it by id.

`SessionStore` is plain Python state with synchronous methods only: it holds
no event-loop primitives, so handlers may call it from either side of the
trio-asyncio bridge. Its invariants:

- ``cached_tokens`` is the sum of ``rows * seq_length`` over open sessions and
  never exceeds ``max_cached_tokens``: a step reserves its tokens before its
  forward runs and gives them back if the forward fails.
- A session whose step was cancelled mid-forward (a deadline, a dropped
  stream) is marked broken: its cache may hold half a step, so later steps fail
  with `SessionError` and the client rebuilds it.
- A session is bound to the model object it was opened on; after a reload or
  unload its steps fail with `SessionError` rather than mix two models' caches.
- At most one stream is attached to a session at a time.
- A detached session (its stream broke) is kept only for a resume, so it
  yields to new work: when the session limit or the token budget is reached,
  the detached session idle longest is closed (reclaimed) first. A client whose
  session was reclaimed rebuilds it by replaying its tokens, as after expiry.
- The store remembers why recently closed sessions closed, so a late resume or
  step gets that reason instead of "unknown".

Expiry runs in `run_expiry`, a task the server's nursery owns.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio

from slm_trio.errors import SessionBudgetError, SessionError, SessionStepError

__all__ = ["Session", "SessionStatistics", "SessionStore"]

logger = logging.getLogger(__name__)

# How many closed session ids keep their closing reason for later error messages.
_REMEMBERED_CLOSED = 1024


@dataclass(eq=False, kw_only=True)
class Session:
    """One open generation session; only `SessionStore` changes it."""

    session_id: str
    model_id: str
    model: Any
    cache: Any
    created_at: float
    last_active: float
    next_step: int = 0
    # Tokens in the cache (rows * positions), counted against the budget.
    tokens: int = 0
    attached: bool = False
    busy: bool = False
    broken: str | None = None

    def __repr__(self) -> str:
        return (
            f"<Session {self.session_id} model_id={self.model_id!r} tokens={self.tokens} "
            f"next_step={self.next_step} attached={self.attached}>"
        )


@dataclass(frozen=True, kw_only=True)
class SessionStatistics:
    """Gauges and counters of a `SessionStore`."""

    sessions: int
    cached_tokens: int
    max_cached_tokens: int
    opened: int
    expired: int
    reclaimed: int
    rejected_for_budget: int


class SessionStore:
    """Open, step, resume and expire generation sessions.

    Args:
        ttl: Seconds a session may stay idle before it is closed.
        max_sessions: The maximum number of open sessions.
        max_cached_tokens: The budget of cached tokens over all sessions.
    """

    def __init__(self, *, ttl: float, max_sessions: int, max_cached_tokens: int) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self._sessions: dict[str, Session] = {}
        self._cached_tokens = 0
        self._opened = 0
        self._expired = 0
        self._reclaimed = 0
        self._rejected_for_budget = 0
        self._closed_reasons: OrderedDict[str, str] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"<SessionStore sessions={len(self._sessions)} "
            f"cached_tokens={self._cached_tokens}/{self.max_cached_tokens}>"
        )

    def statistics(self) -> SessionStatistics:
        """Return the current gauges and counters."""
        return SessionStatistics(
            sessions=len(self._sessions),
            cached_tokens=self._cached_tokens,
            max_cached_tokens=self.max_cached_tokens,
            opened=self._opened,
            expired=self._expired,
            reclaimed=self._reclaimed,
            rejected_for_budget=self._rejected_for_budget,
        )

    def open_nowait(self, model_id: str, model: Any, cache: Any, *, now: float) -> Session:
        """Open and attach a new session.

        Raises:
            SessionBudgetError: ``max_sessions`` sessions are already open.
        """
        if len(self._sessions) >= self.max_sessions:
            self._reclaim_detached(exclude=None, reason="the session limit was reached")
        if len(self._sessions) >= self.max_sessions:
            self._rejected_for_budget += 1
            raise SessionBudgetError(
                f"the server already has {len(self._sessions)} open sessions, its maximum, "
                "and every one is attached to a stream; close finished sessions or retry later"
            )
        session_id = secrets.token_hex(8)
        session = Session(
            session_id=session_id,
            model_id=model_id,
            model=model,
            cache=cache,
            created_at=now,
            last_active=now,
            attached=True,
        )
        self._sessions[session_id] = session
        self._opened += 1
        logger.debug("session.opened session_id=%s model_id=%s", session_id, model_id)
        return session

    def resume_nowait(self, session_id: str, model_id: str, *, now: float) -> Session:
        """Attach a new stream to a session whose stream broke.

        Raises:
            SessionError: The id is unknown or expired, belongs to another
                model, is attached to another stream, or is broken.
        """
        session = self.get_nowait(session_id)
        if session.model_id != model_id:
            raise SessionError(
                f"session {session_id!r} belongs to model {session.model_id!r}, "
                f"not {model_id!r}; open a new session"
            )
        if session.attached:
            raise SessionError(
                f"session {session_id!r} is attached to another stream; close that stream first"
            )
        self._check_usable(session)
        session.attached = True
        session.last_active = now
        return session

    def get_nowait(self, session_id: str) -> Session:
        """Return an open session.

        Raises:
            SessionError: The id is unknown, closed or expired.
        """
        session = self._sessions.get(session_id)
        if session is None:
            reason = self._closed_reasons.get(session_id)
            if reason is not None:
                raise SessionError(
                    f"session {session_id!r} was closed because {reason}; open a new session"
                )
            raise SessionError(
                f"session {session_id!r} is unknown or expired (sessions expire after "
                f"{self.ttl:g} s idle); open a new session"
            )
        return session

    def begin_step_nowait(
        self, session: Session, step_index: int, new_tokens: int, *, model: Any, now: float
    ) -> None:
        """Check a step and reserve its tokens against the budget.

        Raises:
            SessionError: The session is closed, broken, or bound to another model object.
            SessionStepError: The session is busy, or ``step_index`` is not the next one.
            SessionBudgetError: The new tokens do not fit in the server's budget.
        """
        if self._sessions.get(session.session_id) is not session:
            raise SessionError(
                f"session {session.session_id!r} was closed or expired; open a new session"
            )
        self._check_usable(session)
        if session.model is not model:
            session.broken = "its model was reloaded or unloaded"
            raise SessionError(
                f"session {session.session_id!r} cannot continue: model {session.model_id!r} "
                "was reloaded or unloaded since it opened; open a new session"
            )
        if session.busy:
            raise SessionStepError(
                f"session {session.session_id!r} is still running step {session.next_step}; "
                "wait for its result before sending the next step"
            )
        if step_index != session.next_step:
            raise SessionStepError(
                f"session {session.session_id!r} expected step_index={session.next_step}, "
                f"got step_index={step_index}; steps must be sent in order without gaps"
            )
        if self._cached_tokens + new_tokens > self.max_cached_tokens:
            self._reclaim_for_tokens(new_tokens, exclude=session)
        if self._cached_tokens + new_tokens > self.max_cached_tokens:
            self._rejected_for_budget += 1
            raise SessionBudgetError(
                f"a step of {new_tokens} new token(s) does not fit in the server's KV-cache "
                "budget: "
                f"{self._cached_tokens} of {self.max_cached_tokens} tokens are cached; "
                "close idle sessions, send shorter prompts or retry later"
            )
        self._cached_tokens += new_tokens
        session.tokens += new_tokens
        session.busy = True
        session.last_active = now

    def end_step_nowait(
        self, session: Session, new_tokens: int, *, completed: bool, cache_intact: bool, now: float
    ) -> None:
        """Finish a step started with `begin_step_nowait`.

        Args:
            completed: The forward returned and its result is used.
            cache_intact: The cache is as it was before the step (the forward
                raised), so a failed step leaves the session usable.
        """
        session.busy = False
        session.last_active = now
        if completed:
            session.next_step += 1
            return
        # Give the reserved tokens back; a session left broken is freed below.
        session.tokens -= new_tokens
        if self._sessions.get(session.session_id) is session:
            self._cached_tokens -= new_tokens
        if not cache_intact:
            session.broken = "a step was interrupted before it finished"
            self.close_nowait(session.session_id, reason=session.broken)

    def detach_nowait(self, session: Session, *, now: float) -> None:
        """Mark a session's stream as gone; the session stays for `ttl` seconds.

        A session with nothing cached is closed instead: resuming it would
        gain nothing, and keeping it would let failed opens pile up.
        """
        if session.tokens == 0:
            self.close_nowait(session.session_id)
            return
        session.attached = False
        session.last_active = now

    def close_nowait(self, session_id: str, *, reason: str | None = None) -> Session | None:
        """Close a session and free its cache; return it, or None if it was not open.

        Args:
            reason: Why the server closed it, completing "was closed because ...", for
                the error a later resume or step gets. None for a close the client asked for.
        """
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        self._cached_tokens -= session.tokens
        session.cache = None
        if reason is not None:
            self._closed_reasons[session_id] = reason
            while len(self._closed_reasons) > _REMEMBERED_CLOSED:
                self._closed_reasons.popitem(last=False)
        logger.debug(
            "session.closed session_id=%s model_id=%s tokens=%d",
            session_id,
            session.model_id,
            session.tokens,
        )
        return session

    def has_sessions_nowait(self, model_id: str) -> bool:
        """Return whether any open session uses ``model_id``."""
        return any(s.model_id == model_id for s in self._sessions.values())

    def close_for_model_nowait(self, model_id: str) -> int:
        """Close every session of a model (after an unload); return how many."""
        ids = [s.session_id for s in self._sessions.values() if s.model_id == model_id]
        for session_id in ids:
            self.close_nowait(session_id, reason=f"model {model_id!r} was unloaded")
        return len(ids)

    def expire_nowait(self, *, now: float) -> list[str]:
        """Close sessions idle for more than `ttl` seconds; return their ids."""
        expired = [
            s.session_id
            for s in self._sessions.values()
            if not s.busy and now - s.last_active > self.ttl
        ]
        for session_id in expired:
            self.close_nowait(session_id, reason=f"it was idle for more than {self.ttl:g} s")
            self._expired += 1
            logger.info("session.expired session_id=%s ttl=%g", session_id, self.ttl)
        return expired

    def next_expiry_nowait(self) -> float:
        """Return the time at which the next session may expire, or infinity."""
        idle = [s.last_active for s in self._sessions.values() if not s.busy]
        return min(idle) + self.ttl if idle else math.inf

    async def run_expiry(self, *, interval: float | None = None) -> None:
        """Expire idle sessions until cancelled; run it in the server's task group.

        Cancellation: returns by raising the cancellation; nothing is left half done.
        """
        interval = interval if interval is not None else max(self.ttl / 4, 0.05)
        while True:
            await anyio.sleep(interval)
            self.expire_nowait(now=anyio.current_time())

    def _reclaim_for_tokens(self, new_tokens: int, *, exclude: Session) -> None:
        """Reclaim detached sessions until ``new_tokens`` fit, if reclaiming can make them fit."""
        reclaimable = sum(
            s.tokens for s in self._sessions.values() if self._is_reclaimable(s, exclude)
        )
        if self._cached_tokens - reclaimable + new_tokens > self.max_cached_tokens:
            return
        while self._cached_tokens + new_tokens > self.max_cached_tokens:
            self._reclaim_detached(exclude=exclude, reason="the KV-cache budget was full")

    @staticmethod
    def _is_reclaimable(session: Session, exclude: Session | None) -> bool:
        return not session.attached and not session.busy and session is not exclude

    def _reclaim_detached(self, *, exclude: Session | None, reason: str) -> bool:
        """Close the detached session idle longest to make room; return whether one was closed."""
        candidates = [
            s for s in self._sessions.values() if not s.attached and not s.busy and s is not exclude
        ]
        if not candidates:
            return False
        victim = min(candidates, key=lambda s: s.last_active)
        self.close_nowait(
            victim.session_id, reason=f"{reason} and its stream had broken (it was reclaimed)"
        )
        self._reclaimed += 1
        logger.info(
            "session.reclaimed session_id=%s model_id=%s tokens=%d reason=%s",
            victim.session_id,
            victim.model_id,
            victim.tokens,
            reason,
        )
        return True

    def _check_usable(self, session: Session) -> None:
        if session.broken is not None:
            raise SessionError(
                f"session {session.session_id!r} is unusable because {session.broken}; "
                "open a new session and replay the tokens"
            )
