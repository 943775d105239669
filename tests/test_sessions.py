"""Specification of SessionStore: budget, step order, broken sessions and expiry."""

from __future__ import annotations

import math

import pytest

from slm_trio.errors import SessionBudgetError, SessionError, SessionStepError
from slm_trio.server._sessions import Session, SessionStore

MODEL = object()


def store(**kwargs: float) -> SessionStore:
    options = {"ttl": 10.0, "max_sessions": 4, "max_cached_tokens": 100, **kwargs}
    return SessionStore(
        ttl=options["ttl"],
        max_sessions=int(options["max_sessions"]),
        max_cached_tokens=int(options["max_cached_tokens"]),
    )


def test_step_reserves_and_keeps_tokens() -> None:
    sessions = store()
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.begin_step_nowait(session, 0, 30, model=MODEL, now=1.0)
    assert sessions.statistics().cached_tokens == 30
    sessions.end_step_nowait(session, 30, completed=True, cache_intact=False, now=2.0)
    assert session.next_step == 1
    assert sessions.statistics().cached_tokens == 30


def test_failed_step_returns_tokens() -> None:
    sessions = store()
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.begin_step_nowait(session, 0, 30, model=MODEL, now=1.0)
    sessions.end_step_nowait(session, 30, completed=False, cache_intact=True, now=2.0)
    assert sessions.statistics().cached_tokens == 0
    # The cache is intact, so the same step can be sent again.
    sessions.begin_step_nowait(session, 0, 10, model=MODEL, now=3.0)


def test_interrupted_step_closes_session() -> None:
    sessions = store()
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.begin_step_nowait(session, 0, 20, model=MODEL, now=0.0)
    sessions.end_step_nowait(session, 20, completed=True, cache_intact=False, now=0.0)
    sessions.begin_step_nowait(session, 1, 5, model=MODEL, now=0.0)
    sessions.end_step_nowait(session, 5, completed=False, cache_intact=False, now=0.0)
    assert sessions.statistics().sessions == 0
    assert sessions.statistics().cached_tokens == 0
    with pytest.raises(SessionError, match="closed because a step was interrupted"):
        sessions.get_nowait(session.session_id)


def test_budget_rejects_step() -> None:
    sessions = store(max_cached_tokens=50)
    first = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.begin_step_nowait(first, 0, 40, model=MODEL, now=0.0)
    second = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    with pytest.raises(SessionBudgetError, match="40 of 50 tokens are cached"):
        sessions.begin_step_nowait(second, 0, 11, model=MODEL, now=0.0)
    assert sessions.statistics().rejected_for_budget == 1


def test_max_sessions_rejects_open() -> None:
    sessions = store(max_sessions=1)
    sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    with pytest.raises(SessionBudgetError, match="1 open sessions, its maximum"):
        sessions.open_nowait("m", MODEL, cache=None, now=0.0)


def with_tokens(sessions: SessionStore, tokens: int, *, now: float) -> Session:
    """Open a session and complete one step of ``tokens`` tokens."""
    session = sessions.open_nowait("m", MODEL, cache=None, now=now)
    sessions.begin_step_nowait(session, 0, tokens, model=MODEL, now=now)
    sessions.end_step_nowait(session, tokens, completed=True, cache_intact=False, now=now)
    return session


def test_open_reclaims_oldest_detached_session() -> None:
    sessions = store(max_sessions=3)
    older = with_tokens(sessions, 5, now=0.0)
    newer = with_tokens(sessions, 5, now=1.0)
    attached = with_tokens(sessions, 5, now=0.5)
    sessions.detach_nowait(newer, now=2.0)
    sessions.detach_nowait(older, now=1.5)

    opened = sessions.open_nowait("m", MODEL, cache=None, now=3.0)

    assert sessions.statistics().sessions == 3
    assert sessions.statistics().reclaimed == 1
    assert sessions.statistics().cached_tokens == 10
    with pytest.raises(SessionError, match="session limit was reached .* reclaimed"):
        sessions.resume_nowait(older.session_id, "m", now=3.0)
    assert sessions.get_nowait(newer.session_id) is newer
    assert sessions.get_nowait(attached.session_id) is attached
    assert sessions.get_nowait(opened.session_id) is opened


def test_open_never_reclaims_attached_session() -> None:
    sessions = store(max_sessions=2)
    with_tokens(sessions, 5, now=0.0)
    with_tokens(sessions, 5, now=0.0)
    with pytest.raises(SessionBudgetError, match="every one is attached to a stream"):
        sessions.open_nowait("m", MODEL, cache=None, now=1.0)
    assert sessions.statistics().reclaimed == 0


