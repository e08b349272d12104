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
    FLOAT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class OnFlagged(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_FLAGGED_SERVER_DEFAULT: _ClassVar[OnFlagged]
    ON_FLAGGED_FORWARD: _ClassVar[OnFlagged]
    ON_FLAGGED_REJECT: _ClassVar[OnFlagged]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
UINT8: DType
INT64: DType
INT32: DType
FLOAT64: DType
BOOL: DType
ON_FLAGGED_SERVER_DEFAULT: OnFlagged
ON_FLAGGED_FORWARD: OnFlagged
ON_FLAGGED_REJECT: OnFlagged

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ProjectionOptions(_message.Message):
    __slots__ = ("steps", "restarts", "seed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    restarts: int
    seed: int
    def __init__(self, steps: _Optional[int] = ..., restarts: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class PurifyRequest(_message.Message):
    __slots__ = ("request_id", "tensor", "encoded", "options", "on_flagged", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ON_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tensor: Tensor
    encoded: EncodedImages
    options: ProjectionOptions
    on_flagged: OnFlagged
    model: str
    def __init__(self, request_id: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., encoded: _Optional[_Union[EncodedImages, _Mapping]] = ..., options: _Optional[_Union[ProjectionOptions, _Mapping]] = ..., on_flagged: _Optional[_Union[OnFlagged, str]] = ..., model: _Optional[str] = ...) -> None: ...

class Purification(_message.Message):
    __slots__ = ("images", "reconstruction_error", "adversarial", "threshold_calibrated", "threshold", "steps", "restarts", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_ERROR_FIELD_NUMBER: _ClassVar[int]
    ADVERSARIAL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    reconstruction_error: _containers.RepeatedScalarFieldContainer[float]
    adversarial: _containers.RepeatedScalarFieldContainer[bool]
    threshold_calibrated: bool
    threshold: float
    steps: int
    restarts: int
    model: str
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., reconstruction_error: _Optional[_Iterable[float]] = ..., adversarial: _Optional[_Iterable[bool]] = ..., threshold_calibrated: bool = ..., threshold: _Optional[float] = ..., steps: _Optional[int] = ..., restarts: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class PurifyResponse(_message.Message):
    __slots__ = ("request_id", "purification")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PURIFICATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    purification: Purification
    def __init__(self, request_id: _Optional[str] = ..., purification: _Optional[_Union[Purification, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("request_id", "tensor", "encoded", "options", "model_name", "on_flagged")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ON_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tensor: Tensor
    encoded: EncodedImages
    options: ProjectionOptions
    model_name: str
    on_flagged: OnFlagged
    def __init__(self, request_id: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., encoded: _Optional[_Union[EncodedImages, _Mapping]] = ..., options: _Optional[_Union[ProjectionOptions, _Mapping]] = ..., model_name: _Optional[str] = ..., on_flagged: _Optional[_Union[OnFlagged, str]] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "purification", "model_name", "outputs", "labels")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PURIFICATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    purification: Purification
    model_name: str
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., purification: _Optional[_Union[Purification, _Mapping]] = ..., model_name: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...
