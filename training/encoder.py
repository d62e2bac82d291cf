"""Train an encoder for an exported generator, for inversion: an image → the z (and class) that draws it.

    python -m training.encoder models/mnist-cdcgan/4/model.onnx      # writes models/mnist-cdcgan/4/encoder.onnx

E learns from two sources at once ("In-Domain GAN Inversion", Zhu et al. 2020, gan-facts.md): G's own samples,
whose z and class it regresses, and the real training digits of the generator's dataset, reconstructed through the
frozen G (training/frozen.py runs the file itself, so no checkpoint is needed) in pixels and in the bundled
classifier's features. The file goes beside its generator as encoder.onnx, tied to it by the generator's SHA-256
(service/contract.py, EncoderSpec); the server then serves inversion for that version.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.contract import ContractError, EncoderSpec, read_encoder, read_spec
from service.repository import ENCODER_FILE
from training import classifier as clf
from training import data as data_mod
from training.config import ConfigError, TrainConfig
from training.data import DataError, sha256_file
from training.export import ExportError, trace
from training.frozen import FrozenError, FrozenGenerator


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 3000
    batch: int = 64  # of G's samples, and as many real images
    lr: float = 1e-3
    pixel: float = 1.0  # weights of the reconstruction terms against the latent regression (1)
    features: float = 0.05
    width: int = 32


PRESETS = {"default": Settings(), "tiny": Settings(steps=30, batch=16, width=8)}
SEED = 0


class Encoder(nn.Module):
    """Conv 4/2/1, 4/2/1 and 3/1/1 (LeakyReLU; BatchNorm after the last two) → Linear 256 → z and class logits."""

    def __init__(self, channels: int, size: int, latent_dim: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.BatchNorm2d(4 * width), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(4 * width * math.ceil(size / 4) ** 2, 256), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.z = nn.Linear(256, latent_dim)
        self.logits = nn.Linear(256, num_classes) if num_classes else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.features(images)
        return (self.z(h),) if self.logits is None else (self.z(h), self.logits(h))


class EncoderError(Exception):
    """A generator the encoder cannot be trained for, or a failed export; the message says which and why."""


def _real(g: FrozenGenerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's training images in its output range, and their labels."""
    try:
        cfg = TrainConfig.from_json(g.spec.provenance["config"])
        data = data_mod.load(cfg.replace(split="train"))
    except KeyError:
        raise EncoderError(
            "the generator's metadata lacks its training config: which images it learnt is unknown"
        ) from None
    except (ConfigError, DataError) as e:
        raise EncoderError(f"cannot load the generator's training data: {e}") from None
    lo, hi = g.spec.output_range
    return data.images.float() * ((hi - lo) / 255.0) + lo, data.labels


def train(path: Path, settings: Settings, progress: bool = True) -> tuple[Encoder, dict]:
    torch.manual_seed(SEED)
    try:
        g = FrozenGenerator(path)
    except (FrozenError, ContractError) as e:
        raise EncoderError(str(e)) from None
    spec = g.spec
    if spec.kind != "image":
        raise EncoderError(f"{path}: only image generators are inverted (this one draws {spec.kind})")
    x_real, y_real = _real(g)
    lo, hi = spec.output_range
    feature_net = None
    if spec.provenance.get("dataset") == "mnist5k" and clf.BUNDLED.exists():
        feature_net = clf.load(clf.BUNDLED)[0].requires_grad_(False)
    c, size = spec.output_shape[0], spec.output_shape[1]
    nc = spec.num_classes
    e = Encoder(c, size, spec.latent_dim, nc, settings.width)
    opt = torch.optim.Adam(e.parameters(), settings.lr, betas=(0.5, 0.999))
    rng = torch.Generator().manual_seed(SEED)
    started, losses = time.perf_counter(), {}
    for step in tqdm(range(settings.steps), desc="encoder", disable=not progress, unit="step"):
        z = torch.randn(settings.batch, spec.latent_dim, generator=rng)
        labels = torch.randint(0, max(nc, 1), (settings.batch,), generator=rng)
        y = F.one_hot(labels, nc).float() if nc else None
        with torch.no_grad():
            x_fake = g(z, y)
        out = e(x_fake)
        terms = {"latent": F.mse_loss(out[0], z)}
        if nc:
            terms["class"] = F.cross_entropy(out[1], labels)
        pick = torch.randint(0, len(x_real), (settings.batch,), generator=rng)
        x, label = x_real[pick], y_real[pick]
        out = e(x)
        recon = g(out[0], out[1].softmax(1) if nc else None)
        terms["pixel"] = settings.pixel * F.mse_loss(recon, x)
        if nc:
            terms["class_real"] = F.cross_entropy(out[1], label)
        if feature_net is not None:
            to01 = lambda t: (t - lo) / (hi - lo)  # noqa: E731
            terms["features"] = settings.features * F.mse_loss(feature_net(to01(recon))[0], feature_net(to01(x))[0])
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= settings.steps - 50:  # the last 50 steps' mean, for the record
            for k, v in terms.items():
                losses[k] = losses.get(k, 0.0) + v.item() / min(50, settings.steps)
    facts = {"steps": settings.steps, "seconds": round(time.perf_counter() - started, 1)}
    return e.eval(), facts | {f"loss_{k}": round(v, 5) for k, v in losses.items()}


def export(e: Encoder, generator: Path, facts: dict) -> Path:
    """encoder.onnx beside `generator`, written to a temporary name, checked, then renamed into place."""
    gspec = read_spec(ort.InferenceSession(str(generator), providers=["CPUExecutionProvider"]))
    provenance = {k: str(v) for k, v in facts.items()} | {
        "torch_version": str(torch.__version__), "onnx_version": onnx.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    spec = EncoderSpec(sha256_file(generator), gspec.latent_dim, gspec.class_names, gspec.output_shape,
                       gspec.output_range, provenance)  # fmt: skip
    example = torch.zeros(4, *gspec.output_shape)
    outputs = ["z", "logits"] if gspec.num_classes else ["z"]
    model = trace(e, (example,), ["images"], outputs)
    onnx.helper.set_model_props(model, spec.to_metadata())
    fd, staged = tempfile.mkstemp(dir=generator.parent, prefix=".encoder-", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save_model(model, staged, save_as_external_data=False)
        os.chmod(staged, 0o644)
        check = ort.InferenceSession(staged, providers=["CPUExecutionProvider"])
        read_encoder(check).check(gspec, spec.generator_sha256)
        images = torch.randn(7, *gspec.output_shape).clamp(-1, 1)
        with torch.no_grad():
            want = e(images)[0].numpy()
        got = check.run(["z"], {"images": images.numpy()})[0]
        if np.abs(got - want).max() > 1e-4:
            raise EncoderError(f"torch and ONNX Runtime differ by {np.abs(got - want).max():.3g}")
        target = generator.parent / ENCODER_FILE
        shutil.move(staged, target)
        return target
    except ContractError as err:
        raise EncoderError(f"the exported encoder does not honour the contract: {err}") from None
    finally:
        Path(staged).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.encoder", description=__doc__.splitlines()[0])
    p.add_argument("generator", type=Path, help="an exported model.onnx; encoder.onnx is written beside it")
    p.add_argument("--preset", choices=PRESETS, default="default", help="default: 3,000 steps; tiny: for tests")
    p.add_argument("--steps", type=int, help="override the preset's steps")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    settings = PRESETS[args.preset]
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    try:
        e, facts = train(args.generator, settings, progress=not args.no_progress)
        print(export(e, args.generator, facts))
    except (EncoderError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
