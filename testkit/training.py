"""The `tiny` training preset, writing under a directory of the caller's."""

from __future__ import annotations

from pathlib import Path

from training.config import PRESETS, TrainConfig


def tiny_config(out: Path, **changes) -> TrainConfig:
    return PRESETS["tiny"].config.replace(out=str(out), **changes)
