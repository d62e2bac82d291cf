"""Export a checkpoint's generator to ONNX: <repository>/<name>/<version>/model.onnx, self-describing.

The file honours service/contract.py, the one contract between training and serving: its metadata is the
checkpoint's ModelSpec, with what trained it (architecture, loss, dataset, steps, config, ...) as provenance, and
the editing directions training/directions.py computes from the exported file.
Image generators go to the serving repository, models/; 2-D point generators, which the service does not
serve, to their run's folder, OUT/models. An explicit repository wins over both; s3://BUCKET/PREFIX publishes the
checked file to an object store as the next version there (service/objectstore.py), for a server that reads it.
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

from service import objectstore
from service.contract import ContractError, ModelSpec, read_spec, seed_latents
from service.objectstore import StoreUnavailable
from service.repository import RepositoryError
from training import directions
from training.checkpoint import CheckpointError, load_checkpoint, spec_from_checkpoint
from training.config import POINT_DATASETS, ConfigError, TrainConfig
from training.data import sha256_file
from training.nets import build_generator

SERVING_REPOSITORY = Path("models")
PARITY_BATCHES = (1, 7, 64)
PARITY_ATOL = 1e-4
# fp16 weights and activations (inputs and output stay float32): at most 1e-2 from torch's fp32 output on a
# [-1, 1] image range, about 1.3 steps of 8-bit; the shipped cDCGAN measured 0.004 at batch 64.
FP16_ATOL = 1e-2


class ExportError(Exception):
    """The exported graph failed a check (ONNX checker, contract read-back, or torch vs ONNX Runtime parity)."""


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
    """z for seeds seed .. seed + batch - 1 by the seed contract, and soft labels y when conditional."""
    z = torch.from_numpy(seed_latents(range(seed, seed + batch), g.latent_dim, prior))
    if not g.num_classes:
        return (z,)
    # Soft labels: the contract allows any float vector, so parity covers more than one-hots.
    logits = np.random.default_rng(seed).standard_normal((batch, g.num_classes), dtype=np.float32)
    return z, torch.softmax(3 * torch.from_numpy(logits), 1)


def model_spec(
    ck: dict[str, Any], g: torch.nn.Module, checkpoint: Path, use_ema: bool, fp16: bool = False
) -> ModelSpec:
    """The checkpoint's contract, with the facts of its training as provenance."""
    cfg = TrainConfig.from_dict(ck["config"])
    data = spec_from_checkpoint(ck)
    provenance = {
        "architecture": cfg.arch,
        "loss": cfg.loss,
        "dataset": cfg.dataset,
        "preset": cfg.preset,
        "steps": str(ck["counters"]["step"]),
        "ema": json.dumps(use_ema and ck.get("G_ema") is not None),
        "precision": "fp16" if fp16 else "fp32",
        "parity_atol": str(FP16_ATOL if fp16 else PARITY_ATOL),  # the largest |ONNX − torch fp32| export allows
        "torch_version": str(torch.__version__),
        "onnx_version": onnx.__version__,
        "checkpoint_sha256": sha256_file(checkpoint),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        # Paths of the machine that trained it are nobody's business: only their last part is kept.
        "config": cfg.replace(out=Path(cfg.out).name, data_dir=Path(cfg.data_dir).name).to_json(),
    }
    kind = "points" if cfg.dataset in POINT_DATASETS else "image"
    return ModelSpec(
        kind, cfg.latent_dim, cfg.prior, data.class_names, data.shape, g.output_range, provenance=provenance
    )


def default_repository(cfg: TrainConfig) -> Path:
    """models/ for image generators; the run's OUT/models for 2-D points, which the service does not serve."""
    return Path(cfg.out) / "models" if cfg.dataset in POINT_DATASETS else SERVING_REPOSITORY


