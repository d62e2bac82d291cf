"""Algorithm 1 of Goodfellow et al. 2014: k discriminator updates, then one generator update.

The Trainer owns G, D, the generator EMA, both optimisers, the schedules, the counters and every RNG,
and can save and restore all of it: N steps + resume + N steps is bit-identical to 2N steps on CPU.

Under torchrun (see training/dist.py) every process holds a full replica and trains on its share of each
global batch with noise of its own; DDP averages the gradients, so the replicas stay bit-identical. Rank 0
alone writes checkpoints, grids and the log; a run is deterministic given its seed and world size.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import data as data_mod
from training import dist, viz
from training.augment import diff_augment
from training.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    load_checkpoint,
    resume_config,
    write_atomically,
    write_checkpoint,
)
from training.config import ConfigError, TrainConfig
from training.data import STREAM_FIXED, STREAM_INIT, STREAM_NOISE, ImageData, PointData, stream_seed
from training.losses import LOSSES, gradient_penalty
from training.nets import build_discriminator, build_generator

GRID_COLS = 10


def sample_z(n: int, dim: int, prior: str, generator: torch.Generator) -> torch.Tensor:
    """The training prior: N(0, 1), or U(−√3, √3) (unit variance, the paper's choice)."""
    if prior == "normal":
        return torch.randn(n, dim, generator=generator)
    return (torch.rand(n, dim, generator=generator) * 2 - 1) * math.sqrt(3.0)


def lr_at(base: float, updates: int, cfg: TrainConfig) -> float:
    """The paper's per-update decay: lr / decay^updates, floored (1.000004 and 1e-6 in mnist.yaml)."""
    if cfg.lr_decay == 1.0:
        return base
    return max(base / cfg.lr_decay**updates, cfg.lr_floor)


def momentum_at(epoch: float, cfg: TrainConfig) -> float:
    """The paper's momentum ramp: linear from momentum[0] to momentum[1] between momentum_epochs."""
    (m0, m1), (e0, e1) = cfg.momentum, cfg.momentum_epochs
    return m0 + (m1 - m0) * min(max((epoch - e0) / (e1 - e0), 0.0), 1.0)


def ema_decay(decay: float, step: int) -> float:
    """The EMA decay after `step` generator updates: `decay`, ramped up from 0.1 over the first steps."""
    return min(decay, (1 + step) / (10 + step))


@contextlib.contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """While active, SIGINT and SIGTERM set the yielded event instead of killing the process.

    Only the main thread can own signal handlers; elsewhere the event simply never fires.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def trim_log(path: Path, step: int) -> None:
    """Drop the records after `step` (and a torn last line): a run resumed at `step` logs those steps again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _logged_step(line) <= step]
    if keep != lines:
        write_atomically(path, lambda tmp: tmp.write_text("".join(keep)))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # written by a process that died mid-line
        return math.inf


