"""Score an exported generator (the ONNX file the service loads), offline.

    python -m training.evaluate models/mnist-cdcgan/2/model.onnx [--dataset mnist5k] [--n 10000] [--json out.json]

Everything about the model comes from its metadata, read through service/contract.py: latent dim, prior,
classes, output range, and the training config (dataset) from its provenance. Latents follow the contract's
seed → z mapping with seeds 0..n-1, so every score is reproducible through the API.

Real data: the dataset's train split and its held-out split (mnist5k: 450 / 50 digits per class). Scores that
need real images use only the held-out part; the real-vs-real floor compares the train split with it.
  images   FID, KID, classifier Inception Score, precision/recall in the domain classifier's feature space,
           the Parzen-window log-likelihood (paper protocol); conditional models add label accuracy,
           a confusion matrix and intra-class FID
  points   VEEGAN/PacGAN mode coverage on ring8 / grid25, and a scatter plot
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.contract import ContractError, read_spec, seed_latents
from training import classifier as clf_mod
from training import data as data_mod
from training import scores, viz
from training.config import POINT_DATASETS, ConfigError, TrainConfig
from training.data import DataError

POINT_SAMPLES = 2500  # the VEEGAN/PacGAN protocol
IMAGE_SAMPLES = 10_000  # the Parzen protocol, and the usual FID sample count
VALIDATION_FRACTION = 0.2  # of each class's held-out images: Parzen's σ is chosen on these, scored on the rest
RUN_BATCH = 500


class EvaluationError(Exception):
    """The model cannot be scored as asked (metadata, dataset or classifier mismatch)."""


class Model:
    """An exported generator read through ONNX Runtime and the contract."""

    def __init__(self, path: Path):
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises its own types for unreadable files
            raise EvaluationError(f"{path}: cannot load: {e}") from None
        try:
            self.spec = read_spec(self.session)
        except ContractError as e:
            raise EvaluationError(f"{path}: not a generator this evaluator can read ({e})") from None
        if "config" not in self.spec.provenance:
            raise EvaluationError(f"{path}: its metadata lacks the training config (not from training.export)")
        try:
            self.config = TrainConfig.from_json(self.spec.provenance["config"])
        except ConfigError as e:
            raise EvaluationError(f"{path}: unusable training config in its metadata ({e})") from None

    def labels(self, n: int) -> np.ndarray:
        """Balanced requested labels: sample i asks for class i mod C."""
        return np.arange(n) % self.spec.num_classes

    def generate(self, n: int) -> np.ndarray:
        """Outputs for seeds 0..n-1 (and labels(n) for conditional models), in `output_range`."""
        out = []
        spec = self.spec
        y = np.eye(spec.num_classes, dtype=np.float32)[self.labels(n)] if spec.num_classes else None
        for i in range(0, n, RUN_BATCH):
            feeds = {"z": seed_latents(range(i, min(n, i + RUN_BATCH)), spec.latent_dim, spec.prior)}
            if y is not None:
                feeds["y"] = y[i : i + RUN_BATCH]
            out.append(self.session.run(None, feeds)[0])
        return np.concatenate(out)

    def pixels(self, images: np.ndarray) -> np.ndarray:
        """Images rescaled from output_range to [0, 1]."""
        lo, hi = self.spec.output_range
        return (images.astype(np.float64) - lo) / (hi - lo)


@functools.lru_cache(maxsize=8)
def _real(cfg: TrainConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [0, 1] and labels of one split; cached, so an evaluation reads each split once."""
    d = data_mod.load(cfg.replace(split=split))
    return d.images.numpy().astype(np.float64) / 255.0, d.labels.numpy()


@functools.lru_cache(maxsize=4)
def _real_features(path: Path, digest: str, cfg: TrainConfig):
    """Classifier outputs for the train and held-out splits; cached, since every evaluation needs the same ones."""
    net, _, _ = clf_mod.load(path)
    return clf_mod.run(net, _real(cfg, "train")[0]), clf_mod.run(net, _real(cfg, "test")[0])


def parzen_split(labels: np.ndarray) -> np.ndarray:
    """Mask of held-out images used to choose σ: the first VALIDATION_FRACTION of each class, in file order."""
    val = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val[idx[: max(1, round(len(idx) * VALIDATION_FRACTION))]] = True
    return val


