"""Which image goes where in the host pipeline's batches: the deterministic map from a batch slot to
a decoded, augmented image that grain runs (in worker processes or in the consuming thread).

Global batch ``g`` is step ``s = g % steps_per_epoch`` of epoch ``e = g // steps_per_epoch``; it holds
positions ``[s * B, (s + 1) * B)`` of the epoch's order (a permutation of the indices drawn from
``np.random.default_rng([seed, e])``, or the indices themselves when not shuffling), process ``p`` of
``P`` holding rows ``[p * B / P, (p + 1) * B / P)``; the image at position ``i`` is transformed with
draws from ``np.random.default_rng([seed, e, i])``. Nothing here refers to JAX objects, so a reader
pickles into grain's worker processes with just its source.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sdcil_jax.data.transforms import eval_transform, train_transform


class LabelMap:
    """Dataset label -> training label, from a dict, a lookup array or a callable (picklable)."""

    def __init__(self, labels_map: Any):
        if isinstance(labels_map, Mapping):
            labels_map = {int(k): int(v) for k, v in labels_map.items()}
        elif labels_map is not None and not callable(labels_map):
            labels_map = np.asarray(labels_map)
        self.labels_map = labels_map

    def __call__(self, label: int) -> int:
        if self.labels_map is None:
            return label
        if isinstance(self.labels_map, dict | np.ndarray):
            return int(self.labels_map[label])
        return int(self.labels_map(label))


class BatchReader:
    """What a grain worker needs to produce any image of any local batch (see the module docstring).

    Slot ``j`` of this process is image ``j % L`` of its part of global batch ``j // L``
    (``L = batch_size / process_count``). Calling the reader on a slot returns that image's
    ``{'images', 'labels', 'mask'}``.

    Args:
      source: random-access source; indices: its rows in use; label_map: dataset -> training label.
      seed, shuffle: the epoch order; train: train transform (else eval transform, source order).
      batch_size: the global batch size; process_index, process_count: this process's rows.
      steps_per_epoch: batches per epoch (a last partial batch is padded when it is counted).
      image_size, test_resize, transform: arguments of the transforms (``transform``: scale, ratio,
        flip, brightness of :func:`~sdcil_jax.data.transforms.train_transform`).
      image_key, label_key: field names in the source's examples.
    """

    def __init__(self, source: Any, indices: np.ndarray, label_map: LabelMap, *, seed: int,
                 shuffle: bool, train: bool, batch_size: int, process_index: int, process_count: int,
                 steps_per_epoch: int, image_size: int, test_resize: int, transform: dict[str, Any],
                 image_key: str, label_key: str):
        self.source, self.indices, self.label_map = source, indices, label_map
        self.seed, self.shuffle, self.train = seed, shuffle, train
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.first_row = process_index * self.local_batch_size  # of this process in a global batch
        self.steps_per_epoch = steps_per_epoch
        self.image_size, self.test_resize, self.transform = image_size, test_resize, transform
        self.image_key, self.label_key = image_key, label_key
        self._order: tuple[int, np.ndarray] | None = None  # the last epoch's order, per process

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_order": None}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Source rows in the order of ``epoch`` (the same in every process)."""
        cached = self._order
        if cached is not None and cached[0] == epoch:
            return cached[1]
        if self.shuffle:
            order = self.indices[np.random.default_rng([self.seed, epoch]).permutation(self.indices.size)]
        else:
            order = self.indices
        self._order = (epoch, order)
        return order

    def load_example(self, epoch: int, position: int, row: int) -> tuple[np.ndarray, int]:
        """Decode and transform source row ``row`` at global ``position`` of ``epoch``."""
        example = self.source[int(row)]
        label = self.label_map(int(np.asarray(example[self.label_key])))
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, position])
            image = train_transform(example[self.image_key], rng, image_size=self.image_size,
                                    **self.transform)
        else:
            image = eval_transform(example[self.image_key], image_size=self.image_size,
                                   resize=self.test_resize)
        return image, label

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        """Image, label and mask of ``slot`` (a zero image with mask False past the last example)."""
        g, i = divmod(int(slot), self.local_batch_size)
        epoch, step = divmod(g, self.steps_per_epoch)
        position = step * self.batch_size + self.first_row + i
        if position >= self.indices.size:  # padding of the last evaluation batch
            size = self.image_size
            return {"images": np.zeros((size, size, 3), np.uint8), "labels": np.zeros((), np.int32),
                    "mask": np.zeros((), bool)}
        image, label = self.load_example(epoch, position, self.epoch_order(epoch)[position])
        return {"images": image, "labels": np.asarray(label, np.int32), "mask": np.ones((), bool)}
