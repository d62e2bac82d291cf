"""Seconds per Algorithm-1 iteration (k D updates + 1 G update) for every preset, on this machine.

    python bench/train_speed.py [--iters 30] [--presets tiny,mnist-cdcgan] [--side-by-side]

Prints a Markdown table. Warm-up iterations are excluded; data loading is excluded (done once).
--side-by-side: for each preset, one process on every core against one single-threaded process per core, run at
the same time: whether several single-threaded runs use a small machine better than one multi-threaded run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from training.config import PRESETS
from training.loop import Trainer


def seconds_per_iteration(name: str, iters: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(PRESETS[name].config.replace(out=out))
        for _ in range(warmup):
            trainer.iteration()
        start = time.perf_counter()
        for _ in range(iters):
            trainer.iteration()
        return (time.perf_counter() - start) / iters


def side_by_side(name: str, iters: int, warmup: int) -> None:
    """One process with all threads, then one single-threaded process per core, all at once."""
    cores = os.cpu_count() or 1

    def run(threads: int, copies: int) -> list[float]:
        cmd = [sys.executable, __file__, "--presets", name, "--iters", str(iters), "--warmup", str(warmup), "--raw"]
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
        return [float(p.communicate()[0]) for p in procs]

    (alone,) = run(cores, 1)
    pair = run(1, cores)
    together = sum(1 / s for s in pair)
    print(f"| {name} | 1 × {cores} threads | {alone:.4f} | {1 / alone:.1f} |")
    print(f"| {name} | {cores} × 1 thread | {' / '.join(f'{s:.4f}' for s in pair)} | {together:.1f} |")
    print(f"\n{cores} single-threaded runs ÷ one {cores}-thread run, iterations per second: {together * alone:.2f}×")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--side-by-side", action="store_true", help="one multi-threaded run vs one run per core")
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # one preset's s/iter, for --side-by-side
    args = p.parse_args()
    names = args.presets.split(",")
    if args.raw:
        print(seconds_per_iteration(names[0], args.iters, args.warmup))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.side_by_side:
        print("| preset | processes | s/iter (each) | iterations/s (all) |\n|---|---|---:|---:|")
        for name in names:
            side_by_side(name, args.iters, args.warmup)
        return
    print("| preset | arch | batch | k | s/iter | real images/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        cfg = PRESETS[name].config
        s_per_it = seconds_per_iteration(name, args.iters, args.warmup)
        images = cfg.k * cfg.batch_size / s_per_it
        print(f"| {name} | {cfg.arch} | {cfg.batch_size} | {cfg.k} | {s_per_it:.3f} | {images:,.0f} |")


if __name__ == "__main__":
    main()
