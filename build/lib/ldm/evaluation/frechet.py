"""Fréchet distance between two sets of feature vectors (the FID formula).

Fitting a Gaussian N(mu, Sigma) to each set, the squared Fréchet (2-Wasserstein) distance is
(Dowson & Landau 1982; Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", eq. 6)::

    d^2 = |mu_a - mu_b|^2 + Tr(Sigma_a + Sigma_b - 2 (Sigma_a Sigma_b)^(1/2))

Only the trace of the matrix square root is needed. Sigma_a Sigma_b is not symmetric, but it is similar
to the symmetric positive semi-definite M = Sigma_a^(1/2) Sigma_b Sigma_a^(1/2) (conjugate by
Sigma_a^(1/2)), so both have the same non-negative eigenvalues and
Tr((Sigma_a Sigma_b)^(1/2)) = sum_i sqrt(lambda_i(M)). Two symmetric eigendecompositions (``eigh`` for
Sigma_a^(1/2), ``eigvalsh`` for M) give it in float64 without scipy's ``sqrtm``, and without its
complex round-off for near-singular covariances: tiny negative eigenvalues from round-off are clipped
to zero.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_float64(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    features = _as_float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features of shape (N, D) with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance_from_statistics(
    mean_a: ArrayLike, cov_a: ArrayLike, mean_b: ArrayLike, cov_b: ArrayLike
) -> float:
    """Squared Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b) (module docstring)."""
    mean_a, cov_a, mean_b, cov_b = (_as_float64(x) for x in (mean_a, cov_a, mean_b, cov_b))
    dim = mean_a.shape[0]
    if mean_b.shape != (dim,) or cov_a.shape != (dim, dim) or cov_b.shape != (dim, dim):
        raise ValueError(
            f"statistics do not match: means {mean_a.shape}, {mean_b.shape}, covariances {cov_a.shape}, "
            f"{cov_b.shape}; both sets must use the same feature dimension"
        )
    # Symmetrise against round-off before the symmetric eigensolvers.
    cov_a, cov_b = (cov_a + cov_a.T) / 2.0, (cov_b + cov_b.T) / 2.0
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    difference = mean_a - mean_b
    distance = difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt_product
    # d^2 >= 0 exactly; round-off can leave it at about -1e-12 for identical statistics.
    return float(max(distance, 0.0))


def frechet_distance(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Squared Fréchet distance between Gaussians fitted to (N_a, D) and (N_b, D) features (the
    number reported as FID when the features come from Inception)."""
    mean_a, cov_a = feature_statistics(features_a)
    mean_b, cov_b = feature_statistics(features_b)
    return frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)
