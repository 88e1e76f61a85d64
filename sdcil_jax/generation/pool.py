"""Filling a replay store: generate (or copy) the images of every requested class, resumably."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from sdcil_jax.errors import GenerationError
from sdcil_jax.fileio import atomic_write
from sdcil_jax.generation import pipeline as sd
from sdcil_jax.generation.prompts import prompts_for_indices
from sdcil_jax.generation.sampler import Sampler
from sdcil_jax.generation.store import ReplayStore

log = logging.getLogger(__name__)

# Bump when the recipe that turns (settings, class, index) into pixels changes.
RECIPE_VERSION = 1
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
    if gen_cfg.backend != "real_holdout":
        fields.update(
            dtype=str(gen_cfg.dtype),
            prompt_templates=[str(t) for t in gen_cfg.prompt_templates],
            class_names=_names_field(class_names),
            num_inference_steps=int(gen_cfg.num_inference_steps),
            guidance_scale=float(gen_cfg.guidance_scale),
            resolution=int(gen_cfg.resolution),
            seed=int(seed),
        )
        if gen_cfg.backend == "sd":  # tiny_sd is built in code: model and revision do not apply
            fields.update(model=str(gen_cfg.model), revision=str(gen_cfg.revision or ""))
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
) -> ReplayStore:
    """Make sure ``store_dir`` holds ``gen_cfg.per_class`` images of every class in ``class_ids``.

    Classes whose shard is already complete are skipped, so a killed run resumes where it stopped.
    Backend ``real_holdout`` stores ``real_images_fn(c)[:per_class]`` (held-out real images, no
    model loaded); ``sd``/``tiny_sd`` load the pipeline once and generate images 0..per_class-1 of
    each class. Ends by writing ``preview.png`` into the store. Returns the opened
    :class:`ReplayStore`.
    """
    names = _names_map(class_names)
    class_ids = [int(c) for c in class_ids]
    unnamed = [c for c in class_ids if c not in names]
    if unnamed:
        raise GenerationError(
            f"No class name for class id(s) {unnamed[:10]}; pass the dataset's full id -> name "
            "mapping as class_names."
        )
    per_class = int(gen_cfg.per_class)
    fields = fingerprint_fields(
        gen_cfg, seed=seed, class_names=names, image_shape=image_shape, extra=fingerprint_extra
    )
    store = ReplayStore(store_dir).open_or_create(fields)
    todo = [c for c in class_ids if not store.is_complete(c, per_class)]
    log.info("Replay store %s: %d of %d classes complete, %d to do.", store.directory,
             len(class_ids) - len(todo), len(class_ids), len(todo))
    if gen_cfg.backend == "real_holdout":
        _fill_real(store, todo, per_class, image_shape, real_images_fn)
    elif todo:
        _fill_generated(store, gen_cfg, seed, todo, names, per_class, image_shape, progress)
    write_preview(store, class_ids, int(gen_cfg.preview_per_class))
    return store


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


def _fill_generated(store, gen_cfg, seed, todo, names, per_class, image_shape, progress) -> None:
    pipe, params = sd.load_pipeline(gen_cfg)
    sampler = Sampler(pipe, params, gen_cfg, seed)
    plan = []
    for c in todo:
        old_images, have = _existing_images(store, c)
        missing = [i for i in range(per_class) if i not in have]
        plan.append((c, old_images, sorted(have), missing))
    total = sum(len(p[3]) for p in plan)
    bar = tqdm(total=total, unit="img", desc="generating replay", disable=not progress,
               dynamic_ncols=True)
    try:
        for c, old_images, have, missing in plan:
            bar.set_postfix_str(f"class {c}")
            chunks = []
            for start in range(0, len(missing), sampler.batch_size):
                idx = missing[start:start + sampler.batch_size]
                prompts = prompts_for_indices(names[c], gen_cfg.prompt_templates, idx)
                chunks.append(sampler.generate(c, prompts, idx, image_shape))
                bar.update(len(idx))
            images = np.concatenate(chunks) if chunks else np.zeros((0, *image_shape), np.uint8)
            indices = np.asarray(missing, dtype=np.int64)
            if old_images is not None and len(have):
                images = np.concatenate([old_images, images])
                indices = np.concatenate([np.asarray(have, np.int64), indices])
            prompts = prompts_for_indices(names[c], gen_cfg.prompt_templates,
                                          range(len(gen_cfg.prompt_templates)))
            store.write_shard(c, images, indices, class_name=names[c], prompts=prompts)
    finally:
        bar.close()


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
