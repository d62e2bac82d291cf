"""Service vs raw ONNX Runtime vs an echo server, batching on vs off: one run, one machine.

    python bench/serve_bench.py [--duration 8]

Builds a DCGAN and the paper's MLP generator (untrained weights cost the same), starts `python -m service`
and an echo server in their own processes, drives them from an async gRPC client in this process, and
measures raw ONNX Runtime here with its default (all-core) threading. Prints the P1–P4 ratios of the service
issue; raw uint8 output is the headline, PNG is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import numpy as np

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.api.inference import grpc_predict_v2_pb2 as oip_pb
from service.api.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.runtime import RuntimeConfig, Session

ROOT = Path(__file__).resolve().parent.parent


def build_models(repo: Path) -> None:
    from training.config import PRESETS
    from training.export import export
    from training.loop import Trainer

    for name, preset in (("dcgan", "mnist-dcgan"), ("mlp", "paper-mlp")):
        out = repo.parent / f"run-{name}"
        cfg = PRESETS[preset].config.replace(steps=1, out=str(out), sample_every=0, log_every=0)
        export(Trainer(cfg).train(progress=False), repo, name)


@dataclass
class Stats:
    requests: int
    images: int
    seconds: float
    latencies: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def ips(self) -> float:
        return self.images / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


async def load(
    port: int, request: pb.GenerateRequest, concurrency: int, duration: float,
    credentials: grpc.ChannelCredentials | None = None, metadata: tuple = (),
) -> Stats:  # fmt: skip
    """`concurrency` callers in a closed loop for `duration` seconds (after a short warm-up), over one channel:
    TLS with `credentials`, plaintext without; `metadata` goes with every call (a bearer token)."""
    target = f"127.0.0.1:{port}"
    secure = credentials is not None
    channel = (
        grpc.aio.secure_channel(target, credentials, OPTIONS) if secure else grpc.aio.insecure_channel(target, OPTIONS)
    )
    async with channel:
        stub = pb_grpc.GeneratorStub(channel)

        async def call() -> int:
            return len((await stub.Generate(request, metadata=metadata)).images)

        return await drive(call, concurrency, duration)


OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


async def drive(call, concurrency: int, duration: float) -> Stats:
    """`concurrency` callers of `call()` (which returns how many images it got) in a closed loop, after 3 warm-ups."""
    for _ in range(3):
        await call()
    latencies: list[float] = []
    images = 0
    stop = time.perf_counter() + duration

    async def caller() -> None:
        nonlocal images
        while time.perf_counter() < stop:
            t = time.perf_counter()
            got = await call()  # not `images += await call()`: that reads `images` before the await
            latencies.append(time.perf_counter() - t)
            images += got

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Stats(len(latencies), images, time.perf_counter() - start, latencies)


async def protocol_load(
    kind: str, port: int, http_port: int, model: str, n: int, concurrency: int, duration: float
) -> Stats:
    """One workload (n uint8 images per request) through one front end: ganserve.v1, OIP gRPC, or OIP REST."""
    if kind == "ganserve.v1 Generate":
        return await load(port, request(model, n, pb.RAW_UINT8), concurrency, duration)
    if kind == "OIP gRPC ModelInfer":
        infer = oip_pb.ModelInferRequest(model_name=model, parameters={
            "seed_start": oip_pb.InferParameter(int64_param=0), "count": oip_pb.InferParameter(int64_param=n),
            "datatype": oip_pb.InferParameter(string_param="UINT8")})  # fmt: skip
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", OPTIONS) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)

            async def call() -> int:
                return (await stub.ModelInfer(infer)).outputs[0].shape[0]

            return await drive(call, concurrency, duration)
    binary = kind == "OIP REST infer (binary)"
    body = {"parameters": {"seed_start": 0, "count": n, "datatype": "UINT8", "binary_data_output": binary}}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{http_port}", connector=connector) as session:

        async def call() -> int:
            async with session.post(f"/v2/models/{model}/infer", json=body) as r:
                data = await r.read()
                if r.status != 200:
                    raise RuntimeError(data[:200])
                head = int(r.headers.get("Inference-Header-Content-Length", len(data)))
                return json.loads(data[:head])["outputs"][0]["shape"][0]

        return await drive(call, concurrency, duration)


PROTOCOLS = ("ganserve.v1 Generate", "OIP gRPC ModelInfer", "OIP REST infer (binary)", "OIP REST infer (JSON)")


def protocols(repo: Path, d: float, rounds: int) -> None:
    """P1 and P2 through every front end against one server each, interleaved rounds; medians, ÷ ganserve.v1."""
    table = []
    for label, model, n, concurrency in (("P1", "dcgan", 16, 8), ("P2", "mlp", 1, 64)):
        server = service(repo)
        try:
            got: dict[str, list[Stats]] = {k: [] for k in PROTOCOLS}
            for _ in range(rounds):
                for kind in PROTOCOLS:
                    stats = asyncio.run(protocol_load(kind, server.port, server.http_port, model, n, concurrency, d))
                    got[kind].append(stats)
                    print(f"{label} {kind}: {stats.ips:,.0f} img/s, {stats.rps:,.0f} req/s, p50 {stats.pct(50):.2f} ms",
                          flush=True)  # fmt: skip
        finally:
            server.close()
        base = float(np.median([s.rps for s in got[PROTOCOLS[0]]]))
        for kind in PROTOCOLS:
            rps = float(np.median([s.rps for s in got[kind]]))
            p50 = float(np.median([s.pct(50) for s in got[kind]]))
            table.append((label, kind, f"{rps * n:,.0f}", f"{rps:,.0f}", f"{rps / base:.2f}", f"{p50:.2f}"))
    print(
        f"\n| workload | front end | img/s | req/s | ÷ ganserve.v1 | p50 ms |  (median of {rounds})\n|---|---|---|---|---|---|"
    )
    for row in table:
        print("| " + " | ".join(row) + " |")


# (label, model, images per request, callers, server flags, front end): what --against compares, tree by tree.
AGAINST = [
    ("P1", "dcgan", 16, 8, {}, PROTOCOLS[0]), ("P2", "mlp", 1, 64, {}, PROTOCOLS[0]),
    ("P3 (P2, batching off)", "mlp", 1, 64, {"batching": "false"}, PROTOCOLS[0]), ("P4", "dcgan", 1, 1, {}, PROTOCOLS[0]),
    *((f"P1 {kind}", "dcgan", 16, 8, {}, kind) for kind in PROTOCOLS[1:]),
    *((f"P2 {kind}", "mlp", 1, 64, {}, kind) for kind in PROTOCOLS[1:]),
]  # fmt: skip


AGAINST_BATCH = 16


def against(repo: Path, tree: Path, d: float, rounds: int, only: str = "") -> None:
    """Every workload of AGAINST on servers of `tree` (an older checkout) and of this tree, rounds interleaved so
    that drift on a shared machine hits both alike; medians, and this tree ÷ that one."""
    trees = [("before", tree.resolve()), ("after", ROOT)]
    got: dict[tuple[str, str], list[Stats]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}  # server CPU µs per request: steadier than img/s on a busy box
    for r in range(rounds):
        for which, where in trees if r % 2 == 0 else trees[::-1]:
            # One batch size for both trees: the size measured at start varies from start to start (16 or 64 for
            # the same profile), which would swamp what this compares, the cost of the front ends.
            fixed = {"preferred_batch_size": AGAINST_BATCH}
            servers = {"": service(repo, where, **fixed), "false": service(repo, where, batching="false", **fixed)}
            try:
                for label, model, n, concurrency, flags, kind in AGAINST:
                    if only and label != only:
                        continue
                    server = servers[flags.get("batching", "")]
                    stats, us = per_call(server, kind, model, n, concurrency, d)
                    got.setdefault((label, which), []).append(stats)
                    cpu.setdefault((label, which), []).append(us)
                    print(f"round {r + 1} {which} {label}: {stats.ips:,.0f} img/s, p50 {stats.pct(50):.2f} ms",
                          flush=True)  # fmt: skip
            finally:
                for server in servers.values():
                    server.close()
    print(f"\n| workload | before img/s | after img/s | after ÷ before | p50 ms before → after | server CPU µs/request"
          f" before → after (÷) | (median of {rounds})\n|---|---|---|---|---|---|")  # fmt: skip
    for label, *_ in AGAINST:
        if only and label != only:
            continue
        ips = [float(np.median([s.ips for s in got[label, which]])) for which, _ in trees]
        p50 = [float(np.median([s.pct(50) for s in got[label, which]])) for which, _ in trees]
        us = [float(np.median(cpu[label, which])) for which, _ in trees]
        print(f"| {label} | {ips[0]:,.0f} | {ips[1]:,.0f} | {ips[1] / ips[0]:.2f} | {p50[0]:.2f} → {p50[1]:.2f} |"
              f" {us[0]:,.0f} → {us[1]:,.0f} ({us[1] / us[0]:.2f}) |")  # fmt: skip


def raw_ort(path: Path, batch: int, duration: float, streams: int = 1) -> Stats:
    """ONNX Runtime alone, one batch after another: one stream on all cores (its default threading), or `streams`
    single-threaded runs side by side on one session. The strict baseline: no RPC, no queue, no encoding."""
    session = Session(path, RuntimeConfig(intra_op_threads=0 if streams == 1 else 1))
    feeds = {
        "z": np.random.default_rng(0).standard_normal((batch, session.session.get_inputs()[0].shape[1]), np.float32)
    }
    for _ in range(3):
        session.run(feeds)
    latencies: list[float] = []
    stop = time.perf_counter() + duration

    def loop() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            session.run(feeds)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Stats(len(latencies), len(latencies) * batch, time.perf_counter() - start, latencies)


RAW_BATCHES = (8, 16, 32, 64, 128)


def raw_best(path: Path, duration: float) -> tuple[Stats, str]:
    """Raw ORT's best configuration on this machine: every batch size in RAW_BATCHES, on one all-core stream and
    on one single-threaded stream per core."""
    cores = len(os.sched_getaffinity(0))
    best: tuple[Stats, str] | None = None
    for streams in sorted({1, cores}):
        for batch in RAW_BATCHES:
            stats = raw_ort(path, batch, duration, streams)
            label = f"batch {batch}, " + ("1 stream × all cores" if streams == 1 else f"{streams} streams × 1 thread")
            print(f"  raw ORT {label}: {stats.ips:,.0f} img/s", flush=True)
            if best is None or stats.ips > best[0].ips:
                best = (stats, label)
    assert best is not None
    return best


class Process:
    """A server subprocess; its ports come from the JSON line it prints on stdout once serving. Its log is kept in
    memory, or written to `log` when given."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120, log: Path | None = None,
        cwd: Path = ROOT,
    ):  # fmt: skip
        self.log = log
        with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as err:
            self.proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ | (env or {}), cwd=cwd
            )
        lines: list[str] = []
        self._lines = lines
        if log is None:  # keep draining it, so a chatty server can never block on a full pipe
            threading.Thread(target=lambda: lines.extend(self.proc.stderr), daemon=True).start()
        watchdog = threading.Timer(timeout, self.proc.kill)  # a server that never gets ready ends the wait
        watchdog.start()
        line = self.proc.stdout.readline()
        watchdog.cancel()
        if not line:
            tail = "".join(lines[-20:]) if log is None else "\n".join(log.read_text().splitlines()[-20:])
            raise RuntimeError(f"{args} did not start (exit status {self.proc.wait()}):\n{tail}")
        ready = json.loads(line)
        self.port, self.metrics_port, self.http_port = ready["port"], ready.get("metrics_port"), ready.get("http_port")

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read().decode()

    def batches(self) -> tuple[float, float]:
        """(samples, batches) formed so far, over every model."""
        text = self.metrics()
        total = sum(float(v) for v in re.findall(r"^gan_batch_size_sum\{[^}]*\} (\S+)", text, re.M))
        count = sum(float(v) for v in re.findall(r"^gan_batch_size_count\{[^}]*\} (\S+)", text, re.M))
        return total, count

    def mean_batch(self, since: tuple[float, float] = (0.0, 0.0)) -> float:
        total, count = (now - then for now, then in zip(self.batches(), since, strict=True))
        return total / count if count else float("nan")

    def batch_size(self, model: str) -> int:
        """The batch size the server formed for `model`, from its log line (needs `log`)."""
        found = re.findall(rf"model {model} version \d+: batches of (\d+)", self.log_text())
        return int(found[-1]) if found else 0

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far (user + system), with its live child processes (--workers), from
        /proc (Linux)."""
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry.name) == self.proc.pid or int(fields[1]) == self.proc.pid:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def log_text(self) -> str:
        return "".join(self._lines) if self.log is None else self.log.read_text()

    def close(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=60)


def service(repo: Path, tree: Path = ROOT, more_env: dict[str, str] | None = None, **flags) -> Process:
    env = (more_env or {}) | {
        "GAN_PORT": "0",
        "GAN_METRICS_PORT": "0",
        "GAN_HTTP_PORT": "0",
        "GAN_HOST": "127.0.0.1",
        "GAN_GRACE_SECONDS": "1",
    }
    env |= {f"GAN_{k.upper()}": str(v) for k, v in flags.items()}
    return Process([sys.executable, "-m", "service", "--model-repository", str(repo)], env, cwd=tree)


def run_service(
    repo: Path, request: pb.GenerateRequest, concurrency: int, duration: float,
    credentials: grpc.ChannelCredentials | None = None, metadata: tuple = (), **flags,
):  # fmt: skip
    server = service(repo, **flags)
    try:
        stats = asyncio.run(load(server.port, request, concurrency, duration, credentials, metadata))
        return stats, server.mean_batch()
    finally:
        server.close()


def on_off_png(repo: Path, model: str, n: int, concurrency: int, duration: float, png: bool = True):
    """One workload against three servers: batching on (with its mean formed batch), off, and on with PNG output."""
    on, batch = run_service(repo, request(model, n, pb.RAW_UINT8), concurrency, duration)
    off, _ = run_service(repo, request(model, n, pb.RAW_UINT8), concurrency, duration, batching="false")
    png_stats = run_service(repo, request(model, n, pb.PNG), concurrency, duration)[0] if png else None
    return on, batch, off, png_stats


def request(model: str, n: int, fmt: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model, seed_range=pb.SeedRange(start=0, count=n), output=pb.OutputOptions(format=fmt)
    )


def security(repo: Path, tmp: Path, d: float, rounds: int) -> None:
    """The cost of TLS, mutual TLS and token checks on P2 (req/s) and P4 (p50), beside plaintext, in one run."""
    sys.path.insert(0, str(ROOT))  # the tests' throwaway PKI
    from testkit.certs import CA

    ca = CA(tmp / "pki")
    server, client = ca.issue("server"), ca.issue("client", client=True)
    token = "bench-token-" + "0" * 20
    (tmp / "tokens").write_text(f"bench infer {token}\n")
    tls = {"tls_cert": server.cert, "tls_key": server.key}
    roots = ca.pem.read_bytes()
    one_way = grpc.ssl_channel_credentials(roots)
    mutual = grpc.ssl_channel_credentials(roots, client.key.read_bytes(), client.cert.read_bytes())
    bearer = (("authorization", f"Bearer {token}"),)
    configs = {
        "plaintext": ({}, None, ()),
        "tokens": ({"auth_tokens_file": tmp / "tokens"}, None, bearer),
        "TLS": (tls, one_way, ()),
        "TLS + tokens": (tls | {"auth_tokens_file": tmp / "tokens"}, one_way, bearer),
        "mTLS + tokens": (tls | {"auth_tokens_file": tmp / "tokens", "tls_client_ca": ca.pem}, mutual, bearer),
    }
    p2: dict[str, list[float]] = {name: [] for name in configs}
    p4: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):  # interleaved, so that drift on a shared machine hits every configuration alike
        for name, (flags, credentials, metadata) in configs.items():
            stats, _ = run_service(repo, request("mlp", 1, pb.RAW_UINT8), 64, d, credentials, metadata, **flags)
            p2[name].append(stats.rps)
            stats, _ = run_service(repo, request("dcgan", 1, pb.RAW_UINT8), 1, d, credentials, metadata, **flags)
            p4[name].append(stats.pct(50))
            print(f"{name}: P2 {p2[name][-1]:,.0f} req/s, P4 p50 {p4[name][-1]:.2f} ms", flush=True)
    base2, base4 = float(np.median(p2["plaintext"])), float(np.median(p4["plaintext"]))
    print(
        f"\n| configuration | P2 req/s (median of {rounds}) | ÷ plaintext | P4 p50 ms | − plaintext |\n|---|---|---|---|---|"
    )
    for name in configs:
        r2, r4 = float(np.median(p2[name])), float(np.median(p4[name]))
        print(f"| {name} | {r2:,.0f} | {r2 / base2:.2f} | {r4:.2f} | {r4 - base4:+.2f} ms |")


def tracing(repo: Path, d: float, rounds: int) -> None:
    """The cost of OpenTelemetry tracing on P2 (req/s, server CPU µs per request) and P4 (p50): off, on with every
    call sampled, and on with 1 in 10, exporting over OTLP/gRPC to a sink in this process that counts what it gets;
    rounds interleaved (the order reversed every other round), medians."""
    sys.path.insert(0, str(ROOT))
    from testkit.otlp import Sink

    sink = Sink()
    ratio = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    configs = {"off": {}, "on, every call sampled": sink.env, "on, 1 in 10 sampled": sink.env | ratio}
    got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in configs}
    sent = dict.fromkeys(configs, 0)  # bytes exported
    try:
        for r in range(rounds):
            for name in configs if r % 2 == 0 else list(configs)[::-1]:
                before = sink.bytes
                server = service(repo, more_env=configs[name], preferred_batch_size=AGAINST_BATCH)
                try:
                    p2, us = per_call(server, PROTOCOLS[0], "mlp", 1, 64, d)
                    p4 = asyncio.run(load(server.port, request("dcgan", 1, pb.RAW_UINT8), 1, d))
                finally:
                    server.close()  # its last spans are exported as it stops
                sent[name] += sink.bytes - before
                got[name].append((p2.rps, us, p4.pct(50)))
                print(f"round {r + 1} tracing {name}: P2 {p2.rps:,.0f} req/s, {us:.0f} µs/req; P4 p50"
                      f" {p4.pct(50):.2f} ms; {(sink.bytes - before) / 1e6:.1f} MB exported", flush=True)  # fmt: skip
    finally:
        sink.close()
    base = [float(np.median([g[i] for g in got["off"]])) for i in range(3)]
    print(f"\n| tracing | P2 req/s | ÷ off | P2 server CPU µs/req | ÷ off | P4 p50 ms | − off | OTLP MB exported |"
          f"  (median of {rounds})\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name, rows in got.items():
        rps, us, p50 = (float(np.median([g[i] for g in rows])) for i in range(3))
        print(f"| {name} | {rps:,.0f} | {rps / base[0]:.2f} | {us:,.0f} | {us / base[1]:.2f} | {p50:.2f} |"
              f" {p50 - base[2]:+.2f} ms | {sent[name] / 1e6:.1f} |")  # fmt: skip


def per_call(server: Process, kind: str, model: str, n: int, concurrency: int, d: float) -> tuple[Stats, float]:
    """One workload through one front end, and the server's CPU µs per request meanwhile."""
    before = server.cpu_seconds()
    stats = asyncio.run(protocol_load(kind, server.port, server.http_port, model, n, concurrency, d))
    return stats, (server.cpu_seconds() - before) / stats.requests * 1e6


