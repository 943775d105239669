"""Tensor codec and message converters of the slm_trio.v1 wire contract.

A tensor travels as a `Tensor` message: a dtype code, a shape and the elements
as raw little-endian bytes in row-major order. `decode_tensor` validates the
dtype, rank, dimensions, element count and byte length with Python integers
before it allocates anything, then wraps the received bytes without copying
them. Every function here is synchronous and cheap apart from the one copy that
`encode_tensor` makes, so handlers call them on the event loop thread.

The converters turn `ModelConfig` into its message and back, and a manager's
model entry into a `ModelInfo` message. The generated message classes live in
`slm_trio._proto.v1`; callers outside the server and client should not need them.
"""

from __future__ import annotations

import enum
import math
import sys
import warnings
from typing import Any, Protocol

import torch

from slm_trio._proto.v1 import management_pb2, tensor_pb2
from slm_trio.config import ModelConfig
from slm_trio.errors import InvalidTensorError

__all__ = [
    "DEFAULT_MAX_RANK",
    "ModelInfoLike",
    "decode_optional_tensor",
    "decode_tensor",
    "encode_tensor",
    "model_config_from_proto",
    "model_config_to_proto",
    "model_info_to_proto",
]

DEFAULT_MAX_RANK = 8

_DTYPE_CODES: tuple[tuple[tensor_pb2.DType, torch.dtype], ...] = (
    (tensor_pb2.DTYPE_FLOAT32, torch.float32),
    (tensor_pb2.DTYPE_FLOAT16, torch.float16),
    (tensor_pb2.DTYPE_BFLOAT16, torch.bfloat16),
    (tensor_pb2.DTYPE_INT64, torch.int64),
    (tensor_pb2.DTYPE_INT32, torch.int32),
    (tensor_pb2.DTYPE_BOOL, torch.bool),
)
_DTYPE_FROM_CODE: dict[int, torch.dtype] = dict(_DTYPE_CODES)
_CODE_FROM_DTYPE: dict[torch.dtype, tensor_pb2.DType] = {
    dtype: code for code, dtype in _DTYPE_CODES
}
_SUPPORTED_DTYPES = ", ".join(str(dtype) for dtype in _CODE_FROM_DTYPE)

# The wire format is little-endian. A big-endian host swaps the bytes of every
# element on encode and decode, which costs one extra copy each way.
_HOST_IS_BIG_ENDIAN = sys.byteorder == "big"


def encode_tensor(tensor: torch.Tensor, *, name: str = "tensor") -> tensor_pb2.Tensor:
    """Encode a tensor as a `Tensor` message.

    The tensor is detached, moved to the CPU and made contiguous first, so tensors
    that require grad, live on an accelerator, or are views with strides work.
    The data is copied once into the message's bytes.

    Raises:
        InvalidTensorError: if the dtype has no wire code; ``name`` names the tensor.

    NOTE: the copy from an accelerator is covered by a test that runs only where
    CUDA is available, and no such machine has run it yet.
    """
    code = _CODE_FROM_DTYPE.get(tensor.dtype)
    if code is None:
        raise InvalidTensorError(
            f"{name} has dtype {tensor.dtype}, which the wire format does not support; "
            f"convert it to one of {_SUPPORTED_DTYPES} first"
        )
    host = tensor.detach().to("cpu").contiguous()
    # [numel * itemsize] bytes of the elements in row-major order.
    raw = host.reshape(-1).view(torch.uint8)
    if _HOST_IS_BIG_ENDIAN:
        raw = _swap_element_bytes(raw, host.element_size())
    return tensor_pb2.Tensor(dtype=code, shape=list(host.shape), data=raw.numpy().tobytes())


