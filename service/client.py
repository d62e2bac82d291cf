"""Client library and CLI for the generator service.

    python -m service.client models
    python -m service.client sample --model mnist-cdcgan --seeds 0-63 --labels 0-9 --grid out.png
    python -m service.client interpolate --model mnist-cdcgan --seeds 3,7 --labels 3,8 --steps 16 --out strip.png

Targets may be host:port or dns:///name:port; the latter is balanced round-robin over every address the
name resolves to (e.g. a Kubernetes headless Service).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
from PIL import Image

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE = 64 << 20


def parse_ints(text: str) -> list[int]:
    """'0-3,7' → [0, 1, 2, 3, 7]."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise argparse.ArgumentTypeError(f"expected numbers and ranges like 0-63,70; got {text!r}")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return out


def labels_for(spec: list[str] | None, n: int) -> list[pb.Label]:
    """Class indices or names, cycled over n samples; none for unconditional models."""
    if not spec:
        return []
    labels = [pb.Label(index=int(s)) if s.isdigit() else pb.Label(name=s) for s in spec]
    return [labels[i % len(labels)] for i in range(n)]


class Client:
    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = 60.0):
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self.channel = grpc.insecure_channel(target, options=options)
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

    def generate(self, model: str, seeds: list[int], labels: list[pb.Label] = (), **output) -> pb.GenerateResponse:
        request = pb.GenerateRequest(
            model=model, seeds=pb.SeedList(seeds=seeds), labels=labels, output=pb.OutputOptions(**output)
        )
        return self.stub.Generate(request, timeout=self.timeout)

    def stream(
        self, model: str, seeds: list[int], labels: list[pb.Label] = (), **output
    ) -> Iterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(
            model=model, seeds=pb.SeedList(seeds=seeds), labels=labels, output=pb.OutputOptions(**output)
        )
        return self.stub.GenerateStream(request, timeout=self.timeout)

    def interpolate(
        self, model: str, seeds: list[int], steps: int, labels: list[pb.Label] = (), method: str = "slerp", **output
    ) -> pb.GenerateResponse:
        keys = [pb.Keyframe(seed=s, label=labels[i]) if labels else pb.Keyframe(seed=s) for i, s in enumerate(seeds)]
        request = pb.InterpolateRequest(
            model=model, keyframes=keys, steps=steps, method=pb.InterpolationMethod.Value(method.upper()),
            output=pb.OutputOptions(**output),
        )  # fmt: skip
        return self.stub.Interpolate(request, timeout=self.timeout)


def _save_images(response: pb.GenerateResponse, directory: Path, first: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(response.images):
        Image.open(io.BytesIO(data)).save(directory / f"{first + i:06d}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.client", description="Call the GAN generator service.")
    p.add_argument("--target", default=DEFAULT_TARGET, help="host:port or dns:///name:port (default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the served models")
    s = sub.add_parser("sample", help="generate images from seeds")
    s.add_argument("--model", required=True)
    s.add_argument("--seeds", type=parse_ints, required=True, help="e.g. 0-63 or 3,7,11")
    s.add_argument("--labels", type=lambda t: t.split(","), help="class indices/names, cycled: 0-9 or 3,7 or cat,dog")
    s.add_argument("--grid", type=Path, help="write one grid PNG here")
    s.add_argument("--columns", type=int, default=0, help="grid columns (default: one per label, else square)")
    s.add_argument("--out", type=Path, help="write every image as a PNG into this folder (streamed)")
    i = sub.add_parser("interpolate", help="frames between keyframe seeds")
    i.add_argument("--model", required=True)
    i.add_argument("--seeds", type=parse_ints, required=True, help="keyframe seeds, e.g. 3,7")
    i.add_argument("--labels", type=lambda t: t.split(","), help="one class per keyframe (conditional models)")
    i.add_argument("--steps", type=int, default=16, help="frames per segment")
    i.add_argument("--method", choices=("slerp", "lerp"), default="slerp")
    i.add_argument("--out", type=Path, required=True, help="the strip PNG")
    args = p.parse_args(argv)
    if getattr(args, "labels", None) and all(re.fullmatch(r"\d+(-\d+)?", lab) for lab in args.labels):
        args.labels = [str(v) for v in parse_ints(",".join(args.labels))]  # index ranges: 0-4,7

    try:
        with Client(args.target) as client:
            if args.command == "models":
                for m in client.models():
                    classes = f"{len(m.class_names)} classes" if m.class_names else "unconditional"
                    shape = "x".join(map(str, m.image_shape))
                    print(
                        f"{m.name}  versions {list(m.versions)}  z{m.latent_dim} {m.prior}  {shape}  {classes}"
                        f"  {m.provider}"
                    )
            elif args.command == "sample":
                labels = labels_for(args.labels, len(args.seeds))
                if args.grid:
                    cols = args.columns or (len(args.labels) if args.labels else 0)
                    r = client.generate(args.model, args.seeds, labels, grid=True, grid_columns=cols, grid_only=True)
                    args.grid.write_bytes(r.grid_png)
                    print(f"wrote {args.grid}")
                if args.out:
                    for part in client.stream(args.model, args.seeds, labels):
                        _save_images(part, args.out, part.offset)
                    print(f"wrote {len(args.seeds)} images to {args.out}")
                if not (args.grid or args.out):
                    p.error("sample: give --grid and/or --out")
            else:
                labels = labels_for(args.labels, len(args.seeds)) if args.labels else []
                r = client.interpolate(
                    args.model, args.seeds, args.steps, labels, args.method, grid=True, grid_only=True
                )
                args.out.write_bytes(r.grid_png)
                print(f"wrote {args.out}")
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
