"""Filling a replay store: generate (or copy) the images of every requested class, resumably, on
every process.

The work is a list of *shards*: runs of at most ``generation.images_per_shard`` consecutive missing
image indices of one class (rounded up to a multiple of ``batch_per_device``, so a micro-batch never
spans two shards). Process 0 reads the store and makes the list; every process receives it, takes
its shards (:func:`assign_shards`: about the same number of images each), generates them on its
own devices with the same per-device program and micro-batch (so the pixels do not depend on the
number of processes or devices), and writes each finished shard atomically. After a barrier
process 0 merges all shards into the manifest and writes the preview. A rerun skips every shard on
disk, whichever process wrote it, so a killed run loses at most the shards it was computing.

Stopping: after each of its steps a process takes part in a small agreement (``distributed.
agree_max``) on a stop signal or a failure anywhere; every process makes the same number of such
agreements, so a SIGTERM or an error on one process stops all of them at the same point, after
their finished shards are written, and none waits alone in a collective.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from sdcil_jax import distributed, fileio
from sdcil_jax.errors import GenerationError
from sdcil_jax.generation.backends import BACKENDS
from sdcil_jax.generation.engine import ClassJob, Engine, plan_steps
from sdcil_jax.generation.memory import memory_plan
from sdcil_jax.generation.pipeline import attention_kind, effective_revision, load_model
from sdcil_jax.generation.prompts import prompts_for_indices
from sdcil_jax.generation.shards import format_field, resolve_format
from sdcil_jax.generation.store import ReplayStore
from sdcil_jax.plan import duration
from sdcil_jax.preemption import Preempted

log = logging.getLogger(__name__)

# Bump when the recipe that turns (settings, class, index) into pixels changes.
# 2: own sampler (mesh + shard_map, aligned micro-batches, on-device uint8)
# 3: on CPU without YNNPACK fusions (their split followed the device count); sub-shard store
RECIPE_VERSION = 3
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
    real_holdout: the dataset name and holdout settings). ``store_format`` is the resolved codec
    (a lossy one changes the pixels read back); ``images_per_shard`` is not a field (layout only).
    """
    fields: dict[str, Any] = {
        "recipe_version": RECIPE_VERSION,
        "backend": str(gen_cfg.backend),
        "image_shape": [int(v) for v in image_shape],
        "store_format": format_field(resolve_format(str(gen_cfg.get("store_format", "auto")),
                                                    image_shape)),
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
            # chunked attention changes pixels: a field (its old name keeps old stores' fingerprints)
            memory_efficient_attention=attention_kind(gen_cfg) == "memory_efficient",
            seed=int(seed),
        )
        if attention_kind(gen_cfg) == "fused":  # bf16 pixels move by several levels: a field,
            fields["attention"] = "fused"  # absent otherwise (stores filled before it keep theirs)
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
            f"expects {tuple(image_shape)}; pass the dataset's image shape as image_shape.")
    if images.dtype != np.uint8:
        images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    return images


