"""The model repository: discovery, validation, loading, versions. Health follows it.

Layout: <repository>/<name>/<version>/model.onnx, version a positive integer. Each version gets its own
ONNX Runtime session and batcher. A model that fails validation is skipped with one clear log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.batcher import Batcher, BatchObserver
from service.config import BatchingConfig, RuntimeConfig
from service.contract import ContractError, ModelSpec, read_spec
from service.errors import NotFound, short
from service.runtime import Session

log = logging.getLogger(__name__)


def served_spec(session: Session) -> ModelSpec:
    """The file's spec, checked against its graph and against what this server serves."""
    spec = read_spec(session.session)
    if spec.kind != "image":
        raise ContractError(f"kind: {spec.kind!r} generators are not served; this server serves image generators")
    return spec


@dataclass
class ModelVersion:
    name: str
    version: int
    session: Session
    spec: ModelSpec
    batcher: Batcher

    @property
    def ready(self) -> bool:
        """Taking requests: loaded and not draining."""
        return self.batcher.accepting

    async def run(self, z: np.ndarray, y: np.ndarray | None, deadline: float | None) -> np.ndarray:
        feeds = {"z": z} if y is None else {"z": z, "y": y}
        return await self.batcher.submit(feeds, deadline)


ObserverFactory = Callable[[str, int], BatchObserver | None]


class Registry:
    def __init__(
        self,
        repository: Path,
        runtime: RuntimeConfig,
        batching: BatchingConfig,
        observer: ObserverFactory = lambda name, version: None,
        on_load: Callable[[ModelVersion], None] = lambda mv: None,
        on_failure: Callable[[str, str], None] = lambda name, reason: None,
    ):
        self.repository, self.runtime, self.batching = Path(repository), runtime, batching
        self._observer, self._on_load, self._on_failure = observer, on_load, on_failure
        self.models: dict[str, dict[int, ModelVersion]] = {}

    def discover(self) -> list[tuple[str, int, Path]]:
        """Every <name>/<version>/model.onnx under the repository (staging and other folders ignored)."""
        if not self.repository.is_dir():
            return []
        found = []
        for model_dir in sorted(p for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for version_dir in model_dir.iterdir():
                if version_dir.name.isdigit() and int(version_dir.name) > 0 and (version_dir / "model.onnx").is_file():
                    found.append((model_dir.name, int(version_dir.name), version_dir / "model.onnx"))
        return sorted(found)

    def load(self, name: str, version: int, path: Path) -> ModelVersion:
        session = Session(path, self.runtime)
        spec = served_spec(session)
        session.warm_up(self.batching.max_batch_size, spec.latent_dim, spec.num_classes)
        batcher = Batcher(session.run, self.batching, self._observer(name, version))
        return ModelVersion(name, version, session, spec, batcher)

    async def load_all(self) -> int:
        """Load every version not loaded yet; returns how many loaded. Failures are logged and skipped."""
        loaded = 0
        for name, version, path in self.discover():
            if version in self.models.get(name, {}):
                continue
            try:
                # Session creation and warm-up take a while: off the event loop, so serving goes on meanwhile.
                mv = await asyncio.get_running_loop().run_in_executor(None, self.load, name, version, path)
            except Exception as e:  # any failure to load one model must not stop the others
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.error("skipping model %s version %d (%s): %s", name, version, path, reason)
                self._on_failure(name, reason)
                continue
            await mv.batcher.start()
            self.models.setdefault(name, {})[version] = mv
            self._on_load(mv)
            log.info("loaded model %s version %d on %s", name, version, mv.session.provider)
            loaded += 1
        return loaded

    @property
    def ready(self) -> bool:
        return any(self.models.values())

    def versions(self, name: str) -> list[int]:
        """Loaded versions of `name`, ascending (empty when none)."""
        return sorted(self.models.get(name, ()))

    def get(self, name: str, version: int = 0) -> ModelVersion:
        """A version (0 = the latest loaded); NotFound names what is missing."""
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none loaded"
            raise NotFound(f"model: no model named {short(name)} (models: {known})")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise NotFound(f"version: model {name!r} has no version {version} (versions: {sorted(versions)})")
        return versions[version]

    async def stop(self) -> None:
        """Drain every batcher: queued work finishes, new work is refused."""
        for versions in self.models.values():
            for mv in versions.values():
                await mv.batcher.stop()
