from slm_trio._proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServerTiming(_message.Message):
    __slots__ = ("queue_seconds", "compute_seconds", "total_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    compute_seconds: float
    total_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "hidden_states", "position_ids", "attention_mask", "expected_layers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    hidden_states: _tensor_pb2.Tensor
    position_ids: _tensor_pb2.Tensor
    attention_mask: _tensor_pb2.Tensor
    expected_layers: LayerRange
    def __init__(self, model_id: _Optional[str] = ..., hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expected_layers: _Optional[_Union[LayerRange, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states", "timing")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    hidden_states: _tensor_pb2.Tensor
    timing: ServerTiming
    def __init__(self, hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("model_id", "hidden_states", "grad_output", "position_ids", "attention_mask", "expected_layers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    hidden_states: _tensor_pb2.Tensor
    grad_output: _tensor_pb2.Tensor
    position_ids: _tensor_pb2.Tensor
    attention_mask: _tensor_pb2.Tensor
    expected_layers: LayerRange
    def __init__(self, model_id: _Optional[str] = ..., hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expected_layers: _Optional[_Union[LayerRange, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_input", "timing")
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    grad_input: _tensor_pb2.Tensor
    timing: ServerTiming
    def __init__(self, grad_input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    step: SessionStep
    close: SessionClose
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., step: _Optional[_Union[SessionStep, _Mapping]] = ..., close: _Optional[_Union[SessionClose, _Mapping]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("opened", "step_result", "closed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_RESULT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    step_result: SessionStepResult
    closed: SessionClosed
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., step_result: _Optional[_Union[SessionStepResult, _Mapping]] = ..., closed: _Optional[_Union[SessionClosed, _Mapping]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("model_id", "resume_session_id", "expected_layers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    resume_session_id: str
    expected_layers: LayerRange
    def __init__(self, model_id: _Optional[str] = ..., resume_session_id: _Optional[str] = ..., expected_layers: _Optional[_Union[LayerRange, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "ttl_seconds", "cached_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl_seconds: float
    cached_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., ttl_seconds: _Optional[float] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class SessionStep(_message.Message):
    __slots__ = ("step_index", "hidden_states", "position_ids", "attention_mask")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    hidden_states: _tensor_pb2.Tensor
    position_ids: _tensor_pb2.Tensor
    attention_mask: _tensor_pb2.Tensor
    def __init__(self, step_index: _Optional[int] = ..., hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SessionClose(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionStepResult(_message.Message):
    __slots__ = ("step_index", "hidden_states", "cached_tokens", "server_seconds")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    hidden_states: _tensor_pb2.Tensor
    cached_tokens: int
    server_seconds: float
    def __init__(self, step_index: _Optional[int] = ..., hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cached_tokens: _Optional[int] = ..., server_seconds: _Optional[float] = ...) -> None: ...

class SessionClosed(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...
