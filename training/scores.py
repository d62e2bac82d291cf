"""Metric math, pure numpy: FID (and FID∞), KID with its standard error, classifier Inception Score,
precision/recall, bootstrap intervals, nearest neighbours, Parzen, 2-D mode coverage.

Protocols and constants follow gan-facts.md (the papers they cite). Inputs are feature matrices [n, d]
(or points [n, 2], pixels [n, 784]); nothing here knows about models or files.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PARZEN_SIGMAS = np.logspace(-1, 0, 10)  # Goodfellow et al. 2014, parzen_ll.py
KNN_K = 3  # Kynkäänniemi et al. 2019
HQ_STDS = 3.0  # VEEGAN / PacGAN: high-quality if within 3 std of the nearest mode
FID_POINTS, FID_LOW, FID_DRAWS = 8, 0.2, 10  # FID∞: 8 sizes from n/5 to n, 10 random draws at each
FID_BOOT = 10  # bootstrap copies of both sets for FID∞'s standard error
BOOTSTRAP = 1000  # resamples for percentile confidence intervals


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    """‖μ1−μ2‖² + Tr(C1 + C2 − 2(C1C2)^½) for Gaussians.

    With C1 = L1L1ᵀ and C2 = L2L2ᵀ (Cholesky), Tr((C1C2)^½) is the sum of the singular values of L1ᵀL2: exact,
    stable and cheap. Both covariances get the same tiny ridge (1e-10 of their mean variance) so that
    singular ones (dead ReLU features, fewer samples than dimensions) factor too; it changes FID by less
    than 1e-4 relative and leaves FID(x, x) = 0.
    """
    eps = 1e-10 * max(np.trace(c1), np.trace(c2), 1e-300) / len(c1)
    ridge = eps * np.eye(len(c1))
    try:
        cross = np.linalg.svd(np.linalg.cholesky(c1 + ridge).T @ np.linalg.cholesky(c2 + ridge), compute_uv=False)
        cross = cross.sum()
    except np.linalg.LinAlgError:  # not positive definite even so (e.g. NaN): the eigendecomposition route
        w, v = np.linalg.eigh(c1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ c2 @ root1), 0, None)).sum() - len(c1) * eps
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) + 2 * len(c1) * eps - 2 * cross)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    return frechet(*_stats(a), *_stats(b))


def fid_ns(n_max: int, points: int = FID_POINTS, low: float = FID_LOW) -> tuple[int, ...]:
    """The sample sizes of an FID∞ fit: `points` values evenly spaced from low·n_max to n_max."""
    return tuple(sorted({round(float(v)) for v in np.linspace(max(2, low * n_max), n_max, points)}))


def fid_curve(a: np.ndarray, b: np.ndarray, ns, rng: np.random.Generator, draws: int = FID_DRAWS):
    """FID between n random rows of a and n random rows of b (equal n on both sides), for each n in ns:
    the mean over `draws` draws and that mean's variance, each [len(ns)]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    pick = lambda x, n: x[rng.choice(len(x), n, replace=False)]  # noqa: E731
    v = np.array([[fid(pick(a, n), pick(b, n)) for _ in range(draws)] for n in ns])
    return v.mean(1), v.var(1, ddof=1) / draws if draws > 1 else np.ones(len(ns))


class FidInfinity(NamedTuple):
    value: float  # FID extrapolated to 1/n = 0
    se: float  # its standard error: the draws, and the finite sets themselves (bootstrap)
    slope: float  # the fit: FID(n) ≈ value + slope / n
    ns: tuple[int, ...]  # per side
    fids: tuple[float, ...]  # mean FID at each n


def _fit(ns, fids: np.ndarray, var: np.ndarray) -> tuple[float, float, float]:
    """Weighted least squares of fids on 1/n (weights 1/var): intercept, slope, the intercept's variance."""
    x = np.stack([np.ones(len(ns)), 1 / np.asarray(ns, np.float64)], 1)
    w = 1 / var
    cov = np.linalg.inv(x.T @ (x * w[:, None]))
    value, slope = cov @ (x.T @ (w * fids))
    return float(value), float(slope), float(cov[0, 0])


