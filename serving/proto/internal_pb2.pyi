from meshserve.serving.proto import meshserve_pb2 as _meshserve_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_PATH_JAX_TRANSFER: _ClassVar[KVPath]
    KV_PATH_GRPC: _ClassVar[KVPath]
KV_PATH_JAX_TRANSFER: KVPath
KV_PATH_GRPC: KVPath

class PrefillClientMessage(_message.Message):
    __slots__ = ("start", "pulled", "fetch")
    START_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    start: PrefillStart
    pulled: Pulled
    fetch: Fetch
    def __init__(self, start: _Optional[_Union[PrefillStart, _Mapping]] = ..., pulled: _Optional[_Union[Pulled, _Mapping]] = ..., fetch: _Optional[_Union[Fetch, _Mapping]] = ...) -> None: ...

class Fetch(_message.Message):
    __slots__ = ("uuid",)
    UUID_FIELD_NUMBER: _ClassVar[int]
    uuid: int
    def __init__(self, uuid: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("uuid", "offset", "data")
    UUID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    uuid: int
    offset: int
    data: bytes
    def __init__(self, uuid: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PrefillStart(_message.Message):
    __slots__ = ("request", "kv_path")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    KV_PATH_FIELD_NUMBER: _ClassVar[int]
    request: _meshserve_pb2.GenerateRequest
    kv_path: KVPath
    def __init__(self, request: _Optional[_Union[_meshserve_pb2.GenerateRequest, _Mapping]] = ..., kv_path: _Optional[_Union[KVPath, str]] = ...) -> None: ...

class Pulled(_message.Message):
    __slots__ = ("uuid", "ok", "error")
    UUID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    uuid: int
    ok: bool
    error: str
    def __init__(self, uuid: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class PrefillServerMessage(_message.Message):
    __slots__ = ("chunk", "offer", "kv_chunk")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _meshserve_pb2.GenerateResponse
    offer: KVOffer
    kv_chunk: KVChunk
    def __init__(self, chunk: _Optional[_Union[_meshserve_pb2.GenerateResponse, _Mapping]] = ..., offer: _Optional[_Union[KVOffer, _Mapping]] = ..., kv_chunk: _Optional[_Union[KVChunk, _Mapping]] = ...) -> None: ...

class PartitionDim(_message.Message):
    __slots__ = ("axes",)
    AXES_FIELD_NUMBER: _ClassVar[int]
    axes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, axes: _Optional[_Iterable[str]] = ...) -> None: ...

class ArrayLayout(_message.Message):
    __slots__ = ("shape", "dtype", "mesh_axes", "mesh_shape", "spec", "shard_shape", "num_shards")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MESH_AXES_FIELD_NUMBER: _ClassVar[int]
    MESH_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    mesh_axes: _containers.RepeatedScalarFieldContainer[str]
    mesh_shape: _containers.RepeatedScalarFieldContainer[int]
    spec: _containers.RepeatedCompositeFieldContainer[PartitionDim]
    shard_shape: _containers.RepeatedScalarFieldContainer[int]
    num_shards: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., mesh_axes: _Optional[_Iterable[str]] = ..., mesh_shape: _Optional[_Iterable[int]] = ..., spec: _Optional[_Iterable[_Union[PartitionDim, _Mapping]]] = ..., shard_shape: _Optional[_Iterable[int]] = ..., num_shards: _Optional[int] = ...) -> None: ...

class KVOffer(_message.Message):
    __slots__ = ("transfer_address", "uuid", "layouts", "ttl_s", "nbytes", "handoff")
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    transfer_address: str
    uuid: int
    layouts: _containers.RepeatedCompositeFieldContainer[ArrayLayout]
    ttl_s: float
    nbytes: int
    handoff: Handoff
    def __init__(self, transfer_address: _Optional[str] = ..., uuid: _Optional[int] = ..., layouts: _Optional[_Iterable[_Union[ArrayLayout, _Mapping]]] = ..., ttl_s: _Optional[float] = ..., nbytes: _Optional[int] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ...) -> None: ...

class Handoff(_message.Message):
    __slots__ = ("version", "request_id", "prompt_ids", "output_ids", "seed", "num_computed", "priority", "cache_root", "cached_tokens", "layout", "queue_ms", "prefill_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_ROOT_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    num_computed: int
    priority: int
    cache_root: bytes
    cached_tokens: int
    layout: KVLayout
    queue_ms: float
    prefill_ms: float
    def __init__(self, version: _Optional[int] = ..., request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., output_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., num_computed: _Optional[int] = ..., priority: _Optional[int] = ..., cache_root: _Optional[bytes] = ..., cached_tokens: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "page_size", "num_kv_heads", "head_dim", "dtype", "pages", "rows")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    pages: int
    rows: int
    def __init__(self, num_layers: _Optional[int] = ..., page_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., pages: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Load(_message.Message):
    __slots__ = ("waiting", "running", "free_pages", "total_pages", "pending_offers", "offers_reclaimed", "abandoned_pulls")
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    PENDING_OFFERS_FIELD_NUMBER: _ClassVar[int]
    OFFERS_RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_PULLS_FIELD_NUMBER: _ClassVar[int]
    waiting: int
    running: int
    free_pages: int
    total_pages: int
    pending_offers: int
    offers_reclaimed: int
    abandoned_pulls: int
    def __init__(self, waiting: _Optional[int] = ..., running: _Optional[int] = ..., free_pages: _Optional[int] = ..., total_pages: _Optional[int] = ..., pending_offers: _Optional[int] = ..., offers_reclaimed: _Optional[int] = ..., abandoned_pulls: _Optional[int] = ...) -> None: ...
