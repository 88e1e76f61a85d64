"""Class orders and task splits."""


import numpy as np
import pytest

from sdcil_jax.config import base_config
from sdcil_jax.data import Scenario, build_scenario, named_orders, resolve_class_order
from sdcil_jax.data.resources import load_resource
from sdcil_jax.data.scenario import order_names, task_indices
from sdcil_jax.errors import DataError

# The project's shared data folder sits beside the repository root when it exists.


def make_config(class_order="identity", initial=50, increment=10, max_tasks=0, dataset="cifar100"):
    config = base_config()
    config.dataset.name = dataset
    config.scenario.class_order = class_order
    config.scenario.initial_increment = initial
    config.scenario.increment = increment
    config.scenario.max_tasks = max_tasks
    return config


def test_named_orders_are_permutations_of_the_packaged_file():
    orders = named_orders()
    data = load_resource("class_orders.json")
    expected = {
        "cifar100_order0": data["cifar100"][0],
        "cifar100_order1": data["cifar100"][1],
        "cifar100_order2": data["cifar100"][2],
        "cifar100_seed1993": data["cifar100_seed1993"][0],
        "imagenet100": data["imagenet100"][0],
        "imagenet1000": data["imagenet1000"][0],
    }
    assert orders == expected
    for name, order in orders.items():
        assert sorted(order) == list(range(len(order))), name
    assert [len(orders[n]) for n in expected] == [100] * 5 + [1000]
    assert len({tuple(orders[f"cifar100_order{i}"]) for i in range(3)}) == 3
    # The seed-1993 order is numpy's legacy permutation, as documented in the file.
    assert orders["cifar100_seed1993"] == np.random.RandomState(1993).permutation(100).tolist()
    assert named_orders(7)["identity"] == list(range(7))
    assert set(order_names()) == set(expected) | {"identity"}




@pytest.mark.parametrize(
    "spec, expected",
    [
        ("identity", list(range(10))),
        ([3, 1, 2], [3, 1, 2]),
        ((9, 0), [9, 0]),
        ("3, 1,2", [3, 1, 2]),
        (np.array([4, 5]), [4, 5]),
    ],
)
def test_resolve_class_order_forms(spec, expected):
    assert resolve_class_order(make_config(spec), 10) == expected


def test_resolve_named_and_subset():
    assert resolve_class_order(make_config("cifar100_order1"), 100) == named_orders()[
        "cifar100_order1"
    ]
    # ImageNet-Subset: 100 of 1000 classes.
    assert len(resolve_class_order(make_config("imagenet100"), 1000)) == 100
    # num_classes from the dataset metadata when not given.
    assert resolve_class_order(make_config(dataset="digits")) == list(range(10))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nope", "cifar100_order0"),
        ([1, 2, 2], "more than once"),
        ([0, 10], "outside"),
        ([-1, 2], "outside"),
        ("cifar100_order0", "only 10"),
        (list(range(11)), "only 10"),
        ([], "empty"),
        ([True, 1], "integer"),
        ([1.5], "integer"),
        (3, "must be a name"),
    ],
)
def test_resolve_class_order_errors(spec, match):
    with pytest.raises(DataError, match=match):
        resolve_class_order(make_config(spec), 10)


def test_scenario_b50_inc10():
    order = named_orders()["cifar100_order0"]
    sc = build_scenario(make_config("cifar100_order0"), 100)
    assert isinstance(sc, Scenario)
    assert sc.increments == [50, 10, 10, 10, 10, 10] and sc.num_tasks == 6 == sc.total_tasks
    assert sc.task_range(0) == (0, 50) and sc.task_range(1) == (50, 60)
    assert sc.task_classes(1) == order[50:60]
    assert sc.seen_classes(2) == order[:70] and sc.num_seen(5) == 100 == sc.num_classes
    with pytest.raises(IndexError):
        sc.task_range(6)


def test_relabel_round_trip():
    sc = build_scenario(make_config("cifar100_order2"), 100)
    labels = np.random.default_rng(0).integers(0, 100, size=500)
    inc = sc.relabel(labels)
    assert inc.dtype == np.int32 and inc.min() >= 0 and inc.max() < 100
    np.testing.assert_array_equal(sc.to_dataset_label(inc), labels)
    assert sc.to_dataset_label(0) == named_orders()["cifar100_order2"][0]
    assert sc.relabel(np.array(sc.task_classes(2))).tolist() == list(range(60, 70))


def test_relabel_subset_marks_unknown():
    sc = build_scenario(make_config([7, 3, 5, 1], initial=2, increment=1), 10)
    assert sc.increments == [2, 1, 1]
    assert sc.relabel(np.array([7, 3, 5, 1, 0, 9, -1])).tolist() == [0, 1, 2, 3, -1, -1, -1]
    with pytest.raises(IndexError):
        sc.to_dataset_label(4)


def test_max_tasks_truncates():
    sc = build_scenario(make_config(initial=4, increment=2, max_tasks=2), 10)
    assert sc.increments == [4, 2] and sc.num_tasks == 2 and sc.total_tasks == 4
    assert sc.num_classes == 6 and len(sc.class_order) == 10
    assert build_scenario(make_config(initial=4, increment=2, max_tasks=9), 10).num_tasks == 4


def test_single_task_and_inc1():
    assert build_scenario(make_config(initial=10, increment=3), 10).increments == [10]
    assert build_scenario(make_config(initial=5, increment=1), 10).num_tasks == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(increment=0), "positive"),
        (dict(increment=-2), "positive"),
        (dict(initial=0), "positive"),
        (dict(initial=11, increment=1), "exceeds"),
        (dict(initial=4, increment=4), "do not split"),
        (dict(class_order=[0, 1, 1, 2]), "more than once"),
        (dict(class_order=[0, 12]), "outside"),
        (dict(class_order=list(range(12))), "only 10"),
        (dict(max_tasks=-1), "negative"),
    ],
)
def test_impossible_splits(kwargs, match):
    base = dict(initial=2, increment=2)
    base.update(kwargs)
    with pytest.raises(DataError, match=match):
        build_scenario(make_config(**base), 10)


def test_task_indices():
    labels = np.array([0, 5, 2, 7, -1, 3, 9])
    assert task_indices(labels, (2, 6)).tolist() == [1, 2, 5]
    assert task_indices(labels, range(7, 10)).tolist() == [3, 6]
    assert task_indices(labels, [0, 1]).tolist() == [0]
    with pytest.raises(TypeError):
        task_indices(labels, [1, 2, 3])