def fid_infinity(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, ns=None, draws: int = FID_DRAWS, boot: int = FID_BOOT
) -> FidInfinity:
    """FID∞ (Chong & Forsyth 2020): FID at several n, a straight line in 1/n, its value at 1/n = 0.

    Both sides are drawn at the same n (the reference sets here are small), so the bias of both sides is in
    the fit; ns defaults to fid_ns of the smaller set. The line is fitted by least squares weighted by each
    point's variance over the draws (small-n points are the noisiest).

    Standard error: the spread of the whole procedure over `boot` bootstrap copies of both sets, which covers
    the finite sets themselves (with sets of hundreds, most of the uncertainty). Checked against independent
    sets of mnist5k features: about right for a model against real data, about 2× too large when both sets
    come from one distribution. With boot < 2 it is the draws' part only, from the fit.
    """
    ns = tuple(ns or fid_ns(min(len(a), len(b))))
    if len(ns) < 2 or draws < 2:
        raise ValueError("fid_infinity: needs at least two sample sizes and two draws")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fids, var = fid_curve(a, b, ns, rng, draws)
    # A point without draw noise (both sets whole: its variance is rounding error) gets the least noisy other's.
    noisy = var[var > 1e-9 * var.max()]
    var = np.maximum(var, noisy.min() if len(noisy) else 1.0)
    value, slope, var_draws = _fit(ns, fids, var)
    se = float(np.sqrt(var_draws))
    if boot > 1:
        resample = lambda x: x[rng.integers(0, len(x), len(x))]  # noqa: E731
        reps = [fid_infinity(resample(a), resample(b), rng, ns, draws, boot=0).value for _ in range(boot)]
        se = float(np.std(reps, ddof=1))
    return FidInfinity(value, se, slope, ns, tuple(float(f) for f in fids))


class Estimate(NamedTuple):
    value: float
    se: float  # standard error


def _kernel_block_sums(p, q, gp, gq, blocks: int, same: bool, chunk: int = 1024) -> np.ndarray:
    """Σ k(p_i, q_j) per (block of i, block of j), k(x, y) = (xᵀy/d + 1)³; `same` leaves out i = j."""
    d = p.shape[1]
    hp, hq = np.eye(blocks)[gp], np.eye(blocks)[gq]
    out = np.zeros((blocks, blocks))
    for i in range(0, len(p), chunk):
        t = p[i : i + chunk] @ q.T
        t *= 1 / d
        t += 1
        k = t * t
        k *= t
        if same:
            r = np.arange(len(k))
            k[r, i + r] = 0
        out += hp[i : i + chunk].T @ (k @ hq)
    return out


def kid(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, blocks: int = 20) -> Estimate:
    """Unbiased MMD² with the cubic kernel (xᵀy/d + 1)³ over all pairs of a [m, d] and b [n, d] (m ≠ n allowed).

    Standard error: delete-one-block jackknife, each set split at random into `blocks` disjoint subsets and
    block g of both sets left out together. The estimate is unbiased at every m, n, so real-vs-real is 0 ± SE.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m, n = len(a), len(b)
    if min(m, n) < 4:
        raise ValueError("kid: needs at least 4 samples per set")
    blocks = max(2, min(blocks, m // 2, n // 2))
    ga, gb = rng.permutation(np.arange(m) % blocks), rng.permutation(np.arange(n) % blocks)
    saa = _kernel_block_sums(a, a, ga, ga, blocks, same=True)
    sbb = _kernel_block_sums(b, b, gb, gb, blocks, same=True)
    sab = _kernel_block_sums(a, b, ga, gb, blocks, same=False)
    ma, nb = np.bincount(ga, minlength=blocks), np.bincount(gb, minlength=blocks)

    def mmd2(keep: np.ndarray) -> float:
        i, j = ma[keep].sum(), nb[keep].sum()
        sub = np.ix_(keep, keep)
        return saa[sub].sum() / (i * (i - 1)) + sbb[sub].sum() / (j * (j - 1)) - 2 * sab[sub].sum() / (i * j)

    value = mmd2(np.ones(blocks, bool))
    loo = np.array([mmd2(np.arange(blocks) != g) for g in range(blocks)])
    return Estimate(float(value), float(np.sqrt((blocks - 1) / blocks * np.sum((loo - loo.mean()) ** 2))))


def inception_score(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) from classifier probabilities [n, classes]; between 1 and the class count."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), 1))))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point."""
    d = _sq_dists(x, x)
    return np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Whether each point lies inside some centre's k-NN ball."""
    return np.concatenate(
        [(_sq_dists(points[i : i + chunk], centres) <= radii).any(1) for i in range(0, len(points), chunk)]
    )


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision (fakes inside the real manifold) and recall (reals inside the fake manifold)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    precision = _covered(fake, real, _knn_radii(real, k)).mean()
    recall = _covered(real, fake, _knn_radii(fake, k)).mean()
    return float(precision), float(recall)


