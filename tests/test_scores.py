"""Known-answer tests for the metric math."""

import numpy as np
import pytest

from training import scores


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_fid_of_a_set_with_itself_is_zero(rng):
    x = rng.standard_normal((500, 16))
    assert scores.fid(x, x) == pytest.approx(0, abs=1e-8)


def test_fid_of_gaussians_differing_in_mean_is_the_squared_mean_gap():
    mu = np.array([3.0, -1.0, 0.5])
    c = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
    assert scores.frechet(np.zeros(3), c, mu, c) == pytest.approx(np.sum(mu**2))


def test_fid_closed_form_for_commuting_covariances():
    # Diagonal covariances: Tr(C1 + C2 - 2√(C1C2)) = Σ (√a - √b)².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert scores.frechet(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(2.0)


def test_fid_of_samples_matches_the_mean_shift(rng):
    x = rng.standard_normal((20000, 4))
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    assert scores.fid(x, x + shift) == pytest.approx(5.0, abs=1e-6)


def test_fid_ignores_dead_features_and_singular_covariances(rng):
    # A ReLU feature that never fires is a zero column: FID equals FID without it, also with fewer rows than columns.
    for n in (500, 10):
        a, b = rng.standard_normal((n, 16)), rng.standard_normal((n, 16)) + 0.3
        pad = lambda x: np.concatenate([x, np.zeros((len(x), 4))], 1)  # noqa: E731
        assert scores.fid(pad(a), pad(b)) == pytest.approx(scores.fid(a, b), rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two(rng):
    a, b = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
    same = scores.kid(a, b, rng)
    different = scores.kid(a, b + 0.5, rng)
    assert abs(same.value) < 3 * same.se
    assert different.value > 0.1 and different.value > 10 * different.se


def test_kid_is_unbiased_so_it_can_go_negative_and_its_se_matches_its_spread(rng):
    runs = [scores.kid(rng.standard_normal((60, 4)), rng.standard_normal((200, 4)), rng) for _ in range(60)]
    values = np.array([r.value for r in runs])
    assert values.min() < 0 < values.max()
    assert abs(values.mean()) < 3 * values.std() / np.sqrt(len(values))  # unbiased, with unequal set sizes
    # The jackknife standard error is the spread of the estimate over independent sets, within sampling error.
    assert 0.6 < np.mean([r.se for r in runs]) / values.std() < 1.6


def test_kid_matches_the_plain_unbiased_estimator(rng):
    a, b = rng.standard_normal((30, 3)), rng.standard_normal((40, 3)) + 0.2
    k = lambda x, y: (x @ y.T / 3 + 1) ** 3  # noqa: E731
    kaa, kbb = k(a, a), k(b, b)
    expected = (kaa.sum() - np.trace(kaa)) / (30 * 29) + (kbb.sum() - np.trace(kbb)) / (40 * 39) - 2 * k(a, b).mean()
    assert scores.kid(a, b, rng).value == pytest.approx(expected)


def test_fid_ns_spans_a_fifth_to_all():
    assert scores.fid_ns(500) == (100, 157, 214, 271, 329, 386, 443, 500)
    assert scores.fid_ns(10)[0] == 2 and scores.fid_ns(10)[-1] == 10


def test_fid_infinity_removes_the_small_sample_bias(rng):
    # Two Gaussians 1.5 apart in mean: true FID 2.25, but at n = 100 in 16-d FID is well above that.
    shift = np.zeros(16)
    shift[0] = 1.5
    a, b = rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16)) + shift
    r = scores.fid_infinity(a, b, rng, ns=(100, 200, 400, 800, 2000), boot=5)
    assert r.fids[0] > 1.5 * 2.25  # the bias that a ratio between different n would hide
    assert r.value == pytest.approx(2.25, abs=max(3 * r.se, 0.1))
    assert r.slope > 0 and 0 < r.se < 1
    same = scores.fid_infinity(a, rng.standard_normal((2000, 16)), rng, ns=(100, 200, 400, 800, 2000), boot=5)
    assert abs(same.value) < max(3 * same.se, 0.1)


def test_bootstrap_ci_covers_the_mean_and_strata_keep_their_sizes(rng):
    values = (rng.random(2000) < 0.9).astype(float)
    lo, hi = scores.bootstrap_ci(values, rng)
    assert lo < values.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.9 * 0.1 / 2000), rel=0.2)
    # Two strata, each all-or-nothing: resampling within them cannot move the mean at all.
    strata = np.repeat([0, 1], 1000)
    assert scores.bootstrap_ci(np.repeat([0.0, 1.0], 1000), rng, strata=strata) == (0.5, 0.5)


