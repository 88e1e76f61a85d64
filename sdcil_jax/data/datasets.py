"""Datasets as the training code sees them: two splits of labelled images, in memory or on disk.

One type for every size. A :class:`Split` always has its dataset labels and a random-access
``source`` (``source[i] -> {'image', 'label'}``); CIFAR-size splits also hold every image in memory
(``images``, uint8 ``(N, H, W, C)``), which the device pipeline keeps on the accelerators; ImageNet-size
splits stay on disk and are decoded by the host pipeline. :func:`resolve_pipeline` decides which,
from ``dataset.pipeline`` ('auto' picks 'host' for ``imagenet2012``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdcil_jax.data import digits as digits_lib
from sdcil_jax.data import tfds_io
from sdcil_jax.data.sources import ArraySource
from sdcil_jax.errors import DataError


@dataclasses.dataclass
class Split:
    """One split: dataset labels, a random-access source and, in memory, the images themselves."""

    labels: np.ndarray  # (N,) int32 dataset label ids
    source: Any  # source[i] -> {'image': ..., 'label': ...}
    images: np.ndarray | None = None  # (N, H, W, C) uint8 when held in memory

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class Dataset:
    """A dataset: train and test splits, class names, and the two image shapes that matter.

    ``image_shape`` is the shape of a stored image (the in-memory images; on disk, the
    ``test_resize`` square at which synthetic images are stored so the same crops apply to them);
    ``input_shape`` is what the network sees (``image_size`` square for the host pipeline).
    """

    name: str
    train: Split
    test: Split
    class_names: list[str]  # readable name of each dataset label id
    num_classes: int
    image_shape: tuple[int, int, int]
    input_shape: tuple[int, int, int]

    @property
    def in_memory(self) -> bool:
        return self.train.images is not None

    def read_train_images(self, rows: np.ndarray) -> np.ndarray:
        """uint8 training images ``rows`` at ``image_shape`` (on disk: resized + centre-cropped)."""
        rows = np.asarray(rows, np.int64)
        if self.in_memory:
            return self.train.images[rows]
        from sdcil_jax.data.transforms import eval_transform

        side = self.image_shape[0]
        if not len(rows):
            return np.zeros((0, *self.image_shape), np.uint8)
        return np.stack([eval_transform(self.train.source[int(r)]["image"], image_size=side,
                                        resize=side) for r in rows])


def resolve_pipeline(dataset_cfg: Any) -> str:
    """'device' (uint8 images on the accelerators) or 'host' (decode + augment on the host)."""
    choice = dataset_cfg.pipeline
    if choice == "auto":
        return "host" if tfds_io.base_name(dataset_cfg.name).startswith("imagenet2012") else "device"
    return choice


def load_dataset(name: str, data_dir: str = "", *, pipeline: str = "device", image_size: int = 224,
                 test_resize: int = 256, progress: bool = True) -> Dataset:
    """Open ``name`` ('digits' or a prepared tfds image classification dataset).

    ``pipeline='device'`` reads every image into memory; ``'host'`` keeps images on disk (labels are
    read once and cached) for the host pipeline, whose crops are ``image_size`` and whose stored
    size is ``test_resize``. ``data_dir`` is the tfds data dir ('' = ``TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``); 'digits' is prepared there on first use (no TensorFlow, no network).
    Raises :class:`DataError` for unknown, unprepared or unusable datasets.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"Dataset name {name!r} is empty; set dataset.name, e.g. to "
                        f"'{tfds_io.DIGITS}'.")
    name = name.strip()
    if pipeline == "host":
        return _load_on_disk(name, data_dir, image_size, test_resize, progress)
    return _load_in_memory(name, data_dir)


def _load_in_memory(name: str, data_dir: str) -> Dataset:
    if tfds_io.is_digits(name):
        builder = digits_lib.digits_builder(data_dir)
        train_src = builder.as_data_source(split="train")
        test_src = builder.as_data_source(split="test")
        display = tfds_io.DIGITS
    else:
        train_src = tfds_io.open_split(name, "train", data_dir)
        test_src = tfds_io.open_split(name, tfds_io.eval_split_name(name, train_src), data_dir)
        display = name
    train_images, train_labels = tfds_io.read_split(display, train_src)
    test_images, test_labels = tfds_io.read_split(display, test_src)
    if test_images.shape[1:] != train_images.shape[1:]:
        raise DataError(
            f"Dataset {display} has train images {train_images.shape[1:]} but test images "
            f"{test_images.shape[1:]}; use a dataset with one image size."
        )
    names, num_classes = tfds_io.label_names(train_src)
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    tfds_io.check_labels(display, "train", train_labels, num_classes)
    tfds_io.check_labels(display, "test", test_labels, num_classes)
    shape = tuple(int(s) for s in train_images.shape[1:])
    return Dataset(
        name=display,
        train=Split(train_labels, ArraySource(train_images, train_labels), train_images),
        test=Split(test_labels, ArraySource(test_images, test_labels), test_images),
        class_names=tfds_io.readable_class_names(display, names, num_classes),
        num_classes=num_classes, image_shape=shape, input_shape=shape,
    )


