"""Checkpoints: where they live, how they are written and read, and what a resumed run may change.

A checkpoint is one torch file of tensors and plain containers (read with weights_only=True) that
describes itself: format, config, data spec, counters, G, D, G_ema, both optimisers and every RNG
(under torchrun also world_size, rng_ranks and replica_sha256).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.config import ConfigError, TrainConfig
from training.data import DataSpec

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = frozenset({"format", "config", "spec", "counters", "G", "D", "G_ema", "opt_g", "opt_d", "rng"})
# Fields a resumed run may change: they move files or extend the run but do not change its numbers.
RESUMABLE_CHANGES = ("steps", "out", "data_dir", "sample_every", "checkpoint_every", "log_every")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not of CHECKPOINT_FORMAT."""


def checkpoint_path(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}.pt"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def find_checkpoint(resume: str, out: Path) -> Path:
    """What `--resume` names: the newest checkpoint under `out` for "latest", else the path given."""
    path = latest_checkpoint(out) if resume == "latest" else Path(resume)
    if path is None or not path.is_file():
        raise CheckpointError(f"resume: no checkpoint at {path or out}")
    return path


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) beside `path`, then rename tmp onto it: a crash mid-write never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only) and check its format."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or not ck.keys() >= REQUIRED_KEYS:
        raise CheckpointError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}")
    return ck


def spec_from_checkpoint(ck: dict[str, Any]) -> DataSpec:
    return DataSpec(tuple(ck["spec"]["shape"]), tuple(ck["spec"]["class_names"]))


def resume_config(ck: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The checkpointed run's config with `overrides`, which may only touch RESUMABLE_CHANGES."""
    cfg = TrainConfig.from_dict(ck["config"])
    changed = sorted(k for k, v in overrides.items() if getattr(cfg, k) != v and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(
            f"{', '.join(changed)}: cannot change on resume (it would no longer be the checkpointed run);"
            f" a resumed run may change only {', '.join(RESUMABLE_CHANGES)}"
        )
    return cfg.replace(**overrides)
