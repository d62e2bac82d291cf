"""Score an exported generator (the ONNX file the service loads), offline.

    python -m training.evaluate models/mnist-cdcgan/2/model.onnx [--n 10000] [--json out.json]
        [--neighbours docs/neighbours.png] [--classifier A.pt --classifier B.pt] [--fid-draws 10] [--fid-boot 10]

Everything about the model comes from its metadata, read through service/contract.py: latent dim, prior,
classes, output range, and the training config (dataset) from its provenance. Latents follow the contract's
seed → z mapping with seeds 0..n-1, so every score is reproducible through the API.

Real data: the dataset's train split and its held-out split (mnist5k: 450 / 50 digits per class).
  images   the protocol of training/protocol.py under each feature extractor (mnist5k: two bundled ones,
           side by side): KID with its standard error, FID∞ and equal-n FID, precision/recall and label
           accuracy with bootstrap intervals, each beside a real-vs-real floor at the same n; the Parzen
           log-likelihood (paper protocol); with --neighbours, the memorisation check of training/neighbours.py;
           with --cas, conditional models: the classification accuracy score under each extractor's recipe
  points   VEEGAN/PacGAN mode coverage on ring8 / grid25, and a scatter plot
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from service.contract import ContractError, read_spec, seed_latents
from training import classifier as clf_mod
from training import data as data_mod
from training import neighbours as neighbours_mod
from training import protocol, scores, viz
from training.config import POINT_DATASETS, ConfigError, TrainConfig
from training.data import DataError

POINT_SAMPLES = 2500  # the VEEGAN/PacGAN protocol
IMAGE_SAMPLES = 10_000  # the Parzen protocol, and the usual FID sample count
MIN_IMAGE_SAMPLES = 20
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
    """Pixels in [0, 1] and labels of one split; cached, so an evaluation reads each split once.

    A folder has no splits: every 10th image is held out, as when its classifier was trained."""
    d = data_mod.load(cfg.replace(split=split))
    x, y = d.images.numpy().astype(np.float64) / 255.0, d.labels.numpy()
    if cfg.dataset == "folder":
        held = np.arange(len(y)) % 10 == 0
        keep = held if split == "test" else ~held
        x, y = x[keep], y[keep]
    return x, y


@functools.lru_cache(maxsize=4)
def _real_features(path: Path, digest: str, cfg: TrainConfig):
    """(features, probs) of the train and held-out splits; cached, since every evaluation needs the same ones."""
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


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _classifiers(cfg: TrainConfig, given: Path | Sequence[Path] | None) -> list[Path]:
    if given:
        return [given] if isinstance(given, Path) else list(given)
    return [clf_mod.BUNDLED, clf_mod.BUNDLED_SECOND] if cfg.dataset == "mnist5k" else []


def classification_accuracy_score(
    fake: np.ndarray, asked: np.ndarray, n_real: int, held: tuple[np.ndarray, np.ndarray], info: dict[str, Any],
    rng: np.random.Generator, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """CAS (Ravuri & Vinyals 2019; GAN-train in Shmelkov et al. 2018): the extractor's own recipe (architecture,
    epochs, seed) trained on the first `n_real` samples only, with their requested labels, and tested on the real
    held-out digits. The extractor itself is that recipe trained on `n_real` real digits: the reference. A generator
    that draws each class in one style scores well on label accuracy and badly here."""
    n = min(len(fake), n_real)
    x, y = torch.as_tensor(fake[:n], dtype=torch.float32), torch.as_tensor(asked[:n])
    net = clf_mod.fit(info["arch"], x, y, len(info["class_names"]), info["epochs"], info["seed"], progress)
    _, probs = clf_mod.run(net, held[0])
    accuracy = protocol.interval((probs.argmax(1) == held[1]).astype(np.float64), rng, strata=held[1])
    return {"n_train": n, "n_real": n_real, "n_test": len(held[1]), "epochs": info["epochs"], "accuracy": accuracy}


def evaluate_images(
    model: Model, n: int, cfg: TrainConfig, classifiers: list[Path], seed: int, neighbours: Path | None,
    fid: tuple[int, int], cas: bool = False, progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    if n < MIN_IMAGE_SAMPLES:
        raise EvaluationError(f"n: image models need at least {MIN_IMAGE_SAMPLES} samples (got {n})")
    fake = model.pixels(model.generate(n))
    train_x, train_y = _real(cfg, "train")
    held_x, held_y = _real(cfg, "test")
    if fake.shape[1:] != held_x.shape[1:]:
        raise EvaluationError(f"dataset: {cfg.dataset} images are {held_x.shape[1:]}, the model makes {fake.shape[1:]}")
    if neighbours and not classifiers:
        raise EvaluationError(f"neighbours: needs a classifier for {cfg.dataset} (--classifier)")
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    val = parzen_split(held_y)
    pz = scores.parzen(flat(fake), flat(held_x[val]), flat(held_x[~val]))
    result: dict[str, Any] = {
        "samples": n,
        "real": {"train": len(train_y), "held_out": len(held_y)},
        "parzen": {"mean": pz.mean, "stderr": pz.stderr, "sigma": pz.sigma, "test_images": int((~val).sum())},
    }
    if not classifiers:
        result["features"] = f"no classifier for {cfg.dataset}: train one with python -m training.classifier"
        return result
    extractors, features = [], []
    for i, path in enumerate(classifiers):
        net, info, digest = clf_mod.load(path)
        if tuple(info["image_shape"]) != fake.shape[1:]:
            shape = info["image_shape"]
            raise EvaluationError(f"classifier: {path} takes {shape} images, the model makes {fake.shape[1:]}")
        f_fake, p_fake = clf_mod.run(net, fake)
        (f_train, p_train), (f_held, p_held) = _real_features(path, digest, cfg)
        names = model.spec.class_names
        same_classes = bool(names) and tuple(info["class_names"]) == names
        e: dict[str, Any] = {"classifier": {
            "path": _shown(path), "arch": info["arch"], "sha256": digest, "features": f_fake.shape[1],
            "held_out_accuracy": info["held_out_accuracy"], "held_out_images": info["held_out_images"],
        }}  # fmt: skip
        e |= protocol.score(
            f_fake, p_fake, protocol.Real(f_train, p_train, train_y), protocol.Real(f_held, p_held, held_y),
            np.random.default_rng([seed, i]), model.labels(n) if same_classes else None, *fid,
        )  # fmt: skip
        if same_classes:
            c = e["conditional"]
            c["per_class_accuracy"] = dict(zip(names, c["per_class_accuracy"], strict=True))
            if cas:
                c["cas"] = classification_accuracy_score(
                    fake, model.labels(n), len(train_y), (held_x, held_y), info, np.random.default_rng([seed, i]),
                    progress,
                )  # fmt: skip
        elif names:
            e["conditional_skipped"] = "the classifier's classes are not the model's"
        extractors.append(e)
        features.append((f_fake, f_train, f_held))
    result |= extractors[0] | {"other_extractors": extractors[1:]}
    if neighbours:
        labels = model.labels(n) if model.spec.num_classes else None
        result["memorisation"] = neighbours_mod.check(fake, train_x, held_x, features[0], labels, neighbours)
    return result


def evaluate(
    path: Path, n: int | None = None, dataset: str | None = None, data_dir: str | None = None,
    classifier: Path | Sequence[Path] | None = None, scatter: Path | None = None, seed: int = 0,
    neighbours: Path | None = None, draws: int = scores.FID_DRAWS, boot: int = scores.FID_BOOT, cas: bool = False,
    progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """All scores for one ONNX generator, as a JSON-ready dict. draws, boot: FID∞'s draws per n and bootstrap
    copies (scores.fid_infinity); cas: also the classification accuracy score (trains one classifier per
    extractor, seconds to minutes each)."""
    model = Model(path)
    dataset = dataset or model.config.dataset
    result: dict[str, Any] = {"model": str(path), "dataset": dataset, "preset": model.config.preset}
    if model.spec.kind == "points":
        if neighbours:
            raise EvaluationError("neighbours: a memorisation check needs an image model")
        return result | evaluate_points(model, n or POINT_SAMPLES, scatter)
    if dataset in POINT_DATASETS:
        raise EvaluationError(f"dataset: {dataset} is 2-D; this model makes images {list(model.spec.output_shape)}")
    if draws < 2 or boot < 0:
        raise EvaluationError(f"fid_draws: must be at least 2, fid_boot at least 0 (got {draws}, {boot})")
    # Only the data fields: real splits and their features are cached by this config, across models.
    m = model.config
    cfg = TrainConfig(
        dataset=dataset, data_dir=m.data_dir if data_dir is None else data_dir, image_size=m.image_size,
        channels=m.channels,
    )  # fmt: skip
    return result | evaluate_images(
        model, n or IMAGE_SAMPLES, cfg, _classifiers(cfg, classifier), seed, neighbours, (draws, boot), cas, progress
    )


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def _pm(value: float, se: float) -> str:
    return f"{_fmt(value)} ± {se:.2g}"


def _ci(d: dict[str, Any], scale: float = 1, digits: int = 3) -> str:
    lo, hi = d["ci95"]
    return f"{scale * d['value']:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def _image_rows(e: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(row label, model, floor) for one extractor; the labels state every n."""
    rows = []
    for key, title in (("", "vs held-out"), ("vs_train", "vs train half")):
        s = e[key] if key else e
        n, fi, f = s["n"], s["fid_inf"], s["fid"]
        seen = " (seen in training)" if key else " (unseen)"
        rows.append((f"{title}: {n['reference']} real{seen}", "", ""))
        kid = s["kid"]
        label = f"  KID, model n={n['model']}, floor n={n['floor']}"
        rows.append((label, _pm(kid["model"], kid["model_se"]), _pm(kid["floor"], kid["floor_se"])))
        label = f"  FID∞, fit over n={fi['ns'][0]}–{fi['ns'][-1]}/side"
        rows.append((label, _pm(fi["model"], fi["model_se"]), _pm(fi["floor"], fi["floor_se"])))
        rows.append((f"  FID, n={f['n']}/side (ratio {f['ratio']:.2f}×)", _fmt(f["model"]), _fmt(f["floor"])))
    pr = e["precision_recall"]
    for what in ("precision", "recall"):
        label = f"{what} k={pr['k']}, manifold {pr['manifold']}, 95% CI"
        rows.append((label, _ci(pr["model"][what]), _ci(pr["floor"][what])))
    i = e["inception_score"]
    rows.append((f"classifier IS, n={i['n']}", f"{i['model']:.3f}", f"{i['floor']:.3f}"))
    if "conditional" in e:
        c = e["conditional"]
        acc = {"value": c["label_accuracy"], "ci95": c["label_accuracy_ci95"]}
        held = c["held_out_accuracy"]
        rows.append((f"label accuracy %, n={c['n']} | {held['n']} real", _ci(acc, 100, 2), _ci(held, 100, 2)))
        if c["intra_kid"]:
            k, per = c["intra_kid"], c["intra_kid"]["n_per_class"]
            label = f"intra-class KID, {per['model']}|{per['floor']} vs {per['reference']}/class"
            rows.append((label, _pm(k["model"], k["model_se"]), _pm(k["floor"], k["floor_se"])))
        if "cas" in c:
            s = c["cas"]
            label = f"CAS %, trained on {s['n_train']} fake | {s['n_real']} real, tested on {s['n_test']} held-out"
            rows.append((label, _ci(s["accuracy"], 100, 2), _ci(held, 100, 2)))
    return rows


