"""Batch-size profiles cached on disk (service/profiles.py): a restart times nothing and chooses what the first
start chose; anything else (another file, other threads, a corrupt or unwritable cache) measures afresh."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from service import profiles
from service.config import BatchingConfig, ModelControl, RuntimeConfig
from service.registry import Registry
from service.repository import LocalRepository
from service.runtime import Session
from testkit.servefix import plain_model


class Counting(Session):
    """A real session that counts how often it is timed."""

    measured = 0

    def warm_up(self, max_batch: int, latent_dim: int, num_classes: int, measure: bool = True) -> dict[int, float]:
        Counting.measured += measure
        return super().warm_up(max_batch, latent_dim, num_classes, measure)


def load(repo: Path, cache: Path | str, threads: int = 1) -> tuple[int, int]:
    """Start a registry on `repo` as a server would, and stop it: (batch size chosen, times a session was timed)."""

    async def go() -> int:
        runtime = RuntimeConfig(intra_op_threads=threads)
        registry = Registry(LocalRepository(repo), ModelControl(), runtime, BatchingConfig(max_batch_size=16, profile_cache=str(cache)),
                            session_factory=Counting)  # fmt: skip
        await registry.sync()
        try:
            return registry.models["m"][1].batcher.batch_size
        finally:
            await registry.stop()

    before = Counting.measured
    size = asyncio.run(go())
    return size, Counting.measured - before


def test_a_restart_reads_the_profile_and_chooses_the_same_size(tmp_path):
    model = plain_model(tmp_path / "repo" / "m" / "1" / "model.onnx", shape=(1, 8, 8))
    cache = tmp_path / "cache"
    first = load(model.parents[2], cache)
    assert first[1] == 1 and len(list(cache.glob("*.json"))) == 1
    for _ in range(3):
        assert load(model.parents[2], cache) == (first[0], 0)  # the same choice, and nothing timed
    # Other threads, another file: different costs, so measured again (each stored beside the first).
    assert load(model.parents[2], cache, threads=2)[1] == 1
    plain_model(model, shape=(1, 8, 8), gain=2.0)
    assert load(model.parents[2], cache)[1] == 1
    assert len(list(cache.glob("*.json"))) == 3 and not list(cache.glob("*.tmp"))


def test_a_corrupt_profile_is_measured_over_and_no_cache_means_every_load_times(tmp_path):
    model = plain_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    cache = tmp_path / "cache"
    load(model.parents[2], cache)
    (stored,) = cache.glob("*.json")
    for garbage in ("{not json", json.dumps({"seconds": {"4": -1}}), json.dumps({"seconds": ["x"]}), "[]"):
        stored.write_text(garbage)
        assert load(model.parents[2], cache)[1] == 1
        assert profiles.load(cache, stored.stem) is not None  # rewritten whole
    assert [load(model.parents[2], "")[1] for _ in range(2)] == [1, 1]


def test_an_unwritable_cache_costs_one_warning_and_no_load(tmp_path, caplog):
    model = plain_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory's parent should be")
    with caplog.at_level(logging.WARNING, logger="service.profiles"):
        results = [load(model.parents[2], blocker / "cache") for _ in range(2)]
    assert [timed for _, timed in results] == [1, 1]
    assert len([r for r in caplog.records if "cannot write batch-size profiles" in r.message]) == 1