def w2(repo: Path, d: float, rounds: int) -> None:
    """The W2 shape (paper MLP, 1 image per request, 64 callers) and P4 (DCGAN, 1 caller, 1 image): the echo server,
    this service over gRPC and over REST, with 1 and 2 workers; req/s, server CPU µs per request (the whole process
    group), mean formed batch; interleaved rounds, medians."""
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for _ in range(rounds):
        echo = Process(
            [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--images", "1", "--image-bytes", "784"]
        )
        try:
            stats, us = per_call(echo, PROTOCOLS[0], "mlp", 1, 64, d)
            p4 = asyncio.run(load(echo.port, request("dcgan", 1, pb.RAW_UINT8), 1, d / 2))  # gRPC's own floor
            rows.setdefault("echo server, gRPC", []).append((stats.rps, us, float("nan"), p4.pct(50)))
        finally:
            echo.close()
        for workers in (1, 2):
            server = service(repo, workers=workers)
            try:
                for label, kind in (("gRPC", PROTOCOLS[0]), ("REST (binary)", PROTOCOLS[2])):
                    batches = server.batches()
                    stats, us = per_call(server, kind, "mlp", 1, 64, d)
                    p4 = asyncio.run(protocol_load(kind, server.port, server.http_port, "dcgan", 1, 1, d / 2))
                    mean = server.mean_batch(since=batches)
                    rows.setdefault(f"service, {label}, --workers {workers}", []).append(
                        (stats.rps, us, mean, p4.pct(50))
                    )
                    print(f"{label} workers {workers}: {stats.rps:,.0f} req/s, {us:.0f} µs/req, batch {mean:.1f},"
                          f" P4 p50 {p4.pct(50):.2f} ms", flush=True)  # fmt: skip
            finally:
                server.close()
    raw1 = raw_ort(repo / "dcgan" / "1" / "model.onnx", 1, max(1.0, d / 2))
    echo_rps = float(np.median([r[0] for r in rows["echo server, gRPC"]]))
    print(f"\n| W2 (64 callers, 1 image) | req/s | ÷ echo | server CPU µs/request | mean formed batch | P4 p50 − raw batch-1"
          f" ({raw1.pct(50):.2f} ms) |  (median of {rounds})\n|---|---|---|---|---|---|")  # fmt: skip
    for label, got in rows.items():
        rps, us, batch, p4 = (float(np.median([g[i] for g in got])) for i in range(4))
        p4_text = "–" if p4 != p4 else f"{p4 - raw1.pct(50):+.2f} ms"
        batch_text = "–" if batch != batch else f"{batch:.1f}"
        print(f"| {label} | {rps:,.0f} | {rps / echo_rps:.2f} | {us:,.0f} | {batch_text} | {p4_text} |")


def fairness(repo: Path, d: float) -> None:
    """Small requests under a big-request load: 1-image Generate p50/p99 from one caller, alone and beside 16
    callers asking for 1,024-image PNG grids; then streams under overload (do any fail half-way?)."""
    server = service(repo, max_queue=16 * 1024)  # room for every big request: none is refused
    small = request("dcgan", 1, pb.RAW_UINT8)
    big = pb.GenerateRequest(model="dcgan", seed_range=pb.SeedRange(start=0, count=1024),
                             output=pb.OutputOptions(format=pb.PNG, grid=True, grid_only=True))  # fmt: skip

    async def mixed() -> tuple[Stats, Stats]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", OPTIONS) as channel:
            stub = pb_grpc.GeneratorStub(channel)

            async def one(req: pb.GenerateRequest) -> int:
                return len((await stub.Generate(req)).images) or req.seed_range.count

            load_task = asyncio.ensure_future(drive(lambda: one(big), 16, d + 2))
            await asyncio.sleep(1.0)  # the big load is under way
            lone = await drive(lambda: one(small), 1, d)
            return lone, await load_task

    try:
        idle = asyncio.run(load(server.port, small, 1, d))
        under, bigs = asyncio.run(mixed())
    finally:
        server.close()
    server = service(repo, max_queue=1024)  # the least the limits allow: 24 streams with 2 pieces each overflow it
    try:
        streams = asyncio.run(stream_overload(server.port))
        refused = asyncio.run(refusals(server.port, d))
    finally:
        server.close()
    print(
        f"\nsmall requests (DCGAN, 1 image, 1 caller): idle p50 {idle.pct(50):.2f} ms, p99 {idle.pct(99):.2f} ms;"
        f" beside 16 callers of 1,024-image grids ({bigs.ips:,.0f} img/s): p50 {under.pct(50):.2f} ms,"
        f" p90 {under.pct(90):.2f} ms, p99 {under.pct(99):.2f} ms: p99 ÷ idle p99 {under.pct(99) / idle.pct(99):.1f}"
    )
    print("streams under overload: " + ", ".join(f"{k} {v}" for k, v in streams.items()))
    if refused:
        print(
            f"a lone caller meeting a full queue: {len(refused)} RESOURCE_EXHAUSTED answers, p50"
            f" {np.percentile(refused, 50) * 1000:.2f} ms, p99 {np.percentile(refused, 99) * 1000:.2f} ms"
        )


async def refusals(port: int, duration: float) -> list[float]:
    """Seconds to each RESOURCE_EXHAUSTED a lone caller of 512-image requests gets while 8 callers of 1,024-image
    requests keep a 1,024-sample queue full (a refused filler pauses 5 ms, so that refusals are not all it does)."""
    full = pb.GenerateRequest(model="dcgan", seed_range=pb.SeedRange(start=0, count=1024),
                              output=pb.OutputOptions(format=pb.RAW_UINT8))  # fmt: skip
    lone = request("dcgan", 512, pb.RAW_UINT8)
    stop = time.perf_counter() + duration
    waits: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", OPTIONS) as channel:
        stub = pb_grpc.GeneratorStub(channel)

        async def filler() -> None:
            while time.perf_counter() < stop:
                try:
                    await stub.Generate(full)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.005)

        async def caller() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    await stub.Generate(lone)
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        waits.append(time.perf_counter() - t)

        await asyncio.gather(caller(), *(filler() for _ in range(8)))
    return waits


