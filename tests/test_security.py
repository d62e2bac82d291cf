"""TLS, mutual TLS and bearer tokens on a real in-process server: real handshakes, real tokens, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.gate import Gate
from service.interceptor import Gated
from service.metrics import Metrics
from service.security import RECHECK_SECONDS, Authorizer, SecurityError, read_tokens
from service.server import Server, is_loopback
from testkit.certs import CA, Pair
from testkit.servefix import STOP_GRACE_S, call_raw, echo_model, plain_model, running, server_config
from testkit.tokens import ADMIN, READER, WRONG, write_tokens


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other = CA(root, "main"), CA(root, "other")
    repo = root / "models"
    plain_model(repo / "plain" / "1" / "model.onnx")
    echo_model(repo / "echo" / "1" / "model.onnx")
    tokens = write_tokens(root / "tokens", {"reader": ("infer", READER), "ops": ("admin", ADMIN)})
    return {
        "root": root, "repo": repo, "ca": ca, "other": other, "server": ca.issue("server"),
        "client": ca.issue("client", client=True), "stranger": other.issue("stranger", client=True), "tokens": tokens,
    }  # fmt: skip


@contextlib.asynccontextmanager
async def serving(repo: Path, **flags) -> AsyncIterator[Server]:
    server = Server(server_config(repo, **flags))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=STOP_GRACE_S)


def channel(port: int, ca: Path | bytes | None = None, pair: Pair | None = None) -> grpc.aio.Channel:
    """A plaintext channel, or TLS trusting `ca` (a file or PEM bytes), presenting `pair` when given."""
    if ca is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    roots = ca if isinstance(ca, bytes) else Path(ca).read_bytes()
    key, chain = (pair.key.read_bytes(), pair.cert.read_bytes()) if pair else (None, None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(roots, key, chain))


def bearer(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


ONE = pb.GenerateRequest(model="plain", seeds=pb.SeedList(seeds=[1]), output=pb.OutputOptions(format=pb.RAW_UINT8))


async def code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_tls_serves_and_a_plaintext_client_is_refused(pki):
    async def go():
        async with serving(pki["repo"], tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key)) as server:
            async with channel(server.port, pki["ca"].pem) as secure, channel(server.port) as plain:
                ok = await pb_grpc.GeneratorStub(secure).Generate(ONE, timeout=5)
                refused = await code_of(pb_grpc.GeneratorStub(plain).Generate(ONE, timeout=5))
            async with channel(server.port, pki["other"].pem) as wrong_ca:
                untrusted = await code_of(pb_grpc.GeneratorStub(wrong_ca).Generate(ONE, timeout=5))
            return len(ok.images), refused, untrusted

    assert asyncio.run(go()) == (1, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)


def test_mutual_tls_admits_only_certificates_from_its_ca(pki):
    flags = {
        "tls_cert": str(pki["server"].cert),
        "tls_key": str(pki["server"].key),
        "tls_client_ca": str(pki["ca"].pem),
    }

    async def go():
        async with serving(pki["repo"], **flags) as server:
            codes = []
            for pair in (pki["client"], None, pki["stranger"]):
                async with channel(server.port, pki["ca"].pem, pair) as ch:
                    codes.append(await code_of(pb_grpc.GeneratorStub(ch).Generate(ONE, timeout=5)))
            return codes

    ok, without, stranger = asyncio.run(go())
    assert ok == grpc.StatusCode.OK
    assert without == stranger == grpc.StatusCode.UNAVAILABLE  # refused at the handshake


RPCS = {
    "ListModels": lambda stub, md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=5),
    "GetModel": lambda stub, md: stub.GetModel(pb.GetModelRequest(name="plain"), metadata=md, timeout=5),
    "Generate": lambda stub, md: stub.Generate(ONE, metadata=md, timeout=5),
    "GenerateStream": lambda stub, md: _drain(stub.GenerateStream(ONE, metadata=md, timeout=5)),
    "Interpolate": lambda stub, md: stub.Interpolate(
        pb.InterpolateRequest(model="plain", keyframes=[pb.Keyframe(seed=1), pb.Keyframe(seed=2)], steps=2),
        metadata=md, timeout=5,
    ),
}  # fmt: skip


async def _drain(call) -> None:
    async for _ in call:
        pass


def test_every_method_of_every_service_needs_a_token_but_health(pki):
    """Walks the registered service descriptors, so a method added later is covered; an unknown one is too."""

    async def go():
        async with serving(pki["repo"], auth_tokens_file=str(pki["tokens"])) as server:
            async with channel(server.port) as ch:
                codes = {}
                for service in server.services:
                    for m in service.methods:
                        path = f"/{service.full_name}/{m.name}"
                        codes[path] = await call_raw(ch, path, m.client_streaming, m.server_streaming)
                for path in ("/ganserve.v1.Generator/NoSuchMethod", "/no.Such/Service"):
                    codes[path] = await call_raw(ch, path, False, False)
            return codes

    codes = asyncio.run(go())
    assert len(codes) >= 10
    for path, code in codes.items():
        if path.startswith("/grpc.health.v1.Health/"):
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED), path
        else:
            assert code == grpc.StatusCode.UNAUTHENTICATED, path


def test_a_refused_call_is_never_read(pki):
    """A 3 MB body over a 1 MiB limit: without a token the answer is UNAUTHENTICATED, not the size error that
    reading it would give, so nobody without a token can make the server take in a full-size message."""
    big = pb.GenerateRequest(model="plain", rows=pb.LatentRows(values=[0.5] * 750_000))

    async def go():
        async with serving(pki["repo"], auth_tokens_file=str(pki["tokens"]), max_message_bytes=1 << 20) as server:
            ch = channel(server.port)
            stub = pb_grpc.GeneratorStub(ch)
            codes = [await code_of(stub.Generate(big, metadata=bearer(t), timeout=5)) for t in (None, READER)]
            await ch.close()
            return codes

    assert asyncio.run(go()) == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED]


def test_every_rpc_by_token(pki):
    async def go():
        async with serving(pki["repo"], auth_tokens_file=str(pki["tokens"])) as server:
            async with channel(server.port) as ch:
                stub = pb_grpc.GeneratorStub(ch)
                table = {}
                for token in (None, WRONG, READER, ADMIN):
                    for name, call in RPCS.items():
                        table[token, name] = await code_of(call(stub, bearer(token)))
            return table

    table = asyncio.run(go())
    for (token, name), code in table.items():
        expected = grpc.StatusCode.OK if token in (READER, ADMIN) else grpc.StatusCode.UNAUTHENTICATED
        assert code == expected, (token, name)


def test_a_service_with_no_role_needs_admin():
    """A method nobody gave a role (an admin API added later) is closed to infer tokens, open to admin ones."""

    async def ping(request, context):
        return b"pong"

    async def go(tmp: Path):
        tokens = write_tokens(tmp / "tokens", {"reader": ("infer", READER), "ops": ("admin", ADMIN)})
        metrics = Metrics(CollectorRegistry())
        authorizer = Authorizer(str(tokens), {"test.Open": None})
        gated = Gated(Gate(metrics, lambda name: False, authorizer))
        server = grpc.aio.server(handlers=[gated])
        handler = {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
        gated.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Admin", handler),
             grpc.method_handlers_generic_handler("test.Open", handler))
        )  # fmt: skip
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with channel(port) as ch:
                codes = {}
                for service in ("test.Admin", "test.Open"):
                    for token in (None, READER, ADMIN):
                        call = ch.unary_unary(f"/{service}/Ping")(b"", metadata=bearer(token), timeout=5)
                        codes[service, token] = await code_of(call)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary("/test.Admin/Ping")(b"", metadata=bearer(READER), timeout=5)
        finally:
            await server.stop(None)
        return (
            codes,
            err.value.details(),
            metrics.registry.get_sample_value("gan_auth_failures_total", {"reason": "role"}),
        )

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        codes, details, role_failures = asyncio.run(go(Path(tmp)))
    assert codes == {
        ("test.Admin", None): grpc.StatusCode.UNAUTHENTICATED, ("test.Admin", READER): grpc.StatusCode.PERMISSION_DENIED,
        ("test.Admin", ADMIN): grpc.StatusCode.OK, ("test.Open", None): grpc.StatusCode.OK,
        ("test.Open", READER): grpc.StatusCode.OK, ("test.Open", ADMIN): grpc.StatusCode.OK,
    }  # fmt: skip
    assert details == "authorization: token 'reader' has role infer; /test.Admin/Ping needs admin"
    assert READER not in details and role_failures == 2


def test_health_stays_open_and_reflection_is_gated(pki):
    full = {
        "tls_cert": str(pki["server"].cert), "tls_key": str(pki["server"].key), "tls_client_ca": str(pki["ca"].pem),
        "auth_tokens_file": str(pki["tokens"]), "health_port": 0,
    }  # fmt: skip

    async def list_services(ch, token):
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            async for r in stub.ServerReflectionInfo(iter([request]), metadata=bearer(token), timeout=5):
                return sorted(s.name for s in r.list_services_response.service)
        except grpc.aio.AioRpcError as e:
            return e.code()

    async def go():
        async with serving(pki["repo"], **full) as server:
            async with channel(server.port, pki["ca"].pem, pki["client"]) as ch:
                on_main = (
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                ).status
                gated = await list_services(ch, None), await list_services(ch, READER)
            async with channel(server.health_port) as plain:  # what a kubelet probe does: no TLS, no token
                probe = (
                    await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
                ).status
                only_health = await code_of(pb_grpc.GeneratorStub(plain).ListModels(pb.ListModelsRequest(), timeout=5))
        async with serving(pki["repo"], auth_tokens_file=str(pki["tokens"]), reflection=False) as server:
            ch = channel(server.port)
            off = await list_services(ch, ADMIN)
            await ch.close()
        return on_main, gated, probe, only_health, off

    on_main, gated, probe, only_health, off = asyncio.run(go())
    assert on_main == probe == health_pb2.HealthCheckResponse.SERVING
    assert gated[0] == grpc.StatusCode.UNAUTHENTICATED
    assert gated[1] == [
        "ganserve.v1.Generator", "ganserve.v1.ModelAdmin", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
        "inference.GRPCInferenceService",
    ]  # fmt: skip
    assert only_health == grpc.StatusCode.UNIMPLEMENTED  # the plaintext port serves health and nothing else
    assert off == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((("authorization", ""),), "malformed"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "malformed"),
        ((("authorization", "Bearer"),), "malformed"),
        ((("authorization", "Bearer    "),), "malformed"),
        ((("authorization", "Bearer " + "x" * 5000),), "malformed"),
        ((("authorization", f"Bearer {READER}"), ("authorization", f"Bearer {READER}")), "malformed"),
        ((("authorization", "bearer " + WRONG),), "unknown"),
        ((("authorization", "Bearer " + READER[:-1]),), "unknown"),
        ((("x-token", READER),), "missing"),
    ],
)
def test_garbage_credentials_get_unauthenticated_and_the_server_keeps_serving(pki, metadata, reason, caplog):
    async def go():
        async with serving(pki["repo"], auth_tokens_file=str(pki["tokens"])) as server:
            async with channel(server.port) as ch:
                stub = pb_grpc.GeneratorStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Generate(ONE, metadata=metadata, timeout=5)
                after = await stub.Generate(ONE, metadata=bearer(READER), timeout=5)
            failures = server.metrics.registry.get_sample_value("gan_auth_failures_total", {"reason": reason})
            return err.value, len(after.images), failures

    with caplog.at_level(logging.WARNING):
        err, served, failures = asyncio.run(go())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details().startswith("authorization:")
    assert served == 1 and failures == 1
    assert "refused '/ganserve.v1.Generator/Generate' from ipv4:127.0.0.1:" in caplog.text
    for _, value in metadata:  # neither the reply nor the log repeats what the caller sent
        secret = value.partition(" ")[2] or value
        if len(secret) > 4 and secret != "Bearer":
            assert secret not in err.details() and secret not in caplog.text


def test_oversized_repeated_and_non_ascii_headers_are_refused_and_the_server_keeps_serving(pki):
    async def go():
        async with serving(pki["repo"], auth_tokens_file=str(pki["tokens"])) as server:
            async with channel(server.port) as ch:
                stub = pb_grpc.GeneratorStub(ch)
                huge = await code_of(
                    stub.Generate(ONE, metadata=(("authorization", "Bearer " + "y" * 200_000),), timeout=5)
                )
                many = await code_of(
                    stub.Generate(ONE, metadata=(("authorization", f"Bearer {READER}"),) * 50, timeout=5)
                )
                after = await stub.Generate(ONE, metadata=bearer(READER), timeout=5)
            return huge, many, len(after.images)

    huge, many, served = asyncio.run(go())
    assert huge == grpc.StatusCode.RESOURCE_EXHAUSTED  # past the 16 KiB header limit gRPC itself refuses it
    assert many == grpc.StatusCode.UNAUTHENTICATED and served == 1
    # gRPC clients refuse to send non-ASCII header values; a raw HTTP/2 peer might, so the check takes any text.
    authorizer = Authorizer(str(pki["tokens"]), {})
    for value in ("Bearer tökén-ünïcode-0123456789", "Bearer \udcff\udcfe-0123456789abcdef", "Bearer \x00\x01"):
        assert authorizer.check("/ganserve.v1.Generator/Generate", [("authorization", value)]).reason == "unknown"
    assert authorizer.check("/x.Y/Z", [("authorization", b"\xff")]).reason == "malformed"


def test_certificate_and_token_rotation_under_load_fail_no_valid_call(pki, tmp_path):
    """cert-manager rewrites the Secret in place while 8 callers work: the steady token over TLS never fails."""
    ca, new_ca = pki["ca"], CA(tmp_path, "next")
    server_pair = ca.issue("server", into=Pair(tmp_path / "tls.crt", tmp_path / "tls.key"))
    tokens = write_tokens(tmp_path / "tokens", {"steady": ("infer", READER), "old": ("infer", WRONG)})
    both = ca.pem.read_bytes() + new_ca.pem.read_bytes()
    flags = {"tls_cert": str(server_pair.cert), "tls_key": str(server_pair.key), "auth_tokens_file": str(tokens)}

    async def go():
        async with serving(pki["repo"], **flags) as server:
            stop, results = asyncio.Event(), []

            async def caller():
                while not stop.is_set():  # a new connection each time: every call is a fresh handshake
                    async with channel(server.port, both) as ch:
                        stub = pb_grpc.GeneratorStub(ch)
                        results.append(await code_of(stub.Generate(ONE, metadata=bearer(READER), timeout=5)))

            callers = [asyncio.ensure_future(caller()) for _ in range(8)]
            await asyncio.sleep(0.5)
            async with channel(server.port, ca.pem) as ch:
                before = await code_of(pb_grpc.GeneratorStub(ch).Generate(ONE, metadata=bearer(WRONG), timeout=5))
            new_ca.issue("server", into=server_pair)  # the new certificate, from a new CA
            write_tokens(tokens, {"steady": ("infer", READER), "new": ("admin", ADMIN)})
            await asyncio.sleep(1.5)  # the tokens file is looked at once a second at most
            async with channel(server.port, new_ca.pem) as ch:  # trusts only the new CA: proves the rotation
                stub = pb_grpc.GeneratorStub(ch)
                after = [await code_of(stub.Generate(ONE, metadata=bearer(t), timeout=5)) for t in (ADMIN, WRONG)]
            async with channel(server.port, ca.pem) as ch:  # trusts only the old CA: no longer enough
                stale = await code_of(pb_grpc.GeneratorStub(ch).Generate(ONE, metadata=bearer(READER), timeout=5))
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*callers)
            return before, after, stale, results

    before, after, stale, results = asyncio.run(go())
    assert before == grpc.StatusCode.OK  # "old" worked before the rotation
    assert after == [grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED]  # "new" works now, "old" no longer
    assert stale == grpc.StatusCode.UNAVAILABLE
    assert len(results) > 20 and set(results) == {grpc.StatusCode.OK}, (len(results), set(results))


def test_unusable_files_are_refused_at_start_without_echoing_secrets(pki, tmp_path):
    short = tmp_path / "short"
    short.write_text("reader infer tooshort\n")
    with pytest.raises(SecurityError, match="line 1: the token is shorter than 16") as err:
        read_tokens(str(short))
    assert "tooshort" not in str(err.value)
    for text, message in (
        (f"a infer {READER}\na admin {ADMIN}\n", "line 2: repeats the name or the token"),
        (f"a root {READER}\n", "the role, must be one of infer, admin"),
        (f"a infer {READER} extra\n", "expected '<name> <role> <token>', got 4 fields"),
        (f"{READER} infer alice\n", "line 1: the token is shorter"),  # columns swapped: the secret comes first
        (f"alice {READER} infer\n", "line 1: the second field, the role"),
        ("# nothing\n", "holds no tokens"),
    ):
        (tmp_path / "t").write_text(text)
        with pytest.raises(SecurityError, match=message) as err:
            read_tokens(str(tmp_path / "t"))
        assert READER not in str(err.value) and ADMIN not in str(err.value)
    mismatched = {"tls_cert": str(pki["server"].cert), "tls_key": str(pki["client"].key)}
    with pytest.raises(SecurityError, match="tls_cert / tls_key"):
        Server(ServerConfig.from_flags(model_repository=str(pki["repo"]), **mismatched))
    with pytest.raises(SecurityError, match="tls_client_ca"):
        Server(
            ServerConfig.from_flags(
                model_repository=str(pki["repo"]), tls_cert=str(pki["server"].cert), tls_key=str(pki["server"].key),
                tls_client_ca=str(short),
            )
        )  # fmt: skip


def test_a_broken_rotation_keeps_what_works_until_the_files_are_good_again(pki, tmp_path, caplog):
    pair = pki["ca"].issue("server", into=Pair(tmp_path / "tls.crt", tmp_path / "tls.key"))
    tokens = write_tokens(tmp_path / "tokens", {"steady": ("infer", READER)})
    flags = {"tls_cert": str(pair.cert), "tls_key": str(pair.key), "auth_tokens_file": str(tokens)}
    new_ca = CA(tmp_path, "next")

    async def call(port, ca, token):
        async with channel(port, ca) as ch:
            return await code_of(pb_grpc.GeneratorStub(ch).Generate(ONE, metadata=bearer(token), timeout=5))

    async def go():
        async with serving(pki["repo"], **flags) as server:
            pair.cert.write_text("half a certificate")
            tokens.write_text("steady infer short\n")
            await server.reload()  # SIGHUP's path: re-reads the tokens file at once
            broken = await call(server.port, pki["ca"].pem, READER)
            new_ca.issue("server", into=pair)
            write_tokens(tokens, {"next": ("infer", ADMIN)})
            await server.reload()
            fixed = await call(server.port, new_ca.pem, ADMIN), await call(server.port, new_ca.pem, READER)
            failures = {
                f: server.metrics.registry.get_sample_value("gan_credential_reload_failures_total", {"file": f})
                for f in ("tls", "tokens")
            }
            return broken, fixed, failures

    with caplog.at_level(logging.ERROR):
        broken, fixed, failures = asyncio.run(go())
    assert broken == grpc.StatusCode.OK  # the old certificate and tokens kept serving
    assert "the certificate loaded before stays in use" in caplog.text
    assert "the tokens loaded before stay in force" in caplog.text
    assert fixed == (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)  # good files are taken up again
    assert failures == {"tls": 1, "tokens": 1}


def test_get_model_serves_the_documented_metadata_unless_asked(pki):
    async def go(full: bool):
        async with serving(pki["repo"], full_metadata=full) as server, channel(server.port) as ch:
            return dict((await pb_grpc.GeneratorStub(ch).GetModel(pb.GetModelRequest(name="plain"))).metadata)

    import onnx

    path = pki["root"] / "models" / "plain" / "1" / "model.onnx"
    model = onnx.load(str(path))
    onnx.helper.set_model_props(
        model, {p.key: p.value for p in model.metadata_props} | {"config": '{"out": "/home/x"}'}
    )
    onnx.save(model, str(path))
    documented, everything = asyncio.run(go(False)), asyncio.run(go(True))
    assert "config" not in documented and documented["latent_dim"] == "8"
    assert everything["config"] == '{"out": "/home/x"}'


def test_plaintext_without_tokens_warns_once_off_loopback_and_metrics_bind_their_own_host(pki, caplog):
    assert is_loopback("127.0.0.1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("[::]") and not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")

    async def go():
        async with serving(pki["repo"], metrics_host="127.0.0.2", metrics_port=0) as server:
            bound = server._metrics_server.server_address[0]
        with caplog.at_level(logging.WARNING):
            async with serving(pki["repo"]):
                quiet = "plaintext" in caplog.text
            for tokens in ("", str(pki["tokens"])):
                cfg = ServerConfig.from_flags(
                    model_repository=str(pki["repo"]),
                    host="0.0.0.0",
                    port=0,
                    http_port=-1,
                    metrics_port=-1,
                    auth_tokens_file=tokens,
                )
                server = Server(cfg)
                await server.start()
                await server.stop(grace=1)
        return bound, quiet

    bound, quiet = asyncio.run(go())
    assert bound == "127.0.0.2" and not quiet
    assert caplog.text.count("serving plaintext gRPC without tokens on 0.0.0.0") == 1
    assert caplog.text.count("bearer tokens over plaintext gRPC on 0.0.0.0") == 1


def test_the_admin_api_needs_an_admin_token(pki):
    async def go():
        async with serving(pki["repo"], auth_tokens_file=str(pki["tokens"])) as server, channel(server.port) as ch:
            admin = pb_grpc.ModelAdminStub(ch)
            table = {}
            for token in (None, WRONG, READER, ADMIN):
                calls = {
                    "RepositoryIndex": admin.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=bearer(token)),
                    "LoadModel": admin.LoadModel(pb.LoadModelRequest(name="plain"), metadata=bearer(token)),
                    "UnloadModel": admin.UnloadModel(pb.UnloadModelRequest(name="echo"), metadata=bearer(token)),
                }
                for name, call in calls.items():
                    table[token, name] = await code_of(call)
            return table, sorted(server.registry.models)

    table, left = asyncio.run(go())
    expected = {None: grpc.StatusCode.UNAUTHENTICATED, WRONG: grpc.StatusCode.UNAUTHENTICATED,
                READER: grpc.StatusCode.PERMISSION_DENIED, ADMIN: grpc.StatusCode.OK}  # fmt: skip
    assert table == {(t, n): expected[t] for t, n in table}
    assert left == ["plain"]  # only the admin's UnloadModel took effect


def test_a_tokens_edit_that_keeps_size_mtime_and_inode_is_still_followed(tmp_path):
    """A same-length token swapped in place, the mtime then restored (as `touch -r` or rsync --times leave it)."""
    path = write_tokens(tmp_path / "tokens", {"reader": ("infer", READER)})
    now = [0.0]
    authorizer = Authorizer(str(path), {"test.Svc": "infer"}, clock=lambda: now[0])
    before = path.stat()
    replacement = READER[::-1]
    path.write_text(path.read_text().replace(READER, replacement))  # same file, same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    while path.stat().st_ctime_ns == before.st_ctime_ns:  # all within one tick of the file system's clock: again
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    now[0] += RECHECK_SECONDS
    assert authorizer.check("/test.Svc/Do", bearer(READER)).reason == "unknown"
    assert authorizer.check("/test.Svc/Do", bearer(replacement)) is None


def test_an_unserved_method_of_a_known_service_needs_admin(tmp_path):
    """With an infer token, an unknown method is PERMISSION_DENIED, as an admin method is: not UNIMPLEMENTED."""
    tokens = write_tokens(tmp_path / "tokens", {"reader": ("infer", READER), "ops": ("admin", ADMIN)})
    roles = {"test.Svc": "infer", "test.Open": None}
    authorizer = Authorizer(str(tokens), roles, known_methods=frozenset({"/test.Svc/Do", "/test.Open/Ping"}))
    assert authorizer.check("/test.Svc/Do", bearer(READER)) is None
    assert authorizer.check("/test.Open/Ping", ()) is None
    refusal = authorizer.check("/test.Svc/Nope", bearer(READER))
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.PERMISSION_DENIED, "role")
    assert refusal.message == "authorization: token 'reader' has role infer; /test.Svc/Nope needs admin"
    assert authorizer.check("/test.Svc/Nope", bearer(ADMIN)) is None  # gRPC then answers UNIMPLEMENTED
    assert authorizer.check("/test.Open/Nope", ()).code == grpc.StatusCode.UNAUTHENTICATED


def test_an_infer_token_gets_permission_denied_for_an_unknown_method_of_a_known_service(tmp_path):
    """The README's promise: what is not served needs admin, so an infer token cannot map the API by its answers."""
    plain_model(tmp_path / "plain" / "1" / "model.onnx")
    tokens = write_tokens(tmp_path / "tokens", {"reader": ("infer", READER)})

    async def go():
        async with running(tmp_path, auth_tokens_file=str(tokens)) as (_server, _stub, channel):
            metadata = (("authorization", f"Bearer {READER}"),)
            codes = {}
            for path in ("/ganserve.v1.Generator/NoSuchMethod", "/inference.GRPCInferenceService/NoSuch"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
                codes[path] = err.value.code()
            served = await channel.unary_unary("/ganserve.v1.Generator/ListModels")(b"", metadata=metadata, timeout=5)
            return codes, served

    codes, served = asyncio.run(go())
    assert set(codes.values()) == {grpc.StatusCode.PERMISSION_DENIED}
    assert served is not None
