"""The GPU path: raw ONNX Runtime CUDA vs the service, batch sizes 1…1024, fp32 and fp16, CUDA graphs off and on.

    python bench/gpu_bench.py [--duration 4] [--sizes 1,4,16,64,256,1024] [--concurrency 4]

Builds a DCGAN generator (one training step: untrained weights cost the same) and exports it twice, fp32 and fp16.
For every precision and graph setting it measures, in one run:
  raw      one session (the service's own Session class, so IO binding and graphs are the same code) running
           batches of each size back to back in this process: the ceiling;
  service  `python -m service` with the same settings, driven over gRPC with raw uint8 requests of each size
           from `concurrency` callers.
On a machine without a GPU it says so and measures the CPU provider instead, which checks the script, not a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import ROOT, load, request, service
from service.api.ganserve.v1 import generator_pb2 as pb
from service.runtime import CUDA, RuntimeConfig, Session, providers

MAX_BATCH = 1024


def build(repo: Path) -> None:
    """In a child process, so that torch never shares this process with the measurements."""
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from training.config import PRESETS
from training.export import export
from training.loop import Trainer
repo = Path({str(repo)!r})
cfg = PRESETS["mnist-dcgan"].config.replace(steps=1, out=str(repo.parent / "run"), sample_every=0, log_every=0)
checkpoint = Trainer(cfg).train(progress=False)
export(checkpoint, repo, "fp32")
export(checkpoint, repo, "fp16", fp16=True)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def raw(path: Path, graphs: bool, sizes: list[int], duration: float) -> dict[int, float]:
    """img/s of one session at each batch size, batches back to back."""
    session = Session(path, RuntimeConfig(cuda_graph=graphs, intra_op_threads=0))
    d = session.session.get_inputs()[0].shape[1]
    session.warm_up(MAX_BATCH, d, 0, measure=False)  # captures every bucket's graph
    out = {}
    for n in sizes:
        feeds = {"z": np.random.default_rng(n).standard_normal((n, d), np.float32)}
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            session.run(feeds)
            runs += 1
        out[n] = runs * n / (time.perf_counter() - start)
    return out


def served(
    repo: Path, model: str, graphs: bool, sizes: list[int], duration: float, concurrency: int
) -> dict[int, float]:
    server = service(repo, max_batch_size=MAX_BATCH, max_images=MAX_BATCH, cuda_graph=str(graphs).lower())
    try:
        return {
            n: asyncio.run(load(server.port, request(model, n, pb.RAW_UINT8), concurrency, duration)).ips for n in sizes
        }
    finally:
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    p.add_argument("--sizes", default="1,4,16,64,256,1024", help="batch sizes (images per request)")
    p.add_argument("--concurrency", type=int, default=4, help="callers driving the service")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    gpu = providers(RuntimeConfig())[0] == CUDA
    if not gpu:
        print("no GPU here (no CUDA provider with an NVIDIA driver): measuring the CPU provider; not GPU figures")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        build(repo)
        for precision in ("fp32", "fp16"):
            path = repo / precision / "1" / "model.onnx"
            for graphs in (False, True) if gpu else (False,):
                base = raw(path, graphs, sizes, args.duration)
                ours = served(repo, precision, graphs, sizes, args.duration, args.concurrency)
                for n in sizes:
                    rows.append((precision, "on" if graphs else "off", n, base[n], ours[n]))
                    print(f"{precision} graphs {rows[-1][1]} batch {n}: raw {base[n]:,.0f} img/s,"
                          f" service {ours[n]:,.0f} img/s ({ours[n] / base[n]:.2f})", flush=True)  # fmt: skip
    device = "GPU (CUDA provider)" if gpu else "CPU provider (no GPU)"
    print(f"\n{device}, service driven by {args.concurrency} callers, raw uint8")
    print("| precision | CUDA graphs | batch | raw ORT img/s | service img/s | ÷ raw |\n|---|---|---|---|---|---|")
    for precision, graphs, n, base, ours in rows:
        print(f"| {precision} | {graphs} | {n} | {base:,.0f} | {ours:,.0f} | {ours / base:.2f} |")


if __name__ == "__main__":
    main()
