"""The ONNX contract between training and serving, in one dependency-free module (numpy and the standard library).

An exported generator is one `model.onnx` file with
  inputs    z float32 [batch, latent_dim]; also y float32 [batch, num_classes] when conditional
  output    images float32 [batch, *output_shape], within output_range when it has one
  metadata  `metadata_props`, all strings (JSON where structured): the spec keys written by
            ModelSpec.to_metadata() and read back by ModelSpec.from_metadata(), plus provenance keys.
Only the batch axis is dynamic. The exporter, the service's registry and the evaluator all go through here;
nothing else parses metadata_props.

Seed contract (an API guarantee, identical on every platform), version SEED_CONTRACT: sample i with seed s uses
    rng = numpy.random.default_rng(s)
    z   = rng.standard_normal(latent_dim, dtype=numpy.float32)            # prior "normal"
    z   = (rng.random(latent_dim, dtype=numpy.float32) * 2 - 1) * sqrt(3)  # prior "uniform"
so a sample depends on its own seed only, never on the rest of the batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 2  # 2 added `kind` and `seed_contract`; version 1 files are still read
READABLE_FORMATS = (1, 2)
SEED_CONTRACT = 1
PRIORS = ("normal", "uniform")
KINDS = ("image", "points")  # image: [C, H, W] with C = 1 or 3; points: [2] (the 2-D toy generators)
SPEC_KEYS = (
    "format_version", "kind", "seed_contract", "latent_dim", "prior", "num_classes", "class_names", "image_shape",
    "output_range",
)  # fmt: skip
# What the exporter records about training. All but `config` (the whole training configuration) are documented,
# and are what the server shows by default.
PROVENANCE_KEYS = (
    "architecture", "loss", "dataset", "preset", "steps", "ema", "precision", "parity_atol", "torch_version",
    "onnx_version", "checkpoint_sha256", "created", "config",
)  # fmt: skip
DOCUMENTED_KEYS = (*SPEC_KEYS, *(k for k in PROVENANCE_KEYS if k != "config"))
MAX_SEED = 2**64 - 1
_SQRT3 = np.float32(math.sqrt(3.0))


class ContractError(ValueError):
    """A model file, or a spec, that does not honour the contract; the message says which key and how."""


@dataclass(frozen=True)
class ModelSpec:
    """What a generator file promises: its kind, latent space, classes and output."""

    kind: str
    latent_dim: int
    prior: str
    class_names: tuple[str, ...]
    output_shape: tuple[int, ...]  # one sample: [C, H, W] for images, [2] for points
    output_range: tuple[float, float] | None  # None: unbounded (points)
    provenance: Mapping[str, str] = field(default_factory=dict, compare=False)  # training facts, not the contract

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ContractError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.prior not in PRIORS:
            raise ContractError(f"prior: {self.prior!r} is not one of {', '.join(PRIORS)}")
        if self.latent_dim < 1:
            raise ContractError(f"latent_dim: must be >= 1 (got {self.latent_dim})")
        if len(set(self.class_names)) != len(self.class_names) or not all(self.class_names):
            raise ContractError(f"class_names: must be distinct and non-empty (got {list(self.class_names)})")
        shape = list(self.output_shape)
        if self.kind == "image" and (len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1):
            raise ContractError(f"image_shape: an image generator needs [C, H, W] with C = 1 or 3 (got {shape})")
        if self.kind == "points" and shape != [2]:
            raise ContractError(f"image_shape: a points generator outputs [2] (got {shape})")
        if self.kind == "image" and self.output_range is None:
            raise ContractError("output_range: an image generator needs one")
        if self.output_range is not None:
            lo, hi = self.output_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ContractError(f"output_range: needs finite lo < hi (got {list(self.output_range)})")
        clash = sorted(set(SPEC_KEYS) & set(self.provenance))
        if clash:
            raise ContractError(f"provenance: may not set the spec keys {', '.join(clash)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_metadata(self) -> dict[str, str]:
        """metadata_props for the ONNX file: the spec keys, then the provenance."""
        return {
            "format_version": str(FORMAT_VERSION),
            "kind": self.kind,
            "seed_contract": str(SEED_CONTRACT),
            "latent_dim": str(self.latent_dim),
            "prior": self.prior,
            "num_classes": str(self.num_classes),
            "class_names": json.dumps(list(self.class_names)),
            "image_shape": json.dumps(list(self.output_shape)),
            "output_range": json.dumps(None if self.output_range is None else list(self.output_range)),
            **self.provenance,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ModelSpec:
        """Read and validate metadata_props; ContractError names the key at fault."""

        def need(key: str) -> str:
            if key not in meta:
                raise ContractError(f"metadata_props lacks {key!r}")
            return meta[key]

        def parse(key: str, convert):
            try:
                return convert(need(key))
            except (ValueError, TypeError) as e:
                raise ContractError(f"{key}: unreadable value {need(key)[:64]!r} ({e})") from None

        version = need("format_version")
        if not (version.isascii() and version.isdigit()) or int(version) not in READABLE_FORMATS:
            readable = ", ".join(map(str, READABLE_FORMATS))
            raise ContractError(
                f"format_version: {version[:16]!r} is not a format this reader knows (it reads {readable});"
                " a newer exporter wrote it, so upgrade the reader"
            )
        shape = parse("image_shape", lambda v: tuple(int(d) for d in _json_list(v)))
        kind = need("kind") if int(version) >= 2 else ("image" if len(shape) == 3 else "points")
        if int(version) >= 2 and parse("seed_contract", int) != SEED_CONTRACT:
            raise ContractError(
                f"seed_contract: {meta['seed_contract']!r} is not one this reader knows ({SEED_CONTRACT})"
            )
        num_classes = parse("num_classes", int)
        class_names = parse("class_names", lambda v: tuple(str(c) for c in _json_list(v)))
        if len(class_names) != num_classes:
            raise ContractError(f"class_names: {len(class_names)} names for num_classes {num_classes}")
        out_range = parse("output_range", json.loads)
        if out_range is not None:
            out_range = parse("output_range", lambda v: tuple(float(x) for x in _json_list(v)))
            if len(out_range) != 2:
                raise ContractError(f"output_range: needs [lo, hi] (got {list(out_range)})")
        provenance = {k: v for k, v in meta.items() if k not in SPEC_KEYS}
        return cls(kind, parse("latent_dim", int), need("prior"), class_names, shape, out_range, provenance)

    def check_signature(self, inputs: Mapping[str, tuple[str, Sequence]], outputs: Mapping[str, tuple[str, Sequence]]):
        """Check the graph against the spec: inputs and outputs as {name: (type, shape)}, as ONNX Runtime has them."""
        expected = {"z": self.latent_dim} | ({"y": self.num_classes} if self.num_classes else {})
        if set(inputs) != set(expected):
            raise ContractError(f"inputs {sorted(inputs)} do not match the metadata (expected {sorted(expected)})")
        for name, width in expected.items():
            kind, shape = inputs[name]
            if kind != "tensor(float)" or len(shape) != 2 or shape[1] != width:
                raise ContractError(f"input {name}: expected float [batch, {width}], got {kind} {list(shape)}")
        if "images" not in outputs:
            raise ContractError(f"outputs {sorted(outputs)} lack 'images'")
        kind, shape = outputs["images"]
        if kind != "tensor(float)" or list(shape[1:]) != list(self.output_shape):
            dims = ", ".join(map(str, self.output_shape))
            raise ContractError(f"output images: expected float [batch, {dims}], got {kind} {list(shape)}")


def _json_list(text: str) -> list:
    # A JSON string is iterable too: "188" must not read as the shape [1, 8, 8].
    value = json.loads(text)
    if not isinstance(value, list):
        raise TypeError(f"expected a JSON list, got {type(value).__name__}")
    return value


def read_spec(session) -> ModelSpec:
    """The spec of a loaded ONNX Runtime InferenceSession, its graph checked against it.

    Duck-typed (get_modelmeta, get_inputs, get_outputs), so that this module never imports onnxruntime.
    """
    spec = ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map)
    inputs, outputs = (
        {a.name: (a.type, list(a.shape)) for a in args} for args in (session.get_inputs(), session.get_outputs())
    )
    spec.check_signature(inputs, outputs)
    return spec


def seed_latent(seed: int, latent_dim: int, prior: str) -> np.ndarray:
    """The documented seed → z mapping for one sample, float32 [latent_dim]."""
    rng = np.random.default_rng(seed)
    if prior == "normal":
        return rng.standard_normal(latent_dim, dtype=np.float32)
    if prior == "uniform":
        return (rng.random(latent_dim, dtype=np.float32) * 2 - 1) * _SQRT3
    raise ContractError(f"prior: {prior!r} is not one of {', '.join(PRIORS)}")


def seed_latents(seeds: Sequence[int], latent_dim: int, prior: str) -> np.ndarray:
    """float32 [len(seeds), latent_dim], row i from seeds[i]."""
    out = np.empty((len(seeds), latent_dim), dtype=np.float32)
    for i, s in enumerate(seeds):
        out[i] = seed_latent(s, latent_dim, prior)
    return out
