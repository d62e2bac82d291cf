"""DiffAugment: shapes, values, randomness from the run's generator, gradients."""

import pytest
import torch

from testkit.training import tiny_config
from training.augment import CUTOUT, TRANSLATE, diff_augment
from training.config import ConfigError


def _dot(n=64, size=28):
    x = torch.full((n, 1, size, size), -1.0)
    x[:, :, 14, 14] = 1.0
    return x


def test_a_pixel_moves_by_at_most_the_translation_or_is_erased():
    out = diff_augment(_dot(), torch.Generator().manual_seed(0), -1.0)
    s = round(28 * TRANSLATE)
    assert set(out.unique().tolist()) <= {-1.0, 1.0}
    moved = set()
    for img in out[:, 0]:
        pos = (img > 0).nonzero().tolist()
        assert len(pos) <= 1  # one bright pixel, or none when the cutout erased it
        for r, c in pos:
            assert abs(r - 14) <= s and abs(c - 14) <= s
            moved.add((r, c))
    assert len(moved) > 5  # shifts differ between images


def test_cutout_erases_one_square_per_image():
    out = diff_augment(torch.ones(32, 1, 28, 28), torch.Generator().manual_seed(1), 0.0)
    c = round(28 * CUTOUT)
    erased = (out == 0).sum((1, 2, 3))
    # The shift brings in a border of fill too; the erased square is c x c at most and at least c x c minus that.
    assert (erased >= c * c).all()


def test_translation_only_moves_every_pixel_and_erases_none():
    out = diff_augment(_dot(), torch.Generator().manual_seed(0), -1.0, cutout=False)
    with_cutout = diff_augment(_dot(), torch.Generator().manual_seed(0), -1.0)
    assert ((out > 0).sum((1, 2, 3)) == 1).all()  # the dot survives in every image (14 ± 4 stays inside)
    # The same shifts: where the cutout spared the dot, both put it in the same place.
    kept = (with_cutout > 0).flatten(1).any(1)
    assert kept.sum() < len(kept) and torch.equal(out[kept], with_cutout[kept])


def test_same_generator_state_same_augmentation_and_gradients_flow():
    x = _dot(8).requires_grad_(True)
    a = diff_augment(x, torch.Generator().manual_seed(3), -1.0)
    b = diff_augment(x, torch.Generator().manual_seed(3), -1.0)
    assert torch.equal(a, b)
    a.sum().backward()
    assert x.grad.abs().sum() > 0


def test_diffaugment_is_for_images_only(tmp_path):
    with pytest.raises(ConfigError, match="diffaugment"):
        tiny_config(tmp_path, dataset="ring8", arch="mlp2d", conditional=False, diffaugment=True)
