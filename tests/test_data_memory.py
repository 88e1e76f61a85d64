"""Exemplar selection: herding against a direct implementation, random selection."""

import numpy as np
import pytest

from sdcil_jax.data import herding_select, random_select


def reference_herding(features, m):
    """iCaRL herding written as plainly as possible (loops, explicit running mean)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    mean = x.mean(axis=0)
    chosen = []
    for k in range(1, min(m, len(x)) + 1):
        best, best_dist = None, np.inf
        for j in range(len(x)):
            if j in chosen:
                continue
            candidate = (x[chosen].sum(axis=0) + x[j]) / k
            dist = np.linalg.norm(mean - candidate)
            if dist < best_dist:
                best, best_dist = j, dist
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("n, d, m, seed", [(30, 8, 10, 0), (50, 16, 20, 1), (12, 4, 12, 2)])
def test_herding_matches_reference(n, d, m, seed):
    features = np.random.default_rng(seed).normal(size=(n, d)) + 0.5
    got = herding_select(features, m)
    assert got.dtype == np.int64
    assert got.tolist() == reference_herding(features, m)


def test_herding_first_pick_closest_to_mean_and_no_repeats():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 6)) * rng.uniform(0.1, 5, size=(40, 1))
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    first = int(np.argmin(np.linalg.norm(x - x.mean(axis=0), axis=1)))
    picks = herding_select(features, 15)
    assert picks[0] == first and len(set(picks.tolist())) == 15
    # Row scaling does not matter: features are L2-normalised first.
    np.testing.assert_array_equal(herding_select(features * 7.0, 15), picks)


def test_herding_all_and_none():
    features = np.random.default_rng(4).normal(size=(9, 3))
    every = herding_select(features, 50)
    assert sorted(every.tolist()) == list(range(9))
    np.testing.assert_array_equal(herding_select(features, 4), every[:4])
    assert herding_select(features, 0).shape == (0,)
    assert herding_select(features.astype(np.float32), 9).tolist() == every.tolist()


def test_random_select():
    picks = random_select(100, 20, np.random.default_rng(0))
    assert len(picks) == 20 and len(set(picks.tolist())) == 20
    assert picks.min() >= 0 and picks.max() < 100
    np.testing.assert_array_equal(picks, random_select(100, 20, 0))
    assert sorted(random_select(5, 10, 1).tolist()) == [0, 1, 2, 3, 4]
    assert random_select(5, 0, 1).shape == (0,)