def table(r: dict[str, Any]) -> str:
    """A readable summary: each extractor's model and real-vs-real floor side by side, every n stated."""
    lines = [f"{r['model']}  (dataset {r['dataset']}, preset {r['preset'] or '-'})"]
    if "modes" in r:
        row = lambda name, value: lines.append(f"  {name:<26}{value:>14}")  # noqa: E731
        row("modes captured", f"{r['modes']}/{r['total_modes']}")
        row("high-quality samples", f"{100 * r['high_quality']:.1f}%")
        row("reverse KL", f"{r['reverse_kl']:.4f}")
        return "\n".join(lines)
    pz, real = r["parzen"], r["real"]
    lines.append(
        f"  {r['samples']} samples (seeds 0..{r['samples'] - 1}); {real['train']} train, {real['held_out']} held-out"
    )
    lines.append(
        f"  Parzen log-likelihood {pz['mean']:.1f} ± {pz['stderr']:.1f} (σ={pz['sigma']:.3f}; {r['samples']} "
        f"kernel centres, {pz['test_images']} held-out test digits)"
    )
    if "classifier" not in r:
        lines.append(f"  {r['features']}")
        return "\n".join(lines)
    extractors = [r, *r["other_extractors"]]
    columns = [_image_rows(e) for e in extractors]
    width, cell = 46, 24
    names = [f"{e['classifier']['arch']} {e['classifier']['sha256'][:8]}" for e in extractors]
    lines.append(f"  {'':<{width}}" + "".join(f"{name:^{2 * cell}}  " for name in names))
    lines.append(f"  {'':<{width}}" + f"{'model':>{cell}}{'floor':>{cell}}  " * len(extractors))
    for i, (label, *_) in enumerate(columns[0]):
        cells = "".join(f"{col[i][1]:>{cell}}{col[i][2]:>{cell}}  " for col in columns)
        lines.append(f"  {label:<{width}}{cells}".rstrip())
    for e in extractors:
        cl = e["classifier"]
        lines.append(
            f"  extractor {cl['arch']}: {cl['path']} sha256 {cl['sha256'][:16]}…, {cl['features']}-d features, "
            f"held-out accuracy {cl['held_out_accuracy']:.4f} on {cl['held_out_images']}"
        )
    if "conditional" in r:
        per = " ".join(f"{k}:{100 * v:.1f}" for k, v in r["conditional"]["per_class_accuracy"].items())
        lines.append(f"  label accuracy % per class ({r['classifier']['arch']}): {per}")
    if "memorisation" in r:
        lines.extend(_memorisation_lines(r["memorisation"]))
    return "\n".join(lines)


