"""One task of class-incremental training: epochs over the real stream, evaluation, memory update.

The host only decides *which* pool indices form each real batch (a seeded permutation per epoch);
images, augmentation and the synthetic batch stay on the devices (see ``sdcil_jax.train``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sdcil_jax import evaluate as ev
from sdcil_jax import parallel
from sdcil_jax import train as train_lib
from sdcil_jax.data import herding_select, random_select
from sdcil_jax.errors import UserError


@dataclasses.dataclass
class TaskPool:
    """The images a task may touch, as one uint8 array: real training images, then synthetic ones.

    ``labels`` are incremental labels (-1 for classes outside the scenario); the synthetic part is
    ``[synth_lo, synth_hi)``.
    """

    images: np.ndarray | None  # None with the host pipeline (see ``source``)
    labels: np.ndarray
    synth_lo: int
    synth_hi: int
    source: Any = None  # host pipeline: a PoolSource over the same items


def epoch_batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A shuffled epoch as (steps, batch_size) indices; the last batch wraps around the permutation.

    steps = ceil(len(indices) / batch_size); every index appears at least once per epoch.
    """
    perm = indices[rng.permutation(len(indices))]
    steps = max(1, -(-len(perm) // batch_size))
    need = steps * batch_size
    reps = -(-need // len(perm))
    return np.tile(perm, reps)[:need].reshape(steps, batch_size)


def run_epochs(*, step_fn, state, old_vars, pool_dev, real_indices: np.ndarray, epochs: int,
               batch_size: int, synth_bounds: tuple[int, int], task_key, mesh, seed: int, task: int,
               desc: str, log_fn=None, progress: bool = True, start: tuple[int, int] = (0, 0),
               start_sums: dict[str, float] | None = None, after_step=None):
    """Run ``epochs`` passes over ``real_indices`` with ``step_fn``; returns the final state.

    Epoch e's batches come from ``default_rng([seed, task, e])``, so a run can start at any
    ``start = (epoch, step_in_epoch)`` and reproduce exactly the batches an uninterrupted run would
    see (``start_sums`` restores that epoch's partial metric sums). ``after_step(state, epoch,
    steps_done_in_epoch, sums)`` runs after every step (checkpointing, preemption). Metrics of each
    epoch (means over its steps) are passed to ``log_fn(epoch, metrics)``.
    """
    sharding = parallel.batch_sharded(mesh)
    lo = jnp.asarray(synth_bounds[0], jnp.int32)
    hi = jnp.asarray(max(synth_bounds[1], synth_bounds[0] + 1), jnp.int32)
    steps_per_epoch = max(1, -(-len(real_indices) // batch_size))
    first_epoch, first_step = start
    bar = tqdm(total=epochs * steps_per_epoch, initial=first_epoch * steps_per_epoch + first_step,
               desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    for epoch in range(first_epoch, epochs):
        rng = np.random.default_rng([seed, task, epoch])
        batches = epoch_batches(real_indices, batch_size, rng)
        skip = first_step if epoch == first_epoch else 0
        sums: dict[str, Any] = dict(start_sums or {}) if skip else {}
        for i in range(skip, len(batches)):
            idx = parallel.put_global(batches[i].astype(np.int32), sharding)
            state, metrics = step_fn(state, old_vars, pool_dev[0], pool_dev[1], idx, lo, hi,
                                     task_key)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v  # stays on device: no sync per step
            bar.update(1)
            if after_step is not None:
                after_step(state, epoch, i + 1, sums)
        means = {k: float(v) / len(batches) for k, v in sums.items()}
        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.3f}", refresh=False)
        if not np.isfinite(means.get("loss", 0.0)):
            raise UserError(
                f"Training diverged: loss is {means['loss']} in task {task + 1}, epoch {epoch + 1} "
                f"(steps {epoch * len(batches) + 1}-{(epoch + 1) * len(batches)}); lower train.lr "
                "or check the data."
            )
        if log_fn is not None:
            log_fn(epoch, means)
    bar.close()
    return state


def run_epochs_host(*, step_fn, state, old_vars, real_pipe, synth_pipe, epochs: int, task: int,
                    desc: str, log_fn=None, progress: bool = True, start: tuple[int, int] = (0, 0),
                    start_sums: dict[str, float] | None = None, after_step=None):
    """:func:`run_epochs` for the host pipeline (ImageNet-size data).

    ``real_pipe`` defines the epochs; ``synth_pipe`` (or None) runs alongside it, its position being
    a pure function of the global step, so a resumed run sees exactly the same synthetic batches.
    """
    spe = real_pipe.steps_per_epoch
    first_epoch, first_step = start
    done_steps = first_epoch * spe + first_step
    real_it = real_pipe.device_iterator(epoch=first_epoch, start_step=first_step,
                                        num_epochs=epochs - first_epoch)
    synth_it = None
    if synth_pipe is not None:
        sspe = synth_pipe.steps_per_epoch
        synth_it = synth_pipe.device_iterator(epoch=done_steps // sspe, start_step=done_steps % sspe,
                                              num_epochs=None)
    bar = tqdm(total=epochs * spe, initial=done_steps, desc=desc, unit="step",
               disable=not progress, dynamic_ncols=True, leave=False)
    epoch, step = first_epoch, first_step
    sums: dict[str, Any] = dict(start_sums or {}) if first_step else {}
    try:
        for real in real_it:
            synth = next(synth_it) if synth_it is not None else real
            state, metrics = step_fn(state, old_vars, real.images, real.labels, synth.images,
                                     synth.labels)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            step += 1
            bar.update(1)
            if after_step is not None:
                after_step(state, epoch, step, sums)
            if step == spe:
                means = {k: float(v) / spe for k, v in sums.items()}
                if not np.isfinite(means.get("loss", 0.0)):
                    raise UserError(
                        f"Training diverged: loss is {means['loss']} in task {task + 1}, epoch "
                        f"{epoch + 1} "
                        f"(steps {epoch * spe + 1}-{(epoch + 1) * spe}); lower train.lr or check "
                        "the data.")
                if log_fn is not None:
                    log_fn(epoch, means)
                epoch, step, sums = epoch + 1, 0, {}
    finally:
        real_it.close()
        if synth_it is not None:
            synth_it.close()
        bar.close()
    return state


def predict_host(eval_fn, params, batch_stats, pipe) -> tuple[np.ndarray, np.ndarray]:
    """Logits and features over an evaluation :class:`HostPipeline` (padding dropped)."""
    logits, feats = [], []
    for batch in pipe.device_iterator():
        lg, ft = eval_fn(params, batch_stats, batch.images)
        mask = np.asarray(batch.mask)
        logits.append(np.asarray(lg)[mask])
        feats.append(np.asarray(ft)[mask])
    return np.concatenate(logits), np.concatenate(feats)


def predict(eval_fn, params, batch_stats, images: np.ndarray, batch_size: int, mesh):
    """Logits and features of ``images`` (uint8), batched and padded to the mesh size."""
    sharding = parallel.batch_sharded(mesh)
    n = len(images)
    logits, feats = [], []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        lg, ft = eval_fn(params, batch_stats, parallel.put_global(chunk, sharding))
        logits.append(np.asarray(lg)[: len(chunk) - pad])
        feats.append(np.asarray(ft)[: len(chunk) - pad])
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(feats)


def select_memory(features: np.ndarray, m: int, selection: str, seed: int) -> np.ndarray:
    """Positions (into ``features``) of the ``m`` exemplars of one class."""
    if selection == "herding":
        return np.asarray(herding_select(features, m), dtype=np.int64)
    return np.asarray(random_select(len(features), m, np.random.default_rng(seed)), dtype=np.int64)


def evaluate_task(*, logits: np.ndarray, feats: np.ndarray, labels: np.ndarray, num_seen: int,
                  task_bounds, num_old: int, memory_means: np.ndarray | None) -> dict[str, Any]:
    """CNN and NME accuracies on the test images of the seen classes."""
    pred = np.argmax(logits[:, :num_seen], axis=1)
    result = {
        "cnn_accuracy": ev.accuracy(pred, labels),
        "task_accuracies": ev.task_accuracies(pred, labels, task_bounds),
        "old_accuracy": ev.accuracy(pred[labels < num_old], labels[labels < num_old])
        if num_old else None,
        "new_accuracy": ev.accuracy(pred[labels >= num_old], labels[labels >= num_old]),
        "nme_accuracy": None,
        "nme_task_accuracies": None,
    }
    if memory_means is not None:
        nme = ev.nme_predict(feats, memory_means[:num_seen])
        result["nme_accuracy"] = ev.accuracy(nme, labels)
        result["nme_task_accuracies"] = ev.task_accuracies(nme, labels, task_bounds)
    return result


def timer():
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def state_on_host(state: train_lib.TrainState):
    return jax.device_get(state)
