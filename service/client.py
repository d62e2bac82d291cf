"""Client library and CLI for the generator service.

    python -m service.client models
    python -m service.client sample --model mnist-cdcgan --seeds 0-63 --labels 0-9 --grid out.png
    python -m service.client interpolate --model mnist-cdcgan --seeds 3,7 --labels 3,8 --steps 16 --out strip.png
    GAN_TOKEN=... python -m service.client --target HOST:50051 --tls-ca ca.crt [--tls-cert c.crt --tls-key c.key] models

Targets may be host:port or dns:///name:port; the latter is balanced round-robin over every address the
name resolves to (e.g. a Kubernetes headless Service). TLS is on when a CA or a client certificate is given;
the token goes out as `authorization: Bearer <token>` on every call, over TLS or (for loopback use) plaintext.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import ssl
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

if __name__ == "__main__":
    # gRPC's C core logs every failed TLS handshake to stderr unless told otherwise, which would break the CLI's
    # one-line errors. It reads this once, as grpc is imported, so it is set before the import below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.errors import InvalidArgument
from service.frontends import text

DEFAULT_TARGET = "localhost:50051"
PSI_HELP = "truncation ψ in (0, 1]: nearer 0, more typical and less varied images (default 0: none)"
MAX_MESSAGE = 64 << 20
TOKEN_ENV = "GAN_TOKEN"
GENERATOR = pb.DESCRIPTOR.services_by_name["Generator"].full_name
# Every call balanced over every address the target resolves to (round_robin), and a generation tried again on
# another on UNAVAILABLE, which a server answers to a call it has not started (a drain that began meanwhile).
# Generating is idempotent (seeds fix the output), so a retry never changes an answer; ModelAdmin is not retried.
RETRIES = {
    "name": [{"service": GENERATOR}, {"service": "inference.GRPCInferenceService"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.01s", "maxBackoff": "0.2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}  # fmt: skip
# How gRPC's details begin when no connection could be made (pick_first; round_robin).
NOT_CONNECTED = ("failed to connect to all addresses", "connections to all backends failing")


def service_config(target: str) -> str:
    """The channel's service config. A target of several servers (dns:, or a list of addresses) also skips each one
    whose Generator health is not SERVING: one that drains (it turns NOT_SERVING at once), or has no model yet. One
    address (a server, a proxy) is not health-checked: behind a proxy its answer would speak for one server of many,
    and an admin call must reach a server that has no model."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [RETRIES]}
    if target.startswith("dns:") or (target.startswith(("ipv4:", "ipv6:")) and "," in target):
        config["healthCheckConfig"] = {"serviceName": GENERATOR}
    return json.dumps(config)


def parse_ints(spec: str) -> list[int]:
    """'0-3,7' → [0, 1, 2, 3, 7] (service/frontends/text.py, as the server reads seeds)."""
    try:
        return text.ints(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers and ranges like 0-63,70; {e}") from None


def parse_numbers(spec: str) -> list[float]:
    """'-3,0,3' → [-3.0, 0.0, 3.0]."""
    try:
        return text.numbers(spec, "strengths")
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("strengths: ")) from None


def labels_for(spec: list[str] | None, n: int) -> list[pb.Label]:
    """Class indices or names, cycled over n samples; none for unconditional models."""
    if not spec:
        return []
    labels = [pb.Label(index=lab.index) if lab.index is not None else pb.Label(name=lab.name)
              for lab in map(text.label, spec)]  # fmt: skip
    return [labels[i % len(labels)] for i in range(n)]


