"""The exceptions slm_trio raises.

Every error the library raises on purpose derives from `SlmTrioError`. The
server maps these classes to gRPC status codes in one place
(`slm_trio.server._status`); the client maps status codes back to them.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ComputeInterruptedError",
    "ConfigError",
    "DeadlineExceededError",
    "InvalidTensorError",
    "LoadCancelledError",
    "ManagerClosedError",
    "ModelCapacityError",
    "ModelConflictError",
    "ModelLoadError",
    "ModelLoadTimeoutError",
    "ModelLoadingError",
    "ModelNotFoundError",
    "ModelSplitMismatchError",
    "ModelUnloadingError",
    "RemoteError",
    "ServerStartError",
    "ServerUnavailableError",
    "SessionBudgetError",
    "SessionError",
    "SessionStepError",
    "SlmTrioError",
    "UnsupportedArchitectureError",
    "UnsupportedRequestError",
]


class SlmTrioError(Exception):
    """Base class of every error slm_trio raises on purpose."""


class ConfigError(SlmTrioError, ValueError):
    """Raised when a `ModelConfig` or `ServerConfig` field has an invalid value."""


class ModelNotFoundError(SlmTrioError, LookupError):
    """Raised when a request names a model id that the manager does not hold."""


class ModelLoadingError(SlmTrioError):
    """Raised when a request names a model that is still loading; retry later.

    `retry_after` is a suggested wait in seconds.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelUnloadingError(SlmTrioError):
    """Raised when a request names a model that is being unloaded."""


class ModelConflictError(SlmTrioError):
    """Raised when `load_model` names a READY id with a different config."""


class ModelCapacityError(SlmTrioError):
    """Raised when a load cannot make room because every model is leased or loading."""


class ModelLoadError(SlmTrioError):
    """Raised when loading a model fails; the cause is chained as `__cause__`."""


class LoadCancelledError(SlmTrioError):
    """Raised inside a loader thread whose load was cancelled, to stop it early."""


class ManagerClosedError(SlmTrioError):
    """Raised when a manager that has been shut down is used."""


class CheckpointError(ModelLoadError):
    """Raised when a checkpoint is missing tensors, has unexpected ones, or is unsafe."""


class UnsupportedArchitectureError(ModelLoadError):
    """Raised when a checkpoint's `model_type` has no split adapter."""


class InvalidTensorError(SlmTrioError, ValueError):
    """Raised when a tensor on the wire or in a request is malformed."""


class SessionError(SlmTrioError, LookupError):
    """Raised when a generation session id is unknown, closed or expired."""


class SessionBudgetError(SlmTrioError):
    """Raised when opening or growing a session would exceed the server's cached-token budget."""


class RemoteError(SlmTrioError):
    """Raised by the client for a server error that maps to no more specific class.

    `code` is the gRPC status name, for example ``"INTERNAL"``.
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class ModelLoadTimeoutError(ModelLoadError, TimeoutError):
    """Raised when a load takes longer than its `load_timeout`."""


class UnsupportedRequestError(SlmTrioError):
    """Raised when a request needs something the model cannot do.

    For example a generation session on a model without a KV cache, or hidden
    states sent to a bottom part, which takes token ids.
    """


class ServerUnavailableError(SlmTrioError, ConnectionError):
    """Raised by a client when the server cannot be reached or the connection breaks mid-call.

    The connection was refused, reset or closed, so the request may or may not have run.
    Retrying later may succeed.
    """


class ModelSplitMismatchError(SlmTrioError):
    """Raised when a request was built for other split points than the model now holds.

    The model was reloaded with other layers since the client described it, so the
    client's own bottom and top parts no longer fit around it. Open a new client.
    """


class ComputeInterruptedError(SlmTrioError):
    """Raised inside a forward pass that stopped between layers because its request was cancelled.

    `ModelPart.forward` raises it when its ``should_stop`` callback returns true. The
    server uses this to free a compute worker soon after a client's deadline passes.
    """


class ServerStartError(SlmTrioError, OSError):
    """Raised when a server cannot listen on its gRPC or metrics address.

    The host is not a local address, or another process already uses the port.
    """


def listen_error(listener: str, host: str, port: int, error: OSError) -> ServerStartError:
    """Build the `ServerStartError` for a failed bind of ``listener``, "gRPC" or "metrics"."""
    reason = error.strerror or str(error) or type(error).__name__
    return ServerStartError(
        f"could not listen for {listener} on {host}:{port}: {reason}. Use a local address such as "
        "127.0.0.1 or 0.0.0.0, and a port that no other process uses (0 picks a free one)"
    )


class DeadlineExceededError(SlmTrioError, TimeoutError):
    """Raised by a client when a call's timeout or an overall deadline expires."""


class SessionStepError(SessionError):
    """Raised when a session step arrives out of order or while the previous one runs."""
