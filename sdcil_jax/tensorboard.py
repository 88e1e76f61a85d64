"""TensorBoard event files beside ``metrics.jsonl``: ``tensorboard --logdir runs/``.

Written with tensorboardX, a maintained writer that needs no TensorFlow (clu's writers need
TensorFlow for TensorBoard output). What is written, all against the run's global training step so
that every curve shares one x axis:

* ``<stage>/<metric>`` and ``<stage>/lr`` per epoch (stage = train or finetune; metric = loss and
  the method's terms, e.g. nca, pod_flat, pod_spatial, train_acc);
* ``accuracy/cnn``, ``accuracy/nme``, ``accuracy/old``, ``accuracy/new``, ``accuracy/synthetic``
  after every task (when defined), and the accuracy matrix as an image and a markdown table;
* ``replay/samples``: a grid of the synthetic images of the old classes that a task trains with.

A resumed run opens its writer with ``purge_step`` = the checkpoint's global step, so TensorBoard
drops what the interrupted run logged after that checkpoint (no doubled curves).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

RESULT_SCALARS = {"cnn_accuracy": "accuracy/cnn", "nme_accuracy": "accuracy/nme",
                  "old_accuracy": "accuracy/old", "new_accuracy": "accuracy/new",
                  "synthetic_accuracy": "accuracy/synthetic"}


class Board:
    """A run's TensorBoard writer (``<workdir>/tensorboard``); ``enabled=False`` writes nothing."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.logdir = os.path.join(workdir, "tensorboard")
        self.enabled = enabled
        self._writer = None

    def _open(self, purge_step: int | None = None):
        if self._writer is None and self.enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self.logdir, purge_step=purge_step, flush_secs=30)
        return self._writer

    def resume(self, global_step: int) -> None:
        """Continue a run from a checkpoint at ``global_step`` (drops later events on load)."""
        self.close()
        self._open(purge_step=int(global_step))

    def epoch(self, stage: str, means: dict[str, float], lr: float, step: int) -> None:
        writer = self._open()
        if writer is None:
            return
        for name, value in means.items():
            writer.add_scalar(f"{stage}/{name}", float(value), step)
        writer.add_scalar(f"{stage}/lr", float(lr), step)

    def task(self, result: dict[str, Any], accuracy_matrix: list[list[float]], step: int) -> None:
        writer = self._open()
        if writer is None:
            return
        for key, tag in RESULT_SCALARS.items():
            if result.get(key) is not None:
                writer.add_scalar(tag, float(result[key]), step)
        writer.add_scalar("accuracy/classes_seen", float(result["num_classes"]), step)
        writer.add_text("accuracy_matrix", _markdown(accuracy_matrix), step)
        writer.add_image("accuracy_matrix", _matrix_image(accuracy_matrix), step, dataformats="HWC")
        writer.flush()

    def samples(self, images: np.ndarray, labels: np.ndarray, step: int, per_class: int = 4,
                max_classes: int = 16) -> None:
        """A grid (one row per class, ``per_class`` images) of uint8 images ``(N, H, W, C)``."""
        writer = self._open()
        if writer is None or not len(images) or per_class <= 0:
            return
        writer.add_image("replay/samples", image_grid(images, labels, per_class, max_classes), step,
                         dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def image_grid(images: np.ndarray, labels: np.ndarray, per_class: int, max_classes: int,
               min_tile: int = 32) -> np.ndarray:
    """uint8 (H, W, 3) grid: a row per class (first ``max_classes`` classes by label), its first
    ``per_class`` images, nearest-neighbour upscaled to at least ``min_tile`` pixels, 2 px gaps."""
    classes = sorted(np.unique(labels).tolist())[:max_classes]
    h, w = images.shape[1:3]
    scale = max(1, -(-min_tile // max(h, w)))
    th, tw, gap = h * scale, w * scale, 2
    grid = np.full((len(classes) * (th + gap), per_class * (tw + gap), 3), 255, np.uint8)
    for r, c in enumerate(classes):
        for j, img in enumerate(images[labels == c][:per_class]):
            tile = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
            if tile.shape[-1] == 1:
                tile = np.repeat(tile, 3, axis=-1)
            grid[r * (th + gap):r * (th + gap) + th, j * (tw + gap):j * (tw + gap) + tw] = tile
    return grid


def _markdown(matrix: list[list[float]]) -> str:
    n = len(matrix)
    head = "| after task | " + " | ".join(f"task {j + 1}" for j in range(n)) + " |"
    rows = [head, "|" + "---|" * (n + 1)]
    for t, row in enumerate(matrix):
        cells = [f"{v:.1f}" for v in row] + [""] * (n - len(row))
        rows.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _matrix_image(matrix: list[list[float]], cell: int = 24) -> np.ndarray:
    """The accuracy matrix as a (n*cell, n*cell, 3) uint8 heat map (dark = low, light = high)."""
    n = len(matrix)
    out = np.full((n * cell, n * cell, 3), 255, np.uint8)
    for t, row in enumerate(matrix):
        for j, v in enumerate(row):
            g = int(round(255 * max(0.0, min(100.0, float(v))) / 100.0))
            out[t * cell:(t + 1) * cell, j * cell:(j + 1) * cell] = (255 - g // 2, g, 64)
    return out
