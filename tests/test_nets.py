import math

import pytest
import torch

from training import nets
from training.config import PRESETS, ConfigError, TrainConfig
from training.data import DataSpec

TEN = tuple("0123456789")


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("cond", ["projection", "concat"])
def test_dcgan_shapes_and_ranges(size, channels, cond):
    spec = DataSpec((channels, size, size), TEN)
    g = nets.DCGenerator(16, spec, width=8)
    d = nets.DCDiscriminator(spec, width=8, cond=cond)
    y = torch.softmax(torch.randn(5, 10), 1)  # soft labels are valid input
    x = g(torch.randn(5, 16), y)
    assert x.shape == (5, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert d(x, y).shape == (5,)


def test_dcgan_critic_without_batchnorm_has_no_batch_coupling():
    spec = DataSpec((1, 28, 28))
    d = nets.DCDiscriminator(spec, width=8, norm="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    x = torch.randn(6, 1, 28, 28)
    assert torch.allclose(d(x)[:3], d(x[:3]), atol=1e-6)  # per-sample, as the gradient penalty needs


def test_conditional_generator_output_depends_on_the_label():
    spec = DataSpec((1, 28, 28), TEN)
    g = nets.DCGenerator(8, spec, width=8).eval()
    z = torch.randn(1, 8)
    eye = torch.eye(10)
    assert not torch.allclose(g(z, eye[:1]), g(z, eye[1:2]))


def test_paper_mlp_architecture_and_initialisation():
    spec = DataSpec((1, 28, 28))
    mean = torch.full((784,), 0.13)
    g = nets.MLPGenerator(100, spec, pixel_mean=mean)
    widths = [(m.in_features, m.out_features) for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(100, 1200), (1200, 1200), (1200, 784)]
    assert all(m.weight.abs().max() <= 0.05 for m in g.modules() if isinstance(m, torch.nn.Linear))
    assert torch.allclose(g.net[-2].bias, torch.full((784,), math.log(0.13 / 0.87)))
    x = g(torch.rand(3, 100))
    assert x.shape == (3, 1, 28, 28) and x.min() >= 0 and x.max() <= 1

    d = nets.MaxoutDiscriminator(spec)
    maxouts = [m for m in d.modules() if isinstance(m, nets.Maxout)]
    assert [(m.units, m.pieces) for m in maxouts] == [(240, 5), (240, 5)]
    assert [m.p for m in d.modules() if isinstance(m, torch.nn.Dropout)] == [0.2, 0.5, 0.5]
    assert all(m.weight.abs().max() <= 0.005 for m in d.modules() if isinstance(m, torch.nn.Linear))
    d.eval()
    assert d(x).shape == (3,)


@pytest.mark.parametrize("cond", ["projection", "concat"])
def test_conditional_maxout_discriminator(cond):
    spec = DataSpec((1, 28, 28), TEN)
    d = nets.MaxoutDiscriminator(spec, cond=cond).eval()
    x = torch.rand(4, 1, 28, 28)
    out = d(x, torch.eye(10)[:4])
    assert out.shape == (4,)
    assert not torch.allclose(out, d(x, torch.eye(10)[4:8]))


def test_maxout_takes_the_max_over_pieces():
    m = nets.Maxout(2, units=1, pieces=3)
    with torch.no_grad():
        m.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        m.linear.bias.zero_()
    assert m(torch.tensor([[2.0, 5.0], [-3.0, -4.0]])).tolist() == [[5.0], [7.0]]


def test_point_nets_and_registries():
    spec = DataSpec((2,))
    cfg = TrainConfig(dataset="ring8", arch="mlp2d", latent_dim=4, width=16)
    g, d = nets.build_generator(cfg, spec), nets.build_discriminator(cfg, spec)
    assert g(torch.randn(7, 4)).shape == (7, 2) and d(torch.randn(7, 2)).shape == (7,)
    assert set(nets.GENERATORS) == set(nets.DISCRIMINATORS) == {"mlp", "dcgan", "mlp2d"}


def test_minibatch_std_exposes_collapse():
    h = torch.randn(1, 3, 2, 2).expand(8, -1, -1, -1)  # a collapsed batch: identical samples
    out = nets.minibatch_std(h)
    assert out.shape == (8, 4, 2, 2) and torch.allclose(out[:, 3], torch.full((8, 2, 2), 1e-4), atol=1e-4)
    varied = nets.minibatch_std(torch.randn(6, 3, 2, 2))  # 6 is not a multiple of 4: one group
    assert (varied[:, 3] > 0.3).all() and torch.equal(varied[:, 3], varied[0, 3].expand(6, 2, 2))
    d = nets.DCDiscriminator(DataSpec((1, 28, 28), TEN), width=8, mbstd=True)
    assert d(torch.randn(4, 1, 28, 28), torch.eye(10)[:4]).shape == (4,)


def test_conditional_batchnorm_is_linear_in_the_label():
    """Soft labels interpolate: halfway between two one-hots gives the halfway gain and bias."""
    norm = nets.ConditionalBatchNorm2d(4, 10).eval()
    with torch.no_grad():
        norm.gain.weight.normal_()
        norm.bias.weight.normal_()
    h, eye = torch.randn(2, 4, 3, 3), torch.eye(10)
    a, b = norm(h, eye[[1, 1]]), norm(h, eye[[6, 6]])
    assert not torch.allclose(a, b)
    assert torch.allclose(norm(h, 0.5 * (eye[[1, 1]] + eye[[6, 6]])), 0.5 * (a + b), atol=1e-6)
    assert nets.ConditionalBatchNorm2d(4, 0).bn.affine  # unconditional: a plain affine BatchNorm


def test_packed_point_discriminator_judges_consecutive_samples_together():
    d = nets.PointDiscriminator(DataSpec((2,)), width=16, pack=4)
    x = torch.randn(8, 2)
    scores = d(x)
    assert scores.shape == (2,)
    x2 = x.clone()
    x2[5] += 1  # a sample of the second pack
    changed = d(x2)
    assert changed[0] == scores[0] and changed[1] != scores[1]


def test_pack_must_divide_the_batch_and_is_for_points():
    with pytest.raises(ConfigError, match="pack"):
        PRESETS["grid25"].config.replace(pack=3)
    with pytest.raises(ConfigError, match="pack"):
        PRESETS["tiny"].config.replace(pack=2)
