"""python -m training.evaluate and the domain classifiers, on real tiny models, offline."""

import functools
import json

import numpy as np
import onnx
import pytest
from PIL import Image

from testkit.training import tiny_config
from training import classifier, evaluate, neighbours
from training.data import mnist5k, sha256_file
from training.export import export
from training.loop import Trainer

FAST = ["--fid-draws", "2", "--fid-boot", "0"]  # the protocol with fewer FID∞ draws and no bootstrap: quick


@pytest.mark.parametrize(
    ("path", "digest", "arch", "features"),
    [
        (classifier.BUNDLED, classifier.BUNDLED_SHA256, "cnn4", 128),
        (classifier.BUNDLED_SECOND, classifier.BUNDLED_SECOND_SHA256, "lenet", 84),
    ],
)
def test_bundled_classifiers_are_the_published_ones_and_reproduce_their_accuracy(path, digest, arch, features):
    assert sha256_file(path) == digest
    net, info, _ = classifier.load(path)
    images, labels, _ = mnist5k("test")
    f, probs = classifier.run(net, images / 255.0)
    assert info["arch"] == arch and f.shape == (500, features)
    assert info["dataset"] == "mnist5k" and info["held_out_images"] == len(labels) == 500
    assert (probs.argmax(1) == labels).mean() == pytest.approx(info["held_out_accuracy"])
    assert info["held_out_accuracy"] > 0.97


def test_parzen_split_is_per_class_and_disjoint():
    labels = np.repeat(np.arange(10), 50)
    val = evaluate.parzen_split(labels)
    assert val.sum() == 100
    assert all(val[labels == c].sum() == 10 for c in range(10))