class Trainer:
    def __init__(self, cfg: TrainConfig, data: ImageData | PointData | None = None):
        self.cfg = cfg
        self.dist = dist.current()
        self.device = self.dist.device
        self.rank_batch = cfg.batch_per_rank(self.dist.world_size)
        torch.manual_seed(stream_seed(cfg.seed, STREAM_INIT))
        self.data = data if data is not None else self._load_data()
        self.spec = self.data.spec(cfg.conditional)
        pixel_mean = self.data.pixel_mean() if cfg.arch == "mlp" else None
        self.G = build_generator(cfg, self.spec, pixel_mean).to(self.device)
        self.D = build_discriminator(cfg, self.spec).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema_enabled else None
        # What the updates run through: DDP wrappers under torchrun (they average the gradients over the
        # ranks), G and D themselves otherwise. Checkpoints, the EMA and the export use G and D.
        self.G_ddp, self.D_ddp = self.dist.wrap(self.G), self.dist.wrap(self.D)
        if self.dist.rank:  # identical initial weights on every rank; from here on, dropout masks of its own
            torch.manual_seed(stream_seed(cfg.seed, STREAM_INIT, self.dist.rank))
        self.loss = LOSSES[cfg.loss]
        self.opt_g = self._optimizer(self.G, cfg.lr_g)
        self.opt_d = self._optimizer(self.D, cfg.lr_d)
        self.noise = torch.Generator().manual_seed(stream_seed(cfg.seed, STREAM_NOISE, self.dist.rank))
        self.step = 0  # generator updates
        self.d_updates = 0
        self.real_batches = 0
        self.out = Path(cfg.out)
        self.fixed_z, self.fixed_y = self._fixed_inputs()
        self.interrupted = False  # set by train() when a signal ended the run early

    # ---- construction ------------------------------------------------------------------------------

    def _load_data(self) -> ImageData | PointData:
        # Rank 0 first: it alone downloads what is missing, and the other ranks then read its files.
        if not self.dist.is_main:
            self.dist.barrier()
        data = data_mod.load(self.cfg)
        if self.dist.is_main:
            self.dist.barrier()
        return data

    def _optimizer(self, net: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(net.parameters(), lr=lr, momentum=self.cfg.momentum[0])
        return torch.optim.Adam(net.parameters(), lr=lr, betas=self.cfg.betas)

    def _fixed_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Noise for the sample grids: fixed for the run; one row per class when conditional."""
        g = torch.Generator().manual_seed(stream_seed(self.cfg.seed, STREAM_FIXED))
        nc = self.spec.num_classes
        if nc:
            rows = min(nc, 16)
            z = sample_z(GRID_COLS, self.cfg.latent_dim, self.cfg.prior, g).repeat(rows, 1)
            y = F.one_hot(torch.arange(rows).repeat_interleave(GRID_COLS), nc).float()
            return z.to(self.device), y.to(self.device)
        n = 2500 if isinstance(self.data, PointData) else 64
        return sample_z(n, self.cfg.latent_dim, self.cfg.prior, g).to(self.device), None

    @property
    def output_range(self) -> tuple[float, float] | None:
        return self.G.output_range

    @property
    def sampler(self) -> torch.nn.Module:
        """The generator whose samples we show and export: the EMA one when enabled."""
        return self.G_ema if self.G_ema is not None else self.G

    # ---- one iteration of Algorithm 1 --------------------------------------------------------------

    def _labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        return F.one_hot(labels.to(self.device), self.spec.num_classes).float() if self.spec.num_classes else None

    def _z(self, n: int) -> torch.Tensor:
        # Drawn on the CPU from the run's own generator, so the numbers do not depend on the device.
        return sample_z(n, self.cfg.latent_dim, self.cfg.prior, self.noise).to(self.device)

    def _schedule(self, opt: torch.optim.Optimizer, base_lr: float, updates: int) -> None:
        cfg = self.cfg
        for group in opt.param_groups:
            group["lr"] = lr_at(base_lr, updates, cfg)
            if cfg.optimizer == "sgd":
                group["momentum"] = momentum_at(self.real_batches * cfg.batch_size / self.data.size, cfg)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of an image batch: DiffAugment and instance noise, when configured."""
        if self.cfg.diffaugment:
            x = diff_augment(x, self.noise, self.output_range[0], self.cfg.cutout)
        if self.cfg.instance_noise:
            x = x + self.cfg.instance_noise * torch.randn(x.shape, generator=self.noise).to(x.device)
        return x

    def d_step(self) -> dict[str, float]:
        cfg = self.cfg
        rank, world = self.dist.rank, self.dist.world_size
        x, labels = self.data.batch(self.real_batches, cfg.batch_size, cfg.seed, self.output_range, rank, world)
        x = x.to(self.device)
        self.real_batches += 1
        # Fakes carry the real batch's labels, so a conditional D compares like with like.
        y = self._labels(labels)
        with torch.no_grad():
            fake = self.G(self._z(len(x)), y)
        real_s, fake_s = self.D_ddp(self._augment(x), y), self.D_ddp(self._augment(fake), y)
        loss = self.loss.d(real_s, fake_s)
        if cfg.d_mismatch:  # real images with a uniformly drawn other label count as fakes too
            nc = self.spec.num_classes
            wrong = self._labels((labels + torch.randint(1, nc, labels.shape, generator=self.noise)) % nc)
            mismatch_s = self.D_ddp(self._augment(x), wrong)
            loss = (1 - cfg.d_mismatch) * loss + cfg.d_mismatch * self.loss.d(real_s, mismatch_s)
        if self.loss.penalty:
            loss = loss + cfg.gp_weight * gradient_penalty(self.D_ddp, x, fake, y, self.noise)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self._schedule(self.opt_d, cfg.lr_d, self.d_updates)
        self.opt_d.step()
        self.d_updates += 1
        squash = torch.sigmoid if self.loss.probabilities else (lambda s: s)
        return {
            "loss_d": loss.item(),
            "d_real": squash(real_s.detach()).mean().item(),
            "d_fake": squash(fake_s.detach()).mean().item(),
        }

    def g_step(self) -> dict[str, float]:
        cfg, nc = self.cfg, self.spec.num_classes
        z = self._z(self.rank_batch)
        y = self._labels(torch.randint(nc, (self.rank_batch,), generator=self.noise)) if nc else None
        # No D gradients in the G step; D is not updated, so it runs without its DDP wrapper.
        self.D.requires_grad_(False)
        loss = self.loss.g(self.D(self._augment(self.G_ddp(z, y)), y))
        self.D.requires_grad_(True)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self._schedule(self.opt_g, cfg.lr_g, self.step)
        self.opt_g.step()
        self.step += 1
        # Each rank normalised its own share of the batch, so BatchNorm statistics differ between ranks;
        # their mean keeps the replicas, and the EMA built from them, identical.
        self.dist.average_buffers(self.G, self.D)
        if self.G_ema is not None:
            self._update_ema()
        return {"loss_g": loss.item()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Ramp the decay up early on (as StyleGAN does) so short runs are not dominated by the init.
        # BatchNorm statistics are averaged like the weights: copying the raw G's would pair averaged
        # weights with statistics of other weights. Integer buffers (batch counters) are copied.
        beta = ema_decay(self.cfg.ema, self.step)
        for e, r in zip(self.G_ema.state_dict().values(), self.G.state_dict().values(), strict=True):
            if e.is_floating_point():
                e.lerp_(r, 1 - beta)
            else:
                e.copy_(r)

    def iteration(self) -> dict[str, float]:
        """One iteration of Algorithm 1; returns the last D step's and the G step's statistics."""
        for _ in range(self.cfg.k):
            stats = self.d_step()
        return stats | self.g_step()

    # ---- outputs -----------------------------------------------------------------------------------

    @torch.no_grad()
    def save_samples(self, path: Path) -> None:
        g = self.sampler
        was_training = g.training
        g.eval()
        out = g(self.fixed_z, self.fixed_y).cpu().numpy()
        g.train(was_training)
        if isinstance(self.data, PointData):
            viz.save_scatter(out, self.data.means.numpy(), self.data.std, path)
        else:
            viz.save_grid(out, self.output_range, GRID_COLS if self.fixed_y is not None else 8, path)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state(), "noise": self.noise.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> dict[str, Any]:
        """Everything the run's future depends on. Under torchrun a collective: every rank calls it.

        With a process group it also holds every rank's RNG states (`rng_ranks`; `rng` is this rank's) and
        a digest of every rank's replica (`replica_sha256`), and it raises if the replicas differ.
        """
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "spec": {"shape": list(self.spec.shape), "class_names": list(self.spec.class_names)},
            "counters": {"step": self.step, "d_updates": self.d_updates, "real_batches": self.real_batches},
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": self._rng_state(),
            "world_size": self.dist.world_size,
            "torch_version": str(torch.__version__),
        }
        if self.dist.group:
            replica = dist.state_digest(state[k] for k in ("G", "D", "G_ema", "opt_g", "opt_d"))
            ranks = self.dist.gather({"rng": state["rng"], "sha256": replica})
            state["rng_ranks"] = [r["rng"] for r in ranks]
            state["replica_sha256"] = [r["sha256"] for r in ranks]
            if len(set(state["replica_sha256"])) != 1:
                raise RuntimeError(f"step {self.step}: the ranks' replicas differ ({state['replica_sha256']})")
        return state

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        saved = ck.get("world_size", 1)
        if saved != self.dist.world_size:
            raise ConfigError(
                f"world_size: the checkpoint was written by {saved} process(es) and this run has"
                f" {self.dist.world_size}; resume it with {saved} (torchrun --nproc_per_node={saved} on one node),"
                " since every process's noise stream is part of the checkpointed run"
            )
        self.G.load_state_dict(ck["G"])
        self.D.load_state_dict(ck["D"])
        if self.G_ema is not None:
            self.G_ema.load_state_dict(ck["G_ema"])
        self.opt_g.load_state_dict(ck["opt_g"])
        self.opt_d.load_state_dict(ck["opt_d"])
        self.step = ck["counters"]["step"]
        self.d_updates = ck["counters"]["d_updates"]
        self.real_batches = ck["counters"]["real_batches"]
        rng = ck["rng_ranks"][self.dist.rank] if "rng_ranks" in ck else ck["rng"]
        torch.set_rng_state(rng["torch"])
        self.noise.set_state(rng["noise"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint; every rank calls this and gets its path."""
        path = checkpoint_path(self.out, self.step)
        state = self.state_dict()
        if self.dist.is_main:
            write_checkpoint(state, path)
        return path

    @classmethod
    def resume(cls, path: Path, **overrides: Any) -> Trainer:
        """Rebuild a trainer from a checkpoint; `overrides` may only touch RESUMABLE_CHANGES."""
        ck = load_checkpoint(path)
        trainer = cls(resume_config(ck, overrides))
        trainer.load_state_dict(ck)
        return trainer

    # ---- the run -----------------------------------------------------------------------------------

    def _log(self, rec: dict[str, float], iters: int, seconds: float, log: TextIO, bar: tqdm) -> None:
        """One metrics.jsonl record and progress-bar update for the last `iters` iterations."""
        rec["images_per_s"] = iters * self.cfg.k * self.cfg.batch_size / seconds
        rec["s_per_it"] = seconds / iters
        bar.set_postfix(
            D=f"{rec['loss_d']:.3f}",
            G=f"{rec['loss_g']:.3f}",
            Dx=f"{rec['d_real']:.2f}",
            DGz=f"{rec['d_fake']:.2f}",
            img_s=f"{rec['images_per_s']:.0f}",
        )
        log.write(json.dumps({"step": self.step, "lr_d": self.opt_d.param_groups[0]["lr"], **rec}) + "\n")
        log.flush()

    def train(self, progress: bool = True) -> Path:
        """Run until cfg.steps generator updates; returns the last checkpoint's path.

        SIGINT / SIGTERM end the run after the current iteration, with a checkpoint, and set
        `interrupted`: no work is lost, and a resume continues exactly. Under torchrun every rank calls
        this; a signal to any rank stops them all at the same iteration.
        """
        cfg, main = self.cfg, self.dist.is_main
        log = None
        if main:  # the other ranks only train
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            trim_log(self.out / "metrics.jsonl", self.step)
            log = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        show = progress and main
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, unit="it", dynamic_ncols=True)
        sums: dict[str, float] = {}
        t_last, n_last = time.perf_counter(), 0
        last_ckpt = None
        stopped = False
        with stop_requests() as stop:
            try:
                while self.step < cfg.steps:
                    # Agreed by all ranks (a one-integer all_reduce): a rank that stopped alone would leave
                    # the others waiting forever in the next collective.
                    if self.dist.any(stop.is_set()):
                        stopped = True
                        break
                    for key, v in self.iteration().items():
                        sums[key] = sums.get(key, 0.0) + v
                    n_last += 1
                    bar.update(1)
                    at_end = self.step == cfg.steps
                    if (cfg.log_every and self.step % cfg.log_every == 0) or at_end:
                        now = time.perf_counter()
                        rec = self.dist.mean({k: v / n_last for k, v in sums.items()})  # over the global batch
                        if main:
                            self._log(rec, n_last, now - t_last, log, bar)
                        sums, t_last, n_last = {}, now, 0
                    if cfg.sample_every and self.step % cfg.sample_every == 0 and not at_end and main:
                        self.save_samples(self.out / "samples" / f"step_{self.step:07d}.png")
                    if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or at_end:
                        last_ckpt = self.save_checkpoint()
            finally:
                bar.close()
                if log is not None:
                    log.close()
        self.interrupted = stopped
        if last_ckpt != checkpoint_path(self.out, self.step):  # interrupted, or resumed a finished run
            last_ckpt = self.save_checkpoint()
        if main:
            self.save_samples(self.out / "samples" / "final.png")
        self.dist.barrier()  # no rank returns before the checkpoint and the grid exist
        return last_ckpt
