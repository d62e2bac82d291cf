"""Memorisation check: each sample's nearest training image, in pixels and in a classifier's feature space.

Goodfellow et al. (2014) put the nearest training example beside each sample to show that the model has not
memorised its data. The quantitative side compares two distributions of nearest-training distances: from the
generated samples, and from held-out real digits, which the generator never saw. A generator whose samples sit
much closer to the training set than unseen real data does is reproducing its training images; FID and KID
would reward that, so the check goes beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from service import encode
from training import scores, viz

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95)
GRID_COLUMNS = 4  # (sample, nearest in pixels, nearest in features) triplets per row
GRID_ROWS = 10
SCALE = 2  # 28-px digits are drawn at 56 px


def distances(fake: np.ndarray, train: np.ndarray, held: np.ndarray) -> dict[str, Any]:
    """Nearest-training distances of `fake` and `held` rows (flattened) in one space, and a summary.

    closer_than_held_q05: share of samples nearer to the training set than the 5 % quantile of held-out
    digits (about 0.05 when the generator is no closer to its data than unseen data; much more: memorising).
    """
    flat = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)  # noqa: E731
    d_fake, i_fake = scores.nearest(flat(fake), flat(train))
    d_held, _ = scores.nearest(flat(held), flat(train))
    names = [f"q{round(100 * p):02d}" for p in QUANTILES]
    q = lambda d: dict(zip(names, np.quantile(d, QUANTILES).tolist(), strict=True))  # noqa: E731
    return {
        "n": {"samples": len(fake), "held_out": len(held), "train": len(train)},
        "samples": q(d_fake),
        "held_out": q(d_held),
        "median_ratio": float(np.median(d_fake) / np.median(d_held)),
        "closer_than_held_q05": float(np.mean(d_fake < np.quantile(d_held, 0.05))),
        "distances": {"samples": d_fake, "held_out": d_held},  # arrays: for the figures, not the JSON
        "index": i_fake,
    }


def grid_order(labels: np.ndarray | None, n: int) -> np.ndarray:
    """The samples shown: for conditional models GRID_COLUMNS per class, one class per row; else the first ones."""
    if labels is None or labels.max() + 1 > GRID_ROWS * GRID_COLUMNS:
        return np.arange(min(n, GRID_ROWS * GRID_COLUMNS))
    rows = [np.flatnonzero(labels[:n] == c)[:GRID_COLUMNS] for c in range(min(int(labels.max()) + 1, GRID_ROWS))]
    return np.concatenate(rows)


def save_grid(fake: np.ndarray, train: np.ndarray, by_pixels: np.ndarray, by_features: np.ndarray, path: Path):
    """Triplets (sample | nearest training image in pixel L2 | nearest in feature space), pixels in [0, 1]."""
    tiles = np.stack([fake, train[by_pixels], train[by_features]], 1)  # [N, 3, C, H, W]
    px = encode.to_uint8(tiles.reshape(-1, *fake.shape[1:]), (0.0, 1.0))
    px = px.repeat(SCALE, axis=1).repeat(SCALE, axis=2)
    h, w, c = px.shape[1:]
    gap, pad, head = 10, 2, 16
    cols = min(GRID_COLUMNS, len(fake))
    rows = -(-len(fake) // cols)
    width = cols * (3 * (w + pad) + gap) + gap
    canvas = np.full((head + rows * (h + pad) + pad, width, 3), 255, np.uint8)
    for i in range(len(fake)):
        r, col = divmod(i, cols)
        for j in range(3):
            x = gap + col * (3 * (w + pad) + gap) + j * (w + pad)
            y = head + pad + r * (h + pad)
            canvas[y : y + h, x : x + w] = px[3 * i + j] if c == 3 else px[3 * i + j].repeat(3, axis=2)
    im = Image.fromarray(canvas)
    ImageDraw.Draw(im).text((gap, 2), "sample | nearest train image: pixel L2 | classifier features", fill=(0, 0, 0))
    viz.write_png(path, encode.png(np.asarray(im)))


def save_distance_plot(spaces: dict[str, dict[str, Any]], path: Path, size: tuple[int, int] = (360, 240)):
    """Empirical CDFs of nearest-training distance, one panel per space: samples (blue), held-out (orange)."""
    pw, ph = size
    margin = 30
    im = Image.new("RGB", (pw * len(spaces), ph + 2 * margin), "white")
    draw = ImageDraw.Draw(im)
    for k, (name, s) in enumerate(spaces.items()):
        d = s["distances"]
        top = float(max(d["samples"].max(), d["held_out"].max())) * 1.05
        x0, y0, x1, y1 = k * pw + margin, margin, (k + 1) * pw - 10, margin + ph
        draw.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
        for who, colour in (("samples", (30, 90, 200)), ("held_out", (230, 120, 20))):
            v = np.sort(d[who])
            xs = x0 + (x1 - x0) * v / top
            ys = y1 - (y1 - y0) * np.arange(1, len(v) + 1) / len(v)
            draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=colour, width=2)
        n = s["n"]
        draw.text((x0, 4), f"{name}: nearest-train distance CDF (0 to {top:.1f})", fill=(0, 0, 0))
        draw.text((x0 + 4, y0 + 4), f"samples (n={n['samples']})", fill=(30, 90, 200))
        draw.text((x0 + 4, y0 + 16), f"held-out (n={n['held_out']})", fill=(230, 120, 20))
        draw.text((x0, y1 + 6), f"vs {n['train']} train images", fill=(0, 0, 0))
    viz.write_png(path, encode.png(np.asarray(im)))


def plot_path(grid: Path) -> Path:
    """Where the distance figure goes beside the grid: NAME-distances.png."""
    return grid.with_name(f"{grid.stem}-distances.png")


def check(
    fake: np.ndarray, train: np.ndarray, held: np.ndarray, features: tuple[np.ndarray, np.ndarray, np.ndarray],
    labels: np.ndarray | None, grid: Path,
) -> dict[str, Any]:  # fmt: skip
    """Both spaces' distance summaries (JSON-ready); writes `grid` and its distance figure beside it.

    fake, train, held: pixels in [0, 1], [N, C, H, W]; features: the same three sets' classifier features.
    """
    spaces = {"pixels": distances(fake, train, held), "features": distances(*features)}
    shown = grid_order(labels, len(fake))
    save_grid(fake[shown], train, spaces["pixels"]["index"][shown], spaces["features"]["index"][shown], grid)
    save_distance_plot(spaces, plot_path(grid))
    summary = {k: {f: v for f, v in s.items() if f not in ("distances", "index")} for k, s in spaces.items()}
    return summary | {"grid": str(grid), "plot": str(plot_path(grid))}
