"""Latency of one inversion through the server, beside one generated image: one run, one machine.

    python bench/invert_bench.py [--calls 200]

Starts `python -m service` on the shipped model (with its encoder.onnx) in its own process and calls it from here,
one call at a time: Generate of one image, Invert of one image with the encoder alone, and with 100 and 400
generator passes of refinement. Prints p50 and p99 of each and their ratio to Generate's p50.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from testkit.process import start_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = "mnist-cdcgan"


def timed(call, n: int) -> list[float]:
    call()  # a first call pays for connections and first runs
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return sorted(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    env = {"GAN_PORT": "0", "GAN_HTTP_PORT": "-1", "GAN_METRICS_PORT": "-1", "GAN_HOST": "127.0.0.1"}
    with tempfile.TemporaryDirectory() as tmp:
        proc, ready = start_server(["--model-repository", str(ROOT / "models")], env, Path(tmp))
        try:
            stub = pb_grpc.GeneratorStub(grpc.insecure_channel(f"127.0.0.1:{ready['port']}"))
            one = pb.GenerateRequest(model=MODEL, seeds=pb.SeedList(seeds=[7]), labels=[pb.Label(index=7)])
            png = stub.Generate(one).images[0]
            cases = {"Generate, 1 image": lambda: stub.Generate(one)}
            for passes in (0, 100, 400):
                ask = pb.InvertRequest(model=MODEL, images=[png], refine_passes=passes)
                cases[f"Invert, 1 image, {passes} passes"] = lambda ask=ask: stub.Invert(ask)
            results = {name: timed(call, args.calls) for name, call in cases.items()}
        finally:
            proc.terminate()
            proc.wait(30)
    base = statistics.median(results["Generate, 1 image"])
    print(f"{'call':<34} {'p50 ms':>8} {'p99 ms':>8} {'÷ Generate p50':>15}")
    for name, times in results.items():
        p50, p99 = statistics.median(times), times[int(0.99 * (len(times) - 1))]
        print(f"{name:<34} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f} {p50 / base:15.1f}")


if __name__ == "__main__":
    main()
