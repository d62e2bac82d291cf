"""Training configuration: one frozen dataclass, validated once, and the presets as data."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from service.contract import PRIORS

DATASETS = ("mnist5k", "mnist", "fashion-mnist", "cifar10", "folder", "ring8", "grid25")
POINT_DATASETS = ("ring8", "grid25")
ARCHS = ("mlp", "dcgan", "mlp2d")
LOSSES = ("minimax", "nonsat", "lsgan", "wgan-gp", "hinge")
DCGAN_SIZES = (28, 32, 64)


class ConfigError(ValueError):
    """A configuration that cannot be trained; the message names the field."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Saved in every checkpoint and in the exported ONNX."""

    # Data
    dataset: str = "mnist5k"
    data_dir: str = ""  # folder: required; mnist/fashion-mnist/cifar10: where files are read or downloaded
    split: str = "train"  # mnist5k: 450/class train vs 50/class held-out ("test"); folder ignores it
    image_size: int = 28
    channels: int = 1
    conditional: bool = False

    # Networks
    arch: str = "dcgan"
    latent_dim: int = 100
    prior: str = "normal"  # normal: N(0, 1); uniform: U(-√3, √3), unit variance as in the paper
    width: int = 32  # dcgan: base channel count; mlp2d: hidden units; mlp: ignored (paper sizes)
    d_cond: str = "projection"  # how D sees the label: projection | concat
    d_norm: str = "batch"  # dcgan D normalisation: batch | none | spectral (WGAN-GP forbids batch)
    d_mbstd: bool = False  # dcgan D: minibatch standard deviation feature (against mode collapse)
    depth: int = 2  # mlp2d: hidden layers in G and in D
    pack: int = 1  # mlp2d D: samples judged together (PacGAN); the batch must divide into packs
    dropout: bool = True  # mlp D: the paper's input 0.2 / hidden 0.5 dropout

    # Objective and optimisation (Algorithm 1)
    loss: str = "nonsat"
    k: int = 1  # discriminator updates per generator update
    steps: int = 2000  # generator updates (iterations of Algorithm 1)
    batch_size: int = 64
    optimizer: str = "adam"  # adam | sgd (momentum)
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)  # adam
    momentum: tuple[float, float] = (0.5, 0.7)  # sgd: start and final momentum
    momentum_epochs: tuple[float, float] = (1.0, 250.0)  # sgd: linear momentum ramp between these epochs
    lr_decay: float = 1.0  # lr is divided by this after every update (paper: 1.000004)
    lr_floor: float = 1e-6
    gp_weight: float = 10.0  # wgan-gp penalty λ
    # Matching-aware D (Reed et al. 2016, GAN-CLS): this share of D's fake term goes to real images paired with a
    # wrong label, so D must check the label against the image; conditional models only. 0 = off, 0.5 = GAN-CLS.
    d_mismatch: float = 0.0
    instance_noise: float = 0.0  # std of Gaussian noise on every image D sees (Sønderby et al. 2016); 0 = off
    diffaugment: bool = False  # translation + cutout on every image D sees (Zhao et al. 2020); images only
    cutout: bool = True  # diffaugment: also erase a square; off: translation only (the weaker augmentation)
    ema: float = 0.999  # generator EMA decay; 0 disables (export then uses the raw G)

    # Bookkeeping
    seed: int = 0
    sample_every: int = 500
    checkpoint_every: int = 1000
    log_every: int = 50
    out: str = "runs/default"
    preset: str = ""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {msg} (got {getattr(self, name)!r})")

        need(self.dataset in DATASETS, "dataset", f"must be one of {', '.join(DATASETS)}")
        need(self.split in ("train", "test"), "split", "must be train or test")
        need(self.arch in ARCHS, "arch", f"must be one of {', '.join(ARCHS)}")
        need(self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}")
        need(self.prior in PRIORS, "prior", f"must be one of {', '.join(PRIORS)}")
        need(self.optimizer in ("adam", "sgd"), "optimizer", "must be adam or sgd")
        need(self.d_cond in ("projection", "concat"), "d_cond", "must be projection or concat")
        need(self.d_norm in ("batch", "none", "spectral"), "d_norm", "must be batch, none or spectral")
        need(self.channels in (1, 3), "channels", "must be 1 or 3")
        need(self.dataset != "folder" or bool(self.data_dir), "data_dir", "the folder dataset needs --data-dir")
        points = self.dataset in POINT_DATASETS
        need(points == (self.arch == "mlp2d"), "arch", "mlp2d goes with ring8/grid25 and only with them")
        if self.arch == "dcgan":
            need(self.image_size in DCGAN_SIZES, "image_size", f"dcgan supports {DCGAN_SIZES}")
        need(self.image_size >= 8, "image_size", "must be at least 8")
        need(
            not (self.loss == "wgan-gp" and self.arch == "dcgan" and self.d_norm == "batch"),
            "d_norm",
            "WGAN-GP's critic must not use BatchNorm (the penalty is per-sample); use none or spectral",
        )
        for name in ("k", "steps", "batch_size", "latent_dim", "width", "pack", "depth"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("sample_every", "checkpoint_every", "log_every"):
            need(getattr(self, name) >= 0, name, "must be >= 0 (0 disables)")
        need(0.0 <= self.ema < 1.0, "ema", "must be in [0, 1)")
        need(self.lr_g > 0 and self.lr_d > 0, "lr_g", "learning rates must be positive")
        need(self.lr_decay >= 1.0, "lr_decay", "must be >= 1 (1 disables the decay)")
        for name in ("betas", "momentum", "momentum_epochs"):
            need(len(getattr(self, name)) == 2, name, "needs exactly two numbers, e.g. 0.5,0.999")
        need(self.momentum_epochs[1] > self.momentum_epochs[0], "momentum_epochs", "end must follow start")
        need(self.lr_floor > 0, "lr_floor", "must be positive")
        need(self.gp_weight >= 0, "gp_weight", "must be >= 0")
        need(self.instance_noise >= 0, "instance_noise", "must be >= 0")
        need(0 <= self.d_mismatch < 1, "d_mismatch", "must be in [0, 1)")
        need(not self.d_mismatch or self.conditional, "d_mismatch", "pairs images with wrong labels: conditional only")
        need(self.pack == 1 or self.arch == "mlp2d", "pack", "packing is implemented for mlp2d only")
        need(self.batch_size % self.pack == 0, "pack", f"must divide batch_size {self.batch_size}")
        need(not (self.diffaugment and points), "diffaugment", "augments images; 2-D points have none")
        need(not (self.loss == "wgan-gp" and self.d_mbstd), "d_mbstd", "couples samples, which WGAN-GP forbids")

    @property
    def ema_enabled(self) -> bool:
        return self.ema > 0

    def batch_per_rank(self, world_size: int) -> int:
        """Each of `world_size` data-parallel processes trains on an equal share of the global batch_size."""
        if self.batch_size % world_size:
            raise ConfigError(
                f"batch_size: the global batch ({self.batch_size}) must split evenly over the {world_size}"
                f" processes; use a multiple of {world_size}"
            )
        return self.batch_size // world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; tolerates lists for tuple fields (JSON, checkpoints)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Inverse of to_json (the `config` an exported model carries)."""
        try:
            values = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"config: not JSON ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


class Preset(NamedTuple):
    summary: str
    config: TrainConfig


def _preset(name: str, summary: str, **fields: Any) -> tuple[str, Preset]:
    return name, Preset(summary, TrainConfig(preset=name, out=f"runs/{name}", **fields))


# The paper's released MNIST configuration (gan-facts.md, "the authors' mnist.yaml").
_PAPER = dict(
    dataset="mnist5k",
    arch="mlp",
    prior="uniform",
    loss="nonsat",
    k=1,
    batch_size=100,
    optimizer="sgd",
    lr_g=0.1,
    lr_d=0.1,
    momentum=(0.5, 0.7),
    momentum_epochs=(1.0, 250.0),
    lr_decay=1.000004,
    lr_floor=1e-6,
    ema=0.0,
)

# Shared by the 2-D mixture presets.
# Long runs with a slow EMA and a learning rate divided by 1.0001 per update (1/20 after 30,000 updates, 1/150
# after 50,000): the modes are only 0.01-0.05 wide, and high quality (within 3 std) needs G to settle; see README
# "Results".
_POINTS = dict(
    arch="mlp2d", latent_dim=8, batch_size=256, lr_g=1e-3, lr_d=1e-3, ema=0.999, lr_decay=1.0001,
    checkpoint_every=10_000,
)  # fmt: skip

# The shipped conditional DCGAN's networks, losses and optimiser, shared by mnist-cdcgan and mnist-quick.
_CDCGAN = dict(
    conditional=True, d_cond="concat", d_norm="spectral", loss="hinge", lr_g=1e-4, lr_d=4e-4, betas=(0.0, 0.9),
)  # fmt: skip

PRESETS: dict[str, Preset] = dict(
    [
        _preset(
            "paper-mlp",
            "Goodfellow et al. 2014: MLP G, maxout+dropout D, momentum SGD, k=1, on mnist5k",
            steps=50_000,
            sample_every=2500,
            checkpoint_every=5000,
            **_PAPER,
        ),
        _preset(
            "mnist-dcgan",
            "DCGAN (Radford et al.) at 28x28 on mnist5k, Adam 2e-4 β1 0.5, EMA",
            steps=5000,
        ),
        _preset(
            "mnist-cdcgan",
            "conditional DCGAN on mnist5k: conditional-BatchNorm G; spectral-norm D with the label maps concatenated;"
            " hinge loss, TTUR, EMA",
            **_CDCGAN,
            steps=30_000,
            sample_every=5000,
            checkpoint_every=5000,
        ),
        _preset(
            "mnist-quick",
            "a few minutes: mnist-cdcgan's networks with a matching-aware D (GAN-CLS), which learns the labels fast,"
            " stopped early; recognisable digits to see the whole loop, not a model to serve",
            **_CDCGAN,
            d_mismatch=0.5,
            steps=3000,
            sample_every=1000,
            checkpoint_every=1000,
        ),
        _preset(
            "ring8",
            "2-D mixture of 8 Gaussians on a ring (VEEGAN/PacGAN protocol)",
            dataset="ring8",
            width=128,
            steps=50_000,
            sample_every=10_000,
            **_POINTS,
        ),
        _preset(
            "grid25",
            "2-D 5x5 grid of 25 Gaussians (VEEGAN/PacGAN protocol)",
            dataset="grid25",
            width=256,
            depth=4,
            steps=30_000,
            sample_every=10_000,
            **_POINTS,
        ),
        _preset(
            "tiny",
            "a few seconds: small conditional DCGAN on mnist5k, for tests and smoke runs",
            conditional=True,
            width=8,
            latent_dim=16,
            steps=20,
            batch_size=16,
            sample_every=10,
            checkpoint_every=10,
            log_every=5,
        ),
    ]
)
