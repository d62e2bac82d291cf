"""training/directions.py: SeFa against numpy on small exported generators, image statistics with known answers, an
attribute direction recovered from a generator built to have it, `add` for older files, and the shipped model's
directions measured."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from service.contract import ModelSpec, read_spec
from testkit.process import ROOT, shipped_version
from testkit.servefix import plain_model
from training import directions as D
from training.data import DataSpec
from training.export import to_onnx
from training.nets import DCGenerator, MLPGenerator


def _numpy_sefa(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The known answer: eigh of AᵀA, largest first."""
    values, vectors = np.linalg.eigh(a.T @ a)
    order = np.argsort(values)[::-1][:k]
    return vectors[:, order].T, values[order] / values.sum()


@pytest.mark.parametrize(
    ("make", "weight"),
    [
        # Conditional MLP: z enters through Concat(z, y), so A is the first latent_dim columns of the first Linear.
        (lambda: MLPGenerator(6, DataSpec((1, 4, 4), ("a", "b", "c")), hidden=20), lambda g: g.net[0].weight[:, :6]),
        (lambda: DCGenerator(6, DataSpec((1, 28, 28)), width=4), lambda g: g.project.weight),
    ],
    ids=["mlp-concat", "dcgan"],
)
def test_sefa_on_an_exported_generator_matches_numpy(tmp_path, make, weight):
    torch.manual_seed(0)
    g = make().eval()
    path = tmp_path / "model.onnx"
    classes = tuple(f"c{i}" for i in range(g.num_classes))
    spec = ModelSpec("image", 6, "normal", classes, g.shape, g.output_range)
    to_onnx(g, "normal", path, spec.to_metadata())
    a = weight(g).detach().numpy().astype(np.float64)
    assert np.array_equal(D.first_layer(onnx.load(str(path)), 6), a)  # read from the graph, exactly
    got, shares = D.sefa(a, 4)
    want, want_shares = _numpy_sefa(a, 4)
    assert np.allclose(np.abs(np.sum(got * want, 1)), 1, atol=1e-9)  # the same eigenvectors, up to sign
    assert np.allclose(shares, want_shares) and np.allclose(np.linalg.norm(got, axis=1), 1)
    assert np.all(got[np.arange(4), np.abs(got).argmax(1)] > 0)  # signs fixed: the largest entry positive


def test_sefa_reads_matmul_and_gemm_without_transb():
    a = np.random.default_rng(0).standard_normal((12, 3))
    for op, stored, attrs in (("MatMul", a.T, {}), ("Gemm", a.T, {"transB": 0}), ("Gemm", a, {"transB": 1})):
        w = helper.make_tensor("w", TensorProto.FLOAT, stored.shape, stored.astype(np.float32).ravel())
        graph = helper.make_graph(
            [helper.make_node("Cast", ["z"], ["zc"], to=TensorProto.FLOAT), helper.make_node(op, ["zc", "w"], ["h"], **attrs)],
            "g", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3])],
            [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", 12])], initializer=[w],
        )  # fmt: skip
        assert np.allclose(D.first_layer(helper.make_model(graph), 3), a.astype(np.float32)), op


def test_a_graph_where_z_meets_no_constant_linear_layer_has_no_sefa(tmp_path):
    model = onnx.load(str(plain_model(tmp_path / "plain.onnx")))  # z → Clip → Reshape
    with pytest.raises(D.DirectionsError, match="z does not enter a linear layer"):
        D.first_layer(model, 8)


def _image(points: list[tuple[int, int]], size: int = 28) -> np.ndarray:
    x = np.zeros((1, 1, size, size))
    for r, c in points:
        x[0, 0, r, c] = 1
    return x


