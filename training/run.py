"""Train a GAN: `python -m training.run --preset NAME [--field value ...] [--resume [CKPT]]`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

from training.config import PRESETS, ConfigError, TrainConfig
from training.data import DataError

_FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.name != "preset"]  # --preset picks it


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<14} {p.summary}" for name, p in PRESETS.items())
    p = argparse.ArgumentParser(
        prog="python -m training.run",
        description="Train a GAN (Algorithm 1 of Goodfellow et al. 2014 and successors); export it to ONNX.",
        epilog=f"presets:\n{presets}\n\nAny config field below overrides the preset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="mnist-cdcgan", choices=sorted(PRESETS), help="base configuration")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="resume from CKPT, or from the newest checkpoint under --out")  # fmt: skip
    p.add_argument("--no-export", action="store_true", help="do not export the final generator to ONNX")
    p.add_argument("--repository",
                   help="model repository for the export, a directory or s3://BUCKET/PREFIX (default: models/,"
                        " which the service serves; for the 2-D presets ring8 and grid25, which it does not serve,"
                        " OUT/models)")  # fmt: skip
    p.add_argument("--name", help="exported model name (default: the preset name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--evaluate", action="store_true",
                   help="score the exported model (python -m training.evaluate) into OUT/evaluation.json")  # fmt: skip
    fields = p.add_argument_group("config fields (default: the preset's value)")
    hints = typing.get_type_hints(TrainConfig)
    for f in _FIELDS:
        hint = hints[f.name]
        if hint is bool:
            fields.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(hint) is tuple:
            fields.add_argument(_flag(f.name), type=_floats, default=None, metavar="A,B")
        else:
            fields.add_argument(_flag(f.name), type=hint, default=None)
    return p


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: v for f in _FIELDS if (v := getattr(args, f.name)) is not None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here so that --help is instant (torch takes seconds to import).
    from training.dist import process_group

    with process_group() as dist:  # under torchrun: one replica per process; rank 0 reports and exports
        return _train(args, dist.is_main)


def _train(args: argparse.Namespace, main: bool) -> int:
    from service.contract import ContractError
    from service.objectstore import StoreUnavailable, parse_url
    from service.repository import RepositoryError
    from training import evaluate
    from training.checkpoint import CheckpointError, find_checkpoint
    from training.classifier import ClassifierError
    from training.export import ExportError, export
    from training.loop import Trainer

    # User input that cannot be trained, exported or scored; anything else is a bug and keeps its traceback.
    domain_errors = (
        ConfigError, DataError, CheckpointError, ExportError, ContractError, evaluate.EvaluationError, ClassifierError,
        RepositoryError, StoreUnavailable,
    )  # fmt: skip
    try:
        if args.evaluate and args.no_export:
            raise ConfigError("evaluate: scores the exported ONNX file, so it cannot go with --no-export")
        if str(args.repository).startswith("s3://"):  # a bad URL is said now, not after the training
            parse_url(args.repository)
        changes = overrides(args)
        if args.resume:
            base = TrainConfig.from_dict(PRESETS[args.preset].config.to_dict() | changes)
            ckpt = find_checkpoint(args.resume, Path(base.out))
            trainer = Trainer.resume(ckpt, **changes)
            if main:
                print(f"resumed {ckpt} at step {trainer.step}", file=sys.stderr)
        else:
            trainer = Trainer(PRESETS[args.preset].config.replace(**changes))
        cfg = trainer.cfg
        start = time.perf_counter()
        final = trainer.train(progress=not args.no_progress)
        if not main:
            return 130 if trainer.interrupted else 0
        if trainer.interrupted:
            print(f"stopped at step {trainer.step}; checkpoint {final}; continue with --resume", file=sys.stderr)
            return 130
        print(f"reached step {cfg.steps} in {time.perf_counter() - start:.1f}s; checkpoint {final}")
        print(f"samples: {Path(cfg.out) / 'samples' / 'final.png'}")
        if not args.no_export:
            path = export(final, args.repository, args.name or cfg.preset or Path(cfg.out).name)
            print(f"exported {path}")
            if args.evaluate and str(path).startswith("s3://"):
                print("not evaluated: the export is in the object store; run training.evaluate on a copy")
            elif args.evaluate:
                result = evaluate.evaluate(path)
                (Path(cfg.out) / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
                print(evaluate.table(result))
    except domain_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
