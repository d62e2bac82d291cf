"""Shared fixtures (one tiny conditional model trained and exported once per session), and each module's tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from testkit.training import tiny_config

# Hypothesis: a fuzz test draws its full count of cases under "thorough", 2/5 of it under "quick", the default
# (test_fuzz.py scales by max_examples); bench/fuzz.py draws tens of thousands against a server process.
settings.register_profile("thorough", max_examples=100)
settings.register_profile("quick", max_examples=40)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

# Each test module's tier (markers registered in pyproject.toml): `pytest -m unit` runs the inner loop, `-m "not
# ddp and not browser"` skips the slow tiers. A module missing here fails collection, so none goes untiered.
TIERS = {
    "unit": [
        "test_augment", "test_batcher", "test_checkpoint", "test_config", "test_contract", "test_encode",
        "test_latents", "test_layout", "test_losses", "test_nets", "test_repository", "test_scores",
        "test_server_config", "test_text",
    ],
    "component": [
        "test_animation", "test_cache", "test_data", "test_directions", "test_edit", "test_evaluate", "test_inversion", "test_oip_invert", "test_images_api", "test_export", "test_faults", "test_fuzz", "test_gate", "test_http",
        "test_interceptor", "test_lifecycle", "test_loop", "test_profiles", "test_protocol", "test_runtime", "test_security",
        "test_service", "test_shipped_model", "test_tracing",
    ],
    "process": [
        "test_client_security", "test_objectstore", "test_oip", "test_proto", "test_service_process", "test_startup", "test_workers",
    ],
    "browser": ["test_playground"],
    "ddp": ["test_ddp"],
    "image": ["test_deploy"],
    "fleet": ["test_fleet"],
}  # fmt: skip
TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


@pytest.fixture(autouse=True, scope="session")
def _profile_cache(tmp_path_factory: pytest.TempPathFactory):
    """Batch-size profiles (service/profiles.py) go to a directory of this run, not the user's cache: every server
    the tests start, in this process or another, measures afresh."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        if module not in TIER_OF:
            raise pytest.UsageError(f"tests/{module}.py has no tier: add it to TIERS in tests/conftest.py")
        item.add_marker(TIER_OF[module])


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