def test_per_point_precision_recall_average_to_the_set_scores(rng):
    real, fake = rng.standard_normal((200, 3)), rng.standard_normal((200, 3)) * 1.3
    p, r = scores.precision_recall_points(real, fake, rng)
    assert (p.mean(), r.mean()) == pytest.approx(scores.precision_recall(real, fake))
    # More fakes: precision over all of them, recall averaged over disjoint manifolds of 200.
    p, r = scores.precision_recall_points(real, rng.standard_normal((1000, 3)), rng)
    assert p.shape == (1000,) and r.shape == (200,)
    assert set(np.unique(r * 5)) <= set(range(6))  # each point is in 0..5 of the 5 fake manifolds


def test_nearest_finds_the_closest_row():
    base = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    d, i = scores.nearest(np.array([[3.0, 3.0], [9.0, 0.0], [0.0, 0.0]]), base, chunk=2)
    assert i.tolist() == [1, 2, 0]
    assert d == pytest.approx([1.0, 1.0, 0.0])


def test_inception_score_bounds():
    confident_uniform = np.eye(10)[np.arange(1000) % 10]
    assert scores.inception_score(confident_uniform) == pytest.approx(10, rel=1e-6)
    assert scores.inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)
    one_class = np.eye(10)[np.zeros(100, int)]
    assert scores.inception_score(one_class) == pytest.approx(1.0)


def test_precision_recall_on_constructed_sets(rng):
    real = rng.standard_normal((400, 2))
    assert scores.precision_recall(real, real) == (1.0, 1.0)
    # Fakes collapsed onto one real point: all precise, hardly any recall.
    collapsed = np.repeat(real[:1], 400, 0) + 1e-6 * rng.standard_normal((400, 2))
    p, r = scores.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.05
    # Fakes far away: neither.
    assert scores.precision_recall(real, real + 100) == (0.0, 0.0)


def test_knn_radius_excludes_the_point_itself():
    x = np.array([[0.0], [1.0], [3.0], [6.0]])
    assert scores._knn_radii(x, 1).tolist() == [1.0, 1.0, 4.0, 9.0]


def test_parzen_one_sample_matches_the_gaussian_density():
    s, x, sigma = np.array([[0.0, 0.0, 0.0]]), np.array([[1.0, 2.0, 2.0]]), 0.5
    expected = -9 / (2 * sigma**2) - 3 * np.log(sigma * np.sqrt(2 * np.pi))
    assert scores.parzen_log_likelihood(s, x, sigma)[0] == pytest.approx(expected)


def test_parzen_is_a_mean_of_kernels():
    s, x, sigma = np.array([[0.0], [2.0]]), np.array([[1.0]]), 1.0
    # Both kernels at distance 1: the mixture equals one kernel's density.
    assert scores.parzen_log_likelihood(s, x, sigma)[0] == pytest.approx(-0.5 - np.log(np.sqrt(2 * np.pi)))


def test_parzen_protocol_picks_the_true_sigma(rng):
    sigma = 0.3
    centres = rng.uniform(0, 1, (1, 5))
    draw = lambda n: centres + sigma * rng.standard_normal((n, 5))  # noqa: E731
    result = scores.parzen(np.repeat(centres, 2000, 0), draw(500), draw(400), sigmas=[0.1, 0.3, 1.0])
    assert result.sigma == 0.3
    assert result.stderr > 0
    exact = -5 / 2 - 5 * np.log(sigma * np.sqrt(2 * np.pi))  # E[log N(x)] for the true density
    assert result.mean == pytest.approx(exact, abs=4 * result.stderr)


def test_mode_coverage_on_constructed_points():
    means = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    std = 0.01
    points = np.array([[0.0, 0.0], [0.02, 0.0], [1.0, 0.029], [0.5, 0.5], [1.0, 0.05]])
    cov = scores.mode_coverage(points, means, std)
    assert cov.modes == 2  # (0.5, 0.5) and (1, 0.05) are not high quality
    assert cov.high_quality == pytest.approx(3 / 5)
    assert cov.reverse_kl == pytest.approx((2 / 3) * np.log(8 / 3) + (1 / 3) * np.log(4 / 3))


def test_mode_coverage_of_a_perfect_sampler_is_full(rng):
    means = rng.uniform(-4, 4, (8, 2))
    points = means[np.arange(2500) % 8] + 0.01 * rng.standard_normal((2500, 2))
    cov = scores.mode_coverage(points, means, 0.01)
    assert cov.modes == 8
    assert cov.high_quality > 0.98
    assert cov.reverse_kl < 1e-3
