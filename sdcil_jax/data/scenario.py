"""Class orders and the split of a class order into incremental tasks.

Two label spaces exist: *dataset labels* (the dataset's own label ids) and *incremental labels*
(the position of a class in the class order, so task 0's classes are 0..initial_increment-1).
Models are trained on incremental labels; :meth:`Scenario.relabel` and
:meth:`Scenario.to_dataset_label` convert between the two.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdcil_jax.data.resources import load_resource
from sdcil_jax.errors import DataError

IDENTITY = "identity"
# Names of the orders in resources/class_orders.json: (JSON key, index in its list).
_NAMED = {
    "cifar100_order0": ("cifar100", 0),  # PODNet's three CIFAR100 orders
    "cifar100_order1": ("cifar100", 1),
    "cifar100_order2": ("cifar100", 2),
    "cifar100_seed1993": ("cifar100_seed1993", 0),  # PyCIL / FACIL / Mammoth
    "imagenet100": ("imagenet100", 0),  # ImageNet-Subset: imagenet2012 labels 0..99
    "imagenet1000": ("imagenet1000", 0),
}
_INT_LIST = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*$")


def named_orders(num_classes: int | None = None) -> dict[str, list[int]]:
    """The packaged class orders by name; with ``num_classes``, also ``'identity'`` (0..C-1)."""
    data = load_resource("class_orders.json")
    orders = {name: [int(c) for c in data[key][i]] for name, (key, i) in _NAMED.items()}
    if num_classes is not None:
        orders[IDENTITY] = list(range(int(num_classes)))
    return orders


def order_names() -> list[str]:
    """Every name ``scenario.class_order`` accepts."""
    return [IDENTITY, *_NAMED]


def _parse_order(spec: Any, num_classes: int) -> tuple[list[int], str]:
    """Return ``(order, description)`` for a name, a comma-separated string or a sequence of ids."""
    if isinstance(spec, str):
        text = spec.strip()
        if text == IDENTITY:
            return list(range(num_classes)), IDENTITY
        if text in _NAMED:
            return named_orders()[text], repr(text)
        if _INT_LIST.match(text):
            return [int(t) for t in text.split(",") if t.strip()], "given as a list"
        raise DataError(
            f"Unknown class order {spec!r}; use one of {', '.join(order_names())}, a list of label "
            "ids or a comma-separated string of label ids."
        )
    if isinstance(spec, (list, tuple, np.ndarray)):
        order = []
        for c in spec:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise DataError(
                    f"Class order entry {c!r} is not an integer label id; give the order as a list "
                    "of ints."
                )
            order.append(int(c))
        return order, "given as a list"
    raise DataError(
        f"scenario.class_order must be a name, a list of label ids or a comma-separated string, "
        f"got {type(spec).__name__}; fix the config."
    )


def check_class_order(order: Sequence[int], num_classes: int, what: str = "Class order") -> None:
    """Raise :class:`DataError` unless ``order`` lists distinct dataset label ids in ``0..C-1``."""
    if not order:
        raise DataError(f"{what} is empty; list at least one class.")
    if len(order) > num_classes:
        raise DataError(
            f"{what} lists {len(order)} classes but the dataset has only {num_classes}; use an "
            "order made for this dataset."
        )
    bad = [c for c in order if not 0 <= c < num_classes]
    if bad:
        raise DataError(
            f"{what} has label ids outside 0..{num_classes - 1} (e.g. {bad[0]}); use an order made "
            "for this dataset."
        )
    values, counts = np.unique(np.asarray(order), return_counts=True)
    if (counts > 1).any():
        dup = int(values[counts > 1][0])
        raise DataError(f"{what} lists class {dup} more than once; each class may appear once.")


def resolve_class_order(config: Any, num_classes: int | None = None) -> list[int]:
    """The class order of ``config.scenario.class_order`` as a list of dataset label ids.

    Accepts a named order (see :func:`order_names`), 'identity', a list/tuple of ints or a
    comma-separated string of ints. A subset of the classes is allowed (e.g. ImageNet-Subset takes
    100 of imagenet2012's 1000), duplicates and out-of-range ids are not. ``num_classes`` defaults
    to the number of classes of ``config.dataset.name`` read from its tfds metadata.
    """
    if num_classes is None:
        from sdcil_jax.data.tfds_io import dataset_num_classes  # avoids importing tfds eagerly

        num_classes = dataset_num_classes(config.dataset.name, config.dataset.data_dir)
    order, description = _parse_order(config.scenario.class_order, int(num_classes))
    check_class_order(order, int(num_classes), f"Class order {description}")
    return order


@dataclasses.dataclass
class Scenario:
    """A class order split into tasks: ``increments[t]`` new classes in task ``t``.

    ``increments`` and ``num_tasks`` are after ``scenario.max_tasks`` truncation; ``total_tasks`` is
    the number of tasks of the full protocol. ``class_order`` always holds the whole order.
    """

    class_order: list[int]
    increments: list[int]
    total_tasks: int = 0
    _position: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.class_order = [int(c) for c in self.class_order]
        self.increments = [int(k) for k in self.increments]
        self.total_tasks = self.total_tasks or len(self.increments)
        position = np.full(max(self.class_order) + 1, -1, dtype=np.int32)
        position[self.class_order] = np.arange(len(self.class_order), dtype=np.int32)
        self._position = position

    @property
    def num_tasks(self) -> int:
        """Number of tasks to run (after ``max_tasks`` truncation)."""
        return len(self.increments)

    @property
    def num_classes(self) -> int:
        """Number of classes seen after the last task that runs."""
        return sum(self.increments)

    def _check_task(self, t: int) -> None:
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"Task {t} out of range 0..{self.num_tasks - 1}.")

    def task_range(self, t: int) -> tuple[int, int]:
        """``(start, end)``: task ``t``'s new classes are incremental labels ``start..end-1``."""
        self._check_task(t)
        start = sum(self.increments[:t])
        return start, start + self.increments[t]

    def task_classes(self, t: int) -> list[int]:
        """Dataset label ids of the new classes of task ``t``."""
        start, end = self.task_range(t)
        return self.class_order[start:end]

    def num_seen(self, t: int) -> int:
        """Number of classes seen up to and including task ``t``."""
        return self.task_range(t)[1]

    def seen_classes(self, t: int) -> list[int]:
        """Dataset label ids of all classes seen up to and including task ``t``, in class order."""
        return self.class_order[: self.num_seen(t)]

    def relabel(self, dataset_labels: np.ndarray) -> np.ndarray:
        """Map dataset label ids to incremental labels (int32); ids not in the order map to -1."""
        labels = np.asarray(dataset_labels)
        inside = (labels >= 0) & (labels < len(self._position))
        out = np.full(labels.shape, -1, dtype=np.int32)
        out[inside] = self._position[labels[inside]]
        return out

    def to_dataset_label(self, incremental: Any) -> Any:
        """Map incremental labels (int or array) back to dataset label ids."""
        idx = np.asarray(incremental)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.class_order)):
            raise IndexError(f"Incremental label out of range 0..{len(self.class_order) - 1}.")
        out = np.asarray(self.class_order, dtype=np.int32)[idx]
        return int(out) if out.ndim == 0 else out


