"""Inversion offline, measured: a generator file and its encoder.onnx, with the server's own refinement
(service/inversion.py), on the held-out real digits of the evaluation protocol.

    python -m training.invert models/mnist-cdcgan/4/model.onnx --refine 400 --figure docs/inversion.png

For each held-out image: the reconstruction's distance to it in pixels (mean squared difference, [0, 1]) and in the
bundled classifier's features (squared distance of the 128-d penultimate layer), for the encoder alone and with the
refinement; beside two baselines, the nearest (in pixels) of 1,000 random seeds of the image's own class, and the
nearest training digit. Also the share of reconstructions the classifier reads as the input's label, and the time
of one inversion on this CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from service import encode, inversion
from service.config import RuntimeConfig
from service.contract import ContractError, file_sha256, seed_latents
from service.errors import FailedPrecondition
from service.repository import ENCODER_FILE
from service.runtime import EncoderSession
from training import classifier as clf
from training import data as data_mod
from training.config import TrainConfig
from training.directions import DirectionsError, Sampler

BASELINE_SEEDS = 1000  # random samples per class for the "nearest seed" baseline
BASELINE_SEED = 3_000_000_000


class InvertError(Exception):
    """A generator without a usable encoder, or data that cannot be read; the message says which."""


class Inverter:
    """model.onnx and the encoder.onnx beside it, through ONNX Runtime, as the server runs them."""

    def __init__(self, path: Path):
        try:
            self.generator = Sampler(path)  # the directions' sampler: the file through ONNX Runtime, pixels in [0, 1]
            self.spec = self.generator.spec
            self.encoder = EncoderSession(path.parent / ENCODER_FILE, RuntimeConfig())  # as the server loads it
            self.encoder.spec.check(self.spec, file_sha256(path))
        except (DirectionsError, ContractError, FailedPrecondition) as e:
            raise InvertError(f"{path}: {e}") from None
        except Exception as e:  # ONNX Runtime's own types: no such file, not a model
            raise InvertError(f"{path}: cannot load its {ENCODER_FILE}: {str(e).splitlines()[0]}") from None

    def encode(self, x01: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """z and the class read (None if unconditional) for images [n, C, H, W] in [0, 1]."""
        lo, hi = self.spec.output_range
        z, logits = self.encoder.run((x01 * (hi - lo) + lo).astype(np.float32))
        return z, None if logits is None else logits.argmax(1)

    def render(self, z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """Images [n, C, H, W] in [0, 1]."""
        return np.clip(self.generator.pixels(z, labels), 0, 1)

    def refine(self, z, labels, x01, passes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The server's search from z: (best z, its distances, the encoder's distances)."""
        first = inversion.distances(self.render(z, labels), x01)
        search = inversion.Search(z, first, list(range(len(z))))
        pop = inversion.POPULATION
        many = None if labels is None else np.repeat(labels, pop)
        goals = np.repeat(x01, pop, 0)
        for _ in range(passes // pop):
            search.tell(inversion.distances(self.render(search.ask(), many), goals))
        return search.best, search.best_distance, first


def _features(net, x01: np.ndarray) -> np.ndarray:
    return clf.run(net, x01)[0]


def _sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum((a - b) ** 2, axis=1)


def measure(path: Path, refine: int = 400, figure: Path | None = None) -> dict[str, Any]:
    inv = Inverter(path)
    spec = inv.spec
    cfg = TrainConfig.from_json(spec.provenance["config"])
    test = data_mod.load(cfg.replace(split="test"))
    train = data_mod.load(cfg.replace(split="train"))
    x = test.images.numpy().astype(np.float64) / 255.0
    y = test.labels.numpy()
    train_x = train.images.numpy().astype(np.float64) / 255.0
    net, _, digest = clf.load(clf.BUNDLED)
    f_x = _features(net, x)

    started = time.perf_counter()
    z, labels = inv.encode(x)
    encoder_s = (time.perf_counter() - started) / len(x)
    started = time.perf_counter()
    z_ref, _, _ = inv.refine(z, labels, x, refine)
    refine_s = (time.perf_counter() - started) / len(x)
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, images in (("encoder", inv.render(z, labels)), (f"encoder + {refine} passes", inv.render(z_ref, labels))):
        rows[name] = (inversion.distances(images, x), _sq(_features(net, images), f_x))
    reconstruction = inv.render(z_ref, labels)
    read = clf.run(net, reconstruction)[1].argmax(1)

    # Baselines: the nearest in pixels of BASELINE_SEEDS samples of the image's own class, and of the training digits.
    pool_z = seed_latents(range(BASELINE_SEED, BASELINE_SEED + BASELINE_SEEDS), spec.latent_dim, spec.prior)
    pools = {}
    for c in np.unique(y):
        pools[c] = inv.render(pool_z, np.full(BASELINE_SEEDS, c))
    nearest_seed = np.stack([
        pools[c][inversion.distances(pools[c], np.repeat(x[i : i + 1], BASELINE_SEEDS, 0)).argmin()]
        for i, c in enumerate(y)
    ])  # fmt: skip
    rows[f"nearest of {BASELINE_SEEDS} seeds of the class"] = (
        inversion.distances(nearest_seed, x), _sq(_features(net, nearest_seed), f_x)
    )  # fmt: skip
    flat_train = train_x.reshape(len(train_x), -1)
    nearest_train = np.stack([train_x[np.mean((flat_train - x[i].ravel()) ** 2, 1).argmin()] for i in range(len(x))])
    rows["nearest training digit"] = (inversion.distances(nearest_train, x), _sq(_features(net, nearest_train), f_x))

    result = {
        "model": str(path), "images": len(x), "classifier_sha256": digest, "refine_passes": refine,
        "label_accuracy": float(np.mean(read == y)),
        "encoder_label_accuracy": None if labels is None else float(np.mean(labels == y)),
        "seconds_per_image": {"encoder": encoder_s, f"encoder + {refine} passes": encoder_s + refine_s},
        "distances": {name: {"pixels": float(p.mean()), "features": float(f.mean())} for name, (p, f) in rows.items()},
    }  # fmt: skip
    if figure is not None:
        pick = np.array([np.flatnonzero(y == c)[0] for c in np.unique(y)][:10])  # one image per class
        encoded = inv.render(z[pick], None if labels is None else labels[pick])
        _figure(inv, x[pick], encoded, reconstruction[pick], figure)
    return result


def drawn_seven(size: int = 28) -> np.ndarray:
    """A 7 drawn with two strokes, as someone would on the playground's canvas: [1, 1, size, size] in [0, 1]."""
    big = Image.new("L", (size * 8, size * 8))
    pen = ImageDraw.Draw(big)
    s = size * 8 / 28
    pen.line([(7 * s, 7 * s), (21 * s, 7 * s), (12 * s, 23 * s)], fill=255, width=int(2.4 * s), joint="curve")
    small = big.resize((size, size), Image.Resampling.LANCZOS)
    return (np.asarray(small, np.float64) / 255.0)[None, None]


def _figure(inv: Inverter, x, recon_encoder, recon_refined, path: Path) -> None:
    """Rows: inputs, the encoder's reconstructions, the refined ones; then a drawn 7, inverted, interpolated to seed 1
    of class 7 in 10 frames."""
    seven = drawn_seven()
    z, labels = inv.encode(seven)
    z, _, _ = inv.refine(z, labels, seven, 400)
    target = seed_latents([1], inv.spec.latent_dim, inv.spec.prior)
    frames = np.linspace(0, 1, 10)[:, None]
    path_z = ((1 - frames) * z + frames * target).astype(np.float32)
    strip = inv.render(path_z, np.full(10, 7 if labels is None else labels[0]))
    rows = np.concatenate([x, recon_encoder, recon_refined, np.concatenate([seven, strip[:9]])])
    pixels = encode.to_uint8(rows.astype(np.float32), (0.0, 1.0))
    path.write_bytes(encode.png(encode.grid(pixels, 10)))


def table(r: dict[str, Any]) -> str:
    lines = ["| reconstruction | pixels (MSE, [0, 1]) | classifier features (squared distance) |", "|---|---|---|"]
    for name, d in r["distances"].items():
        lines.append(f"| {name} | {d['pixels']:.4f} | {d['features']:.1f} |")
    lines.append("")
    lines.append(f"label accuracy of the reconstructions: {r['label_accuracy']:.1%} (n = {r['images']})")
    times = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r["seconds_per_image"].items())
    lines.append(f"time per image, batched, on this CPU: {times}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.invert", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="model.onnx with an encoder.onnx beside it")
    p.add_argument("--refine", type=int, default=400, help="generator passes per image (default 400)")
    p.add_argument("--json", type=Path)
    p.add_argument("--figure", type=Path, help="inputs, reconstructions and an interpolation from a drawn 7 (PNG)")
    args = p.parse_args(argv)
    try:
        result = measure(args.model, args.refine, args.figure)
    except InvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
