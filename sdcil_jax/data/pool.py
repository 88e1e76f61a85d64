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
                     relabel, image_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[start, start + count)`` of each dataset class in ``class_ids`` from the replay
    store, with their incremental labels (``relabel`` maps dataset ids to incremental ones)."""
    empty = (np.zeros((0, *image_shape), np.uint8), np.zeros((0,), np.int32))
    if store is None or not len(class_ids) or count == 0:
        return empty
    images, labels = [], []
    for c in class_ids:
        x = store.load(int(c), start + count)[start:]
        images.append(x)
        labels.append(np.full((len(x),), relabel(np.asarray([c]))[0], np.int32))
    return np.concatenate(images), np.concatenate(labels)


def build_pool(dataset: Dataset, train_idx: np.ndarray, train_labels: np.ndarray,
               synth_images: np.ndarray, synth_labels: np.ndarray) -> TaskPool:
    """The pool of one task: real rows ``train_idx`` (incremental labels ``train_labels``), then the
    synthetic images."""
    n_real = len(train_idx)
    labels = np.concatenate([train_labels, synth_labels]).astype(np.int32)
    if dataset.in_memory:
        images = np.concatenate([dataset.train.images[train_idx], synth_images])
        return TaskPool(labels, n_real, n_real + len(synth_images), ArraySource(images, labels),
                        images)
    source = PoolSource(dataset.train.source, train_idx, synth_images, labels)
    return TaskPool(labels, n_real, n_real + len(synth_images), source)


def array_items(dataset: Dataset, images: np.ndarray, labels: np.ndarray) -> TaskPool:
    """Loose uint8 images (e.g. held-out synthetic images) as a pool of the dataset's kind."""
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
