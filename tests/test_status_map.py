"""Tests of the exception <-> gRPC status mapping."""

from __future__ import annotations

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from slm_trio import errors
from slm_trio._status_map import (
    ERROR_TYPE_KEY,
    RETRY_AFTER_KEY,
    status_for_error,
    status_to_exception,
)
from slm_trio.errors import (
    CheckpointError,
    ConfigError,
    InvalidTensorError,
    ModelCapacityError,
    ModelConflictError,
    ModelLoadError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelUnloadingError,
    RemoteError,
    SessionBudgetError,
    SessionError,
    SlmTrioError,
    UnsupportedArchitectureError,
)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ModelNotFoundError("model 'm' not found"), Status.NOT_FOUND),
        (SessionError("session 's' expired"), Status.NOT_FOUND),
        (ModelLoadingError("model 'm' is loading"), Status.UNAVAILABLE),
        (ModelUnloadingError("model 'm' is unloading"), Status.FAILED_PRECONDITION),
        (InvalidTensorError("hidden_states is invalid"), Status.INVALID_ARGUMENT),
        (ConfigError("part='x' is invalid"), Status.INVALID_ARGUMENT),
        (ModelCapacityError("no room"), Status.RESOURCE_EXHAUSTED),
        (SessionBudgetError("no tokens left"), Status.RESOURCE_EXHAUSTED),
        (ModelConflictError("other config"), Status.ALREADY_EXISTS),
        (ModelLoadError("load failed"), Status.FAILED_PRECONDITION),
        (CheckpointError("missing tensors"), Status.FAILED_PRECONDITION),
        (UnsupportedArchitectureError("bert"), Status.FAILED_PRECONDITION),
    ],
)
def test_status_for_error(error: SlmTrioError, status: Status) -> None:
    reply = status_for_error(error)
    assert reply is not None
    assert reply.status == status
    assert reply.message.startswith(str(error))
    assert reply.metadata[ERROR_TYPE_KEY] == type(error).__name__


def test_every_error_class_mapped() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if cls in (SlmTrioError, RemoteError) or not issubclass(cls, SlmTrioError):
            continue
        reply = status_for_error(cls("message"))
        assert reply is not None, name


def test_loading_retry_hint() -> None:
    reply = status_for_error(ModelLoadingError("model 'm' is loading", retry_after=2.5))
    assert reply is not None
    assert reply.metadata[RETRY_AFTER_KEY] == "2500"
    assert reply.message == "model 'm' is loading (retry after 2500 ms)"


@pytest.mark.parametrize("retry_after", [float("nan"), float("inf"), -1.0])
def test_loading_retry_hint_invalid(retry_after: float) -> None:
    reply = status_for_error(ModelLoadingError("loading", retry_after=retry_after))
    assert reply is not None
    assert reply.metadata[RETRY_AFTER_KEY] == "1000"


def test_unmapped_errors() -> None:
    assert status_for_error(RuntimeError("secret detail")) is None
    assert status_for_error(SlmTrioError("base class")) is None
    assert status_for_error(RemoteError("from a server", code="INTERNAL")) is None


@pytest.mark.parametrize(
    "error",
    [
        ModelNotFoundError("model 'm' not found"),
        SessionError("session 's' expired"),
        InvalidTensorError("bad tensor"),
        ModelConflictError("other config"),
        CheckpointError("missing tensors"),
        ModelCapacityError("no room"),
    ],
)
def test_roundtrip_class(error: SlmTrioError) -> None:
    reply = status_for_error(error)
    assert reply is not None
    rebuilt = status_to_exception(GRPCError(reply.status, reply.message), reply.metadata)
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)


def test_roundtrip_loading() -> None:
    reply = status_for_error(ModelLoadingError("loading", retry_after=0.25))
    assert reply is not None
    rebuilt = status_to_exception(GRPCError(reply.status, reply.message), reply.metadata)
    assert isinstance(rebuilt, ModelLoadingError)
    assert rebuilt.retry_after == 0.25


def test_to_exception_without_metadata() -> None:
    rebuilt = status_to_exception(GRPCError(Status.UNAVAILABLE, "connection lost"))
    assert isinstance(rebuilt, RemoteError)
    assert rebuilt.code == "UNAVAILABLE"
    assert str(rebuilt) == "connection lost"


def test_to_exception_without_message() -> None:
    rebuilt = status_to_exception(GRPCError(Status.INTERNAL))
    assert isinstance(rebuilt, RemoteError)
    assert str(rebuilt) == "the server returned INTERNAL without a message"


@pytest.mark.parametrize("name", ["RemoteError", "ValueError", "SystemExit", "__class__", ""])
def test_to_exception_unknown_name(name: str) -> None:
    rebuilt = status_to_exception(GRPCError(Status.INTERNAL, "boom"), {ERROR_TYPE_KEY: name})
    assert type(rebuilt) is RemoteError
    assert rebuilt.code == "INTERNAL"


@pytest.mark.parametrize("value", ["soon", "-5", ""])
def test_to_exception_invalid_retry(value: str) -> None:
    metadata = {ERROR_TYPE_KEY: "ModelLoadingError", RETRY_AFTER_KEY: value}
    rebuilt = status_to_exception(GRPCError(Status.UNAVAILABLE, "loading"), metadata)
    assert isinstance(rebuilt, ModelLoadingError)
    assert rebuilt.retry_after == 1.0


def test_long_status_message_truncated() -> None:
    from slm_trio._status_map import MAX_STATUS_MESSAGE_CHARS, truncate_status_message

    short = "model 'a' is not loaded"
    assert truncate_status_message(short) == short
    long = truncate_status_message("x" * 500_000)
    assert len(long) == MAX_STATUS_MESSAGE_CHARS
    assert long.endswith(" ... (message truncated)")
