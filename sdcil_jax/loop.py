"""The one epoch loop and the one predict, over any batch stream (:mod:`sdcil_jax.data.stream`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sdcil_jax import distributed
from sdcil_jax.errors import UserError


def run_epochs(*, step_fn, state, old_vars, stream, task_key, args, epochs: int, task: int, desc: str,
               start: tuple[int, int] = (0, 0), start_sums: dict[str, float] | None = None,
               log_fn: Callable[[int, dict[str, float]], None] | None = None,
               after_step: Callable[[Any, int, int, dict], None] | None = None,
               progress: bool = True, timing: dict[str, float] | None = None):
    """Run ``epochs`` epochs of ``stream`` through ``step_fn``; returns the final state.

    Each step is ``step_fn(state, old_vars, stream.pool, batch, task_key, args)``; ``args`` are the
    stage's traced arguments (:func:`sdcil_jax.train.step_args`).

    Starts at ``start = (epoch, step_in_epoch)`` (resume; ``start_sums`` are that epoch's partial
    metric sums). Metric sums stay on the devices (no host sync per step). ``after_step(state, epoch,
    steps_done_in_epoch, sums)`` runs after every step (checkpoints, preemption); at the end of each
    epoch the means over its steps go to ``log_fn(epoch, means)``, and a non-finite loss stops the
    run with a :class:`UserError`.

    ``timing`` (if given) receives, in seconds: ``compile`` (the first step call, which traces and
    compiles), ``data`` (waiting for the stream's next batch), ``host`` (metric sums, hooks,
    logging), ``sync`` (waiting for the devices at each epoch's end, for its metrics) and ``steps``
    (the number of steps run). Step calls only dispatch work to the devices
    (asynchronous), so ``data + host`` is the host time spent outside the compiled step.
    """
    spe = stream.steps_per_epoch
    first_epoch, first_step = start
    bar = tqdm(total=epochs * spe, initial=first_epoch * spe + first_step, desc=desc, unit="step",
               disable=not progress, dynamic_ncols=True, leave=False)
    sums: dict[str, Any] = dict(start_sums or {}) if first_step else {}
    t = timing if timing is not None else {}
    for key in ("compile", "data", "host", "sync", "steps"):
        t.setdefault(key, 0.0)
    clock = time.perf_counter

    def close_epoch(epoch: int, sums: dict[str, Any]) -> None:
        sync = clock()
        means = {k: float(v) / spe for k, v in sums.items()}  # waits for the epoch's steps
        t["sync"] += clock() - sync
        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.3f}", refresh=False)
        if not np.isfinite(means.get("loss", 0.0)):
            raise UserError(
                f"Training diverged: loss is {means['loss']} in task {task + 1}, epoch "
                f"{epoch + 1} (steps {epoch * spe + 1}-{(epoch + 1) * spe}); lower train.lr "
                "or check the data.")
        if log_fn is not None:
            log_fn(epoch, means)

    if first_step >= spe:  # resumed exactly at the end of an epoch: close it as a run would have
        close_epoch(first_epoch, sums)
        first_epoch, first_step, sums = first_epoch + 1, 0, {}
    batches = stream.batches(first_epoch, first_step, max(epochs - first_epoch, 0))
    try:
        while True:
            tick = clock()
            item = next(batches, None)
            tock = clock()
            t["data"] += tock - tick
            if item is None:
                break
            epoch, step, batch = item
            state, metrics = step_fn(state, old_vars, stream.pool, batch, task_key, args)
            tick = clock()
            if not t["steps"]:
                t["compile"] += tick - tock
            t["steps"] += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            if after_step is not None:
                after_step(state, epoch, step + 1, sums)
            if step + 1 == spe:
                sync_before = t["sync"]
                close_epoch(epoch, sums)
                sums = {}
                tick += t["sync"] - sync_before
            t["host"] += clock() - tick
    finally:
        batches.close()
        bar.close()
    return state


def predict(eval_fn, params, batch_stats, batches: Iterable[tuple[Any, int]],
            feat_dim: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Logits and features over ``(images, n_valid)`` batches (padding rows dropped), gathered from
    every process (each process gets the whole result). Logits are None for a features-only
    ``eval_fn`` (one that returns None for them)."""
    logits, feats = [], []
    for images, n_valid in batches:
        lg, ft = eval_fn(params, batch_stats, images)
        if lg is not None:
            logits.append(distributed.gather_rows(lg)[:n_valid])
        feats.append(distributed.gather_rows(ft)[:n_valid])
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0, feat_dim), np.float32)
    return (np.concatenate(logits) if logits else None), np.concatenate(feats)
