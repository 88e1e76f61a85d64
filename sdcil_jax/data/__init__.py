"""Datasets, class orders, incremental task splits and exemplar selection.

Preparing datasets (``--mode prepare``) lives in :mod:`sdcil_jax.data.prepare`
(``from sdcil_jax.data.prepare import prepare``).
"""

from sdcil_jax.data.datasets import (
    Dataset,
    Split,
    apply_class_name_overrides,
    holdout_split,
    load_dataset,
    resolve_pipeline,
)
from sdcil_jax.data.memory import herding_select, random_select, select_memory
from sdcil_jax.data.scenario import (
    Scenario,
    build_scenario,
    named_orders,
    order_names,
    resolve_class_order,
    task_indices,
)
from sdcil_jax.data.tfds_io import dataset_num_classes

__all__ = [
    "Dataset",
    "Scenario",
    "Split",
    "apply_class_name_overrides",
    "build_scenario",
    "dataset_num_classes",
    "herding_select",
    "holdout_split",
    "load_dataset",
    "named_orders",
    "order_names",
    "random_select",
    "resolve_pipeline",
    "select_memory",
    "resolve_class_order",
    "task_indices",
]