def build_scenario(config: Any, num_classes: int) -> Scenario:
    """Split the class order of ``config`` into tasks (``config.scenario.*``).

    Task 0 has ``initial_increment`` classes, every later task ``increment``; they must use the
    class order exactly (no partial last task). ``max_tasks`` > 0 keeps only the first
    ``max_tasks`` tasks. Impossible splits raise :class:`DataError`.
    """
    order = resolve_class_order(config, num_classes)
    sc = config.scenario
    initial, increment, max_tasks = int(sc.initial_increment), int(sc.increment), int(sc.max_tasks)
    if initial <= 0 or increment <= 0:
        raise DataError(
            f"scenario.initial_increment={initial} and scenario.increment={increment} must both be "
            "positive; set them to the number of classes per task."
        )
    if max_tasks < 0:
        raise DataError(f"scenario.max_tasks={max_tasks} is negative; use 0 (all tasks) or more.")
    if initial > len(order):
        raise DataError(
            f"scenario.initial_increment={initial} exceeds the {len(order)} classes of the class "
            "order; lower it or use a longer order."
        )
    rest = len(order) - initial
    if rest % increment:
        raise DataError(
            f"The {rest} classes after the first task do not split into tasks of "
            f"scenario.increment={increment}; choose an increment that divides {rest}."
        )
    increments = [initial] + [increment] * (rest // increment)
    total = len(increments)
    if max_tasks:
        increments = increments[:max_tasks]
    return Scenario(class_order=order, increments=increments, total_tasks=total)


def task_indices(labels_incremental: np.ndarray, classes: Any) -> np.ndarray:
    """Indices of the samples whose incremental label lies in ``classes``.

    ``classes`` is a half-open range of incremental labels: ``(start, end)`` as returned by
    :meth:`Scenario.task_range`, or a ``range`` object with step 1.
    """
    if isinstance(classes, range):
        if classes.step != 1:
            raise ValueError("task_indices needs a range with step 1.")
        start, end = classes.start, classes.stop
    elif isinstance(classes, (tuple, list)) and len(classes) == 2:
        start, end = int(classes[0]), int(classes[1])
    else:
        raise TypeError("task_indices: classes must be (start, end) or a range of labels.")
    labels = np.asarray(labels_incremental)
    return np.flatnonzero((labels >= start) & (labels < end)).astype(np.int64)
