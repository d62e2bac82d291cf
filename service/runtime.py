"""ONNX Runtime sessions: provider choice and options, thread settings, warm-up and batch-size measurement.

One session per model version. On CPU a batch is a plain `run`. On a GPU the batch goes through IO binding (inputs
copied in once, the output bound on the device and copied back once per batch), and optionally through CUDA graphs:
one graph per batch-size bucket, each batch padded to its bucket and the padding sliced off.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.config import RuntimeConfig, parse_provider_options
from service.contract import read_encoder
from service.errors import FailedPrecondition

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU = (CUDA, TENSORRT)
NVIDIA_DRIVER = "/proc/driver/nvidia/version"
PROFILE_SECONDS = 0.3  # measuring batch sizes takes at least this long, in all (and PROFILE_ROUNDS rounds)
PROFILE_ROUNDS = 5
MAX_CPU_WORKERS = 8  # runs side by side per model version; more rarely pays and multiplies memory
_preloaded = False


def usable_cores() -> int:
    """Cores this process may run on (its affinity, not the host's count), capped at MAX_CPU_WORKERS."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # macOS and Windows have no affinity call: the CPUs Python says this process may use (3.13+), or all
        cores = (getattr(os, "process_cpu_count", None) or os.cpu_count)() or 1
    return max(1, min(cores, MAX_CPU_WORKERS))


def providers(config: RuntimeConfig) -> list[str]:
    """The execution providers to ask for, in order of preference."""
    if config.providers != "auto":
        return [p.strip() for p in config.providers.split(",") if p.strip()]
    # The GPU build lists CUDA as available even on a host without a GPU, and asking for it there
    # costs an error message per session. Ask only where the NVIDIA driver is loaded.
    gpu = CUDA in ort.get_available_providers() and Path(NVIDIA_DRIVER).exists()
    return [CUDA, CPU] if gpu else [CPU]


def provider_list(config: RuntimeConfig) -> list[str | tuple[str, dict[str, str]]]:
    """providers() with each one's options: --provider-options, plus what --cuda-graph and --tensorrt-cache imply."""
    options = parse_provider_options(config.provider_options)
    if config.cuda_graph:
        options.setdefault(CUDA, {})["enable_cuda_graph"] = "1"
    if config.tensorrt_cache:
        options.setdefault(TENSORRT, {}).update(
            trt_engine_cache_enable="1", trt_engine_cache_path=config.tensorrt_cache,
            trt_timing_cache_enable="1", trt_timing_cache_path=config.tensorrt_cache,
        )  # fmt: skip
    return [(p, options[p]) if p in options else p for p in providers(config)]


def preload_gpu_libraries() -> None:
    """Load CUDA and cuDNN from their pip wheels (onnxruntime-gpu[cuda,cudnn]) once, so no CUDA base image is needed.

    A no-op on the CPU build; where the wheels are missing ORT falls back to the system's libraries.
    """
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as e:  # missing wheels are not fatal: the system's CUDA may still be there
        log.warning("could not preload CUDA/cuDNN from pip packages (%s); relying on the system's libraries", e)


def buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a CUDA graph is captured for: powers of two below max_batch, and max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def bucket_for(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest bucket that holds n samples."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"a batch of {n} is over the largest bucket, {sizes[-1]}")


def pad(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with zero rows appended up to `rows` (the padding's outputs are sliced off after the run)."""
    if len(array) == rows:
        return array
    out = np.zeros((rows, *array.shape[1:]), array.dtype)
    out[: len(array)] = array
    return out


class _Graphs:
    """CUDA graphs: per bucket, device buffers at fixed addresses bound once and a graph id; one run at a time."""

    def __init__(self, session: ort.InferenceSession, sizes: tuple[int, ...], device_id: int):
        self.session, self.sizes = session, sizes
        self.lock = threading.Lock()  # a graph session must not run from several threads at once
        self.slots = {}
        out = session.get_outputs()[0]
        for graph_id, size in enumerate(sizes):
            binding = session.io_binding()
            inputs = {}
            for i in session.get_inputs():
                value = ort.OrtValue.ortvalue_from_shape_and_type((size, *i.shape[1:]), np.float32, "cuda", device_id)
                binding.bind_ortvalue_input(i.name, value)
                inputs[i.name] = value
            images = ort.OrtValue.ortvalue_from_shape_and_type((size, *out.shape[1:]), np.float32, "cuda", device_id)
            binding.bind_ortvalue_output(out.name, images)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self.slots[size] = (binding, inputs, images, options)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        n = len(next(iter(feeds.values())))
        size = bucket_for(n, self.sizes)
        binding, inputs, images, options = self.slots[size]
        with self.lock:
            for name, value in inputs.items():
                value.update_inplace(np.ascontiguousarray(pad(feeds[name], size)))
            self.session.run_with_iobinding(binding, options)
            return images.numpy()[:n]


def _options(config: RuntimeConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
    options.log_severity_level = 3  # a CUDA build on a GPU-less host would warn on every load
    return options


class EncoderSession:
    """An encoder.onnx (service/contract.py, EncoderSpec): images → z and class logits. Small and run once per
    inversion, off the batcher, on the CPU."""

    def __init__(self, path: Path, config: RuntimeConfig):
        self.session = ort.InferenceSession(str(path), sess_options=_options(config), providers=[CPU])
        self.spec = read_encoder(self.session)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.run(np.zeros((2, *self.spec.image_shape), np.float32))  # one that answers wrongly is refused at load

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """z [n, latent_dim] and logits [n, classes] (None for an unconditional generator) of images [n, C, H, W];
        FailedPrecondition when the file answers anything else (its graph is untrusted input too)."""
        out = dict(zip(self.outputs, self.session.run(self.outputs, {"images": images}), strict=True))
        n, spec = len(images), self.spec
        expected = {"z": (n, spec.latent_dim)} | ({"logits": (n, len(spec.class_names))} if spec.class_names else {})
        for name, shape in expected.items():
            if out[name].shape != shape or not np.all(np.isfinite(out[name])):
                raise FailedPrecondition(
                    f"encoder.onnx answered {name} {list(out[name].shape)} with non-finite values or another shape"
                    f" than {list(shape)}"
                )
        return out["z"], out.get("logits")


class Session:
    """An InferenceSession plus what the service needs to know about it."""

    def __init__(self, path: Path, config: RuntimeConfig):
        self.config = config
        asked = provider_list(config)
        names = [p if isinstance(p, str) else p[0] for p in asked]
        if any(p in GPU for p in names):
            preload_gpu_libraries()
        self.session = ort.InferenceSession(str(path), sess_options=_options(config), providers=asked)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)  # served as is by GetModel
        self.on_gpu = self.provider in GPU
        wanted = [p for p in names if p in GPU]
        if wanted and not self.on_gpu:
            log.warning(
                "%s: asked for %s, but ONNX Runtime runs this model on %s (no GPU, no driver, or a CPU-only"
                " onnxruntime build); serving on CPU", path.name, " and ".join(wanted), self.provider,
            )  # fmt: skip
        self._graphs: _Graphs | None = None
        self._output = self.session.get_outputs()[0].name

    @property
    def provider(self) -> str:
        """The provider actually in use (a requested CUDA may have fallen back to CPU)."""
        return self.session.get_providers()[0]

    @property
    def concurrent_runs(self) -> int:
        """How many runs at once suit this session: 1 with CUDA graphs, 0 when the caller should decide."""
        return 1 if self._graphs is not None else 0

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self._graphs is not None:
            return self._graphs.run(feeds)
        if self.on_gpu:
            # IO binding: the output stays on the device until one copy back per batch.
            binding = self.session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            binding.bind_output(self._output, "cuda")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        (images,) = self.session.run([self._output], feeds)
        return images

    def warm_up(self, max_batch: int, latent_dim: int, num_classes: int, measure: bool = True) -> dict[int, float]:
        """Run every power-of-two batch size up to max_batch, so that no request pays for first-run setup (cuDNN's
        algorithm search, graph capture); with `measure`, returns seconds per run by batch size (choose_batch_size)."""
        sizes = buckets(max_batch)
        if self.config.cuda_graph and self.provider == CUDA:
            device = int(parse_provider_options(self.config.provider_options).get(CUDA, {}).get("device_id", 0))
            self._graphs = _Graphs(self.session, sizes, device)
        batches = {}
        for n in sizes:
            feeds = {"z": np.zeros((n, latent_dim), np.float32)}
            if num_classes:
                feeds["y"] = np.full((n, num_classes), 1.0 / num_classes, np.float32)
            self.run(feeds)  # the first run of a shape sets up (and captures a graph); it is not timed
            batches[n] = feeds
        if not measure:
            return {}
        # Rounds of one run per size, interleaved, so that drift on a busy machine (another process, the clock
        # speed) touches every size alike rather than whichever was measured last. The fastest run of each size:
        # other work only ever adds time, so the minimum is the least disturbed estimate of what a run costs.
        timings = dict.fromkeys(sizes, math.inf)
        start, rounds = time.perf_counter(), 0
        while rounds < PROFILE_ROUNDS or time.perf_counter() - start < PROFILE_SECONDS:
            for n, feeds in batches.items():
                t = time.perf_counter()
                self.run(feeds)
                timings[n] = min(timings[n], time.perf_counter() - t)
            rounds += 1
        return timings
