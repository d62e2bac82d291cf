"""`python -m service.probe`: exit 0 when the server's grpc.health.v1 service reports SERVING, else 1.

The container image's HEALTHCHECK. Kubernetes probes the same service natively (`grpc:` probes in deploy/).
Health is open to every caller, so the probe never sends a token; against a TLS port it needs TLS, and against
a mutual-TLS port a client certificate too, since the handshake comes before any RPC:

    python -m service.probe --target localhost:50051 --tls-ca ca.crt [--tls-cert c.crt --tls-key c.key]

Its TLS settings come from flags or from GAN_PROBE_TLS_CA, GAN_PROBE_TLS_CERT, GAN_PROBE_TLS_KEY and
GAN_PROBE_TLS_SERVER_NAME, deliberately not from the server's GAN_TLS_* that the same container holds:
GAN_TLS_CERT/KEY are the server's identity, whose certificate is for server auth only, so a server under mTLS
refuses it from a client; GAN_TLS_CLIENT_CA is the CA that signs *clients*, which need not be the one that
signed the server's certificate. Reusing them would work by coincidence at best. The server's certificate also
rarely names `localhost`, the probe's default host: give the name it holds with --tls-server-name.

Simplest inside the container is none of this: with GAN_HEALTH_PORT the server opens a plaintext port that
serves health only, and the probe asks there (the image's HEALTHCHECK does so when it is set).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

if __name__ == "__main__":
    # gRPC's C core logs failed TLS handshakes to stderr unless told otherwise; it reads this as grpc is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Both import nothing heavy (no numpy, onnxruntime or PIL), so that the probe starts fast.
from service.client import add_tls_arguments, channel_credentials, explain, open_channel
from service.config import ENV_PREFIX, ServerConfig

PROBE_ENV = ENV_PREFIX + "PROBE_"
PROBE_TLS = ("tls_ca", "tls_cert", "tls_key", "tls_server_name")  # each defaults to $GAN_PROBE_<NAME>
Status = health_pb2.HealthCheckResponse.ServingStatus


def status(
    target: str,
    service: str = "",
    timeout: float = 3.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> Status:
    """The status `target` reports for `service` ("" = the whole server); raises grpc.RpcError when it does not
    answer."""
    with open_channel(target, credentials, server_name) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status


def check(target: str, **options) -> Status:
    """Like `status` (same arguments), but UNKNOWN when the server does not answer."""
    try:
        return status(target, **options)
    except grpc.RpcError:
        return health_pb2.HealthCheckResponse.UNKNOWN


def main(argv: list[str] | None = None, environ: typing.Mapping[str, str] = os.environ) -> int:
    port = environ.get(ENV_PREFIX + "PORT", str(ServerConfig.port))
    p = argparse.ArgumentParser(
        prog="python -m service.probe",
        description="Exit 0 when the server's gRPC health service reports SERVING; else one line on stderr, exit 1."
        f" Each --tls-* flag defaults to {PROBE_ENV}<FLAG>, e.g. {PROBE_ENV}TLS_CA.",
    )
    p.add_argument("--target", default=f"localhost:{port}", help="default localhost:$GAN_PORT (%(default)s)")
    p.add_argument("--service", default="", help='health service name; "" (default) is the whole server')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    add_tls_arguments(p)
    p.set_defaults(**{k: environ.get(PROBE_ENV + k.upper()) or None for k in PROBE_TLS})
    args = p.parse_args(argv)
    tls = bool(args.tls_ca or args.tls_cert)
    try:
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        reply = status(args.target, args.service, args.timeout, credentials, args.tls_server_name)
    except ValueError as e:
        return _fail(str(e))
    except grpc.RpcError as e:
        why = explain(e, args.target, tls)
        return _fail(why if why.startswith("cannot connect") else f"{args.target}: {why}")
    if reply != health_pb2.HealthCheckResponse.SERVING:
        return _fail(f"{args.target} service {args.service!r}: {Status.Name(reply)}")
    return 0


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
