"""The gRPC server of slm_trio: hosting, services and the exception-to-status mapping.

`AsyncManagedServer` hosts several models behind a model manager;
`AsyncGRPCComputeServer` serves one model wrapped in an
`AsyncModelComputeFunction`.
"""

from slm_trio.server._server import (
    AsyncGRPCComputeServer,
    AsyncManagedServer,
    AsyncModelComputeFunction,
)

__all__ = ["AsyncGRPCComputeServer", "AsyncManagedServer", "AsyncModelComputeFunction"]
