from protos import memserve_pb2 as _memserve_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Operation(_message.Message):
    __slots__ = ("step", "encode", "begin", "decode")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    step: _memserve_pb2.Tensor
    encode: int
    begin: Begin
    decode: int
    def __init__(self, step: _Optional[_Union[_memserve_pb2.Tensor, _Mapping]] = ..., encode: _Optional[int] = ..., begin: _Optional[_Union[Begin, _Mapping]] = ..., decode: _Optional[int] = ...) -> None: ...

class Begin(_message.Message):
    __slots__ = ("noise", "uniform")
    NOISE_FIELD_NUMBER: _ClassVar[int]
    UNIFORM_FIELD_NUMBER: _ClassVar[int]
    noise: _memserve_pb2.Tensor
    uniform: float
    def __init__(self, noise: _Optional[_Union[_memserve_pb2.Tensor, _Mapping]] = ..., uniform: _Optional[float] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("pieces", "done")
    PIECES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    pieces: _containers.RepeatedScalarFieldContainer[str]
    done: _memserve_pb2.GenerateDone
    def __init__(self, pieces: _Optional[_Iterable[str]] = ..., done: _Optional[_Union[_memserve_pb2.GenerateDone, _Mapping]] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("request_id", "request_digest", "step", "reply", "cancelled")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    request_digest: bytes
    step: _memserve_pb2.StepResponse
    reply: Reply
    cancelled: str
    def __init__(self, request_id: _Optional[str] = ..., request_digest: _Optional[bytes] = ..., step: _Optional[_Union[_memserve_pb2.StepResponse, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ..., cancelled: _Optional[str] = ...) -> None: ...

class SessionCreated(_message.Message):
    __slots__ = ("session_id", "model", "weights_digest", "ttl_seconds", "seed", "step", "state", "request_id", "request_digest", "unix_time", "tenant")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    weights_digest: str
    ttl_seconds: float
    seed: int
    step: int
    state: bytes
    request_id: str
    request_digest: bytes
    unix_time: float
    tenant: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., weights_digest: _Optional[str] = ..., ttl_seconds: _Optional[float] = ..., seed: _Optional[int] = ..., step: _Optional[int] = ..., state: _Optional[bytes] = ..., request_id: _Optional[str] = ..., request_digest: _Optional[bytes] = ..., unix_time: _Optional[float] = ..., tenant: _Optional[str] = ...) -> None: ...

class CallCommitted(_message.Message):
    __slots__ = ("session_id", "from_step", "to_step", "operations", "response")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    from_step: int
    to_step: int
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    response: Response
    def __init__(self, session_id: _Optional[str] = ..., from_step: _Optional[int] = ..., to_step: _Optional[int] = ..., operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ..., response: _Optional[_Union[Response, _Mapping]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("session_id", "step", "state", "responses")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    state: bytes
    responses: _containers.RepeatedCompositeFieldContainer[Response]
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., state: _Optional[bytes] = ..., responses: _Optional[_Iterable[_Union[Response, _Mapping]]] = ...) -> None: ...

class SessionDeleted(_message.Message):
    __slots__ = ("session_id", "why")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    why: str
    def __init__(self, session_id: _Optional[str] = ..., why: _Optional[str] = ...) -> None: ...

class Written(_message.Message):
    __slots__ = ("start", "crc")
    START_FIELD_NUMBER: _ClassVar[int]
    CRC_FIELD_NUMBER: _ClassVar[int]
    start: int
    crc: int
    def __init__(self, start: _Optional[int] = ..., crc: _Optional[int] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("created", "call", "snapshot", "deleted", "written")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    created: SessionCreated
    call: CallCommitted
    snapshot: Snapshot
    deleted: SessionDeleted
    written: Written
    def __init__(self, created: _Optional[_Union[SessionCreated, _Mapping]] = ..., call: _Optional[_Union[CallCommitted, _Mapping]] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., deleted: _Optional[_Union[SessionDeleted, _Mapping]] = ..., written: _Optional[_Union[Written, _Mapping]] = ...) -> None: ...