def test_evaluate_cli_on_a_tiny_conditional_model(tiny_run, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert evaluate.main([str(tiny_run["model"]), "--n", "300", "--json", str(out), "--cas", *FAST]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    for key in ("parzen", "kid", "fid_inf", "fid", "vs_train", "precision_recall", "inception_score", "conditional"):
        assert key in r
    assert "FID∞" in printed and "KID" in printed and "label accuracy" in printed and "Parzen" in printed
    # Both bundled extractors, side by side.
    assert r["classifier"]["sha256"] == classifier.BUNDLED_SHA256
    assert [e["classifier"]["sha256"] for e in r["other_extractors"]] == [classifier.BUNDLED_SECOND_SHA256]
    assert "cnn4" in printed and "lenet" in printed
    # Every comparison states its n; FIDs are compared only at equal n.
    assert r["n"] == {"model": 300, "floor": 4500, "reference": 500}
    assert r["fid"]["n"] == r["fid_inf"]["ns"][-1] == 300 and "n=300/side" in printed
    assert r["vs_train"]["n"] == {"model": 300, "floor": 2250, "reference": 2250}
    assert r["precision_recall"]["manifold"] == 300 and r["inception_score"]["n"] == 300
    c = r["conditional"]
    assert c["n"] == np.sum(c["confusion"]) == 300
    assert np.sum(np.asarray(c["confusion"]), 1).tolist() == [30] * 10  # balanced requested labels
    assert c["label_accuracy"] == pytest.approx(np.trace(np.asarray(c["confusion"])) / 300)
    lo, hi = c["label_accuracy_ci95"]
    assert lo <= c["label_accuracy"] <= hi
    assert c["held_out_accuracy"]["n"] == 500 and c["intra_kid"]["n_per_class"] == {
        "model": 30, "floor": 450, "reference": 50,
    }  # fmt: skip
    # CAS under each extractor's own recipe, trained on every sample (fewer than the 4,500 real digits).
    for e, epochs in ((r, 40), (r["other_extractors"][0], 30)):
        cas = e["conditional"]["cas"]
        assert (cas["n_train"], cas["n_real"], cas["n_test"], cas["epochs"]) == (300, 4500, 500, epochs)
        assert cas["accuracy"]["ci95"][0] <= cas["accuracy"]["value"] <= cas["accuracy"]["ci95"][1]
    assert "CAS %, trained on 300 fake | 4500 real" in printed
    # A 20-step model is far from the data: worse than the real-vs-real floor on every axis.
    for e in (r, *r["other_extractors"]):
        assert e["fid"]["model"] > e["fid"]["floor"] > 0 and e["fid"]["ratio"] > 1
        assert e["kid"]["model"] - e["kid"]["floor"] > 3 * np.hypot(e["kid"]["model_se"], e["kid"]["floor_se"])
        assert e["fid_inf"]["model"] > e["fid_inf"]["floor"]
    assert r["parzen"]["mean"] < 100 and r["parzen"]["test_images"] == 400
    assert 1 <= r["inception_score"]["model"] <= 10


def test_classification_accuracy_score_known_answers():
    """CAS on real digits comes close to the same recipe trained on real digits; a generator that draws every class
    in one style keeps a perfect label accuracy but fails CAS."""
    x, y, _ = mnist5k("train")
    held_x, held_y, _ = mnist5k("test")
    x, held_x = x / 255.0, held_x / 255.0
    info = {"arch": "lenet", "class_names": [str(c) for c in range(10)], "epochs": 6, "seed": 0}
    rng = np.random.default_rng(0)
    order = np.argsort(np.arange(len(y)) % 450, kind="stable")  # class-interleaved, like requested labels
    x, y = x[order], y[order]
    real = evaluate.classification_accuracy_score(x, y, 2000, (held_x, held_y), info, rng, progress=False)
    assert real["n_train"] == 2000 and real["n_test"] == 500 and real["accuracy"]["n"] == 500
    assert real["accuracy"]["value"] > 0.93
    one_style = x[[np.flatnonzero(y == c)[0] for c in y]]  # every sample of class c is the same digit
    net, _, _ = classifier.load(classifier.BUNDLED_SECOND)
    assert (classifier.run(net, one_style[:2000])[1].argmax(1) == y[:2000]).mean() > 0.98  # labels: all right
    collapsed = evaluate.classification_accuracy_score(one_style, y, 2000, (held_x, held_y), info, rng, False)
    assert (
        collapsed["accuracy"]["ci95"][1] < real["accuracy"]["ci95"][0]
        and collapsed["accuracy"]["value"] < real["accuracy"]["value"] - 0.1
    )


def test_evaluation_is_deterministic(tiny_run):
    a = evaluate.evaluate(tiny_run["model"], n=200, draws=2, boot=2)
    b = evaluate.evaluate(tiny_run["model"], n=200, draws=2, boot=2)
    assert a == b


def test_neighbours_writes_the_grid_and_compares_distances(tiny_run, tmp_path, capsys):
    grid, out = tmp_path / "nb.png", tmp_path / "r.json"
    assert (
        evaluate.main([str(tiny_run["model"]), "--n", "100", "--neighbours", str(grid), "--json", str(out), *FAST]) == 0
    )
    m = json.loads(out.read_text())["memorisation"]
    assert m["grid"] == str(grid) and m["plot"] == str(tmp_path / "nb-distances.png")
    # 10 rows (one per class) of 4 triplets of 56-px digits, under a caption line.
    assert Image.open(grid).size == (4 * (3 * 58 + 10) + 10, 16 + 10 * 58 + 2)
    assert Image.open(tmp_path / "nb-distances.png").size == (720, 300)
    for space in ("pixels", "features"):
        s = m[space]
        assert s["n"] == {"samples": 100, "held_out": 500, "train": 4500}
        assert list(s["samples"]) == list(s["held_out"]) == ["q01", "q05", "q25", "q50", "q75", "q95"]
        assert 0 <= s["closer_than_held_q05"] <= 1
    # A 20-step model makes blobs, nowhere near its training digits.
    assert m["pixels"]["median_ratio"] > 1
    assert "memorisation" in capsys.readouterr().out


def test_memorisation_known_answers():
    train, _, _ = mnist5k("train")
    held, _, _ = mnist5k("test")
    train, held = train / 255.0, held / 255.0
    rng = np.random.default_rng(0)
    # Unseen real digits as the "samples": as near to the training set as held-out digits are.
    unseen = neighbours.distances(held[::2], train, held[1::2])
    assert 0.7 < unseen["median_ratio"] < 1.3 and unseen["closer_than_held_q05"] < 0.15
    # Training digits barely perturbed: a memorising generator.
    copies = train[rng.choice(len(train), 250, replace=False)] + 0.01 * rng.standard_normal((250, 1, 28, 28))
    memorised = neighbours.distances(copies, train, held)
    assert memorised["median_ratio"] < 0.1 and memorised["closer_than_held_q05"] == 1.0
    assert memorised["samples"]["q95"] < memorised["held_out"]["q01"]


def test_neighbour_grid_shows_each_sample_beside_its_nearest_images(tmp_path):
    train = np.zeros((3, 1, 4, 4))
    train[1, 0, :2], train[2, 0, 2:] = 1.0, 1.0  # three distinct images: blank, top half, bottom half
    fake = train[[2, 1]] * 0.9
    path = tmp_path / "g.png"
    neighbours.save_grid(fake, train, np.array([2, 1]), np.array([0, 0]), path)
    px = np.asarray(Image.open(path).convert("L"))
    tile = lambda i, j: px[16 + 2 : 16 + 2 + 8, 10 + i * (3 * 10 + 10) + j * 10 :][:, :8]  # noqa: E731
    assert tile(0, 1)[4:].min() == 255 and tile(0, 1)[:4].max() == 0  # sample 0's pixel neighbour: bottom half
    assert tile(1, 1)[:4].min() == 255 and tile(1, 1)[4:].max() == 0  # sample 1's: top half
    assert tile(0, 2).max() == 0  # its feature neighbour (given): the blank image


def test_two_d_model_mode_coverage_and_scatter(tmp_path):
    cfg = tiny_config(tmp_path / "run", dataset="ring8", arch="mlp2d", conditional=False, batch_size=64, latent_dim=4)
    model = export(Trainer(cfg).train(progress=False), tmp_path / "models", "ring")
    scatter = tmp_path / "ring.png"
    r = evaluate.evaluate(model, scatter=scatter)
    assert 0 <= r["modes"] <= r["total_modes"] == 8
    assert 0 <= r["high_quality"] <= 1
    assert Image.open(scatter).size == (512, 512)


def test_folder_dataset_trains_its_own_extractor(tmp_path, tiny_run):
    images, labels, _ = mnist5k("train")
    for c in range(3):
        (tmp_path / "data" / f"digit{c}").mkdir(parents=True)
        for i, img in enumerate(images[labels == c][:24]):
            Image.fromarray(img[0]).save(tmp_path / "data" / f"digit{c}" / f"{i}.png")
    path = tmp_path / "clf.pt"
    args = ["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--epochs", "2", "--out", str(path)]
    assert classifier.main(args) == 0
    _, info, digest = classifier.load(path)
    assert info["class_names"] == ["digit0", "digit1", "digit2"] and info["held_out_images"] == 8  # every 10th of 72
    assert digest == sha256_file(path)
    # Scoring the tiny MNIST model against that folder: features come from the folder's own classifier.
    r = evaluate.evaluate(
        tiny_run["model"], n=100, dataset="folder", data_dir=str(tmp_path / "data"), classifier=path, draws=2, boot=0
    )
    assert r["classifier"]["sha256"] == digest and r["other_extractors"] == []
    assert r["n"] == {"model": 100, "floor": 64, "reference": 8}
    assert "fid" in r and "conditional" not in r  # its 3 classes are not the model's 10
    assert r["conditional_skipped"]


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({"format_version": "4"}, "format_version: '4' is not a format this reader knows"),
        ({"prior": "cauchy"}, "prior: 'cauchy'"),
        ({"config": "{"}, "unusable training config"),
    ],
)
def test_a_model_that_breaks_the_contract_is_refused_naming_the_key(tiny_run, tmp_path, capsys, props, message):
    model = onnx.load(str(tiny_run["model"]))
    onnx.helper.set_model_props(model, {p.key: p.value for p in model.metadata_props} | props)
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert evaluate.main([str(tmp_path / "model.onnx"), "--n", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'model.onnx'}: ") and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.onnx"], "cannot load"),
        (["{model}", "--n", "1"], "n: must be at least 2"),
        (["{model}", "--dataset", "ring8"], "dataset"),
        (["{model}", "--classifier", "{model}"], "classifier: cannot load"),
        (["{model}", "--n", "10"], "n: image models need at least 20 samples"),
        (["{model}", "--fid-draws", "1"], "fid_draws: must be at least 2"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_run, capsys, args, message):
    assert evaluate.main([a.format(model=tiny_run["model"]) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_training_can_evaluate_its_export(tmp_path, capsys, monkeypatch):
    from training import run

    # The full protocol on 10,000 samples takes minutes; what is tested here is the wiring.
    monkeypatch.setattr(evaluate, "evaluate", functools.partial(evaluate.evaluate, n=500, draws=2, boot=0))
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--steps", "5", "--out", str(out), "--repository", str(tmp_path / "m"), "--evaluate"]
    assert run.main([*args, "--no-progress"]) == 0
    r = json.loads((out / "evaluation.json").read_text())
    assert r["samples"] == 500 and r["preset"] == "tiny" and r["other_extractors"]
    assert "label accuracy" in capsys.readouterr().out
    assert run.main([*args, "--no-export"]) == 2