def _load_on_disk(name: str, data_dir: str, image_size: int, test_resize: int,
                  progress: bool) -> Dataset:
    if tfds_io.is_digits(name):  # decoded arrays; small, but exercises the host pipeline offline
        builder = digits_lib.digits_builder(data_dir)
        name, eval_split = tfds_io.DIGITS, "test"
        train = train_source = builder.as_data_source(split="train")
        test_source = builder.as_data_source(split="test")
    else:
        train = tfds_io.open_split(name, "train", data_dir)  # clear unknown / not-prepared errors
        eval_split = tfds_io.eval_split_name(name, train)
        train_source = tfds_io.open_encoded(name, "train", data_dir)
        test_source = tfds_io.open_encoded(name, eval_split, data_dir)
    names, num_classes = tfds_io.label_names(train)
    train_labels = tfds_io.read_labels(train_source, name, "train", data_dir, progress)
    test_labels = tfds_io.read_labels(test_source, name, eval_split, data_dir, progress)
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1)) + 1)
    tfds_io.check_labels(name, "train", train_labels, num_classes)
    return Dataset(
        name=name, train=Split(train_labels, train_source), test=Split(test_labels, test_source),
        class_names=tfds_io.readable_class_names(name, names, num_classes),
        num_classes=num_classes, image_shape=(test_resize, test_resize, 3),
        input_shape=(image_size, image_size, 3),
    )


def apply_class_name_overrides(class_names: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """Return ``class_names`` (readable names by label id) with ``'ID=readable name'`` overrides.

    ``overrides`` is ``config.dataset.class_names``, e.g. ``["12=red bridge", "134=crane bird"]``
    (ImageNet has two classes whose first lemma is 'crane' and two 'maillot'). Raises
    :class:`DataError` for a malformed entry, an id outside the dataset's label ids, an empty name or
    an id given twice.
    """
    names = [str(n) for n in class_names]
    given: dict[int, str] = {}
    for item in overrides:
        head, sep, text = str(item).partition("=")
        head, text = head.strip(), text.strip()
        if not sep or not head.isdigit():
            raise DataError(
                f"dataset.class_names entry {item!r} must look like 'ID=readable name', e.g. "
                "'30=dolphin'."
            )
        class_id = int(head)
        if class_id >= len(names):
            raise DataError(
                f"dataset.class_names entry {item!r} names class {class_id}, but the dataset's label "
                f"ids are 0..{len(names) - 1}; use a label id of this dataset."
            )
        if not text:
            raise DataError(f"dataset.class_names entry {item!r} has an empty name; write one after '='.")
        if class_id in given:
            raise DataError(
                f"dataset.class_names names class {class_id} twice ({given[class_id]!r} and "
                f"{text!r}); keep one entry per class."
            )
        given[class_id] = text
        names[class_id] = text
    return names


def holdout_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``per_class`` training images of every class; return ``(train_idx, holdout_idx)``.

    Each class's indices are shuffled with ``np.random.default_rng([seed, class_id])`` (so a class's
    holdout does not depend on which other classes exist) and the first ``per_class`` are held out.
    Both index arrays are sorted ascending. Raises :class:`DataError` if a class has ``per_class``
    or fewer images (nothing would be left to train on).
    """
    labels = np.asarray(labels)
    if per_class < 0:
        raise DataError(f"holdout per_class={per_class} is negative; use 0 or more.")
    if per_class == 0:
        return np.arange(len(labels), dtype=np.int64), np.zeros((0,), dtype=np.int64)
    train, holdout = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise DataError(
                f"Class {int(c)} has only {len(members)} training images, too few to hold out "
                f"{per_class}; lower dataset.holdout_per_class below {len(members)}."
            )
        shuffled = np.random.default_rng([int(seed) % 2**63, int(c) % 2**63]).permutation(members)
        holdout.append(shuffled[:per_class])
        train.append(shuffled[per_class:])
    return (np.sort(np.concatenate(train)).astype(np.int64),
            np.sort(np.concatenate(holdout)).astype(np.int64))
