from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    PNG: _ClassVar[OutputFormat]
    RAW_UINT8: _ClassVar[OutputFormat]
    RAW_FLOAT32: _ClassVar[OutputFormat]

class InterpolationMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERPOLATION_METHOD_UNSPECIFIED: _ClassVar[InterpolationMethod]
    SLERP: _ClassVar[InterpolationMethod]
    LERP: _ClassVar[InterpolationMethod]

class AnimationFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANIMATION_FORMAT_UNSPECIFIED: _ClassVar[AnimationFormat]
    ANIMATION_FORMAT_GIF: _ClassVar[AnimationFormat]
    ANIMATION_FORMAT_APNG: _ClassVar[AnimationFormat]
    ANIMATION_FORMAT_WEBP: _ClassVar[AnimationFormat]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_AVAILABLE: _ClassVar[VersionState]
    VERSION_STATE_LOADING: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_UNLOADING: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
PNG: OutputFormat
RAW_UINT8: OutputFormat
RAW_FLOAT32: OutputFormat
INTERPOLATION_METHOD_UNSPECIFIED: InterpolationMethod
SLERP: InterpolationMethod
LERP: InterpolationMethod
ANIMATION_FORMAT_UNSPECIFIED: AnimationFormat
ANIMATION_FORMAT_GIF: AnimationFormat
ANIMATION_FORMAT_APNG: AnimationFormat
ANIMATION_FORMAT_WEBP: AnimationFormat
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_AVAILABLE: VersionState
VERSION_STATE_LOADING: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_UNLOADING: VersionState
VERSION_STATE_FAILED: VersionState

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "versions", "version", "ready", "latent_dim", "prior", "class_names", "image_shape", "output_min", "output_max", "provider", "metadata", "directions", "invertible")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MIN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MAX_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    INVERTIBLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    version: int
    ready: bool
    latent_dim: int
    prior: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    output_min: float
    output_max: float
    provider: str
    metadata: _containers.ScalarMap[str, str]
    directions: _containers.RepeatedCompositeFieldContainer[Direction]
    invertible: bool
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ..., ready: bool = ..., latent_dim: _Optional[int] = ..., prior: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., image_shape: _Optional[_Iterable[int]] = ..., output_min: _Optional[float] = ..., output_max: _Optional[float] = ..., provider: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., directions: _Optional[_Iterable[_Union[Direction, _Mapping]]] = ..., invertible: bool = ...) -> None: ...

class Direction(_message.Message):
    __slots__ = ("name", "kind", "description", "vector", "per_class")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    description: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    per_class: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., per_class: bool = ...) -> None: ...

class SeedList(_message.Message):
    __slots__ = ("seeds",)
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seeds: _Optional[_Iterable[int]] = ...) -> None: ...