def evaluate_points(model: Model, n: int, scatter: Path | None) -> dict[str, Any]:
    dataset = model.config.dataset
    if dataset not in POINT_DATASETS:
        raise EvaluationError(f"dataset: 2-D outputs need ring8 or grid25 (metadata says {dataset!r})")
    mix = data_mod.ring8() if dataset == "ring8" else data_mod.grid25()
    points, means = model.generate(n), mix.means.numpy()
    cov = scores.mode_coverage(points, means, mix.std)
    if scatter:
        viz.save_scatter(points, means, mix.std, scatter)
    return {
        "modes": cov.modes,
        "total_modes": len(means),
        "high_quality": cov.high_quality,
        "reverse_kl": cov.reverse_kl,
    }


def evaluate_images(model: Model, n: int, cfg: TrainConfig, classifier: Path | None, rng) -> dict[str, Any]:
    fake = model.pixels(model.generate(n))
    _, train_y = _real(cfg, "train")
    held_x, held_y = _real(cfg, "test")
    if fake.shape[1:] != held_x.shape[1:]:
        raise EvaluationError(f"dataset: {cfg.dataset} images are {held_x.shape[1:]}, the model makes {fake.shape[1:]}")
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    val = parzen_split(held_y)
    pz = scores.parzen(flat(fake), flat(held_x[val]), flat(held_x[~val]))
    result: dict[str, Any] = {
        "samples": n,
        "parzen": {"mean": pz.mean, "stderr": pz.stderr, "sigma": pz.sigma, "test_images": int((~val).sum())},
    }
    path = classifier or (clf_mod.BUNDLED if cfg.dataset == "mnist5k" else None)
    if path is None:
        result["features"] = f"no classifier for {cfg.dataset}: train one with python -m training.classifier"
        return result
    net, info, digest = clf_mod.load(path)
    if tuple(info["image_shape"]) != fake.shape[1:]:
        raise EvaluationError(f"classifier: trained on {info['image_shape']} images, the model makes {fake.shape[1:]}")
    f_fake, p_fake = clf_mod.run(net, fake)
    (f_train, _), (f_held, p_held) = _real_features(path, digest, cfg)
    m = min(len(f_held), n)  # precision/recall compare equal-sized sets
    held, sub = rng.choice(len(f_held), m, replace=False), rng.choice(len(f_train), m, replace=False)
    kid, kid_std = scores.kid(f_fake, f_held, rng)
    kid_floor, _ = scores.kid(f_train, f_held, rng)
    pr = scores.precision_recall(f_held[held], f_fake[:m])
    pr_floor = scores.precision_recall(f_held[held], f_train[sub])
    result["classifier"] = {"path": str(path), "sha256": digest, "held_out_accuracy": info["held_out_accuracy"]}
    result["fid"] = {"model": scores.fid(f_fake, f_held), "floor": scores.fid(f_train, f_held)}
    result["kid"] = {"model": kid, "model_std": kid_std, "floor": kid_floor}
    result["inception_score"] = {"model": scores.inception_score(p_fake), "floor": scores.inception_score(p_held)}
    result["precision"] = {"model": pr[0], "floor": pr_floor[0]}
    result["recall"] = {"model": pr[1], "floor": pr_floor[1]}
    if model.spec.class_names and tuple(info["class_names"]) != model.spec.class_names:
        result["conditional_skipped"] = "the classifier's classes are not the model's"
    elif model.spec.class_names:
        result["conditional"] = conditional_scores(model, n, (f_fake, p_fake), (f_train, train_y), (f_held, held_y))
    return result


def conditional_scores(model: Model, n: int, fake, train, held) -> dict[str, Any]:
    """Label accuracy, confusion, intra-class FID. fake: (features, probs); train, held: (features, labels)."""
    (f_fake, p_fake), (f_train, train_y), (f_held, held_y) = fake, train, held
    asked = model.labels(n)
    k = model.spec.num_classes
    confusion = np.zeros((k, k), int)
    np.add.at(confusion, (asked, p_fake.argmax(1)), 1)
    per_class = confusion.diagonal() / confusion.sum(1)
    intra = [scores.fid(f_fake[asked == c], f_held[held_y == c]) for c in range(k)]
    intra_floor = [scores.fid(f_train[train_y == c], f_held[held_y == c]) for c in range(k)]
    return {
        "label_accuracy": float(confusion.trace() / confusion.sum()),
        "per_class_accuracy": dict(zip(model.spec.class_names, per_class.tolist(), strict=True)),
        "confusion": confusion.tolist(),
        "intra_fid": {"model": float(np.mean(intra)), "floor": float(np.mean(intra_floor))},
    }


