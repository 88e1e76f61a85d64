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


def select_memory(features: np.ndarray, m: int, selection: str, seed: int) -> np.ndarray:
    """Positions (into ``features``, one class's) of its ``m`` exemplars: ``herding`` or ``random``
    (``default_rng(seed)``)."""
    if selection == "herding":
        return np.asarray(herding_select(features, m), dtype=np.int64)
    return np.asarray(random_select(len(features), m, np.random.default_rng(seed)), dtype=np.int64)


def memory_indices(memory: dict[int, np.ndarray], classes) -> np.ndarray:
    """The exemplars of ``classes`` (pool positions), concatenated in class order."""
    parts = [memory[c] for c in classes if c in memory]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)


def balanced_indices(memory: dict[int, np.ndarray], num_classes: int, per_class: int,
                     seed: int, task: int) -> np.ndarray:
    """The class-balanced finetuning set: ``per_class`` memory images of each class ``< num_classes``.

    Real memories hold ``per_class`` images already (PODNet's undersampling). Larger memories
    (synthetic ones with ``synthetic.replace_memory``, 100 or 500 per class) are under-sampled to the
    same count by a seeded draw (``default_rng([seed, task, class, 17])``), so the set stays balanced.
    """
    parts = []
    for c in range(num_classes):
        idx = np.asarray(memory.get(c, np.zeros((0,), np.int64)), np.int64)
        if len(idx) > per_class:
            rng = np.random.default_rng([seed, task, c, 17])
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        parts.append(idx)
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def herding_select_classes(features_CxNxD, counts, m: int) -> np.ndarray:
    """:func:`herding_select` of many classes at once, on the device (one jitted program).

    Args:
      features_CxNxD: (C, N, D) features, class c's first ``counts[c]`` rows valid (padding after).
      counts: (C,) number of valid rows per class.
      m: exemplars per class.

    Returns:
      (C, min(m, N)) int64 positions (into each class's rows) in selection order; the same rule as
      :func:`herding_select` (float32 arithmetic), classes with fewer than m rows padded with -1.
    """
    import jax.numpy as jnp

    x = jnp.asarray(features_CxNxD, jnp.float32)
    counts = jnp.asarray(counts, jnp.int32)
    m = min(int(m), x.shape[1])
    return np.asarray(_herding_device(x, counts, m)).astype(np.int64)


def _herding_one(x, n, m):
    import jax
    import jax.numpy as jnp

    big = jnp.iinfo(jnp.int32).max
    valid = jnp.arange(x.shape[0]) < n
    x = x / (jnp.linalg.norm(x, axis=1, keepdims=True) + HERDING_EPS)
    x = jnp.where(valid[:, None], x, 0.0)
    mu = jnp.sum(x, axis=0) / jnp.maximum(n, 1).astype(x.dtype)
    target = jnp.minimum(m, n)

    def cond(carry):
        _, _, picked, it = carry
        return (picked < target) & (it < HERDING_MAX_ITERATIONS)

    def body(carry):
        w, rank, picked, it = carry
        scores = jnp.where(valid, x @ w, -jnp.inf)
        i = jnp.argmax(scores)
        new = rank[i] == big
        rank = rank.at[i].set(jnp.where(new, picked, rank[i]))
        return w + mu - x[i], rank, picked + new.astype(jnp.int32), it + 1

    rank0 = jnp.full((x.shape[0],), big, jnp.int32)
    _, rank, _, _ = jax.lax.while_loop(cond, body, (mu, rank0, jnp.int32(0), jnp.int32(0)))
    order = jnp.argsort(rank, stable=True)[:m]
    return jnp.where(jnp.arange(m) < jnp.minimum(m, n), order, -1)


def _herding_device(x, counts, m):
    import functools

    import jax

    fn = _HERDING_CACHE.get(m)
    if fn is None:
        fn = _HERDING_CACHE[m] = jax.jit(jax.vmap(functools.partial(_herding_one, m=m)))
    return fn(x, counts)


_HERDING_CACHE: dict[int, object] = {}
