"""slm_trio: split learning and split inference of transformer language models on trio.

The public names are importable from here. The model manager, the servers,
the client and the split engine are imported on first use, so that
``import slm_trio`` for configs and errors does not import torch or grpclib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.errors import (
    CheckpointError,
    ConfigError,
    DeadlineExceededError,
    InvalidTensorError,
    ModelCapacityError,
    ModelConflictError,
    ModelLoadError,
    ModelLoadingError,
    ModelNotFoundError,
    ServerUnavailableError,
    SessionError,
    SlmTrioError,
    UnsupportedArchitectureError,
)

if TYPE_CHECKING:
    from slm_trio.client import SplitClient, open_management_client, open_split_client
    from slm_trio.loading import load_model, load_tokenizer
    from slm_trio.manager import AsyncModelManager, ModelInfo, ModelState
    from slm_trio.server import (
        AsyncGRPCComputeServer,
        AsyncManagedServer,
        AsyncModelComputeFunction,
    )
    from slm_trio.split import ModelPart, SplitModel, split_model

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "AsyncModelManager": "slm_trio.manager",
    "ModelInfo": "slm_trio.manager",
    "ModelState": "slm_trio.manager",
    "AsyncManagedServer": "slm_trio.server",
    "AsyncGRPCComputeServer": "slm_trio.server",
    "AsyncModelComputeFunction": "slm_trio.server",
    "SplitClient": "slm_trio.client",
    "open_split_client": "slm_trio.client",
    "open_management_client": "slm_trio.client",
    "load_model": "slm_trio.loading",
    "load_tokenizer": "slm_trio.loading",
    "ModelPart": "slm_trio.split",
    "SplitModel": "slm_trio.split",
    "split_model": "slm_trio.split",
}

__all__ = [
    "AsyncGRPCComputeServer",
    "AsyncManagedServer",
    "AsyncModelComputeFunction",
    "AsyncModelManager",
    "CheckpointError",
    "ConfigError",
    "DeadlineExceededError",
    "InvalidTensorError",
    "ModelCapacityError",
    "ModelConfig",
    "ModelConflictError",
    "ModelInfo",
    "ModelLoadError",
    "ModelLoadingError",
    "ModelNotFoundError",
    "ModelPart",
    "ModelState",
    "ServerConfig",
    "ServerUnavailableError",
    "SessionError",
    "SlmTrioError",
    "SplitClient",
    "SplitModel",
    "UnsupportedArchitectureError",
    "__version__",
    "load_model",
    "load_tokenizer",
    "open_management_client",
    "open_split_client",
    "split_model",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slm_trio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
