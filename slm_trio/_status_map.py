"""The mapping between slm_trio exceptions and gRPC status codes, in both directions.

The server turns an exception it raised on purpose into a status code, a message
and trailing metadata with `status_for_error`. The client turns them back into
the same exception class with `status_to_exception`. Two trailing metadata keys
carry what a status code cannot:

- ``slm-error``: the exception class name, because one code covers several
  classes (NOT_FOUND is both `ModelNotFoundError` and `SessionError`);
- ``retry-after-ms``: the suggested wait before retrying a model that is loading.

Only classes exported by `slm_trio.errors` are ever rebuilt from a name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from slm_trio import errors
from slm_trio.errors import (
    ComputeInterruptedError,
    ConfigError,
    DeadlineExceededError,
    InvalidTensorError,
    LoadCancelledError,
    ManagerClosedError,
    ModelCapacityError,
    ModelConflictError,
    ModelLoadError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelSplitMismatchError,
    ModelUnloadingError,
    RemoteError,
    ServerStartError,
    ServerUnavailableError,
    SessionBudgetError,
    SessionError,
    SessionStepError,
    SlmTrioError,
    UnsupportedRequestError,
)

__all__ = [
    "ERROR_TYPE_KEY",
    "MAX_STATUS_MESSAGE_CHARS",
    "RETRY_AFTER_KEY",
    "ErrorStatus",
    "status_for_error",
    "status_to_exception",
    "truncate_status_message",
]

ERROR_TYPE_KEY = "slm-error"
RETRY_AFTER_KEY = "retry-after-ms"

# The maximum length of a status message sent, in characters. Messages quote request
# values such as model ids, and a status message travels in an HTTP/2 header
# that h2 encodes in pure Python on the event loop: a 500 KB header stalled a
# server for 10 s and broke the connection.
MAX_STATUS_MESSAGE_CHARS = 1024

# The most specific class in an exception's MRO wins, so subclasses such as
# CheckpointError inherit their parent's code unless they are listed here.
_STATUS_BY_CLASS: dict[type, Status] = {
    ModelNotFoundError: Status.NOT_FOUND,
    SessionError: Status.NOT_FOUND,
    # The session exists, but the step does not follow the previous one.
    SessionStepError: Status.FAILED_PRECONDITION,
    ModelLoadingError: Status.UNAVAILABLE,
    # Only a new load makes the id usable again, so retrying as for UNAVAILABLE would
    # only repeat the error until the model is gone (then NOT_FOUND).
    ModelUnloadingError: Status.FAILED_PRECONDITION,
    # The server is shutting down, so another server (or a later retry) can succeed.
    ManagerClosedError: Status.UNAVAILABLE,
    LoadCancelledError: Status.UNAVAILABLE,
    InvalidTensorError: Status.INVALID_ARGUMENT,
    ConfigError: Status.INVALID_ARGUMENT,
    ModelCapacityError: Status.RESOURCE_EXHAUSTED,
    SessionBudgetError: Status.RESOURCE_EXHAUSTED,
    # The id exists with another config; unload it first or pick another id.
    ModelConflictError: Status.ALREADY_EXISTS,
    # A load failed because of the model's files or config (missing tensors, an
    # unsupported architecture, a timeout). Retrying the same load fails the same way.
    ModelLoadError: Status.FAILED_PRECONDITION,
    # Client-side errors, mapped so that a proxy or a test server can send them on.
    ServerUnavailableError: Status.UNAVAILABLE,
    # Raised only in a worker thread whose request is already cancelled.
    ComputeInterruptedError: Status.CANCELLED,
    # Raised only while a server starts, so it is never sent to a client.
    ServerStartError: Status.UNAVAILABLE,
    DeadlineExceededError: Status.DEADLINE_EXCEEDED,
    # The model was reloaded with other layers; the client must describe it again.
    ModelSplitMismatchError: Status.FAILED_PRECONDITION,
    # The model exists but cannot serve this kind of request.
    UnsupportedRequestError: Status.FAILED_PRECONDITION,
}

_CLASSES_BY_NAME: dict[str, type[SlmTrioError]] = {
    name: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type)
    and issubclass(cls, SlmTrioError)
    and cls is not RemoteError
}


@dataclass(frozen=True, kw_only=True)
class ErrorStatus:
    """A gRPC status, message and trailing metadata that represent one exception."""

    status: Status
    message: str
    metadata: dict[str, str] = field(default_factory=dict)


def status_for_error(exc: BaseException) -> ErrorStatus | None:
    """Return the status that represents ``exc``, or None if it has no mapping.

    Only `SlmTrioError` subclasses listed in the mapping have one; their messages
    are written for callers, so they are sent as they are. For anything else the
    server must send a generic INTERNAL error and keep the detail in its log.
    """
    if not isinstance(exc, SlmTrioError):
        return None
    for cls in type(exc).__mro__:
        status = _STATUS_BY_CLASS.get(cls)
        if status is not None:
            break
    else:
        return None

    metadata = {ERROR_TYPE_KEY: type(exc).__name__}
    message = str(exc)
    if isinstance(exc, ModelLoadingError):
        retry_ms = _retry_after_ms(exc.retry_after)
        metadata[RETRY_AFTER_KEY] = str(retry_ms)
        message = f"{message} (retry after {retry_ms} ms)"
    return ErrorStatus(status=status, message=message, metadata=metadata)


def truncate_status_message(message: str) -> str:
    """Shorten ``message`` to `MAX_STATUS_MESSAGE_CHARS`, marking the cut."""
    if len(message) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    marker = " ... (message truncated)"
    return message[: MAX_STATUS_MESSAGE_CHARS - len(marker)] + marker


def _retry_after_ms(seconds: float) -> int:
    if not math.isfinite(seconds) or seconds < 0:
        return 1000
    return max(1, math.ceil(seconds * 1000))


def status_to_exception(
    error: GRPCError, trailing_metadata: Mapping[str, str] | None = None
) -> SlmTrioError:
    """Rebuild the exception that a server's status represents.

    Args:
        error: The error the grpclib client raised.
        trailing_metadata: The call's trailing metadata (grpclib's
            ``stream.trailing_metadata``), if the caller has it.

    Returns:
        The class named by the ``slm-error`` key when it is one of slm_trio's, or
        a `RemoteError` whose ``code`` is the status name. Raise it ``from error``.
    """
    message = error.message or f"the server returned {error.status.name} without a message"
    metadata = trailing_metadata or {}
    cls = _CLASSES_BY_NAME.get(str(metadata.get(ERROR_TYPE_KEY, "")))
    if cls is None:
        return RemoteError(message, code=error.status.name)
    if issubclass(cls, ModelLoadingError):
        return cls(message, retry_after=_retry_after_seconds(metadata.get(RETRY_AFTER_KEY)))
    try:
        return cls(message)
    except TypeError:
        # A class whose constructor needs more than a message cannot be rebuilt.
        return RemoteError(message, code=error.status.name)


def _retry_after_seconds(value: object) -> float:
    try:
        milliseconds = int(str(value))
    except ValueError:
        return 1.0
    if milliseconds < 0:
        return 1.0
    return milliseconds / 1000
