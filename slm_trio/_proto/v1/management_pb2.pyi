from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_UNLOADING: ModelState
MODEL_STATE_FAILED: ModelState

class SplitPoints(_message.Message):
    __slots__ = ("s1", "s2")
    S1_FIELD_NUMBER: _ClassVar[int]
    S2_FIELD_NUMBER: _ClassVar[int]
    s1: int
    s2: int
    def __init__(self, s1: _Optional[int] = ..., s2: _Optional[int] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("model_id", "model_path", "model_format", "model_type", "config_path", "part", "layers", "device", "dtype", "attn_implementation", "load_timeout")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ATTN_IMPLEMENTATION_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_path: str
    model_format: str
    model_type: str
    config_path: str
    part: str
    layers: SplitPoints
    device: str
    dtype: str
    attn_implementation: str
    load_timeout: float
    def __init__(self, model_id: _Optional[str] = ..., model_path: _Optional[str] = ..., model_format: _Optional[str] = ..., model_type: _Optional[str] = ..., config_path: _Optional[str] = ..., part: _Optional[str] = ..., layers: _Optional[_Union[SplitPoints, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., attn_implementation: _Optional[str] = ..., load_timeout: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "state", "reason", "progress", "part", "layers", "dtype", "device", "load_seconds", "active_requests", "seconds_in_state")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_IN_STATE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    state: ModelState
    reason: str
    progress: float
    part: str
    layers: SplitPoints
    dtype: str
    device: str
    load_seconds: float
    active_requests: int
    seconds_in_state: float
    def __init__(self, model_id: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., progress: _Optional[float] = ..., part: _Optional[str] = ..., layers: _Optional[_Union[SplitPoints, _Mapping]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., load_seconds: _Optional[float] = ..., active_requests: _Optional[int] = ..., seconds_in_state: _Optional[float] = ...) -> None: ...

class ModelFacts(_message.Message):
    __slots__ = ("model_type", "hidden_size", "num_hidden_layers", "layer_start", "layer_stop", "vocab_size", "torch_dtype")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_STOP_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TORCH_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    layer_start: int
    layer_stop: int
    vocab_size: int
    torch_dtype: str
    def __init__(self, model_type: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_hidden_layers: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_stop: _Optional[int] = ..., vocab_size: _Optional[int] = ..., torch_dtype: _Optional[str] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("config", "wait", "replace")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    config: ModelConfig
    wait: bool
    replace: bool
    def __init__(self, config: _Optional[_Union[ModelConfig, _Mapping]] = ..., wait: _Optional[bool] = ..., replace: _Optional[bool] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model", "facts", "limits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    facts: ModelFacts
    limits: ServerLimits
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., facts: _Optional[_Union[ModelFacts, _Mapping]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_request_tokens")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_request_tokens: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_request_tokens: _Optional[int] = ...) -> None: ...
