"""`python -m service` in its own process, as users run it, for tests and benches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: the shipped model, proto/, the sources


def shipped_version(name: str = "mnist-cdcgan") -> int:
    """The newest version of a model committed under models/: the one a server on that repository serves."""
    return max(int(p.name) for p in (ROOT / "models" / name).iterdir() if p.name.isdigit())


def start_server(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, dict]:
    """`python -m service ARGS`; returns the process and its ready line (ports, models) once it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ | env, cwd=cwd,
    )  # fmt: skip
    log: list[str] = []
    # Keep reading its log, so a chatty server can never block on a full pipe.
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    line = proc.stdout.readline()  # the one JSON line, printed once it serves
    assert line, "".join(log)
    return proc, json.loads(line)
