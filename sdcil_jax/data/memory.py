"""Exemplar memory selection (pure numpy): iCaRL herding and uniform random selection."""

from __future__ import annotations

import numpy as np


def _normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def herding_select(features: np.ndarray, m: int) -> np.ndarray:
    """iCaRL herding: indices of ``m`` exemplars of one class, in selection order.

    Features ``(N, D)`` are L2-normalised; step ``k`` (1-based) picks, among the samples not picked
    yet, the one that makes the mean of the ``k`` picked features closest (euclidean) to the mean of
    all normalised features. Ties go to the lowest index. With ``m >= N`` all ``N`` indices are
    returned in herding order. Returns int64 indices without repeats.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"herding_select needs features of shape (N, D), got {x.shape}.")
    n = x.shape[0]
    m = min(max(int(m), 0), n)
    if m == 0:
        return np.zeros((0,), dtype=np.int64)
    x = _normalise(x)
    target = x.mean(axis=0)
    sq_norms = np.sum(x * x, axis=1)
    running_sum = np.zeros_like(target)
    available = np.ones(n, dtype=bool)
    picked = np.empty((m,), dtype=np.int64)
    for k in range(1, m + 1):
        # ||target - (S + x_i) / k||^2 * k^2 = ||r - x_i||^2 with r = k * target - S; drop ||r||^2.
        residual = k * target - running_sum
        cost = sq_norms - 2.0 * (x @ residual)
        cost[~available] = np.inf
        i = int(np.argmin(cost))
        picked[k - 1] = i
        available[i] = False
        running_sum += x[i]
    return picked


def random_select(n: int, m: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """``min(m, n)`` distinct indices drawn uniformly from ``0..n-1`` (int64, in draw order).

    ``rng`` is a ``np.random.Generator`` or a seed for ``np.random.default_rng``.
    """
    n, m = int(n), min(max(int(m), 0), int(n))
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return rng.choice(n, size=m, replace=False).astype(np.int64)
