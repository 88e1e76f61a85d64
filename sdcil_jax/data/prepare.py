"""Prepare the datasets a config needs (``python -m sdcil_jax.main --mode prepare``).

``digits`` is the embedded builder: it prepares offline, without TensorFlow. Every other name is a
tfds builder, prepared with ``download_and_prepare`` into ``dataset.data_dir`` (''= the tfds default,
``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) in ArrayRecord format, the random-access format
:func:`sdcil_jax.data.load_dataset` reads without TensorFlow. Preparing image datasets needs TensorFlow
(image encoding: the ``prepare`` extra) and the network or, for ``imagenet2012`` (ImageNet-Subset and
ImageNet-1k), the two archives downloaded by hand from image-net.org into tfds' manual folder
``<data_dir>/downloads/manual/``.

Order of the checks, chosen so that the first failure is the most useful single message:

1. an already prepared dataset is reported ``already prepared`` and nothing else is checked (reading
   needs neither TensorFlow nor the archives);
2. missing manual archives (ImageNet): the slow step for the user (a ~150 GB download with an
   image-net.org account), so it is named first, with the exact folder and files; if TensorFlow is
   missing as well, the same message says to install the ``prepare`` extra too;
3. missing TensorFlow: names the ``prepare`` extra;
4. any failure of tfds itself (network, corrupt archive) becomes one :class:`DataError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
from typing import Any

import tensorflow_datasets as tfds

from sdcil_jax.data import digits as digits_lib
from sdcil_jax.data.tfds_io import DIGITS
from sdcil_jax.data.tfds_io import base_name as _base_name
from sdcil_jax.data.tfds_io import unknown_dataset as _unknown
from sdcil_jax.errors import DataError

# Files a user must download by hand, by tfds builder name. ImageNet-Subset and ImageNet-1k both read
# `imagenet2012` (the test archive is not needed: its labels are not public).
MANUAL_ARCHIVES: dict[str, tuple[str, ...]] = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
}
_MANUAL_SOURCE = {
    "imagenet2012": "ILSVRC2012, from https://image-net.org/download-images with a free account",
}
PREPARE_EXTRA = 'pip install -e ".[prepare]"'


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Outcome of preparing one dataset: where it is and whether this call prepared it."""

    name: str
    path: str
    status: str  # 'prepared' or 'already prepared'

    def line(self) -> str:
        return f"{self.name}: {self.status} in {self.path}"


def has_tensorflow() -> bool:
    """True if TensorFlow is importable (needed to *prepare* tfds image datasets, not to read them)."""
    return importlib.util.find_spec("tensorflow") is not None


def datasets_needed(config: Any) -> list[str]:
    """Names of the datasets ``config`` reads (today only ``dataset.name``)."""
    return [str(config.dataset.name).strip()]


def manual_dir(builder: Any) -> str:
    """tfds' default manual-download folder of ``builder``: ``<data_dir>/downloads/manual``."""
    return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def _no_tensorflow(name: str) -> DataError:
    return DataError(
        f"Preparing dataset {name} needs TensorFlow, which is not installed; install the `prepare` "
        f"extra ({PREPARE_EXTRA} in the repository root) to prepare {name}, then rerun --mode "
        "prepare (reading a prepared dataset needs no TensorFlow)."
    )


def _check_manual_archives(name: str, builder: Any) -> str | None:
    """Raise :class:`DataError` if ``name`` needs hand-downloaded archives that are not in place."""
    files = MANUAL_ARCHIVES.get(_base_name(name))
    if not files:
        return None
    folder = manual_dir(builder)
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        also = "" if has_tensorflow() else f", and install the `prepare` extra ({PREPARE_EXTRA})"
        raise DataError(
            f"Dataset {name} is prepared from archives downloaded by hand: put "
            f"{' and '.join(files)} ({_MANUAL_SOURCE[_base_name(name)]}) in the folder "
            f"{folder}/ (missing: {', '.join(missing)}){also}, then rerun --mode prepare."
        )
    return folder


@contextlib.contextmanager
def _quiet_absl():
    """Hide tfds' absl warnings about the not-yet-prepared folder it just looked into."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def prepare_dataset(name: str, data_dir: str = "") -> Prepared:
    """Prepare one dataset in ArrayRecord format under ``data_dir``; see the module docstring.

    Raises :class:`DataError` for an unknown name, missing TensorFlow, missing manual archives, a
    dataset already prepared in another file format, or a failed download/preparation.
    """
    name = str(name).strip()
    if _base_name(name) in (DIGITS, digits_lib.DIGITS_NAME):
        builder = digits_lib.digits_builder(data_dir, prepare=False)
        status = "already prepared" if builder.is_prepared() else "prepared"
        builder = digits_lib.digits_builder(data_dir)
        return Prepared(DIGITS, str(builder.data_dir), status)
    try:
        with _quiet_absl():
            builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
            prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise _unknown(name) from exc
    if prepared:
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise DataError(
                f"Dataset {name} in {builder.data_dir} is prepared as "
                f"{builder.info.file_format.value}, which has no random access; prepare it again "
                "into another dataset.data_dir (ArrayRecord is written there)."
            )
        return Prepared(name, str(builder.data_dir), "already prepared")
    manual = _check_manual_archives(name, builder)
    if not has_tensorflow():
        raise _no_tensorflow(name)
    config = tfds.download.DownloadConfig(manual_dir=manual) if manual else None
    try:
        builder.download_and_prepare(file_format="array_record", download_config=config)
    except Exception as exc:  # noqa: BLE001 - network, corrupt archive, ...: one line for the user
        raise DataError(
            f"Preparing dataset {name} in {builder.data_dir_root} failed ({_first_line(exc)}); fix "
            "the cause (network access, manual archives) and rerun --mode prepare."
        ) from exc
    return Prepared(name, str(builder.data_dir), "prepared")


def prepare(config: Any) -> list[str]:
    """Prepare every dataset ``config`` needs into ``config.dataset.data_dir``.

    Returns one line per dataset, ``'<name>: prepared in <folder>'`` or
    ``'<name>: already prepared in <folder>'``. Raises :class:`DataError` (one sentence naming the
    fix) when a prerequisite is missing.
    """
    return [prepare_dataset(name, config.dataset.data_dir).line() for name in datasets_needed(config)]
