"""Reading tensorflow-datasets splits without TensorFlow, and turning tfds failures into one sentence.

``digits`` (the embedded offline dataset, :mod:`sdcil_jax.data.digits`) and every prepared tfds image
classification dataset are opened with ``tfds.data_source`` (ArrayRecord files, random access). What
this module offers: open a split (:func:`open_split`), read a whole small split into arrays
(:func:`read_split`), open a split whose images are decoded later by the host pipeline
(:func:`open_encoded`), read only its labels (cached, :func:`read_labels`), readable class names, and
clear :class:`~sdcil_jax.errors.DataError` messages for unknown, unprepared or unusable datasets.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tqdm.auto import tqdm

from sdcil_jax.data import digits as digits_lib
from sdcil_jax.data.resources import cifar100_class_names, imagenet_lemmas
from sdcil_jax.errors import DataError

DIGITS = "digits"
_READ_CHUNK = 4096
_LABEL_CHUNK = 1024


def is_digits(name: str) -> bool:
    """True for the embedded offline dataset ('digits', also under its builder name)."""
    return base_name(name) in (DIGITS, digits_lib.DIGITS_NAME)


def base_name(name: str) -> str:
    """'imagenet_resized/32x32:0.1.0' -> 'imagenet_resized'."""
    return name.split("/")[0].split(":")[0].strip().lower()


def _shown_dir(data_dir: str) -> str:
    if data_dir:
        return data_dir
    try:
        return str(tfds.core.constants.get_default_data_dir())
    except Exception:  # noqa: BLE001 - only used to word a message
        return "the default tfds data dir"


def unknown_dataset(name: str) -> DataError:
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


def diagnose(name: str, data_dir: str, exc: Exception) -> DataError:
    """Turn a failure of ``tfds.data_source`` into one clear :class:`DataError`."""
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        return unknown_dataset(name)
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


def open_split(name: str, split: str, data_dir: str) -> Any:
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise unknown_dataset(name) from exc
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - tfds raises many kinds; translate them for the user
        raise diagnose(name, data_dir, exc) from exc


def eval_split_name(name: str, source: Any) -> str:
    """'test' if present, else 'validation' (preferred for imagenet*, whose test is unlabelled)."""
    splits = list(source.dataset_info.splits.keys())
    preferred = ["test", "validation"]
    if base_name(name).startswith("imagenet"):
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


def read_split(name: str, source: Any) -> tuple[np.ndarray, np.ndarray]:
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


def label_names(source: Any) -> tuple[list[str] | None, int | None]:
    try:
        feature = source.dataset_info.features["label"]
    except Exception:  # noqa: BLE001 - no info or no label feature: fall back to ids
        return None, None
    if isinstance(feature, tfds.features.ClassLabel):
        return list(feature.names), int(feature.num_classes)
    return None, None


def readable_class_names(name: str, label_names: list[str] | None, num_classes: int) -> list[str]:
    """Readable class names by label id (packaged names for cifar100/digits, lemmas for wnids)."""
    base = base_name(name)
    if is_digits(base):
        return list(digits_lib.DIGITS_CLASS_NAMES)
    if base == "cifar100" and num_classes == 100:
        return cifar100_class_names()
    if label_names and len(label_names) == num_classes:
        lemmas = imagenet_lemmas()
        if all(n in lemmas for n in label_names):  # imagenet2012, imagenet_resized, ...
            return [lemmas[n] for n in label_names]
        return [n.replace("_", " ") for n in label_names]
    return [str(i) for i in range(num_classes)]


def check_labels(name: str, split: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"Dataset {name} split {split} has labels outside 0..{num_classes - 1} (e.g. "
            f"{int(labels.min())}); use a dataset whose evaluation split is labelled."
        )


def dataset_num_classes(name: str, data_dir: str = "") -> int:
    """Number of classes of ``name`` from its builder's metadata (reads and prepares nothing)."""
    if is_digits(name):
        return digits_lib.DIGITS_NUM_CLASSES
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise unknown_dataset(name) from exc
    feature = builder.info.features["label"] if "label" in builder.info.features else None
    if not isinstance(feature, tfds.features.ClassLabel):
        raise DataError(
            f"Dataset {name} has no ClassLabel 'label' feature, so its number of classes is "
            "unknown; use an image classification dataset."
        )
    return int(feature.num_classes)


def tfds_source(name: str, split: str, data_dir: str | None = None, *, decode: bool = False):
    """A ``tfds.data_source`` whose images come back encoded (``decode=False``) or decoded.

    Encoded bytes are decoded by the host pipeline's workers (no TensorFlow needed);
    ``tfds.testing.mock_data`` cannot encode images without TensorFlow, so it needs ``decode=True``.
    """
    decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)


def open_encoded(name: str, split: str, data_dir: str):
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
    raise diagnose(name, data_dir, last) from last


def read_labels(source: Any, name: str, split: str, data_dir: str, progress: bool) -> np.ndarray:
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
    for start in tqdm(range(0, len(source), _LABEL_CHUNK), desc=f"reading {name}/{split} labels",
                      disable=not progress or len(source) < 20 * _LABEL_CHUNK, leave=False):
        rows = range(start, min(start + _LABEL_CHUNK, len(source)))
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
