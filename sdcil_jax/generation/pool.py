"""Filling a replay store: generate (or copy) the images of every requested class, resumably."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from sdcil_jax.errors import GenerationError
from sdcil_jax.fileio import atomic_write
from sdcil_jax.generation.backends import BACKENDS
from sdcil_jax.generation.engine import ClassJob, Engine
from sdcil_jax.generation.pipeline import effective_revision, load_model
from sdcil_jax.generation.prompts import prompts_for_indices
from sdcil_jax.generation.store import ReplayStore

log = logging.getLogger(__name__)

# Bump when the recipe that turns (settings, class, index) into pixels changes.
RECIPE_VERSION = 2  # 2: own sampler (mesh + shard_map, aligned micro-batches, on-device uint8)
PREVIEW_TILE = 64  # minimum tile size in pixels (nearest-neighbour upscaling)


def _names_map(class_names: Mapping[int, str] | Sequence[str]) -> dict[int, str]:
    if isinstance(class_names, Mapping):
        return {int(k): str(v) for k, v in class_names.items()}
    return {i: str(name) for i, name in enumerate(class_names)}


def _names_field(class_names: Mapping[int, str] | Sequence[str]) -> Any:
    """A list of names when the ids are 0..n-1, else an {id: name} dict (JSON-ready)."""
    names = _names_map(class_names)
    if sorted(names) == list(range(len(names))):
        return [names[i] for i in range(len(names))]
    return {str(k): names[k] for k in sorted(names)}


def fingerprint_fields(
    gen_cfg: Any,
    *,
    seed: int,
    class_names: Mapping[int, str] | Sequence[str],
    image_shape: Sequence[int],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that determines the stored pixels (the store's fingerprint is their sha256).

    ``class_names`` should be the dataset's full id -> name mapping so that stores filled for
    different subsets of classes share one fingerprint. ``extra`` adds caller fields (for
    real_holdout: the dataset name and holdout settings).
    """
    fields: dict[str, Any] = {
        "recipe_version": RECIPE_VERSION,
        "backend": str(gen_cfg.backend),
        "image_shape": [int(v) for v in image_shape],
    }
    backend = BACKENDS.get(str(gen_cfg.backend))
    if backend is not None and backend.diffusion:
        fields.update(
            dtype=str(gen_cfg.dtype),
            prompt_templates=[str(t) for t in gen_cfg.prompt_templates],
            class_names=_names_field(class_names),
            scheduler=str(gen_cfg.get("scheduler", "pndm")),
            num_inference_steps=int(gen_cfg.num_inference_steps),
            guidance_scale=float(gen_cfg.guidance_scale),
            resolution=int(gen_cfg.resolution),
            batch_per_device=int(gen_cfg.batch_per_device),  # the micro-batch changes bf16 pixels
            memory_efficient_attention=bool(gen_cfg.get("memory_efficient_attention", False)),
            seed=int(seed),
        )
        if backend.pretrained:  # tiny_sd is built in code: model and revision do not apply
            fields.update(model=str(gen_cfg.model), revision=effective_revision(gen_cfg))
    fields.update(dict(extra or {}))
    return fields


