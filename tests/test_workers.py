"""`--workers N` (service/workers.py): several serving processes on one port, as one server to the outside.

One group of two workers, started as users start it, is driven through the things a group must do as one: serve on
both workers, count every call in one /metrics, follow SIGHUP everywhere, replace a worker that dies, and drain and
exit on SIGTERM with no process left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import urllib.request

import grpc

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from testkit.process import start_server
from testkit.servefix import plain_model

REQUEST = pb.GenerateRequest(model="m", seed_range=pb.SeedRange(count=1), output=pb.OutputOptions(format=pb.RAW_UINT8))


def versions_on_fresh_connections(port: int, n: int) -> list[int]:
    """The version answering each of n calls, each on a connection of its own (the kernel picks a worker each)."""
    answers = []
    for _ in range(n):
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            answers.append(pb_grpc.GeneratorStub(channel).Generate(REQUEST, timeout=10).version)
    return answers


def stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name: state, parent pid, ... ([] once the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def workers_of(parent: int) -> set[int]:
    """The live child processes of `parent` (Linux /proc)."""
    return {
        int(p) for p in os.listdir("/proc") if p.isdigit() and (f := stat(p)) and int(f[1]) == parent and f[0] != "Z"
    }


def counted(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r'^gan_requests_total\{[^}]*method="Generate"[^}]*\} (\S+)', text, re.M))


def test_a_group_serves_counts_reloads_heals_and_drains_as_one(tmp_path):
    repo = tmp_path / "models"
    plain_model(repo / "m" / "1" / "model.onnx")
    env = {"GAN_PORT": "0", "GAN_HTTP_PORT": "-1", "GAN_METRICS_PORT": "0", "GAN_HOST": "127.0.0.1",
           "GAN_GRACE_SECONDS": "5", "GAN_PREFERRED_BATCH_SIZE": "4"}  # fmt: skip
    proc, ready = start_server(["--model-repository", str(repo), "--workers", "2"], env, tmp_path)
    try:
        assert ready["workers"] == 2
        port, metrics_port = ready["port"], ready["metrics_port"]
        first = workers_of(proc.pid)
        assert len(first) == 2

        assert versions_on_fresh_connections(port, 20) == [1] * 20
        assert counted(metrics_port) == 20  # every worker's calls, summed by the parent

        # A new version and SIGHUP to the parent: every worker serves it. Twenty connections that each land on a
        # worker the kernel picks all see it (were one worker left behind, about half would not).
        shutil.copytree(repo / "m" / "1", repo / "m" / "2")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while set(versions_on_fresh_connections(port, 20)) != {2}:
            assert time.monotonic() < deadline, "a worker never followed the SIGHUP"

        # A worker that dies is replaced, and the group keeps serving meanwhile. (A connection the kernel handed the
        # dying worker in its last moments is reset, as with any process that dies: UNAVAILABLE, which clients
        # retry. From half a second on, every call is answered.)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim in workers_of(proc.pid):  # dead (a zombie at most), so its sockets are closed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        while len(workers_of(proc.pid) - {victim}) < 2:
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            assert set(versions_on_fresh_connections(port, 2)) == {2}
            time.sleep(0.2)
        every = workers_of(proc.pid)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not [pid for pid in every if os.path.exists(f"/proc/{pid}")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_workers_end_when_the_parent_is_killed(tmp_path):
    """SIGKILL leaves the parent no chance to stop anything: the workers notice by themselves and drain."""
    plain_model(tmp_path / "models" / "m" / "1" / "model.onnx")
    env = {"GAN_PORT": "0", "GAN_HTTP_PORT": "-1", "GAN_METRICS_PORT": "-1", "GAN_HOST": "127.0.0.1",
           "GAN_GRACE_SECONDS": "2", "GAN_PREFERRED_BATCH_SIZE": "4"}  # fmt: skip
    proc, _ = start_server(["--model-repository", str(tmp_path / "models"), "--workers", "2"], env, tmp_path)
    workers = workers_of(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while [pid for pid in workers if stat(pid)[:1] not in ([], ["Z"])]:
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.1)