def trace(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], outputs: list[str]):
    """torch.onnx.export of `module` with the batch axis of every input dynamic: the ONNX ModelProto. `inputs` must
    have a batch of more than 1, which would specialise the axis."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The exporter is chatty (progress lines, optional-dependency warnings); keep the CLI's output clean.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(), inputs, dynamo=True, input_names=names, output_names=outputs,
                dynamic_shapes={n: {0: batch} for n in names}, verbose=False,
            )  # fmt: skip
    except Exception as e:  # the exporter raises many types; all mean "this graph did not export"
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        quiet.setLevel(level)
    return program.model_proto


def to_onnx(g: torch.nn.Module, prior: str, path: Path, props: dict[str, str], fp16: bool = False) -> None:
    """Trace `g` with torch.export (batch axis dynamic) and write one self-contained ONNX file; with `fp16`, its
    weights and arithmetic in float16 behind float32 inputs and output (the contract's types do not change)."""
    inputs = example_inputs(g, 4, prior)
    model = trace(_Generator(g), inputs, ["z", "y"][: len(inputs)], ["images"])
    if fp16:
        from onnxconverter_common import float16

        model = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(path), save_as_external_data=False)


def check(g: torch.nn.Module, spec: ModelSpec, path: Path, atol: float = PARITY_ATOL) -> float:
    """onnx.checker, the file read back through the contract as `spec`, parity at batch 1, 7, 64 within `atol`;
    the max diff."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path}: ONNX checker failed: {e}") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        written = read_spec(session)
    except ContractError as e:
        raise ExportError(f"{path}: does not honour the contract: {e}") from None
    if written != spec:
        raise ExportError(f"{path}: reads back as {written}, not {spec}")
    worst = 0.0
    for n in PARITY_BATCHES:
        inputs = example_inputs(g, n, spec.prior, seed=n)
        with torch.no_grad():
            expected = g(*inputs).numpy()
        feeds = {name: t.numpy() for name, t in zip(("z", "y"), inputs, strict=False)}
        (got,) = session.run(["images"], feeds)
        if got.shape != expected.shape:
            raise ExportError(f"batch {n}: ONNX output {got.shape} != torch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > atol:
        raise ExportError(f"torch vs ONNX Runtime differ by {worst:.3g} > {atol}")
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


def _write(g: torch.nn.Module, spec: ModelSpec, path: Path, fp16: bool) -> None:
    """The ONNX file, its directions attached, checked."""
    to_onnx(g, spec.prior, path, spec.to_metadata(), fp16)
    try:
        spec = directions.attach(path, spec)
    except directions.DirectionsError as e:
        raise ExportError(str(e)) from None
    check(g, spec, path, FP16_ATOL if fp16 else PARITY_ATOL)


def export(
    checkpoint: Path, repository: Path | str | None, name: str, use_ema: bool = True, fp16: bool = False
) -> Path | str:
    """Export, check, then publish as the next version; a failed check publishes nothing. Returns the published
    model.onnx: a path, or an s3:// URL.

    `repository` None: default_repository() of the checkpoint's config.
    """
    checkpoint = Path(checkpoint)
    ck = load_checkpoint(checkpoint)
    g = generator_from_checkpoint(ck, use_ema)
    spec = model_spec(ck, g, checkpoint, use_ema, fp16)
    if str(repository).startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="export-") as staging:
            path = Path(staging) / "model.onnx"
            _write(g, spec, path, fp16)
            return objectstore.publish(str(repository), name, path)
    root = Path(repository or default_repository(TrainConfig.from_dict(ck["config"]))) / name
    root.mkdir(parents=True, exist_ok=True)
    # Stage beside the versions (same filesystem), so that publishing is one atomic rename.
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the published version must be readable by the server
    try:
        _write(g, spec, staging / "model.onnx", fp16)
        return publish(staging, root) / "model.onnx"
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful publish


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--repository",
                   help="model repository: a directory, or s3://BUCKET/PREFIX with the AWS_* variables (default:"
                        " models/ for images; for 2-D points, which the service does not serve,"
                        " the run's OUT/models)")  # fmt: skip
    p.add_argument("--name", required=True, help="model name: <repository>/<name>/<version>/model.onnx")
    p.add_argument("--raw", action="store_true", help="export the raw generator, not its EMA")
    p.add_argument(
        "--fp16",
        action="store_true",
        help=f"float16 weights and arithmetic, float32 input and output (parity within {FP16_ATOL})",
    )
    args = p.parse_args(argv)
    try:
        path = export(args.checkpoint, args.repository, args.name, use_ema=not args.raw, fp16=args.fp16)
    except (ExportError, CheckpointError, ContractError, ConfigError, RepositoryError, StoreUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
