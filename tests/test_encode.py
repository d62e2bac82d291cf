import io

import numpy as np
import pytest
from PIL import Image

from service import encode


def test_to_uint8_maps_range_ends_and_clips():
    x = np.array([-1.0, -0.5, 0.0, 1.0, 7.0, -7.0], dtype=np.float32).reshape(1, 1, 2, 3)
    px = encode.to_uint8(x, (-1.0, 1.0))
    assert px.shape == (1, 2, 3, 1)
    assert px.ravel().tolist() == [0, 64, 128, 255, 255, 0]


def test_grid_places_images_row_major():
    pixels = np.stack([np.full((2, 2, 1), v, np.uint8) for v in (10, 20, 30)])
    g = encode.grid(pixels, ncols=2, pad=1, fill=0)
    assert g.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    assert g[1, 1, 0] == 10 and g[1, 4, 0] == 20 and g[4, 1, 0] == 30 and g[4, 4, 0] == 0


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip(channels):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    im = Image.open(io.BytesIO(encode.png(pixels)))
    assert np.array_equal(np.asarray(im).reshape(5, 7, channels), pixels)


def test_png_rejects_bad_shapes():
    with pytest.raises(ValueError, match="uint8 image"):
        encode.png(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.parametrize("kind", ["gif", "apng", "webp"])
def test_animation_frames_decode_to_exactly_their_pixels_forward_and_back(kind):
    from PIL import ImageSequence

    frames = np.random.default_rng(3).integers(0, 256, (4, 6, 5, 1), dtype=np.uint8)  # noise: nothing to merge
    data = encode.animation(frames, kind, fps=10, ping_pong=True)
    shown = [np.asarray(f.convert("L")) for f in ImageSequence.Iterator(Image.open(io.BytesIO(data)))]
    assert [f.tobytes() for f in shown] == [frames[i, ..., 0].tobytes() for i in (0, 1, 2, 3, 2, 1)]


def test_animation_refuses_what_is_not_uint8_frames():
    with pytest.raises(ValueError, match="expected uint8 frames"):
        encode.animation(np.zeros((2, 4, 4, 1), np.float32), "gif", 10)
    with pytest.raises(ValueError, match="expected uint8 frames"):
        encode.animation(np.zeros((0, 4, 4, 1), np.uint8), "gif", 10)
