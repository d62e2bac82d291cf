"""The ONNX Runtime layer on CPU: batch-size measurement, GPU-path logic (buckets, padding, provider options) and
the fallback to CPU when a GPU provider is asked for where none runs."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from service import runtime
from service.batcher import choose_batch_size
from service.config import RuntimeConfig, parse_provider_options
from service.runtime import CPU, CUDA, TENSORRT, Session, bucket_for, buckets, pad, provider_list
from testkit.servefix import echo_model, plain_model


def test_buckets_are_powers_of_two_capped_by_the_maximum():
    assert buckets(1) == (1,)
    assert buckets(8) == (1, 2, 4, 8)
    assert buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)


@pytest.mark.parametrize(("n", "bucket"), [(1, 1), (2, 2), (3, 4), (64, 64), (65, 100), (100, 100)])
def test_a_batch_goes_to_the_smallest_bucket_that_holds_it(n, bucket):
    assert bucket_for(n, buckets(100)) == bucket


def test_no_bucket_holds_more_than_the_maximum():
    with pytest.raises(ValueError, match="101"):
        bucket_for(101, buckets(100))


def test_padding_appends_zero_rows_and_keeps_the_batch():
    z = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
    padded = pad(z, 4)
    assert padded.shape == (4, 2) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:3], z)
    np.testing.assert_array_equal(padded[3], 0)
    assert pad(z, 3) is z  # a full bucket is not copied


def test_provider_options_parse_per_provider():
    text = "CUDAExecutionProvider: device_id=1, cudnn_conv_algo_search=HEURISTIC; TensorrtExecutionProvider:trt_fp16_enable=1"
    assert parse_provider_options(text) == {
        CUDA: {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"},
        TENSORRT: {"trt_fp16_enable": "1"},
    }
    assert parse_provider_options("") == {}


@pytest.mark.parametrize(
    "text", ["device_id=1", "CUDA:device_id=1", "CUDAExecutionProvider:device_id", "CUDAExecutionProvider:=1"]
)
def test_bad_provider_options_are_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="provider_options"):
        RuntimeConfig(provider_options=text)


def test_cuda_graph_and_tensorrt_cache_become_provider_options():
    cfg = RuntimeConfig(
        providers=f"{TENSORRT},{CUDA},{CPU}", provider_options=f"{CUDA}:device_id=0", cuda_graph=True,
        tensorrt_cache="/var/cache/trt",
    )  # fmt: skip
    (trt, trt_options), (cuda, cuda_options), cpu = provider_list(cfg)
    assert (trt, cuda, cpu) == (TENSORRT, CUDA, CPU)
    assert cuda_options == {"device_id": "0", "enable_cuda_graph": "1"}
    assert trt_options["trt_engine_cache_enable"] == "1" and trt_options["trt_engine_cache_path"] == "/var/cache/trt"


def test_cpu_runs_need_no_provider_options():
    assert provider_list(RuntimeConfig(providers=CPU)) == [CPU]


def test_a_gpu_asked_for_where_none_runs_falls_back_to_cpu_with_a_clear_log_line(tmp_path, caplog):
    path = echo_model(tmp_path / "model.onnx")
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        session = Session(path, RuntimeConfig(providers=f"{CUDA},{CPU}", cuda_graph=True))
    assert session.provider == CPU and not session.on_gpu
    assert "asked for CUDAExecutionProvider" in caplog.text and "serving on CPU" in caplog.text
    session.warm_up(4, 5, 3, measure=False)  # no graphs on CPU: a plain run at every size
    assert session.concurrent_runs == 0
    z, y = np.zeros((3, 5), np.float32), np.eye(3, dtype=np.float32)
    assert session.run({"z": z, "y": y}).shape == (3, 1, 2, 4)


def test_warm_up_times_every_bucket_and_the_choice_follows_the_timings(tmp_path):
    session = Session(plain_model(tmp_path / "model.onnx"), RuntimeConfig())
    timings = session.warm_up(16, 8, 0)
    assert sorted(timings) == [1, 2, 4, 8, 16] and all(t > 0 for t in timings.values())
    assert choose_batch_size(timings) in timings


def test_choose_batch_size_takes_the_smallest_size_near_the_best_cost_per_sample():
    # A CPU: per-sample time falls until 16, then rises (caches); 8 is within 10% of 16's cost and smaller.
    cpu = {1: 1.0e-3, 2: 1.4e-3, 4: 2.2e-3, 8: 4.0e-3, 16: 7.6e-3, 32: 15.5e-3, 64: 33e-3}
    assert choose_batch_size(cpu, overhead=0) == 8
    assert choose_batch_size(cpu, overhead=0, tolerance=0.02) == 16
    # A flat CPU profile like a measured DCGAN's (µs per sample 181, 176, 180, 174): with the service's overhead per
    # batch, 8 is over 10% dearer than 64, 16 within it; never the 64 that made 8 closed-loop callers wait in waves.
    flat = {8: 8 * 181e-6, 16: 16 * 176e-6, 32: 32 * 180e-6, 64: 64 * 174e-6}
    assert choose_batch_size(flat) == 16
    # A GPU: the run time barely grows with the batch, so the largest size wins.
    gpu = {1: 1.0e-3, 8: 1.05e-3, 64: 1.3e-3, 512: 3.0e-3}
    assert choose_batch_size(gpu, overhead=0) == 512
    # The batcher's own cost per batch favours bigger batches when runs are tiny.
    tiny = {1: 10e-6, 2: 18e-6, 4: 34e-6, 8: 66e-6}
    assert choose_batch_size(tiny, overhead=0) == 2  # 9 µs per sample, within 10% of 8's 8.25
    assert choose_batch_size(tiny, overhead=100e-6) == 8
    with pytest.raises(ValueError, match="timings"):
        choose_batch_size({})


def test_usable_cores_without_cpu_affinity_as_on_macos_and_windows(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)
    assert runtime.usable_cores() == 3
    monkeypatch.delattr(os, "process_cpu_count")  # before Python 3.13
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert runtime.usable_cores() == runtime.MAX_CPU_WORKERS
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert runtime.usable_cores() == 1