def test_step_reclaims_detached_for_budget() -> None:
    sessions = store(max_cached_tokens=50)
    detached = with_tokens(sessions, 30, now=0.0)
    sessions.detach_nowait(detached, now=0.0)
    active = with_tokens(sessions, 10, now=0.0)

    sessions.begin_step_nowait(active, 1, 20, model=MODEL, now=1.0)

    assert sessions.statistics().cached_tokens == 30
    assert sessions.statistics().reclaimed == 1
    with pytest.raises(SessionError, match="KV-cache budget was full"):
        sessions.get_nowait(detached.session_id)


def test_step_reclaims_nothing_when_it_cannot_fit() -> None:
    sessions = store(max_cached_tokens=50)
    detached = with_tokens(sessions, 10, now=0.0)
    sessions.detach_nowait(detached, now=0.0)
    active = with_tokens(sessions, 30, now=0.0)
    with pytest.raises(SessionBudgetError, match="40 of 50 tokens are cached"):
        sessions.begin_step_nowait(active, 1, 25, model=MODEL, now=1.0)
    assert sessions.get_nowait(detached.session_id) is detached
    assert sessions.statistics().reclaimed == 0


def test_step_does_not_reclaim_own_session() -> None:
    sessions = store(max_cached_tokens=50)
    session = with_tokens(sessions, 40, now=0.0)
    sessions.detach_nowait(session, now=0.0)
    sessions.resume_nowait(session.session_id, "m", now=1.0)
    with pytest.raises(SessionBudgetError, match="40 of 50 tokens are cached"):
        sessions.begin_step_nowait(session, 1, 20, model=MODEL, now=1.0)
    assert sessions.statistics().reclaimed == 0


@pytest.mark.parametrize("index", [1, 7])
def test_step_out_of_order(index: int) -> None:
    sessions = store()
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    with pytest.raises(SessionStepError, match=f"expected step_index=0, got step_index={index}"):
        sessions.begin_step_nowait(session, index, 1, model=MODEL, now=0.0)


def test_busy_session_rejects_step() -> None:
    sessions = store()
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.begin_step_nowait(session, 0, 1, model=MODEL, now=0.0)
    with pytest.raises(SessionStepError, match="still running step 0"):
        sessions.begin_step_nowait(session, 0, 1, model=MODEL, now=0.0)


def test_reloaded_model_breaks_session() -> None:
    sessions = store()
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    with pytest.raises(SessionError, match="reloaded or unloaded"):
        sessions.begin_step_nowait(session, 0, 1, model=object(), now=0.0)


def test_resume_rules() -> None:
    sessions = store()
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.begin_step_nowait(session, 0, 3, model=MODEL, now=0.0)
    sessions.end_step_nowait(session, 3, completed=True, cache_intact=False, now=0.0)
    with pytest.raises(SessionError, match="attached to another stream"):
        sessions.resume_nowait(session.session_id, "m", now=1.0)
    sessions.detach_nowait(session, now=1.0)
    with pytest.raises(SessionError, match="belongs to model 'm', not 'other'"):
        sessions.resume_nowait(session.session_id, "other", now=1.0)
    assert sessions.resume_nowait(session.session_id, "m", now=2.0) is session


def test_detach_closes_empty_session() -> None:
    sessions = store()
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.detach_nowait(session, now=1.0)
    assert sessions.statistics().sessions == 0


def test_expiry_after_ttl() -> None:
    sessions = store(ttl=10.0)
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.begin_step_nowait(session, 0, 5, model=MODEL, now=0.0)
    sessions.end_step_nowait(session, 5, completed=True, cache_intact=False, now=0.0)
    assert sessions.next_expiry_nowait() == 10.0
    assert sessions.expire_nowait(now=10.0) == []
    assert sessions.expire_nowait(now=10.5) == [session.session_id]
    assert sessions.statistics().cached_tokens == 0
    assert sessions.statistics().expired == 1
    assert sessions.next_expiry_nowait() == math.inf
    with pytest.raises(SessionError, match="closed because it was idle for more than 10 s"):
        sessions.get_nowait(session.session_id)


def test_busy_session_never_expires() -> None:
    sessions = store(ttl=1.0)
    session = sessions.open_nowait("m", MODEL, cache=None, now=0.0)
    sessions.begin_step_nowait(session, 0, 5, model=MODEL, now=0.0)
    assert sessions.expire_nowait(now=100.0) == []


def test_close_for_model() -> None:
    sessions = store()
    sessions.open_nowait("a", MODEL, cache=None, now=0.0)
    sessions.open_nowait("a", MODEL, cache=None, now=0.0)
    sessions.open_nowait("b", MODEL, cache=None, now=0.0)
    assert sessions.close_for_model_nowait("a") == 2
    assert sessions.statistics().sessions == 1


def test_repr() -> None:
    assert repr(store()) == "<SessionStore sessions=0 cached_tokens=0/100>"
