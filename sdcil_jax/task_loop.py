"""The task loop: for each task, build its pool, train, finetune, update the memory, evaluate.

State carried from task to task (what a checkpoint must hold): the model (``params``,
``batch_stats``), the exemplar ``memory`` (incremental class -> indices into the real training
images), the frozen ``old_vars`` and the results so far.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdcil_jax import evaluate as ev
from sdcil_jax import parallel, reporting
from sdcil_jax import train as train_lib
from sdcil_jax import trainer as tr
from sdcil_jax.checkpoint import SaveTimer
from sdcil_jax.methods import TaskInfo, get_method
from sdcil_jax.models import build_backbone
from sdcil_jax.preemption import Preempted, PreemptionGuard

# torchvision's ImageNet normalisation, used with the host pipeline (PODNet's ImageNet setting).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TaskLoop:
    """Runs the scenario of an :class:`~sdcil_jax.runner.Experiment` task by task."""

    def __init__(self, exp, store, progress: bool = True, checkpointer=None,
                 guard: PreemptionGuard | None = None):
        self.exp, self.store, self.progress = exp, store, progress
        self.ckpt = checkpointer
        self.guard = guard or PreemptionGuard()
        self.save_id = 0
        self.global_step = 0
        self.wall_before = 0.0
        self.resume_point: dict[str, Any] | None = None
        cfg, ds, sc = exp.config, exp.dataset, exp.scenario
        self.cfg, self.ds, self.sc = cfg, ds, sc
        self.mesh = parallel.make_mesh()
        self.logger = reporting.MetricsLogger(exp.workdir)
        # Host pipeline (ImageNet-size data decoded on the host) or uint8 pool on the devices.
        self.host = getattr(ds, "train_source", None) is not None
        self.train_y = sc.relabel(ds.train_labels[exp.train_idx]).astype(np.int32)
        self.test_y = sc.relabel(ds.test_labels).astype(np.int32)
        if self.host:
            self.train_x = None
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            model_shape = ds.model_shape
        else:
            self.train_x = ds.train_images[exp.train_idx]
            flat = self.train_x.reshape(-1, self.train_x.shape[-1])
            mean, std = flat.mean(0) / 255.0, flat.std(0) / 255.0 + 1e-6
            model_shape = ds.image_shape
        if cfg.dataset.mean:
            mean, std = cfg.dataset.mean, cfg.dataset.std
        self.mean = jnp.asarray(mean, jnp.float32)
        self.std = jnp.asarray(std, jnp.float32)
        self.backbone = build_backbone(cfg.model)
        self.base_key = jax.random.PRNGKey(cfg.seed)
        dummy = jnp.zeros((1,) + tuple(model_shape), jnp.float32)
        variables = jax.jit(lambda k: self.backbone.init(k, dummy, train=False))(
            jax.random.fold_in(self.base_key, 1_000_003))
        self.feat_dim = int(jax.eval_shape(
            lambda v: self.backbone.apply(v, dummy, train=False), variables)["features"].shape[-1])
        self.params: dict[str, Any] = {"backbone": variables["params"], "head": None}
        self.batch_stats = variables["batch_stats"]
        self.memory: dict[int, np.ndarray] = {}
        self.old_vars = None
        self.per_task: list[dict[str, Any]] = []
        self.synth_bs = cfg.synthetic.batch_size or cfg.train.batch_size
        self.timer = SaveTimer(cfg.checkpoint.every_minutes, cfg.checkpoint.every_steps)

    # ------------------------------------------------------------------------------------ helpers
    def _synthetic(self, classes: list[int], start: int, count: int):
        """Synthetic images ``[start, start + count)`` of each dataset class, with their labels."""
        shape = (0,) + tuple(self.ds.image_shape)
        if self.store is None or not classes or count == 0:
            return np.zeros(shape, np.uint8), np.zeros((0,), np.int32)
        images, labels = [], []
        for c in classes:
            x = self.store.load(c, start + count)[start:]
            images.append(x)
            labels.append(np.full((len(x),), self.sc.relabel(np.asarray([c]))[0], np.int32))
        return np.concatenate(images), np.concatenate(labels)

    def _predict(self, eval_fn, images: np.ndarray):
        return tr.predict(eval_fn, self.params, self.batch_stats, images,
                          self.cfg.train.eval_batch_size, self.mesh)

    def _host_pipe(self, source, indices, *, train: bool, batch_size: int, seed: int = 0):
        from sdcil_jax.data.host_pipeline import HostPipeline

        d = self.cfg.dataset
        return HostPipeline(source, np.asarray(indices), batch_size=batch_size, train=train,
                            image_size=d.image_size, test_resize=d.test_resize, workers=d.workers,
                            prefetch=d.prefetch, seed=seed, mesh=self.mesh,
                            flip=self.cfg.train.flip, brightness=self.cfg.train.brightness)

    def _host_predict(self, eval_fn, source, indices):
        if len(indices) == 0:
            return np.zeros((0, 0), np.float32), np.zeros((0, self.feat_dim), np.float32)
        pipe = self._host_pipe(source, indices, train=False,
                               batch_size=self.cfg.train.eval_batch_size)
        return tr.predict_host(eval_fn, self.params, self.batch_stats, pipe)

    def _pool_predict(self, eval_fn, pool, indices):
        """Logits and features of pool items (real training images or synthetic ones)."""
        if self.host:
            return self._host_predict(eval_fn, pool.source, indices)
        return self._predict(eval_fn, pool.images[indices])

    def _array_predict(self, eval_fn, images: np.ndarray, labels: np.ndarray):
        if self.host:
            from sdcil_jax.data.lazy import ArraySource

            return self._host_predict(eval_fn, ArraySource(images, labels), np.arange(len(images)))
        return self._predict(eval_fn, images)

    def _eval_fn(self, method, flip: bool = False):
        return jax.jit(train_lib.make_eval_fn(self.backbone, method.head_apply, self.mean,
                                              self.std, flip=flip))

    def _step_config(self, synth_batch: int) -> train_lib.StepConfig:
        c = self.cfg
        return train_lib.StepConfig(
            real_batch=c.train.batch_size, synth_batch=synth_batch,
            synth_in_cls=c.synthetic.use_in in ("classification", "both"),
            synth_in_dist=c.synthetic.use_in in ("distillation", "both"),
            crop_padding=c.train.crop_padding, flip=c.train.flip, brightness=c.train.brightness)

    # -------------------------------------------------------------------------------------- task
    def run(self) -> dict[str, Any]:
        self._clock = clock = tr.timer()
        first = self.resume()
        self.guard.deferred = True  # from now on a signal is handled after the current step
        try:
            for t in range(first, self.sc.num_tasks):
                self.run_task(t)
        finally:
            self.guard.deferred = False
        total_wall = self.wall_before + clock()
        acc_matrix = [r["task_accuracies"] for r in self.per_task]
        nme_matrix = [r["nme_task_accuracies"] for r in self.per_task
                      if r["nme_task_accuracies"] is not None]
        results = reporting.summarise(
            self.exp, self.per_task, acc_matrix, nme_matrix, wall_time_s=total_wall,
            norm=(np.asarray(self.mean).tolist(), np.asarray(self.std).tolist()))
        reporting.write_results(self.exp.workdir, results)
        reporting.print_table(results)
        return results

    def run_task(self, t: int) -> None:
        cfg, sc = self.cfg, self.sc
        task_clock = tr.timer()
        start, end = sc.task_range(t)
        method = self._method_for(t)
        task_key = jax.random.fold_in(self.base_key, t)
        old_classes = [c for k in range(t) for c in sc.task_classes(k)]
        synth_x, synth_y = self._synthetic(old_classes, 0, cfg.synthetic.per_class)
        n_real = len(self.train_y)
        labels = np.concatenate([self.train_y, synth_y])
        if self.host:
            from sdcil_jax.data.lazy import PoolSource

            pool = tr.TaskPool(None, labels, n_real, n_real + len(synth_x),
                               PoolSource(self.ds.train_source, self.exp.train_idx, synth_x, labels))
        else:
            pool = tr.TaskPool(np.concatenate([self.train_x, synth_x]), labels, n_real,
                               n_real + len(synth_x))
        if cfg.synthetic.replace_memory:
            self.memory = {c: pool.synth_lo + np.flatnonzero(synth_y == c) for c in range(start)}
        new_idx = np.flatnonzero((self.train_y >= start) & (self.train_y < end))
        seen_idx = np.flatnonzero((self.train_y >= 0) & (self.train_y < end))
        mem_idx = self._memory_indices(range(start))
        real_idx = method.real_indices(new_idx, mem_idx, seen_idx)

        resume, self.resume_point = self.resume_point, None
        if resume is None:
            self._grow_head(method, pool, start, end, task_key)
        use_synth = cfg.synthetic.use_in != "none" and len(synth_x) > 0
        pool_dev = None if self.host else (parallel.put_replicated(pool.images, self.mesh),
                                           parallel.put_replicated(pool.labels, self.mesh))
        # PODNet's order: train -> herding of the new classes -> balanced finetuning on the memory
        # -> herding again with the finetuned network (the memory kept) -> NME means -> old model.
        if resume is None or resume["phase"] == "train":
            self._train_stage(method, "train", real_idx, pool, pool_dev, task_key, t,
                              self.synth_bs if use_synth else 0, resume)
            self._update_memory(method, pool, start, end)
            resume = None
        if method.finetune_epochs() > 0:
            balanced = self._balanced_indices(pool, t, end)
            self._train_stage(method, "finetune", balanced, pool, pool_dev,
                              jax.random.fold_in(task_key, 1), t, 0, resume)
            self._update_memory(method, pool, start, end)
        result = self._evaluate(method, pool, t, start, end)
        result.update(task=t, num_classes=end, new_classes=sc.task_classes(t),
                      train_images=int(len(real_idx)), synthetic_images=int(len(synth_x)),
                      train_time_s=round(task_clock(), 2))
        self.per_task.append(result)
        self.logger.log({"event": "task", **result})
        reporting.print_task_line(result, sc.num_tasks)
        if method.needs_old_model:
            self.old_vars = parallel.put_replicated(
                {"params": self.params, "batch_stats": self.batch_stats}, self.mesh)
        done_state = train_lib.TrainState(step=np.zeros((), np.int32), params=self.params,
                                          batch_stats=self.batch_stats, opt_state=())
        self._save(t, "task_done", done_state)
        self._stop_if_requested(f"after task {t + 1}")

    def _method_for(self, t: int):
        start, end = self.sc.task_range(t)
        return get_method(self.cfg, TaskInfo(task=t, num_old=start, num_new=end - start))

    def _balanced_indices(self, pool, t: int, end: int) -> np.ndarray:
        """The class-balanced finetuning set: ``memory.per_class`` memory images of every class.

        Real memories already hold that many per class. Synthetic memories (``replace_memory``) are
        under-sampled to the same count (a seeded draw per task and class) so the set stays
        balanced; ``synthetic.in_finetuning`` adds the old classes' synthetic pool on top.
        """
        cfg = self.cfg
        parts = []
        for c in range(end):
            idx = self.memory.get(c, np.zeros((0,), np.int64))
            if len(idx) > cfg.memory.per_class:
                rng = np.random.default_rng([cfg.seed, t, c, 17])
                idx = np.sort(rng.choice(idx, size=cfg.memory.per_class, replace=False))
            parts.append(np.asarray(idx, np.int64))
        balanced = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
        if cfg.synthetic.in_finetuning and not cfg.synthetic.replace_memory:
            balanced = np.concatenate([balanced, np.arange(pool.synth_lo, pool.synth_hi)])
        return balanced

    def _memory_indices(self, classes) -> np.ndarray:
        parts = [self.memory[c] for c in classes if c in self.memory]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)

    def _grow_head(self, method, pool, start: int, end: int, task_key) -> None:
        head_key = jax.random.fold_in(task_key, 7)
        if self.params["head"] is None:
            self.params["head"] = method.init_head(head_key, self.feat_dim, end - start)
            return
        feats = None
        if method.imprint:
            eval_fn = self._eval_fn(method)
            feats = [self._pool_predict(eval_fn, pool, np.flatnonzero(self.train_y == c))[1]
                     for c in range(start, end)]
        self.params["head"] = method.grow_head(self.params["head"], head_key, end - start, feats)

    def _train_stage(self, method, stage: str, indices, pool, pool_dev, key, t: int,
                     synth_batch: int, resume: dict[str, Any] | None = None) -> None:
        cfg = self.cfg
        finetune = stage == "finetune"
        epochs = method.finetune_epochs() if finetune else cfg.train.epochs
        lr = cfg.method.finetune_lr if finetune else cfg.train.lr
        per_epoch = max(1, len(indices) // cfg.train.batch_size if self.host
                        else -(-len(indices) // cfg.train.batch_size))
        steps = epochs * per_epoch
        # Finetuning: constant lr (the official finetuning has no scheduler), same SGD otherwise.
        tx = train_lib.make_optimizer(lr, cfg.train.momentum, cfg.train.weight_decay, steps,
                                      "constant" if finetune else cfg.train.schedule, per_epoch)
        if self.host:
            make = train_lib.make_host_finetune_step if finetune else train_lib.make_host_train_step
        else:
            make = train_lib.make_finetune_step if finetune else train_lib.make_train_step
        init = train_lib.init_head_state if finetune else train_lib.init_state
        step_fn = jax.jit(make(self.backbone, method, tx, self._step_config(synth_batch),
                               self.mean, self.std, parallel.batch_sharded(self.mesh)),
                          donate_argnums=(0,))
        start, sums = (0, 0), None
        if resume is not None:
            host_state = resume["state"]
            start, sums = (resume["epoch"], resume["step"]), resume["sums"]
        else:
            host_state = init(self.params, self.batch_stats, tx)
        state = parallel.put_replicated(host_state, self.mesh)

        def log_epoch(epoch, means):
            self.logger.log({"event": stage, "task": t, "epoch": epoch, **means})

        def after_step(state, epoch, done, sums):
            self.global_step += 1
            stop = self.guard.requested is not None
            if stop or self.timer.due(self.global_step):
                self._save(t, stage, state, epoch, done, sums)
            if stop:
                self._stop_if_requested(f"in task {t + 1}, {stage} epoch {epoch + 1}, step {done}")

        if self.host:
            seed = int(np.random.default_rng([cfg.seed, t, int(finetune)]).integers(2**31))
            real_pipe = self._host_pipe(pool.source, indices, train=True,
                                        batch_size=cfg.train.batch_size, seed=seed)
            synth_pipe = None
            if synth_batch > 0:
                synth_pipe = self._host_pipe(pool.source, np.arange(pool.synth_lo, pool.synth_hi),
                                             train=True, batch_size=synth_batch, seed=seed + 1)
            state = tr.run_epochs_host(
                step_fn=step_fn, state=state, old_vars=self.old_vars, real_pipe=real_pipe,
                synth_pipe=synth_pipe, epochs=epochs, task=t,
                desc=f"task {t + 1}/{self.sc.num_tasks} {stage}", log_fn=log_epoch,
                progress=self.progress, start=start, start_sums=sums, after_step=after_step)
            host = tr.state_on_host(state)
            self.params, self.batch_stats = host.params, host.batch_stats
            return
        state = tr.run_epochs(
            step_fn=step_fn, state=state, old_vars=self.old_vars, pool_dev=pool_dev,
            real_indices=np.asarray(indices), epochs=epochs, batch_size=cfg.train.batch_size,
            synth_bounds=(pool.synth_lo, pool.synth_hi), task_key=key, mesh=self.mesh,
            seed=cfg.seed + (7919 if finetune else 0), task=t,
            desc=f"task {t + 1}/{self.sc.num_tasks} {stage}", log_fn=log_epoch,
            progress=self.progress, start=start, start_sums=sums, after_step=after_step)
        host = tr.state_on_host(state)
        self.params, self.batch_stats = host.params, host.batch_stats

    def _update_memory(self, method, pool, start: int, end: int) -> None:
        """Fixed memory per class: herding (or random) exemplars of the new classes."""
        cfg = self.cfg
        if not method.uses_memory or cfg.memory.per_class == 0:
            return
        eval_fn = self._eval_fn(method)
        for c in range(start, end):
            idx_c = np.flatnonzero(self.train_y == c)
            _, feats_c = self._pool_predict(eval_fn, pool, idx_c)
            pick = tr.select_memory(feats_c, cfg.memory.per_class, cfg.memory.selection,
                                    cfg.seed * 1000 + c)
            self.memory[c] = idx_c[pick]

    def _evaluate(self, method, pool, t: int, start: int, end: int) -> dict[str, Any]:
        eval_fn = self._eval_fn(method)
        memory_means = None
        mem_all = self._memory_indices(range(end))
        if method.uses_memory and len(mem_all):
            _, mem_feats = self._pool_predict(eval_fn, pool, mem_all)
            _, mem_flip = self._pool_predict(self._eval_fn(method, flip=True), pool, mem_all)
            memory_means = ev.class_means(mem_feats, pool.labels[mem_all], end, mem_flip)
        sel = (self.test_y >= 0) & (self.test_y < end)
        if self.host:
            logits, feats = self._host_predict(eval_fn, self.ds.test_source, np.flatnonzero(sel))
        else:
            logits, feats = self._predict(eval_fn, self.ds.test_images[sel])
        result = tr.evaluate_task(
            logits=logits, feats=feats, labels=self.test_y[sel], num_seen=end,
            task_bounds=[self.sc.task_range(k) for k in range(t + 1)], num_old=start,
            memory_means=memory_means)
        result["synthetic_accuracy"] = self._domain_gap(eval_fn, t, end)
        return result

    def _domain_gap(self, eval_fn, t: int, end: int) -> float | None:
        """CNN accuracy on held-out synthetic images of the seen classes (never trained on)."""
        n = self.cfg.synthetic.diagnostic_per_class
        if n == 0 or self.store is None:
            return None
        classes = [c for k in range(t + 1) for c in self.sc.task_classes(k)]
        x, y = self._synthetic(classes, self.cfg.synthetic.per_class, n)
        logits, _ = self._array_predict(eval_fn, x, y)
        return ev.accuracy(np.argmax(logits[:, :end], axis=1), y)

    # ------------------------------------------------------------------------ checkpoint / resume
    def _stop_if_requested(self, where: str) -> None:
        signum = self.guard.requested
        if signum is None:
            return
        import signal

        raise Preempted(f"Stopped by {signal.Signals(signum).name} {where}; a checkpoint was saved, "
                        "rerun the same command to resume.", signum)

    def _save(self, t: int, phase: str, state, epoch: int = 0, step: int = 0, sums=None) -> None:
        if self.ckpt is None:
            return
        self.save_id += 1
        progress = {
            "save": self.save_id, "task": t, "phase": phase, "epoch": epoch, "step": step,
            "sums": {k: float(v) for k, v in (sums or {}).items()},
            "metrics_lines": self.logger.count(), "global_step": self.global_step,
            "wall_time_s": self.wall_before + self._clock(),
        }
        self.ckpt.save(self.save_id, state=state, memory=self.memory, progress=progress,
                       metrics={"per_task": self.per_task}, old=self.old_vars)
        self.timer.reset(self.global_step)

    def _state_template(self, progress: dict[str, Any]):
        """Shapes of the TrainState saved at ``progress`` (built without running anything)."""
        t = progress["task"]
        start, end = self.sc.task_range(t)
        method = get_method(self.cfg, TaskInfo(task=t, num_old=start, num_new=end - start))
        head = jax.eval_shape(lambda: method.init_head(jax.random.PRNGKey(0), self.feat_dim, end))
        params = {"backbone": self.params["backbone"], "head": head}
        if progress["phase"] == "task_done":
            return jax.eval_shape(lambda: train_lib.TrainState(
                step=jnp.zeros((), jnp.int32), params=params, batch_stats=self.batch_stats,
                opt_state=()))
        finetune = progress["phase"] == "finetune"
        tx = train_lib.make_optimizer(1.0, self.cfg.train.momentum, 0.0, 1,
                                      "constant" if finetune else self.cfg.train.schedule)
        init = train_lib.init_head_state if finetune else train_lib.init_state
        return jax.eval_shape(lambda: init(params, self.batch_stats, tx))

    def resume(self) -> int:
        """Restore the newest good checkpoint; returns the first task still to run."""
        if self.ckpt is None:
            return 0
        restored = self.ckpt.restore_latest(self._state_template)
        if restored is None:
            self.logger.start_fresh()
            return 0
        p = restored.progress
        self.save_id, self.global_step = p["save"], p["global_step"]
        self.wall_before = p["wall_time_s"] - self._clock()
        self.memory = {int(c): np.asarray(v) for c, v in restored.memory.items()}
        self.per_task = list(restored.metrics["per_task"])
        self.old_vars = (parallel.put_replicated(restored.old, self.mesh)
                         if restored.old is not None else None)
        self.params = restored.state.params
        self.batch_stats = restored.state.batch_stats
        self.logger.truncate(p["metrics_lines"])
        self.timer.reset(self.global_step)
        print(f"resuming from checkpoint {self.save_id}: task {p['task'] + 1}, {p['phase']}"
              + ("" if p["phase"] == "task_done" else f", epoch {p['epoch'] + 1}, step {p['step']}"),
              flush=True)
        if p["phase"] == "task_done":
            return p["task"] + 1
        self.resume_point = {"phase": p["phase"], "epoch": p["epoch"], "step": p["step"],
                             "sums": p["sums"], "state": restored.state}
        return p["task"]