def evaluate(
    path: Path, n: int | None = None, dataset: str | None = None, data_dir: str | None = None,
    classifier: Path | None = None, scatter: Path | None = None, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """All scores for one ONNX generator, as a JSON-ready dict."""
    model = Model(path)
    dataset = dataset or model.config.dataset
    result: dict[str, Any] = {"model": str(path), "dataset": dataset, "preset": model.config.preset}
    if model.spec.kind == "points":
        return result | evaluate_points(model, n or POINT_SAMPLES, scatter)
    if dataset in POINT_DATASETS:
        raise EvaluationError(f"dataset: {dataset} is 2-D; this model makes images {list(model.spec.output_shape)}")
    where = {"data_dir": data_dir} if data_dir is not None else {}
    cfg = model.config.replace(dataset=dataset, conditional=False, **where)
    return result | evaluate_images(model, n or IMAGE_SAMPLES, cfg, classifier, np.random.default_rng(seed))


def table(r: dict[str, Any]) -> str:
    """A readable summary: one metric per line, the real-vs-real floor beside it."""
    lines = [f"{r['model']}  (dataset {r['dataset']}, preset {r['preset'] or '-'})"]
    row = lambda name, value, floor="": lines.append(f"  {name:<26}{value:>14}  {floor}")  # noqa: E731
    if "modes" in r:
        row("modes captured", f"{r['modes']}/{r['total_modes']}")
        row("high-quality samples", f"{100 * r['high_quality']:.1f}%")
        row("reverse KL", f"{r['reverse_kl']:.4f}")
        return "\n".join(lines)
    pz = r["parzen"]
    sigma = f"σ={pz['sigma']:.3f}, {pz['test_images']} test images"
    row("Parzen log-likelihood", f"{pz['mean']:.1f} ± {pz['stderr']:.1f}", sigma)
    if "fid" not in r:
        lines.append(f"  {r['features']}")
        return "\n".join(lines)
    lines.append(f"  {'':<26}{'model':>14}  real-vs-real floor")
    for key, label, fmt in [
        ("fid", "FID", ".3f"), ("kid", "KID", ".5f"), ("inception_score", "classifier IS", ".3f"),
        ("precision", "precision (k=3)", ".3f"), ("recall", "recall (k=3)", ".3f"),
    ]:  # fmt: skip
        row(label, format(r[key]["model"], fmt), format(r[key]["floor"], fmt))
    if "conditional" in r:
        c = r["conditional"]
        row("intra-class FID (mean)", f"{c['intra_fid']['model']:.3f}", f"{c['intra_fid']['floor']:.3f}")
        row("label accuracy", f"{100 * c['label_accuracy']:.2f}%")
        row("  per class", " ".join(f"{k}:{100 * v:.0f}" for k, v in c["per_class_accuracy"].items()))
    cl = r["classifier"]
    lines.append(
        f"  classifier {cl['path']} sha256 {cl['sha256'][:16]}…, held-out accuracy {cl['held_out_accuracy']:.4f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an exported model.onnx")
    p.add_argument("--dataset", help="real data to compare with (default: the model's training dataset)")
    p.add_argument("--data-dir", help="where that dataset lives (mnist, fashion-mnist, cifar10, folder)")
    p.add_argument("--n", type=int, help=f"samples (default {IMAGE_SAMPLES} images, {POINT_SAMPLES} points)")
    p.add_argument("--classifier", type=Path, help="feature extractor from python -m training.classifier")
    p.add_argument("--scatter", type=Path, help="2-D models: write a scatter plot of the samples here")
    p.add_argument("--seed", type=int, default=0, help="for KID subsets and precision/recall subsampling")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    try:
        if args.n is not None and args.n < 2:
            raise EvaluationError(f"n: must be at least 2 (got {args.n})")
        result = evaluate(args.model, args.n, args.dataset, args.data_dir, args.classifier, args.scatter, args.seed)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    except (EvaluationError, clf_mod.ClassifierError, ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
