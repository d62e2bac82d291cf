import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.contract import FORMAT_VERSION, ModelSpec, read_spec
from testkit.training import tiny_config
from training import export as export_mod
from training import run
from training.checkpoint import load_checkpoint
from training.config import PRESETS, TrainConfig
from training.data import sha256_file
from training.export import ExportError, export
from training.loop import Trainer

QUIET = dict(sample_every=0, checkpoint_every=0, log_every=0)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graph_interface_only_batch_is_dynamic(tiny_run):
    s = _session(tiny_run["model"])
    (z, y), (images,) = s.get_inputs(), s.get_outputs()
    cfg = PRESETS["tiny"].config
    assert (z.name, z.type, z.shape[1]) == ("z", "tensor(float)", cfg.latent_dim)
    assert (y.name, y.type, y.shape[1]) == ("y", "tensor(float)", 10)
    assert images.name == "images" and images.shape[1:] == [1, 28, 28]
    assert all(isinstance(t.shape[0], str) for t in (z, y, images))  # symbolic batch axis


def test_metadata_is_the_contract_spec_plus_provenance(tiny_run):
    session = _session(tiny_run["model"])
    raw = session.get_modelmeta().custom_metadata_map
    assert (raw["format_version"], raw["kind"], raw["seed_contract"]) == (str(FORMAT_VERSION), "image", "1")
    spec = read_spec(session)
    names = [d.name for d in spec.directions]
    assert names == ["sefa1", "sefa2", "sefa3", "sefa4", "sefa5", "ink", "slant", "width"]  # training/directions.py
    assert dataclasses.replace(spec, directions=()) == ModelSpec(
        "image", 16, "normal", tuple("0123456789"), (1, 28, 28), (-1.0, 1.0)
    )
    p = spec.provenance
    assert (p["architecture"], p["loss"], p["dataset"], p["preset"]) == ("dcgan", "nonsat", "mnist5k", "tiny")
    assert p["steps"] == "20" and p["ema"] == "true"
    assert (p["precision"], p["parity_atol"]) == ("fp32", str(export_mod.PARITY_ATOL))
    assert p["checkpoint_sha256"] == sha256_file(tiny_run["checkpoint"])
    assert p["torch_version"] and p["onnx_version"] == onnx.__version__ and p["created"]
    # The training machine's paths are kept to their last part: the file may be served to anyone.
    assert TrainConfig.from_json(p["config"]) == PRESETS["tiny"].config.replace(out=tiny_run["run"].name)
    assert str(tiny_run["run"].parent) not in p["config"]


def test_end_to_end_outputs_lie_in_the_declared_range(tiny_run):
    s = _session(tiny_run["model"])
    lo, hi = read_spec(s).output_range
    rng = np.random.default_rng(0)
    z = rng.standard_normal((33, 16), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 33)]
    (images,) = s.run(["images"], {"z": z, "y": y})
    assert images.shape == (33, 1, 28, 28) and images.dtype == np.float32
    assert lo <= images.min() and images.max() <= hi and images.std() > 0.01
    assert tiny_run["model"].parent.name == "1" and tiny_run["model"].stat().st_size < 1 << 20


def test_parity_across_architectures(tmp_path, tiny_run):
    ck = load_checkpoint(tiny_run["checkpoint"])
    g = export_mod.generator_from_checkpoint(ck)
    spec = read_spec(_session(tiny_run["model"]))
    assert export_mod.check(g, spec, tiny_run["model"]) <= export_mod.PARITY_ATOL
    configs = {
        "mlp": PRESETS["paper-mlp"].config.replace(steps=2, batch_size=16),
        "mlp2d": PRESETS["ring8"].config.replace(steps=2),
        "dcgan32-rgb-unconditional": tiny_config(tmp_path, steps=2, conditional=False, image_size=32, channels=3),
    }
    for name, cfg in configs.items():
        ckpt = Trainer(cfg.replace(out=str(tmp_path / name), **QUIET)).train(progress=False)
        path = export(ckpt, tmp_path / "models", name)  # runs the checker and the 1/7/64 parity
        g = export_mod.generator_from_checkpoint(load_checkpoint(ckpt))
        spec = read_spec(_session(path))
        assert export_mod.check(g, spec, path) <= 1e-4, name
        assert spec.prior == cfg.prior and spec.num_classes == 0
        assert (spec.kind, spec.output_range) == (("points", None) if name == "mlp2d" else ("image", g.output_range))


def test_fp16_export_keeps_the_contract_halves_the_file_and_says_so(tmp_path, tiny_run):
    path = export(tiny_run["checkpoint"], tmp_path / "models", "half", fp16=True)  # parity within FP16_ATOL
    s16, s32 = _session(path), _session(tiny_run["model"])
    half, full = read_spec(s16), read_spec(s32)
    # Same inputs, output and spec: the service needs no change. The directions, computed from each file's own
    # weights and samples, agree to within the halved precision.
    assert dataclasses.replace(half, directions=()) == dataclasses.replace(full, directions=())
    assert [d.name for d in half.directions] == [d.name for d in full.directions]
    for a, b in zip(half.directions, full.directions, strict=True):
        assert np.dot(a.vector, b.vector) > 0.99, a.name
    assert [i.type for i in s16.get_inputs()] == ["tensor(float)"] * 2 and s16.get_outputs()[0].type == "tensor(float)"
    p = read_spec(s16).provenance
    assert (p["precision"], p["parity_atol"]) == ("fp16", str(export_mod.FP16_ATOL))
    weights = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert weights and path.stat().st_size < 0.7 * tiny_run["model"].stat().st_size  # weights halve, graph stays
    rng = np.random.default_rng(1)
    feeds = {
        "z": rng.standard_normal((9, 16), dtype=np.float32),
        "y": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 9)],
    }
    diff = np.abs(s16.run(None, feeds)[0] - s32.run(None, feeds)[0]).max()
    assert 0 < diff <= 2 * export_mod.FP16_ATOL  # really fp16 arithmetic, and within what the metadata states


