"""The data plane's domain requests and results: what every front end translates its wire format into and out of.

Front ends fill these in one pass without judging them: counts, ranges and names are checked by the data plane,
before anything is built from them. Sequences may be lazy views of the wire message. Each request carries the
caller's own names for its fields (`Names`), so that an error names what the caller sent, whatever the wire.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.contract import ModelSpec


class Format(enum.Enum):
    """How images are answered: PNG files, uint8 [n, H, W, C] pixels, or the model's float32 [n, C, H, W]."""

    PNG = "png"
    UINT8 = "uint8"
    FLOAT32 = "float32"


@dataclass(frozen=True)
class Names:
    """The caller's words for the data plane's fields. A field (`seed_range.count`, `labels[3].soft`) is named by
    the longest entry that is it or leads it (`seed_range`, `labels`); one with no entry keeps its own name."""

    table: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, path: str) -> str:
        exact = self.table.get(path)
        if exact is not None:
            return exact
        best = ""
        for prefix in self.table:
            if len(prefix) > len(best) and (path == prefix or path.startswith((prefix + ".", prefix + "["))):
                best = prefix
        return self.table[best] if best else path

    def hint(self, key: str) -> str:
        """Advice in the caller's words (`stream`: how its wire streams big answers), or ""."""
        advice = self.table.get(f"hint:{key}", "")
        return f"; {advice}" if advice else ""


NO_NAMES = Names()


@dataclass(frozen=True)
class Label:
    """Exactly one of: a class index, a class name, or soft weights over the classes."""

    index: int | None = None
    name: str | None = None
    soft: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Seeds:
    values: Sequence[int]


@dataclass(frozen=True)
class SeedRange:
    start: int
    count: int


@dataclass(frozen=True)
class Rows:
    values: Sequence[float]  # flat: whole rows of latent_dim


@dataclass(frozen=True)
class Output:
    format: Format = Format.PNG
    grid: bool = False
    grid_columns: int = 0
    return_latents: bool = False
    grid_only: bool = False


@dataclass(frozen=True)
class Generate:
    model: str
    version: int = 0
    latents: Seeds | SeedRange | Rows | None = None
    labels: Sequence[Label] = ()
    truncation: float = 0.0  # 0: none
    output: Output = Output()
    names: Names = NO_NAMES
    urgent: bool = False  # high priority: queued ahead of every normal request (OIP's `priority` 1)


@dataclass(frozen=True)
class Infer:
    """Tensors as the model takes them: z [n, latent_dim], and y [n or 1, num_classes] passed through as given."""

    model: str
    version: int = 0
    z: np.ndarray | None = None
    y: np.ndarray | None = None
    truncation: float = 0.0  # 0: none
    output: Output = Output(Format.FLOAT32)
    names: Names = NO_NAMES
    urgent: bool = False


@dataclass(frozen=True)
class Keyframe:
    seed: int | None = None
    row: Sequence[float] | None = None  # one row of latent_dim
    label: Label | None = None


@dataclass(frozen=True)
class Animation:
    """Interpolation frames as one animated image (encode.ANIMATIONS)."""

    format: str = ""  # gif | apng | webp
    fps: float = 0.0  # 0: 12
    ping_pong: bool = False
    loops: int = 0  # 0: for ever


@dataclass(frozen=True)
class Interpolate:
    model: str
    version: int = 0
    keyframes: Sequence[Keyframe] = ()
    steps: int = 0
    method: str = "slerp"  # slerp or lerp
    truncation: float = 0.0
    output: Output = Output()
    names: Names = NO_NAMES
    animation: Animation | None = None  # set: one animated image instead of `output`'s
    more_paths: Sequence[Sequence[Keyframe]] = ()  # more interpolations in step with `keyframes`


@dataclass(frozen=True)
class Edit:
    """Latents moved along a direction: row i, column j is ψ·z_i + strengths[j]·direction."""

    model: str
    version: int = 0
    latents: Seeds | SeedRange | Rows | None = None
    labels: Sequence[Label] = ()  # one for all latents, or one each
    direction: str = ""  # a name the model lists, or
    vector: Sequence[float] | None = None  # one row of latent_dim, used as given
    strengths: Sequence[float] = ()
    truncation: float = 0.0
    output: Output = Output()  # grid_columns 0: one column per strength
    names: Names = NO_NAMES
    animation: Animation | None = None  # set: the strengths as frames, each a grid of the latents
    urgent: bool = False


@dataclass(frozen=True)
class Invert:
    """Images back to latents: image files, or raw uint8 pixels [n, H, W, C] one after another."""

    model: str
    version: int = 0
    images: Sequence[bytes] = ()
    pixels: bytes = b""
    refine: int = 0  # generator passes per image for the search after the encoder; 0: none
    output: Output = Output()  # the reconstructions' format
    names: Names = NO_NAMES
    urgent: bool = False


@dataclass(frozen=True)
class Inverted:
    """An Invert's answer: per image its z, class (conditional models), distances and passes; the reconstructions."""

    reconstructions: Result
    z: np.ndarray  # float32 [n, latent_dim]
    labels: np.ndarray | None  # int [n]
    probabilities: np.ndarray | None  # float32 [n, classes]
    distance: np.ndarray  # float64 [n]: mean squared pixel difference in [0, 1], after the refinement
    encoder_distance: np.ndarray  # the same for the encoder's z
    passes: int  # generator passes per image the refinement used


@dataclass(frozen=True)
class ModelInfo:
    """One serving model version, described once: every front end renders this and nothing else."""

    name: str
    version: int
    versions: list[int]
    spec: ModelSpec
    provider: str
    metadata: dict[str, str]  # the file's metadata_props (the documented keys unless --full-metadata)
    invertible: bool = False  # served with an encoder

    @property
    def inputs(self) -> list[tuple[str, list[int]]]:
        """The model's FP32 inputs as (name, shape), -1 for the batch axis."""
        spec = self.spec
        return [("z", [-1, spec.latent_dim])] + ([("y", [-1, spec.num_classes])] if spec.num_classes else [])

    @property
    def output_shape(self) -> list[int]:
        return [-1, *self.spec.output_shape]


@dataclass(frozen=True)
class Result:
    """Images as arrays; each front end chooses its own form (per-image bytes, one blob, JSON numbers, PNG)."""

    model: str
    version: int
    format: Format
    pixels: np.ndarray | None  # uint8 [n, H, W, C] or float32 [n, C, H, W]; None for PNG and grid_only
    pngs: list[bytes] = field(default_factory=list)  # Format.PNG: one file per image
    grid_png: bytes = b""
    latents: np.ndarray | None = None
    offset: int = 0  # streams: this chunk's first image in the whole request
    image_shape: tuple[int, ...] = ()  # one image: [H, W, C]; [C, H, W] for float32
    animation: bytes = b""  # Interpolate with an Animation: the animated image
    animation_type: str = ""  # its media type


@dataclass(frozen=True)
class VersionStatus:
    """One model version's place in the lifecycle (README, "Model lifecycle")."""

    name: str
    version: int
    state: str  # AVAILABLE | LOADING | READY | UNLOADING | FAILED
    reason: str = ""  # why it is not READY; for a READY one, what it serves without (an encoder refused)
