"""Helpers of the Colab notebook (``colab/sdcil_jax_tpu.ipynb``); nothing here is needed to run an
experiment from the command line.

* Storage: where a Colab run keeps what must survive a runtime reset (Google Drive), and the check
  that refuses a path under the Drive mount point while Drive is not mounted there.
* Plan: images to generate, training steps and a projected time, shown before the long stages.
* Display: a results table and a grid of generated images with their class names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdcil_jax.errors import UserError

DRIVE_MOUNT = "/content/drive"  # where the notebook mounts Google Drive on Colab
DRIVE_ROOTS = ("MyDrive", "Shareddrives")  # the writable folders of a mounted Drive


class DrivePathError(UserError):
    """A path under the Drive mount point that would not be on Google Drive."""


def _is_under(path: str, folder: str) -> bool:
    """True if absolute ``path`` is ``folder`` or inside it."""
    folder = os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def drive_mounted(mount_point: str = DRIVE_MOUNT) -> bool:
    """True if a filesystem is mounted at ``mount_point`` (``drive.mount`` mounts Drive there).

    A plain folder is not a mount, even one holding ``MyDrive/``: that is what a run writing to a
    Drive path before Drive was mounted leaves behind on the runtime's local disk.
    """
    return os.path.ismount(mount_point)


def check_drive_paths(paths: Mapping[str, str | None], mount_point: str = DRIVE_MOUNT,
                      mounted: bool | None = None) -> None:
    """Refuse a path under ``mount_point`` that would not land on Google Drive.

    Args:
      paths: setting name -> path (``None`` or ``''`` are skipped), e.g. ``{"RUNS_DIR": ...}``;
        relative paths are taken from the current directory.
      mount_point: where Drive is (or would be) mounted.
      mounted: whether Drive is mounted there; ``None`` = :func:`drive_mounted`.

    Raises:
      DrivePathError: a path is under ``mount_point`` while nothing is mounted there (its files
        would go to the runtime's local disk and vanish with it, and the folders it creates make a
        later ``drive.mount`` fail), or it is under a mounted Drive but outside ``MyDrive`` /
        ``Shareddrives`` (not writable).
    """
    mount_point = os.path.abspath(mount_point)
    if mounted is None:
        mounted = drive_mounted(mount_point)
    for name, path in paths.items():
        if not path:
            continue
        full = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not _is_under(full, mount_point):
            continue
        if not mounted:
            raise DrivePathError(
                f"{name}={path!r} is under {mount_point} but Google Drive is not mounted there, so "
                "its files would go to the runtime's local disk and vanish with it; mount Drive "
                f"first with drive.mount({mount_point!r}) (run the Storage cell with USE_DRIVE = "
                "True) or choose a path outside it.")
        if not any(_is_under(full, os.path.join(mount_point, root)) for root in DRIVE_ROOTS):
            raise DrivePathError(
                f"{name}={path!r} is on the mounted Drive but outside its writable folders; use a "
                f"path under {os.path.join(mount_point, DRIVE_ROOTS[0])}.")


def move_aside_local_files(mount_point: str = DRIVE_MOUNT) -> str | None:
    """Rename a non-empty, unmounted ``mount_point`` folder so that ``drive.mount`` can use it.

    Such a folder holds what a run wrote to a Drive path before Drive was mounted; ``drive.mount``
    refuses a non-empty mount point. Nothing is deleted: the folder becomes ``<mount_point>_local``
    (``_local1``, ``_local2``... if taken). Returns the new path, or None if nothing was moved.
    """
    if drive_mounted(mount_point) or not os.path.isdir(mount_point) or not os.listdir(mount_point):
        return None
    target, n = f"{mount_point}_local", 0
    while os.path.exists(target):
        n += 1
        target = f"{mount_point}_local{n}"
    os.rename(mount_point, target)
    return target


def storage_layout(base_dir: str) -> dict[str, str]:
    """The folders a run keeps under ``base_dir`` (e.g. ``/content/drive/MyDrive/sdcil_jax``).

    ``runs`` (one workdir per setting), ``replay_store`` (generated images, shared by runs),
    ``tensorflow_datasets`` (prepared datasets, for ``TFDS_DATA_DIR``), ``hf_cache`` (model
    weights, for ``HF_HOME``) and ``xla_cache`` (compiled programs, see :func:`use_compilation_cache`).
    """
    names = ("runs", "replay_store", "tensorflow_datasets", "hf_cache", "xla_cache")
    return {name: os.path.join(base_dir, name) for name in names}


def use_compilation_cache(path: str, min_compile_secs: float = 1.0) -> None:
    """Keep this process's compiled XLA programs in ``path`` (JAX's persistent compilation cache).

    A session resumed after a runtime reset then loads the Stable Diffusion sampler and the training
    steps instead of compiling them again (minutes on a TPU). Programs that took less than
    ``min_compile_secs`` to compile are not stored. Call it before the first compilation; JAX sets
    the cache up at its first compile and keeps it for the process. Entries are keyed by the
    program, its compile options, the device kind and the JAX/XLA version, so another chip or
    version only misses.
    """
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))


def needs_tensorflow(name: str, data_dir: str = "") -> bool:
    """True if dataset ``name`` still has to be prepared in ``data_dir`` with TensorFlow.

    False for the embedded ``digits`` set (prepared without TensorFlow) and for a tfds dataset
    already prepared there (reading it needs no TensorFlow), so that a notebook installs TensorFlow
    only in the session that prepares the data.
    """
    import tensorflow_datasets as tfds

    from sdcil_jax.data.tfds_io import is_digits

    if is_digits(name):
        return False
    try:
        return not tfds.builder(name, data_dir=data_dir or None).is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        return False  # preparing it reports the unknown name with the right message


# ---- plan: images to generate, steps to train, projected time --------------------------------------

# Peak dense bfloat16 TFLOP/s per JAX device, from the vendors' public specifications (first match of
# the device kind wins). A TPU v2 or v3 chip shows two JAX devices (one per core), later TPUs one per
# chip; "TPU v5 lite" is v5e, "TPU v6 lite" is v6e (Trillium).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v4", 275.0),
    ("TPU v3", 61.5), ("TPU v2", 22.5),
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
)
# XLA's FLOP counts (``python benchmarks/flops.py``, benchmarks/RESULTS.md "Planning numbers"):
# SD v1.4 at 512x512 (64x64 latents), one UNet row and one VAE decode; backbone forwards per image.
SD14_UNET_TFLOP = 0.797  # one UNet call on one latent (a guided step is two rows)
SD14_DECODE_TFLOP = 2.513  # VAE decode of one 512x512 image
# Train-mode forward per image at the protocols' sizes: ResNet-32 at 32x32, ResNet-18 (PODNet's stem) at
# 224x224.
FORWARD_GFLOP = {"resnet32": 0.128, "resnet18": 13.3}
TRAIN_FORWARDS = 4  # forward + backward (3 forwards' worth) + the old model's forward (distillation)
# Assumed share of the peak that the programs reach: large convolutions and attention (SD) fill the
# matrix units well; small CNNs at CIFAR size (16 to 64 channels) fill them poorly.
GENERATION_UTILISATION = (0.5, 0.3)
TRAINING_UTILISATION = (0.2, 0.05)


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bf16 TFLOP/s of one device of kind ``jax.devices()[0].device_kind``, or None."""
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def generation_tflop_per_image(gen_cfg: Any) -> float:
    """XLA-counted TFLOP of one SD v1.x image: UNet calls x rows x UNet + decode.

    ``rows`` = 2 with classifier-free guidance (scale > 1), else 1; the counts at 512 px are scaled
    by (resolution / 512)^2 (attention grows faster, so this is rough away from 512 px).
    """
    from sdcil_jax.generation.schedulers import SD_V1_SCHEDULE, solver_table

    calls = solver_table(gen_cfg.scheduler, SD_V1_SCHEDULE, int(gen_cfg.num_inference_steps))
    rows = 2 if float(gen_cfg.guidance_scale) > 1.0 else 1
    scale = (int(gen_cfg.resolution) / 512) ** 2
    return (calls.num_evaluations * rows * SD14_UNET_TFLOP + SD14_DECODE_TFLOP) * scale


