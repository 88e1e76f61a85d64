"""Load image classification datasets fully into numpy arrays.

``digits`` is the embedded offline dataset (see :mod:`sdcil_jax.data.digits`); every other name
goes to tensorflow-datasets' random-access ``tfds.data_source`` (ArrayRecord files, no TensorFlow
needed to read). Preparing a real tfds dataset needs TensorFlow and the network (the ``prepare``
extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from sdcil_jax.data import digits as digits_lib
from sdcil_jax.data.resources import cifar100_class_names, imagenet_lemmas
from sdcil_jax.errors import DataError

DIGITS = "digits"
_READ_CHUNK = 4096


@dataclasses.dataclass
class Dataset:
    """A dataset in memory: uint8 images ``(N, H, W, C)``, int32 labels (dataset label ids)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]  # readable name of each dataset label id
    num_classes: int
    image_shape: tuple[int, int, int]


def _base_name(name: str) -> str:
    """'imagenet_resized/32x32:0.1.0' -> 'imagenet_resized'."""
    return name.split("/")[0].split(":")[0].strip().lower()


def _shown_dir(data_dir: str) -> str:
    if data_dir:
        return data_dir
    try:
        return str(tfds.core.constants.get_default_data_dir())
    except Exception:  # noqa: BLE001 - only used to word a message
        return "the default tfds data dir"


def _unknown(name: str) -> DataError:
    return DataError(
        f"Unknown dataset {name!r}: it is not a registered tfds builder; use '{DIGITS}' (embedded, "
        "offline) or the name of any prepared tfds image classification dataset, e.g. 'cifar100'."
    )


def _not_prepared(name: str, data_dir: str) -> DataError:
    where = _shown_dir(data_dir)
    return DataError(
        f"Dataset {name} is not prepared in {where}; run `python -m sdcil_jax.main --config "
        f"<your config> --mode prepare` (or `tfds build {name} --file_format=array_record "
        f"--data_dir={where}`) with the `prepare` extra installed."
    )


def _diagnose(name: str, data_dir: str, exc: Exception) -> DataError:
    """Turn a failure of ``tfds.data_source`` into one clear :class:`DataError`."""
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        return _unknown(name)
    except Exception:  # noqa: BLE001 - fall through to the generic message
        builder = None
    if builder is not None:
        if not builder.is_prepared():
            return _not_prepared(name, data_dir)
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            return DataError(
                f"Dataset {name} in {builder.data_dir} is stored as "
                f"{builder.info.file_format.value}, which has no random access; re-prepare it with "
                f"`tfds build {name} --file_format=array_record` into another data_dir."
            )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(
        f"Dataset {name} could not be opened from {_shown_dir(data_dir)} ({first_line}); check "
        "dataset.name and dataset.data_dir."
    )


def _open(name: str, split: str, data_dir: str) -> Any:
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise _unknown(name) from exc
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - tfds raises many kinds; translate them for the user
        raise _diagnose(name, data_dir, exc) from exc


def _eval_split(name: str, source: Any) -> str:
    """'test' if present, else 'validation' (preferred for imagenet*, whose test is unlabelled)."""
    splits = list(source.dataset_info.splits.keys())
    preferred = ["test", "validation"]
    if _base_name(name).startswith("imagenet"):
        preferred.reverse()
    if not splits:  # e.g. under tfds.testing.mock_data: any split name works
        return preferred[0]
    for split in preferred:
        if split in splits:
            return split
    raise DataError(
        f"Dataset {name} has no 'test' or 'validation' split (it has {', '.join(splits)}); pick a "
        "dataset with a held-out evaluation split."
    )


def _records(source: Any, start: int, stop: int) -> list[dict]:
    keys = list(range(start, stop))
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            return list(getitems(keys))
        except TypeError:  # some sources (tfds mock data) only support single-item access
            pass
    return [source[i] for i in keys]


