"""Class orders and class names equal the shared data (``../shared/data``); readable names; overrides."""

import hashlib
import importlib.resources
import json
from pathlib import Path

import pytest

from sdcil_jax.config import base_config, load_config_file
from sdcil_jax.data import apply_class_name_overrides, named_orders, order_names, resolve_class_order
from sdcil_jax.data.resources import imagenet_lemmas, load_resource
from sdcil_jax.data.tfds_io import readable_class_names
from sdcil_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# Every named order: (dataset it belongs to, number of classes, key in class_orders.json, index).
EXPECTED = {
    "cifar100_order0": ("cifar100", 100, "cifar100", 0),
    "cifar100_order1": ("cifar100", 100, "cifar100", 1),
    "cifar100_order2": ("cifar100", 100, "cifar100", 2),
    "cifar100_seed1993": ("cifar100", 100, "cifar100_seed1993", 0),
    "imagenet100": ("imagenet2012", 100, "imagenet100", 0),
    "imagenet1000": ("imagenet2012", 1000, "imagenet1000", 0),
}
RESOURCES = ["class_orders.json", "cifar100_class_names.json", "imagenet_class_names.json"]


# sha256 of the shared data files as the project received them; the packaged copies are byte copies.
SHARED_SHA256 = {
    "class_orders.json": "db166df664cc7f86bc35610984c1afb38314c5abc2bdb0986b397a711d1efd34",
    "cifar100_class_names.json": "7acc99962a333e9b8c1b2cbaece9a0ca141df07e844d5fadc4a9d960564dc4d7",
    "imagenet_class_names.json": "3962f17c478e832cf94703141dc634e95b93df48b798b67afab1dc70ef3a2177",
}


def _shared(filename: str):
    """The shared data file; where the shared folder is not beside the checkout (a bare clone), the
    packaged byte copy, after checking that it has the shared file's recorded sha256."""
    path = SHARED / filename
    if not path.is_file():
        path = ROOT / "sdcil_jax" / "resources" / filename
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHARED_SHA256[filename], (
        f"{path} differs from the shared data the project was given; update the packaged copy "
        "and SHARED_SHA256 together")
    return json.loads(data.decode("utf-8"))


def _config(dataset: str, order):
    config = base_config()
    config.dataset.name = dataset
    config.scenario.class_order = order
    return config


def test_every_named_order_is_tested():
    assert set(order_names()) == {"identity", *EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_order_equals_shared_data(name):
    dataset, size, key, index = EXPECTED[name]
    expected = _shared("class_orders.json")[key][index]
    # No num_classes: resolve_class_order reads it from the tfds builder's metadata (no data needed).
    order = resolve_class_order(_config(dataset, name))
    assert order == expected
    assert named_orders()[name] == expected
    assert sorted(order) == list(range(size)), "an order is a permutation of its label ids"


@pytest.mark.parametrize("filename", RESOURCES)
def test_packaged_resource_equals_shared_file(filename):
    packaged = importlib.resources.files("sdcil_jax").joinpath("resources", filename)
    assert json.loads(packaged.read_text(encoding="utf-8")) == _shared(filename)


def test_imagenet_subset_is_labels_0_to_99():
    assert sorted(named_orders()["imagenet100"]) == list(range(100))


@pytest.mark.parametrize("order,name", [("0", "cifar100_order0"), ("1", "cifar100_order1"),
                                        ("2", "cifar100_order2"), ("seed1993", "cifar100_seed1993")])
def test_cifar100_config_orders(order, name):
    config = load_config_file(str(ROOT / "configs" / "cifar100.py") + f":order={order}")
    assert resolve_class_order(config) == named_orders()[name]


def test_imagenet_config_orders():
    shared = _shared("class_orders.json")
    subset = load_config_file(str(ROOT / "configs" / "imagenet100.py"))
    assert isinstance(subset.scenario.class_order, list)  # the subset is explicit in the config
    assert resolve_class_order(subset) == shared["imagenet100"][0]
    full = load_config_file(str(ROOT / "configs" / "imagenet1k.py"))
    assert resolve_class_order(full) == shared["imagenet1000"][0]


def test_readable_names_cifar100_underscores_become_spaces():
    raw = _shared("cifar100_class_names.json")["names"]
    names = readable_class_names("cifar100", raw, 100)
    assert names[1] == "aquarium fish" and raw[1] == "aquarium_fish"
    assert names == [n.replace("_", " ") for n in raw]
    assert not any("_" in n for n in names)


def test_readable_names_imagenet_first_wordnet_lemma():
    classes = _shared("imagenet_class_names.json")["classes"]
    wnids = [wnid for wnid, _ in classes]
    names = readable_class_names("imagenet2012", wnids, 1000)
    assert names[:3] == ["tench", "goldfish", "great white shark"]
    assert names == [lemmas.split(",")[0].strip().replace("_", " ") for _, lemmas in classes]
    assert imagenet_lemmas()["n01440764"] == "tench"
    assert load_resource("imagenet_class_names.json")["classes"][0][0] == "n01440764"


def test_class_name_overrides():
    names = ["apple", "aquarium fish", "baby"]
    out = apply_class_name_overrides(names, ["1= goldfish in a tank ", "2=infant"])
    assert out == ["apple", "goldfish in a tank", "infant"]
    assert names == ["apple", "aquarium fish", "baby"]  # the input is not modified
    assert apply_class_name_overrides(names, []) == names
    assert apply_class_name_overrides(names, ("0=a=b",)) == ["a=b", "aquarium fish", "baby"]


@pytest.mark.parametrize("overrides,match", [
    (["3=tree"], "label ids are 0..2"),
    (["1=fish", "1=carp"], "twice"),
    (["1="], "empty name"),
    (["fish"], "ID=readable name"),
    (["-1=fish"], "ID=readable name"),
])
def test_class_name_overrides_refused(overrides, match):
    with pytest.raises(DataError, match=match):
        apply_class_name_overrides(["apple", "aquarium fish", "baby"], overrides)
