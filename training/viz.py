"""Pictures of samples: image grids (one row per class for conditional models) and 2-D scatter plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from service import encode


def save_grid(images: np.ndarray, output_range: tuple[float, float], ncols: int, path: Path) -> None:
    """Write float images [N, C, H, W] as one PNG grid, `ncols` per row."""
    pixels = encode.to_uint8(images, output_range)
    if pixels.shape[1] < 64:  # upscale small images so a grid is readable at a glance
        pixels = pixels.repeat(2, axis=1).repeat(2, axis=2)
    write_png(path, encode.png(encode.grid(pixels, ncols)))


def save_scatter(points: np.ndarray, means: np.ndarray, std: float, path: Path, size: int = 512) -> None:
    """Samples (blue) over the true modes (red rings at 3 std, the high-quality radius)."""
    lim = float(np.abs(means).max()) * 1.5 + 6 * std
    scale = size / (2 * lim)

    def px(xy: np.ndarray) -> np.ndarray:
        return np.stack([(xy[:, 0] + lim) * scale, (lim - xy[:, 1]) * scale], 1)

    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    c = px(np.zeros((1, 2)))[0]
    draw.line([(0, c[1]), (size, c[1])], fill=(220, 220, 220))
    draw.line([(c[0], 0), (c[0], size)], fill=(220, 220, 220))
    for x, y in px(points[np.all(np.abs(points) < lim, axis=1)]):
        draw.point((x, y), fill=(30, 90, 200))
    r = max(3 * std * scale, 3)
    for x, y in px(means):
        draw.ellipse((x - r, y - r, x + r, y + r), outline=(220, 30, 30), width=2)
    write_png(path, encode.png(np.asarray(im)))


def write_png(path: Path, data: bytes) -> None:
    """Encoded image bytes to `path`, through a temporary file beside it, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
