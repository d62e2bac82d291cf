"""Client library, CLI and probe against real `python -m service` processes with TLS, mutual TLS and tokens.

Real handshakes with throwaway certificates; the servers start once for the module (in parallel) and serve from
the shipped model repository, or from an empty one where only the handshake matters.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service import client as client_cli
from service import probe
from service.client import Client, labels_for
from testkit.certs import CA, Pair
from testkit.process import ROOT, start_server

INFER = "infer-token-0123456789abcdef"
ADMIN = "admin-token-fedcba9876543210"
WRONG = "wrong-token-00000000000000000"
SECRETS = (INFER, ADMIN, WRONG)
GRPC_LOGS = ("GRPC_VERBOSITY", "GRPC_TRACE")  # unset: the CLI and the probe must quiet gRPC themselves
ENV = {"GAN_PORT": "0", "GAN_METRICS_PORT": "0", "GAN_HTTP_PORT": "0", "GAN_HOST": "127.0.0.1"}


@dataclass(frozen=True)
class Pki:
    ca: CA
    other: CA  # signed nothing the servers trust
    client: Pair  # signed by ca, for mutual TLS
    stranger: Pair  # a client certificate from the other CA


@dataclass(frozen=True)
class Servers:
    tls: str  # TLS and tokens
    mtls: str  # mutual TLS and tokens
    health: str  # the mTLS server's plaintext health-only port
    expired: str  # TLS with a certificate that has expired (empty repository)
    plain: str  # plaintext with tokens (empty repository)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CA(folder, "good"), CA(folder, "other")
    return Pki(ca, other, ca.issue("client", client=True), other.issue("stranger", client=True))


@pytest.fixture(scope="module")
def servers(pki, tmp_path_factory):
    folder = tmp_path_factory.mktemp("servers")
    tokens = folder / "tokens"
    tokens.write_text(f"# name role token\nweb infer {INFER}\nops admin {ADMIN}\n")
    empty = folder / "empty"
    empty.mkdir()
    server, expired = pki.ca.issue("server"), pki.ca.issue("expired", days=-1)
    auth = ["--auth-tokens-file", str(tokens)]
    shipped = ["--model-repository", str(ROOT / "models"), *auth]
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    configs = {
        "tls": [*shipped, *tls],
        "mtls": [*shipped, *tls, "--tls-client-ca", str(pki.ca.pem), "--health-port", "0"],
        "expired": ["--model-repository", str(empty), *auth, "--tls-cert", str(expired.cert),
                    "--tls-key", str(expired.key)],
        "plain": ["--model-repository", str(empty), *auth],
    }  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(len(configs)) as pool:
        started = dict(
            zip(configs, pool.map(lambda args: start_server(args, ENV, folder), configs.values()), strict=True)
        )
    try:
        ready = {name: r for name, (_, r) in started.items()}
        assert ready["tls"]["models"] == ready["mtls"]["models"] == 1
        yield Servers(**{n: f"127.0.0.1:{r['port']}" for n, r in ready.items()},
                      health=f"127.0.0.1:{ready['mtls']['health_port']}")  # fmt: skip
    finally:
        for proc, _ in started.values():
            proc.kill()
            proc.wait()


def assert_grid_of_digits(path: Path, rows: int) -> None:
    im = np.asarray(Image.open(path))
    assert im.shape == (rows * 30 + 2, 10 * 30 + 2) and 0.05 < (im > 128).mean() < 0.4


# ---------------------------------------------------------------------------------------------------------- works


def test_library_over_tls_with_an_infer_token(servers, pki):
    with Client(servers.tls, tls_ca=pki.ca.pem, token=INFER) as c:
        assert [m.name for m in c.models()] == ["mnist-cdcgan"]
        assert len(c.generate("mnist-cdcgan", [0, 1], labels_for(["3"], 2)).images) == 2
        # Server streaming carries the token too (the interceptor covers every kind of call).
        assert sum(len(part.images) for part in c.stream("mnist-cdcgan", [0, 1, 2], labels_for(["5"], 3))) == 3
    with Client(servers.tls, tls_ca=str(pki.ca.pem), token=ADMIN, server_name="localhost") as c:
        assert c.tls and len(c.models()) == 1


def test_library_sends_tokens_over_plaintext_for_loopback_use(servers):
    with Client(servers.plain, token=INFER) as c:
        assert not c.tls and c.models() == []
    with Client(servers.plain) as c, pytest.raises(grpc.RpcError) as refused:
        c.models()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_library_with_a_client_certificate_under_mtls(servers, pki):
    with Client(servers.mtls, tls_ca=pki.ca.pem, tls_cert=pki.client.cert, tls_key=pki.client.key, token=INFER) as c:
        assert [m.name for m in c.models()] == ["mnist-cdcgan"]


def test_cli_models_and_grid_over_tls_with_a_token(servers, pki, tmp_path, capsys):
    tls = ["--target", servers.tls, "--tls-ca", str(pki.ca.pem)]
    assert client_cli.main([*tls, "models"], environ={"GAN_TOKEN": INFER}) == 0
    assert "mnist-cdcgan" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    sample = ["sample", "--model", "mnist-cdcgan", "--seeds", "0-9", "--labels", "0-9", "--grid", str(grid)]
    assert client_cli.main([*tls, "--token", ADMIN, *sample], environ={}) == 0
    assert_grid_of_digits(grid, rows=1)
    out, err = capsys.readouterr()
    assert not any(secret in out + err for secret in SECRETS)


def test_cli_over_mtls_with_a_client_certificate(servers, pki, tmp_path, capsys):
    mtls = ["--target", servers.mtls, "--tls-ca", str(pki.ca.pem), "--tls-cert", str(pki.client.cert),
            "--tls-key", str(pki.client.key)]  # fmt: skip
    grid = tmp_path / "grid.png"
    sample = ["sample", "--model", "mnist-cdcgan", "--seeds", "0-19", "--labels", "0-9", "--grid", str(grid)]
    assert client_cli.main([*mtls, *sample], environ={"GAN_TOKEN": INFER}) == 0
    assert_grid_of_digits(grid, rows=2)
    assert client_cli.main([*mtls, "models"], environ={"GAN_TOKEN": INFER}) == 0
    assert "mnist-cdcgan" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- one-line failures

# name: (server, flags given the PKI, GAN_TOKEN, what the one line must say)
FAILURES = {
    "wrong CA": ("tls", lambda k: ["--tls-ca", k.other.pem], INFER,
                 "TLS handshake failed: cannot verify the server's certificate (unable to get local issuer"),
    "system roots": ("tls", lambda k: ["--tls-cert", k.client.cert, "--tls-key", k.client.key], INFER,
                     "is --tls-ca the CA that signed it?"),
    "expired server certificate": ("expired", lambda k: ["--tls-ca", k.ca.pem], INFER,
                                   "the server's certificate has expired"),
    "wrong server name": ("tls", lambda k: ["--tls-ca", k.ca.pem, "--tls-server-name", "wrong.example"], INFER,
                          "does not name the host dialled"),
    "no client certificate under mTLS": ("mtls", lambda k: ["--tls-ca", k.ca.pem], INFER,
                                         "does it require a client certificate"),
    "client certificate from another CA": (
        "mtls", lambda k: ["--tls-ca", k.ca.pem, "--tls-cert", k.stranger.cert, "--tls-key", k.stranger.key], INFER,
        "does it require a client certificate"),
    "plaintext against TLS": ("tls", lambda k: [], INFER, "the server closed the connection; does it require TLS?"),
    "TLS against plaintext": ("plain", lambda k: ["--tls-ca", k.ca.pem], INFER, "the server does not speak TLS"),
    "no token": ("tls", lambda k: ["--tls-ca", k.ca.pem], "", "error: UNAUTHENTICATED: authorization: no token"),
    "wrong token": ("tls", lambda k: ["--tls-ca", k.ca.pem], WRONG,
                    "error: UNAUTHENTICATED: authorization: unknown token"),
    "token no header can carry": ("tls", lambda k: ["--tls-ca", k.ca.pem], "two words",
                                  "error: token: must be printable ASCII"),
    "unreadable CA file": ("tls", lambda k: ["--tls-ca", k.ca.folder / "missing.pem"], INFER,
                           "error: tls_ca: cannot read"),
    "certificate without its key": ("mtls", lambda k: ["--tls-ca", k.ca.pem, "--tls-cert", k.client.cert], INFER,
                                    "error: tls_key: tls_cert needs tls_key"),
}  # fmt: skip


@pytest.mark.parametrize("case", FAILURES)
def test_cli_failure_is_one_line_that_says_what_is_wrong(servers, pki, case):
    """As users run it, in its own process: gRPC's own stderr logging must not add lines either."""
    server, flags, token, expected = FAILURES[case]
    target = getattr(servers, server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAN_") and k not in GRPC_LOGS} | {
        "GAN_TOKEN": token
    }
    args = [sys.executable, "-m", "service.client", "--target", target, *map(str, flags(pki)), "models"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert len(done.stderr.splitlines()) == 1, done.stderr
    line = done.stderr.strip()
    assert line.startswith("error: ") and expected in line
    if "cannot connect" in line or "handshake" in expected:
        assert line.startswith(f"error: cannot connect to {target}: ")
    assert not any(secret in done.stderr for secret in (*SECRETS, "two words"))


# ---------------------------------------------------------------------------------------------------------- probe


def test_probe_over_tls_and_mtls(servers, pki, capsys):
    assert probe.main(["--target", servers.tls, "--tls-ca", str(pki.ca.pem)], environ={}) == 0
    env = {"GAN_PROBE_TLS_CA": str(pki.ca.pem), "GAN_PROBE_TLS_CERT": str(pki.client.cert),
           "GAN_PROBE_TLS_KEY": str(pki.client.key), "GAN_PROBE_TLS_SERVER_NAME": "localhost"}  # fmt: skip
    assert probe.main(["--target", servers.mtls], environ=env) == 0
    # Health is open: no token needed, and the plaintext health-only port needs no certificate either.
    assert probe.main(["--target", servers.health], environ={}) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("server", "flags", "expected"),
    [
        ("tls", lambda k: ["--tls-ca", k.other.pem], "cannot verify the server's certificate"),
        ("mtls", lambda k: ["--tls-ca", k.ca.pem], "does it require a client certificate"),
        ("tls", lambda k: [], "does it require TLS?"),
    ],
    ids=["wrong CA", "mTLS without a client certificate", "plaintext against TLS"],
)
def test_probe_fails_with_one_line(servers, pki, server, flags, expected):
    target = getattr(servers, server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAN_") and k not in GRPC_LOGS}
    args = [sys.executable, "-m", "service.probe", "--target", target, *map(str, flags(pki))]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1 and expected in done.stderr, done.stderr
    assert done.stderr.startswith(f"cannot connect to {target}: ")


# ------------------------------------------------------------------------------------------ arguments, no server


def test_library_names_the_argument_it_cannot_use(pki, tmp_path):
    ca, cert, key = pki.ca.pem, pki.client.cert, pki.client.key
    with pytest.raises(ValueError, match=r"^tls_key: tls_cert needs tls_key"):
        Client("localhost:1", tls_ca=ca, tls_cert=cert)
    with pytest.raises(ValueError, match=r"^tls_cert: tls_key needs tls_cert"):
        Client("localhost:1", tls_key=key)
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=rf"^tls_ca: cannot read {missing} \(No such file"):
        Client("localhost:1", tls_ca=missing)
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00\xffnot a certificate")
    with pytest.raises(ValueError, match=rf"^tls_ca: {junk} holds no PEM certificate"):
        Client("localhost:1", tls_ca=junk)
    with pytest.raises(ValueError, match=r"^tls_cert / tls_key: .* are not a PEM certificate and its"):
        Client("localhost:1", tls_ca=ca, tls_cert=cert, tls_key=pki.stranger.key)  # another certificate's key
    with pytest.raises(ValueError, match=r"^token: must be printable ASCII without spaces$"):
        Client("localhost:1", token="naïve-token-0123456789")