def plan_shards(have: Mapping[int, Sequence[int]], class_ids: Sequence[int], per_class: int,
                per_shard: int) -> list[tuple[int, int, int]]:
    """``(class, first, count)`` of the shards that make images ``0..per_class-1`` of every class:
    maximal runs of missing indices that stay inside one block ``[k * per_shard, (k+1) * per_shard)``
    (``have[c]``: the indices already stored)."""
    shards = []
    for c in class_ids:
        present = set(have.get(c, ()))
        run: list[int] = []
        for i in range(per_class):
            if i in present or (run and i // per_shard != run[0] // per_shard):
                if run:
                    shards.append((int(c), run[0], len(run)))
                run = [] if i in present else [i]
            else:
                run.append(i)
        if run:
            shards.append((int(c), run[0], len(run)))
    return shards


def assign_shards(plan: Sequence[tuple[int, int, int]], processes: int) -> list[int]:
    """The process that generates each shard of ``plan``: in plan order, the process with the fewest
    images so far (the lowest index on ties), so every process gets about the same number."""
    load, owners = [0] * processes, []
    for _, _, count in plan:
        p = load.index(min(load))
        owners.append(p)
        load[p] += count
    return owners


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
    guard: Any = None,
) -> ReplayStore:
    """Make sure ``store_dir`` holds ``gen_cfg.per_class`` images of every class in ``class_ids``.

    Shards already on disk are kept, so a killed run resumes where it stopped (see the module
    docstring). Backend ``real_holdout`` stores ``real_images_fn(c)[:per_class]`` (held-out real
    images, no model loaded, process 0 alone); ``sd``/``tiny_sd`` load the model once per process
    and generate with an :class:`~sdcil_jax.generation.engine.Engine` over ``devices`` (default:
    this process's devices). Prints the plan and, after the first steps, the projected time. With
    several processes every process must call this with the same arguments, and ``store_dir`` must
    be on a filesystem they all see. ``guard`` (a :class:`~sdcil_jax.preemption.PreemptionGuard`
    whose ``deferred`` is set) stops generation at the next agreed point after a signal. Ends by
    writing ``preview.png``. Returns the opened :class:`ReplayStore`.
    """
    names = _names_map(class_names)
    class_ids = [int(c) for c in class_ids]
    unnamed = [c for c in class_ids if c not in names]
    if unnamed:
        raise GenerationError(f"No class name for class id(s) {unnamed[:10]}; pass the dataset's "
                              "full id -> name mapping as class_names.")
    backend = BACKENDS.get(str(gen_cfg.backend))
    if backend is None:
        raise GenerationError(f"generation.backend={gen_cfg.backend!r} is not one of "
                              f"{', '.join(BACKENDS)}; pick one of those.")
    per_class = int(gen_cfg.per_class)
    per_shard = max(1, int(gen_cfg.get("images_per_shard", 64)))
    if backend.diffusion:
        step = int(gen_cfg.batch_per_device)
        per_shard = -(-per_shard // step) * step
    fields = fingerprint_fields(gen_cfg, seed=seed, class_names=names, image_shape=image_shape,
                                extra=fingerprint_extra)
    codec = resolve_format(str(gen_cfg.get("store_format", "auto")), image_shape)
    store, plan = None, None
    if distributed.is_main():
        try:
            store = ReplayStore(store_dir).open_or_create(fields, codec)
            store.remove_temporary_files()
            store.merge()  # shards of a run killed before its merge
            store.repair(class_ids)
            have = {c: store.indices(c) for c in class_ids}
            plan = plan_shards(have, class_ids, per_class, per_shard)
            stored = sum(min(len(have[c]), per_class) for c in class_ids)
            _print_plan(plan, len(class_ids), per_class, stored, per_shard, backend.real_images)
            if backend.real_images:
                _fill_real(store, plan, image_shape, real_images_fn)
                plan = []
        except BaseException:
            _agree_on_plan(None)  # releases the other processes, then fails here
            raise
    plan = _agree_on_plan(plan)
    if plan:
        _fill_generated(store, store_dir, gen_cfg, seed, plan, names, image_shape, progress,
                        devices, guard)
    distributed.barrier("sdcil replay shards written")
    failed, error = 0, None
    if distributed.is_main():
        try:
            store.merge()
            _log_share(store, class_ids)
            write_preview(store, class_ids, int(gen_cfg.preview_per_class))
        except BaseException as exc:  # noqa: BLE001  (reported to every process, then raised)
            failed, error = 1, exc
    if distributed.agree_max([failed])[0]:
        if error is not None:
            raise error
        raise GenerationError("Merging the replay store failed on process 0 (see its log); fix "
                              "that and rerun all processes.")
    return store if distributed.is_main() else _open_shared(store_dir)


def _print_plan(plan, n_classes, per_class, stored, per_shard, real) -> None:
    processes = jax.process_count()
    total = sum(n for _, _, n in plan)
    shares = [0] * processes
    for (_, _, n), p in zip(plan, assign_shards(plan, processes), strict=True):
        shares[p] += n
    verb = "copy" if real else "generate"
    stored_text = f", {stored} stored already" if stored else ""
    print(f"plan: {verb} {total} images ({n_classes} classes x {per_class}{stored_text}) in "
          f"{len(plan)} shards of up to {per_shard}; per process: "
          f"{' / '.join(str(s) for s in shares)}", flush=True)


def _open_shared(store_dir: str) -> ReplayStore:
    store = ReplayStore(store_dir)
    if not fileio.path(store.manifest_path).exists():
        raise GenerationError(
            f"Process {jax.process_index()} cannot see the replay store that process 0 wrote to "
            f"{store.directory}; put generation.store_dir on a filesystem shared by all processes.")
    return store.open()


def _fill_real(store: ReplayStore, plan, image_shape, real_images_fn) -> None:
    if plan and real_images_fn is None:
        raise ValueError("generation.backend=real_holdout needs real_images_fn(class_id)")
    cache: dict[int, np.ndarray] = {}
    for c, first, count in plan:
        if c not in cache:
            cache = {c: _check_shape(real_images_fn(c), image_shape, c)}  # one class at a time
        images = cache[c][first:first + count]
        if len(images) < count:
            raise GenerationError(
                f"Only {len(cache[c])} held-out real images of class {c} for generation.per_class="
                f"{first + count}; raise dataset.holdout_per_class or lower generation.per_class.")
        store.write_shard(c, first, images, commit=False)


def _agree_on_plan(plan: list[tuple[int, int, int]] | None) -> list[tuple[int, int, int]] | None:
    """Process 0's plan [(class, first, count)] in every process (None there = it failed)."""
    if not distributed.multi():
        return plan
    lead = distributed.is_main()
    n = int(distributed.broadcast(np.asarray(len(plan) if lead and plan is not None else -1,
                                             np.int64)))
    if n < 0:
        if lead:
            return None
        raise GenerationError("Replay generation failed on process 0 (see its log for the "
                              "reason); fix that and rerun all processes.")
    table = np.asarray(plan if lead and n else np.zeros((n, 3)), np.int64).reshape(n, 3)
    table = distributed.broadcast(table) if n else table
    return [(int(c), int(f), int(k)) for c, f, k in table]


class _Agreement:
    """The agreed stop points of the generation loops (see the module docstring): every process
    calls :meth:`point` after each of its steps, then :meth:`finish` up to the common count."""

    def __init__(self, guard: Any, local_steps: int, setup_failed: bool):
        self.guard, self.done = guard, 0
        signum, failed, self.rounds = distributed.agree_max(
            [self._signal(), int(setup_failed), local_steps])
        self._act(signum, failed, setup_failed)

    def _signal(self) -> int:
        return int(getattr(self.guard, "requested", None) or 0)

    def _act(self, signum: int, failed: int, failed_here: bool) -> None:
        if failed and not failed_here:
            raise GenerationError("Replay generation failed on another process (see its log); "
                                  "fix that and rerun all processes.")
        if signum and not failed_here:
            raise Preempted(f"Stopped by {signal.Signals(signum).name} during replay generation; "
                            "finished shards are kept, rerun the same command to resume.", signum)

    def point(self, failed_here: bool = False) -> None:
        self.done += 1
        signum, failed = distributed.agree_max([self._signal(), int(failed_here)])
        self._act(signum, failed, failed_here)

    def finish(self) -> None:
        while self.done < self.rounds:
            self.point()


def _fill_generated(store, store_dir, gen_cfg, seed, plan, names, image_shape, progress, devices,
                    guard) -> None:
    process, processes = jax.process_index(), jax.process_count()
    owners = assign_shards(plan, processes)
    mine = [shard for shard, p in zip(plan, owners, strict=True) if p == process]
    templates = list(gen_cfg.prompt_templates)
    prompts = {c: tuple(prompts_for_indices(names[c], templates, range(len(templates))))
               for c, _, _ in plan}
    jobs = [ClassJob(c, prompts[c], tuple(range(first, first + count))) for c, first, count in mine]
    local = list(jax.local_devices() if devices is None else devices)
    steps = len(plan_steps(jobs, int(gen_cfg.batch_per_device), len(local)))
    engine, error = None, None
    try:
        store = store if store is not None else _open_shared(store_dir)
        if jobs:
            engine = Engine(load_model(gen_cfg), gen_cfg, seed, devices=local)
    except Exception as exc:  # noqa: BLE001  (reported to every process, then raised here)
        error = exc
    agreement = _Agreement(guard, steps, error is not None)
    if error is not None:
        raise error
    if distributed.is_main():
        for c in sorted(prompts):
            store.note_class(c, name=names[c], prompts=list(prompts[c]))
    projection = _Projection(distributed.is_main(), processes)

    def write(class_id: int, images: np.ndarray, indices: np.ndarray) -> None:
        store.write_shard(class_id, int(indices[0]), images, process=process, commit=False)

    def on_step(done: int, total: int) -> None:
        projection.step(done, total)
        agreement.point()

    if engine is not None:
        line = memory_plan(engine, image_shape) if distributed.is_main() else ""
        if line:
            print(line, flush=True)
        try:
            stats = engine.run(jobs, image_shape, write, progress=progress and distributed.is_main(),
                               on_step=on_step)
        except (Preempted, GenerationError):
            raise  # raised by an agreement: every process stops at the same point
        except BaseException:
            agreement.point(failed_here=True)
            raise
        log.info("Process %d generated %d images in %.1f s (%.2f images/s; %d steps of %d "
                 "devices x %d).", process, stats["images"], stats["wall_s"],
                 stats["images"] / max(stats["wall_s"], 1e-9), stats["steps"], engine.n_devices,
                 engine.per_device)
    agreement.finish()


class _Projection:
    """Prints, once, the measured rate and the projected time: after the second step (its rate no
    longer includes compilation), or after the only one."""

    def __init__(self, enabled: bool, processes: int):
        self.enabled, self.processes = enabled, processes
        self.start, self.first, self.printed = time.perf_counter(), None, False

    def step(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.printed or not self.enabled:
            return
        if self.first is None:
            self.first = (now, done)
            if done < total:
                return
            since, before = self.start, 0  # a single step: its time includes compilation
        else:
            since, before = self.first
        rate = (done - before) / max(now - since, 1e-9)
        left = total - done
        where = f" on process 0 (of {self.processes})" if self.processes > 1 else ""
        # above the open progress bar, not into its line
        tqdm.write(f"projected: {rate:.2f} images/s{where} -> {left} images left there, about "
                   f"{duration(left / max(rate, 1e-9))}")
        self.printed = True


def _log_share(store: ReplayStore, class_ids: Sequence[int]) -> None:
    counts: dict[int, int] = {}
    for _, entry in store.shards():
        if entry["class_id"] in class_ids:
            counts[entry["process"]] = counts.get(entry["process"], 0) + entry["count"]
    log.info("Replay store %s: images by writing process %s.", store.directory, counts)


def write_preview(store: ReplayStore, class_ids: Sequence[int], per_class: int) -> str | None:
    """Write ``preview.png`` (row per class, up to ``per_class`` images, nearest upscaling)."""
    from PIL import Image, ImageDraw

    rows = [c for c in class_ids if store.count(c) > 0]
    if per_class <= 0 or not rows:
        return None
    first = store.load(rows[0], min(per_class, store.count(rows[0])))
    height, width = first.shape[1:3]
    scale = max(1, -(-PREVIEW_TILE // max(height, width)))
    tile_h, tile_w, label_w, gap = height * scale, width * scale, 48, 2
    canvas = Image.new("RGB", (label_w + per_class * (tile_w + gap), len(rows) * (tile_h + gap)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, c in enumerate(rows):
        images = store.load(c, min(per_class, store.count(c)))
        y = r * (tile_h + gap)
        draw.text((4, y + tile_h // 2 - 5), str(c), fill=(0, 0, 0))
        for j, img in enumerate(images):
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
            tile = Image.fromarray(img).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (tile_w + gap), y))
    path = store.path("preview.png")
    fileio.atomic_write(path, lambda f: canvas.save(f, format="PNG"))
    return path
