import numpy as np
import pytest

from service import latents


def test_truncation_shrinks_towards_the_mean():
    z = np.random.default_rng(0).standard_normal((2, 16), dtype=np.float32)
    assert np.allclose(latents.truncate(z, 0.5), 0.5 * z) and np.array_equal(latents.truncate(z, 1.0), z)
    for psi in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="truncation"):
            latents.truncate(z, psi)


def test_slerp_endpoints_and_norm():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    t = np.linspace(0, 1, 11)
    path = latents.slerp(a, b, t)
    assert np.allclose(path[0], a, atol=1e-6) and np.allclose(path[-1], b, atol=1e-5)
    assert np.allclose(np.linalg.norm(path, axis=1), np.linalg.norm(a), rtol=1e-5)
    # lerp's midpoint of two near-orthogonal vectors falls to ≈ 0.71 of the norm (White 2016).
    mid = latents.lerp(a, b, np.array([0.5]))[0]
    assert np.linalg.norm(mid) < 0.8 * np.linalg.norm(a)


def test_slerp_falls_back_to_lerp_for_parallel_vectors():
    a = np.ones(4, np.float32)
    assert np.allclose(latents.slerp(a, 2 * a, np.array([0.5])), 1.5 * a)
    assert np.allclose(latents.slerp(a, -a, np.array([0.5])), 0 * a)


def test_path_through_keyframes():
    keys = np.eye(3, dtype=np.float32)
    frames = latents.path(keys, 4)
    assert frames.shape == (9, 3)
    assert (
        np.array_equal(frames[0], keys[0])
        and np.array_equal(frames[4], keys[1])
        and np.array_equal(frames[-1], keys[2])
    )
