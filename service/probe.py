"""`python -m service.probe`: exit 0 when the server's grpc.health.v1 service reports SERVING, else 1.

The container image's HEALTHCHECK. Kubernetes probes the same service natively (`grpc:` probes in deploy/).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import ENV_PREFIX, ServerConfig


def check(target: str, service: str = "", timeout: float = 3.0) -> health_pb2.HealthCheckResponse.ServingStatus:
    """The status `target` reports for `service` ("" = the whole server); UNKNOWN when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return health_pb2.HealthCheckResponse.UNKNOWN
    return reply.status


def main(argv: list[str] | None = None, environ: typing.Mapping[str, str] = os.environ) -> int:
    port = environ.get(ENV_PREFIX + "PORT", str(ServerConfig.port))
    p = argparse.ArgumentParser(
        prog="python -m service.probe", description="Exit 0 when the server's gRPC health service reports SERVING."
    )
    p.add_argument("--target", default=f"localhost:{port}", help="default localhost:$GAN_PORT (%(default)s)")
    p.add_argument("--service", default="", help='health service name; "" (default) is the whole server')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    args = p.parse_args(argv)
    status = check(args.target, args.service, args.timeout)
    if status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        print(f"{args.target} service {args.service!r}: {name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
