"""The server as users run it: `python -m service` in its own process, the client CLI, SIGTERM, config."""

from __future__ import annotations

import concurrent.futures
import filecmp
import signal
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from service import client as client_cli
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from testkit.process import ROOT, start_server


@pytest.mark.parametrize("proto", ["ganserve/v1/generator", "inference/grpc_predict_v2"])
def test_checked_in_stubs_match_the_proto(tmp_path, proto):
    """service/api is generated from proto/; regenerating must give the same files."""
    from grpc_tools import protoc

    args = ["protoc", f"-Iservice/api={ROOT / 'proto'}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}", str(ROOT / "proto" / f"{proto}.proto")]  # fmt: skip
    assert protoc.main(args) == 0
    folder, stem = proto.rsplit("/", 1)
    names = [f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"]
    _match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "service" / "api" / folder, ROOT / "service" / "api" / folder, names, shallow=False
    )
    assert (mismatch, errors) == ([], []), "regenerate: see README, 'Changing the API'"


@pytest.fixture
def server_process(tmp_path):
    """`python -m service` on the shipped model, free ports; yields (process, port)."""
    env = {
        "GAN_PORT": "0",
        "GAN_METRICS_PORT": "0",
        "GAN_HTTP_PORT": "0",
        "GAN_GRACE_SECONDS": "20",
        "GAN_HOST": "127.0.0.1",
    }
    proc, ready = start_server(["--model-repository", str(ROOT / "models")], env, tmp_path)
    assert ready["event"] == "serving" and ready["models"] == 1 and ready["metrics_port"] > 0
    yield proc, ready["port"]
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_client_cli_writes_a_grid_of_digits(server_process, tmp_path, capsys):
    _, port = server_process
    target = f"127.0.0.1:{port}"
    assert client_cli.main(["--target", target, "models"]) == 0
    assert "mnist-cdcgan" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    args = [
        "--target",
        target,
        "sample",
        "--model",
        "mnist-cdcgan",
        "--seeds",
        "0-19",
        "--labels",
        "0-9",
        "--grid",
        str(grid),
    ]
    assert client_cli.main(args) == 0
    im = np.asarray(Image.open(grid))
    assert im.shape == (2 * 30 + 2, 10 * 30 + 2) and 0.05 < (im > 128).mean() < 0.4
    # --psi truncates: ψ = 1 leaves z as it is (the same bytes as without it), ψ = 0.5 draws other images.
    for psi in ("1", "0.5"):
        assert client_cli.main([*args[:-1], str(tmp_path / f"psi-{psi}.png"), "--psi", psi]) == 0
    assert (tmp_path / "psi-1.png").read_bytes() == grid.read_bytes() != (tmp_path / "psi-0.5.png").read_bytes()
    strip = tmp_path / "strip.png"
    args = ["--target", target, "interpolate", "--model", "mnist-cdcgan", "--seeds", "3,7", "--labels", "3,8",
            "--steps", "8", "--out", str(strip)]  # fmt: skip
    assert client_cli.main(args) == 0 and Image.open(strip).size == (9 * 30 + 2, 32)
    assert client_cli.main(["--target", target, "sample", "--model", "nope", "--seeds", "1", "--grid", str(grid)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_sigterm_during_traffic_loses_no_accepted_request(server_process):
    proc, port = server_process
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GeneratorStub(channel)
    request = pb.GenerateRequest(
        model="mnist-cdcgan", seed_range=pb.SeedRange(start=0, count=256), labels=[pb.Label(index=1)]
    )
    stub.Generate(request, timeout=30)  # connected and warm

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        calls = [pool.submit(stub.Generate, request, timeout=60) for _ in range(32)]
        # 32 × 256 images take the server seconds: when SIGTERM lands, all are accepted, most still queued.
        time.sleep(0.3)
        assert not all(c.done() for c in calls)
        proc.send_signal(signal.SIGTERM)
        results = [len(c.result().images) for c in calls]  # raises if any accepted call was dropped
    assert results == [256] * 32
    assert proc.wait(timeout=60) == 0
    with pytest.raises(grpc.RpcError) as after:
        stub.Generate(request, timeout=5)
    assert after.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
