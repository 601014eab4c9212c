from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FP32: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_INT4: _ClassVar[Encoding]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_NONE: _ClassVar[Codec]
    CODEC_ZSTD: _ClassVar[Codec]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW_ZSTD: _ClassVar[ImageFormat]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
ENCODING_UNSPECIFIED: Encoding
ENCODING_FP32: Encoding
ENCODING_FP16: Encoding
ENCODING_INT8: Encoding
ENCODING_INT4: Encoding
CODEC_UNSPECIFIED: Codec
CODEC_NONE: Codec
CODEC_ZSTD: Codec
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_RAW_ZSTD: ImageFormat

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "encoding", "codec", "scale", "zero_point", "quant_axis", "raw_size", "zstd_dict_id", "data", "scale_f16", "zero_point_u8")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    QUANT_AXIS_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    ZSTD_DICT_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_F16_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_U8_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: Encoding
    codec: Codec
    scale: _containers.RepeatedScalarFieldContainer[float]
    zero_point: _containers.RepeatedScalarFieldContainer[float]
    quant_axis: int
    raw_size: int
    zstd_dict_id: int
    data: bytes
    scale_f16: bytes
    zero_point_u8: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., codec: _Optional[_Union[Codec, str]] = ..., scale: _Optional[_Iterable[float]] = ..., zero_point: _Optional[_Iterable[float]] = ..., quant_axis: _Optional[int] = ..., raw_size: _Optional[int] = ..., zstd_dict_id: _Optional[int] = ..., data: _Optional[bytes] = ..., scale_f16: _Optional[bytes] = ..., zero_point_u8: _Optional[bytes] = ...) -> None: ...

class ImagePayload(_message.Message):
    __slots__ = ("format", "width", "height", "channels", "data")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    format: ImageFormat
    width: int
    height: int
    channels: int
    data: bytes
    def __init__(self, format: _Optional[_Union[ImageFormat, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "model_identity", "split_point", "target_exit", "tensors", "image", "deadline_ms", "client_sent_unix_ns", "cloud_exit", "stop_confidence")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SPLIT_POINT_FIELD_NUMBER: _ClassVar[int]
    TARGET_EXIT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_EXIT_FIELD_NUMBER: _ClassVar[int]
    STOP_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_identity: str
    split_point: int
    target_exit: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    image: ImagePayload
    deadline_ms: int
    client_sent_unix_ns: int
    cloud_exit: CloudExit
    stop_confidence: float
    def __init__(self, request_id: _Optional[str] = ..., model_identity: _Optional[str] = ..., split_point: _Optional[int] = ..., target_exit: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., image: _Optional[_Union[ImagePayload, _Mapping]] = ..., deadline_ms: _Optional[int] = ..., client_sent_unix_ns: _Optional[int] = ..., cloud_exit: _Optional[_Union[CloudExit, _Mapping]] = ..., stop_confidence: _Optional[float] = ...) -> None: ...

class CloudExit(_message.Message):
    __slots__ = ("price",)
    PRICE_FIELD_NUMBER: _ClassVar[int]
    price: float
    def __init__(self, price: _Optional[float] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("class_index", "score")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    score: float
    def __init__(self, class_index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class ServerTimings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "decode_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    decode_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "class_index", "top_k", "exit_used", "timings", "model_identity", "split_point")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXIT_USED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    SPLIT_POINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    class_index: int
    top_k: _containers.RepeatedCompositeFieldContainer[TopK]
    exit_used: int
    timings: ServerTimings
    model_identity: str
    split_point: int
    def __init__(self, request_id: _Optional[str] = ..., class_index: _Optional[int] = ..., top_k: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ..., exit_used: _Optional[int] = ..., timings: _Optional[_Union[ServerTimings, _Mapping]] = ..., model_identity: _Optional[str] = ..., split_point: _Optional[int] = ...) -> None: ...
