"""Batch streams: what the one training step, the one epoch loop and the one predict consume.

A training stream yields, for each step of a stage, ``(epoch, step, batch)`` where ``batch`` is a
dict of global jax Arrays sharded over the ``data`` mesh axis. Its ``maker`` (a hashable value that
is the same for every task of a run, so one compiled step serves them all) offers
``materialise(pool, batch, aug_key, synth_key, stream_args)``, a pure function traced inside the
jitted step, and the stream's ``step_args()`` are the task's part of ``stream_args`` (the synthetic
bounds of the pool, as data); it turns the batch into::

    {"image": (B, H, W, C) float32 in [0, 1], "label": (B,) int32,
     "cls_mask": (B,) float32, "dist_mask": (B,) float32}

The real samples come first, then ``synth_batch`` synthetic ones; the masks say which samples feed
the classification and the distillation losses (:func:`sample_masks`, the one place where
``synthetic.use_in`` is read). Two kinds, chosen here and nowhere else:

* :class:`DeviceStream` (CIFAR-size): the run's uint8 pool lives on the devices (``pool`` argument
  of the step, allocated once per run at its final size); a batch is the real indices; the gather,
  the uniform draw of the synthetic indices in ``[lo, hi)`` (traced bounds) from ``synth_key`` and
  the augmentation happen inside jit, so no image crosses to the host while training. Epoch
  ``e``'s order is ``default_rng([seed, task, e])`` (:func:`epoch_batches`).
* :class:`HostStream` (ImageNet-size): images are decoded and augmented on the host by
  :class:`~sdcil_jax.data.host_pipeline.HostPipeline` (real and synthetic pipelines side by side; the
  synthetic one's position is a function of the step), so a batch already holds uint8 images.

Both are deterministic functions of (seed, task, stage, epoch, step), so a run resumed at
``(epoch, step)`` sees exactly the batches an uninterrupted run sees. :func:`eval_batches` yields
evaluation batches (uint8 images, padded to the batch size) for :func:`sdcil_jax.loop.predict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdcil_jax import augment as aug_lib
from sdcil_jax import parallel
from sdcil_jax.data.pool import TaskPool

USES = {"none": (False, False), "distillation": (False, True), "classification": (True, False),
        "both": (True, True)}


def sample_masks(use_in: str, n_real: int, n_synth: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cls_mask, dist_mask)`` of a batch of ``n_real`` real then ``n_synth`` synthetic samples.

    Real samples feed both losses; synthetic ones feed the classification loss when ``use_in`` is
    'classification' or 'both', the distillation losses when 'distillation' or 'both'.
    """
    in_cls, in_dist = USES[use_in]
    cls = np.concatenate([np.ones(n_real), np.full(n_synth, float(in_cls))]).astype(np.float32)
    dist = np.concatenate([np.ones(n_real), np.full(n_synth, float(in_dist))]).astype(np.float32)
    return cls, dist


