"""Image encoding: float generator output → uint8 pixels, grids and PNG bytes (pure numpy + Pillow)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray, output_range: tuple[float, float]) -> np.ndarray:
    """Map float images [N, C, H, W] in `output_range` to uint8 [N, H, W, C], clipping outliers."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape [N, C, H, W], got {images.shape}")
    lo, hi = output_range
    scaled = (images.astype(np.float32, copy=False) - lo) * np.float32(255.0 / (hi - lo))
    # Round half up, then clamp with in-place ufuncs: vectorised, and cheaper than np.clip on small batches.
    scaled += 0.5
    np.maximum(scaled, 0, out=scaled)
    np.minimum(scaled, 255, out=scaled)
    pixels = scaled.astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


DECODABLE = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what decode() opens: common still-image formats, nothing else


def decode(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """One still image file (PNG, JPEG, WebP, GIF or BMP) of exactly `shape` [H, W, C] → uint8 [H, W, C], grey or RGB
    as C asks. ValueError says what is wrong; the size is checked from the header, before any pixel is decoded."""
    h, w, c = shape
    try:
        image = Image.open(io.BytesIO(data), formats=DECODABLE)  # reads the header only
        size, frames = image.size, getattr(image, "n_frames", 1)
    except Exception as e:  # Pillow raises its own types, and OSError, for anything it cannot identify
        raise ValueError(f"not an image file of {', '.join(DECODABLE)} ({type(e).__name__})") from None
    if size != (w, h):
        raise ValueError(f"{size[0]}×{size[1]} pixels, the model's images are {w}×{h}")
    if frames != 1:
        raise ValueError("an animation; give one still image")
    try:
        pixels = np.asarray(image.convert("L" if c == 1 else "RGB"), np.uint8)
    except Exception as e:  # a header that promised more than the file holds
        raise ValueError(f"cannot be decoded ({type(e).__name__})") from None
    return pixels.reshape(h, w, c)


def grid(pixels: np.ndarray, ncols: int, pad: int = 2, fill: int = 0) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [rows·(H+pad)+pad, cols·(W+pad)+pad, C] image, row-major."""
    n, h, w, c = pixels.shape
    ncols = max(1, min(ncols, n))
    out = np.full(grid_shape(n, h, w, c, ncols, pad), fill, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y : y + h, x : x + w] = pixels[i]
    return out


def png(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode one uint8 image [H, W, C] (C = 1 or 3) as PNG bytes."""
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3) or pixels.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 1|3], got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


def grid_shape(n: int, h: int, w: int, c: int, ncols: int, pad: int = 2) -> tuple[int, int, int]:
    """The [H, W, C] shape of grid() over n images of [h, w, c]."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    return nrows * (h + pad) + pad, ncols * (w + pad) + pad, c


def png_bound(h: int, w: int, c: int) -> int:
    """An upper bound of png()'s size for any [h, w, c] image, incompressible noise included."""
    raw = h * (w * c + 1)  # each row starts with its filter byte
    deflated = raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 13  # zlib's compressBound
    chunks = deflated // 8192 + 1  # IDAT chunks, 12 bytes each; Pillow writes them 64 KiB at a time
    return 8 + 25 + 12 * chunks + deflated + 12  # signature, IHDR, IDATs, IEND


ANIMATIONS = {"gif": ("GIF", "image/gif"), "apng": ("PNG", "image/apng"), "webp": ("WEBP", "image/webp")}


def animation(frames: np.ndarray, kind: str, fps: float, ping_pong: bool = False, loops: int = 0) -> bytes:
    """uint8 frames [N, H, W, C] (C = 1 or 3) as an animated GIF, APNG or WebP, every frame lossless: each decodes to
    exactly its pixels (GIF too, for up to 256 colours: MNIST's greys). `ping_pong` plays them back again, without
    repeating the ends; `loops` 0 plays for ever."""
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"expected uint8 frames [N, H, W, 1|3], got {frames.dtype} {frames.shape}")
    order = list(range(len(frames)))
    if ping_pong and len(frames) > 2:
        order += order[-2:0:-1]
    images = [Image.fromarray(frames[i, ..., 0] if frames.shape[-1] == 1 else frames[i]) for i in order]
    pil_format, _ = ANIMATIONS[kind]
    options = {"save_all": True, "append_images": images[1:], "duration": round(1000 / fps), "loop": loops}
    if kind == "webp":
        options |= {"lossless": True, "quality": 100, "method": 4}
    if kind == "gif":  # one palette for all frames, and no frame merged into the one before it
        options |= {"optimize": False, "disposal": 1}
    buf = io.BytesIO()
    images[0].save(buf, format=pil_format, **options)
    return buf.getvalue()
