"""Metric maths against hand-made inputs."""

import numpy as np
import pytest

from sdcil_jax import evaluate as ev


def test_accuracy_and_task_accuracies():
    labels = np.array([0, 0, 1, 1, 2, 3])
    pred = np.array([0, 1, 1, 1, 0, 3])
    assert ev.accuracy(pred, labels) == pytest.approx(100 * 4 / 6)
    assert ev.task_accuracies(pred, labels, [(0, 2), (2, 4)]) == pytest.approx([75.0, 50.0])
    assert ev.accuracy(np.array([]), np.array([])) == 0.0


def test_average_incremental_includes_first_task():
    assert ev.average_incremental_accuracy([90.0, 70.0, 50.0]) == pytest.approx(70.0)


def test_forgetting_hand_matrix():
    acc = [[90.0], [60.0, 80.0], [70.0, 50.0, 95.0]]
    # task 0: best before last = 90, final 70 -> 20; task 1: best 80, final 50 -> 30
    assert ev.forgetting(acc) == pytest.approx(25.0)
    assert ev.forgetting([[80.0]]) is None


def test_nme_matches_bruteforce():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 5))
    labels = rng.integers(0, 3, size=20)
    means = ev.class_means(feats, labels, 3)
    pred = ev.nme_predict(feats, means)
    normed = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for i in range(20):
        d = [np.sum((normed[i] - means[c]) ** 2) for c in range(3)]
        assert pred[i] == int(np.argmin(d))
    assert np.allclose(np.linalg.norm(means, axis=1), 1.0)


def test_nme_means_average_plain_and_flipped_exemplars():
    """PODNet's compute_examplar_mean: (mean u(f) + mean u(f_flip)) / 2, renormalised, with
    u(x) = x / (||x|| + 1e-8)."""
    rng = np.random.default_rng(1)
    feats, flips = rng.normal(size=(12, 4)), rng.normal(size=(12, 4))
    labels = np.repeat([0, 1, 2], 4)
    means = ev.class_means(feats, labels, 4, flipped_features=flips)
    for c in range(3):
        u = feats[labels == c] / (np.linalg.norm(feats[labels == c], axis=1, keepdims=True) + 1e-8)
        v = flips[labels == c] / (np.linalg.norm(flips[labels == c], axis=1, keepdims=True) + 1e-8)
        m = (u.mean(0) + v.mean(0)) / 2
        np.testing.assert_allclose(means[c], m / (np.linalg.norm(m) + 1e-8), rtol=1e-12)
    np.testing.assert_array_equal(means[3], 0.0)  # a class without exemplars
    assert not np.allclose(means[:3], ev.class_means(feats, labels, 4)[:3])


def test_class_means_all_classes_at_once_equal_a_loop_over_classes():
    """The vectorised means equal PODNet's per-class loop (uneven counts, an empty class)."""
    rng = np.random.default_rng(3)
    feats, flips = rng.normal(size=(70, 6)), rng.normal(size=(70, 6))
    labels = rng.choice([0, 1, 2, 4], size=70, p=[0.6, 0.3, 0.05, 0.05])
    want = np.zeros((5, 6))
    for c in range(5):
        sel = labels == c
        if sel.any():
            u = feats[sel] / (np.linalg.norm(feats[sel], axis=1, keepdims=True) + 1e-8)
            v = flips[sel] / (np.linalg.norm(flips[sel], axis=1, keepdims=True) + 1e-8)
            m = (u.mean(axis=0) + v.mean(axis=0)) / 2
            want[c] = m / (np.linalg.norm(m) + 1e-8)
    got = ev.class_means(feats, labels, 5, flips)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not got[3].any()
