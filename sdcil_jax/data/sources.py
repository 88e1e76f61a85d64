"""Random-access image sources: ``source[i] -> {'image': uint8 array or encoded bytes, 'label': int}``.

What the host pipeline reads from (any object with ``__len__`` and ``__getitem__`` of this form works,
``tfds.data_source`` included) and what evaluation batches are cut from.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PoolSource:
    """A task's pool for the host pipeline: real training rows, then in-memory synthetic images.

    ``pool[i]`` for ``i < n_real`` is training example ``train_rows[i]`` of the dataset; after that
    the synthetic images. Labels are the incremental labels of the pool.
    """

    def __init__(self, train_source: Any, train_rows: np.ndarray, synth_images: np.ndarray,
                 labels: np.ndarray):
        self.train_source = train_source
        self.train_rows = np.asarray(train_rows)
        self.synth_images = synth_images
        self.labels = np.asarray(labels)
        self.n_real = len(self.train_rows)

    def __len__(self) -> int:
        return self.n_real + len(self.synth_images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < self.n_real:
            image = self.train_source[int(self.train_rows[i])]["image"]
        else:
            image = self.synth_images[i - self.n_real]
        return {"image": image, "label": int(self.labels[i])}


class ArraySource:
    """uint8 images (N, H, W, C) with labels as a random-access source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[int(i)], "label": int(self.labels[int(i)])}
