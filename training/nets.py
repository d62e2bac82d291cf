"""Generators and discriminators, picked from explicit dicts.

Every generator maps (z [N, latent_dim], y [N, num_classes] or None) to samples in `output_range`;
every discriminator maps (x, y) to one unnormalised score per sample [N]. The label y is a float vector
(one-hot or soft), so a served conditional model can interpolate between classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from training.config import TrainConfig
from training.data import DataSpec

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
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGenerator(nn.Module):
    """z → Linear → base×base → [ConvT 4/2/1, BN, ReLU]* → ConvT → Tanh; channels halve per stage.

    A label y gets its own projection to half of the base feature maps (two-branch cDCGAN): concatenated
    to z instead, ten one-hot inputs against a hundred noise inputs are easily ignored.
    """

    output_range = (-1.0, 1.0)

    def __init__(self, latent_dim: int, spec: DataSpec, width: int = 32):
        super().__init__()
        c, size = spec.shape[0], spec.shape[1]
        stages = _STAGES[size]
        self.base, self.ch = size >> stages, width * 2**stages
        self.latent_dim, self.num_classes, self.shape = latent_dim, spec.num_classes, spec.shape
        ch_y = self.ch // 2 if spec.num_classes else 0
        self.project = nn.Linear(latent_dim, (self.ch - ch_y) * self.base**2, bias=False)
        self.project_y = nn.Linear(spec.num_classes, ch_y * self.base**2, bias=False) if ch_y else None
        layers: list[nn.Module] = [nn.BatchNorm2d(self.ch), nn.ReLU()]
        ch = self.ch
        for _ in range(stages - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, c, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project(z)
        if self.project_y is not None:
            h = torch.cat([h, self.project_y(y)], 1)
        return self.body(h.view(-1, self.ch, self.base, self.base))


class DCDiscriminator(nn.Module):
    """[Conv 4/2/1, norm, LeakyReLU 0.2]* down to the base size → Linear; label by projection or concat."""

    def __init__(self, spec: DataSpec, width: int = 32, norm: str = "batch", cond: str = "projection"):
        super().__init__()
        c, size, nc = spec.shape[0], spec.shape[1], spec.num_classes
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
        self.head = sn(nn.Linear(ch_in * base * base, 1))
        self.embed = sn(nn.Linear(nc, ch_in, bias=False)) if nc and not self.concat else None
        _dcgan_init(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.concat:
            x = torch.cat([x, y[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)
        h = self.features(x)
        out = self.head(h.flatten(1)).squeeze(1)
        if self.embed is None:
            return out
        return out + (self.embed(y) * h.sum((2, 3))).sum(1)  # projection (Miyato & Koyama 2018)


# ---------------------------------------------------------------------------------------------------
# Small MLPs for 2-D mixtures


class PointGenerator(nn.Module):
    output_range = None  # unbounded

    def __init__(self, latent_dim: int, spec: DataSpec, width: int = 128):
        super().__init__()
        self.latent_dim, self.num_classes, self.shape = latent_dim, spec.num_classes, spec.shape
        self.net = nn.Sequential(
            nn.Linear(latent_dim + spec.num_classes, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, spec.shape[0]),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z if y is None else torch.cat([z, y], 1))


class PointDiscriminator(nn.Module):
    def __init__(self, spec: DataSpec, width: int = 128, norm: str = "none"):
        super().__init__()
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        self.net = nn.Sequential(
            sn(nn.Linear(spec.shape[0] + spec.num_classes, width)),
            nn.LeakyReLU(0.2),
            sn(nn.Linear(width, width)),
            nn.LeakyReLU(0.2),
            sn(nn.Linear(width, 1)),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x if y is None else torch.cat([x, y], 1)).squeeze(1)


# ---------------------------------------------------------------------------------------------------

GENERATORS = {
    "mlp": lambda cfg, spec, pixel_mean=None: MLPGenerator(cfg.latent_dim, spec, pixel_mean),
    "dcgan": lambda cfg, spec, pixel_mean=None: DCGenerator(cfg.latent_dim, spec, cfg.width),
    "mlp2d": lambda cfg, spec, pixel_mean=None: PointGenerator(cfg.latent_dim, spec, cfg.width),
}
DISCRIMINATORS = {
    "mlp": lambda cfg, spec: MaxoutDiscriminator(spec, cfg.d_cond, cfg.dropout),
    "dcgan": lambda cfg, spec: DCDiscriminator(spec, cfg.width, cfg.d_norm, cfg.d_cond),
    "mlp2d": lambda cfg, spec: PointDiscriminator(spec, cfg.width, "spectral" if cfg.d_norm == "spectral" else "none"),
}


def build_generator(cfg: TrainConfig, spec: DataSpec, pixel_mean: torch.Tensor | None = None) -> nn.Module:
    return GENERATORS[cfg.arch](cfg, spec, pixel_mean)


def build_discriminator(cfg: TrainConfig, spec: DataSpec) -> nn.Module:
    return DISCRIMINATORS[cfg.arch](cfg, spec)