def _memorisation_lines(m: dict[str, Any]) -> list[str]:
    n = m["pixels"]["n"]
    out = [f"  memorisation: distance to the nearest of {n['train']} train images, quantiles q01/q05/q50/q95"]
    q = lambda d: "/".join(f"{d[k]:.3g}" for k in ("q01", "q05", "q50", "q95"))  # noqa: E731
    for space in ("pixels", "features"):
        s = m[space]
        out.append(
            f"    {space:<9} samples (n={s['n']['samples']}) {q(s['samples'])}; held-out (n={s['n']['held_out']}) "
            f"{q(s['held_out'])}; median ratio {s['median_ratio']:.3f}; {100 * s['closer_than_held_q05']:.1f}% "
            "of samples nearer than the held-out q05 (about 5% without memorisation)"
        )
    out.append(f"    grid {m['grid']}, distance CDFs {m['plot']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an exported model.onnx")
    p.add_argument("--dataset", help="real data to compare with (default: the model's training dataset)")
    p.add_argument("--data-dir", help="where that dataset lives (mnist, fashion-mnist, cifar10, folder)")
    p.add_argument("--n", type=int, help=f"samples (default {IMAGE_SAMPLES} images, {POINT_SAMPLES} points)")
    p.add_argument("--classifier", type=Path, action="append",
                   help="feature extractor from python -m training.classifier; repeat for several, side by side "
                        "(default for mnist5k: the two bundled ones)")  # fmt: skip
    p.add_argument("--scatter", type=Path, help="2-D models: write a scatter plot of the samples here")
    p.add_argument("--neighbours", type=Path,
                   help="image models: write samples beside their nearest training images (pixel L2, features) "
                        "here, and NAME-distances.png beside it; report nearest-training distances")  # fmt: skip
    p.add_argument("--fid-draws", type=int, default=scores.FID_DRAWS, help="random draws per n in the FID∞ fit")
    p.add_argument("--fid-boot", type=int, default=scores.FID_BOOT,
                   help="bootstrap copies for FID∞'s standard error (0: the draws' part only; faster)")  # fmt: skip
    p.add_argument("--cas", action="store_true",
                   help="conditional models: the classification accuracy score, each extractor's recipe trained on "
                        "samples only and tested on real held-out images (one training per extractor)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="for random subsets, splits and bootstrap resamples")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    try:
        if args.n is not None and args.n < 2:
            raise EvaluationError(f"n: must be at least 2 (got {args.n})")
        result = evaluate(
            args.model, args.n, args.dataset, args.data_dir, args.classifier, args.scatter, args.seed,
            args.neighbours, args.fid_draws, args.fid_boot, args.cas, progress=args.cas,
        )  # fmt: skip
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