def epoch_batches(indices: np.ndarray, batch_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled epoch as ``(order, valid)``, both (steps, batch_size), steps = ceil(n / B).

    Every index appears exactly once per epoch, as in the official ``DataLoader``: the last batch
    holds the remaining ``n - (steps - 1) B`` samples, padded to ``B`` with rows whose ``valid`` is
    0 (they repeat the epoch's first index, so a gather stays in range, and are masked out of the
    losses, the accuracy and the batch statistics).
    """
    perm = np.asarray(indices)[rng.permutation(len(indices))]
    steps = max(1, -(-len(perm) // batch_size))
    need = steps * batch_size
    fill = perm[:1] if len(perm) else np.zeros((1,), np.asarray(indices).dtype)
    order = np.concatenate([perm, np.repeat(fill, need - len(perm))])
    valid = (np.arange(need) < len(perm)).astype(np.float32)
    return order.reshape(steps, batch_size), valid.reshape(steps, batch_size)


def _with_synthetic(real_valid, synth_batch: int):
    """``(B + S,)`` float32: the real rows' validity, then 1 for each synthetic row."""
    real_valid = jnp.asarray(real_valid, jnp.float32)
    if synth_batch == 0:
        return real_valid
    return jnp.concatenate([real_valid, jnp.ones((synth_batch,), jnp.float32)])


def _masks(use_in: str, batch_size: int, synth_batch: int, valid) -> dict[str, jax.Array]:
    """The step's per-sample masks: :func:`sample_masks` times ``valid`` (padding rows feed no
    loss), and ``valid`` itself (the rows that enter batch normalisation's statistics)."""
    cls, dist = sample_masks(use_in, batch_size, synth_batch)
    return {"cls_mask": jnp.asarray(cls) * valid, "dist_mask": jnp.asarray(dist) * valid,
            "valid": valid}


def _synth_args(lo: int, hi: int) -> dict[str, np.ndarray]:
    """``{'synth': int32 [lo, hi)}``: the synthetic draw's bounds (an empty range draws ``lo``,
    whose images feed nothing when the step's synthetic batch is 0)."""
    return {"synth": np.asarray([lo, max(hi, lo + 1)], np.int32)}


@dataclasses.dataclass(frozen=True)
class DeviceBatches:
    """What turns a :class:`DeviceStream` batch of indices into images inside the step (static:
    the same for every task of a run)."""

    batch_size: int
    synth_batch: int
    use_in: str
    mesh: Any
    augment: tuple[tuple[str, Any], ...]

    def materialise(self, pool, batch, aug_key, synth_key, stream_args):
        pool_x, pool_y = pool
        idx = batch["index"]
        x, y = pool_x[idx], pool_y[idx]
        valid = _with_synthetic(batch["valid"], self.synth_batch)
        if self.synth_batch > 0:
            lo, hi = stream_args["synth"][0], stream_args["synth"][1]
            s_idx = jax.random.randint(synth_key, (self.synth_batch,), lo, hi)
            x = jnp.concatenate([x, pool_x[s_idx]])
            y = jnp.concatenate([y, pool_y[s_idx]])
        x = jax.lax.with_sharding_constraint(x, parallel.batch_sharded(self.mesh))
        images = aug_lib.augment(x.astype(jnp.float32) / 255.0, aug_key, **dict(self.augment))
        return {"image": images, "label": y, **_masks(self.use_in, self.batch_size,
                                                       self.synth_batch, valid)}


class DeviceStream:
    """CIFAR-size training stream (see the module docstring).

    ``device_pool``: the pool's ``(images, labels)`` already replicated on the mesh (a run puts its
    pool there once); ``synth_bounds``: the task's synthetic rows ``[lo, hi)`` (default: the pool's).
    """

    def __init__(self, pool: TaskPool, indices: np.ndarray, *, batch_size: int, synth_batch: int,
                 use_in: str, seed: int, task: int, mesh, augment: dict[str, Any],
                 device_pool=None, synth_bounds: tuple[int, int] | None = None):
        self.indices = np.asarray(indices)
        self.batch_size, self.synth_batch = int(batch_size), int(synth_batch)
        self.seed, self.task, self.mesh = int(seed), int(task), mesh
        self.maker = DeviceBatches(self.batch_size, self.synth_batch, use_in, mesh,
                                   tuple(sorted(augment.items())))
        self.steps_per_epoch = max(1, -(-len(self.indices) // self.batch_size))
        self.synth_bounds = synth_bounds or (pool.synth_lo, pool.synth_hi)
        self.pool = device_pool if device_pool is not None else device_pool_of(pool, mesh)

    def step_args(self) -> dict[str, np.ndarray]:
        return _synth_args(*self.synth_bounds)

    def materialise(self, pool, batch, aug_key, synth_key, stream_args):
        return self.maker.materialise(pool, batch, aug_key, synth_key, stream_args)

    def batches(self, epoch: int, step: int, num_epochs: int) -> Iterator[tuple[int, int, Any]]:
        sharding = parallel.batch_sharded(self.mesh)
        for e in range(epoch, epoch + num_epochs):
            order, valid = epoch_batches(self.indices, self.batch_size,
                                         np.random.default_rng([self.seed, self.task, e]))
            for s in range(step if e == epoch else 0, len(order)):
                yield e, s, {"index": parallel.put_global(order[s].astype(np.int32), sharding),
                             "valid": parallel.put_global(valid[s], sharding)}

    def state(self, epoch: int, step: int) -> dict[str, Any]:
        """Where the stream stands before ``(epoch, step)``: its batches are a function of it."""
        return {"epoch": int(epoch), "step": int(step)}

    def restore(self, state: dict[str, Any]) -> tuple[int, int]:
        return int(state["epoch"]), int(state["step"])

    def close(self) -> None:
        pass


def device_pool_of(pool: TaskPool, mesh):
    """A pool's ``(uint8 images, int32 labels)`` replicated on every device of ``mesh``."""
    return (parallel.put_replicated(pool.images, mesh), parallel.put_replicated(pool.labels, mesh))


@dataclasses.dataclass(frozen=True)
class DecodedBatches:
    """Batches that arrive decoded and augmented (``real_image``, ``real_label`` and, with a
    synthetic stream, ``synth_image``, ``synth_label``: uint8 / int32 global arrays); the
    :class:`HostStream`'s maker, and what a benchmark can feed the step directly."""

    batch_size: int
    synth_batch: int
    use_in: str
    mesh: Any

    @property
    def maker(self):
        return self

    @property
    def pool(self):
        return ()

    def step_args(self) -> dict[str, np.ndarray]:
        return _synth_args(0, 1)

    def materialise(self, pool, batch, aug_key, synth_key, stream_args):
        del pool, aug_key, synth_key, stream_args  # augmented on the host
        x, y = batch["real_image"], batch["real_label"]
        real_valid = batch.get("real_valid")
        if real_valid is None:  # every row real (a benchmark's batches)
            real_valid = jnp.ones((self.batch_size,), jnp.float32)
        valid = _with_synthetic(real_valid, self.synth_batch)
        if self.synth_batch > 0:
            x = jnp.concatenate([x, batch["synth_image"]])
            y = jnp.concatenate([y, batch["synth_label"]])
        x = jax.lax.with_sharding_constraint(x, parallel.batch_sharded(self.mesh))
        return {"image": x.astype(jnp.float32) / 255.0, "label": y,
                **_masks(self.use_in, self.batch_size, self.synth_batch, valid)}


class HostStream:
    """ImageNet-size training stream (see the module docstring); ``synth_bounds`` are the task's
    synthetic rows of the pool (default: all of them)."""

    pool = ()

    def __init__(self, pool: TaskPool, indices: np.ndarray, *, batch_size: int, synth_batch: int,
                 use_in: str, seed: int, mesh, pipeline: dict[str, Any],
                 synth_bounds: tuple[int, int] | None = None):
        from sdcil_jax.data.host_pipeline import HostPipeline

        self.maker = DecodedBatches(int(batch_size), int(synth_batch), use_in, mesh)
        self.synth_batch = self.maker.synth_batch
        lo, hi = synth_bounds or (pool.synth_lo, pool.synth_hi)
        # the last partial batch is kept, padded and masked (every image once per epoch)
        self.real = HostPipeline(pool.source, np.asarray(indices), batch_size=batch_size,
                                 train=True, seed=seed, mesh=mesh, drop_remainder=False,
                                 **pipeline)
        self.synth = None
        if self.synth_batch > 0:
            synth_idx = np.arange(lo, hi)
            if 0 < len(synth_idx) < self.synth_batch:  # a small pool: repeat it to fill a batch
                synth_idx = np.tile(synth_idx, -(-self.synth_batch // len(synth_idx)))
            self.synth = HostPipeline(pool.source, synth_idx,
                                      batch_size=self.synth_batch, train=True, seed=seed + 1,
                                      mesh=mesh, **pipeline)
        self.steps_per_epoch = self.real.steps_per_epoch

    def step_args(self) -> dict[str, np.ndarray]:
        return self.maker.step_args()

    def materialise(self, pool, batch, aug_key, synth_key, stream_args):
        return self.maker.materialise(pool, batch, aug_key, synth_key, stream_args)

    def state(self, epoch: int, step: int) -> dict[str, Any]:
        """The pipelines' checkpointable states (grain's iterator position included) after the
        batches handed over so far, i.e. before step ``step`` of ``epoch``."""
        out = {"epoch": int(epoch), "step": int(step), "real": self.real.state()}
        if self.synth is not None:
            out["synth"] = self.synth.state()
        return out

    def restore(self, state: dict[str, Any]) -> tuple[int, int]:
        """Continue from :meth:`state` (grain state included); returns ``(epoch, step)``."""
        self.real.restore(state["real"])
        if self.synth is not None:
            self.synth.restore(state["synth"])
        return int(state["epoch"]), int(state["step"])

    def batches(self, epoch: int, step: int, num_epochs: int) -> Iterator[tuple[int, int, Any]]:
        spe = self.steps_per_epoch
        real_it = self.real.device_iterator(epoch=epoch, start_step=step, num_epochs=num_epochs)
        synth_it = None
        if self.synth is not None:
            done, sspe = epoch * spe + step, self.synth.steps_per_epoch
            synth_it = self.synth.device_iterator(epoch=done // sspe, start_step=done % sspe,
                                                  num_epochs=None)
        e, s = epoch, step
        try:
            for real in real_it:
                batch = {"real_image": real.images, "real_label": real.labels,
                         "real_valid": real.mask}
                if synth_it is not None:
                    synth = next(synth_it)
                    batch.update(synth_image=synth.images, synth_label=synth.labels)
                yield e, s, batch
                s += 1
                if s == spe:
                    e, s = e + 1, 0
        finally:
            real_it.close()
            if synth_it is not None:
                synth_it.close()

    def close(self) -> None:
        self.real.close()
        if self.synth is not None:
            self.synth.close()


def host_pipeline_options(config) -> dict[str, Any]:
    """The host pipeline's settings from the config (crop sizes, workers, augmentation)."""
    d = config.dataset
    return dict(image_size=d.image_size, test_resize=d.test_resize, workers=d.workers,
                prefetch=d.prefetch, flip=config.train.flip, brightness=config.train.brightness)


def train_stream(config, pool: TaskPool, indices: np.ndarray, *, task: int, finetune: bool,
                 synth_batch: int, mesh, synth_bounds: tuple[int, int] | None = None,
                 device_pool=None):
    """The training stream of one stage (``finetune`` or not) of ``task`` over pool ``indices``
    (``synth_bounds``: the task's synthetic rows; ``device_pool``: the pool already on the mesh)."""
    c = config
    if pool.images is not None:
        augment = dict(crop_padding=c.train.crop_padding, flip=c.train.flip,
                       brightness=c.train.brightness)
        return DeviceStream(pool, indices, batch_size=c.train.batch_size, synth_batch=synth_batch,
                            use_in=c.synthetic.use_in, seed=c.seed + (7919 if finetune else 0),
                            task=task, mesh=mesh, augment=augment, device_pool=device_pool,
                            synth_bounds=synth_bounds)
    seed = int(np.random.default_rng([c.seed, task, int(finetune)]).integers(2**31))
    return HostStream(pool, indices, batch_size=c.train.batch_size, synth_batch=synth_batch,
                      use_in=c.synthetic.use_in, seed=seed, mesh=mesh,
                      pipeline=host_pipeline_options(c), synth_bounds=synth_bounds)


def eval_batches(config, items: TaskPool, indices: np.ndarray, mesh) -> Iterator[tuple[Any, int]]:
    """``(images, n_valid)`` over ``items[indices]`` in order: uint8 global batches of
    ``train.eval_batch_size`` (the last one zero-padded; its first ``n_valid`` rows are real)."""
    indices = np.asarray(indices, np.int64)
    size = config.train.eval_batch_size
    if items.images is not None:
        sharding = parallel.batch_sharded(mesh)
        images = items.images[indices]
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            n = len(chunk)
            if n < size:
                chunk = np.concatenate([chunk, np.zeros((size - n,) + chunk.shape[1:], chunk.dtype)])
            yield parallel.put_global(chunk, sharding), n
        return
    if not len(indices):
        return
    from sdcil_jax.data.host_pipeline import HostPipeline

    options = host_pipeline_options(config)
    options.pop("flip"), options.pop("brightness")
    with HostPipeline(items.source, indices, batch_size=size, train=False, mesh=mesh,
                      **options) as pipe:
        for step, batch in enumerate(pipe.device_iterator()):
            yield batch.images, min(size, len(indices) - step * size)
