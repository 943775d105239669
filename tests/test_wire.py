"""Tests of the tensor codec and the message converters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import pytest
import torch

from slm_trio import wire
from slm_trio._proto.v1 import compute_pb2, management_pb2, tensor_pb2
from slm_trio.config import ModelConfig
from slm_trio.errors import ConfigError, InvalidTensorError
from slm_trio.wire import (
    decode_optional_tensor,
    decode_tensor,
    encode_tensor,
    model_config_from_proto,
    model_config_to_proto,
    model_info_to_proto,
)

MAX = 1 << 20


def _random(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype in (torch.int64, torch.int32):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, dtype=dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def _roundtrip(tensor: torch.Tensor) -> torch.Tensor:
    message = tensor_pb2.Tensor.FromString(encode_tensor(tensor).SerializeToString())
    return decode_tensor(message, max_elements=MAX, name="hidden_states")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]
)
def test_roundtrip_exact(dtype: torch.dtype) -> None:
    tensor = _random(dtype, (2, 3, 5))  # [batch, seq, hidden]
    decoded = _roundtrip(tensor)
    assert decoded.dtype == dtype
    assert decoded.shape == (2, 3, 5)
    assert torch.equal(decoded, tensor)


def test_roundtrip_special_floats() -> None:
    tensor = torch.tensor([float("inf"), float("-inf"), -0.0, 1e-45, 3.4e38])
    decoded = _roundtrip(tensor)
    assert torch.equal(decoded, tensor)
    assert torch.signbit(decoded[2])
    assert torch.isnan(_roundtrip(torch.tensor([float("nan")])))[0]


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 4), (1,)])
def test_roundtrip_scalar_and_empty(shape: tuple[int, ...]) -> None:
    tensor = _random(torch.float32, shape)
    decoded = _roundtrip(tensor)
    assert decoded.shape == shape
    assert torch.equal(decoded, tensor)


def test_encode_little_endian() -> None:
    message = encode_tensor(torch.tensor([1, 256], dtype=torch.int32))
    assert message.dtype == tensor_pb2.DTYPE_INT32
    assert list(message.shape) == [2]
    assert message.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_encode_requires_grad() -> None:
    tensor = torch.randn(2, 4, requires_grad=True)
    decoded = _roundtrip(tensor * 2)
    assert not decoded.requires_grad
    assert torch.equal(decoded, (tensor * 2).detach())


def test_encode_non_contiguous() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    for view in (base.transpose(0, 2), base[:, ::2, 1:], base.expand(2, 2, 3, 4)):
        assert not view.is_contiguous()
        decoded = _roundtrip(view)
        assert decoded.shape == view.shape
        assert torch.equal(decoded, view)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encode_cuda_tensor() -> None:
    tensor = torch.randn(4, 6, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    view = tensor.t()  # non-contiguous, on the device, requires grad
    decoded = _roundtrip(view)
    assert decoded.device.type == "cpu"
    assert torch.equal(decoded, view.detach().cpu())


def test_encode_unsupported_dtype() -> None:
    with pytest.raises(InvalidTensorError, match=r"grad_input has dtype torch\.float64"):
        encode_tensor(torch.zeros(2, dtype=torch.float64), name="grad_input")


def test_decode_result_usable() -> None:
    tensor = torch.randn(2, 3)
    decoded = _roundtrip(tensor)
    # A leaf that requires grad must support a full backward pass.
    leaf = decoded.requires_grad_()
    (leaf * 3).sum().backward()
    assert leaf.grad is not None
    assert torch.equal(leaf.grad, torch.full((2, 3), 3.0))
    copy = decoded.detach().clone()
    copy.add_(1)
    assert torch.equal(decoded.detach(), tensor)


def _message(dtype: int, shape: list[int], data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "pattern"),
    [
        (_message(99, [1], b"\0" * 4), r"hidden_states\.dtype=99 is unknown; expected one of"),
        (_message(0, [], b""), r"hidden_states\.dtype is DTYPE_UNSPECIFIED"),
        (
            _message(tensor_pb2.DTYPE_FLOAT32, [1] * 9, b"\0" * 4),
            r"hidden_states\.shape has 9 dimensions \(starting \[1, 1, 1, 1, 1, 1, 1, 1, 1\]\); "
            r"the maximum is 8",
        ),
        (
            _message(tensor_pb2.DTYPE_FLOAT32, [2, -1], b""),
            r"hidden_states\.shape=\[2, -1\] has a negative dimension",
        ),
        (
            _message(tensor_pb2.DTYPE_FLOAT32, [1025, 1024], b""),
            r"hidden_states\.shape=\[1025, 1024\] has 1049600 elements; "
            r"the maximum is 1048576 per tensor",
        ),
        (
            # The product overflows int64; it must be rejected by count, not wrap around.
            _message(tensor_pb2.DTYPE_FLOAT32, [2**62, 2**62, 4], b""),
            r"has 85070591730234615865843651857942052864 elements",
        ),
        (
            _message(tensor_pb2.DTYPE_FLOAT32, [2, 3], b"\0" * 23),
            r"hidden_states\.data has 23 bytes; shape \[2, 3\] of torch\.float32 needs 24 bytes",
        ),
        (
            _message(tensor_pb2.DTYPE_BFLOAT16, [2, 3], b"\0" * 13),
            r"has 13 bytes; shape \[2, 3\] of torch\.bfloat16 needs 12 bytes",
        ),
        (
            _message(tensor_pb2.DTYPE_BOOL, [3], b"\x00\x01\x02"),
            r"hidden_states\.data has byte 2 at element 2 of a bool tensor",
        ),
    ],
    ids=[
        "unknown-dtype",
        "unspecified-dtype",
        "rank",
        "negative-dim",
        "too-many-elements",
        "overflowing-shape",
        "short-data",
        "long-data",
        "bool-value",
    ],
)
def test_decode_invalid(message: tensor_pb2.Tensor, pattern: str) -> None:
    with pytest.raises(InvalidTensorError, match=pattern):
        decode_tensor(message, max_elements=MAX, name="hidden_states")


def test_decode_max_rank_argument() -> None:
    message = encode_tensor(torch.zeros(1, 1, 1))
    assert decode_tensor(message, max_elements=MAX, max_rank=3, name="x").shape == (1, 1, 1)
    with pytest.raises(InvalidTensorError, match="the maximum is 2"):
        decode_tensor(message, max_elements=MAX, max_rank=2, name="x")


def test_decode_huge_rank_message_stays_short() -> None:
    message = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1] * 100_000)
    with pytest.raises(InvalidTensorError, match="100000 dimensions") as info:
        decode_tensor(message, max_elements=MAX, name="x")
    assert len(str(info.value)) < 200


def test_decode_max_elements_inclusive() -> None:
    message = encode_tensor(torch.zeros(4, 4))
    assert decode_tensor(message, max_elements=16, name="x").numel() == 16
    with pytest.raises(InvalidTensorError, match="the maximum is 15 per tensor"):
        decode_tensor(message, max_elements=15, name="x")


def test_decode_optional_field() -> None:
    request = compute_pb2.ForwardRequest(model_id="m", hidden_states=encode_tensor(torch.ones(2)))
    assert decode_optional_tensor(request, "position_ids", max_elements=MAX) is None
    hidden = decode_optional_tensor(request, "hidden_states", max_elements=MAX)
    assert hidden is not None
    assert torch.equal(hidden, torch.ones(2))
    request.attention_mask.dtype = tensor_pb2.DTYPE_INT64
    request.attention_mask.shape.append(3)
    with pytest.raises(InvalidTensorError, match=r"attention_mask\.data has 0 bytes"):
        decode_optional_tensor(request, "attention_mask", max_elements=MAX)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_big_endian_host_swaps(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    tensor = _random(dtype, (3, 2))
    little_endian = encode_tensor(tensor).data
    monkeypatch.setattr(wire, "_HOST_IS_BIG_ENDIAN", True)
    # On this little-endian machine the flag makes the codec swap, so the bytes
    # show the swap that a big-endian host applies to its native order.
    swapped = encode_tensor(tensor).data
    itemsize = dtype.itemsize
    expected = b"".join(
        little_endian[i : i + itemsize][::-1] for i in range(0, len(little_endian), itemsize)
    )
    assert swapped == expected
    decoded = decode_tensor(
        tensor_pb2.Tensor(dtype=encode_tensor(tensor).dtype, shape=[3, 2], data=swapped),
        max_elements=MAX,
        name="x",
    )
    assert torch.equal(decoded, tensor)


def _full_config() -> ModelConfig:
    return ModelConfig(
        model_id="smollm2-trunk",
        model_path="/models/smollm2.gguf",
        model_format="gguf",
        model_type="llama",
        config_path="/models/config.json",
        part="trunk",
        layers=(4, 26),
        device="cpu",
        dtype="bfloat16",
        attn_implementation="eager",
        load_timeout=90.5,
    )


def test_config_fields_match_message() -> None:
    dataclass_fields = {field.name for field in fields(ModelConfig)}
    message_fields = {field.name for field in management_pb2.ModelConfig.DESCRIPTOR.fields}
    assert dataclass_fields == message_fields


def test_config_roundtrip_full() -> None:
    config = _full_config()
    message = model_config_to_proto(config)
    wire_bytes = message.SerializeToString()
    assert model_config_from_proto(management_pb2.ModelConfig.FromString(wire_bytes)) == config


def test_config_roundtrip_defaults() -> None:
    config = ModelConfig(model_id="m", model_path="/models/m")
    message = model_config_to_proto(config)
    assert not message.HasField("layers")
    assert not message.HasField("model_type")
    assert not message.HasField("load_timeout")
    assert model_config_from_proto(message) == config


def test_config_empty_strings_default() -> None:
    message = management_pb2.ModelConfig(model_id="m", model_path="/models/m")
    config = model_config_from_proto(message)
    assert config == ModelConfig(model_id="m", model_path="/models/m")


def test_config_layers_zero() -> None:
    message = management_pb2.ModelConfig(model_id="m", model_path="/p", part="bottom")
    message.layers.s1 = 0
    message.layers.s2 = 0
    assert model_config_from_proto(message).layers == (0, 0)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"part": "middle"}, r"part='middle' is invalid"),
        ({"model_path": ""}, r"model_path='' is invalid"),
        ({"part": "trunk"}, r"layers is missing for part='trunk'"),
        ({"device": "tpu"}, r"device='tpu' is invalid"),
    ],
)
def test_config_invalid_message(changes: dict[str, str], pattern: str) -> None:
    message = management_pb2.ModelConfig(model_id="m", model_path="/p")
    for field, value in changes.items():
        setattr(message, field, value)
    with pytest.raises(ConfigError, match=pattern):
        model_config_from_proto(message)


class _State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass(frozen=True, kw_only=True)
class _Info:
    model_id: str
    state: enum.Enum
    config: ModelConfig | None
    reason: str | None = None
    progress: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    load_seconds: float | None = None
    active_leases: int = 0


def test_info_ready() -> None:
    info = _Info(
        model_id="smollm2-trunk",
        state=_State.READY,
        config=_full_config(),
        updated_at=100.0,
        load_seconds=12.5,
        active_leases=3,
    )
    message = model_info_to_proto(info, now=104.25)
    assert message.model_id == "smollm2-trunk"
    assert message.state == management_pb2.MODEL_STATE_READY
    assert message.part == "trunk"
    assert (message.layers.s1, message.layers.s2) == (4, 26)
    assert message.dtype == "bfloat16"
    assert message.device == "cpu"
    assert message.load_seconds == 12.5
    assert message.active_requests == 3
    assert message.seconds_in_state == 4.25
    assert not message.HasField("reason")
    assert not message.HasField("progress")


def test_info_failed_without_config() -> None:
    info = _Info(model_id="m", state=_State.FAILED, config=None, reason="file not found")
    message = model_info_to_proto(info, now=0.0)
    assert message.state == management_pb2.MODEL_STATE_FAILED
    assert message.reason == "file not found"
    assert message.part == ""
    assert not message.HasField("layers")
    assert not message.HasField("load_seconds")


def test_info_loading_progress() -> None:
    info = _Info(model_id="m", state=_State.LOADING, config=None, progress=0.0)
    message = model_info_to_proto(info, now=0.0)
    assert message.state == management_pb2.MODEL_STATE_LOADING
    assert message.HasField("progress")
    assert message.progress == 0.0


def test_info_states_cover_manager() -> None:
    manager = pytest.importorskip("slm_trio.manager")
    for state in manager.ModelState:
        info = _Info(model_id="m", state=state, config=None)
        message = model_info_to_proto(info, now=0.0)
        assert management_pb2.ModelState.Name(message.state) == f"MODEL_STATE_{state.name}"