def _read_split(name: str, source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Read every record of ``source`` into ``(images uint8 (N, H, W, C), labels int32 (N,))``."""
    n = len(source)
    images: np.ndarray | None = None
    labels = np.empty((n,), dtype=np.int32)
    for start in range(0, n, _READ_CHUNK):
        stop = min(n, start + _READ_CHUNK)
        for i, record in enumerate(_records(source, start, stop), start=start):
            if "image" not in record or "label" not in record:
                raise DataError(
                    f"Dataset {name} has features {', '.join(sorted(record))}, not 'image' and "
                    "'label'; use an image classification dataset."
                )
            image = np.asarray(record["image"])
            if image.ndim == 2:
                image = image[..., None]
            if images is None:
                if image.dtype != np.uint8 or image.ndim != 3:
                    raise DataError(
                        f"Dataset {name} has images of shape {image.shape} and dtype "
                        f"{image.dtype}; this library needs uint8 images of shape (H, W, C)."
                    )
                images = np.empty((n,) + image.shape, dtype=np.uint8)
            if image.shape != images.shape[1:]:
                raise DataError(
                    f"Dataset {name} has images of different sizes ({images.shape[1:]} and "
                    f"{image.shape}); use a fixed-size variant such as imagenet_resized/32x32."
                )
            images[i] = image
            labels[i] = int(np.asarray(record["label"]))
    if images is None:
        raise DataError(f"Dataset {name} has an empty split; check that it was fully prepared.")
    return images, labels


def _label_names(source: Any) -> tuple[list[str] | None, int | None]:
    try:
        feature = source.dataset_info.features["label"]
    except Exception:  # noqa: BLE001 - no info or no label feature: fall back to ids
        return None, None
    if isinstance(feature, tfds.features.ClassLabel):
        return list(feature.names), int(feature.num_classes)
    return None, None


def readable_class_names(name: str, label_names: list[str] | None, num_classes: int) -> list[str]:
    """Readable class names by label id (packaged names for cifar100/digits, lemmas for wnids)."""
    base = _base_name(name)
    if base in (DIGITS, digits_lib.DIGITS_NAME):
        return list(digits_lib.DIGITS_CLASS_NAMES)
    if base == "cifar100" and num_classes == 100:
        return cifar100_class_names()
    if label_names and len(label_names) == num_classes:
        lemmas = imagenet_lemmas()
        if all(n in lemmas for n in label_names):  # imagenet2012, imagenet_resized, ...
            return [lemmas[n] for n in label_names]
        return [n.replace("_", " ") for n in label_names]
    return [str(i) for i in range(num_classes)]


def _check_labels(name: str, split: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"Dataset {name} split {split} has labels outside 0..{num_classes - 1} (e.g. "
            f"{int(labels.min())}); use a dataset whose evaluation split is labelled."
        )


def load_dataset(name: str, data_dir: str = "") -> Dataset:
    """Load ``name`` ('digits' or a prepared tfds image classification dataset) fully into memory.

    ``data_dir`` is the tfds data dir ('' = ``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    'digits' is prepared there on first use (no TensorFlow, no network); other datasets must already
    be prepared in ArrayRecord format. Raises :class:`DataError` for unknown or unprepared datasets.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"Dataset name {name!r} is empty; set dataset.name, e.g. to '{DIGITS}'.")
    name = name.strip()
    if _base_name(name) in (DIGITS, digits_lib.DIGITS_NAME):
        builder = digits_lib.digits_builder(data_dir)
        train_src = builder.as_data_source(split="train")
        test_src = builder.as_data_source(split="test")
        display = DIGITS
    else:
        train_src = _open(name, "train", data_dir)
        eval_split = _eval_split(name, train_src)
        test_src = _open(name, eval_split, data_dir)
        display = name
    train_images, train_labels = _read_split(display, train_src)
    test_images, test_labels = _read_split(display, test_src)
    if test_images.shape[1:] != train_images.shape[1:]:
        raise DataError(
            f"Dataset {display} has train images {train_images.shape[1:]} but test images "
            f"{test_images.shape[1:]}; use a dataset with one image size."
        )
    label_names, num_classes = _label_names(train_src)
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    _check_labels(display, "train", train_labels, num_classes)
    _check_labels(display, "test", test_labels, num_classes)
    return Dataset(
        name=display,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=readable_class_names(display, label_names, num_classes),
        num_classes=num_classes,
        image_shape=tuple(int(s) for s in train_images.shape[1:]),
    )


def dataset_num_classes(name: str, data_dir: str = "") -> int:
    """Number of classes of ``name`` from its builder's metadata (reads and prepares nothing)."""
    if _base_name(name) in (DIGITS, digits_lib.DIGITS_NAME):
        return digits_lib.DIGITS_NUM_CLASSES
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise _unknown(name) from exc
    feature = builder.info.features["label"] if "label" in builder.info.features else None
    if not isinstance(feature, tfds.features.ClassLabel):
        raise DataError(
            f"Dataset {name} has no ClassLabel 'label' feature, so its number of classes is "
            "unknown; use an image classification dataset."
        )
    return int(feature.num_classes)


def prepare_dataset(name: str, data_dir: str = "") -> str:
    """Prepare ``name`` in ArrayRecord format under ``data_dir``; return the prepared folder.

    'digits' needs nothing else; other tfds datasets need TensorFlow (the ``prepare`` extra) and,
    depending on the dataset, the network or a manual download. See :mod:`sdcil_jax.data.prepare`.
    """
    from sdcil_jax.data.prepare import prepare_dataset as _prepare  # prepare imports this module

    return _prepare(name, data_dir).path


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