def test_statistics_have_known_answers():
    rows = range(4, 24)
    upright = _image([(r, 14) for r in rows])
    leaning = _image([(r, 14 + (14 - r) // 2) for r in rows])  # the top to the right: half a column per row
    wide = _image([(r, c) for r in rows for c in (10, 18)])
    thick = _image([(r, c) for r in rows for c in (14, 15)])
    s = {name: D.statistics(x) for name, x in (("upright", upright), ("leaning", leaning), ("wide", wide),
                                              ("thick", thick))}  # fmt: skip
    assert abs(s["upright"]["slant"][0]) < 1e-6 and abs(s["upright"]["width"][0]) < 1e-3
    assert s["leaning"]["slant"][0] == pytest.approx(0.5, abs=0.03)  # leaning right reads positive
    assert s["leaning"]["width"][0] < 0.3  # slant removed: still a thin line
    assert s["wide"]["width"][0] == pytest.approx(4) and abs(s["wide"]["slant"][0]) < 1e-6
    assert s["thick"]["ink"][0] == pytest.approx(2 * s["upright"]["ink"][0]) == pytest.approx(40 / 784)


def _ink_model(path, latent: int = 4) -> None:
    """Unconditional, [n, 1, 4, 4]: every pixel 0.2·z[2] (within [-1, 1]): ink grows along z[2] and nothing else."""
    pick = helper.make_tensor("pick", TensorProto.FLOAT, [latent, 1], [0.2 if i == 2 else 0 for i in range(latent)])
    ones = helper.make_tensor("ones", TensorProto.FLOAT, [1, 16], [1.0] * 16)
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 4, 4])
    nodes = [
        helper.make_node("MatMul", ["z", "pick"], ["v"]),
        helper.make_node("MatMul", ["v", "ones"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["images"]),
    ]
    graph = helper.make_graph(
        nodes, "ink", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", latent])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 1, 4, 4])], initializer=[pick, ones, shape],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, ModelSpec("image", latent, "normal", (), (1, 4, 4), (-1.0, 1.0)).to_metadata())
    onnx.save_model(model, str(path))


def test_an_attribute_direction_is_the_axis_that_moves_it(tmp_path):
    _ink_model(tmp_path / "model.onnx")
    found, facts = D.compute(tmp_path / "model.onnx")
    by_name = {d.name: d for d in found}
    assert np.allclose(by_name["ink"].vector, [0, 0, 1, 0], atol=1e-6) and not by_name["ink"].per_class
    assert by_name["sefa1"].vector == (0.0, 0.0, 1.0, 0.0)  # the graph's one non-zero column
    assert facts["ink"]["chosen"] == "shared"
    # A flat image has no slant or width to fit: those are left out rather than made up from noise.
    assert "slant" not in by_name and "width" not in by_name and "no variation" in facts["slant"]


def test_add_publishes_the_next_version_with_directions_and_the_same_weights(tmp_path):
    source = tmp_path / "m" / "1" / "model.onnx"
    source.parent.mkdir(parents=True)
    _ink_model(source)
    before = source.read_bytes()
    assert D.main(["add", str(source)]) == 0
    added = tmp_path / "m" / "2" / "model.onnx"
    assert source.read_bytes() == before  # a published version is never touched
    old, new = onnx.load(str(source)), onnx.load(str(added))
    assert [t.SerializeToString() for t in old.graph.initializer] == [
        t.SerializeToString() for t in new.graph.initializer
    ]
    props = {p.key: p.value for p in new.metadata_props}
    assert props["format_version"] == "3" and [d["name"] for d in json.loads(props["directions"])] == ["sefa1", "ink"]


def test_the_shipped_models_directions_edit_what_they_name():
    path = ROOT / "models" / "mnist-cdcgan" / str(shipped_version()) / "model.onnx"
    import onnxruntime as ort

    spec = read_spec(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    assert dataclasses.replace(spec, directions=()).num_classes == 10
    result = D.measure(path, per_class=10)  # 100 samples × 7 strengths per direction
    for name in D.ATTRIBUTES:  # the README's figures come from 500 samples; 100 keep this quick
        entry = result["directions"][name]
        assert entry["monotonic"][name] >= 0.85, (name, entry)
        assert entry["change"][name] > 0  # and it rises with the strength
        assert min(entry["label_accuracy"]) >= 0.85  # a direction that changes the digit is a bad direction
    assert "| slant |" in D.table(result)