def test_versions_increase_and_are_never_overwritten(tmp_path, tiny_run):
    repo = tmp_path / "models"
    first = export(tiny_run["checkpoint"], repo, "m")
    before = first.read_bytes()
    second = export(tiny_run["checkpoint"], repo, "m", use_ema=False)
    assert (first.parent.name, second.parent.name) == ("1", "2")
    assert first.read_bytes() == before
    assert first.parent.stat().st_mode & 0o755 == 0o755  # a server running as another user can read it
    assert read_spec(_session(second)).provenance["ema"] == "false"
    # Version 1 holds the EMA generator, version 2 the raw one: same input, their own outputs.
    ck = load_checkpoint(tiny_run["checkpoint"])
    z, y = export_mod.example_inputs(export_mod.generator_from_checkpoint(ck), 5, "normal", seed=3)
    feeds = {"z": z.numpy(), "y": y.numpy()}
    outputs = {}
    for path, use_ema in ((first, True), (second, False)):
        outputs[use_ema] = _session(path).run(None, feeds)[0]
        expected = export_mod.generator_from_checkpoint(ck, use_ema)(z, y).numpy()
        assert np.abs(outputs[use_ema] - expected).max() < 1e-4
    assert np.abs(outputs[True] - outputs[False]).max() > 1e-3
    (repo / "m" / "7").mkdir()  # a gap: the next version follows the highest
    assert export(tiny_run["checkpoint"], repo, "m").parent.name == "8"
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "7", "8"]  # no staging left


def test_a_failed_check_publishes_nothing(tmp_path, tiny_run, monkeypatch):
    monkeypatch.setattr(export_mod, "PARITY_ATOL", -1.0)
    with pytest.raises(ExportError, match="differ by"):
        export(tiny_run["checkpoint"], tmp_path / "models", "m")
    assert list((tmp_path / "models" / "m").iterdir()) == []


def test_a_file_that_breaks_the_contract_publishes_nothing(tmp_path, tiny_run, monkeypatch):
    to_onnx = export_mod.to_onnx
    monkeypatch.setattr(
        export_mod,
        "to_onnx",
        lambda g, prior, path, props, *rest: to_onnx(g, prior, path, props | {"latent_dim": "15"}, *rest),
    )
    with pytest.raises(ExportError, match="does not honour the contract: input z: expected float"):
        export(tiny_run["checkpoint"], tmp_path / "models", "m")
    assert list((tmp_path / "models" / "m").iterdir()) == []


def test_two_d_generators_stay_out_of_the_serving_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where models/ would be
    args = ["--preset", "ring8", "--steps", "2", "--out", "run", "--no-progress", "--sample-every", "0"]
    assert run.main(args) == 0
    model = Path("run", "models", "ring8", "1", "model.onnx")
    assert f"exported {model}" in capsys.readouterr().out
    assert read_spec(_session(model)).kind == "points" and not Path("models").exists()
    assert export_mod.default_repository(PRESETS["mnist-cdcgan"].config) == Path("models")
    assert run.main([*args, "--steps", "3", "--resume", "--repository", "served"]) == 0  # an explicit one wins
    assert Path("served", "ring8", "1", "model.onnx").exists()


def test_export_cli(tmp_path, tiny_run, capsys):
    code = export_mod.main([str(tiny_run["checkpoint"]), "--repository", str(tmp_path), "--name", "cli"])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "cli" / "1" / "model.onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert export_mod.main([str(tmp_path / "junk.pt"), "--repository", str(tmp_path), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "Traceback" not in err
    assert export_mod.main([str(tmp_path / "missing.pt"), "--name", "x"]) == 2
    assert f"{tmp_path / 'missing.pt'}: cannot read checkpoint" in capsys.readouterr().err


def test_training_command_end_to_end(tmp_path):
    """The documented command: train `tiny` → checkpoint → grid → models/<name>/1/model.onnx."""
    out = subprocess.run(
        [sys.executable, "-m", "training.run", "--preset", "tiny", "--steps", "6",
         "--out", str(tmp_path / "run"), "--repository", str(tmp_path / "models"), "--name", "e2e",
         "--no-progress"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    model = tmp_path / "models" / "e2e" / "1" / "model.onnx"
    assert f"exported {model}" in out.stdout
    assert (tmp_path / "run" / "samples" / "final.png").exists()
    assert (tmp_path / "run" / "checkpoints" / "step_0000006.pt").exists()
    (images,) = _session(model).run(None, {"z": np.zeros((2, 16), np.float32), "y": np.eye(10, dtype=np.float32)[:2]})
    assert images.shape == (2, 1, 28, 28)