def decode_tensor(
    message: tensor_pb2.Tensor,
    *,
    max_elements: int,
    max_rank: int = DEFAULT_MAX_RANK,
    name: str,
) -> torch.Tensor:
    """Validate a `Tensor` message and return it as a CPU tensor.

    The result shares memory with the message's bytes, so treat it as read-only
    and clone it before any in-place operation. Operations that create new tensors
    are safe, and so is ``requires_grad_()`` for a backward pass, because autograd
    does not write to its inputs.

    Args:
        message: The received message.
        max_elements: The maximum number of elements accepted.
        max_rank: The maximum number of dimensions accepted.
        name: The request field, for example ``"hidden_states"``; errors name it.

    Raises:
        InvalidTensorError: if the dtype is unknown, a dimension is negative, the
            rank or element count is over its maximum, the byte length does not
            match the shape, or a bool element is neither 0 nor 1.
    """
    dtype = _decode_dtype(message.dtype, name)
    shape = list(message.shape)
    numel = _checked_numel(shape, max_elements=max_elements, max_rank=max_rank, name=name)

    # Each access to a bytes field returns a new copy, so read it once.
    data = message.data
    expected_bytes = numel * dtype.itemsize
    if len(data) != expected_bytes:
        raise InvalidTensorError(
            f"{name}.data has {len(data)} bytes; shape {shape} of {dtype} needs "
            f"{expected_bytes} bytes ({numel} elements of {dtype.itemsize} bytes)"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)

    flat = _wrap_bytes(data, dtype)  # [numel]
    if _HOST_IS_BIG_ENDIAN:
        raw = _swap_element_bytes(flat.view(torch.uint8), dtype.itemsize)
        flat = raw.view(dtype)
    if dtype == torch.bool:
        _check_bool_values(flat, name)
    return flat.view(shape)


def decode_optional_tensor(
    parent: Any,
    field: str,
    *,
    max_elements: int,
    max_rank: int = DEFAULT_MAX_RANK,
) -> torch.Tensor | None:
    """Decode the `Tensor` field ``field`` of ``parent``, or return None if it is not set.

    Raises:
        InvalidTensorError: as `decode_tensor`, naming ``field``.
    """
    if not parent.HasField(field):
        return None
    return decode_tensor(
        getattr(parent, field), max_elements=max_elements, max_rank=max_rank, name=field
    )


def _decode_dtype(code: int, name: str) -> torch.dtype:
    dtype = _DTYPE_FROM_CODE.get(code)
    if dtype is not None:
        return dtype
    expected = ", ".join(tensor_pb2.DType.Name(c) for c in _DTYPE_FROM_CODE)
    if code == tensor_pb2.DTYPE_UNSPECIFIED:
        raise InvalidTensorError(
            f"{name}.dtype is DTYPE_UNSPECIFIED (is {name} missing?); expected one of {expected}"
        )
    raise InvalidTensorError(f"{name}.dtype={code!r} is unknown; expected one of {expected}")


def _checked_numel(shape: list[int], *, max_elements: int, max_rank: int, name: str) -> int:
    if len(shape) > max_rank:
        # The shape is not quoted: a hostile one may have millions of dimensions.
        raise InvalidTensorError(
            f"{name}.shape has {len(shape)} dimensions (starting {shape[: max_rank + 1]!r}); "
            f"the maximum is {max_rank}"
        )
    for dim in shape:
        if dim < 0:
            raise InvalidTensorError(
                f"{name}.shape={shape!r} has a negative dimension; every size must be >= 0"
            )
    # Python integers cannot overflow, and the rank is bounded, so the product is exact.
    numel = math.prod(shape)
    if numel > max_elements:
        raise InvalidTensorError(
            f"{name}.shape={shape!r} has {numel} elements; the maximum is {max_elements} "
            "per tensor, so split the batch into smaller requests"
        )
    return numel


def _wrap_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    # torch.frombuffer warns that `bytes` is not writable and that writing through
    # the tensor is undefined. The codec never writes to it and `decode_tensor`
    # documents the result as read-only, which avoids copying every payload.
    # NOTE: warnings.catch_warnings swaps process-wide state and is not thread-safe
    # before Python 3.14, so call this on the event loop thread only.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given buffer is not writable", category=UserWarning
        )
        return torch.frombuffer(data, dtype=dtype)


