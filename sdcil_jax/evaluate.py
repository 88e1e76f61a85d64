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


NME_EPS = 1e-8  # the official code's EPSILON: x / (||x|| + 1e-8)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + NME_EPS)


def nme_predict(features: np.ndarray, class_means: np.ndarray) -> np.ndarray:
    """Nearest-mean-of-exemplars prediction (iCaRL; PODNet's ``compute_accuracy``).

    Args:
      features: (N, D) features; divided by ``||f|| + 1e-8`` here.
      class_means: (C, D) class means from :func:`class_means`.
    Returns:
      (N,) index of the closest class mean in squared euclidean distance.
    """
    feats = _unit(features)
    dists = (
        np.sum(feats**2, axis=1, keepdims=True)
        - 2.0 * feats @ np.asarray(class_means, np.float64).T
        + np.sum(np.asarray(class_means, np.float64) ** 2, axis=1)[None, :]
    )
    return np.argmin(dists, axis=1)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int,
                flipped_features: np.ndarray | None = None) -> np.ndarray:
    """(C, D) exemplar means, as PODNet's ``compute_examplar_mean`` (zeros for an empty class).

    ``mean_c = (avg_i u(f_i) + avg_i u(f'_i)) / 2``, then ``mean_c / (||mean_c|| + 1e-8)``, over the
    exemplars i of class c, with ``u(x) = x / (||x|| + 1e-8)`` and ``f'_i`` the features of the
    horizontally flipped exemplar (``flipped_features``, same rows as ``features``; without it the
    flipped term is the plain term).
    """
    feats = _unit(features)
    flips = feats if flipped_features is None else _unit(flipped_features)
    labels = np.asarray(labels, np.int64)
    # every class at once: sums by class (one-hot matmul), divided by the class counts
    onehot = (labels[None, :] == np.arange(num_classes)[:, None]).astype(np.float64)  # (C, N)
    counts = onehot.sum(axis=1, keepdims=True)
    means = (onehot @ feats + onehot @ flips) / (2.0 * np.maximum(counts, 1.0))
    means = means / (np.linalg.norm(means, axis=1, keepdims=True) + NME_EPS)
    return np.where(counts > 0, means, 0.0)


def evaluate_task(*, logits: np.ndarray, feats: np.ndarray, labels: np.ndarray, num_seen: int,
                  task_bounds: Sequence[tuple[int, int]], num_old: int,
                  memory_means: np.ndarray | None) -> dict:
    """CNN and NME accuracies (%) on the test images of the seen classes after a task.

    CNN: argmax over the seen classes' logits; NME: :func:`nme_predict` with the exemplar means
    (None when the method keeps no memory). Keys: cnn_accuracy, task_accuracies (per task's
    classes), old_accuracy (None in the first task), new_accuracy, nme_accuracy,
    nme_task_accuracies.
    """
    pred = np.argmax(logits[:, :num_seen], axis=1)
    old = labels < num_old
    result = {
        "cnn_accuracy": accuracy(pred, labels),
        "task_accuracies": task_accuracies(pred, labels, task_bounds),
        "old_accuracy": accuracy(pred[old], labels[old]) if num_old else None,
        "new_accuracy": accuracy(pred[~old], labels[~old]),
        "nme_accuracy": None,
        "nme_task_accuracies": None,
    }
    if memory_means is not None:
        nme = nme_predict(feats, memory_means[:num_seen])
        result["nme_accuracy"] = accuracy(nme, labels)
        result["nme_task_accuracies"] = task_accuracies(nme, labels, task_bounds)
    return result
