"""The evaluation protocol on one feature extractor's outputs, pure numpy: which sets are compared, at which n.

Every score is a model value beside a real-vs-real floor computed the same way, at the same n:
  - KID, unbiased (so comparable across set sizes), with a jackknife standard error;
  - FID∞ (Chong & Forsyth 2020) and FID at equal n on both sides: FID's bias grows as n shrinks, so a ratio of
    two FIDs at different n means nothing (gan-facts.md); the equal-n ratio is stated with its n;
  - improved precision/recall (k = 3) with manifolds of equal size, with 95 % bootstrap intervals;
  - the classifier Inception Score over chunks as large as the held-out set;
  - conditional models: label accuracy with a 95 % bootstrap interval (stratified by the requested label)
    beside the classifier's own accuracy on held-out digits, and intra-class KID.
Two references. The held-out split: unseen by the generator, but small (mnist5k: 500); the floor is the train
split against it. Half of the train split: larger, but seen in training, so memorisation would flatter it
(training.neighbours checks for that); the floor is the other half against it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from training import scores

MAX_MANIFOLDS = 10  # fake manifolds averaged for recall
MAX_IS_CHUNKS = 20
MIN_PER_CLASS = 4  # intra-class KID needs this many images of every class in every set


class Real(NamedTuple):
    """Classifier outputs for real images: features [N, F], probabilities [N, C], labels [N]."""

    features: np.ndarray
    probs: np.ndarray
    labels: np.ndarray


def against(
    fake: np.ndarray, other: np.ndarray, ref: np.ndarray, rng: np.random.Generator,
    draws: int = scores.FID_DRAWS, boot: int = scores.FID_BOOT,
) -> dict[str, Any]:  # fmt: skip
    """KID, FID∞ and equal-n FID of fake → ref (the model) and of other → ref (the floor: real vs real)."""
    kid_m, kid_f = scores.kid(fake, ref, rng), scores.kid(other, ref, rng)
    ns = scores.fid_ns(min(len(fake), len(other), len(ref)))
    inf_m = scores.fid_infinity(fake, ref, rng, ns, draws, boot)
    inf_f = scores.fid_infinity(other, ref, rng, ns, draws, boot)
    return {
        "n": {"model": len(fake), "floor": len(other), "reference": len(ref)},
        "kid": {"model": kid_m.value, "model_se": kid_m.se, "floor": kid_f.value, "floor_se": kid_f.se},
        "fid_inf": {
            "ns": list(ns),
            "draws": draws,
            "bootstrap": boot,
            "model": inf_m.value,
            "model_se": inf_m.se,
            "floor": inf_f.value,
            "floor_se": inf_f.se,
            "model_curve": list(inf_m.fids),
            "floor_curve": list(inf_f.fids),
        },
        "fid": {  # equal n on both sides: the largest point of the FID∞ curve
            "n": ns[-1],
            "model": inf_m.fids[-1],
            "floor": inf_f.fids[-1],
            "ratio": inf_m.fids[-1] / inf_f.fids[-1],
        },
    }


def interval(values: np.ndarray, rng: np.random.Generator, strata: np.ndarray | None = None) -> dict[str, Any]:
    """The mean of per-item values with its 95 % bootstrap interval (stratified by `strata`), and its n."""
    lo, hi = scores.bootstrap_ci(values, rng, strata)
    return {"value": float(np.mean(values)), "ci95": [lo, hi], "n": len(values)}


def precision_recall(fake: np.ndarray, train: np.ndarray, held: np.ndarray, rng: np.random.Generator):
    """Both against a held-out manifold of m points; the floor's queries and manifolds come from `train`."""
    m = min(len(held), len(fake), len(train))
    ref = held[rng.choice(len(held), m, replace=False)]
    out: dict[str, Any] = {"k": scores.KNN_K, "manifold": m}
    for who, x in (("model", fake), ("floor", train)):
        p, r = scores.precision_recall_points(ref, x, rng, manifolds=MAX_MANIFOLDS)
        out[who] = {
            "precision": interval(p, rng),
            "recall": interval(r, rng) | {"manifolds": min(MAX_MANIFOLDS, len(x) // m)},
        }
    return out


def inception_score(p_fake: np.ndarray, p_held: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """The model's IS as a mean over random chunks of the held-out set's size, so both are at the same n."""
    m = min(len(p_held), len(p_fake))
    perm = rng.permutation(len(p_fake))
    chunks = [perm[i * m : (i + 1) * m] for i in range(min(MAX_IS_CHUNKS, len(p_fake) // m))]
    return {
        "n": m,
        "chunks": len(chunks),
        "model": float(np.mean([scores.inception_score(p_fake[c]) for c in chunks])),
        "floor": scores.inception_score(p_held[rng.choice(len(p_held), m, replace=False)]),
    }


def conditional(
    f_fake: np.ndarray, p_fake: np.ndarray, asked: np.ndarray, train: Real, held: Real, rng: np.random.Generator
) -> dict[str, Any]:
    """Label accuracy (interval stratified by the requested label), confusion, intra-class KID vs held-out."""
    k = p_fake.shape[1]
    confusion = np.zeros((k, k), int)
    np.add.at(confusion, (asked, p_fake.argmax(1)), 1)
    correct = (p_fake.argmax(1) == asked).astype(np.float64)
    real = interval((held.probs.argmax(1) == held.labels).astype(np.float64), rng, strata=held.labels)
    out: dict[str, Any] = {
        "n": len(asked),
        "label_accuracy": float(correct.mean()),
        "label_accuracy_ci95": list(scores.bootstrap_ci(correct, rng, strata=asked)),
        "held_out_accuracy": real,  # the classifier on real held-out digits: what a perfect generator would get
        "per_class_accuracy": (confusion.diagonal() / confusion.sum(1)).tolist(),
        "confusion": confusion.tolist(),
    }
    sets = [(f_fake[asked == c], train.features[train.labels == c], held.features[held.labels == c]) for c in range(k)]
    if min(len(x) for s in sets for x in s) < MIN_PER_CLASS:
        return out | {"intra_kid": None}
    model = [scores.kid(fake, ref, rng) for fake, _, ref in sets]
    floor = [scores.kid(other, ref, rng) for _, other, ref in sets]
    mean = lambda e: float(np.mean([x.value for x in e]))  # noqa: E731
    se = lambda e: float(np.sqrt(sum(x.se**2 for x in e)) / len(e))  # noqa: E731
    per_class = {"model": len(sets[0][0]), "floor": len(sets[0][1]), "reference": len(sets[0][2])}
    intra = {"model": mean(model), "model_se": se(model), "floor": mean(floor), "floor_se": se(floor)}
    return out | {"intra_kid": intra | {"n_per_class": per_class}}


def score(
    f_fake: np.ndarray, p_fake: np.ndarray, train: Real, held: Real, rng: np.random.Generator,
    asked: np.ndarray | None = None, draws: int = scores.FID_DRAWS, boot: int = scores.FID_BOOT,
) -> dict[str, Any]:  # fmt: skip
    """The whole protocol under one extractor. The held-out comparison sits at the top level; `asked` (the
    requested labels of a conditional model) adds the conditional scores."""
    out = against(f_fake, train.features, held.features, rng, draws, boot)
    half = rng.permutation(len(train.features))
    a, b = train.features[half[: len(half) // 2]], train.features[half[len(half) // 2 :]]
    out["vs_train"] = against(f_fake, a, b, rng, draws, boot)  # floor: one half of the train split against the other
    out["precision_recall"] = precision_recall(f_fake, train.features, held.features, rng)
    out["inception_score"] = inception_score(p_fake, held.probs, rng)
    if asked is not None:
        out["conditional"] = conditional(f_fake, p_fake, asked, train, held, rng)
    return out