class SeedRange(_message.Message):
    __slots__ = ("start", "count")
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    start: int
    count: int
    def __init__(self, start: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class LatentRows(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SoftLabel(_message.Message):
    __slots__ = ("weights",)
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, weights: _Optional[_Iterable[float]] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("index", "name", "soft")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    soft: SoftLabel
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., soft: _Optional[_Union[SoftLabel, _Mapping]] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("format", "grid", "grid_columns", "return_latents", "grid_only")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    GRID_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LATENTS_FIELD_NUMBER: _ClassVar[int]
    GRID_ONLY_FIELD_NUMBER: _ClassVar[int]
    format: OutputFormat
    grid: bool
    grid_columns: int
    return_latents: bool
    grid_only: bool
    def __init__(self, format: _Optional[_Union[OutputFormat, str]] = ..., grid: bool = ..., grid_columns: _Optional[int] = ..., return_latents: bool = ..., grid_only: bool = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "version", "seeds", "seed_range", "rows", "labels", "truncation", "output")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    SEED_RANGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    seeds: SeedList
    seed_range: SeedRange
    rows: LatentRows
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    truncation: float
    output: OutputOptions
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., seeds: _Optional[_Union[SeedList, _Mapping]] = ..., seed_range: _Optional[_Union[SeedRange, _Mapping]] = ..., rows: _Optional[_Union[LatentRows, _Mapping]] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., truncation: _Optional[float] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("model", "version", "format", "image_shape", "images", "grid_png", "latents", "offset", "animation", "animation_type")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ANIMATION_FIELD_NUMBER: _ClassVar[int]
    ANIMATION_TYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    format: OutputFormat
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    grid_png: bytes
    latents: _containers.RepeatedScalarFieldContainer[float]
    offset: int
    animation: bytes
    animation_type: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., image_shape: _Optional[_Iterable[int]] = ..., images: _Optional[_Iterable[bytes]] = ..., grid_png: _Optional[bytes] = ..., latents: _Optional[_Iterable[float]] = ..., offset: _Optional[int] = ..., animation: _Optional[bytes] = ..., animation_type: _Optional[str] = ...) -> None: ...

class Keyframe(_message.Message):
    __slots__ = ("seed", "row", "label")
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    seed: int
    row: LatentRows
    label: Label
    def __init__(self, seed: _Optional[int] = ..., row: _Optional[_Union[LatentRows, _Mapping]] = ..., label: _Optional[_Union[Label, _Mapping]] = ...) -> None: ...

class InterpolateRequest(_message.Message):
    __slots__ = ("model", "version", "keyframes", "steps", "method", "truncation", "output", "animation", "more_paths")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEYFRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ANIMATION_FIELD_NUMBER: _ClassVar[int]
    MORE_PATHS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    keyframes: _containers.RepeatedCompositeFieldContainer[Keyframe]
    steps: int
    method: InterpolationMethod
    truncation: float
    output: OutputOptions
    animation: AnimationOptions
    more_paths: _containers.RepeatedCompositeFieldContainer[KeyframePath]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., keyframes: _Optional[_Iterable[_Union[Keyframe, _Mapping]]] = ..., steps: _Optional[int] = ..., method: _Optional[_Union[InterpolationMethod, str]] = ..., truncation: _Optional[float] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., animation: _Optional[_Union[AnimationOptions, _Mapping]] = ..., more_paths: _Optional[_Iterable[_Union[KeyframePath, _Mapping]]] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("model", "version", "seeds", "seed_range", "rows", "labels", "direction", "vector", "strengths", "truncation", "output", "animation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    SEED_RANGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    STRENGTHS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ANIMATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    seeds: SeedList
    seed_range: SeedRange
    rows: LatentRows
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    direction: str
    vector: LatentRows
    strengths: _containers.RepeatedScalarFieldContainer[float]
    truncation: float
    output: OutputOptions
    animation: AnimationOptions
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., seeds: _Optional[_Union[SeedList, _Mapping]] = ..., seed_range: _Optional[_Union[SeedRange, _Mapping]] = ..., rows: _Optional[_Union[LatentRows, _Mapping]] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., direction: _Optional[str] = ..., vector: _Optional[_Union[LatentRows, _Mapping]] = ..., strengths: _Optional[_Iterable[float]] = ..., truncation: _Optional[float] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., animation: _Optional[_Union[AnimationOptions, _Mapping]] = ...) -> None: ...

class InvertRequest(_message.Message):
    __slots__ = ("model", "version", "images", "pixels", "refine_passes", "output")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    REFINE_PASSES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: _containers.RepeatedScalarFieldContainer[bytes]
    pixels: bytes
    refine_passes: int
    output: OutputOptions
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Iterable[bytes]] = ..., pixels: _Optional[bytes] = ..., refine_passes: _Optional[int] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ...) -> None: ...

class Inversion(_message.Message):
    __slots__ = ("z", "label", "class_probabilities", "distance", "encoder_distance", "passes")
    Z_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    z: _containers.RepeatedScalarFieldContainer[float]
    label: int
    class_probabilities: _containers.RepeatedScalarFieldContainer[float]
    distance: float
    encoder_distance: float
    passes: int
    def __init__(self, z: _Optional[_Iterable[float]] = ..., label: _Optional[int] = ..., class_probabilities: _Optional[_Iterable[float]] = ..., distance: _Optional[float] = ..., encoder_distance: _Optional[float] = ..., passes: _Optional[int] = ...) -> None: ...

class InvertResponse(_message.Message):
    __slots__ = ("model", "version", "inversions", "format", "image_shape", "reconstructions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INVERSIONS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    inversions: _containers.RepeatedCompositeFieldContainer[Inversion]
    format: OutputFormat
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    reconstructions: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., inversions: _Optional[_Iterable[_Union[Inversion, _Mapping]]] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., image_shape: _Optional[_Iterable[int]] = ..., reconstructions: _Optional[_Iterable[bytes]] = ...) -> None: ...

class KeyframePath(_message.Message):
    __slots__ = ("keyframes",)
    KEYFRAMES_FIELD_NUMBER: _ClassVar[int]
    keyframes: _containers.RepeatedCompositeFieldContainer[Keyframe]
    def __init__(self, keyframes: _Optional[_Iterable[_Union[Keyframe, _Mapping]]] = ...) -> None: ...

class AnimationOptions(_message.Message):
    __slots__ = ("format", "fps", "ping_pong", "loops")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    PING_PONG_FIELD_NUMBER: _ClassVar[int]
    LOOPS_FIELD_NUMBER: _ClassVar[int]
    format: AnimationFormat
    fps: float
    ping_pong: bool
    loops: int
    def __init__(self, format: _Optional[_Union[AnimationFormat, str]] = ..., fps: _Optional[float] = ..., ping_pong: bool = ..., loops: _Optional[int] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("name", "version", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: VersionState
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class RepositoryIndexRequest(_message.Message):
    __slots__ = ("ready_only",)
    READY_ONLY_FIELD_NUMBER: _ClassVar[int]
    ready_only: bool
    def __init__(self, ready_only: bool = ...) -> None: ...

class RepositoryIndexResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...
