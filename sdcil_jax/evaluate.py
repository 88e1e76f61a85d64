"""Class-incremental metrics as pure numpy functions.

Notation: T tasks; ``acc[t][j]`` is the accuracy (in %) on the test images of task j's classes measured
after training task t (defined for j <= t).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent; 0.0 for an empty set."""
    if len(labels) == 0:
        return 0.0
    return float(100.0 * np.mean(np.asarray(predictions) == np.asarray(labels)))


def task_accuracies(
    predictions: np.ndarray, labels: np.ndarray, task_bounds: Sequence[tuple[int, int]]
) -> list[float]:
    """Accuracy on each task's classes; task j owns incremental labels ``[start_j, end_j)``."""
    out = []
    for start, end in task_bounds:
        sel = (labels >= start) & (labels < end)
        out.append(accuracy(predictions[sel], labels[sel]))
    return out


def average_incremental_accuracy(top1_per_task: Sequence[float]) -> float:
    """Mean of the accuracy on all seen classes after each task, the first task included."""
    return float(np.mean(top1_per_task)) if len(top1_per_task) else 0.0


def forgetting(acc_matrix: Sequence[Sequence[float | None]]) -> float | None:
    """Mean over old tasks j < T-1 of ``max_{j <= t < T-1} acc[t][j] - acc[T-1][j]``.

    None when only one task was trained (nothing can be forgotten yet).
    """
    num = len(acc_matrix)
    if num < 2:
        return None
    drops = []
    for j in range(num - 1):
        best = max(acc_matrix[t][j] for t in range(j, num - 1))
        drops.append(best - acc_matrix[num - 1][j])
    return float(np.mean(drops))


def nme_predict(features: np.ndarray, class_means: np.ndarray) -> np.ndarray:
    """Nearest-mean-of-exemplars prediction (iCaRL).

    Args:
      features: (N, D) features; L2-normalised here.
      class_means: (C, D) normalised class means of the exemplars' normalised features.
    Returns:
      (N,) index of the closest class mean in euclidean distance.
    """
    feats = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    dists = (
        np.sum(feats**2, axis=1, keepdims=True)
        - 2.0 * feats @ class_means.T
        + np.sum(class_means**2, axis=1)[None, :]
    )
    return np.argmin(dists, axis=1)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, D) mean of the L2-normalised features of each class, re-normalised (zeros if empty)."""
    feats = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    means = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    for c in range(num_classes):
        sel = labels == c
        if np.any(sel):
            m = feats[sel].mean(axis=0)
            means[c] = m / max(np.linalg.norm(m), 1e-12)
    return means
