"""Access to the JSON files packaged in ``sdcil_jax/resources`` (class orders and class names)."""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any


@functools.cache
def load_resource(filename: str) -> Any:
    """Parse ``sdcil_jax/resources/<filename>`` (cached; callers must not modify the result)."""
    path = importlib.resources.files("sdcil_jax").joinpath("resources", filename)
    with path.open("r", encoding="utf-8") as f:
        return json.load(f)


def cifar100_class_names() -> list[str]:
    """The 100 CIFAR-100 fine label names in tfds label-id order, underscores replaced by spaces."""
    return [name.replace("_", " ") for name in load_resource("cifar100_class_names.json")["names"]]


def imagenet_lemmas() -> dict[str, str]:
    """Map each ImageNet-1k WordNet id (e.g. ``n01440764``) to its first lemma (e.g. ``tench``)."""
    return {
        wnid: lemmas.split(",")[0].strip().replace("_", " ")
        for wnid, lemmas in load_resource("imagenet_class_names.json")["classes"]
    }
