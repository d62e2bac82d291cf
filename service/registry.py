"""The model repository: discovery, validation, loading, versions. Health follows it.

Layout: <repository>/<name>/<version>/model.onnx, version a positive integer. Each version gets its own
ONNX Runtime session and batcher. A model that fails validation is skipped with one clear log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.batcher import BatchConfig, Batcher, BatchObserver
from service.errors import NotFound, short
from service.runtime import RuntimeConfig, Session

log = logging.getLogger(__name__)


class ModelError(Exception):
    """A model file that does not honour the ONNX contract; the message says how."""


@dataclass(frozen=True)
class ModelSpec:
    """What the ONNX contract (metadata_props + signature) says about a generator."""

    latent_dim: int
    prior: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # C, H, W
    output_range: tuple[float, float]
    metadata: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_spec(session: Session) -> ModelSpec:
    """Validate metadata and signature against each other; raise ModelError naming what is wrong."""
    meta = dict(session.session.get_modelmeta().custom_metadata_map)

    def need(key: str) -> str:
        if key not in meta:
            raise ModelError(f"metadata_props lacks {key!r}")
        return meta[key]

    try:
        latent_dim = int(need("latent_dim"))
        num_classes = int(need("num_classes"))
        class_names = tuple(json.loads(need("class_names")))
        shape = tuple(json.loads(need("image_shape")))
        out_range = json.loads(need("output_range"))
    except (ValueError, TypeError) as e:
        raise ModelError(f"unreadable metadata: {e}") from None
    prior = need("prior")
    if prior not in ("normal", "uniform"):
        raise ModelError(f"prior {prior!r} is neither normal nor uniform")
    if len(class_names) != num_classes:
        raise ModelError(f"num_classes {num_classes} but {len(class_names)} class_names")
    if (
        len(shape) != 3
        or shape[0] not in (1, 3)
        or not out_range
        or len(out_range) != 2
        or not out_range[0] < out_range[1]
    ):
        raise ModelError(f"not an image generator: image_shape {list(shape)}, output_range {out_range}")

    inputs = {i.name: i for i in session.session.get_inputs()}
    expected = {"z": latent_dim} | ({"y": num_classes} if num_classes else {})
    if set(inputs) != set(expected):
        raise ModelError(f"inputs {sorted(inputs)} do not match the metadata (expected {sorted(expected)})")
    for name, width in expected.items():
        arg = inputs[name]
        if arg.type != "tensor(float)" or len(arg.shape) != 2 or arg.shape[1] != width:
            raise ModelError(f"input {name}: expected float [batch, {width}], got {arg.type} {arg.shape}")
    outputs = {o.name: o for o in session.session.get_outputs()}
    if "images" not in outputs or list(outputs["images"].shape[1:]) != list(shape):
        raise ModelError(f"output 'images' must be [batch, {', '.join(map(str, shape))}]")
    return ModelSpec(latent_dim, prior, class_names, shape, (float(out_range[0]), float(out_range[1])), meta)


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    session: Session
    spec: ModelSpec
    batcher: Batcher

    async def run(self, z: np.ndarray, y: np.ndarray | None, deadline: float | None) -> np.ndarray:
        feeds = {"z": z} if y is None else {"z": z, "y": y}
        return await self.batcher.submit(feeds, deadline)


ObserverFactory = Callable[[str, int], BatchObserver | None]


class Registry:
    def __init__(
        self,
        repository: Path,
        runtime: RuntimeConfig,
        batching: BatchConfig,
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
        spec = read_spec(session)
        session.warm_up(self.batching.max_batch_size, spec.latent_dim, spec.num_classes)
        batcher = Batcher(session.run, self.batching, self._observer(name, version))
        return ModelVersion(name, version, path, session, spec, batcher)

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
