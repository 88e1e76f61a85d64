"""One task of class-incremental training: ``TaskRunner.run_task(state, t) -> state``.

A task, in PODNet's official order: build the task's pool (real images + synthetic images of the old
classes), grow the classifier (k-means imprinting for PODNet), train, herd the new classes'
exemplars, finetune the classifier on a class-balanced set (methods that do), herd again with the
finetuned network, evaluate (CNN, NME with flipped exemplars, domain gap), freeze the model as the
next task's old model, save. Everything a task reads from the previous one is in the
:class:`~sdcil_jax.run_state.TaskState` it receives.

One program per stage kind per run: the classifier is allocated for every class of the protocol
from the first task (``Method.pad_head``; new classes are written into their rows in place), the
device pool holds the synthetic images of every class that becomes old (a task draws from its prefix
``[synth_lo, synth_lo + per_class * num_old)``), and what changes from task to task (old/new
boundary, distillation factors, synthetic bounds, the stage's schedule) reaches the compiled steps
as traced ``args`` (:func:`sdcil_jax.train.step_args`). The jitted steps and evaluation programs
are built once and kept here, so a run compiles the first task's training step, the later tasks'
training step, one finetuning step, and one logits and two features programs, whatever its length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sdcil_jax import distributed, loop, parallel, reporting
from sdcil_jax import evaluate as ev
from sdcil_jax import plan as plan_lib
from sdcil_jax import train as train_lib
from sdcil_jax.data import memory as memory_lib
from sdcil_jax.data import pool as pool_lib
from sdcil_jax.data import stream as stream_lib
from sdcil_jax.methods import TaskInfo, get_method
from sdcil_jax.models import build_backbone
from sdcil_jax.run_state import Position, Saver, TaskState


@contextlib.contextmanager
def _timed(times: dict[str, float], key: str):
    """Adds the seconds spent in the ``with`` block to ``times[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[key] = round(times.get(key, 0.0) + time.perf_counter() - start, 3)


class TaskRunner:
    """The context of a run's tasks: experiment, model, devices, and its saver (immutable but for
    its caches: the run's pool and the jitted steps and evaluation functions)."""

    def __init__(self, exp, saver: Saver, progress: bool = True):
        self.exp, self.saver, self.progress = exp, saver, progress
        self.plan = None  # a plan.training_plan(exp), for the projected time after each task starts
        self._logits_fn = None  # the jitted logits + features eval_fn (the head's shape is fixed)
        self._features_fns: dict[bool, Any] = {}  # flip -> jitted features-only eval_fn
        self._steps: dict[tuple, Any] = {}  # (stage, batch maker, old model?) -> jitted step
        self._run_pool: tuple[pool_lib.TaskPool, Any] | None = None  # (pool, device copy or None)
        cfg, ds = exp.config, exp.dataset
        self.mesh = parallel.make_mesh()
        self.method = get_method(cfg)  # one for every task: the task's facts arrive as ``args``
        self.head_classes = len(exp.scenario.class_order)  # the head holds every class
        self.backbone = build_backbone(cfg.model)
        self.mean, self.std = pool_lib.normalisation(cfg.dataset, ds, exp.train_idx)
        self.train_y = exp.scenario.relabel(ds.train.labels[exp.train_idx]).astype(np.int32)
        self.test_y = exp.scenario.relabel(ds.test.labels).astype(np.int32)
        # herding pads every class to the largest class of the run: one program for any task
        self.herd_rows = int(np.bincount(self.train_y[self.train_y >= 0]).max(initial=1))
        dummy = jnp.zeros((1, *ds.input_shape), jnp.float32)
        shapes = jax.eval_shape(lambda: self.backbone.init(jax.random.PRNGKey(0), dummy,
                                                           train=False))
        self.feat_dim = int(jax.eval_shape(lambda v: self.backbone.apply(v, dummy, train=False),
                                           shapes)["features"].shape[-1])

    # ------------------------------------------------------------------------------------ state
    def initial_state(self) -> TaskState:
        dummy = jnp.zeros((1, *self.exp.dataset.input_shape), jnp.float32)
        key = jax.random.fold_in(jax.random.PRNGKey(self.exp.config.seed), 1_000_003)
        variables = jax.jit(lambda k: self.backbone.init(k, dummy, train=False))(key)
        return TaskState(params={"backbone": variables["params"], "head": None},
                         batch_stats=variables["batch_stats"])

    def task_info(self, t: int) -> TaskInfo:
        start, end = self.exp.scenario.task_range(t)
        return TaskInfo(task=t, num_old=start, num_new=end - start)

    def state_template(self, progress: dict[str, Any]):
        """Shapes of the train state saved at ``progress`` (built without running anything)."""
        phase = progress["phase"]
        dummy = jnp.zeros((1, *self.exp.dataset.input_shape), jnp.float32)
        variables = jax.eval_shape(lambda: self.backbone.init(jax.random.PRNGKey(0), dummy,
                                                              train=False))
        backbone, stats = variables["params"], variables["batch_stats"]
        head = jax.eval_shape(lambda: self.method.init_head(jax.random.PRNGKey(0), self.feat_dim,
                                                            self.head_classes))
        params = {"backbone": backbone, "head": head}
        if phase == "task_done":
            return jax.eval_shape(lambda: train_lib.TrainState(
                step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=()))
        tx = self._optimizer(phase == "finetune")[0]
        make = train_lib.init_head_state if phase == "finetune" else train_lib.init_state
        return jax.eval_shape(lambda: make(params, stats, tx))

    # ------------------------------------------------------------------------------------- task
    def run_task(self, state: TaskState, t: int, resume: tuple[Position, Any] | None = None
                 ) -> TaskState:
        """Train, finetune, select exemplars and evaluate task ``t``; returns the next state.

        ``resume = (position, train_state)`` continues a phase that a checkpoint interrupted.
        """
        cfg, sc = self.exp.config, self.exp.scenario
        clock = time.perf_counter()
        start, end = sc.task_range(t)
        method, info = self.method, self.task_info(t)
        task_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), t)
        pool = self._pool()
        synth_hi = self._synth_hi(pool, info)
        preview = min(cfg.generation.preview_per_class, cfg.synthetic.per_class)
        if resume is None and preview > 0 and self.exp.store is not None:
            old_classes = [c for k in range(t) for c in sc.task_classes(k)]
            # the grid shows the first 16 classes (Board.samples' max_classes): read only those
            x, y = pool_lib.synthetic_images(self.exp.store, old_classes[:16], 0, preview,
                                             sc.relabel, self.exp.dataset.image_shape)
            self.saver.board.samples(x, y, self.saver.position.global_step, per_class=preview)
        state = dataclasses.replace(state, params=dict(state.params), memory=dict(state.memory))
        if cfg.synthetic.replace_memory:
            synth_y = pool.labels[pool.synth_lo:synth_hi]
            state.memory.update({c: pool.synth_lo + np.flatnonzero(synth_y == c)
                                 for c in range(start)})
        new_idx = np.flatnonzero((self.train_y >= start) & (self.train_y < end))
        seen_idx = np.flatnonzero((self.train_y >= 0) & (self.train_y < end))
        real_idx = method.real_indices(new_idx, memory_lib.memory_indices(state.memory, range(start)),
                                       seen_idx)
        times: dict[str, float] = {}
        if resume is None:
            with _timed(times, "imprint"):
                state.params["head"] = self._grown_head(state, info, pool)
        synth = cfg.synthetic.use_in != "none" and synth_hi > pool.synth_lo
        synth_batch = (cfg.synthetic.batch_size or cfg.train.batch_size) if synth else 0
        if resume is None or resume[0].phase == "train":
            state = self._stage(state, info, "train", real_idx, pool, task_key, synth_batch,
                                resume, times)
            with _timed(times, "herding"):
                state = self._update_memory(state, method, pool, start, end)
            resume = None
        if method.finetune_epochs(info) > 0:
            balanced = memory_lib.balanced_indices(state.memory, end, cfg.memory.per_class,
                                                   cfg.seed, t)
            if cfg.synthetic.in_finetuning and not cfg.synthetic.replace_memory:
                balanced = np.concatenate([balanced, np.arange(pool.synth_lo, synth_hi)])
            state = self._stage(state, info, "finetune", balanced, pool,
                                jax.random.fold_in(task_key, 1), 0, resume, times)
            with _timed(times, "herding"):
                state = self._update_memory(state, method, pool, start, end)
        with _timed(times, "evaluate"):
            result = self._evaluate(state, method, pool, t)
        result.update(task=t, num_classes=end, new_classes=sc.task_classes(t),
                      train_images=int(len(real_idx)),
                      synthetic_images=int(synth_hi - pool.synth_lo),
                      train_time_s=round(time.perf_counter() - clock, 2))
        result["time_s"] = times
        state.results = [*state.results, result]
        self.saver.logger.log({"event": "task", **result})
        self.saver.board.task(result, [r["task_accuracies"] for r in state.results],
                              self.saver.position.global_step)
        if distributed.is_main():
            reporting.print_task_line(result, sc.num_tasks)
        if method.needs_old_model:
            state.old = parallel.put_replicated(
                {"params": state.params, "batch_stats": state.batch_stats}, self.mesh)
        saved = self.saver.save_seconds
        self.saver.save_task_end(state, t)
        times["checkpoint"] = round(times.get("checkpoint", 0.0)
                                    + self.saver.save_seconds - saved, 3)
        times["total"] = round(time.perf_counter() - clock, 3)
        self.saver.stop_if_requested(f"after task {t + 1}")
        return state

    # ----------------------------------------------------------------------------------- stages
    def _pool(self) -> pool_lib.TaskPool:
        """The run's pool (built once): the real training images, then ``synthetic.per_class``
        synthetic images of every class that becomes old, in class order, so task ``t``'s
        synthetic rows are the prefix ``[synth_lo, synth_lo + per_class * num_old(t))`` and a
        position means the same image in every task."""
        if self._run_pool is None:
            exp = self.exp
            last = exp.scenario.num_tasks - 1
            old_classes = [c for k in range(last) for c in exp.scenario.task_classes(k)]
            synth_x, synth_y = pool_lib.task_synthetic(
                exp.dataset, exp.store, old_classes, 0, exp.config.synthetic.per_class,
                exp.scenario.relabel)
            pool = pool_lib.build_pool(exp.dataset, exp.train_idx, self.train_y, synth_x, synth_y)
            device = None
            if pool.images is not None:
                device = stream_lib.device_pool_of(pool, self.mesh)
            self._run_pool = (pool, device)
        return self._run_pool[0]

    def _synth_hi(self, pool: pool_lib.TaskPool, info: TaskInfo) -> int:
        """End of task ``info``'s synthetic rows (its old classes' images) in the run's pool."""
        if pool.synth_hi == pool.synth_lo:
            return pool.synth_lo
        return pool.synth_lo + self.exp.config.synthetic.per_class * info.num_old

    def _grown_head(self, state: TaskState, info: TaskInfo, pool):
        """The head with task ``info``'s classes written into their rows (the first task allocates
        it for every class: its own classes initialised, the others dead)."""
        method = self.method
        head_key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.exp.config.seed),
                                                         info.task), 7)
        if state.params["head"] is None:
            head = method.init_head(head_key, self.feat_dim, info.num_new)
            return method.pad_head(jax.device_get(head), self.head_classes)
        feats = None
        if method.imprint:
            feats = self._class_features(state, pool, range(info.num_old, info.num_seen))
        return method.grow_head(state.params["head"], head_key, info, feats)

    def _optimizer(self, finetune: bool):
        """``(optax direction, lr kind, base lr)`` of a stage: the optimizer without its learning
        rate (:func:`~sdcil_jax.train.sgd_direction`), which the step applies from traced
        schedule arguments, so one program serves stages of any length."""
        c = self.exp.config
        lr = c.method.finetune_lr if finetune else c.train.lr
        # Finetuning: constant lr (the official finetuning has no scheduler), same SGD otherwise.
        schedule = "constant" if finetune else c.train.schedule
        return train_lib.sgd_direction(c.train.momentum, c.train.weight_decay), schedule, lr

    def _step_fn(self, stage: str, stream, old: bool):
        """The jitted step of ``stage`` for ``stream``'s batch kind (with or without an old model),
        built once per run: later tasks reuse it, so its compilation is reused too."""
        key = (stage, stream.maker, old)
        if key not in self._steps:
            finetune = stage == "finetune"
            tx, kind, _ = self._optimizer(finetune)
            make = train_lib.make_finetune_step if finetune else train_lib.make_train_step
            self._steps[key] = jax.jit(make(self.backbone, self.method, tx, stream.maker,
                                            self.mean, self.std, lr_kind=kind),
                                       donate_argnums=(0,))
        return self._steps[key]

    def _stage(self, state: TaskState, info: TaskInfo, stage: str, indices, pool, key,
               synth_batch: int, resume: tuple[Position, Any] | None,
               times: dict[str, float]) -> TaskState:
        """One training stage ('train' or 'finetune'); adds its seconds to ``times``: the stage's
        wall time, its compilation, checkpoints written during it, and ``<stage>_outside_share``,
        the share of the stage (compilation and checkpoints excluded) that the host spent outside
        the compiled step (waiting for batches, hooks, logging)."""
        t, method = info.task, self.method
        clock, saved = time.perf_counter(), self.saver.save_seconds
        finetune = stage == "finetune"
        stream = stream_lib.train_stream(
            self.exp.config, pool, indices, task=t, finetune=finetune, synth_batch=synth_batch,
            mesh=self.mesh, synth_bounds=(pool.synth_lo, self._synth_hi(pool, info)),
            device_pool=self._run_pool[1])
        epochs = method.finetune_epochs(info) if finetune else self.exp.config.train.epochs
        spe = stream.steps_per_epoch
        tx, kind, base_lr = self._optimizer(finetune)
        lr_fn = train_lib.lr_schedule(base_lr, kind, epochs * spe, spe)  # the logged lr
        step_fn = self._step_fn(stage, stream, state.old is not None and not finetune)
        args = parallel.put_replicated(train_lib.step_args(
            method, stream, train_lib.schedule_args(base_lr, epochs * spe, spe), info), self.mesh)
        start, sums = (0, 0), None
        if resume is not None:
            position, train_state = resume
            sums = position.sums
            start = (stream.restore(position.stream) if position.stream
                     else (position.epoch, position.step))
        else:
            init = train_lib.init_head_state if finetune else train_lib.init_state
            train_state = init(state.params, state.batch_stats, tx)
        train_state = parallel.put_replicated(train_state, self.mesh)

        timing: dict[str, float] = {}

        def log_epoch(epoch, means):
            lr = float(lr_fn(epoch * spe) if callable(lr_fn) else lr_fn)
            self.saver.logger.log({"event": stage, "task": t, "epoch": epoch, **means, "lr": lr})
            self.saver.board.epoch(stage, means, lr, self.saver.position.global_step)
            if (stage == "train" and self.plan is not None and distributed.is_main()
                    and timing["steps"] and epoch == start[0]):
                busy = (time.perf_counter() - clock - timing["compile"]
                        - (self.saver.save_seconds - saved))
                done = start[0] * spe + start[1] + int(timing["steps"])
                # above the open progress bar, not into its line
                tqdm.write(plan_lib.projection_line(self.plan, t, done, busy / timing["steps"]))

        def after_step(train_state, epoch, done, sums):
            position = Position(task=t, phase=stage, epoch=epoch, step=done, sums=sums,
                                stream=stream.state(epoch, done))
            self.saver.after_step(state, position, train_state)

        try:
            train_state = loop.run_epochs(
                step_fn=step_fn, state=train_state, old_vars=state.old if not finetune else None,
                stream=stream, task_key=key, args=args, epochs=epochs, task=t, start=start, start_sums=sums,
                desc=f"task {t + 1}/{self.exp.scenario.num_tasks} {stage}", log_fn=log_epoch,
                after_step=after_step, progress=self.progress, timing=timing)
        finally:
            stream.close()
        host = jax.device_get(train_state)
        wall = time.perf_counter() - clock
        ckpt = self.saver.save_seconds - saved
        outside = max(timing["data"] + timing["host"] - ckpt, 0.0)
        busy = max(wall - timing["compile"] - ckpt, 1e-9)
        times[stage] = round(times.get(stage, 0.0) + wall, 3)
        times[f"{stage}_compile"] = round(timing["compile"], 3)
        times[f"{stage}_outside_share"] = round(min(outside / busy, 1.0), 4)
        times["checkpoint"] = round(times.get("checkpoint", 0.0) + ckpt, 3)
        return dataclasses.replace(state, params=host.params, batch_stats=host.batch_stats)

    def _class_features(self, state: TaskState, pool, classes) -> list[np.ndarray]:
        """Features of every training image of each class in ``classes``: one predict pass."""
        rows = [np.flatnonzero(self.train_y == c) for c in classes]
        feats = self._features(state, pool,
                               np.concatenate(rows) if rows else np.zeros((0,), np.int64))
        return np.split(feats, np.cumsum([len(r) for r in rows])[:-1]) if rows else []

    def _update_memory(self, state: TaskState, method, pool, start: int, end: int) -> TaskState:
        """Fixed memory per class: herding (on the device, every class at once) or random
        exemplars of the new classes."""
        cfg = self.exp.config
        if not method.uses_memory or cfg.memory.per_class == 0:
            return state
        classes = list(range(start, end))
        feats = self._class_features(state, pool, classes)
        rows = [np.flatnonzero(self.train_y == c) for c in classes]
        memory = dict(state.memory)
        if cfg.memory.selection == "herding":
            padded = np.zeros((len(classes), self.herd_rows, self.feat_dim), np.float32)
            for i, f in enumerate(feats):
                padded[i, :len(f)] = f
            picks = memory_lib.herding_select_classes(padded, [len(f) for f in feats],
                                                      cfg.memory.per_class)
            for c, pick, idx_c in zip(classes, picks, rows, strict=True):
                memory[c] = idx_c[pick[pick >= 0]]
        else:
            for c, f, idx_c in zip(classes, feats, rows, strict=True):
                memory[c] = idx_c[memory_lib.select_memory(f, cfg.memory.per_class, "random",
                                                           cfg.seed * 1000 + c)]
        return dataclasses.replace(state, memory=memory)

    # ------------------------------------------------------------------------------- evaluation
    def _eval_fn(self):
        """The jitted ``eval_fn`` (logits of every allocated class, and features), shared by every
        task's test-set evaluation and domain gap: the head's shape never changes, so it compiles
        once per run (the host keeps the seen classes' columns)."""
        if self._logits_fn is None:
            self._logits_fn = jax.jit(train_lib.make_eval_fn(
                self.backbone, self.method.head_apply, jnp.asarray(self.mean), jnp.asarray(self.std)))
        return self._logits_fn

    def _features_fn(self, flip: bool = False):
        """The jitted features-only ``eval_fn`` (no head, so its shapes never change): compiled once
        per run for plain and once for flipped images, shared by every task's feature passes
        (imprinting, herding, the memory's NME means)."""
        if flip not in self._features_fns:
            self._features_fns[flip] = jax.jit(train_lib.make_eval_fn(
                self.backbone, None, jnp.asarray(self.mean), jnp.asarray(self.std), flip=flip))
        return self._features_fns[flip]

    def _predict(self, eval_fn, state: TaskState, items, indices):
        batches = stream_lib.eval_batches(self.exp.config, items, indices, self.mesh)
        return loop.predict(eval_fn, state.params, state.batch_stats, batches, self.feat_dim)

    def _features(self, state: TaskState, items, indices, flip: bool = False) -> np.ndarray:
        """Features (n, D) of ``items[indices]`` (the backbone only: the head is not an input)."""
        backbone_only = {"backbone": state.params["backbone"], "head": None}
        return self._predict(self._features_fn(flip), dataclasses.replace(state, params=backbone_only),
                             items, indices)[1]

    def _evaluate(self, state: TaskState, method, pool, t: int) -> dict[str, Any]:
        start, end = self.exp.scenario.task_range(t)
        eval_fn = self._eval_fn()
        memory_means = None
        mem_all = memory_lib.memory_indices(state.memory, range(end))
        if method.uses_memory and len(mem_all):
            mem_feats = self._features(state, pool, mem_all)
            mem_flip = self._features(state, pool, mem_all, flip=True)
            memory_means = ev.class_means(mem_feats, pool.labels[mem_all], end, mem_flip)
        sel = np.flatnonzero((self.test_y >= 0) & (self.test_y < end))
        test = pool_lib.TaskPool(self.test_y, len(self.test_y), len(self.test_y),
                                 self.exp.dataset.test.source, self.exp.dataset.test.images)
        logits, feats = self._predict(eval_fn, state, test, sel)
        result = ev.evaluate_task(
            logits=logits, feats=feats, labels=self.test_y[sel], num_seen=end,
            task_bounds=[self.exp.scenario.task_range(k) for k in range(t + 1)], num_old=start,
            memory_means=memory_means)
        result["synthetic_accuracy"] = self._domain_gap(state, eval_fn, t, end)
        return result

    def _domain_gap(self, state: TaskState, eval_fn, t: int, end: int) -> float | None:
        """CNN accuracy on held-out synthetic images of the seen classes (never trained on)."""
        exp, n = self.exp, self.exp.config.synthetic.diagnostic_per_class
        if n == 0 or exp.store is None:
            return None
        classes = [c for k in range(t + 1) for c in exp.scenario.task_classes(k)]
        x, y = pool_lib.task_synthetic(exp.dataset, exp.store, classes,
                                       exp.config.synthetic.per_class, n, exp.scenario.relabel)
        items = pool_lib.array_items(exp.dataset, x, y)
        logits, _ = self._predict(eval_fn, state, items, np.arange(len(y)))
        return ev.accuracy(np.argmax(logits[:, :end], axis=1), y)
