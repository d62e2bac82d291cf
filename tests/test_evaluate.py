"""python -m training.evaluate and the domain classifier, on real tiny models, offline."""

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from training import classifier, evaluate
from training.data import mnist5k, sha256_file
from training.export import export
from training.loop import Trainer

from .conftest import tiny_config


def test_bundled_classifier_is_the_published_one_and_reproduces_its_accuracy():
    assert sha256_file(classifier.BUNDLED) == classifier.BUNDLED_SHA256
    net, info, _ = classifier.load(classifier.BUNDLED)
    images, labels, _ = mnist5k("test")
    _, probs = classifier.run(net, images / 255.0)
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
    assert evaluate.main([str(tiny_run["model"]), "--n", "300", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    for key in ("parzen", "fid", "kid", "inception_score", "precision", "recall", "conditional"):
        assert key in r
    assert "FID" in printed and "label accuracy" in printed and "Parzen" in printed
    assert r["classifier"]["sha256"] == classifier.BUNDLED_SHA256
    c = r["conditional"]
    assert np.sum(c["confusion"]) == 300
    assert np.sum(np.asarray(c["confusion"]), 1).tolist() == [30] * 10  # balanced requested labels
    assert c["label_accuracy"] == pytest.approx(np.trace(np.asarray(c["confusion"])) / 300)
    # A 20-step model is far from the data: worse than the real-vs-real floor on every axis.
    assert r["fid"]["model"] > r["fid"]["floor"] > 0
    assert r["parzen"]["mean"] < 100 and r["parzen"]["test_images"] == 400
    assert 1 <= r["inception_score"]["model"] <= 10


def test_evaluation_is_deterministic(tiny_run):
    a = evaluate.evaluate(tiny_run["model"], n=200)
    b = evaluate.evaluate(tiny_run["model"], n=200)
    assert a == b


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
    r = evaluate.evaluate(tiny_run["model"], n=100, dataset="folder", data_dir=str(tmp_path / "data"), classifier=path)
    assert r["classifier"]["sha256"] == digest
    assert "fid" in r and "conditional" not in r  # its 3 classes are not the model's 10
    assert r["conditional_skipped"]


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({"format_version": "3"}, "format_version: '3' is not a format this reader knows"),
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
    ],
)
def test_bad_input_is_a_clear_error(tiny_run, capsys, args, message):
    assert evaluate.main([a.format(model=tiny_run["model"]) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_training_can_evaluate_its_export(tmp_path, capsys):
    from training import run

    out = tmp_path / "run"
    args = ["--preset", "tiny", "--steps", "5", "--out", str(out), "--repository", str(tmp_path / "m"), "--evaluate"]
    assert run.main([*args, "--no-progress"]) == 0
    r = json.loads((out / "evaluation.json").read_text())
    assert r["samples"] == evaluate.IMAGE_SAMPLES and r["preset"] == "tiny"
    assert "label accuracy" in capsys.readouterr().out
    assert run.main([*args, "--no-export"]) == 2
