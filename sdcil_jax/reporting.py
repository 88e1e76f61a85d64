"""Results: ``results.json``, ``metrics.jsonl``, plots and the printed table."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from importlib import metadata
from typing import Any

import numpy as np

from sdcil_jax import config as config_lib
from sdcil_jax import distributed, fileio
from sdcil_jax import evaluate as ev
from sdcil_jax.fingerprint import to_json

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "diffusers", "transformers",
             "tensorflow-datasets", "numpy", "sdcil_jax")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class MetricsLogger:
    """Appends one JSON object per line to ``<workdir>/metrics.jsonl`` (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.path = fileio.path(workdir) / "metrics.jsonl"
        self.enabled = distributed.is_main() if enabled is None else enabled

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            fileio.append_line(self.path, json.dumps(to_json(record)))

    def count(self) -> int:
        """Complete lines written so far."""
        if not self.enabled or not self.path.exists():
            return 0
        return sum(1 for line in self.path.read_text().splitlines(keepends=True)
                   if line.endswith("\n"))

    def start_fresh(self) -> None:
        """A run with no checkpoint to resume: keep an old log (moved aside), never append to it."""
        if self.enabled and self.path.exists() and self.path.stat().length > 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.path.replace(self.path.with_name(f"metrics.old-{stamp}.jsonl"))

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` complete lines (on resume, drop what the checkpoint lacks)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if line.endswith("\n")][:lines]
        fileio.atomic_write_text(self.path, "".join(kept))


def summarise(exp, per_task, *, wall_time_s: float, norm) -> dict:
    """The results dict: summary metrics, per-task rows, config, class order and versions."""
    acc_matrix = [r["task_accuracies"] for r in per_task]
    nme_matrix = [r["nme_task_accuracies"] for r in per_task if r["nme_task_accuracies"] is not None]
    top1 = [r["cnn_accuracy"] for r in per_task]
    nme = [r["nme_accuracy"] for r in per_task]
    has_nme = all(v is not None for v in nme) and nme
    order = [int(c) for c in exp.scenario.class_order]
    results = {
        "avg_incremental_accuracy": ev.average_incremental_accuracy(top1),
        "last_accuracy": top1[-1] if top1 else None,
        "forgetting": ev.forgetting(acc_matrix),
        "accuracy_matrix": acc_matrix,
        "nme_avg_incremental_accuracy": ev.average_incremental_accuracy(nme) if has_nme else None,
        "nme_last_accuracy": nme[-1] if has_nme else None,
        "nme_accuracy_matrix": nme_matrix if has_nme else None,
        "per_task": per_task,
        "num_tasks": exp.scenario.num_tasks,
        "class_order": order,
        "class_order_sha256": hashlib.sha256(json.dumps(order).encode()).hexdigest(),
        "dataset": {"name": exp.dataset.name, "image_shape": list(exp.dataset.image_shape),
                    "num_classes": exp.dataset.num_classes,
                    "train_images": int(len(exp.train_idx)),
                    "holdout_images": int(len(exp.holdout_idx)),
                    "normalisation_mean_std": norm},
        "config": config_lib.to_dict(exp.config),
        "versions": versions(),
        "devices": [str(d) for d in __import__("jax").devices()],
        "wall_time_s": round(wall_time_s, 2),
    }
    return to_json(results)


def write_results(workdir: str, results: dict) -> None:
    fileio.atomic_write_text(fileio.path(workdir) / "results.json",
                             json.dumps(results, indent=2) + "\n")
    write_plots(workdir, results)


def write_plots(workdir: str, results: dict) -> None:
    """``accuracy_per_task.png`` (CNN and NME curves) and ``accuracy_matrix.png`` (heat map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["per_task"]
    x = [r["num_classes"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, [r["cnn_accuracy"] for r in rows], "o-", label="CNN")
    if results["nme_last_accuracy"] is not None:
        ax.plot(x, [r["nme_accuracy"] for r in rows], "s--", label="NME")
    ax.set_xlabel("classes seen")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{results['config']['method']['name']} on {results['dataset']['name']}")
    fig.tight_layout()
    _save_fig(fig, fileio.path(workdir) / "accuracy_per_task.png")
    plt.close(fig)

    n = len(results["accuracy_matrix"])
    mat = np.full((n, n), np.nan)
    for t, row in enumerate(results["accuracy_matrix"]):
        mat[t, : len(row)] = row
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.5 * n))
    im = ax.imshow(mat, vmin=0, vmax=100, cmap="viridis")
    for t in range(n):
        for j in range(t + 1):
            colour = "black" if mat[t, j] > 60 else "white"  # readable on viridis' light end
            ax.text(j, t, f"{mat[t, j]:.0f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save_fig(fig, fileio.path(workdir) / "accuracy_matrix.png")
    plt.close(fig)


def _save_fig(fig, target) -> None:
    fileio.atomic_write(target, lambda f: fig.savefig(f, dpi=100, format="png"))


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def print_task_line(result: dict, num_tasks: int) -> None:
    print(f"task {result['task'] + 1}/{num_tasks}: {result['num_classes']} classes, "
          f"CNN {_fmt(result['cnn_accuracy'])}  NME {_fmt(result['nme_accuracy'])}  "
          f"old {_fmt(result['old_accuracy'])}  new {_fmt(result['new_accuracy'])}  "
          f"synthetic {_fmt(result.get('synthetic_accuracy'))}  "
          f"({result['train_time_s']:.1f}s)", flush=True)


TIME_COLUMNS = (("imprint", "imprint"), ("train", "train"), ("finetune", "finetune"),
                ("herding", "herding"), ("evaluate", "eval"), ("checkpoint", "ckpt"))


def time_table(per_task: list[dict]) -> list[str]:
    """Where each task's time went (seconds), and the share of the training stage the host spent
    outside the compiled step (waiting for data, hooks, logging; compilation excluded)."""
    head = ("| task | " + " | ".join(f"{name:>8}" for _, name in TIME_COLUMNS)
            + " | outside step |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in per_task:
        t = r.get("time_s") or {}
        cells = " | ".join(f"{t.get(key, 0.0):8.1f}" for key, _ in TIME_COLUMNS)
        share = t.get("train_outside_share")
        share_text = "      -     " if share is None else f"{100 * share:11.1f}%"
        lines.append(f"| {r['task'] + 1:4d} | {cells} | {share_text} |")
    return lines


def print_table(results: dict) -> None:
    head = "| task | classes |  CNN   |  NME   |  old   |  new   | synth. |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in results["per_task"]:
        lines.append(f"| {r['task'] + 1:4d} | {r['num_classes']:7d} | {_fmt(r['cnn_accuracy'])} | "
                     f"{_fmt(r['nme_accuracy'])} | {_fmt(r['old_accuracy'])} | "
                     f"{_fmt(r['new_accuracy'])} | {_fmt(r.get('synthetic_accuracy'))} |")
    lines.append("")
    lines.extend(time_table(results["per_task"]))
    lines.append("")
    lines.append(f"average incremental accuracy (CNN): {results['avg_incremental_accuracy']:.2f}")
    lines.append(f"last accuracy (CNN):                {results['last_accuracy']:.2f}")
    if results["nme_last_accuracy"] is not None:
        lines.append(f"average incremental accuracy (NME): "
                     f"{results['nme_avg_incremental_accuracy']:.2f}")
        lines.append(f"last accuracy (NME):                {results['nme_last_accuracy']:.2f}")
    fg = results["forgetting"]
    lines.append(f"forgetting:                         {'-' if fg is None else f'{fg:.2f}'}")
    # the Saver's clock: training and evaluation, summed over resumed sessions; not generation
    lines.append(f"training wall time:                 {results['wall_time_s']:.1f} s (all "
                 "sessions; replay generation not included)")
    print("\n".join(lines), flush=True)
