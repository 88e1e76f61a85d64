"""Exemplar memory selection (pure numpy): iCaRL herding and uniform random selection."""

from __future__ import annotations

import numpy as np

# The official code's EPSILON (``x / (||x|| + 1e-8)``) and its cap on herding iterations.
HERDING_EPS = 1e-8
HERDING_MAX_ITERATIONS = 1000


def herding_select(features: np.ndarray, m: int) -> np.ndarray:
    """iCaRL herding as PODNet's official ``inclearn/lib/herding.py::icarl_selection``.

    With ``x_i`` the features ``(N, D)`` divided by ``||x_i|| + 1e-8`` and ``mu`` their mean, start
    from ``w = mu`` and repeat: ``i = argmax_j <w, x_j>`` (first index on ties); if ``i`` is new it
    becomes the next exemplar; ``w <- w + mu - x_i``. Stop once ``min(m, N)`` distinct samples are
    picked or after 1000 iterations (then the unpicked ones follow in index order). Returns int64
    positions in selection order, without repeats; ``m >= N`` returns every index.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"herding_select needs features of shape (N, D), got {x.shape}.")
    n = x.shape[0]
    m = min(max(int(m), 0), n)
    if m == 0:
        return np.zeros((0,), dtype=np.int64)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + HERDING_EPS)
    mu = x.mean(axis=0)
    w = mu.copy()
    rank = np.full((n,), np.iinfo(np.int64).max, dtype=np.int64)
    picked = 0
    for _ in range(HERDING_MAX_ITERATIONS):
        if picked == m:
            break
        i = int(np.argmax(x @ w))
        if rank[i] == np.iinfo(np.int64).max:
            rank[i] = picked
            picked += 1
        w += mu - x[i]
    return np.argsort(rank, kind="stable")[:m].astype(np.int64)


def random_select(n: int, m: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """``min(m, n)`` distinct indices drawn uniformly from ``0..n-1`` (int64, in draw order).

    ``rng`` is a ``np.random.Generator`` or a seed for ``np.random.default_rng``.
    """
    n, m = int(n), min(max(int(m), 0), int(n))
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return rng.choice(n, size=m, replace=False).astype(np.int64)
