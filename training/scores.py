"""Metric math, pure numpy: FID, KID, classifier Inception Score, precision/recall, Parzen, 2-D mode coverage.

Protocols and constants follow gan-facts.md (the papers they cite). Inputs are feature matrices [n, d]
(or points [n, 2], pixels [n, 784]); nothing here knows about models or files.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PARZEN_SIGMAS = np.logspace(-1, 0, 10)  # Goodfellow et al. 2014, parzen_ll.py
KNN_K = 3  # Kynkäänniemi et al. 2019
HQ_STDS = 3.0  # VEEGAN / PacGAN: high-quality if within 3 std of the nearest mode


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    """‖μ1−μ2‖² + Tr(C1 + C2 − 2(C1C2)^½) for Gaussians.

    Tr((C1C2)^½) = Σ √λ(√C1 C2 √C1): that matrix is symmetric PSD, so eigh is exact and stable, unlike sqrtm.
    """
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ c2 @ root1), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * cross)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    return frechet(*_stats(a), *_stats(b))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def kid(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, subsets: int = 100, size: int = 1000):
    """Unbiased MMD² with the cubic kernel (xᵀy/d + 1)³, mean and std over random subsets (without replacement)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(size, len(a), len(b))
    if m < 2:
        raise ValueError("kid: needs at least 2 samples per set")
    vals = [
        _mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(vals)), float(np.std(vals))


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
