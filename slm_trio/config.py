"""Validated, immutable configuration for models and servers.

`ModelConfig` describes what to load and which part of it. `ServerConfig`
describes how a server listens and what it may spend. Both validate every field when they
are built, so a bad value fails where it is written, with an error that names
the field and shows the value. Both load from YAML or TOML files.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, TypeVar, get_args

import yaml

from slm_trio.errors import ConfigError

__all__ = ["ModelConfig", "ServerConfig", "load_config_file"]

_T = TypeVar("_T")

Part = Literal["full", "bottom", "trunk", "top"]
ModelFormat = Literal["auto", "hf", "gguf", "state_dict"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
AttnImplementation = Literal["eager", "sdpa"]

_MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_MODEL_TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Linux's PATH_MAX (4096 bytes). A longer path cannot be opened, and errors would quote it.
_MAX_PATH_CHARS = 4096


def _shorten(value: object, limit: int = 80) -> str:
    """Return ``repr(value)``, cut to about ``limit`` characters so errors stay readable."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _check_path_length(name: str, value: object) -> None:
    if isinstance(value, str) and len(value) > _MAX_PATH_CHARS:
        raise ConfigError(
            f"{name}={_shorten(value)} is {len(value)} characters long; expected a path of at "
            f"most {_MAX_PATH_CHARS} characters"
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is invalid; expected one of {', '.join(choices)}")


def _check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is invalid; expected an integer")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ConfigError(f"{name}={value!r} is invalid; expected an integer {bound}")


def _check_seconds(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is invalid; expected a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid; expected a positive number of seconds")


def _from_mapping(cls: type[_T], data: Mapping[str, Any], where: str) -> _T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of field names to values, not {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"known fields are {', '.join(sorted(known))}"
        )
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where} is invalid: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What to load, from where, and which part of the model to keep.

    Attributes:
        model_id: The name requests use for this model, for example ``"smollm2-trunk"``.
        model_path: A Hugging Face model directory, a ``.gguf`` file, or a state-dict
            checkpoint (``.pt``, ``.pth``, ``.bin``) loaded with ``weights_only=True``.
        model_format: ``"auto"`` (from the path), ``"hf"``, ``"gguf"`` or ``"state_dict"``.
        model_type: The expected transformers ``model_type`` (``"llama"``, ``"gpt2"``...);
            ``None`` accepts whatever the checkpoint declares.
        config_path: The directory or ``config.json`` that describes a state-dict
            checkpoint; defaults to the checkpoint's directory.
        part: ``"full"`` for the whole model, else ``"bottom"``, ``"trunk"`` or ``"top"``.
        layers: The split points ``(s1, s2)`` with ``0 <= s1 <= s2 <= num_hidden_layers``:
            bottom contains layers ``[0, s1)``, trunk ``[s1, s2)``, top ``[s2, N)``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"``, or ``"auto"`` (the checkpoint's).
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        load_timeout: Seconds a load may take before it fails; ``None`` for no limit.
    """

    model_id: str
    model_path: str
    model_format: ModelFormat = "auto"
    model_type: str | None = None
    config_path: str | None = None
    part: Part = "full"
    layers: tuple[int, int] | None = None
    device: str = "cpu"
    dtype: DType = "float32"
    attn_implementation: AttnImplementation = "sdpa"
    load_timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not _MODEL_ID_PATTERN.match(self.model_id):
            raise ConfigError(
                f"model_id={_shorten(self.model_id)} is invalid; use 1-128 characters from "
                "letters, digits and . _ : / -, starting with a letter or digit"
            )
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ConfigError(
                f"model_path={self.model_path!r} is invalid; expected a non-empty path"
            )
        for name in ("model_path", "config_path"):
            _check_path_length(name, getattr(self, name))
        if self.model_type is not None and (
            not isinstance(self.model_type, str) or not _MODEL_TYPE_PATTERN.match(self.model_type)
        ):
            raise ConfigError(
                f"model_type={_shorten(self.model_type)} is invalid; expected a transformers "
                "model_type such as 'llama' or 'gpt2' (letters, digits, _ and -)"
            )
        _check_choice("model_format", self.model_format, get_args(ModelFormat))
        _check_choice("part", self.part, get_args(Part))
        _check_choice("dtype", self.dtype, get_args(DType))
        _check_choice("attn_implementation", self.attn_implementation, get_args(AttnImplementation))
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ConfigError(
                f"device={self.device!r} is invalid; expected 'cpu', 'cuda', 'cuda:N' or 'mps'"
            )
        _check_seconds("load_timeout", self.load_timeout, optional=True)
        self._check_layers()

    def _check_layers(self) -> None:
        layers = self.layers
        if layers is None:
            if self.part != "full":
                raise ConfigError(
                    f"layers is missing for part={self.part!r}; give the split points as "
                    "layers=(s1, s2) with 0 <= s1 <= s2 <= num_hidden_layers"
                )
            return
        if self.part == "full":
            raise ConfigError(
                f"layers={_shorten(layers)} is set for part='full', which loads every layer; "
                "drop layers, or choose part='bottom', 'trunk' or 'top'"
            )
        if isinstance(layers, list):
            # YAML and TOML have no tuples; accept a two-element list.
            layers = tuple(layers)
            object.__setattr__(self, "layers", layers)
        if (
            not isinstance(layers, tuple)
            or len(layers) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            raise ConfigError(f"layers={self.layers!r} is invalid; expected two integers (s1, s2)")
        start, stop = layers
        if not 0 <= start <= stop:
            raise ConfigError(
                f"layers={layers!r} is invalid; expected 0 <= s1 <= s2 "
                "(the model's layer count is checked at load)"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build a config from a mapping, rejecting unknown keys by name."""
        return _from_mapping(cls, data, "model config")

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Load a config from a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file."""
        return cls.from_dict(load_config_file(path))

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as plain values (``layers`` as a list), for files and the wire."""
        data = dataclasses.asdict(self)
        if self.layers is not None:
            data["layers"] = list(self.layers)
        return data


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Server settings: the address, resource limits, and the models to load at start.

    Attributes:
        host: The address to bind; ``127.0.0.1`` by default so nothing is exposed
            by accident. Use ``0.0.0.0`` deliberately to accept remote clients.
        port: The TCP port; ``0`` picks a free one (read it back from the server).
        max_models: The maximum number of READY models; loading more evicts the
            least recently used one that no request is using.
        max_load_workers: Worker threads for model loads.
        max_compute_workers: Worker threads for forward and backward passes.
        max_message_bytes: The largest request message accepted, in bytes; larger
            ones are rejected before they are buffered.
        max_request_bytes_in_flight: The budget of request-message bytes that all
            calls together may hold at once, in bytes. A message that would exceed
            it is rejected with RESOURCE_EXHAUSTED before it is buffered, except
            when no other request is in flight, so any message up to
            ``max_message_bytes`` can still be served on its own.
        max_tensor_elements: The maximum number of elements in one tensor of a request.
        max_request_tokens: The maximum number of tokens (batch rows times new
            positions) in one Forward, Backward or session step. It bounds how long
            one request can occupy a compute worker. Requests are also limited to
            the model's context length (``max_position_embeddings``).
        session_ttl: Seconds a generation session may stay idle before it is closed.
        max_sessions: The maximum number of open generation sessions.
        max_cached_tokens: The budget of KV-cache tokens summed over all sessions.
        grace_period: Seconds in-flight requests get to finish on stop before they are cancelled.
        lease_drain_timeout: Seconds an unload waits for in-flight requests on that model.
        load_timeout: Default seconds a load may take; a model's own value wins.
        metrics_port: The port of the Prometheus endpoint; ``None`` disables it, ``0`` picks one.
        models: Models to load when the server starts.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    max_models: int = 5
    max_load_workers: int = 2
    max_compute_workers: int = 2
    max_message_bytes: int = 64 * 1024 * 1024
    max_request_bytes_in_flight: int = 256 * 1024 * 1024
    max_tensor_elements: int = 16 * 1024 * 1024
    max_request_tokens: int = 8192
    session_ttl: float = 300.0
    max_sessions: int = 64
    max_cached_tokens: int = 65536
    grace_period: float = 10.0
    lease_drain_timeout: float = 30.0
    load_timeout: float | None = 600.0
    metrics_port: int | None = None
    models: tuple[ModelConfig, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(
                f"host={self.host!r} is invalid; expected an address such as '127.0.0.1'"
            )
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if name == "metrics_port" and value is None:
                continue
            _check_positive_int(name, value, allow_zero=True)
            if value > 65535:
                raise ConfigError(f"{name}={value!r} is invalid; expected a TCP port 0-65535")
        for name in (
            "max_models",
            "max_load_workers",
            "max_compute_workers",
            "max_message_bytes",
            "max_request_bytes_in_flight",
            "max_tensor_elements",
            "max_request_tokens",
            "max_sessions",
            "max_cached_tokens",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.max_message_bytes < 1024:
            raise ConfigError(
                f"max_message_bytes={self.max_message_bytes!r} is too small; expected at least 1024"
            )
        for name in ("session_ttl", "grace_period", "lease_drain_timeout"):
            _check_seconds(name, getattr(self, name), optional=False)
        _check_seconds("load_timeout", self.load_timeout, optional=True)
        self._check_models()

    def _check_models(self) -> None:
        models = self.models
        if isinstance(models, list):
            models = tuple(models)
        converted = tuple(ModelConfig.from_dict(m) if isinstance(m, Mapping) else m for m in models)
        for i, model in enumerate(converted):
            if not isinstance(model, ModelConfig):
                raise ConfigError(f"models[{i}]={model!r} is invalid; expected a model config")
        ids = [m.model_id for m in converted]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(
                f"models has duplicate model_id(s) {', '.join(map(repr, duplicates))}"
            )
        object.__setattr__(self, "models", converted)

    @property
    def address(self) -> str:
        """The ``host:port`` string the server binds."""
        return f"{self.host}:{self.port}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build a config from a mapping, rejecting unknown keys by name."""
        return _from_mapping(cls, data, "server config")

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Load a config from a YAML or TOML file; a ``server:`` table is optional."""
        data = load_config_file(path)
        if set(data) <= {"server", "models"} and "server" in data:
            merged = dict(data["server"] or {})
            if "models" in data:
                merged["models"] = data["models"]
            data = merged
        return cls.from_dict(data)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML file into a dict, with errors that name the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(
            f"config file {str(path)!r} has an unknown suffix {suffix!r}; use .yaml, .yml or .toml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} could not be read: {exc.strerror}") from exc
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        kind = "TOML" if suffix == ".toml" else "YAML"
        raise ConfigError(f"config file {str(path)!r} is not valid {kind}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must contain a mapping at the top level")
    return data
