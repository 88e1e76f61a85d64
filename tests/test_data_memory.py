"""Exemplar selection: herding against a direct implementation, random selection."""

import numpy as np
import pytest

from sdcil_jax.data import herding_select, random_select
from sdcil_jax.data.memory import herding_select_classes


def reference_herding(features, m):
    """PODNet's official icarl_selection (inclearn/lib/herding.py), transcribed with loops."""
    d = features.T / (np.linalg.norm(features.T, axis=0) + 1e-8)
    mu = d.mean(axis=1)
    w = mu.copy()
    order, iterations = [], 0
    while len(order) < min(m, features.shape[0]) and iterations < 1000:
        scores = [float(w @ d[:, j]) for j in range(d.shape[1])]
        best = scores.index(max(scores))
        iterations += 1
        if best not in order:
            order.append(best)
        w = w + mu - d[:, best]
    return order


@pytest.mark.parametrize("n, d, m, seed", [(30, 8, 10, 0), (50, 16, 20, 1), (12, 4, 12, 2)])
def test_herding_matches_official_rule(n, d, m, seed):
    features = np.random.default_rng(seed).normal(size=(n, d)) + 0.5
    got = herding_select(features, m)
    assert got.dtype == np.int64
    assert got.tolist() == reference_herding(features, m)


def test_herding_differs_from_closest_mean_greedy():
    """The official rule may revisit a sample (no new exemplar that iteration); it is not the
    'closest running mean among the unpicked' greedy of the iCaRL paper."""
    rng = np.random.default_rng(7)
    differs = 0
    for _ in range(20):
        f = rng.normal(size=(25, 5)) + 0.3
        x = f / np.linalg.norm(f, axis=1, keepdims=True)
        greedy, total = [], np.zeros(5)
        for k in range(1, 11):
            cost = [np.inf if j in greedy else np.linalg.norm(x.mean(0) - (total + x[j]) / k)
                    for j in range(25)]
            greedy.append(int(np.argmin(cost)))
            total += x[greedy[-1]]
        differs += herding_select(f, 10).tolist() != greedy
    assert differs > 0


def test_herding_first_pick_and_no_repeats():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 6)) * rng.uniform(0.1, 5, size=(40, 1))
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    first = int(np.argmax(x @ x.mean(axis=0)))  # most aligned with the mean direction
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


def test_device_herding_of_all_classes_equals_per_class_herding():
    """One jitted program for every class (padded to the largest) picks what herding_select picks
    class by class, including classes with fewer rows than the memory size."""
    rng = np.random.default_rng(11)
    counts = [40, 25, 7, 40, 13]
    feats = [rng.normal(size=(n, 16)).astype(np.float32) + 0.3 for n in counts]
    padded = np.zeros((len(counts), max(counts), 16), np.float32)
    for i, f in enumerate(feats):
        padded[i, :len(f)] = f
    picks = herding_select_classes(padded, counts, 10)
    assert picks.shape == (5, 10)
    for f, pick in zip(feats, picks, strict=True):
        assert pick[pick >= 0].tolist() == herding_select(f, 10).tolist()
    assert (picks[2, 7:] == -1).all()
