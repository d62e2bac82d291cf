"""Editing directions in z, computed from an exported generator file itself, and how well they edit.

Two kinds (gan-facts.md, "Editing directions"), stored in the file's metadata through the contract (format 3):
  sefa1..sefaK  closed form (SeFa, Shen & Zhou 2021): the top eigenvectors of AᵀA, where A is the weight of the
                first layer that maps z, read from the ONNX graph;
  ink, slant, width
                fitted on the generator's own samples (InterFaceGAN's recipe, Shen et al. 2020, with honest image
                statistics as the labeller): the least-squares direction in z of each statistic, one per class
                for conditional models when that predicts held-out samples better than one for all.
Every vector has unit length, so that strength s moves z by s standard deviations of the prior along it.

    python -m training.directions add models/NAME/V/model.onnx      # publish NAME/V+1: V with directions
    python -m training.directions measure models/NAME/V/model.onnx  # monotonicity and label accuracy
`training.export` attaches them to every export.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from service import encode
from service.contract import ContractError, Direction, ModelSpec, read_spec, seed_latents

SEFA_COUNT = 5
FIT_PER_CLASS = 1000  # samples per class (all of them, for an unconditional model) the attributes are fitted on
CHECK_PER_CLASS = 300  # held-out samples that choose between per-class and shared vectors
FIT_SEED = 1_000_000_000  # seeds of their own, apart from the evaluator's 0..n and the measurement's
CHECK_SEED = 1_100_000_000
MEASURE_SEED = 2_000_000_000
STRENGTHS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
ATTRIBUTES = {
    "ink": "stroke thickness: the share of the image that is ink",
    "slant": "slant: how far the strokes lean, positive to the right",
    "width": "width: the horizontal spread of the ink, slant removed",
}
RUN_BATCH = 500
DIGITS = 6  # decimals kept in the file; JSON gives back exactly these floats


class DirectionsError(Exception):
    """A file whose directions cannot be computed or measured; the message says why."""


# ---- closed form -------------------------------------------------------------------------------------


def first_layer(model: onnx.ModelProto, latent_dim: int) -> np.ndarray:
    """A [out, latent_dim]: the weight that multiplies z in the first linear layer it enters (Gemm or MatMul), found
    through Cast, Identity and a Concat that puts z first (z with y, for concatenating conditional generators)."""
    weights = {init.name: init for init in model.graph.initializer}
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    name = "z"
    for _ in range(8):
        nodes = consumers[name]
        if len(nodes) != 1:
            break
        node = nodes[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("Cast", "Identity") or (node.op_type == "Concat" and node.input[0] == name):
            name = node.output[0]
            continue
        if node.op_type in ("Gemm", "MatMul") and node.input[0] == name and node.input[1] in weights:
            w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)  # [in, out], or [out, in] if transB
            if attrs.get("transA", 0):
                break
            w = (w if attrs.get("transB", 0) else w.T) * attrs.get("alpha", 1.0)
            return w[:, :latent_dim]
        break
    raise DirectionsError("z does not enter a linear layer with constant weights, so SeFa does not apply")


def sefa(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k eigenvectors of AᵀA [k, d] (unit rows; each signed so that its largest entry is positive) and the
    share of AᵀA's trace each eigenvalue holds."""
    _, s, vt = np.linalg.svd(a, full_matrices=False)  # AᵀA = V S² Vᵀ
    vt = vt[:k] * np.sign(vt[:k][np.arange(min(k, len(vt))), np.abs(vt[:k]).argmax(1)])[:, None]
    return vt, (s[:k] ** 2) / np.sum(s**2)


# ---- image statistics --------------------------------------------------------------------------------