def _swap_element_bytes(raw: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Reverse the byte order of each ``itemsize``-byte element of a flat uint8 tensor."""
    if itemsize == 1:
        return raw
    # [numel, itemsize] -> reversed bytes within each element -> [numel * itemsize]
    return raw.view(-1, itemsize).flip(1).reshape(-1)


def _check_bool_values(flat: torch.Tensor, name: str) -> None:
    raw = flat.view(torch.uint8)
    if bool((raw > 1).any()):
        index = int((raw > 1).nonzero()[0, 0])
        raise InvalidTensorError(
            f"{name}.data has byte {int(raw[index])!r} at element {index} of a bool tensor; "
            "bool elements must be 0 or 1"
        )


def model_config_to_proto(config: ModelConfig) -> management_pb2.ModelConfig:
    """Convert a `ModelConfig` into its wire message."""
    message = management_pb2.ModelConfig(
        model_id=config.model_id,
        model_path=config.model_path,
        model_format=config.model_format,
        part=config.part,
        device=config.device,
        dtype=config.dtype,
        attn_implementation=config.attn_implementation,
    )
    if config.model_type is not None:
        message.model_type = config.model_type
    if config.config_path is not None:
        message.config_path = config.config_path
    if config.layers is not None:
        message.layers.s1, message.layers.s2 = config.layers
    if config.load_timeout is not None:
        message.load_timeout = config.load_timeout
    return message


def model_config_from_proto(message: management_pb2.ModelConfig) -> ModelConfig:
    """Build a `ModelConfig` from its wire message.

    An empty string selects the field's default and an unset optional field
    becomes None.

    Raises:
        ConfigError: if a field is invalid, naming the field and the value.
    """
    values: dict[str, Any] = {"model_id": message.model_id, "model_path": message.model_path}
    for field in ("model_format", "part", "device", "dtype", "attn_implementation"):
        text = getattr(message, field)
        if text:
            values[field] = text
    for field in ("model_type", "config_path", "load_timeout"):
        if message.HasField(field):
            values[field] = getattr(message, field)
    if message.HasField("layers"):
        values["layers"] = (message.layers.s1, message.layers.s2)
    return ModelConfig(**values)


class ModelInfoLike(Protocol):
    """The fields of a manager's model entry that `model_info_to_proto` reads.

    `slm_trio.manager.ModelInfo` has them; times are monotonic seconds.
    """

    @property
    def model_id(self) -> str: ...
    @property
    def state(self) -> enum.Enum: ...
    @property
    def config(self) -> ModelConfig | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def progress(self) -> float | None: ...
    @property
    def updated_at(self) -> float: ...
    @property
    def load_seconds(self) -> float | None: ...
    @property
    def active_leases(self) -> int: ...


def model_info_to_proto(info: ModelInfoLike, *, now: float) -> management_pb2.ModelInfo:
    """Convert a manager's model entry into a `ModelInfo` message.

    Args:
        info: The entry, for example a `slm_trio.manager.ModelInfo`.
        now: The current time on the clock of ``info.updated_at`` (the manager
            uses ``anyio.current_time()``), to compute ``seconds_in_state``.

    Raises:
        ValueError: if ``info.state`` has a name that the wire enum lacks.
    """
    state = management_pb2.ModelState.Value(f"MODEL_STATE_{info.state.name}")
    message = management_pb2.ModelInfo(
        model_id=info.model_id,
        state=state,
        active_requests=info.active_leases,
        seconds_in_state=max(0.0, now - info.updated_at),
    )
    if info.reason is not None:
        message.reason = info.reason
    if info.progress is not None:
        message.progress = info.progress
    if info.load_seconds is not None:
        message.load_seconds = info.load_seconds
    config = info.config
    if config is not None:
        message.part = config.part
        message.dtype = config.dtype
        message.device = config.device
        if config.layers is not None:
            message.layers.s1, message.layers.s2 = config.layers
    return message
