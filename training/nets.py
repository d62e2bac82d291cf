"""Generators and discriminators, picked from explicit dicts.

Every generator maps (z [N, latent_dim], y [N, num_classes] or None) to samples in `output_range`;
every discriminator maps (x, y) to one unnormalised score per sample [N]. The label y is a float vector
(one-hot or soft), so a served conditional model can interpolate between classes.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from training.config import TrainConfig
from training.data import DataSpec


def check_inputs(g: nn.Module, z: torch.Tensor, y: torch.Tensor | None) -> None:
    """Shape check at the generator boundary: z [N, latent_dim], y [N, num_classes] iff conditional."""
    if z.dim() != 2 or z.shape[1] != g.latent_dim:
        raise ValueError(f"z: expected [N, {g.latent_dim}], got {list(z.shape)}")
    if g.num_classes and (y is None or y.shape != (z.shape[0], g.num_classes)):
        raise ValueError(f"y: expected [{z.shape[0]}, {g.num_classes}], got {None if y is None else list(y.shape)}")
    if not g.num_classes and y is not None:
        raise ValueError("y: this generator is unconditional")


# ---------------------------------------------------------------------------------------------------
# The paper's MLP (Goodfellow et al. 2014, released mnist.yaml; see gan-facts.md)


class MLPGenerator(nn.Module):
    """Linear z→1200, ReLU → 1200→1200, ReLU → 1200→C·H·W, Sigmoid; weights U(±0.05)."""

    output_range = (0.0, 1.0)

    def __init__(self, latent_dim: int, spec: DataSpec, pixel_mean: torch.Tensor | None = None, hidden=1200):
        super().__init__()
        self.latent_dim, self.num_classes, self.shape = latent_dim, spec.num_classes, spec.shape
        out = math.prod(spec.shape)
        self.net = nn.Sequential(
            nn.Linear(latent_dim + spec.num_classes, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out),
            nn.Sigmoid(),
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.05, 0.05)
                nn.init.zeros_(m.bias)
        if pixel_mean is not None:  # output bias = logit of the data's pixel marginals
            p = pixel_mean.clamp(1e-3, 1 - 1e-3)
            with torch.no_grad():
                self.net[-2].bias.copy_(torch.log(p / (1 - p)))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(self, z, y)
        h = z if y is None else torch.cat([z, y], 1)
        return self.net(h).view(-1, *self.shape)


class Maxout(nn.Module):
    """Linear to units×pieces, then the max over pieces (Goodfellow et al. 2013)."""

    def __init__(self, d_in: int, units: int, pieces: int):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(d_in, units * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).view(-1, self.units, self.pieces).amax(-1)


class MaxoutDiscriminator(nn.Module):
    """Maxout 240×5 → Maxout 240×5 → Linear; dropout keep-prob 0.8 on input, 0.5 on hidden; U(±0.005)."""

    def __init__(self, spec: DataSpec, cond: str = "concat", dropout=True, units=240, pieces=5):
        super().__init__()
        d_in, nc = math.prod(spec.shape), spec.num_classes
        self.concat = nc > 0 and cond == "concat"
        p_in, p_hidden = (0.2, 0.5) if dropout else (0.0, 0.0)
        self.features = nn.Sequential(
            nn.Dropout(p_in),
            Maxout(d_in + (nc if self.concat else 0), units, pieces),
            nn.Dropout(p_hidden),
            Maxout(units, units, pieces),
            nn.Dropout(p_hidden),
        )
        self.head = nn.Linear(units, 1)
        self.embed = nn.Linear(nc, units, bias=False) if nc and not self.concat else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.005, 0.005)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = x.flatten(1)
        if self.concat:
            h = torch.cat([h, y], 1)
        h = self.features(h)
        out = self.head(h).squeeze(1)
        return out if self.embed is None else out + (self.embed(y) * h).sum(1)


# ---------------------------------------------------------------------------------------------------
# DCGAN (Radford et al. 2015) at 28, 32 and 64 pixels

_STAGES = {28: 2, 32: 3, 64: 4}  # ×2 upsamplings from a 7×7 or 4×4 base


def _dcgan_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose gain and bias are linear in the label y: 1 + W_γ·y and W_β·y (as in BigGAN).

    Being linear in y, it accepts soft labels; unconditional models get a plain affine BatchNorm.
    W_γ and W_β start at N(0, LABEL_INIT_STD), like BigGAN's N(0, 1) class embeddings, not at DCGAN's 0.02:
    Adam moves a weight by about lr per step, so from 0.02 the label took ~5,000 steps to matter
    (label accuracy at step 1,500 on mnist5k: 21 % from 0.02, 68 % from 0.5).
    """

    LABEL_INIT_STD = 0.5

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=not num_classes)
        self.gain = nn.Linear(num_classes, channels, bias=False) if num_classes else None
        self.bias = nn.Linear(num_classes, channels, bias=False) if num_classes else None

    def forward(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.bn(h)
        if self.gain is None:
            return h
        return h * (1 + self.gain(y)[:, :, None, None]) + self.bias(y)[:, :, None, None]


class DCGenerator(nn.Module):
    """z → Linear → base×base → [BN, ReLU, ConvT 4/2/1]* → Tanh; channels halve per stage.

    The label enters through conditional BatchNorm at every stage. Concatenated to z instead, ten
    one-hot inputs against a hundred noise inputs are easily ignored; given its own feature maps, the
    label wins and the generator ignores z (both measured on mnist5k).
    """

    output_range = (-1.0, 1.0)

    def __init__(self, latent_dim: int, spec: DataSpec, width: int = 32):
        super().__init__()
        c, size, nc = spec.shape[0], spec.shape[1], spec.num_classes
        stages = _STAGES[size]
        self.base, self.ch = size >> stages, width * 2**stages
        self.latent_dim, self.num_classes, self.shape = latent_dim, nc, spec.shape
        self.project = nn.Linear(latent_dim, self.ch * self.base**2, bias=False)
        chans = [self.ch // 2**i for i in range(stages)]  # input channels of each upsampling
        self.norms = nn.ModuleList(ConditionalBatchNorm2d(ch, nc) for ch in chans)
        outs = [*chans[1:], c]
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(i, o, 4, 2, 1, bias=k == stages - 1)
            for k, (i, o) in enumerate(zip(chans, outs, strict=True))
        )
        _dcgan_init(self)
        for norm in self.norms if nc else ():
            for embed in (norm.gain, norm.bias):
                nn.init.normal_(embed.weight, 0.0, ConditionalBatchNorm2d.LABEL_INIT_STD)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(self, z, y)
        h = self.project(z).view(-1, self.ch, self.base, self.base)
        for norm, up in zip(self.norms, self.ups, strict=True):
            h = up(torch.relu(norm(h, y)))
        return torch.tanh(h)


def minibatch_std(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append one feature map: the features' std across a group of samples (Karras et al. 2018).

    A collapsed generator yields near-identical samples, which this statistic exposes to D.
    """
    n, c, hh, ww = h.shape
    g = group if n % group == 0 else n
    std = h.view(g, -1, c, hh, ww).var(0, unbiased=False).add(1e-8).sqrt().mean((1, 2, 3))  # [n / g]
    return torch.cat([h, std.repeat(g).view(n, 1, 1, 1).expand(n, 1, hh, ww)], 1)


class DCDiscriminator(nn.Module):
    """[Conv 4/2/1, norm, LeakyReLU 0.2]* down to the base size → Linear; label by projection or concat."""

    def __init__(
        self,
        spec: DataSpec,
        width: int = 32,
        norm: str = "batch",
        cond: str = "projection",
        mbstd: bool = False,
    ):
        super().__init__()
        c, size, nc = spec.shape[0], spec.shape[1], spec.num_classes
        self.mbstd = mbstd
        stages = _STAGES[size]
        self.concat = nc > 0 and cond == "concat"
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        layers: list[nn.Module] = []
        ch_in, ch = c + (nc if self.concat else 0), width
        for i in range(stages):
            layers.append(sn(nn.Conv2d(ch_in, ch, 4, 2, 1, bias=norm != "batch" or i == 0)))
            if norm == "batch" and i > 0:  # DCGAN: no BatchNorm on D's input layer
                layers.append(nn.BatchNorm2d(ch))
            layers.append(nn.LeakyReLU(0.2))
            ch_in, ch = ch, ch * 2
        self.features = nn.Sequential(*layers)
        base = size >> stages
        self.head = sn(nn.Linear((ch_in + mbstd) * base * base, 1))
        self.embed = sn(nn.Linear(nc, ch_in, bias=False)) if nc and not self.concat else None
        _dcgan_init(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.concat:
            x = torch.cat([x, y[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)
        h = self.features(x)
        out = self.head((minibatch_std(h) if self.mbstd else h).flatten(1)).squeeze(1)
        if self.embed is None:
            return out
        return out + (self.embed(y) * h.sum((2, 3))).sum(1)  # projection (Miyato & Koyama 2018)


# ---------------------------------------------------------------------------------------------------
# Small MLPs for 2-D mixtures


def _mlp(n_in: int, width: int, depth: int, n_out: int, act, spectral: bool = False) -> nn.Sequential:
    """`depth` hidden layers of `width` units."""
    sn = spectral_norm if spectral else (lambda m: m)
    sizes = [n_in] + [width] * depth
    layers = [m for a, b in itertools.pairwise(sizes) for m in (sn(nn.Linear(a, b)), act())]
    return nn.Sequential(*layers, sn(nn.Linear(width, n_out)))


class PointGenerator(nn.Module):
    output_range = None  # unbounded

    def __init__(self, latent_dim: int, spec: DataSpec, width: int = 128, depth: int = 2):
        super().__init__()
        self.latent_dim, self.num_classes, self.shape = latent_dim, spec.num_classes, spec.shape
        self.net = _mlp(latent_dim + spec.num_classes, width, depth, spec.shape[0], nn.ReLU)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(self, z, y)
        return self.net(z if y is None else torch.cat([z, y], 1))


class PointDiscriminator(nn.Module):
    """An MLP on points; with `pack` > 1 it judges `pack` samples at once (PacGAN, Lin et al. 2018)."""

    def __init__(self, spec: DataSpec, width: int = 128, norm: str = "none", pack: int = 1, depth: int = 2):
        super().__init__()
        self.pack = pack
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.net = _mlp((spec.shape[0] + spec.num_classes) * pack, width, depth, 1, act, norm == "spectral")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B / pack]: consecutive samples form a pack."""
        h = x if y is None else torch.cat([x, y], 1)
        return self.net(h.reshape(len(h) // self.pack, -1)).squeeze(1)


# ---------------------------------------------------------------------------------------------------

GENERATORS = {
    "mlp": lambda cfg, spec, pixel_mean=None: MLPGenerator(cfg.latent_dim, spec, pixel_mean),
    "dcgan": lambda cfg, spec, pixel_mean=None: DCGenerator(cfg.latent_dim, spec, cfg.width),
    "mlp2d": lambda cfg, spec, pixel_mean=None: PointGenerator(cfg.latent_dim, spec, cfg.width, cfg.depth),
}
DISCRIMINATORS = {
    "mlp": lambda cfg, spec: MaxoutDiscriminator(spec, cfg.d_cond, cfg.dropout),
    "dcgan": lambda cfg, spec: DCDiscriminator(spec, cfg.width, cfg.d_norm, cfg.d_cond, cfg.d_mbstd),
    "mlp2d": lambda cfg, spec: PointDiscriminator(
        spec, cfg.width, "spectral" if cfg.d_norm == "spectral" else "none", cfg.pack, cfg.depth
    ),
}


def build_generator(cfg: TrainConfig, spec: DataSpec, pixel_mean: torch.Tensor | None = None) -> nn.Module:
    return GENERATORS[cfg.arch](cfg, spec, pixel_mean)


def build_discriminator(cfg: TrainConfig, spec: DataSpec) -> nn.Module:
    return DISCRIMINATORS[cfg.arch](cfg, spec)
