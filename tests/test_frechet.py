import numpy as np
import pytest
import torch

from ldm.evaluation.frechet import feature_statistics, frechet_distance, frechet_distance_from_statistics


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T + 0.1 * np.eye(dim)


def test_two_by_two_closed_form():
    # For a 2x2 matrix A with non-negative eigenvalues l1, l2: Tr(sqrt(A)) = sqrt(l1) + sqrt(l2)
    # = sqrt(Tr A + 2 sqrt(det A)); here A = S_a S_b, which does not commute (not symmetric).
    rng = np.random.default_rng(0)
    for _ in range(20):
        mean_a, mean_b = rng.normal(size=2), rng.normal(size=2)
        cov_a, cov_b = _random_covariance(rng, 2), _random_covariance(rng, 2)
        product = cov_a @ cov_b
        trace_sqrt = np.sqrt(np.trace(product) + 2.0 * np.sqrt(np.linalg.det(product)))
        expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
        got = frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_diagonal_closed_form_in_many_dimensions():
    # Commuting (diagonal) covariances: d^2 = |mu_a - mu_b|^2 + sum_i (sigma_a,i - sigma_b,i)^2.
    rng = np.random.default_rng(1)
    std_a, std_b = rng.uniform(0.1, 2.0, size=64), rng.uniform(0.1, 2.0, size=64)
    mean_a, mean_b = rng.normal(size=64), rng.normal(size=64)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((std_a - std_b) ** 2)
    got = frechet_distance_from_statistics(mean_a, np.diag(std_a**2), mean_b, np.diag(std_b**2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_rotation_invariance_and_symmetry():
    rng = np.random.default_rng(2)
    cov_a, cov_b = _random_covariance(rng, 8), _random_covariance(rng, 8)
    mean_a, mean_b = rng.normal(size=8), rng.normal(size=8)
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    d = frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)
    assert frechet_distance_from_statistics(mean_b, cov_b, mean_a, cov_a) == pytest.approx(d, rel=1e-9)
    rotated = frechet_distance_from_statistics(
        rotation @ mean_a, rotation @ cov_a @ rotation.T, rotation @ mean_b, rotation @ cov_b @ rotation.T
    )
    assert rotated == pytest.approx(d, rel=1e-9)


def test_features_use_sample_mean_and_unbiased_covariance():
    rng = np.random.default_rng(3)
    features_a = rng.normal(size=(200, 5))
    features_b = torch.from_numpy(rng.normal(loc=0.5, size=(150, 5))).float()  # tensors work too
    mean, cov = feature_statistics(features_a)
    np.testing.assert_allclose(mean, features_a.mean(0))
    np.testing.assert_allclose(cov, np.cov(features_a, rowvar=False))
    expected = frechet_distance_from_statistics(
        features_a.mean(0), np.cov(features_a, rowvar=False),
        features_b.double().numpy().mean(0), np.cov(features_b.double().numpy(), rowvar=False),
    )
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(features_a, features_a) == pytest.approx(0.0, abs=1e-9)


def test_samples_approach_the_population_distance():
    rng = np.random.default_rng(4)
    cov_a, cov_b = _random_covariance(rng, 3), _random_covariance(rng, 3)
    mean_a, mean_b = np.zeros(3), np.array([1.0, -1.0, 0.5])
    exact = frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)
    samples_a = rng.multivariate_normal(mean_a, cov_a, size=200_000)
    samples_b = rng.multivariate_normal(mean_b, cov_b, size=200_000)
    assert frechet_distance(samples_a, samples_b) == pytest.approx(exact, rel=0.02)


def test_singular_covariance_is_finite():
    # Fewer samples than dimensions: rank-deficient covariances, where sqrtm-based code goes complex.
    rng = np.random.default_rng(5)
    d = frechet_distance(rng.normal(size=(10, 32)), rng.normal(size=(10, 32)))
    assert np.isfinite(d) and d > 0


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match=r"expected features of shape \(N, D\) with N >= 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="same feature dimension"):
        frechet_distance(np.ones((5, 4)), np.ones((5, 3)))