def precision_recall_points(
    real: np.ndarray, fake: np.ndarray, rng: np.random.Generator, k: int = KNN_K, manifolds: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Per-point precision and recall: manifolds of m = len(real) points on both sides.

    precision: for every fake, whether it lies in the real manifold (k-NN balls of `real`).
    recall: for every real point, the fraction of fake manifolds (up to `manifolds` disjoint random sets of m
    fakes) it lies in. Their means are improved precision and recall at manifold size m; bootstrap_ci over the
    points gives their intervals (the manifolds held fixed).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = len(real)
    if len(fake) < m:
        raise ValueError(f"precision_recall_points: needs at least {m} fakes for manifolds of {m}")
    precision = _covered(fake, real, _knn_radii(real, k)).astype(np.float64)
    perm = rng.permutation(len(fake))
    sets = [fake[perm[j * m : (j + 1) * m]] for j in range(min(manifolds, len(fake) // m))]
    recall = np.mean([_covered(real, s, _knn_radii(s, k)) for s in sets], axis=0)
    return precision, recall


def bootstrap_ci(
    values: np.ndarray, rng: np.random.Generator, strata: np.ndarray | None = None, resamples: int = BOOTSTRAP,
    level: float = 0.95,
) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean of per-item values; with `strata`, each stratum is resampled
    within itself, keeping its size (e.g. the requested labels of a conditional model)."""
    values = np.asarray(values, np.float64)
    groups = [values] if strata is None else [values[strata == s] for s in np.unique(strata)]
    means = np.zeros(resamples)
    step = max(1, 4_000_000 // len(values))  # resamples per batch: index arrays of a few million entries
    for lo in range(0, resamples, step):
        r = min(step, resamples - lo)
        means[lo : lo + r] = sum(g[rng.integers(0, len(g), (r, len(g)))].sum(1) for g in groups) / len(values)
    tail = 100 * (1 - level) / 2
    lo_q, hi_q = np.percentile(means, [tail, 100 - tail])
    return float(lo_q), float(hi_q)


def nearest(query: np.ndarray, base: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest row of `base`, and that row's index."""
    query, base = np.asarray(query, np.float64), np.asarray(base, np.float64)
    dist, idx = [], []
    for i in range(0, len(query), chunk):
        d = _sq_dists(query[i : i + chunk], base)
        j = d.argmin(1)
        idx.append(j)
        dist.append(np.sqrt(d[np.arange(len(j)), j]))
    return np.concatenate(dist), np.concatenate(idx)


def parzen_log_likelihood(samples: np.ndarray, x: np.ndarray, sigma: float, chunk: int = 256) -> np.ndarray:
    """log p(x) per row of x under an isotropic Gaussian kernel density centred on `samples`."""
    s = np.asarray(samples, np.float64)
    x = np.asarray(x, np.float64)
    out = []
    for i in range(0, len(x), chunk):
        e = -_sq_dists(x[i : i + chunk], s) / (2 * sigma**2)
        peak = e.max(1, keepdims=True)
        out.append(peak[:, 0] + np.log(np.exp(e - peak).mean(1)))
    return np.concatenate(out) - s.shape[1] * np.log(sigma * np.sqrt(2 * np.pi))


class Parzen(NamedTuple):
    mean: float
    stderr: float
    sigma: float


def parzen(samples: np.ndarray, validation: np.ndarray, test: np.ndarray, sigmas=PARZEN_SIGMAS) -> Parzen:
    """The paper's protocol: σ maximising mean log-likelihood on validation, then mean ± std/√N on test."""
    sigma = max(sigmas, key=lambda s: parzen_log_likelihood(samples, validation, s).mean())
    ll = parzen_log_likelihood(samples, test, sigma)
    return Parzen(float(ll.mean()), float(ll.std() / np.sqrt(len(ll))), float(sigma))


class Coverage(NamedTuple):
    modes: int  # modes that are the nearest mode of at least one high-quality sample
    high_quality: float  # fraction of samples within HQ_STDS std of their nearest mode
    reverse_kl: float  # KL(generated mode histogram ‖ uniform), over high-quality samples


def mode_coverage(points: np.ndarray, means: np.ndarray, std: float) -> Coverage:
    """The VEEGAN/PacGAN protocol for 2-D mixtures of equally weighted Gaussians."""
    d = np.sqrt(_sq_dists(np.asarray(points, np.float64), np.asarray(means, np.float64)))
    nearest = d.argmin(1)
    hq = d[np.arange(len(d)), nearest] <= HQ_STDS * std
    counts = np.bincount(nearest[hq], minlength=len(means))
    p = counts[counts > 0] / max(counts.sum(), 1)
    kl = float(np.sum(p * np.log(p * len(means)))) if hq.any() else float("inf")
    return Coverage(int((counts > 0).sum()), float(hq.mean()), kl)
