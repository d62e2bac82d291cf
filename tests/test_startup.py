"""Start-up refusals: a taken port or an unusable model repository is one `error:` line naming the flag, and exit
status 2; a repository that exists but serves nothing says why at WARNING, and the server serves on."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys

import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from service.config import ServerConfig
from service.server import Server, StartupError, server_options
from testkit.certs import CA
from testkit.process import ROOT, start_server

FLAGS = ["port", "health_port", "metrics_port", "http_port"]


def config(repository, **changes) -> ServerConfig:
    """Every port on, each a free one, on loopback."""
    ports = {"port": 0, "health_port": 0, "metrics_port": 0, "http_port": 0}
    return ServerConfig(model_repository=str(repository), host="127.0.0.1", **ports | changes)


@pytest.fixture
def taken():
    """A port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def service(args: list[str], cwd) -> subprocess.CompletedProcess:
    """`python -m service ARGS` run to its end, with no GAN_* variable from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAN_")}
    args = [sys.executable, "-m", "service", "--host", "127.0.0.1", *args]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


async def refusal(cfg: ServerConfig) -> tuple[str, Server]:
    """Start a server that must refuse to start; returns the message and the server."""
    server = Server(cfg, CollectorRegistry())
    with pytest.raises(StartupError) as refused:
        await server.start()
    return str(refused.value), server


def assert_one_error_line(done: subprocess.CompletedProcess, line: str) -> None:
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.splitlines() == [line], done.stderr


@pytest.mark.parametrize("flag", FLAGS)
def test_a_taken_port_is_refused_by_flag_and_what_was_opened_is_closed(tmp_path, taken, flag):
    message, server = asyncio.run(refusal(config(tmp_path, **{flag: taken})))
    assert message == f"--{flag.replace('_', '-')} {taken}: address already in use"
    opened = [p for p in (server.port, server.health_port, server.metrics_port, server.http_port) if p]
    assert taken not in opened and all(map(is_free, opened)), opened


def test_a_taken_http_port_under_tls_is_one_line_and_status_2(tmp_path, taken):
    """As users run it; with TLS on, this once ended in a segmentation fault rather than a traceback."""
    pair = CA(tmp_path).issue("localhost")
    args = ["--model-repository", str(tmp_path), "--port", "0", "--metrics-port", "0", "--http-port", str(taken),
            "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]  # fmt: skip
    assert_one_error_line(service(args, tmp_path), f"error: --http-port {taken}: address already in use")


def test_a_second_server_on_the_same_grpc_port_exits_rather_than_share_it(tmp_path):
    """gRPC's SO_REUSEPORT default let both start and split the clients between them."""
    env = {"GAN_PORT": "0", "GAN_HTTP_PORT": "-1", "GAN_METRICS_PORT": "-1", "GAN_HOST": "127.0.0.1"}
    first, ready = start_server(["--model-repository", str(tmp_path)], env, tmp_path)
    try:
        args = ["--model-repository", str(tmp_path), "--port", str(ready["port"]), "--http-port", "-1"]
        second = service([*args, "--metrics-port", "-1"], tmp_path)
        assert_one_error_line(second, f"error: --port {ready['port']}: address already in use")
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_sharing_the_grpc_port_is_off_unless_asked_for():
    assert ("grpc.so_reuseport", 0) in server_options(ServerConfig())
    assert ("grpc.so_reuseport", 1) in server_options(ServerConfig(reuse_grpc_port=True))


@pytest.mark.parametrize(
    ("where", "why"),
    [("nonexistent/typo", "no such directory"), ("a-file", "not a directory"), ("locked", "cannot be read")],
)
def test_an_unusable_model_repository_is_refused_before_any_port_opens(tmp_path, taken, monkeypatch, where, why):
    (tmp_path / "a-file").write_text("not a repository")
    (tmp_path / "locked").mkdir()
    repository = tmp_path / where
    # As a user without read permission sees it (a mode-0 folder would not stop root).
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(tmp_path / "locked"))
    # The HTTP port is taken too: the repository must be refused first, before any port is tried.
    message, server = asyncio.run(refusal(config(repository, http_port=taken)))
    assert message.startswith(f"--model-repository {repository}: {why}")
    assert (server.port, server.health_port, server.metrics_port, server.http_port) == (0, 0, 0, 0)


def test_a_missing_model_repository_stops_the_process_with_one_line(tmp_path):
    done = service(["--model-repository", "/nonexistent/typo", "--port", "0", "--metrics-port", "0"], tmp_path)
    assert_one_error_line(done, "error: --model-repository /nonexistent/typo: no such directory")


def test_a_repository_that_serves_nothing_says_why_and_serves_on(tmp_path, caplog):
    (tmp_path / "not a name").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not ONNX")

    async def run() -> int:
        server = Server(config(tmp_path, health_port=-1, metrics_port=-1, http_port=-1), CollectorRegistry())
        await server.start()
        try:
            return (await server.health.Check(health_pb2.HealthCheckRequest(), None)).status
        finally:
            await server.stop(0)

    with caplog.at_level(logging.WARNING, logger="service.server"):
        status = asyncio.run(run())
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    (warning,) = [r.getMessage() for r in caplog.records if "no loadable model" in r.getMessage()]
    assert warning.startswith(f"model repository {tmp_path}: no loadable model (skipped: ")
    assert "'not a name' (not a model name)" in warning and "empty (no <version>/model.onnx)" in warning
    assert "broken/1 (failed: " in warning


def test_the_shipped_repository_gives_no_such_warning(caplog):
    async def run() -> None:
        server = Server(config(ROOT / "models", health_port=-1, metrics_port=-1, http_port=-1), CollectorRegistry())
        await server.start()
        await server.stop(0)

    with caplog.at_level(logging.WARNING, logger="service.server"):
        asyncio.run(run())
    assert not [r for r in caplog.records if "no loadable model" in r.getMessage()]
