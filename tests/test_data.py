"""Dataset loading: embedded digits builder, tfds mock data, user errors, holdout split."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sdcil_jax.data import Dataset, holdout_split, load_dataset
from sdcil_jax.data.digits import digits_arrays
from sdcil_jax.data.prepare import prepare_dataset
from sdcil_jax.data.resources import load_resource
from sdcil_jax.data.tfds_io import dataset_num_classes, readable_class_names
from sdcil_jax.errors import DataError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(digits_dir) -> Dataset:
    return load_dataset("digits", data_dir=digits_dir)


def test_digits_prepares_offline_without_tensorflow(digits, digits_dir):
    assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
    assert list((pathlib.Path(digits_dir) / "sdcil_digits").iterdir())
    assert len(digits.train.labels) + len(digits.test.labels) == 1797
    assert (len(digits.train.labels), len(digits.test.labels)) == (1433, 364)
    assert digits.num_classes == 10 and digits.image_shape == (8, 8, 1)
    for images in (digits.train.images, digits.test.images):
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
    assert digits.train.labels.dtype == np.int32
    assert set(np.unique(digits.test.labels)) == set(range(10))
    assert np.bincount(digits.test.labels).min() >= 35  # stratified: every 5th image of each class
    assert digits.class_names[3] == "handwritten digit 3"


def test_digits_images_equal_sklearn(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    # Image 0 of scikit-learn (the first zero) is the first test image, the second zero the first
    # train image.
    np.testing.assert_array_equal(
        digits.test.images[0, :, :, 0], np.round(raw.images[0] * 255 / 16).astype(np.uint8)
    )
    np.testing.assert_array_equal(
        digits.train.images[0, :, :, 0],
        np.round(raw.images[np.flatnonzero(raw.target == 0)[1]] * 255 / 16).astype(np.uint8),
    )
    images, labels, is_test = digits_arrays()
    np.testing.assert_array_equal(digits.train.images, images[~is_test])
    np.testing.assert_array_equal(digits.test.labels, labels[is_test])
    assert digits.train.images.max() == 255


def test_digits_second_load_reuses_prepared_data(digits, digits_dir):
    again = load_dataset("digits", data_dir=digits_dir)
    np.testing.assert_array_equal(again.train.images, digits.train.images)


def test_mock_cifar100(tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        ds = load_dataset("cifar100", data_dir=str(tmp_path))
    assert ds.train.images.shape == (24, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (24, 32, 32, 3)
    assert ds.train.labels.max() < 100 and ds.train.labels.min() >= 0
    assert ds.num_classes == 100 and ds.image_shape == (32, 32, 3)
    names = load_resource("cifar100_class_names.json")["names"]
    assert ds.class_names == [n.replace("_", " ") for n in names]
    assert ds.class_names[1] == "aquarium fish"


def test_mock_grayscale_keeps_one_channel(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        ds = load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10


def test_mock_imagenet_resized_uses_wordnet_lemmas(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        ds = load_dataset("imagenet_resized/32x32", data_dir=str(tmp_path))
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == 1000
    assert ds.class_names[0] == "kit fox"  # imagenet_resized's label 0 is n02119789


def test_imagenet2012_names_and_variable_sizes(tmp_path):
    wnids = [w for w, _ in load_resource("imagenet_class_names.json")["classes"]]
    names = readable_class_names("imagenet2012", wnids, 1000)
    assert names[0] == "tench" and names[1] == "goldfish" and len(names) == 1000
    with tfds.testing.mock_data(num_examples=4), pytest.raises(DataError, match="different sizes"):
        load_dataset("imagenet2012", data_dir=str(tmp_path))


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="not a registered tfds builder") as info:
        load_dataset("no_such_dataset_xyz", data_dir=str(tmp_path))
    assert "digits" in str(info.value)


def test_known_but_not_prepared(tmp_path):
    with pytest.raises(DataError, match="not prepared") as info:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert str(tmp_path) in str(info.value) and "--mode prepare" in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing downloaded or written


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TF installed")
def test_prepare_without_tensorflow_names_the_extra(tmp_path):
    with pytest.raises(DataError, match="prepare"):
        prepare_dataset("mnist", data_dir=str(tmp_path))


def test_dataset_num_classes():
    assert dataset_num_classes("digits") == 10
    assert dataset_num_classes("cifar100") == 100
    with pytest.raises(DataError):
        dataset_num_classes("no_such_dataset_xyz")


def test_holdout_split():
    labels = np.repeat(np.arange(5), [10, 12, 9, 30, 11])
    np.random.default_rng(0).shuffle(labels)
    train, hold = holdout_split(labels, per_class=3, seed=7)
    assert np.bincount(labels[hold]).tolist() == [3] * 5
    assert len(np.intersect1d(train, hold)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, hold])), np.arange(len(labels)))
    train2, hold2 = holdout_split(labels, per_class=3, seed=7)
    np.testing.assert_array_equal(hold, hold2)
    assert not np.array_equal(hold, holdout_split(labels, per_class=3, seed=8)[1])
    # A class's holdout does not depend on the other classes present.
    only3 = np.flatnonzero(labels == 3)
    sub_hold = holdout_split(labels[only3], per_class=3, seed=7)[1]
    np.testing.assert_array_equal(only3[sub_hold], hold[labels[hold] == 3])
    train0, hold0 = holdout_split(labels, per_class=0, seed=7)
    assert len(hold0) == 0 and len(train0) == len(labels)
    with pytest.raises(DataError, match="too few"):
        holdout_split(labels, per_class=9, seed=0)
