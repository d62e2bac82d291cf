"""An s3:// model repository (service/objectstore.py) against a real S3 server, SeaweedFS: the local repository's
behaviour, and each fault the store can bring (unreachable, credentials refused, no bucket, hostile keys, corrupt,
truncated and oversized objects)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.objectstore import S3Repository, StoreUnavailable, _md5_etag, parse_url, publish
from service.repository import RepositoryError
from testkit.process import ROOT
from testkit.seaweed import SECRET_KEY, SeaweedFS
from testkit.servefix import echo_encoder, echo_model, plain_model, running
from testkit.waiting import until

RAW = pb.OutputOptions(format=pb.RAW_UINT8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with SeaweedFS(tmp_path_factory.mktemp("s3")) as s:
        yield s


@pytest.fixture
def prefix(request) -> str:
    """A prefix of this test's own in the shared bucket."""
    return request.node.name.replace("[", "-").replace("]", "")[:60]


@pytest.fixture
def s3_env(store, monkeypatch):
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    return store


@pytest.fixture
def model_file(tmp_path):
    return plain_model(tmp_path / "src" / "model.onnx")


def serve(store, prefix, tmp_path, **flags):
    return running(f"s3://{store.bucket}/{prefix}", model_cache=str(tmp_path / "downloads"), **flags)


def generate(version: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="m", version=version, seed_range=pb.SeedRange(count=2), output=RAW)


def states(server) -> dict[int, tuple[str, str]]:
    return {s.version: (s.state, s.reason) for s in server.registry.status("m")}


def errors(server, kind: str) -> float:
    return server.metrics.registry.get_sample_value("gan_model_repository_errors_total", {"kind": kind}) or 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "not a bucket name"),
        ("s3://Models/x", "not a bucket name"),
        ("s3://user:pw@models/x", "expected s3://BUCKET/PREFIX"),
        ("s3://models/a/../b", "no . or .. parts"),
        ("s3://models/a b", "A-Z a-z 0-9"),
        ("s3://models/x?versionId=1", "expected s3://BUCKET/PREFIX"),
    ],
)
def test_a_bad_url_names_what_is_wrong(url, message):
    with pytest.raises(RepositoryError, match=message):
        parse_url(url)
    assert parse_url("s3://models/a/b/") == ("models", "a/b/") and parse_url("s3://models") == ("models", "")


def test_versions_join_and_leave_as_in_a_directory(s3_env, prefix, tmp_path, model_file):
    store = s3_env
    store.publish(model_file, "m", 1, prefix)

    async def go():
        async with serve(store, prefix, tmp_path) as (server, stub, _channel):
            assert (await stub.Generate(generate())).version == 1
            store.publish(model_file, "m", 2, prefix)
            await server.reload()  # SIGHUP: latest:1 serves v2, and v1 leaves once v2 is ready
            assert server.registry.versions("m") == [2]
            # Once drained, v1's download goes: a cache of every version ever served would fill the pod's volume.
            downloads = tmp_path / "downloads"
            await until(lambda: {p.name for p in downloads.glob("*/m/*")} == {"2"})
            client = store.client()
            client.put_object(Bucket=store.bucket, Key=f"{prefix}/m/model.json", Body=b'{"version_policy": "all"}')
            await server.reload()
            assert server.registry.versions("m") == [1, 2]
            store.remove("m", 2, prefix)  # deleted from the store: it leaves, v1 goes on
            await server.reload()
            assert server.registry.versions("m") == [1] and (await stub.Generate(generate())).version == 1
            # Its download is gone with it; version 1's stays.
            kept = {(p.parent.name, p.name) for p in (tmp_path / "downloads").glob("*/m/*")}
            assert kept == {("m", "1")}
        downloads = list((tmp_path / "downloads").rglob("*"))
        assert any(p.suffix == ".onnx" for p in downloads) and not any(p.name.endswith(".part") for p in downloads)

    asyncio.run(go())


