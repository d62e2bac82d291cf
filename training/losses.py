"""GAN objectives as pure functions of discriminator scores (logits for the BCE family).

Each loss gives the discriminator's and the generator's loss to *minimise*. Scores are unnormalised:
for minimax / nonsat, D(x) = sigmoid(score); for LSGAN, WGAN-GP and hinge the score is used as is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def value(real: Tensor, fake: Tensor) -> Tensor:
    """The paper's V(D, G) = E[log D(x)] + E[log(1 − D(G(z)))]; equals −log 4 when D ≡ ½."""
    return -F.softplus(-real).mean() - F.softplus(fake).mean()


def bce_d(real: Tensor, fake: Tensor) -> Tensor:
    """½(BCE(D(x), 1) + BCE(D(G(z)), 0)) = −½V, as in the paper's released code."""
    return -0.5 * value(real, fake)


def minimax_g(fake: Tensor) -> Tensor:
    """Saturating: minimise E[log(1 − D(G(z)))]."""
    return -F.softplus(fake).mean()


def nonsat_g(fake: Tensor) -> Tensor:
    """Non-saturating: minimise −E[log D(G(z))] = BCE(D(G(z)), 1)."""
    return F.softplus(-fake).mean()


def lsgan_d(real: Tensor, fake: Tensor) -> Tensor:
    """½E[(D(x) − 1)²] + ½E[D(G(z))²] (targets 1 real, 0 fake)."""
    return 0.5 * ((real - 1).pow(2).mean() + fake.pow(2).mean())


def lsgan_g(fake: Tensor) -> Tensor:
    return 0.5 * (fake - 1).pow(2).mean()


def wasserstein_d(real: Tensor, fake: Tensor) -> Tensor:
    """E[D(G(z))] − E[D(x)]; the gradient penalty is added separately."""
    return fake.mean() - real.mean()


def wasserstein_g(fake: Tensor) -> Tensor:
    return -fake.mean()


def hinge_d(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def gradient_penalty(
    critic: Callable[[Tensor, Tensor | None], Tensor],
    real: Tensor,
    fake: Tensor,
    y: Tensor | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(‖∇D(x̂)‖₂ − 1)²] at random interpolates x̂ of real and fake."""
    # Drawn where `generator` lives (the CPU in training), then moved to the samples' device.
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator, dtype=real.dtype).to(real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat, y).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


@dataclass(frozen=True)
class Loss:
    d: Callable[[Tensor, Tensor], Tensor]
    g: Callable[[Tensor], Tensor]
    probabilities: bool  # scores are logits of D(x) = P(real); reported through a sigmoid
    penalty: bool = False  # add the gradient penalty to the D loss


LOSSES: dict[str, Loss] = {
    "minimax": Loss(bce_d, minimax_g, probabilities=True),
    "nonsat": Loss(bce_d, nonsat_g, probabilities=True),
    "lsgan": Loss(lsgan_d, lsgan_g, probabilities=False),
    "wgan-gp": Loss(wasserstein_d, wasserstein_g, probabilities=False, penalty=True),
    "hinge": Loss(hinge_d, wasserstein_g, probabilities=False),
}
