"""Display helpers for the Colab notebook (``colab/sdcil_jax_tpu.ipynb``): a results table and a grid
of generated images with their class names. Nothing here is needed to run an experiment."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

_COLUMNS = (("CNN", "cnn_accuracy"), ("NME", "nme_accuracy"), ("old", "old_accuracy"),
            ("new", "new_accuracy"), ("synthetic", "synthetic_accuracy"),
            ("train images", "train_images"), ("synthetic images", "synthetic_images"))


def results_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per task of ``results`` (the dict ``sdcil_jax.run`` returns / results.json holds)."""
    rows = []
    for r in results["per_task"]:
        row = {"task": r["task"] + 1, "classes": r["num_classes"]}
        row.update({name: r.get(key) for name, key in _COLUMNS})
        rows.append(row)
    return rows


def results_frame(results: dict[str, Any]):
    """The per-task table as a pandas DataFrame, or None when pandas is not installed."""
    try:
        import pandas as pd
    except ImportError:
        return None
    return pd.DataFrame(results_rows(results)).set_index("task").round(2)


def _pick(class_ids: list[int], max_classes: int) -> list[int]:
    """At most ``max_classes`` ids spread evenly over ``class_ids``."""
    if len(class_ids) <= max_classes:
        return class_ids
    picks = np.linspace(0, len(class_ids) - 1, max_classes).round().astype(int)
    return [class_ids[i] for i in picks]


def replay_grid(store_dir: str, path: str, per_class: int = 8, max_classes: int = 10,
                class_names: dict[int, str] | None = None) -> str | None:
    """Write a PNG grid of generated images to ``path``, one row per class, labelled with its name.

    Rows are up to ``max_classes`` classes spread over the store; names come from ``class_names``,
    else the store's manifest, else the class id. Returns ``path``, or None for an empty store.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sdcil_jax.generation import ReplayStore

    store = ReplayStore(store_dir).open()
    rows = _pick(store.class_ids(), max_classes)
    if not rows or per_class <= 0:
        return None
    cols = min(per_class, max(store.count(c) for c in rows))
    fig = Figure(figsize=(1.0 * cols + 1.8, 1.0 * len(rows) + 0.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, class_id in enumerate(rows):
        images = store.load(class_id)[:cols]
        name = (class_names or {}).get(class_id) or (store.entry(class_id) or {}).get("class_name")
        for j, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                img = images[j]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray",
                          interpolation="nearest")
            else:
                ax.axis("off")
        label = f"{class_id}: {name}" if name else str(class_id)
        axes[r][0].set_ylabel(label if len(label) <= 24 else label[:23] + "…", rotation=0,
                              ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=min(0.5, 1.7 / fig.get_figwidth()), right=0.99, top=0.99, bottom=0.01,
                        wspace=0.05, hspace=0.05)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
