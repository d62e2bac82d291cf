"""Batch-size profiles cached on disk: a restart or a reload of the same model on the same machine does not time it
again, and chooses the same batch size as the start that measured it.

A profile is keyed by everything that changes what a run costs: the model file's bytes (SHA-256), the provider in use
and its options, the thread settings, the sizes measured, the ONNX Runtime version, and the machine (architecture,
CPU model, usable cores). A file that does not parse, or holds anything but sizes and seconds, is ignored and measured
over; a cache that cannot be written costs one warning, never a load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import onnxruntime as ort

from service.contract import file_sha256

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a profile holds changes meaning
_warned: set[str] = set()


def directory(setting: str) -> Path | None:
    """--profile-cache as a directory: "auto" → $XDG_CACHE_HOME/gan-serve (~/.cache/gan-serve); "" → no cache."""
    if not setting:
        return None
    if setting != "auto":
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gan-serve"


def cpu_model() -> str:
    """The CPU's model name where Linux says it, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def key(model: Path, facts: dict[str, object]) -> str:
    """The cache key of `model` run as `facts` say (provider, options, threads, sizes): hex SHA-256."""
    machine = {"arch": platform.machine(), "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0))
               if hasattr(os, "sched_getaffinity") else os.cpu_count(), "ort": ort.__version__}  # fmt: skip
    text = json.dumps({"format": FORMAT, "model": file_sha256(model), **machine, **facts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load(cache: Path | None, name: str) -> dict[int, float] | None:
    """The profile stored under `name`, or None when there is none or it is not one."""
    if cache is None:
        return None
    try:
        raw = json.loads((cache / f"{name}.json").read_text())
        timings = {int(size): float(seconds) for size, seconds in raw["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not timings or any(size < 1 or not 0 < seconds < 3600 for size, seconds in timings.items()):
        return None
    return timings


def save(cache: Path | None, name: str, timings: dict[int, float]) -> None:
    """Store a profile (written whole and renamed into place, so that a reader never sees half of one)."""
    if cache is None:
        return
    temporary = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache, suffix=".tmp", delete=False) as f:
            temporary = Path(f.name)
            json.dump({"seconds": {str(size): seconds for size, seconds in timings.items()}}, f)
        os.replace(temporary, cache / f"{name}.json")
    except OSError as e:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if str(cache) not in _warned:  # a read-only filesystem: say so once, measure at every load
            _warned.add(str(cache))
            log.warning("cannot write batch-size profiles to %s (%s); each load will time the model", cache, e)
