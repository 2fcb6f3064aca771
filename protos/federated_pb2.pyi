import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelMetaData(_message.Message):
    __slots__ = ("task", "current_round", "num_rounds", "run_number", "created", "finished")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    RUN_NUMBER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    task: str
    current_round: int
    num_rounds: int
    run_number: int
    created: _timestamp_pb2.Timestamp
    finished: bool
    def __init__(self, task: _Optional[str] = ..., current_round: _Optional[int] = ..., num_rounds: _Optional[int] = ..., run_number: _Optional[int] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished: _Optional[bool] = ...) -> None: ...

class NDArray(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedArray(_message.Message):
    __slots__ = ("name", "array")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    name: str
    array: NDArray
    def __init__(self, name: _Optional[str] = ..., array: _Optional[_Union[NDArray, _Mapping]] = ...) -> None: ...

class ModelData(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[NamedArray]
    def __init__(self, params: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ...) -> None: ...

class CurrentModel(_message.Message):
    __slots__ = ("meta", "data", "meta_data", "owner")
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    META_DATA_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    meta: ModelMetaData
    data: ModelData
    meta_data: _struct_pb2.Struct
    owner: str
    def __init__(self, meta: _Optional[_Union[ModelMetaData, _Mapping]] = ..., data: _Optional[_Union[ModelData, _Mapping]] = ..., meta_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class ClientLogin(_message.Message):
    __slots__ = ("client_name", "token", "client_ip", "meta", "meta_data")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    META_DATA_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    token: str
    client_ip: str
    meta: ModelMetaData
    meta_data: _struct_pb2.Struct
    def __init__(self, client_name: _Optional[str] = ..., token: _Optional[str] = ..., client_ip: _Optional[str] = ..., meta: _Optional[_Union[ModelMetaData, _Mapping]] = ..., meta_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ClientState(_message.Message):
    __slots__ = ("meta", "client_name", "token", "meta_data")
    META_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    META_DATA_FIELD_NUMBER: _ClassVar[int]
    meta: ModelMetaData
    client_name: str
    token: str
    meta_data: _struct_pb2.Struct
    def __init__(self, meta: _Optional[_Union[ModelMetaData, _Mapping]] = ..., client_name: _Optional[str] = ..., token: _Optional[str] = ..., meta_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("client", "n_iter", "type", "data", "meta_data", "contribution_id")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    N_ITER_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    META_DATA_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_ID_FIELD_NUMBER: _ClassVar[int]
    client: ClientState
    n_iter: int
    type: str
    data: ModelData
    meta_data: _struct_pb2.Struct
    contribution_id: str
    def __init__(self, client: _Optional[_Union[ClientState, _Mapping]] = ..., n_iter: _Optional[int] = ..., type: _Optional[str] = ..., data: _Optional[_Union[ModelData, _Mapping]] = ..., meta_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., contribution_id: _Optional[str] = ...) -> None: ...

class FederatedSummary(_message.Message):
    __slots__ = ("meta", "comment", "token", "meta_data")
    META_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    META_DATA_FIELD_NUMBER: _ClassVar[int]
    meta: ModelMetaData
    comment: str
    token: str
    meta_data: _struct_pb2.Struct
    def __init__(self, meta: _Optional[_Union[ModelMetaData, _Mapping]] = ..., comment: _Optional[str] = ..., token: _Optional[str] = ..., meta_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("index", "offset", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("total_bytes", "num_tensors", "num_chunks")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    num_tensors: int
    num_chunks: int
    def __init__(self, total_bytes: _Optional[int] = ..., num_tensors: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class ValidationModelsDone(_message.Message):
    __slots__ = ("more_models_available",)
    MORE_MODELS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    more_models_available: bool
    def __init__(self, more_models_available: _Optional[bool] = ...) -> None: ...

class FrameBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, frames: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "chunk", "end", "done", "batch")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    header: CurrentModel
    chunk: TensorChunk
    end: StreamEnd
    done: ValidationModelsDone
    batch: FrameBatch
    def __init__(self, header: _Optional[_Union[CurrentModel, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ..., done: _Optional[_Union[ValidationModelsDone, _Mapping]] = ..., batch: _Optional[_Union[FrameBatch, _Mapping]] = ...) -> None: ...

class ContributionChunk(_message.Message):
    __slots__ = ("header", "chunk", "end", "batch")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    header: Contribution
    chunk: TensorChunk
    end: StreamEnd
    batch: FrameBatch
    def __init__(self, header: _Optional[_Union[Contribution, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ..., batch: _Optional[_Union[FrameBatch, _Mapping]] = ...) -> None: ...

class ValidationResult(_message.Message):
    __slots__ = ("model_owner", "metrics")
    MODEL_OWNER_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    model_owner: str
    metrics: _struct_pb2.Struct
    def __init__(self, model_owner: _Optional[str] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CrossValidationResults(_message.Message):
    __slots__ = ("client", "results")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    client: ClientState
    results: _containers.RepeatedCompositeFieldContainer[ValidationResult]
    def __init__(self, client: _Optional[_Union[ClientState, _Mapping]] = ..., results: _Optional[_Iterable[_Union[ValidationResult, _Mapping]]] = ...) -> None: ...