async def stream_overload(port: int, callers: int = 24, count: int = 512) -> dict[str, int]:
    """`callers` GenerateStreams of `count` images at once, twice over: how many finish, how many are refused at the
    start (RESOURCE_EXHAUSTED before any image), and how many fail half-way."""
    outcome = {"completed": 0, "refused at start": 0, "failed half-way": 0}
    req = pb.GenerateRequest(model="dcgan", seed_range=pb.SeedRange(start=0, count=count),
                             output=pb.OutputOptions(format=pb.RAW_UINT8))  # fmt: skip
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", OPTIONS) as channel:
        stub = pb_grpc.GeneratorStub(channel)

        async def one() -> None:
            got = 0
            try:
                async for reply in stub.GenerateStream(req):
                    got += len(reply.images)
                outcome["completed" if got == count else "failed half-way"] += 1
            except grpc.aio.AioRpcError:
                outcome["refused at start" if got == 0 else "failed half-way"] += 1

        for _ in range(2):
            await asyncio.gather(*(one() for _ in range(callers)))
    return outcome


def starts(repo: Path, n: int, model: str = "dcgan") -> None:
    """`n` starts of a server on `repo`, with the profile cache off (every start measures) and on (one measures,
    the rest read it): the batch size each chose and the time from the process's start to its first answer."""
    with tempfile.TemporaryDirectory() as cache:
        for label, setting in (("cache off", ""), ("cache on", cache)):
            sizes, firsts = [], []
            for _ in range(n):
                t = time.perf_counter()
                server = service(repo, profile_cache=setting)
                try:
                    asyncio.run(load(server.port, request(model, 1, pb.RAW_UINT8), 1, 0.0))
                    firsts.append(time.perf_counter() - t)
                    sizes.append(server.batch_size(model))
                finally:
                    server.close()
            print(f"{model}, {label}: batch sizes {sizes}; first answer {min(firsts):.2f}–{max(firsts):.2f} s"
                  f" (median {float(np.median(firsts)):.2f} s)", flush=True)  # fmt: skip