def _read(path: str | os.PathLike, arg: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{arg}: cannot read {path} ({e.strerror or type(e).__name__})") from None


def channel_credentials(
    tls_ca: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files, mutual with a client certificate and key; None (plaintext) without either.

    Without `tls_ca` the server is verified against the system's roots. The files are checked here, so a wrong
    one is a ValueError naming it rather than a failed handshake later.
    """
    if bool(tls_cert) != bool(tls_key):
        given, missing = ("tls_cert", "tls_key") if tls_cert else ("tls_key", "tls_cert")
        raise ValueError(f"{missing}: {given} needs {missing} as well (a client certificate and its private key)")
    if not (tls_ca or tls_cert):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only to check the files: gRPC does its own TLS
    root = None
    if tls_ca:
        root = _read(tls_ca, "tls_ca")
        try:
            context.load_verify_locations(cadata=root.decode("ascii"))
        except (UnicodeDecodeError, ssl.SSLError):
            raise ValueError(f"tls_ca: {tls_ca} holds no PEM certificate") from None
    chain = key = None
    if tls_cert:
        chain, key = _read(tls_cert, "tls_cert"), _read(tls_key, "tls_key")
        try:
            # A password callback, so that an encrypted key fails here instead of prompting on the terminal.
            context.load_cert_chain(tls_cert, tls_key, password=lambda: b"")
        except (OSError, ssl.SSLError) as e:
            raise ValueError(
                f"tls_cert / tls_key: {tls_cert} and {tls_key} are not a PEM certificate and its unencrypted key"
                f" ({getattr(e, 'reason', None) or e})"
            ) from None
    return grpc.ssl_channel_credentials(root, key, chain)


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """A secure channel with credentials, else a plaintext one. `server_name` is the name the server's certificate
    must hold when it is not the target's host (e.g. through `kubectl port-forward`)."""
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    name = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=[*options, *name])


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):  # fmt: skip
    pass


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call on a channel, of every kind, to every service."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = tuple(pairs)

    def _intercept(self, continuation, details: grpc.ClientCallDetails, request):
        metadata = (*(details.metadata or ()), *self.pairs)
        fresh = _CallDetails(details.method, details.timeout, metadata, details.credentials,
                             details.wait_for_ready, details.compression)  # fmt: skip
        return continuation(fresh, request)

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


def _bearer(token: str) -> tuple[str, str]:
    if not re.fullmatch(r"[\x21-\x7e]+", token):  # what an HTTP/2 header value can carry; never echoed
        raise ValueError("token: must be printable ASCII without spaces")
    return ("authorization", f"Bearer {token}")


def explain(error: grpc.RpcError, target: str, tls: bool) -> str:
    """One line for a failed call: the likely cause when the connection or its TLS handshake failed (gRPC reports
    those as UNAVAILABLE with OpenSSL's words in the details), else `CODE: details` as the server sent them."""
    code, details = error.code(), error.details() or ""
    if code != grpc.StatusCode.UNAVAILABLE or not details.startswith(NOT_CONNECTED):
        return f"{code.name}: {details}"
    verify = re.search(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)", details)
    if "certificate has expired" in details:
        why = "TLS handshake failed: the server's certificate has expired (or this machine's clock is wrong)"
    elif verify:
        why = (f"TLS handshake failed: cannot verify the server's certificate ({verify.group(1).strip()}); is"
               " --tls-ca the CA that signed it?")  # fmt: skip
    elif "Hostname Verification" in details:
        why = ("TLS handshake failed: the server's certificate does not name the host dialled; dial a name it holds"
               " or give it as --tls-server-name")  # fmt: skip
    elif "WRONG_VERSION_NUMBER" in details:
        why = "TLS handshake failed: the server does not speak TLS; drop --tls-ca, --tls-cert and --tls-key"
    elif "Socket closed" in details or "Connection reset" in details:
        # The server hangs up on a handshake it refuses; the client is not told why.
        why = (
            "the server closed the connection during the TLS handshake; does it require a client certificate"
            " (--tls-cert/--tls-key) signed by a CA it trusts?"
            if tls
            else "the server closed the connection; does it require TLS? (give --tls-ca)"
        )
    elif "handshake" in details.lower() or "SSL" in details:
        why = f"TLS handshake failed ({details.rpartition('last error: ')[2]})"
    else:
        return f"{code.name}: {details}"
    return f"cannot connect to {target}: {why}"


