"""The default model in models/ honours the ONNX contract that the service relies on."""

import numpy as np
import onnxruntime as ort
import pytest

from service.contract import read_spec
from testkit.process import ROOT, shipped_version

SHIPPED = ROOT / "models" / "mnist-cdcgan" / str(shipped_version()) / "model.onnx"  # the newest version


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(SHIPPED), providers=["CPUExecutionProvider"])


def test_shipped_model_is_small_and_self_describing(session):
    assert SHIPPED.stat().st_size < 8 << 20
    spec = read_spec(session)  # a format 1 file: read, and its graph checked, through the contract
    assert (spec.kind, spec.latent_dim, spec.prior, spec.output_shape) == ("image", 100, "normal", (1, 28, 28))
    assert spec.class_names == tuple(str(d) for d in range(10)) and spec.output_range == (-1.0, 1.0)
    assert spec.provenance["preset"] == "mnist-cdcgan"


def test_shipped_model_draws_distinct_digits_per_label_in_range(session):
    rng = np.random.default_rng(0)
    z = np.repeat(rng.standard_normal((1, 100), dtype=np.float32), 10, axis=0)
    (images,) = session.run(["images"], {"z": z, "y": np.eye(10, dtype=np.float32)})
    assert images.shape == (10, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    ink = (images > 0).reshape(10, -1)
    assert 0.05 < ink.mean() < 0.35  # digits: mostly background, some strokes
    # Same noise, different labels: ten different images.
    diffs = [np.abs(images[i] - images[j]).mean() for i in range(10) for j in range(i + 1, 10)]
    assert min(diffs) > 0.05


def test_soft_labels_interpolate_between_classes(session):
    z = np.random.default_rng(1).standard_normal((1, 100), dtype=np.float32).repeat(3, axis=0)
    y = np.zeros((3, 10), np.float32)
    y[0, 3], y[2, 8] = 1, 1
    y[1, 3] = y[1, 8] = 0.5
    (images,) = session.run(["images"], {"z": z, "y": y})
    a, mid, b = images
    assert np.abs(mid - a).mean() < np.abs(b - a).mean() and np.abs(mid - b).mean() < np.abs(b - a).mean()


def test_shipped_model_draws_the_requested_digit():
    from training import evaluate

    # README "Results" records 10,000 samples and the full FID∞ fit; 1,000 samples, two draws per n and no
    # bootstrap keep the suite fast and still catch a regression. Equal n (500 per side): the held-out split's size.
    r = evaluate.evaluate(SHIPPED, n=1000, draws=2, boot=0)
    assert r["conditional"]["label_accuracy"] >= 0.98
    assert r["fid"]["n"] == 500 and r["fid"]["model"] < 2 * r["fid"]["floor"]
