"""The ONNX contract between training and serving, in one dependency-free module (numpy and the standard library).

An exported generator is one `model.onnx` file with
  inputs    z float32 [batch, latent_dim]; also y float32 [batch, num_classes] when conditional
  output    images float32 [batch, *output_shape], within output_range when it has one
  metadata  `metadata_props`, all strings (JSON where structured): the spec keys written by
            ModelSpec.to_metadata() and read back by ModelSpec.from_metadata(), plus provenance keys.
            Format 3 adds `directions`: named unit vectors in z (editing directions, README "Latent directions").
Only the batch axis is dynamic. The exporter, the service's registry and the evaluator all go through here;
nothing else parses metadata_props.

Seed contract (an API guarantee, identical on every platform), version SEED_CONTRACT: sample i with seed s uses
    rng = numpy.random.default_rng(s)
    z   = rng.standard_normal(latent_dim, dtype=numpy.float32)            # prior "normal"
    z   = (rng.random(latent_dim, dtype=numpy.float32) * 2 - 1) * sqrt(3)  # prior "uniform"
so a sample depends on its own seed only, never on the rest of the batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 3  # 2 added `kind` and `seed_contract`, 3 `directions`; older files are still read
READABLE_FORMATS = (1, 2, 3)
SEED_CONTRACT = 1
PRIORS = ("normal", "uniform")
KINDS = ("image", "points")  # image: [C, H, W] with C = 1 or 3; points: [2] (the 2-D toy generators)
SPEC_KEYS = (
    "format_version", "kind", "seed_contract", "latent_dim", "prior", "num_classes", "class_names", "image_shape",
    "output_range", "directions",
)  # fmt: skip
# What the exporter records about training. All but `config` (the whole training configuration) are documented,
# and are what the server shows by default.
PROVENANCE_KEYS = (
    "architecture", "loss", "dataset", "preset", "steps", "ema", "precision", "parity_atol", "torch_version",
    "onnx_version", "checkpoint_sha256", "created", "config",
)  # fmt: skip
# `directions` (tens of kilobytes of numbers) is described by its own fields on every wire, not as metadata.
DOCUMENTED_KEYS = (*(k for k in SPEC_KEYS if k != "directions"), *(k for k in PROVENANCE_KEYS if k != "config"))
DIRECTION_KINDS = ("sefa", "attribute")  # closed-form from the weights (SeFa); fitted to an image statistic
DIRECTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_DIRECTIONS = 64
MAX_SEED = 2**64 - 1
_SQRT3 = np.float32(math.sqrt(3.0))


class ContractError(ValueError):
    """A model file, or a spec, that does not honour the contract; the message says which key and how."""


@dataclass(frozen=True)
class Direction:
    """A named direction in z: z + s·vector moves one thing about the image as s grows (README "Latent
    directions"). `vector` has unit length; `per_class`, when given, holds one unit vector per class, for
    conditional models whose classes move the same attribute along different directions."""

    name: str
    kind: str  # one of DIRECTION_KINDS
    description: str
    vector: tuple[float, ...]
    per_class: tuple[tuple[float, ...], ...] = ()

    def check(self, where: str, latent_dim: int, num_classes: int) -> None:
        if not DIRECTION_NAME.fullmatch(self.name):
            raise ContractError(f"{where}.name: {self.name[:40]!r} is not a name of [a-z0-9_], at most 32 long")
        if self.kind not in DIRECTION_KINDS:
            raise ContractError(f"{where}.kind: {self.kind[:40]!r} is not one of {', '.join(DIRECTION_KINDS)}")
        if self.per_class and len(self.per_class) != num_classes:
            raise ContractError(f"{where}.per_class: {len(self.per_class)} vectors for {num_classes} classes")
        for i, v in enumerate((self.vector, *self.per_class)):
            path = f"{where}.vector" if i == 0 else f"{where}.per_class[{i - 1}]"
            a = np.asarray(v, np.float64)
            if a.shape != (latent_dim,) or not np.all(np.isfinite(a)) or abs(np.linalg.norm(a) - 1) > 1e-3:
                raise ContractError(f"{path}: needs {latent_dim} finite numbers of unit length")

    def along(self, y: np.ndarray | None) -> np.ndarray:
        """float32 [n, latent_dim]: the direction for each label row of y [n, num_classes] (soft labels blend the
        classes' vectors, then the blend is made unit length again), or [1, latent_dim] when it is shared."""
        if not self.per_class or y is None:
            return self._vectors[:1]
        v = y @ self._vectors[1:]
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.float32(1e-12))

    @functools.cached_property
    def _vectors(self) -> np.ndarray:
        return np.asarray((self.vector, *self.per_class), np.float32)

    def to_json(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "description": self.description, "vector": list(self.vector)}
        return out | ({"per_class": [list(v) for v in self.per_class]} if self.per_class else {})

    @classmethod
    def from_json(cls, value: object, where: str) -> Direction:
        if not isinstance(value, dict) or not {"name", "kind", "vector"} <= set(value):
            raise ContractError(f"{where}: needs an object with name, kind and vector")
        try:
            return cls(
                str(value["name"]), str(value["kind"]), str(value.get("description", ""))[:200],
                tuple(float(x) for x in value["vector"]),
                tuple(tuple(float(x) for x in v) for v in value.get("per_class", ())),
            )  # fmt: skip
        except (TypeError, ValueError) as e:
            raise ContractError(f"{where}: unreadable numbers ({e})") from None


@dataclass(frozen=True)
class ModelSpec:
    """What a generator file promises: its kind, latent space, classes and output."""

    kind: str
    latent_dim: int
    prior: str
    class_names: tuple[str, ...]
    output_shape: tuple[int, ...]  # one sample: [C, H, W] for images, [2] for points
    output_range: tuple[float, float] | None  # None: unbounded (points)
    directions: tuple[Direction, ...] = ()
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
        if len(self.directions) > MAX_DIRECTIONS:
            raise ContractError(f"directions: {len(self.directions)} given, at most {MAX_DIRECTIONS}")
        for i, d in enumerate(self.directions):
            d.check(f"directions[{i}]", self.latent_dim, self.num_classes)
        if len({d.name for d in self.directions}) != len(self.directions):
            raise ContractError("directions: names must be distinct")
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
            **({"directions": json.dumps([d.to_json() for d in self.directions])} if self.directions else {}),
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
            except (ValueError, TypeError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
                why = "nested too deep" if isinstance(e, RecursionError) else e
                raise ContractError(f"{key}: unreadable value {need(key)[:64]!r} ({why})") from None

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
        directions = ()
        if "directions" in meta:
            if int(version) < 3:
                raise ContractError(f"directions: format {version} files have none; format 3 added them")
            listed = parse("directions", _json_list)
            if len(listed) > MAX_DIRECTIONS:
                raise ContractError(f"directions: {len(listed)} given, at most {MAX_DIRECTIONS}")
            directions = tuple(Direction.from_json(d, f"directions[{i}]") for i, d in enumerate(listed))
        provenance = {k: v for k, v in meta.items() if k not in SPEC_KEYS}
        return cls(kind, parse("latent_dim", int), need("prior"), class_names, shape, out_range, directions, provenance)

    def check_signature(self, inputs: Mapping[str, tuple[str, Sequence]], outputs: Mapping[str, tuple[str, Sequence]]):
        """Check the graph against the spec: inputs and outputs as {name: (type, shape)}, as ONNX Runtime has them."""
        _check_matrices(inputs, {"z": self.latent_dim} | ({"y": self.num_classes} if self.num_classes else {}), "input")
        if "images" not in outputs:
            raise ContractError(f"outputs {sorted(outputs)} lack 'images'")
        kind, shape = outputs["images"]
        if kind != "tensor(float)" or list(shape[1:]) != list(self.output_shape):
            dims = ", ".join(map(str, self.output_shape))
            raise ContractError(f"output images: expected float [batch, {dims}], got {kind} {list(shape)}")


ENCODER_KIND = "encoder"
ENCODER_KEYS = (
    "format_version",
    "kind",
    "generator_sha256",
    "latent_dim",
    "class_names",
    "image_shape",
    "output_range",
)
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder file (encoder.onnx, beside its generator's model.onnx) promises: images as its generator
    draws them → the z (and class logits) that draw them. `generator_sha256` ties it to one generator file.

    Graph: input images float32 [batch, *image_shape] in output_range; outputs z [batch, latent_dim] and, for a
    conditional generator, logits [batch, num_classes].
    """

    generator_sha256: str
    latent_dim: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]
    output_range: tuple[float, float]
    provenance: Mapping[str, str] = field(default_factory=dict, compare=False)

    def to_metadata(self) -> dict[str, str]:
        return {
            "format_version": str(FORMAT_VERSION), "kind": ENCODER_KIND, "generator_sha256": self.generator_sha256,
            "latent_dim": str(self.latent_dim), "class_names": json.dumps(list(self.class_names)),
            "image_shape": json.dumps(list(self.image_shape)), "output_range": json.dumps(list(self.output_range)),
            **self.provenance,
        }  # fmt: skip

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> EncoderSpec:
        missing = [k for k in ENCODER_KEYS if k not in meta]
        if missing:
            raise ContractError(f"metadata_props lacks {missing[0]!r}")
        if meta["kind"] != ENCODER_KIND:
            raise ContractError(f"kind: {meta['kind'][:32]!r} is not an encoder's ({ENCODER_KIND!r})")
        if meta["format_version"] not in [str(v) for v in READABLE_FORMATS if v >= 3]:
            raise ContractError(
                f"format_version: {meta['format_version'][:16]!r} is not an encoder format this reader knows (3 on)"
            )
        if not SHA256.fullmatch(meta["generator_sha256"]):
            raise ContractError("generator_sha256: not a SHA-256 in hex")
        try:
            spec = cls(
                meta["generator_sha256"], int(meta["latent_dim"]),
                tuple(str(c) for c in _json_list(meta["class_names"])),
                tuple(int(d) for d in _json_list(meta["image_shape"])),
                tuple(float(x) for x in _json_list(meta["output_range"])),
                {k: v for k, v in meta.items() if k not in ENCODER_KEYS},
            )  # fmt: skip
        except (ValueError, TypeError, RecursionError) as e:
            raise ContractError(
                f"unreadable encoder metadata ({'nested too deep' if isinstance(e, RecursionError) else e})"
            ) from None
        if len(spec.output_range) != 2:
            raise ContractError("output_range: needs [lo, hi]")
        return spec

    def check(self, generator: ModelSpec, generator_sha256: str) -> None:
        """That this encoder was made for this very generator file; ContractError says how it is not."""
        if self.generator_sha256 != generator_sha256:
            raise ContractError(
                f"generator_sha256: made for the generator {self.generator_sha256[:12]}…, not this model.onnx"
                f" ({generator_sha256[:12]}…)"
            )
        mine = (self.latent_dim, self.class_names, self.image_shape, self.output_range)
        theirs = (generator.latent_dim, generator.class_names, generator.output_shape, generator.output_range)
        if mine != theirs:
            raise ContractError(f"spec: latent_dim, classes, image shape and range {mine} differ from model.onnx's")

    def check_signature(self, inputs: Mapping[str, tuple[str, Sequence]], outputs: Mapping[str, tuple[str, Sequence]]):
        if list(inputs) != ["images"] or inputs["images"][0] != "tensor(float)":
            raise ContractError(f"inputs {sorted(inputs)}: an encoder takes one float input, 'images'")
        if list(inputs["images"][1][1:]) != list(self.image_shape):
            raise ContractError(f"input images: expected [batch, {', '.join(map(str, self.image_shape))}]")
        classes = len(self.class_names)
        _check_matrices(outputs, {"z": self.latent_dim} | ({"logits": classes} if classes else {}), "output")


def file_sha256(path) -> str:
    """Hex SHA-256 of a file, read a megabyte at a time: what ties an encoder to its generator."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_encoder(session) -> EncoderSpec:
    """The spec of a loaded encoder session, its graph checked against it (duck-typed, as read_spec)."""
    spec = EncoderSpec.from_metadata(session.get_modelmeta().custom_metadata_map)
    spec.check_signature(*_signature(session))
    return spec


def _check_matrices(tensors: Mapping[str, tuple[str, Sequence]], expected: Mapping[str, int], what: str) -> None:
    """That the graph's inputs (or outputs) are exactly `expected`, each float [batch, width]."""
    if set(tensors) != set(expected):
        raise ContractError(f"{what}s {sorted(tensors)} do not match the metadata (expected {sorted(expected)})")
    for name, width in expected.items():
        kind, shape = tensors[name]
        if kind != "tensor(float)" or len(shape) != 2 or shape[1] != width:
            raise ContractError(f"{what} {name}: expected float [batch, {width}], got {kind} {list(shape)}")


def _signature(session) -> tuple[dict, dict]:
    """A session's inputs and outputs as {name: (type, shape)}."""
    return tuple(
        {a.name: (a.type, list(a.shape)) for a in args} for args in (session.get_inputs(), session.get_outputs())
    )


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
    spec.check_signature(*_signature(session))
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