def cache(repo: Path, d: float, rounds: int) -> None:
    """A playground-like load with the response cache off and on (64 MiB): 8 callers asking for 16-image PNG grids
    of the DCGAN, 80% of them one of 5 popular seed ranges, the rest a random range; interleaved rounds, medians."""
    rng = np.random.default_rng(0)
    popular = [pb.GenerateRequest(model="dcgan", seed_range=pb.SeedRange(start=16 * i, count=16),
                                  output=pb.OutputOptions(format=pb.PNG, grid=True, grid_only=True))
               for i in range(5)]  # fmt: skip

    def pick() -> pb.GenerateRequest:
        if rng.random() < 0.8:
            return popular[int(rng.integers(5))]
        start = int(rng.integers(1_000, 1_000_000))
        return pb.GenerateRequest(model="dcgan", seed_range=pb.SeedRange(start=start, count=16),
                                  output=pb.OutputOptions(format=pb.PNG, grid=True, grid_only=True))  # fmt: skip

    async def playground(port: int) -> Stats:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", OPTIONS) as channel:
            stub = pb_grpc.GeneratorStub(channel)

            async def call() -> int:
                await stub.Generate(pick())
                return 16

            return await drive(call, 8, d)

    got: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(rounds):
        for label, size in (("cache off", 0), ("cache on, 64 MiB", 64 << 20)):
            server = service(repo, response_cache_bytes=size)
            try:
                stats = asyncio.run(playground(server.port))
                text = server.metrics()
                hits = sum(
                    float(v) for v in re.findall(r'^gan_response_cache_lookups_total\{result="hit"\} (\S+)', text, re.M)
                )
                looked = sum(
                    float(v) for v in re.findall(r"^gan_response_cache_lookups_total\{[^}]*\} (\S+)", text, re.M)
                )
            finally:
                server.close()
            got.setdefault(label, []).append((stats.rps, stats.pct(50), hits / looked if looked else 0.0))
            print(f"{label}: {stats.rps:,.0f} req/s, p50 {stats.pct(50):.2f} ms", flush=True)
    base = float(np.median([g[0] for g in got["cache off"]]))
    print(
        f"\n| playground-like load | req/s | ÷ cache off | p50 ms | hit ratio |  (median of {rounds})\n|---|---|---|---|---|"
    )
    for label, rows in got.items():
        rps, p50, ratio = (float(np.median([r[i] for r in rows])) for i in range(3))
        print(f"| {label} | {rps:,.0f} | {rps / base:.2f} | {p50:.2f} | {ratio:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--security", action="store_true", help="only the cost of TLS, mTLS and tokens on P2 and P4")
    p.add_argument("--protocols", action="store_true", help="only P1 and P2 through ganserve.v1, OIP gRPC and REST")
    p.add_argument("--rounds", type=int, default=3, help="--security, --protocols, --against, --tracing: rounds")
    p.add_argument("--against", type=Path, help="only P1-P4 and the protocols, this tree against an older checkout")
    p.add_argument("--only", default="", help="--against: one workload by its label (P2, 'P1 OIP gRPC ModelInfer')")
    p.add_argument("--w2", action="store_true", help="only W2 and P4: echo, gRPC and REST, 1 and 2 workers")
    p.add_argument("--fairness", action="store_true", help="only small requests beside big ones, and streams")
    p.add_argument("--starts", type=int, default=0, help="only this many starts: batch size chosen, first answer")
    p.add_argument("--cache", action="store_true", help="only a playground-like load, response cache off and on")
    p.add_argument("--tracing", action="store_true", help="only P2 and P4 with OpenTelemetry tracing off and on")
    args = p.parse_args()
    d = args.duration
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        # In a child process: torch (and its thread pool) never lives in the process that drives the load. With
        # --against, the older tree exports them: this tree reads older contract formats, not the other way round.
        builder = (args.against or ROOT).resolve()
        code = f"import sys; sys.path.insert(0, {str(builder)!r}); from bench.serve_bench import build_models; build_models(__import__('pathlib').Path({str(repo)!r}))"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=builder)
        if args.security:
            security(repo, Path(tmp), d, args.rounds)
            return
        if args.protocols:
            protocols(repo, d, args.rounds)
            return
        if args.against:
            against(repo, args.against, d, args.rounds, args.only)
            return
        if args.w2:
            w2(repo, d, args.rounds)
            return
        if args.fairness:
            fairness(repo, d)
            return
        if args.starts:
            starts(repo, args.starts)
            return
        if args.cache:
            cache(repo, d, args.rounds)
            return
        if args.tracing:
            tracing(repo, d, args.rounds)
            return
        dcgan = repo / "dcgan" / "1" / "model.onnx"
        raw_d = max(1.0, d / 2)

        # P1 (the W1 shape): DCGAN, 16-image requests, concurrency 8 (compute-bound).
        p1, p1_batch, p1_off, p1_png = on_off_png(repo, "dcgan", 16, 8, d)
        best, best_label = raw_best(dcgan, raw_d)
        print(f"P1 service {p1.ips:,.0f} img/s (PNG {p1_png.ips:,.0f}), p50 {p1.pct(50):.1f} ms, p99 {p1.pct(99):.1f} ms;"
              f" mean formed batch {p1_batch:.1f}; batching off {p1_off.ips:,.0f} img/s;"
              f" raw ORT best {best.ips:,.0f} img/s ({best_label})", flush=True)  # fmt: skip
        rows.append(
            (
                "P1",
                "service img/s ÷ raw ORT's best img/s",
                f"{p1.ips / best.ips:.2f} (PNG {p1_png.ips / best.ips:.2f})",
                "≥ 0.95",
            )
        )
        rows.append(("P1 on÷off", "batching on ÷ off, img/s", f"{p1.ips / p1_off.ips:.2f}", "≥ 1.00"))

        # P5: DCGAN, 64-image requests, concurrency 2: few callers with big requests.
        p5, p5_batch, p5_off, _ = on_off_png(repo, "dcgan", 64, 2, d, png=False)
        print(f"P5 service {p5.ips:,.0f} img/s, mean formed batch {p5_batch:.1f}; batching off {p5_off.ips:,.0f} img/s",
              flush=True)  # fmt: skip
        rows.append(
            ("P5 on÷off", "64-image requests, 2 callers: on ÷ off, img/s", f"{p5.ips / p5_off.ips:.2f}", "≥ 1.00")
        )
        rows.append(("P5", "the same ÷ raw ORT's best img/s", f"{p5.ips / best.ips:.2f}", "–"))

        # P2/P3: paper MLP, 1-image requests, concurrency 64 (overhead-bound).
        echo = Process(
            [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--images", "1", "--image-bytes", "784"]
        )
        try:
            p2_echo = asyncio.run(load(echo.port, request("mlp", 1, pb.RAW_UINT8), 64, d))
        finally:
            echo.close()
        p2, p2_batch, p3_off, p2_png = on_off_png(repo, "mlp", 1, 64, d)
        print(f"P2 service {p2.rps:,.0f} req/s (PNG {p2_png.rps:,.0f}), p50 {p2.pct(50):.1f} ms, p99 {p2.pct(99):.1f} ms,"
              f" mean formed batch {p2_batch:.1f}; echo {p2_echo.rps:,.0f} req/s; batching off {p3_off.rps:,.0f} req/s,"
              f" p99 {p3_off.pct(99):.1f} ms", flush=True)  # fmt: skip
        rows.append(
            (
                "P2",
                "service req/s ÷ echo req/s",
                f"{p2.rps / p2_echo.rps:.2f} (PNG {p2_png.rps / p2_echo.rps:.2f})",
                "≥ 0.75",
            )
        )
        rows.append(("P3", "the P2 workload: batching on ÷ off, req/s", f"{p2.rps / p3_off.rps:.2f}", "≥ 1.00"))

        # P4: one client, one image: service p50 vs raw batch-1 p50.
        p4, _, p4_off, p4_png = on_off_png(repo, "dcgan", 1, 1, d)
        raw1 = raw_ort(dcgan, 1, raw_d)
        print(f"P4 service p50 {p4.pct(50):.2f} ms (PNG {p4_png.pct(50):.2f}, batching off {p4_off.pct(50):.2f});"
              f" raw batch-1 p50 {raw1.pct(50):.2f} ms", flush=True)  # fmt: skip
        rows.append(("P4", "service p50 − raw batch-1 p50",
                     f"{p4.pct(50) - raw1.pct(50):+.2f} ms (PNG {p4_png.pct(50) - raw1.pct(50):+.2f} ms)", "≤ +0.5 ms"))  # fmt: skip
        rows.append(("P4 on−off", "batching on p50 − off p50", f"{p4.pct(50) - p4_off.pct(50):+.2f} ms", "≤ 0 (noise)"))

    print("\n| | measure | measured | target |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
