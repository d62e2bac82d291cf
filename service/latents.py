"""Latent math, pure numpy: truncation and interpolation. No torch, no server. (Seed → z is in service.contract.)"""

from __future__ import annotations

import math

import numpy as np


def truncate(z: np.ndarray, psi: float) -> np.ndarray:
    """The truncation trick as shrinkage towards the prior's mean (0): z ← ψ·z, ψ ∈ (0, 1]."""
    if not 0 < psi <= 1:
        raise ValueError(f"truncation must be in (0, 1], got {psi}")
    return (z * np.float32(psi)).astype(np.float32, copy=False)


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Rows a + t·(b − a) for each t; a, b [d], t [n] → [n, d]."""
    t = np.asarray(t, dtype=np.float64)[:, None]
    return ((1 - t) * a + t * b).astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation (White 2016); keeps the norm when ‖a‖ = ‖b‖. Falls back to lerp when a ∥ b."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 or nb == 0:
        return lerp(a, b, t)
    omega = math.acos(float(np.clip(a64 @ b64 / (na * nb), -1.0, 1.0)))
    if math.sin(omega) < 1e-6:  # (anti)parallel: the great circle is undefined
        return lerp(a, b, t)
    t = np.asarray(t, dtype=np.float64)[:, None]
    out = (np.sin((1 - t) * omega) * a64 + np.sin(t * omega) * b64) / math.sin(omega)
    return out.astype(np.float32)


def path(keys: np.ndarray, steps: int, method: str = "slerp") -> np.ndarray:
    """Frames through keyframes [k, d]: `steps` per segment (start included, end excluded), then the last key.

    Returns [(k − 1)·steps + 1, d]; frame 0 is keys[0] and the last frame is keys[-1] exactly.
    """
    fn = {"slerp": slerp, "lerp": lerp}[method]
    t = np.arange(steps) / steps
    segments = [fn(keys[i], keys[i + 1], t) for i in range(len(keys) - 1)]
    return np.concatenate([*segments, keys[-1:].astype(np.float32)])
