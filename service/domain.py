"""The data plane's domain requests and results: what every front end translates its wire format into and out of.

Front ends fill these in one pass without judging them: counts, ranges and names are checked by the data plane,
before anything is built from them. Sequences may be lazy views of the wire message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.contract import ModelSpec


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
    format: str = "png"  # png, uint8 or float32; a front end passes values it does not know on as text
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


@dataclass(frozen=True)
class Keyframe:
    seed: int | None = None
    row: Sequence[float] | None = None  # one row of latent_dim
    label: Label | None = None


@dataclass(frozen=True)
class Interpolate:
    model: str
    version: int = 0
    keyframes: Sequence[Keyframe] = ()
    steps: int = 0
    method: str = "slerp"  # slerp or lerp
    truncation: float = 0.0
    output: Output = Output()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    versions: list[int]
    ready: bool
    spec: ModelSpec
    provider: str
    metadata: dict[str, str]  # the file's metadata_props


@dataclass(frozen=True)
class Result:
    model: str
    version: int
    format: str
    images: list[bytes]
    image_shape: tuple[int, ...]  # [H, W, C]; [C, H, W] for float32
    grid_png: bytes = b""
    latents: np.ndarray | None = None
    offset: int = 0  # streams: this chunk's first image in the whole request


@dataclass(frozen=True)
class VersionStatus:
    """One model version's place in the lifecycle (README, "Model lifecycle")."""

    name: str
    version: int
    state: str  # AVAILABLE | LOADING | READY | UNLOADING | FAILED
    reason: str = ""  # why it is not READY
