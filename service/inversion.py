"""Inversion's arithmetic, pure numpy: distances, and the bounded gradient-free search that refines an encoder's z.

ONNX Runtime has no backward pass, so the refinement only runs the generator: a (1, λ) evolution strategy per image,
all images at once, each generation one batch of n·λ candidates. Each image keeps its best z so far; its step size
grows after a generation that found a closer z and shrinks after one that did not (Rechenberg's 1/5 rule, in its
multiplicative form), so the search widens while it gains and narrows onto a minimum. Each image draws from a
random stream of its own, so an image's answer depends on it and its budget alone, not on the others beside it.
"""

from __future__ import annotations

import numpy as np

POPULATION = 16  # candidates per image and generation
STEP = 0.3  # the first step size, in standard deviations of the prior per coordinate
GROW, SHRINK = 1.5, 0.85  # 1.5 · 0.85⁴ ≈ 0.78: a hit in one generation of five keeps the step about even
SEED = 0


def distances(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Mean squared difference per image, both [n, ...] in [0, 1]; float64 [n]."""
    diff = images.reshape(len(images), -1).astype(np.float64) - targets.reshape(len(targets), -1)
    return np.mean(diff * diff, axis=1)


class Search:
    """The refinement's state for n images: ask() for candidates, tell() their distances; best and best_distance
    hold each image's answer so far."""

    def __init__(self, z: np.ndarray, distance: np.ndarray, seeds: list[int], population: int = POPULATION):
        """`seeds`: one per image, for its own random stream (the server uses a hash of its pixels)."""
        self.best, self.best_distance = z.astype(np.float32).copy(), distance.astype(np.float64).copy()
        self.population = population
        self.step = np.full(len(z), STEP)
        self.rngs = [np.random.default_rng([SEED, seed]) for seed in seeds]
        self.improved = False  # whether any image has a closer z than it started with
        self._candidates: np.ndarray | None = None

    def ask(self) -> np.ndarray:
        """float32 [n · population, latent_dim]: image i's candidates are rows i·population … (i+1)·population − 1."""
        n, d = self.best.shape
        noise = np.stack([rng.standard_normal((self.population, d), dtype=np.float32) for rng in self.rngs])
        self._candidates = self.best[:, None, :] + (self.step[:, None, None] * noise).astype(np.float32)
        return self._candidates.reshape(n * self.population, d)

    def tell(self, distance: np.ndarray) -> None:
        """The distances of the candidates ask() gave, in its order."""
        per_image = distance.reshape(len(self.best), self.population)
        pick = per_image.argmin(1)
        found = per_image[np.arange(len(pick)), pick]
        better = found < self.best_distance
        self.best[better] = self._candidates[better, pick[better]]
        self.best_distance[better] = found[better]
        self.step = np.where(better, self.step * GROW, self.step * SHRINK)
        self.improved |= bool(better.any())
