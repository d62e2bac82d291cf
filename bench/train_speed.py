"""Seconds per Algorithm-1 iteration (k D updates + 1 G update) for every preset, on this machine.

    python bench/train_speed.py [--iters 30] [--presets tiny,mnist-cdcgan]

Prints a Markdown table. Warm-up iterations are excluded; data loading is excluded (done once).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from training.config import PRESETS
from training.loop import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--presets", default=",".join(PRESETS))
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| preset | arch | batch | k | s/iter | real images/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.presets.split(","):
        with tempfile.TemporaryDirectory() as out:
            cfg = PRESETS[name].config.replace(out=out)
            trainer = Trainer(cfg)
            for _ in range(args.warmup):
                trainer.iteration()
            start = time.perf_counter()
            for _ in range(args.iters):
                trainer.iteration()
            s_per_it = (time.perf_counter() - start) / args.iters
        images = cfg.k * cfg.batch_size / s_per_it
        print(f"| {name} | {cfg.arch} | {cfg.batch_size} | {cfg.k} | {s_per_it:.3f} | {images:,.0f} |")


if __name__ == "__main__":
    main()
