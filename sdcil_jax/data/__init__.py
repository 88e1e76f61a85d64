"""Datasets, class orders, incremental task splits and exemplar selection.

Preparing datasets (``--mode prepare``) lives in :mod:`sdcil_jax.data.prepare`
(``from sdcil_jax.data.prepare import prepare``).
"""

from sdcil_jax.data.datasets import (
    Dataset,
    apply_class_name_overrides,
    dataset_num_classes,
    holdout_split,
    load_dataset,
    prepare_dataset,
)
from sdcil_jax.data.memory import herding_select, random_select
from sdcil_jax.data.scenario import (
    Scenario,
    build_scenario,
    named_orders,
    order_names,
    resolve_class_order,
    task_indices,
)

__all__ = [
    "Dataset",
    "Scenario",
    "apply_class_name_overrides",
    "build_scenario",
    "dataset_num_classes",
    "herding_select",
    "holdout_split",
    "load_dataset",
    "named_orders",
    "order_names",
    "prepare_dataset",
    "random_select",
    "resolve_class_order",
    "task_indices",
]
