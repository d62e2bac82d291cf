"""Known-answer tests of the evaluation protocol on real mnist5k digits, under both bundled extractors.

Disjoint random sets of real train digits must score at the floor at every n (KID and FID∞ within three
standard errors of 0, equal-n FIDs alike), and a blurred copy of one set clearly worse at every n. FID at a fixed n, by contrast, falls several-fold from n = 250 to 1000 for the very same data:
the bias that made a ratio of FIDs at different n meaningless.
"""

import numpy as np
import pytest

from training import classifier, protocol, scores
from training.data import mnist5k

NS = (250, 500, 1000)
SET = 1000  # digits per set
BLUR_SIGMA = 1.5  # pixels
FID = {"draws": 5, "boot": 4}  # fewer than the defaults: fast, and still a standard error


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of images [N, C, H, W] (zero padding)."""
    r = np.arange(-3, 4)
    w = np.exp(-(r**2) / (2 * sigma**2))
    w /= w.sum()
    h, wd = x.shape[2:]
    pad = np.pad(x, ((0, 0), (0, 0), (3, 3), (3, 3)))
    rows = sum(wi * pad[:, :, i : i + h, :] for i, wi in enumerate(w))
    return sum(wi * rows[:, :, :, i : i + wd] for i, wi in enumerate(w))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Three disjoint random sets of real train digits [3, SET, 1, 28, 28] in [0, 1]."""
    images, _, _ = mnist5k("train")
    pick = np.random.default_rng(0).permutation(len(images))[: 3 * SET]
    return (images[pick] / 255.0).reshape(3, SET, *images.shape[1:])


@pytest.fixture(scope="module", params=[classifier.BUNDLED, classifier.BUNDLED_SECOND], ids=["cnn4", "lenet"])
def features(request, digits) -> dict[str, np.ndarray]:
    """Sets a and b, c (all real) and a blurred, through one bundled extractor."""
    net, _, _ = classifier.load(request.param)
    run = lambda x: classifier.run(net, x)[0]  # noqa: E731
    a, b, c = (run(x) for x in digits)
    return {"a": a, "b": b, "c": c, "blurred": run(blur(digits[0], BLUR_SIGMA))}


@pytest.mark.parametrize("n", NS)
def test_real_sets_score_at_the_floor_and_blurred_ones_clearly_worse(features, n):
    f = {k: v[:n] for k, v in features.items()}
    rng = np.random.default_rng(n)
    # model: the blurred copy of a; floor: a itself; both against b, at the same n.
    r = protocol.against(f["blurred"], f["a"], f["b"], rng, **FID)
    kid, fid_inf = r["kid"], r["fid_inf"]
    # Real vs real: at the floor.
    assert abs(kid["floor"]) < 3 * kid["floor_se"]
    assert abs(fid_inf["floor"]) < 3 * fid_inf["floor_se"]
    # Another real set against b at the same n: the same FID, to well within the blurred copy's excess.
    excess = r["fid"]["model"] - r["fid"]["floor"]
    assert abs(r["fid"]["floor"] - scores.fid(f["c"], f["b"])) < excess / 4
    # Blurred: clearly worse, by each measure.
    assert kid["model"] - kid["floor"] > 3 * np.hypot(kid["model_se"], kid["floor_se"])
    assert fid_inf["model"] - fid_inf["floor"] > 3 * np.hypot(fid_inf["model_se"], fid_inf["floor_se"])
    assert r["fid"]["ratio"] > 3


def test_fid_at_a_fixed_n_is_biased_and_fid_infinity_is_not(features):
    a, b = features["a"], features["b"]
    assert scores.fid(a[:250], b[:250]) > 2.5 * scores.fid(a, b)  # the same two distributions
    rng = np.random.default_rng(0)
    small, large = (scores.fid_infinity(a[:n], b[:n], rng, **FID) for n in (500, 1000))
    assert abs(small.value - large.value) < 3 * np.hypot(small.se, large.se)
