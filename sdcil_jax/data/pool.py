"""A task's pool of images (real training images, then synthetic ones) and the input normalisation.

Every index the training code handles (batches, exemplar memory, balanced finetuning set) is a
position in the task's :class:`TaskPool`: positions ``[0, n_real)`` are the usable real training
images (``train_idx`` of the dataset, holdout removed), ``[synth_lo, synth_hi)`` the synthetic images
of the old classes. Labels are incremental (position in the class order; -1 outside the scenario).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdcil_jax.data.datasets import Dataset
from sdcil_jax.data.sources import ArraySource, PoolSource

# torchvision's ImageNet normalisation: the host pipeline's default when the config gives none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class TaskPool:
    """Real training images then synthetic ones; ``images`` is set when they are held in memory."""

    labels: np.ndarray  # (N,) int32 incremental labels
    synth_lo: int
    synth_hi: int
    source: Any  # random access over the same positions
    images: np.ndarray | None = None  # (N, H, W, C) uint8 (CIFAR-size)

    def __len__(self) -> int:
        return len(self.labels)


def synthetic_images(store, class_ids: Sequence[int], start: int, count: int,
                     relabel, image_shape: Sequence[int], lazy: bool = False) -> tuple[Any, np.ndarray]:
    """Images ``[start, start + count)`` of each dataset class in ``class_ids`` from the replay
    store, with their incremental labels (``relabel`` maps dataset ids to incremental ones).

    The images are a uint8 array (N, H, W, C) in memory, or with ``lazy`` a random-access reader
    over the store's files (``reader[i]`` decodes image ``i`` on demand), so that a pool of any size
    costs no host memory.
    """
    empty = (np.zeros((0, *image_shape), np.uint8), np.zeros((0,), np.int32))
    if store is None or not len(class_ids) or count == 0:
        return empty
    labels = np.repeat(relabel(np.asarray(class_ids)), count).astype(np.int32)
    if lazy:
        return store.reader([int(c) for c in class_ids], start, count), labels
    images = [store.load(int(c), start + count)[start:] for c in class_ids]
    return np.concatenate(images), labels


def task_synthetic(dataset: Dataset, store, class_ids: Sequence[int], start: int, count: int,
                   relabel) -> tuple[Any, np.ndarray]:
    """:func:`synthetic_images` as the dataset's pipeline wants them: in memory for the device
    pipeline (the pool lives on the devices), read on demand for the host pipeline."""
    return synthetic_images(store, class_ids, start, count, relabel, dataset.image_shape,
                            lazy=not dataset.in_memory)


def build_pool(dataset: Dataset, train_idx: np.ndarray, train_labels: np.ndarray,
               synth_images: Any, synth_labels: np.ndarray) -> TaskPool:
    """The pool of one task: real rows ``train_idx`` (incremental labels ``train_labels``), then the
    synthetic images (an array in memory, or a random-access reader for the host pipeline)."""
    n_real = len(train_idx)
    labels = np.concatenate([train_labels, synth_labels]).astype(np.int32)
    if dataset.in_memory:
        images = np.concatenate([dataset.train.images[train_idx], synth_images])
        return TaskPool(labels, n_real, n_real + len(synth_images), ArraySource(images, labels),
                        images)
    source = PoolSource(dataset.train.source, train_idx, synth_images, labels)
    return TaskPool(labels, n_real, n_real + len(synth_images), source)


def array_items(dataset: Dataset, images: Any, labels: np.ndarray) -> TaskPool:
    """Loose uint8 images (e.g. held-out synthetic images: an array, or a reader for the host
    pipeline) as a pool of the dataset's kind."""
    return TaskPool(np.asarray(labels, np.int32), len(labels), len(labels),
                    ArraySource(images, labels), images if dataset.in_memory else None)


def normalisation(dataset_cfg: Any, dataset: Dataset,
                  train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of [0, 1] pixels: the config's, else computed from the training
    images (in memory; std + 1e-6), else ImageNet's (host pipeline)."""
    if len(dataset_cfg.mean):
        mean, std = dataset_cfg.mean, dataset_cfg.std
    elif dataset.in_memory:
        flat = dataset.train.images[train_idx].reshape(-1, dataset.image_shape[-1])
        mean, std = flat.mean(0) / 255.0, flat.std(0) / 255.0 + 1e-6
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)
