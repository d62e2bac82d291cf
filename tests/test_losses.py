import math

import pytest
import torch

from training import losses


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_value_at_the_optimum_is_minus_log_4():
    # D ≡ ½ everywhere (logit 0): V = log ½ + log ½ = −log 4 (Goodfellow et al. 2014, Theorem 1).
    zeros = torch.zeros(5, dtype=torch.float64)
    assert losses.value(zeros, zeros).item() == pytest.approx(-math.log(4))
    assert losses.bce_d(zeros, zeros).item() == pytest.approx(math.log(2))


def test_value_by_hand():
    # D(x) = 0.9 on reals, D(G(z)) = 0.2 on fakes: V = log 0.9 + log 0.8.
    v = losses.value(t(logit(0.9)), t(logit(0.2)))
    assert v.item() == pytest.approx(math.log(0.9) + math.log(0.8))


def test_generator_losses_by_hand():
    fake = t(logit(0.2), logit(0.6))
    # minimax: E log(1 − D(G(z)));  non-saturating: −E log D(G(z))
    assert losses.minimax_g(fake).item() == pytest.approx((math.log(0.8) + math.log(0.4)) / 2)
    assert losses.nonsat_g(fake).item() == pytest.approx(-(math.log(0.2) + math.log(0.6)) / 2)


def test_non_saturating_gradient_does_not_vanish_where_minimax_does():
    # Early in training D confidently rejects fakes; the saturating loss then gives almost no gradient.
    fake = torch.tensor([logit(1e-4)], requires_grad=True)
    (g_minimax,) = torch.autograd.grad(losses.minimax_g(fake), fake)
    (g_nonsat,) = torch.autograd.grad(losses.nonsat_g(fake), fake)
    assert abs(g_minimax.item()) < 1e-3
    assert abs(g_nonsat.item()) > 0.99


def test_lsgan_by_hand():
    assert losses.lsgan_d(t(1.0, 0.5), t(0.0, 1.0)).item() == pytest.approx(0.5 * (0.125 + 0.5))
    assert losses.lsgan_g(t(0.0, 1.0)).item() == pytest.approx(0.25)


def test_hinge_by_hand():
    # relu(1 − r): (0, 0.5) → 0.25;  relu(1 + f): (0, 1.5) → 0.75
    assert losses.hinge_d(t(2.0, 0.5), t(-3.0, 0.5)).item() == pytest.approx(1.0)
    assert losses.wasserstein_g(t(-1.0, 3.0)).item() == pytest.approx(-1.0)


def test_wasserstein_by_hand():
    assert losses.wasserstein_d(t(1.0, 3.0), t(0.0, -1.0)).item() == pytest.approx(-2.5)


def test_gradient_penalty_by_hand():
    # A linear critic x·w has gradient w everywhere: the penalty is (‖w‖ − 1)².
    w = torch.tensor([3.0, 4.0])
    real, fake = torch.randn(8, 2), torch.randn(8, 2)
    gp = losses.gradient_penalty(lambda x, y: x @ w, real, fake, None)
    assert gp.item() == pytest.approx((5.0 - 1.0) ** 2)
    # A critic with unit gradient norm is not penalised.
    assert losses.gradient_penalty(lambda x, y: x @ (w / 5), real, fake, None).item() == pytest.approx(0.0)


def test_every_configured_loss_is_registered():
    from training.config import LOSSES as NAMES

    assert set(losses.LOSSES) == set(NAMES)
    assert losses.LOSSES["wgan-gp"].penalty
