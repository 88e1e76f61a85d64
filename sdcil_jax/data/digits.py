"""The embedded offline dataset: scikit-learn's 1797 real 8x8 handwritten digits as a tfds builder.

The builder stores ``tfds.features.Tensor`` images (no image encoding) in ArrayRecord files, so it
prepares without TensorFlow and without network access. The train/test split is fixed and
stratified: within each class, the examples at positions 0, 5, 10, ... (original scikit-learn order)
form the test split (364 images), the rest the train split (1433 images).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

DIGITS_NAME = "sdcil_digits"
DIGITS_NUM_CLASSES = 10
DIGITS_IMAGE_SHAPE = (8, 8, 1)
# Every TEST_EVERY-th example of each class (in scikit-learn order) goes to the test split.
TEST_EVERY = 5
# Readable class names (used in prompts), by label id.
DIGITS_CLASS_NAMES = [f"handwritten digit {i}" for i in range(DIGITS_NUM_CLASSES)]


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(images uint8 (1797, 8, 8, 1), labels int64 (1797,), is_test bool (1797,))``.

    Images are scikit-learn's 0..16 intensities scaled to 0..255 with rounding; ``is_test`` marks
    the fixed stratified test split.
    """
    from sklearn.datasets import load_digits  # local import: only needed when preparing

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    position = np.zeros(len(labels), dtype=np.int64)
    for c in range(DIGITS_NUM_CLASSES):
        members = labels == c
        position[members] = np.arange(int(members.sum()))
    is_test = position % TEST_EVERY == 0
    return images, labels, is_test


class SdcilDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits (8x8 grayscale, 10 classes), fixed stratified split."""

    name = DIGITS_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No checksums file (nothing is downloaded). Also keeps tfds from computing the code path, which
    # needs the `importlib_resources` backport that tfds only declares for Python < 3.9.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self, ...) directly: dataset_info_from_configs would look for metadata
        # files next to this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn load_digits(): 1797 8x8 handwritten digits, 0..255.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=DIGITS_IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(
                        names=[str(i) for i in range(DIGITS_NUM_CLASSES)]
                    ),
                    "index": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep records in scikit-learn order (within each split), not tfds' key-hash order.
            disable_shuffling=True,
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # the data ships with scikit-learn
        return {"train": self._generate_examples(test=False),
                "test": self._generate_examples(test=True)}

    def _generate_examples(self, test: bool) -> Iterator[tuple[int, dict]]:
        images, labels, is_test = digits_arrays()
        for i in np.flatnonzero(is_test == test):
            yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}


def digits_builder(data_dir: str = "", prepare: bool = True) -> SdcilDigits:
    """The digits builder rooted at ``data_dir`` ('' = the tfds default), prepared on first use."""
    builder = SdcilDigits(data_dir=data_dir or None, file_format="array_record")
    if prepare and not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception:
            # Several processes (e.g. JAX multi-host) may prepare the same shared folder at once:
            # tfds writes into a temporary folder and renames it, so the loser of the race fails
            # here while the data is in place.
            if not builder.is_prepared():
                raise
    return builder
