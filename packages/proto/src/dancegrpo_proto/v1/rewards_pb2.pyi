from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_VIDEO: _ClassVar[Modality]

class ScoringScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORING_SCOPE_UNSPECIFIED: _ClassVar[ScoringScope]
    SCORING_SCOPE_SAMPLE: _ClassVar[ScoringScope]
    SCORING_SCOPE_GROUP: _ClassVar[ScoringScope]
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
MODALITY_VIDEO: Modality
SCORING_SCOPE_UNSPECIFIED: ScoringScope
SCORING_SCOPE_SAMPLE: ScoringScope
SCORING_SCOPE_GROUP: ScoringScope

class RawFrames(_message.Message):
    __slots__ = ("data", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodedFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, frames: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Media(_message.Message):
    __slots__ = ("raw", "encoded_image", "encoded_frames")
    RAW_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    raw: RawFrames
    encoded_image: bytes
    encoded_frames: EncodedFrames
    def __init__(self, raw: _Optional[_Union[RawFrames, _Mapping]] = ..., encoded_image: _Optional[bytes] = ..., encoded_frames: _Optional[_Union[EncodedFrames, _Mapping]] = ...) -> None: ...

class GenEvalObject(_message.Message):
    __slots__ = ("class_name", "count", "color", "position_relation", "position_reference")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    POSITION_RELATION_FIELD_NUMBER: _ClassVar[int]
    POSITION_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    count: int
    color: str
    position_relation: str
    position_reference: int
    def __init__(self, class_name: _Optional[str] = ..., count: _Optional[int] = ..., color: _Optional[str] = ..., position_relation: _Optional[str] = ..., position_reference: _Optional[int] = ...) -> None: ...

class GenEvalSpec(_message.Message):
    __slots__ = ("tag", "include", "exclude")
    TAG_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    tag: str
    include: _containers.RepeatedCompositeFieldContainer[GenEvalObject]
    exclude: _containers.RepeatedCompositeFieldContainer[GenEvalObject]
    def __init__(self, tag: _Optional[str] = ..., include: _Optional[_Iterable[_Union[GenEvalObject, _Mapping]]] = ..., exclude: _Optional[_Iterable[_Union[GenEvalObject, _Mapping]]] = ...) -> None: ...

class SampleMetadata(_message.Message):
    __slots__ = ("geneval", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GENEVAL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    geneval: GenEvalSpec
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, geneval: _Optional[_Union[GenEvalSpec, _Mapping]] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("prompt", "media", "condition_image", "metadata")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    CONDITION_IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    media: Media
    condition_image: Media
    metadata: SampleMetadata
    def __init__(self, prompt: _Optional[str] = ..., media: _Optional[_Union[Media, _Mapping]] = ..., condition_image: _Optional[_Union[Media, _Mapping]] = ..., metadata: _Optional[_Union[SampleMetadata, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("reward", "samples", "request_id", "group_sizes")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZES_FIELD_NUMBER: _ClassVar[int]
    reward: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    request_id: str
    group_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reward: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., request_id: _Optional[str] = ..., group_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class OutputColumn(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("outputs", "reward_version", "request_id")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REWARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[OutputColumn]
    reward_version: str
    request_id: str
    def __init__(self, outputs: _Optional[_Iterable[_Union[OutputColumn, _Mapping]]] = ..., reward_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class InputLimits(_message.Message):
    __slots__ = ("max_samples_per_request", "max_height", "max_width", "max_frames", "max_request_bytes", "min_size")
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_samples_per_request: int
    max_height: int
    max_width: int
    max_frames: int
    max_request_bytes: int
    min_size: int
    def __init__(self, max_samples_per_request: _Optional[int] = ..., max_height: _Optional[int] = ..., max_width: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., min_size: _Optional[int] = ...) -> None: ...

class RewardInfo(_message.Message):
    __slots__ = ("name", "kind", "version", "modality", "output_names", "limits", "description", "requires_prompt", "requires_condition_image", "requires_metadata", "max_batch_size", "scoring_scope", "min_group_size", "max_group_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_CONDITION_IMAGE_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_METADATA_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCORING_SCOPE_FIELD_NUMBER: _ClassVar[int]
    MIN_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    version: str
    modality: Modality
    output_names: _containers.RepeatedScalarFieldContainer[str]
    limits: InputLimits
    description: str
    requires_prompt: bool
    requires_condition_image: bool
    requires_metadata: bool
    max_batch_size: int
    scoring_scope: ScoringScope
    min_group_size: int
    max_group_size: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., version: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., output_names: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[InputLimits, _Mapping]] = ..., description: _Optional[str] = ..., requires_prompt: _Optional[bool] = ..., requires_condition_image: _Optional[bool] = ..., requires_metadata: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., scoring_scope: _Optional[_Union[ScoringScope, str]] = ..., min_group_size: _Optional[int] = ..., max_group_size: _Optional[int] = ...) -> None: ...

class ListRewardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRewardsResponse(_message.Message):
    __slots__ = ("rewards", "server_version")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedCompositeFieldContainer[RewardInfo]
    server_version: str
    def __init__(self, rewards: _Optional[_Iterable[_Union[RewardInfo, _Mapping]]] = ..., server_version: _Optional[str] = ...) -> None: ...
