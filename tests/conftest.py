"""Shared fixtures: one tiny conditional model trained and exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import PRESETS, TrainConfig


def tiny_config(out: Path, **changes) -> TrainConfig:
    return PRESETS["tiny"].config.replace(out=str(out), **changes)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """Train the `tiny` preset, export it; returns the paths a user would look at."""
    from training.export import export
    from training.loop import Trainer

    root = tmp_path_factory.mktemp("tiny")
    trainer = Trainer(tiny_config(root / "run"))
    checkpoint = trainer.train(progress=False)
    model = export(checkpoint, root / "models", "tiny")
    return {"run": root / "run", "checkpoint": checkpoint, "model": model, "repository": root / "models"}
