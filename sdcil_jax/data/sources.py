"""Random-access image sources: ``source[i] -> {'image': uint8 array or encoded bytes, 'label': int}``.

What the host pipeline reads from (any object with ``__len__`` and ``__getitem__`` of this form works,
``tfds.data_source`` included) and what evaluation batches are cut from. The sources here pickle for
grain's worker processes without copying large arrays into every worker (see
:class:`_ShareLargeArrays`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np

SHARE_BYTES = 64 << 20


class _MappedArray:
    """Stands for a large array in a pickled source: the path of its temporary .npy file."""

    def __init__(self, path: str):
        self.path = path


class _ShareLargeArrays:
    """Pickling for sources that hold large numpy arrays (grain pickles the source into every worker
    process). Arrays of ``SHARE_BYTES`` or more are written once to a temporary folder, deleted with
    the source object, and unpickled as read-only memory maps; the rest pickles as usual. The arrays
    must not change after the first pickling."""

    _array_fields: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "_array_files"}
        for name in self._array_fields:
            array = state[name]
            if isinstance(array, np.ndarray) and not isinstance(array, np.memmap) \
                    and array.nbytes >= SHARE_BYTES:
                state[name] = _MappedArray(self._array_file(name, array))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if isinstance(value, _MappedArray):
                state[name] = np.load(value.path, mmap_mode="r")
        self.__dict__.update(state)

    def _array_file(self, name: str, array: np.ndarray) -> str:
        files = self.__dict__.setdefault("_array_files", {})
        if not files:
            files[""] = tempfile.mkdtemp(prefix="sdcil_source_")
            weakref.finalize(self, shutil.rmtree, files[""], True)
        if name not in files:
            path = os.path.join(files[""], f"{name}.npy")
            np.save(path, array)
            files[name] = path
        return files[name]


class PoolSource(_ShareLargeArrays):
    """A task's pool for the host pipeline: real training rows, then synthetic images.

    ``pool[i]`` for ``i < n_real`` is training example ``train_rows[i]`` of the dataset; after that
    ``synth_images[i - n_real]``: a uint8 array, or a random-access reader over the replay store
    (:class:`~sdcil_jax.generation.shards.StoreReader`, which decodes each image when asked and
    pickles in a few KB). Labels are the incremental labels of the pool. Picklable for grain's
    worker processes (see :class:`_ShareLargeArrays`; ``tfds.data_source`` pickles by reference to
    its files).
    """

    _array_fields = ("train_rows", "synth_images", "labels")

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


class ArraySource(_ShareLargeArrays):
    """uint8 images (N, H, W, C) with labels as a random-access source (picklable for grain's worker
    processes, see :class:`_ShareLargeArrays`)."""

    _array_fields = ("images", "labels")

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[int(i)], "label": int(self.labels[int(i)])}