class Client:
    """The generator API over one channel: TLS when `tls_ca` or a client certificate is given, and the token (if
    any) sent as `authorization: Bearer <token>` with every call. Raises ValueError, naming the argument, for
    credentials it cannot use; calls raise grpc.RpcError (see `explain`)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = 60.0,
        *,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ):
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.service_config", service_config(target)),
        ]
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        # Metadata from an interceptor rather than call credentials, which gRPC sends over TLS only: a token
        # over plaintext is for loopback use (tests, port-forwards), and works there.
        interceptors = [_AddMetadata([_bearer(token)])] if token else []
        self.tls = credentials is not None
        self.channel = grpc.intercept_channel(open_channel(target, credentials, server_name, options), *interceptors)
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def generate(
        self, model: str, seeds: list[int], labels: list[pb.Label] = (), psi: float = 0.0, **output
    ) -> pb.GenerateResponse:
        """`psi`: truncation ψ in (0, 1], 0 for none."""
        request = pb.GenerateRequest(model=model, seeds=pb.SeedList(seeds=seeds), labels=labels, truncation=psi,
                                     output=pb.OutputOptions(**output))  # fmt: skip
        return self.stub.Generate(request, timeout=self.timeout)

    def stream(
        self, model: str, seeds: list[int], labels: list[pb.Label] = (), psi: float = 0.0, **output
    ) -> Iterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(model=model, seeds=pb.SeedList(seeds=seeds), labels=labels, truncation=psi,
                                     output=pb.OutputOptions(**output))  # fmt: skip
        return self.stub.GenerateStream(request, timeout=self.timeout)

    def interpolate(
        self, model: str, seeds: list[int], steps: int, labels: list[pb.Label] = (), method: str = "slerp",
        psi: float = 0.0, **output,
    ) -> pb.GenerateResponse:  # fmt: skip
        keys = [pb.Keyframe(seed=s, label=labels[i]) if labels else pb.Keyframe(seed=s) for i, s in enumerate(seeds)]
        request = pb.InterpolateRequest(
            model=model, keyframes=keys, steps=steps, method=pb.InterpolationMethod.Value(method.upper()),
            truncation=psi, output=pb.OutputOptions(**output),
        )  # fmt: skip
        return self.stub.Interpolate(request, timeout=self.timeout)

    def edit(
        self, model: str, seeds: list[int], direction: str, strengths: list[float], labels: list[pb.Label] = (),
        psi: float = 0.0, **output,
    ) -> pb.GenerateResponse:  # fmt: skip
        request = pb.EditRequest(model=model, seeds=pb.SeedList(seeds=seeds), labels=labels, direction=direction,
                                 strengths=strengths, truncation=psi, output=pb.OutputOptions(**output))  # fmt: skip
        return self.stub.Edit(request, timeout=self.timeout)


def _save_images(response: pb.GenerateResponse, directory: Path, first: int) -> None:
    from PIL import Image  # here, so the probe (which shares the channel code) does not load it

    directory.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(response.images):
        Image.open(io.BytesIO(data)).save(directory / f"{first + i:06d}.png")


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """--tls-ca, --tls-cert, --tls-key and --tls-server-name, shared with the probe."""
    p.add_argument("--tls-ca", help="PEM CA that signed the server's certificate; turns TLS on")
    p.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS (with --tls-key; turns TLS on)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", help="the name to expect in the server's certificate (default: the host)")


def main(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service.client",
        description="Call the GAN generator service. Any failure prints one line on stderr and exits 1.",
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help="host:port or dns:///name:port (default %(default)s)")
    add_tls_arguments(p)
    p.add_argument(
        "--token",
        default=environ.get(TOKEN_ENV) or None,
        help=f"bearer token sent with every call (default: ${TOKEN_ENV}, which keeps it out of the process list)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the served models")
    s = sub.add_parser("sample", help="generate images from seeds")
    s.add_argument("--model", required=True)
    s.add_argument("--seeds", type=parse_ints, required=True, help="e.g. 0-63 or 3,7,11")
    s.add_argument("--labels", type=lambda t: t.split(","), help="class indices/names, cycled: 0-9 or 3,7 or cat,dog")
    s.add_argument("--grid", type=Path, help="write one grid PNG here")
    s.add_argument("--columns", type=int, default=0, help="grid columns (default: one per label, else square)")
    s.add_argument("--out", type=Path, help="write every image as a PNG into this folder (streamed)")
    s.add_argument("--psi", type=float, default=0.0, help=PSI_HELP)
    i = sub.add_parser("interpolate", help="frames between keyframe seeds")
    i.add_argument("--model", required=True)
    i.add_argument("--seeds", type=parse_ints, required=True, help="keyframe seeds, e.g. 3,7")
    i.add_argument("--labels", type=lambda t: t.split(","), help="one class per keyframe (conditional models)")
    i.add_argument("--steps", type=int, default=16, help="frames per segment")
    i.add_argument("--method", choices=("slerp", "lerp"), default="slerp")
    i.add_argument("--out", type=Path, required=True, help="the strip PNG")
    i.add_argument("--psi", type=float, default=0.0, help=PSI_HELP)
    e = sub.add_parser("edit", help="seeds moved along a direction: a row per seed, a column per strength")
    e.add_argument("--model", required=True)
    e.add_argument("--seeds", type=parse_ints, required=True, help="e.g. 0-3")
    e.add_argument("--labels", type=lambda t: t.split(","), help="class indices/names, cycled over the seeds")
    e.add_argument("--direction", required=True, help="a name from `models` (e.g. slant)")
    e.add_argument("--strengths", type=parse_numbers, default=text.STRENGTHS,
                   help="comma-separated (default %(default)s)")  # fmt: skip
    e.add_argument("--out", type=Path, required=True, help="the grid PNG")
    e.add_argument("--psi", type=float, default=0.0, help=PSI_HELP)
    args = p.parse_args(argv)
    if getattr(args, "labels", None) and all(re.fullmatch(r"\d+(-\d+)?", lab) for lab in args.labels):
        args.labels = [str(v) for v in parse_ints(",".join(args.labels))]  # index ranges: 0-4,7
    if args.command == "sample" and not (args.grid or args.out):
        p.error("sample: give --grid and/or --out")

    tls = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    try:
        with Client(args.target, token=args.token, server_name=args.tls_server_name, **tls) as client:
            if args.command == "models":
                for m in client.models():
                    classes = f"{len(m.class_names)} classes" if m.class_names else "unconditional"
                    shape = "x".join(map(str, m.image_shape))
                    print(
                        f"{m.name}  versions {list(m.versions)}  z{m.latent_dim} {m.prior}  {shape}  {classes}"
                        f"  {m.provider}"
                    )
                    if m.directions:
                        print(f"  directions: {', '.join(d.name for d in m.directions)}")
            elif args.command == "sample":
                labels = labels_for(args.labels, len(args.seeds))
                if args.grid:
                    cols = args.columns or (len(args.labels) if args.labels else 0)
                    r = client.generate(args.model, args.seeds, labels, args.psi, grid=True, grid_columns=cols,
                                        grid_only=True)  # fmt: skip
                    args.grid.write_bytes(r.grid_png)
                    print(f"wrote {args.grid}")
                if args.out:
                    for part in client.stream(args.model, args.seeds, labels, args.psi):
                        _save_images(part, args.out, part.offset)
                    print(f"wrote {len(args.seeds)} images to {args.out}")
            elif args.command == "edit":
                labels = labels_for(args.labels, len(args.seeds)) if args.labels else []
                r = client.edit(args.model, args.seeds, args.direction, args.strengths, labels, args.psi, grid=True,
                                grid_only=True)  # fmt: skip
                args.out.write_bytes(r.grid_png)
                print(f"wrote {args.out}")
            else:
                labels = labels_for(args.labels, len(args.seeds)) if args.labels else []
                r = client.interpolate(
                    args.model, args.seeds, args.steps, labels, args.method, args.psi, grid=True, grid_only=True
                )
                args.out.write_bytes(r.grid_png)
                print(f"wrote {args.out}")
    except grpc.RpcError as e:
        return _fail(explain(e, args.target, bool(args.tls_ca or args.tls_cert)))
    except ValueError as e:  # credentials it cannot use: the message names the argument (never the token)
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot write {e.filename}: {e.strerror}")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
