"""training/checkpoint.py on hand-made checkpoints: finding, writing, reading and resuming, without training."""

import re
from pathlib import Path

import pytest
import torch

from training.checkpoint import (
    CHECKPOINT_FORMAT,
    REQUIRED_KEYS,
    CheckpointError,
    checkpoint_path,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    resume_config,
    spec_from_checkpoint,
    write_checkpoint,
)
from training.config import PRESETS, ConfigError


def _state(**changes) -> dict:
    state = {key: {} for key in REQUIRED_KEYS} | {
        "format": CHECKPOINT_FORMAT,
        "config": PRESETS["tiny"].config.to_dict(),
        "spec": {"shape": [1, 28, 28], "class_names": list("0123456789")},
        "G": {"w": torch.arange(3.0)},
    }
    return state | changes


def test_written_checkpoints_read_back_and_the_newest_is_found(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 9):
        write_checkpoint(_state(counters={"step": step}), checkpoint_path(tmp_path, step))
    (tmp_path / "checkpoints" / "step_0000099.pt.tmp").write_bytes(b"torn")  # a crash mid-write elsewhere
    newest = latest_checkpoint(tmp_path)
    assert newest == tmp_path / "checkpoints" / "step_0000010.pt" == find_checkpoint("latest", tmp_path)
    ck = load_checkpoint(newest)
    assert ck["counters"]["step"] == 10 and torch.equal(ck["G"]["w"], torch.arange(3.0))
    assert spec_from_checkpoint(ck).shape == (1, 28, 28) and spec_from_checkpoint(ck).num_classes == 10
    assert find_checkpoint(str(newest), tmp_path / "elsewhere") == newest


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 1)
    write_checkpoint(_state(counters={"step": 1}), path)
    before = path.read_bytes()

    def disk_full(obj, f):
        Path(f).write_bytes(before[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(_state(counters={"step": 2}), path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read checkpoint"),  # missing
        (b"not a checkpoint", "cannot read checkpoint"),
        ({"format": CHECKPOINT_FORMAT + 1}, f"not a checkpoint of format {CHECKPOINT_FORMAT}"),
        ([1, 2], f"not a checkpoint of format {CHECKPOINT_FORMAT}"),
        ("drop G_ema", f"not a checkpoint of format {CHECKPOINT_FORMAT}"),
    ],
)
def test_unusable_checkpoints_are_a_checkpoint_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "step_0000001.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "drop G_ema":
        torch.save({k: v for k, v in _state().items() if k != "G_ema"}, path)
    elif content is not None:
        torch.save(_state(**content) if isinstance(content, dict) else content, path)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}"):
        load_checkpoint(path)


def test_resume_finds_nothing_to_resume_as_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"resume: no checkpoint at {tmp_path}")):
        find_checkpoint("latest", tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"resume: no checkpoint at {tmp_path / 'none.pt'}")):
        find_checkpoint(str(tmp_path / "none.pt"), tmp_path)


def test_a_resumed_run_may_change_only_what_leaves_its_numbers_alone(tmp_path):
    ck = _state()
    cfg = resume_config(ck, {"steps": 99, "out": str(tmp_path), "log_every": 1, "seed": 0})  # seed unchanged
    assert (cfg.steps, cfg.out, cfg.log_every, cfg.batch_size) == (99, str(tmp_path), 1, 16)
    with pytest.raises(ConfigError, match=r"^batch_size, seed: cannot change on resume"):
        resume_config(ck, {"steps": 99, "seed": 1, "batch_size": 8})
