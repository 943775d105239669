"""slm_trio: split learning and split inference of transformer language models on trio."""

from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.errors import (
    ConfigError,
    ModelCapacityError,
    ModelConflictError,
    ModelLoadError,
    ModelLoadingError,
    ModelNotFoundError,
    SlmTrioError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ModelCapacityError",
    "ModelConfig",
    "ModelConflictError",
    "ModelLoadError",
    "ModelLoadingError",
    "ModelNotFoundError",
    "ServerConfig",
    "SlmTrioError",
    "__version__",
]
