"""ONNX Runtime sessions: provider choice, thread settings, warm-up. One session per model version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.config import RuntimeConfig

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
NVIDIA_DRIVER = "/proc/driver/nvidia/version"


def providers(config: RuntimeConfig) -> list[str]:
    """The execution providers to ask for, in order of preference."""
    if config.providers != "auto":
        return [p.strip() for p in config.providers.split(",") if p.strip()]
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
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers(config))
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)  # served as is by GetModel

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
