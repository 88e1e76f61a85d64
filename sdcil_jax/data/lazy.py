"""ImageNet-size datasets that stay on disk: random-access tfds sources plus their labels.

Images are decoded only by the host pipeline (:mod:`sdcil_jax.data.host_pipeline`); what is held in
memory is the label arrays (read once, cached under ``~/.cache/sdcil_jax/labels``) and the readable
class names. The replay store holds synthetic images at ``test_resize`` x ``test_resize`` so the same
random-resized crop / centre crop applies to real and synthetic images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sdcil_jax.data import datasets as ds_lib
from sdcil_jax.data.transforms import tfds_source
from sdcil_jax.errors import DataError

_CHUNK = 1024
# Arrays of a source at least this large reach grain's worker processes as a memory-mapped temporary
# .npy file, written once per source object, instead of as a pickled copy per worker and iteration.
SHARE_BYTES = 64 << 20


@dataclasses.dataclass
class LazyDataset:
    """Like :class:`~sdcil_jax.data.datasets.Dataset`, but images are read on demand."""

    name: str
    train_source: Any
    test_source: Any
    train_labels: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    num_classes: int
    image_shape: tuple[int, int, int]  # shape of stored synthetic images (test_resize^2 x 3)
    model_shape: tuple[int, int, int]  # network input (image_size^2 x 3)


def _open_source(name: str, split: str, data_dir: str):
    """Encoded-bytes source if tfds can skip decoding, else decoded (e.g. under mock_data)."""
    last: Exception | None = None
    for decode in (False, True):
        try:
            source = tfds_source(name, split, data_dir or None, decode=decode)
            if len(source):
                source[0]
            return source
        except Exception as exc:  # noqa: BLE001 - tfds raises many kinds; retry decoded, then report
            last = exc
    raise ds_lib._diagnose(name, data_dir, last) from last


def _labels(source: Any, name: str, split: str, data_dir: str, progress: bool) -> np.ndarray:
    n = len(source)
    probe = [int(source[i]["label"]) for i in sorted({0, n // 3, n // 2, n - 1} & set(range(n)))]
    key = hashlib.sha256(f"{name}|{split}|{n}|{data_dir}|{probe}".encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser("~/.cache/sdcil_jax/labels"), f"{name}-{split}-{key}.npy")
    if os.path.exists(cache):
        try:
            return np.load(cache)
        except (OSError, ValueError):
            pass  # a damaged cache is simply rebuilt
    out = np.empty((len(source),), np.int32)
    getitems = getattr(source, "__getitems__", None)
    for start in tqdm(range(0, len(source), _CHUNK), desc=f"reading {name}/{split} labels",
                      disable=not progress or len(source) < 20 * _CHUNK, leave=False):
        rows = range(start, min(start + _CHUNK, len(source)))
        records = getitems(list(rows)) if getitems else [source[i] for i in rows]
        out[start:start + len(records)] = [int(r["label"]) for r in records]
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = cache + f".tmp{os.getpid()}.npy"
        np.save(tmp, out)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs a re-read next time
    return out


def load_lazy_dataset(name: str, data_dir: str, *, image_size: int, test_resize: int,
                      progress: bool = True) -> LazyDataset:
    """Open a prepared tfds image dataset for the host pipeline."""
    name = name.strip()
    if ds_lib._base_name(name) in ("digits", "sdcil_digits"):
        raise DataError("Dataset digits is tiny; use dataset.pipeline='device' (or 'auto') for it.")
    train = ds_lib._open(name, "train", data_dir)  # raises the clear unknown / not-prepared errors
    eval_split = ds_lib._eval_split(name, train)
    train_source = _open_source(name, "train", data_dir)
    test_source = _open_source(name, eval_split, data_dir)
    label_names, num_classes = ds_lib._label_names(train)
    train_labels = _labels(train_source, name, "train", data_dir, progress)
    test_labels = _labels(test_source, name, eval_split, data_dir, progress)
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1)) + 1)
    ds_lib._check_labels(name, "train", train_labels, num_classes)
    class_names = ds_lib.readable_class_names(name, label_names, num_classes)
    return LazyDataset(name=name, train_source=train_source, test_source=test_source,
                       train_labels=train_labels, test_labels=test_labels, class_names=class_names,
                       num_classes=num_classes, image_shape=(test_resize, test_resize, 3),
                       model_shape=(image_size, image_size, 3))


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
    """A task's pool for the host pipeline: real training rows, then in-memory synthetic images.

    ``pool[i]`` for ``i < n_real`` is training example ``train_rows[i]`` of the dataset; after that
    the synthetic images. Labels are the incremental labels of the pool. Picklable for grain's
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
