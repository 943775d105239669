"""Specification of ModelConfig and ServerConfig validation and file loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from slm_trio.config import ModelConfig, ServerConfig
from slm_trio.errors import ConfigError


def test_model_config_defaults() -> None:
    config = ModelConfig(model_id="m", model_path="/models/m")
    assert config.part == "full"
    assert config.device == "cpu"
    assert config.dtype == "float32"


def test_model_config_layers_list_becomes_tuple() -> None:
    config = ModelConfig(model_id="m", model_path="p", part="trunk", layers=[2, 5])  # type: ignore[arg-type]
    assert config.layers == (2, 5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_id", "", "model_id='' is invalid"),
        ("model_id", "bad id", "model_id='bad id' is invalid"),
        ("model_path", "", "model_path='' is invalid"),
        ("dtype", "float64", "dtype='float64' is invalid; expected one of auto, float32"),
        ("part", "middle", "part='middle' is invalid"),
        ("device", "tpu", "device='tpu' is invalid"),
        ("load_timeout", -1, "load_timeout=-1 is invalid"),
        ("attn_implementation", "flash", "attn_implementation='flash' is invalid"),
        ("model_format", "onnx", "model_format='onnx' is invalid"),
        ("model_path", "/x" * 2049, "model_path='/x/x.* is 4098 characters long; expected a path"),
        ("config_path", "c" * 5000, "config_path='ccc.* is 5000 characters long"),
        ("model_type", "llama 2", "model_type='llama 2' is invalid"),
        ("model_type", "t" * 65, "model_type='ttt.* is invalid"),
        ("model_id", "x" * 500, r"model_id='x{79}\.\.\. \(422 more characters\) is invalid"),
        ("layers", (4, 26), r"layers=\(4, 26\) is set for part='full'"),
    ],
)
def test_model_config_rejects(field: str, value: object, message: str) -> None:
    kwargs: dict[str, object] = {"model_id": "m", "model_path": "p", field: value}
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_model_config_part_needs_layers() -> None:
    with pytest.raises(ConfigError, match="layers is missing for part='trunk'"):
        ModelConfig(model_id="m", model_path="p", part="trunk")


@pytest.mark.parametrize("layers", [(3, 2), (-1, 2), (1, 2, 3), ("a", 1)])
def test_model_config_rejects_layers(layers: object) -> None:
    with pytest.raises(ConfigError, match="layers=.* is invalid"):
        ModelConfig(model_id="m", model_path="p", part="trunk", layers=layers)  # type: ignore[arg-type]


def test_model_config_from_dict_names_unknown_field() -> None:
    with pytest.raises(ConfigError, match="unknown field.*'modelpath'"):
        ModelConfig.from_dict({"model_id": "m", "modelpath": "p"})


def test_model_config_round_trips_dict() -> None:
    config = ModelConfig(model_id="m", model_path="p", part="top", layers=(1, 3))
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_server_config_defaults_to_loopback() -> None:
    config = ServerConfig()
    assert config.host == "127.0.0.1"
    assert config.address == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", 70000, "port=70000 is invalid"),
        ("port", -1, "port=-1 is invalid"),
        ("max_models", 0, "max_models=0 is invalid"),
        ("max_message_bytes", 10, "max_message_bytes=10 is too small"),
        ("max_request_bytes_in_flight", 0, "max_request_bytes_in_flight=0 is invalid"),
        ("max_request_bytes_in_flight", 1.5, r"max_request_bytes_in_flight=1\.5 is invalid"),
        ("session_ttl", 0, "session_ttl=0 is invalid"),
        ("host", "", "host='' is invalid"),
        ("max_models", True, "max_models=True is invalid"),
        ("max_request_tokens", 0, "max_request_tokens=0 is invalid"),
    ],
)
def test_server_config_rejects(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**{field: value})  # type: ignore[arg-type]


def test_server_config_rejects_duplicate_models() -> None:
    models = [{"model_id": "a", "model_path": "p"}, {"model_id": "a", "model_path": "q"}]
    with pytest.raises(ConfigError, match="duplicate model_id.*'a'"):
        ServerConfig.from_dict({"models": models})


def test_server_config_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(
        "server:\n  port: 6000\n  max_models: 2\n"
        "models:\n  - model_id: t\n    model_path: /m\n    part: trunk\n    layers: [1, 3]\n"
    )
    config = ServerConfig.from_file(path)
    assert config.port == 6000
    assert config.models[0].layers == (1, 3)


def test_server_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('port = 6001\n[[models]]\nmodel_id = "t"\nmodel_path = "/m"\n')
    config = ServerConfig.from_file(path)
    assert config.port == 6001
    assert config.models[0].model_id == "t"


def test_config_file_errors_name_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigError, match="bad.toml' is not valid TOML"):
        ServerConfig.from_file(bad)
    with pytest.raises(ConfigError, match="could not be read"):
        ServerConfig.from_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown suffix '.json'"):
        ServerConfig.from_file(tmp_path / "x.json")
