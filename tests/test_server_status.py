"""Tests of the handler wrapper that turns exceptions into gRPC status."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from slm_trio._status_map import ERROR_TYPE_KEY, RETRY_AFTER_KEY
from slm_trio.errors import InvalidTensorError, ModelLoadingError, ModelNotFoundError
from slm_trio.server import _status
from slm_trio.server._status import RejectionLogLimiter, handle_errors, map_errors


class FakeStream:
    """Records the trailers a handler sends instead of writing them to a connection."""

    def __init__(self, *, fail_with: Exception | None = None) -> None:
        self.trailers: list[dict[str, Any]] = []
        self._fail_with = fail_with

    async def send_trailing_metadata(self, **kwargs: Any) -> None:
        if self._fail_with is not None:
            raise self._fail_with
        self.trailers.append(kwargs)


async def _run(stream: FakeStream, error: BaseException) -> None:
    async with map_errors(stream, method="Compute.Forward"):  # type: ignore[arg-type]
        raise error


@pytest.mark.anyio
async def test_mapped_error_sent() -> None:
    stream = FakeStream()
    await _run(stream, ModelNotFoundError("model 'm' not found; load it first"))
    assert len(stream.trailers) == 1
    trailer = stream.trailers[0]
    assert trailer["status"] == Status.NOT_FOUND
    assert trailer["status_message"] == "model 'm' not found; load it first"
    assert trailer["metadata"] == {ERROR_TYPE_KEY: "ModelNotFoundError"}


@pytest.mark.anyio
async def test_loading_error_retry_metadata() -> None:
    stream = FakeStream()
    await _run(stream, ModelLoadingError("model 'm' is loading", retry_after=3))
    trailer = stream.trailers[0]
    assert trailer["status"] == Status.UNAVAILABLE
    assert trailer["metadata"][RETRY_AFTER_KEY] == "3000"
    assert "retry after 3000 ms" in trailer["status_message"]


@pytest.mark.anyio
async def test_unexpected_error_generic(caplog: pytest.LogCaptureFixture) -> None:
    stream = FakeStream()
    with caplog.at_level(logging.ERROR, logger="slm_trio.server._status"):
        await _run(stream, KeyError("/secret/path/weights.bin"))
    trailer = stream.trailers[0]
    assert trailer["status"] == Status.INTERNAL
    assert "secret" not in trailer["status_message"]
    match = re.fullmatch(
        r"internal server error \(error id ([0-9a-f]{8})\); the server log has the details",
        trailer["status_message"],
    )
    assert match is not None
    [record] = caplog.records
    assert match.group(1) in record.getMessage()
    assert "method=Compute.Forward" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], KeyError)


@pytest.mark.anyio
async def test_grpc_error_passes_through() -> None:
    stream = FakeStream()
    with pytest.raises(GRPCError) as caught:
        await _run(stream, GRPCError(Status.PERMISSION_DENIED, "no"))
    assert caught.value.status == Status.PERMISSION_DENIED
    assert stream.trailers == []


@pytest.mark.anyio
async def test_stream_terminated_passes_through() -> None:
    stream = FakeStream()
    with pytest.raises(StreamTerminatedError):
        await _run(stream, StreamTerminatedError("reset by client"))
    assert stream.trailers == []


@pytest.mark.anyio
async def test_cancellation_not_caught() -> None:
    stream = FakeStream()
    with pytest.raises(asyncio.CancelledError):
        await _run(stream, asyncio.CancelledError())
    assert stream.trailers == []


@pytest.mark.anyio
async def test_single_exception_group_unwrapped() -> None:
    stream = FakeStream()
    group = ExceptionGroup("nursery", [ExceptionGroup("inner", [InvalidTensorError("bad")])])
    await _run(stream, group)
    assert stream.trailers[0]["status"] == Status.INVALID_ARGUMENT
    assert stream.trailers[0]["status_message"] == "bad"


@pytest.mark.anyio
async def test_grouped_grpc_error_raised() -> None:
    stream = FakeStream()
    with pytest.raises(GRPCError) as caught:
        await _run(stream, ExceptionGroup("nursery", [GRPCError(Status.ABORTED, "stop")]))
    assert caught.value.status == Status.ABORTED


@pytest.mark.anyio
async def test_multi_exception_group_internal(caplog: pytest.LogCaptureFixture) -> None:
    stream = FakeStream()
    group = ExceptionGroup("nursery", [InvalidTensorError("a"), ModelNotFoundError("b")])
    with caplog.at_level(logging.ERROR, logger="slm_trio.server._status"):
        await _run(stream, group)
    assert stream.trailers[0]["status"] == Status.INTERNAL
    assert len(caplog.records) == 1


@pytest.mark.anyio
async def test_send_failure_logged(caplog: pytest.LogCaptureFixture) -> None:
    stream = FakeStream(fail_with=ProtocolError("Trailing metadata was already sent"))
    with caplog.at_level(logging.DEBUG, logger="slm_trio.server._status"):
        await _run(stream, ModelNotFoundError("gone"))
    assert any("rpc.status_not_sent" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_decorator_maps_errors(caplog: pytest.LogCaptureFixture) -> None:
    class Service:
        @handle_errors
        async def Forward(self, stream: Any) -> None:
            raise RuntimeError("boom")

    stream = FakeStream()
    with caplog.at_level(logging.ERROR, logger="slm_trio.server._status"):
        await Service().Forward(stream)
    assert stream.trailers[0]["status"] == Status.INTERNAL
    assert Service.Forward.__name__ == "Forward"
    assert "method=test_decorator_maps_errors.<locals>.Service.Forward" in (
        caplog.records[0].getMessage()
    )


@pytest.mark.anyio
async def test_no_error_sends_nothing() -> None:
    stream = FakeStream()
    async with map_errors(stream, method="m"):  # type: ignore[arg-type]
        pass
    assert stream.trailers == []


def test_rejection_log_limiter_holds_back_repeats() -> None:
    limiter = RejectionLogLimiter(10.0)
    key = ("Compute.Forward", Status.INVALID_ARGUMENT)
    other = ("Compute.Forward", Status.NOT_FOUND)

    assert limiter.allow_nowait(key, 0.0) == 0
    assert limiter.allow_nowait(key, 1.0) is None
    assert limiter.allow_nowait(key, 9.9) is None
    assert limiter.allow_nowait(other, 5.0) == 0
    assert limiter.allow_nowait(key, 10.0) == 2
    assert limiter.allow_nowait(key, 10.5) is None


@pytest.mark.anyio
async def test_rejection_logged_once_at_info(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_status, "_rejections", RejectionLogLimiter(3600.0))
    caplog.set_level(logging.DEBUG, logger="slm_trio.server._status")
    for _ in range(3):
        await _run(FakeStream(), InvalidTensorError("hidden_states has 10 bytes"))

    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1
    assert "rpc.rejected method=Compute.Forward status=INVALID_ARGUMENT held_back=0" in (
        info[0].getMessage()
    )
    assert "hidden_states has 10 bytes" in info[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2
