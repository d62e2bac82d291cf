"""Export a checkpoint's generator to ONNX: models/<name>/<version>/model.onnx, self-describing.

The ONNX file is the only contract between training and serving:
  inputs   z [batch, latent_dim] float32, and y [batch, num_classes] float32 for conditional models
  output   images [batch, C, H, W] float32 in `output_range` (points [batch, 2] for 2-D models)
  metadata_props (all strings; JSON where structured), see METADATA_KEYS.
Only the batch axis is dynamic.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.config import TrainConfig
from training.data import sha256_file
from training.loop import load_checkpoint, sample_z, spec_from_checkpoint
from training.nets import build_generator

FORMAT_VERSION = "1"
METADATA_KEYS = (
    "format_version", "latent_dim", "prior", "num_classes", "class_names", "image_shape", "output_range",
    "architecture", "loss", "dataset", "preset", "steps", "ema", "torch_version", "onnx_version",
    "checkpoint_sha256", "created", "config",
)  # fmt: skip
PARITY_BATCHES = (1, 7, 64)
PARITY_ATOL = 1e-4


class ExportError(Exception):
    """The exported graph failed a check (ONNX checker, or torch vs ONNX Runtime parity)."""


class _Generator(torch.nn.Module):
    """Fixes the graph interface: named inputs (z[, y]) → images, exactly within output_range.

    The clamp matters: ONNX Runtime's Tanh can return -1.0000001, outside the declared range.
    """

    def __init__(self, g: torch.nn.Module):
        super().__init__()
        self.g, self.conditional, self.range = g, bool(g.num_classes), g.output_range

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.g(z, y if self.conditional else None)
        return x if self.range is None else x.clamp(*self.range)


def generator_from_checkpoint(ck: dict[str, Any], use_ema: bool = True) -> torch.nn.Module:
    cfg = TrainConfig.from_dict(ck["config"])
    g = build_generator(cfg, spec_from_checkpoint(ck))
    state = ck["G_ema"] if use_ema and ck.get("G_ema") is not None else ck["G"]
    g.load_state_dict(state)
    return g.eval().requires_grad_(False)


def example_inputs(g: torch.nn.Module, batch: int, prior: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    rng = torch.Generator().manual_seed(seed)
    z = sample_z(batch, g.latent_dim, prior, rng)
    if not g.num_classes:
        return (z,)
    # Soft labels: the contract allows any float vector, so parity covers more than one-hots.
    return z, torch.softmax(3 * torch.randn(batch, g.num_classes, generator=rng), 1)


def metadata(ck: dict[str, Any], g: torch.nn.Module, checkpoint: Path, use_ema: bool) -> dict[str, str]:
    cfg = TrainConfig.from_dict(ck["config"])
    spec = spec_from_checkpoint(ck)
    return {
        "format_version": FORMAT_VERSION,
        "latent_dim": str(cfg.latent_dim),
        "prior": cfg.prior,
        "num_classes": str(spec.num_classes),
        "class_names": json.dumps(list(spec.class_names)),
        "image_shape": json.dumps(list(spec.shape)),
        "output_range": json.dumps(list(g.output_range) if g.output_range else None),
        "architecture": cfg.arch,
        "loss": cfg.loss,
        "dataset": cfg.dataset,
        "preset": cfg.preset,
        "steps": str(ck["counters"]["step"]),
        "ema": json.dumps(use_ema and ck.get("G_ema") is not None),
        "torch_version": str(torch.__version__),
        "onnx_version": onnx.__version__,
        "checkpoint_sha256": sha256_file(checkpoint),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
    }


def to_onnx(g: torch.nn.Module, prior: str, path: Path, props: dict[str, str]) -> None:
    """Trace `g` with torch.export (batch axis dynamic) and write one self-contained ONNX file."""
    wrapper = _Generator(g).eval()
    inputs = example_inputs(g, 4, prior)  # not 1: a size-1 example would specialise the batch axis
    batch = torch.export.Dim("batch", min=1, max=65536)
    names = ["z", "y"][: len(inputs)]
    # The exporter is chatty (progress lines, optional-dependency warnings); keep the CLI's output clean.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                inputs,
                dynamo=True,
                input_names=names,
                output_names=["images"],
                dynamic_shapes={n: {0: batch} for n in names},
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean "this graph did not export"
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        quiet.setLevel(level)
    model = program.model_proto
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(path), save_as_external_data=False)


def check(g: torch.nn.Module, prior: str, path: Path) -> float:
    """onnx.checker (full) and torch vs ONNX Runtime parity at batch 1, 7, 64; returns the max abs diff."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path}: ONNX checker failed: {e}") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in PARITY_BATCHES:
        inputs = example_inputs(g, n, prior, seed=n)
        with torch.no_grad():
            expected = g(*inputs).numpy()
        feeds = {name: t.numpy() for name, t in zip(("z", "y"), inputs, strict=False)}
        (got,) = session.run(["images"], feeds)
        if got.shape != expected.shape:
            raise ExportError(f"batch {n}: ONNX output {got.shape} != torch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > PARITY_ATOL:
        raise ExportError(f"torch vs ONNX Runtime differ by {worst:.3g} > {PARITY_ATOL}")
    return worst


def publish(staging: Path, root: Path) -> Path:
    """Rename the staging folder to root/<highest version + 1>, atomically; retried if another export won.

    A version folder therefore never exists without its model.onnx, and an existing version is never
    touched: renaming onto a folder that holds a file fails, and we move on to the next number.
    """
    while True:
        versions = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
        target = root / str(max(versions, default=0) + 1)
        try:
            staging.rename(target)
            return target
        except OSError:
            if not any(target.iterdir()):  # not a lost race: something else is wrong
                raise


def export(checkpoint: Path, repository: Path, name: str, use_ema: bool = True) -> Path:
    """Export, check, then publish as the next version; a failed check publishes nothing."""
    checkpoint = Path(checkpoint)
    ck = load_checkpoint(checkpoint)
    g = generator_from_checkpoint(ck, use_ema)
    prior = ck["config"]["prior"]
    root = Path(repository) / name
    root.mkdir(parents=True, exist_ok=True)
    # Stage beside the versions (same filesystem), so that publishing is one atomic rename.
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the published version must be readable by the server
    try:
        to_onnx(g, prior, staging / "model.onnx", metadata(ck, g, checkpoint, use_ema))
        check(g, prior, staging / "model.onnx")
        return publish(staging, root) / "model.onnx"
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful publish


def read_metadata(path: Path) -> dict[str, str]:
    """metadata_props as ONNX Runtime reports them (what the service will see)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository root")
    p.add_argument("--name", required=True, help="model name: models/<name>/<version>/model.onnx")
    p.add_argument("--raw", action="store_true", help="export the raw generator, not its EMA")
    args = p.parse_args(argv)
    try:
        path = export(args.checkpoint, args.repository, args.name, use_ema=not args.raw)
    except (ExportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