def statistics(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """ink, slant and width of images [n, C, H, W] in [0, 1] (colour is averaged), from ink-weighted moments."""
    p = pixels.mean(1)
    h, w = p.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    mass = p.sum((1, 2)) + 1e-9
    cx, cy = (p * xs).sum((1, 2)) / mass, (p * ys).sum((1, 2)) / mass
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    mu20, mu02, mu11 = ((p * m).sum((1, 2)) / mass for m in (dx * dx, dy * dy, dx * dy))
    mu02 = np.maximum(mu02, 1e-9)
    return {
        "ink": mass / (h * w),
        "slant": -mu11 / mu02,  # rows grow downwards: a stroke leaning right has x falling as y grows
        "width": np.sqrt(np.maximum(mu20 - mu11**2 / mu02, 0.0)),
    }


class Sampler:
    """An exported image generator through ONNX Runtime: pixels in [0, 1] for latents and class indices."""

    def __init__(self, path: Path):
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.spec = read_spec(self.session)
        except ContractError as e:
            raise DirectionsError(f"{path}: does not honour the contract: {e}") from None
        except Exception as e:  # ONNX Runtime raises its own types for unreadable files
            raise DirectionsError(f"{path}: cannot load: {e}") from None

    def pixels(self, z: np.ndarray, labels: np.ndarray | None, y: np.ndarray | None = None) -> np.ndarray:
        spec, out = self.spec, []
        if y is None and spec.num_classes:
            y = np.eye(spec.num_classes, dtype=np.float32)[labels]
        for i in range(0, len(z), RUN_BATCH):
            feeds = {"z": np.ascontiguousarray(z[i : i + RUN_BATCH], np.float32)}
            if spec.num_classes:
                feeds["y"] = y[i : i + RUN_BATCH]
            out.append(self.session.run(["images"], feeds)[0])
        lo, hi = spec.output_range
        return (np.concatenate(out).astype(np.float64) - lo) / (hi - lo)

    def draw(self, seed: int, per_class: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """z, class indices and statistics of per_class samples per class (per_class in all if unconditional)."""
        classes = max(1, self.spec.num_classes)
        labels = np.repeat(np.arange(classes), per_class)
        z = seed_latents(range(seed, seed + len(labels)), self.spec.latent_dim, self.spec.prior)
        return z, labels, statistics(self.pixels(z, labels))


def _fit(z: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The least-squares direction of s in z, unit length."""
    w, *_ = np.linalg.lstsq(z - z.mean(0), s - s.mean(), rcond=None)
    return w / np.linalg.norm(w)


def _centred_by_class(s: np.ndarray, labels: np.ndarray) -> np.ndarray:
    means = np.array([s[labels == c].mean() for c in range(labels.max() + 1)])
    return s - means[labels]


def _agreement(z: np.ndarray, s: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> float:
    """Mean over classes of the correlation between the statistic and z's projection on the class's vector."""
    return float(np.mean([np.corrcoef(z[labels == c] @ vectors[c], s[labels == c])[0, 1] for c in range(len(vectors))]))


def _rounded(v: np.ndarray) -> tuple[float, ...]:
    v = v / np.linalg.norm(v)
    return tuple(round(float(x), DIGITS) for x in v)


def compute(path: Path) -> tuple[tuple[Direction, ...], dict[str, Any]]:
    """The directions of the generator at `path`, and what chose them (eigenvalue shares, held-out agreement)."""
    sampler = Sampler(path)
    spec = sampler.spec
    found: list[Direction] = []
    facts: dict[str, Any] = {}
    try:
        vectors, shares = sefa(first_layer(onnx.load(str(path)), spec.latent_dim), min(SEFA_COUNT, spec.latent_dim))
        for k, (v, share) in enumerate(zip(vectors, shares, strict=True), 1):
            text = f"closed form (SeFa): eigenvector {k} of AᵀA for z's first layer A, {share:.1%} of its energy"
            found.append(Direction(f"sefa{k}", "sefa", text, _rounded(v)))
        facts["sefa_shares"] = [round(float(x), 4) for x in shares]
    except DirectionsError as e:
        facts["sefa"] = str(e)
    if spec.kind != "image":
        return tuple(found), facts
    z, labels, stats = sampler.draw(FIT_SEED, FIT_PER_CLASS)
    z_check, labels_check, stats_check = sampler.draw(CHECK_SEED, CHECK_PER_CLASS)
    classes = max(1, spec.num_classes)
    for name, text in ATTRIBUTES.items():
        if np.std(_centred_by_class(stats[name], labels)) < 1e-6:
            facts[name] = "no variation in the samples: nothing to fit"
            continue
        shared = _fit(z, _centred_by_class(stats[name], labels))
        per_class = np.stack([_fit(z[labels == c], stats[name][labels == c]) for c in range(classes)])
        scores = {
            "shared": _agreement(z_check, stats_check[name], labels_check, np.repeat(shared[None], classes, 0)),
            "per_class": _agreement(z_check, stats_check[name], labels_check, per_class),
        }
        use_per_class = spec.num_classes > 0 and scores["per_class"] > scores["shared"]
        facts[name] = {k: round(v, 4) for k, v in scores.items()} | {
            "chosen": "per_class" if use_per_class else "shared"
        }
        found.append(
            Direction(
                name, "attribute", text, _rounded(shared),
                tuple(_rounded(v) for v in per_class) if use_per_class else (),
            )
        )  # fmt: skip
    return tuple(found), facts


def attach(path: Path, spec: ModelSpec) -> ModelSpec:
    """Compute the directions of the file at `path` (which honours `spec`) and write them into its metadata."""
    directions, _ = compute(path)
    spec = dataclasses.replace(spec, directions=directions)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, spec.to_metadata())
    onnx.save_model(model, str(path), save_as_external_data=False)
    return spec


# ---- how well they edit ------------------------------------------------------------------------------


def measure(
    path: Path, classifier: Path | None = None, per_class: int = 50, strengths=STRENGTHS, figure: Path | None = None
) -> dict[str, Any]:
    """For each direction: the share of samples whose statistics move monotonically over `strengths` (strictly
    rising, or falling), each statistic's mean change from the first strength to the last, and the classifier's
    label accuracy at each strength (conditional models) or the share whose predicted class stays that of
    strength 0. `figure`: a PNG with a row per direction (seed MEASURE_SEED, first class), a column per strength."""
    from training import classifier as clf

    sampler = Sampler(path)
    spec = sampler.spec
    if spec.kind != "image":
        raise DirectionsError(f"{path}: only image generators have attributes to measure")
    if not spec.directions:
        raise DirectionsError(f"{path}: has no directions; add them with `python -m training.directions add`")
    try:
        model, _, digest = clf.load(classifier or clf.BUNDLED)
    except clf.ClassifierError as e:
        raise DirectionsError(str(e)) from None
    classes = max(1, spec.num_classes)
    labels = np.repeat(np.arange(classes), per_class)
    z = seed_latents(range(MEASURE_SEED, MEASURE_SEED + len(labels)), spec.latent_dim, spec.prior)
    y = np.eye(spec.num_classes, dtype=np.float32)[labels] if spec.num_classes else None
    out: dict[str, Any] = {"model": str(path), "classifier_sha256": digest, "samples": len(z),
                           "strengths": list(strengths), "directions": {}}  # fmt: skip
    rows = []
    for d in spec.directions:
        v = d.along(y)
        pixels = np.stack([sampler.pixels(z + s * v, labels) for s in strengths])  # [strength, n, C, H, W]
        rows.append(pixels[:, 0])
        stats = [statistics(p) for p in pixels]
        predicted = np.stack([clf.run(model, p)[1].argmax(1) for p in pixels])  # [strength, n]
        entry: dict[str, Any] = {"kind": d.kind, "monotonic": {}, "change": {}}
        for name in ATTRIBUTES:
            series = np.stack([st[name] for st in stats])  # [strength, n]
            steps = np.diff(series, axis=0)
            entry["monotonic"][name] = float(np.mean(np.all(steps > 0, 0) | np.all(steps < 0, 0)))
            entry["change"][name] = float(np.mean(series[-1] - series[0]))
        if spec.num_classes:
            entry["label_accuracy"] = [float(np.mean(p == labels)) for p in predicted]
        else:
            middle = predicted[list(strengths).index(0.0)] if 0.0 in strengths else predicted[len(strengths) // 2]
            entry["label_kept"] = [float(np.mean(p == middle)) for p in predicted]
        out["directions"][d.name] = entry
    if figure is not None:
        figure.write_bytes(encode.png(encode.grid(encode.to_uint8(np.concatenate(rows), (0.0, 1.0)), len(strengths))))
    return out


def table(result: dict[str, Any]) -> str:
    """The measurement as a Markdown table: monotonic share of the direction's own statistic, label accuracy."""
    lines = ["| direction | monotonic: ink / slant / width | mean change -3 → 3: ink / slant / width |"
             " label accuracy (min over strengths) |", "|---|---|---|---|"]  # fmt: skip
    for name, e in result["directions"].items():
        mono = " / ".join(f"{'**' if k == name else ''}{e['monotonic'][k]:.0%}{'**' if k == name else ''}"
                          for k in ATTRIBUTES)  # fmt: skip
        change = " / ".join(f"{e['change'][k]:+.3f}" for k in ATTRIBUTES)
        acc = e.get("label_accuracy", e.get("label_kept"))
        lines.append(f"| {name} | {mono} | {change} | {min(acc):.1%} |")
    return "\n".join(lines)


def add(path: Path) -> Path:
    """Publish the file at `path` again, directions attached, as the next version of its model (the weights and the
    rest of the metadata unchanged; the format becomes 3). For files exported before directions existed."""
    from training.export import publish

    spec = Sampler(path).spec
    root = path.parent.parent
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    staging.chmod(0o755)
    try:
        shutil.copyfile(path, staging / "model.onnx")
        attach(staging / "model.onnx", dataclasses.replace(spec, directions=()))
        if Sampler(staging / "model.onnx").spec.directions == ():
            raise DirectionsError(f"{path}: no direction could be computed")
        return publish(staging, root) / "model.onnx"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.directions", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="publish the model again, directions attached, as its next version")
    a.add_argument("model", type=Path)
    m = sub.add_parser("measure", help="monotonicity and label accuracy of each direction, strengths -3..3")
    m.add_argument("model", type=Path)
    m.add_argument("--per-class", type=int, default=50, help="samples per class (default 50)")
    m.add_argument("--classifier", type=Path, help="default: the bundled mnist5k classifier")
    m.add_argument("--json", type=Path, help="also write the figures here")
    m.add_argument("--figure", type=Path, help="a PNG: a row per direction, a column per strength")
    args = p.parse_args(argv)
    try:
        if args.command == "add":
            print(add(args.model))
            return 0
        result = measure(args.model, args.classifier, args.per_class, figure=args.figure)
    except DirectionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