def test_an_encoder_beside_the_model_in_the_store_serves_inversion(s3_env, prefix, tmp_path):
    store = s3_env
    folder = echo_model(tmp_path / "src" / "model.onnx").parent
    store.publish(folder / "model.onnx", "m", 1, prefix)
    client = store.client()
    client.put_object(Bucket=store.bucket, Key=f"{prefix}/m/1/encoder.onnx", Body=echo_encoder(folder).read_bytes())

    async def go():
        async with serve(store, prefix, tmp_path) as (server, stub, _channel):
            drawn = await stub.Generate(pb.GenerateRequest(model="m", seeds=pb.SeedList(seeds=[4]),
                                                           labels=[pb.Label(index=2)], output=RAW))  # fmt: skip
            answer = await stub.Invert(pb.InvertRequest(model="m", pixels=drawn.images[0]))
            return answer, states(server)

    answer, state = asyncio.run(go())
    assert answer.inversions[0].label == 2 and answer.inversions[0].distance < 1e-5  # the echo model's exact inverse
    assert state == {1: ("READY", "")}
    downloaded = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "downloads").rglob("*.onnx"))
    assert downloaded == ["encoder.onnx", "onnx"]  # both, each named by its ETag


def test_odd_keys_are_skipped_with_a_warning(s3_env, prefix, tmp_path, model_file, caplog):
    store = s3_env
    store.publish(model_file, "m", 1, prefix)
    client = store.client()
    odd = [f"{prefix}/bad name/1/model.onnx", f"{prefix}/m/007/model.onnx", f"{prefix}/{'x' * 200}/1/model.onnx",
           f"{prefix}/m/1 x/model.onnx", f"{prefix}/m/héllo/model.onnx"]  # fmt: skip
    for key in odd:
        client.put_object(Bucket=store.bucket, Key=key, Body=b"not a model")

    async def go():
        with caplog.at_level(logging.WARNING, "service.registry"):
            async with serve(store, prefix, tmp_path) as (server, _stub, _channel):
                assert server.registry.models.keys() == {"m"} and server.registry.versions("m") == [1]
                assert {s.version for s in server.registry.status("m")} == {1}

    asyncio.run(go())
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == len(odd), warnings
    assert all(len(w) < 300 for w in warnings)