def stored_counts(store_dir: str | None, class_ids: Sequence[int]) -> dict[int, int]:
    """Images already in the replay store at ``store_dir`` for each of ``class_ids`` (0 if none)."""
    from sdcil_jax.generation import ReplayStore

    counts = {int(c): 0 for c in class_ids}
    if store_dir and os.path.exists(os.path.join(store_dir, "manifest.json")):
        store = ReplayStore(store_dir).open()
        counts.update({c: store.count(c) for c in counts if store.has_valid_shard(c)})
    return counts


def _hours(tflop: float, peak: float | None, devices: int, utilisation: tuple[float, float]):
    if not peak or tflop <= 0:
        return None
    return tuple(tflop / (peak * devices * u) / 3600 for u in utilisation)


def run_plan(config: Any, scenario: Any, train_labels: np.ndarray,
             stored: Mapping[int, int] | None = None, device_kind: str = "",
             devices: int = 1) -> dict[str, Any]:
    """What a run of ``config`` will do, and a projected time on ``devices`` x ``device_kind``.

    Args:
      config: the validated run config.
      scenario: its :class:`sdcil_jax.data.Scenario`.
      train_labels: dataset labels of the training images the run uses (hold-out removed).
      stored: images already in the replay store per class (:func:`stored_counts`).
      device_kind, devices: ``jax.devices()[0].device_kind`` and ``jax.device_count()``.

    Returns:
      A dict: ``generate_classes``, ``per_class``, ``images`` (all), ``images_to_go`` (not yet
      stored), ``tflop_per_image`` (None unless ``generation.backend='sd'``), ``tasks``,
      ``train_steps`` (main training; balanced finetuning adds a few hundred per task),
      ``train_tflop`` (None for a backbone without a count), ``peak_tflops``, and
      ``generation_hours`` / ``training_hours``: (low, high) projections or None.
    """
    from sdcil_jax.generation.backends import BACKENDS
    from sdcil_jax.methods import method_class

    syn, gen = config.synthetic, config.generation
    uses_synthetic = syn.use_in != "none" or syn.replace_memory or syn.diagnostic_per_class > 0
    last = scenario.num_tasks if syn.diagnostic_per_class else scenario.num_tasks - 1
    classes = [int(c) for t in range(last) for c in scenario.task_classes(t)] if uses_synthetic else []
    diffusion = BACKENDS[gen.backend].diffusion
    per_class = int(gen.per_class)
    stored = stored or {}
    to_go = sum(max(per_class - int(stored.get(c, 0)), 0) for c in classes) if diffusion else 0
    tflop_image = generation_tflop_per_image(gen) if gen.backend == "sd" else None

    counts = np.bincount(np.asarray(train_labels, np.int64), minlength=max(scenario.class_order) + 1)
    memory = method_class(config.method.name).uses_memory
    memory_per_class = syn.per_class if syn.replace_memory else config.memory.per_class
    batch = int(config.train.batch_size)
    syn_batch = int(syn.batch_size or batch) if syn.use_in != "none" else 0
    forward = FORWARD_GFLOP.get(config.model.name)
    steps, train_tflop = 0, 0.0
    for t in range(scenario.num_tasks):
        old = scenario.num_seen(t) - len(scenario.task_classes(t))
        images = int(counts[scenario.task_classes(t)].sum()) + (memory_per_class * old if memory else 0)
        task_steps = int(config.train.epochs) * math.ceil(images / batch)
        steps += task_steps
        per_step = batch + (syn_batch if t > 0 else 0)
        train_tflop += task_steps * per_step * TRAIN_FORWARDS * (forward or 0.0) / 1e3
    peak = peak_tflops(device_kind)
    return {
        "generate_classes": len(classes) if diffusion else 0, "per_class": per_class,
        "images": len(classes) * per_class if diffusion else 0, "images_to_go": to_go,
        "tflop_per_image": tflop_image, "tasks": scenario.num_tasks, "train_steps": steps,
        "train_batch": batch, "synthetic_batch": syn_batch,
        "train_tflop": train_tflop if forward else None, "device_kind": device_kind,
        "devices": devices, "peak_tflops": peak,
        "generation_hours": _hours(to_go * (tflop_image or 0.0), peak, devices,
                                   GENERATION_UTILISATION),
        "training_hours": _hours(train_tflop, peak, devices, TRAINING_UTILISATION),
    }


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The plan of :func:`run_plan` as printable lines (projections labelled as such)."""
    p = plan
    lines = []
    if p["images"]:
        lines.append(f"generate: {p['generate_classes']} classes x {p['per_class']} = "
                     f"{p['images']:,} images, {p['images'] - p['images_to_go']:,} already in the "
                     f"store, {p['images_to_go']:,} to go")
        if p["tflop_per_image"]:
            lines.append(f"          about {p['tflop_per_image']:.0f} TFLOP per image (XLA's count "
                         "for SD v1.4), "
                         f"{p['images_to_go'] * p['tflop_per_image'] / 1e6:,.2f} EFLOP to go")
    else:
        lines.append("generate: nothing (no diffusion generator, or no synthetic images used)")
    syn = f" + {p['synthetic_batch']} synthetic" if p["synthetic_batch"] else ""
    lines.append(f"train:    {p['tasks']} tasks, {p['train_steps']:,} steps of {p['train_batch']} real"
                 f"{syn} images (plus balanced finetuning)")
    where = f"{p['devices']} x {p['device_kind'] or 'unknown device'}"
    if not p["peak_tflops"]:
        lines.append(f"time:     no projection for {where} (no peak figure for this device)")
        return lines
    lines.append(f"time:     projected on {where} ({p['peak_tflops']:g} TFLOP/s peak bf16 each), "
                 "from FLOP counts and an assumed share of the peak; not a measurement:")
    for stage, key, share in (("generation", "generation_hours", GENERATION_UTILISATION),
                              ("training", "training_hours", TRAINING_UTILISATION)):
        hours = p[key]
        if hours:
            lines.append(f"          {stage}: {_duration(hours[0])} to {_duration(hours[1])} (at "
                         f"{share[0]:.0%} to {share[1]:.0%} of the peak)")
    return lines


# ---- display -------------------------------------------------------------------------------------

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
        name = (class_names or {}).get(class_id) or store.class_note(class_id).get("name")
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
