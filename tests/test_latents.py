import numpy as np
import pytest

from service import latents


def test_seed_contract_is_numpy_default_rng_in_float32():
    z = latents.seed_latent(42, 100, "normal")
    assert z.dtype == np.float32 and np.array_equal(z, np.random.default_rng(42).standard_normal(100, dtype=np.float32))
    assert latents.seed_latent(42, 100, "normal").tobytes() == z.tobytes()  # same seed, same bytes
    u = latents.seed_latent(42, 1000, "uniform")
    assert u.dtype == np.float32 and np.abs(u).max() <= np.sqrt(3) and abs(u.var() - 1) < 0.1
    rows = latents.seed_latents([3, 1, 3], 8, "normal")
    assert np.array_equal(rows[0], rows[2]) and np.array_equal(rows[1], latents.seed_latent(1, 8, "normal"))
    with pytest.raises(ValueError, match="prior"):
        latents.seed_latent(0, 4, "cauchy")


def test_truncation_shrinks_towards_the_mean():
    z = latents.seed_latents([0, 1], 16, "normal")
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