def test_corrupt_truncated_and_oversized_objects_fail_with_a_reason_and_the_good_version_serves(
    s3_env, prefix, tmp_path, model_file
):
    store = s3_env
    store.publish(model_file, "m", 1, prefix)
    data = model_file.read_bytes()

    async def go():
        async with serve(store, prefix, tmp_path, max_model_bytes=4 * len(data)) as (server, stub, _channel):
            client = store.client()
            for version, body in ((2, data[: len(data) // 2]), (3, b"\x08\x07not onnx at all"), (4, data * 5)):
                client.put_object(Bucket=store.bucket, Key=f"{prefix}/m/{version}/model.onnx", Body=body)
            await server.reload()
            found = states(server)
            assert found[1][0] == "READY" and [found[v][0] for v in (2, 3, 4)] == ["FAILED"] * 3, found
            assert "--max-model-bytes" in found[4][1] and str(len(data) * 5) in found[4][1]
            assert (await stub.Generate(generate())).version == 1
            # The oversized one was never downloaded; nothing partial is left of any.
            names = [p.name for p in (tmp_path / "downloads").rglob("*") if p.is_file()]
            assert not any(n.endswith(".part") for n in names) and "4" not in {
                p.parent.name for p in (tmp_path / "downloads").rglob("*.onnx")
            }

    asyncio.run(go())


def test_a_download_is_checked_before_it_is_used_again(s3_env, prefix, tmp_path, model_file):
    store = s3_env
    store.publish(model_file, "m", 1, prefix)
    repo = S3Repository(f"s3://{store.bucket}/{prefix}", tmp_path / "downloads", 1 << 30)
    model = repo.scan()[0]["m"]
    path = repo.fetch(model, 1)
    assert path.read_bytes() == model_file.read_bytes()
    path.write_bytes(bytes(len(path.read_bytes())))  # the same size, other bytes: a disk that lost them
    assert repo.fetch(model, 1).read_bytes() == model_file.read_bytes()
    # The object replaced after the listing: the download asks for the listed one and gets nothing.
    store.publish(plain_model(tmp_path / "other" / "model.onnx", gain=2.0), "m", 1, prefix)
    path.unlink()
    with pytest.raises(StoreUnavailable, match="changed") as raised:
        repo.fetch(model, 1)
    assert raised.value.kind == "changed" and not list(path.parent.glob("*.onnx*"))  # nothing partial either


def start_process(store, url: str, env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "service", "--model-repository", url, "--host", "127.0.0.1", "--port", "0",
            "--http-port", "-1", "--metrics-port", "-1", "--model-cache", str(tmp_path / "downloads")]  # fmt: skip
    env = os.environ | store.env | env
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


@pytest.mark.parametrize(
    ("url", "env", "message"),
    [
        ("s3://models/x", {"AWS_SECRET_ACCESS_KEY": "wrong-secret-5d1e"}, "access denied (SignatureDoesNotMatch)"),
        ("s3://models/x", {"AWS_ACCESS_KEY_ID": "nobody"}, "access denied"),
        ("s3://no-such-bucket/x", {}, "no bucket named 'no-such-bucket'"),
        ("s3://models/x", {"AWS_PROFILE": "no-such-profile"}, "the S3 settings cannot be used (ProfileNotFound"),
    ],
)
def test_refused_credentials_or_a_missing_bucket_stop_the_start_in_one_line_without_the_secret(
    store, url, env, message, tmp_path
):
    done = start_process(store, url, env, tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for secret in (SECRET_KEY, "wrong-secret-5d1e"):
        assert secret not in done.stderr + done.stdout


def test_a_store_down_at_start_is_retried_and_served_once_it_answers(tmp_path, model_file, monkeypatch, caplog):
    with SeaweedFS(tmp_path / "s3") as store:
        store.publish(model_file, "m", 1)
        store.stop()
        for name, value in store.env.items():
            monkeypatch.setenv(name, value)

        async def go():
            with caplog.at_level(logging.INFO):
                async with serve(store, "", tmp_path) as (server, stub, _channel):
                    assert not server.registry.ready and errors(server, "unreachable") >= 1
                    await asyncio.to_thread(store.start)
                    await until(lambda: server.registry.ready, timeout=20)  # retried after 1, 2, 4… s
                    assert (await stub.Generate(generate())).version == 1

        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records]
    assert any("cannot reach the store" in line and "starting anyway" in line for line in lines)
    assert sum("serving what is loaded" in line for line in lines) == 1  # one line per outage, not per retry
    assert any("answers again" in line for line in lines)


def test_an_outage_while_serving_changes_nothing_and_heals_by_itself(tmp_path, model_file, monkeypatch, caplog):
    with SeaweedFS(tmp_path / "s3") as store:
        store.publish(model_file, "m", 1)
        for name, value in store.env.items():
            monkeypatch.setenv(name, value)

        async def go():
            flags = {"model_control": "poll", "poll_seconds": 0.2}
            with caplog.at_level(logging.INFO):
                async with serve(store, "", tmp_path, **flags) as (server, stub, _channel):
                    await asyncio.to_thread(store.stop)
                    await until(lambda: errors(server, "unreachable") >= 3, timeout=20)
                    for _ in range(20):  # meanwhile every call is served
                        assert (await stub.Generate(generate())).version == 1
                    assert states(server) == {1: ("READY", "")}
                    await asyncio.to_thread(store.start)
                    store.publish(model_file, "m", 2)
                    await until(lambda: server.registry.versions("m") == [2], timeout=20)

        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records]
    assert sum("serving what is loaded" in line for line in lines) == 1
    assert any("answers again" in line for line in lines)
    assert not any(SECRET_KEY in line for line in lines)


def test_export_publishes_the_next_version_and_a_server_serves_it(s3_env, prefix, tmp_path, tiny_run, capsys):
    from training import export as export_mod

    store = s3_env
    url = f"s3://{store.bucket}/{prefix}"
    for version in (1, 2):
        assert export_mod.main([str(tiny_run["checkpoint"]), "--repository", url, "--name", "tiny"]) == 0
        assert capsys.readouterr().out.strip() == f"{url}/tiny/{version}/model.onnx"
    # Publishers racing for a number: each takes its own, none overwrites another.
    with ThreadPoolExecutor(4) as pool:
        urls = list(pool.map(lambda _: publish(url, "race", tiny_run["model"]), range(4)))
    assert sorted(urls) == [f"{url}/race/{v}/model.onnx" for v in (1, 2, 3, 4)]

    async def go():
        async with serve(store, prefix, tmp_path) as (server, stub, _channel):
            assert server.registry.versions("tiny") == [2]
            request = pb.GenerateRequest(
                model="tiny", seeds=pb.SeedList(seeds=[1]), labels=[pb.Label(index=3)], output=RAW
            )
            answer = await stub.Generate(request)
            assert answer.version == 2

    asyncio.run(go())
    monkey = {"AWS_SECRET_ACCESS_KEY": "wrong-secret-5d1e"}
    os.environ.update(monkey)  # restored by s3_env's monkeypatch
    assert export_mod.main([str(tiny_run["checkpoint"]), "--repository", url, "--name", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "access denied (SignatureDoesNotMatch)" in err and "wrong-secret" not in err and "Traceback" not in err


def test_downloads_of_one_version_at_once_share_one_file(s3_env, prefix, tmp_path, model_file):
    """Replicas or --workers sharing a download directory: each gets the whole, checked file."""
    store = s3_env
    store.publish(model_file, "m", 1, prefix)
    repos = [S3Repository(f"s3://{store.bucket}/{prefix}", tmp_path / "downloads", 1 << 30) for _ in range(6)]
    models = [repo.scan()[0]["m"] for repo in repos]
    with ThreadPoolExecutor(6) as pool:
        paths = list(pool.map(lambda i: repos[i].fetch(models[i], 1), range(6)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == model_file.read_bytes()
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [".lock", paths[0].stem + ".md5", paths[0].name]


def test_one_version_that_cannot_be_downloaded_holds_up_no_other_and_loadmodel_says_why(
    s3_env, prefix, tmp_path, model_file
):
    store = s3_env
    for name in ("a", "b"):
        store.publish(model_file, name, 1, prefix)
    url = f"s3://{store.bucket}/{prefix}"
    blocked = S3Repository(url, tmp_path / "downloads", 1 << 30).downloads / "a"
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"")  # a file where a's download folder goes: its downloads fail, b's do not

    async def go():
        async with serve(store, prefix, tmp_path) as (server, _stub, channel):
            assert server.registry.models.keys() == {"b"} and errors(server, "disk") >= 1
            admin = pb_grpc.ModelAdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.LoadModel(pb.LoadModelRequest(name="a"))
            blocked.unlink()  # fixed: the retry after the backoff loads it, with no trigger
            await until(lambda: server.registry.versions("a") == [1], timeout=20)
            return refused.value

    refused = asyncio.run(go())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "cannot be loaded now" in refused.details()
    assert "download directory" in refused.details()


@pytest.mark.parametrize(
    ("etag", "answer", "md5"),
    [
        ('"0cc175b9c0f1b6a831c399e269772661"', {}, "0cc175b9c0f1b6a831c399e269772661"),
        ('"0cc175b9c0f1b6a831c399e269772661"', {"ServerSideEncryption": "AES256"}, "0cc175b9c0f1b6a831c399e269772661"),
        ('"0cc175b9c0f1b6a831c399e269772661"', {"ServerSideEncryption": "aws:kms"}, None),  # not the bytes' MD5
        ('"0cc175b9c0f1b6a831c399e269772661"', {"SSECustomerAlgorithm": "AES256"}, None),
        ('"9b2cf535f27731c974343645a3985328-3"', {}, None),  # multipart
    ],
)
def test_an_etag_names_the_md5_only_where_it_is_one(etag, answer, md5):
    assert _md5_etag(etag, answer) == md5


def test_training_refuses_a_bad_s3_repository_before_it_trains(tmp_path, capsys):
    from training import run as run_mod

    argv = ["--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "run"), "--repository", "s3://Bad_Bucket/x",
            "--no-progress"]  # fmt: skip
    assert run_mod.main(argv) == 2
    assert "'Bad_Bucket' is not a bucket name" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained for an export that could not land