def _check_shape(images: np.ndarray, image_shape: Sequence[int], class_id: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3 and len(image_shape) == 3 and image_shape[-1] == 1:
        images = images[..., None]
    if tuple(images.shape[1:]) != tuple(int(v) for v in image_shape):
        raise GenerationError(
            f"Real images of class {class_id} have shape {images.shape[1:]} but the replay store "
            f"expects {tuple(image_shape)}; pass the dataset's image shape as image_shape."
        )
    if images.dtype != np.uint8:
        images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    return images


def generate_replay_pool(
    gen_cfg: Any,
    *,
    seed: int,
    class_ids: Sequence[int],
    class_names: Mapping[int, str] | Sequence[str],
    image_shape: Sequence[int],
    store_dir: str,
    real_images_fn: Callable[[int], np.ndarray] | None = None,
    progress: bool = True,
    fingerprint_extra: Mapping[str, Any] | None = None,
    devices: Sequence[Any] | None = None,
) -> ReplayStore:
    """Make sure ``store_dir`` holds ``gen_cfg.per_class`` images of every class in ``class_ids``.

    Classes whose shard is already complete are skipped, so a killed run resumes where it stopped.
    Backend ``real_holdout`` stores ``real_images_fn(c)[:per_class]`` (held-out real images, no
    model loaded); ``sd``/``tiny_sd`` load the model once and generate images 0..per_class-1 of
    each class with one :class:`~sdcil_jax.generation.engine.Engine` over ``devices`` (default: all
    devices of all processes). Ends by writing ``preview.png`` into the store. Returns the opened
    :class:`ReplayStore`.

    With several processes (``jax.process_count() > 1``) every process must call this with the same
    arguments: process 0 reads the store and decides what to generate, all processes run the
    steps, process 0 writes the shards; ``store_dir`` must be on a filesystem all processes see.
    """
    names = _names_map(class_names)
    class_ids = [int(c) for c in class_ids]
    unnamed = [c for c in class_ids if c not in names]
    if unnamed:
        raise GenerationError(
            f"No class name for class id(s) {unnamed[:10]}; pass the dataset's full id -> name "
            "mapping as class_names."
        )
    backend = BACKENDS.get(str(gen_cfg.backend))
    if backend is None:
        raise GenerationError(
            f"generation.backend={gen_cfg.backend!r} is not one of {', '.join(BACKENDS)}; pick one "
            "of those."
        )
    per_class = int(gen_cfg.per_class)
    fields = fingerprint_fields(
        gen_cfg, seed=seed, class_names=names, image_shape=image_shape, extra=fingerprint_extra
    )
    lead = jax.process_index() == 0
    store, plan, old = None, None, {}
    if lead:
        try:
            store = ReplayStore(store_dir).open_or_create(fields)
            todo = [c for c in class_ids if not store.is_complete(c, per_class)]
            log.info("Replay store %s: %d of %d classes complete, %d to do.", store.directory,
                     len(class_ids) - len(todo), len(class_ids), len(todo))
            if backend.real_images:
                _fill_real(store, todo, per_class, image_shape, real_images_fn)
                plan = []
            else:
                plan, old = _plan(store, todo, per_class)
        except BaseException:
            _agree_on_plan(None, per_class)  # releases the other processes, then fails here
            raise
    plan = _agree_on_plan(plan, per_class)
    if plan:
        _fill_generated(store, gen_cfg, seed, plan, old, names, image_shape, progress, devices)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sdcil_jax replay pool written")
    if not lead:
        return _open_shared(store_dir)
    write_preview(store, class_ids, int(gen_cfg.preview_per_class))
    return store


def _open_shared(store_dir: str) -> ReplayStore:
    store = ReplayStore(store_dir)
    if not os.path.exists(store.manifest_path):
        raise GenerationError(
            f"Process {jax.process_index()} cannot see the replay store that process 0 wrote to "
            f"{store.directory}; put generation.store_dir on a filesystem shared by all processes."
        )
    return store.open()


def _fill_real(store, todo, per_class, image_shape, real_images_fn) -> None:
    if todo and real_images_fn is None:
        raise ValueError("generation.backend=real_holdout needs real_images_fn(class_id)")
    for c in todo:
        images = _check_shape(real_images_fn(c), image_shape, c)[:per_class]
        if len(images) < per_class:
            raise GenerationError(
                f"Only {len(images)} held-out real images of class {c} for generation.per_class="
                f"{per_class}; raise dataset.holdout_per_class or lower generation.per_class."
            )
        store.write_shard(c, images, np.arange(len(images)))


def _existing_images(store: ReplayStore, class_id: int) -> tuple[np.ndarray | None, set[int]]:
    """Images of a valid but too small shard (kept when per_class grows), else nothing."""
    if not store.has_valid_shard(class_id):
        return None, set()
    images, indices = store.load_with_indices(class_id)
    return images, {int(i) for i in indices}


def _agree_on_plan(plan: list[tuple[int, list[int]]] | None, per_class: int):
    """Process 0's plan [(class, missing indices)] in every process (None there = it failed).

    Every process must run the same global steps; process 0 alone reads the store, so it decides.
    """
    if jax.process_count() == 1:
        return plan
    from jax.experimental import multihost_utils

    lead = jax.process_index() == 0
    count = np.asarray(len(plan) if (lead and plan is not None) else -1, np.int64)
    count = int(multihost_utils.broadcast_one_to_all(count))
    if count == 0:
        return []
    if count < 0:
        if lead:
            return None
        raise GenerationError(
            "Replay generation failed on process 0 (see its log for the reason); fix that and rerun "
            "all processes."
        )
    classes = np.zeros((count,), np.int64)
    mask = np.zeros((count, per_class), bool)
    if lead:
        for row, (c, missing) in enumerate(plan):
            classes[row] = c
            mask[row, missing] = True
    classes, mask = multihost_utils.broadcast_one_to_all((classes, mask))
    return [(int(c), [int(i) for i in np.flatnonzero(m)]) for c, m in zip(classes, mask, strict=True)]


def _plan(store: ReplayStore, todo: Sequence[int], per_class: int):
    """[(class, missing indices)] and {class: (kept images, their indices)} of valid small shards."""
    plan, old = [], {}
    for c in todo:
        old_images, have = _existing_images(store, c)
        if old_images is not None and have:
            old[c] = (old_images, sorted(have))
        plan.append((c, [i for i in range(per_class) if i not in have]))
    return plan, old


def _fill_generated(store, gen_cfg, seed, plan, old, names, image_shape, progress, devices) -> None:
    lead = jax.process_index() == 0
    model = load_model(gen_cfg)
    engine = Engine(model, gen_cfg, seed, devices=devices)
    templates = list(gen_cfg.prompt_templates)
    all_prompts = {c: tuple(prompts_for_indices(names[c], templates, range(len(templates))))
                   for c, _ in plan}
    jobs = [ClassJob(c, all_prompts[c], tuple(missing)) for c, missing in plan]

    def write(class_id: int, images: np.ndarray, indices: np.ndarray) -> None:
        if not lead:
            return  # process 0 writes the store; the others only ran their share of the steps
        if class_id in old:
            old_images, have = old[class_id]
            images = np.concatenate([old_images, images])
            indices = np.concatenate([np.asarray(have, np.int64), indices])
        store.write_shard(class_id, images, indices, class_name=names[class_id],
                          prompts=list(all_prompts[class_id]))

    stats = engine.run(jobs, image_shape, write, progress=progress and lead)
    if stats["images"]:
        log.info("Generated %d images in %.1f s (%.2f images/s; %d steps of %d devices x %d).",
                 stats["images"], stats["wall_s"], stats["images"] / max(stats["wall_s"], 1e-9),
                 stats["steps"], engine.n_devices, engine.per_device)


def write_preview(store: ReplayStore, class_ids: Sequence[int], per_class: int) -> str | None:
    """Write ``preview.png`` (row per class, up to ``per_class`` images, nearest upscaling)."""
    from PIL import Image, ImageDraw

    rows = [c for c in class_ids if store.entry(c) is not None]
    if per_class <= 0 or not rows:
        return None
    first = store.load(rows[0])
    height, width = first.shape[1:3]
    scale = max(1, -(-PREVIEW_TILE // max(height, width)))
    tile_h, tile_w, label_w, gap = height * scale, width * scale, 48, 2
    canvas = Image.new("RGB", (label_w + per_class * (tile_w + gap), len(rows) * (tile_h + gap)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, c in enumerate(rows):
        images = store.load(c)[:per_class]
        y = r * (tile_h + gap)
        draw.text((4, y + tile_h // 2 - 5), str(c), fill=(0, 0, 0))
        for j, img in enumerate(images):
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
            tile = Image.fromarray(img).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (tile_w + gap), y))
    path = os.path.join(store.directory, "preview.png")
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
    return path
