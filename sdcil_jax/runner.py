"""``run(config, workdir, mode)``: the whole experiment, shared by the CLI and notebooks.

config -> dataset + scenario -> replay store (generation) -> for each task: train, evaluate,
update memory -> results.json, metrics.jsonl, plots, printed table.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from sdcil_jax import config as config_lib
from sdcil_jax import distributed, fileio, reporting
from sdcil_jax import plan as plan_lib
from sdcil_jax.checkpoint import SaveTimer
from sdcil_jax.data import (
    Dataset,
    apply_class_name_overrides,
    build_scenario,
    holdout_split,
    load_dataset,
    resolve_pipeline,
)
from sdcil_jax.errors import ConfigError, DataError, UserError
from sdcil_jax.fingerprint import config_fields
from sdcil_jax.methods import method_class
from sdcil_jax.preemption import PreemptionGuard

MODES = ("prepare", "generate", "train", "all")


@dataclasses.dataclass
class Experiment:
    """Everything derived from the config before training starts."""

    config: Any
    workdir: str
    dataset: Dataset
    scenario: Any
    train_idx: np.ndarray  # real training images usable for training (holdout removed)
    holdout_idx: np.ndarray
    store_dir: str
    store: Any = None  # the opened replay store, once generated (None without synthetic data)

    @property
    def uses_synthetic(self) -> bool:
        c = self.config.synthetic
        return c.use_in != "none" or c.replace_memory or c.diagnostic_per_class > 0

    def generated_classes(self) -> list[int]:
        """Dataset ids of every class whose synthetic images are used.

        Every class that is 'old' in some task (all but the last task's), plus the last task's
        classes when the domain-gap diagnostic is on (it evaluates on every seen class).
        """
        last = self.scenario.num_tasks if self.config.synthetic.diagnostic_per_class else (
            self.scenario.num_tasks - 1)
        return [c for t in range(last) for c in self.scenario.task_classes(t)]


def check_workdir(workdir: str) -> None:
    try:
        fileio.path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create workdir {workdir} ({exc.strerror or exc}); choose a "
                        "writable --workdir.") from None
    if fileio.is_local(workdir) and not os.access(workdir, os.W_OK):
        raise UserError(f"Workdir {workdir} is not writable; choose a writable --workdir.")


def prepare_experiment(config, workdir: str) -> Experiment:
    config_lib.validate(config)
    cls = method_class(config.method.name)
    if config.synthetic.use_in in ("distillation", "both") and not cls.has_distillation:
        raise ConfigError(
            f"method.name={config.method.name} has no distillation loss, so synthetic.use_in="
            f"{config.synthetic.use_in} cannot apply; use 'classification' or a distillation method."
        )
    n_dev = jax.device_count()
    for key in ("train.batch_size", "synthetic.batch_size", "train.eval_batch_size"):
        section, name = key.split(".")
        if config[section][name] % n_dev:
            value = config[section][name]
            raise ConfigError(f"{key}={value} must be a multiple of the {n_dev} devices; use a "
                              f"multiple of {n_dev}, e.g. {max(n_dev, value // n_dev * n_dev)}.")
    check_workdir(workdir)
    dataset = load_dataset(config.dataset.name, config.dataset.data_dir,
                           pipeline=resolve_pipeline(config.dataset),
                           image_size=config.dataset.image_size,
                           test_resize=config.dataset.test_resize)
    if config.dataset.class_names:
        dataset.class_names = apply_class_name_overrides(dataset.class_names,
                                                         list(config.dataset.class_names))
    scenario = build_scenario(config, dataset.num_classes)
    if config.dataset.holdout_per_class > 0:
        train_idx, holdout_idx = holdout_split(dataset.train.labels,
                                               config.dataset.holdout_per_class, config.seed)
    else:
        train_idx = np.arange(len(dataset.train.labels))
        holdout_idx = np.zeros((0,), np.int64)
    store_dir = config.generation.store_dir or os.fspath(fileio.path(workdir) / "replay_store")
    exp = Experiment(config, workdir, dataset, scenario, np.asarray(train_idx),
                     np.asarray(holdout_idx), store_dir)
    check_class_sizes(exp)
    return exp


def check_class_sizes(exp: Experiment) -> None:
    """Refuse, before any training, a class with too few training images for the method.

    Every class of the scenario needs at least one image; a class imprinted by k-means (PODNet,
    every task after the first) needs ``method.proxies_per_class``; a method with an exemplar memory
    needs ``memory.per_class`` (unless the memory is synthetic).
    """
    cfg, sc = exp.config, exp.scenario
    method = method_class(cfg.method.name)
    counts = np.bincount(sc.relabel(exp.dataset.train.labels[exp.train_idx]).clip(-1) + 1,
                         minlength=sc.num_classes + 1)[1:]
    first_task = set(sc.task_classes(0))
    for inc, n in enumerate(counts[:sc.num_classes]):
        dataset_id = int(sc.class_order[inc])
        needs = [(1, "one image to train on", "use a dataset split that has it")]
        if method.imprint and dataset_id not in first_task:
            needs.append((cfg.method.proxies_per_class, "method.proxies_per_class="
                          f"{cfg.method.proxies_per_class} for k-means imprinting",
                          "lower method.proxies_per_class"))
        if method.uses_memory and not cfg.synthetic.replace_memory:
            needs.append((cfg.memory.per_class, f"memory.per_class={cfg.memory.per_class} "
                          "exemplars", "lower memory.per_class"))
        for need, what, fix in needs:
            if n < need:
                name = exp.dataset.class_names[dataset_id]
                held = (f" after holding out dataset.holdout_per_class="
                        f"{cfg.dataset.holdout_per_class}" if cfg.dataset.holdout_per_class else "")
                raise DataError(
                    f"Class {dataset_id} ({name!r}) has {int(n)} training images{held}, fewer than "
                    f"the {need} needed ({what}); {fix}, lower dataset.holdout_per_class, or leave "
                    "the class out of scenario.class_order.")


def generate(exp: Experiment, progress: bool = True, guard: PreemptionGuard | None = None):
    """Fill the replay store for every class that becomes old (resumable; every process generates
    its share). With ``guard``, a signal stops every process at the next agreed point."""
    from sdcil_jax.generation import generate_replay_pool

    ds = exp.dataset
    holdout_labels = ds.train.labels[exp.holdout_idx]

    def real_images_fn(class_id: int) -> np.ndarray:
        return ds.read_train_images(exp.holdout_idx[holdout_labels == class_id])

    deferred = guard.deferred if guard is not None else False
    if guard is not None:
        guard.deferred = True  # acted on at the generation loop's agreed points
    try:
        return generate_replay_pool(
            exp.config.generation, seed=exp.config.seed, class_ids=exp.generated_classes(),
            class_names=ds.class_names, image_shape=ds.image_shape, store_dir=exp.store_dir,
            real_images_fn=real_images_fn, progress=progress,
            fingerprint_extra=_holdout_fields(exp), guard=guard,
        )
    finally:
        if guard is not None:
            guard.deferred = deferred


def _holdout_fields(exp: Experiment) -> dict[str, Any] | None:
    if exp.config.generation.backend != "real_holdout":
        return None
    return {"dataset": exp.dataset.name, "holdout_per_class": exp.config.dataset.holdout_per_class,
            "holdout_seed": exp.config.seed}


def open_complete_store(exp: Experiment):
    """Open the store for ``--mode train``; every needed class must be complete."""
    from sdcil_jax.errors import GenerationError
    from sdcil_jax.fingerprint import canonical, fingerprint_of
    from sdcil_jax.generation import ReplayStore, fingerprint_fields

    if not (fileio.path(exp.store_dir) / "manifest.json").exists():
        raise GenerationError(f"No replay store in {exp.store_dir}; run with --mode generate (or "
                              "--mode all) first, or set generation.store_dir.")
    store = ReplayStore(exp.store_dir).open()
    fields = fingerprint_fields(
        exp.config.generation, seed=exp.config.seed, class_names=exp.dataset.class_names,
        image_shape=exp.dataset.image_shape, extra=_holdout_fields(exp))
    if store.fingerprint != fingerprint_of(fields):
        old, new = store.fields, canonical(fields)
        differing = [f"generation.{k}" if k in exp.config.generation else k
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise GenerationError(f"Replay store {exp.store_dir} was generated with different settings "
                              f"than this config (differing: {', '.join(differing) or 'fingerprint'})"
                              "; set generation.store_dir to another folder and rerun --mode "
                              "generate, or restore the generation settings.")
    missing = [c for c in exp.generated_classes()
               if not store.is_complete(c, exp.config.generation.per_class)]
    if missing:
        raise GenerationError(f"Replay store {exp.store_dir} is incomplete ({len(missing)} classes "
                              "missing or corrupt); rerun with --mode generate to finish it.")
    return store


def run(config, workdir: str, mode: str = "all", progress: bool = True,
        restart: bool = False) -> dict[str, Any]:
    """Run generation and/or training; returns the results dict also written to results.json.

    A rerun in the same ``workdir`` resumes from the newest good checkpoint; a rerun with a config
    that changes results is refused unless ``restart`` (then the old checkpoints and results are
    moved aside, never deleted).
    """
    if mode not in MODES:
        raise UserError(f"Unknown --mode {mode!r}; use one of {', '.join(MODES)}.")
    if mode == "prepare":
        from sdcil_jax.data.prepare import prepare

        config_lib.validate(config)
        lines = prepare(config)
        for line in lines:
            print(line, flush=True)
        return {"mode": "prepare", "prepared": lines}
    exp = prepare_experiment(config, workdir)
    checkpointer = None
    if mode in ("train", "all"):
        checkpointer = open_checkpointer(exp, restart)
    with PreemptionGuard() as guard:
        store = None
        if exp.uses_synthetic and mode in ("generate", "all"):
            store = generate(exp, progress, guard)
        if mode == "generate":
            return {"mode": "generate", "store_dir": exp.store_dir,
                    "classes": exp.generated_classes()}
        if exp.uses_synthetic and store is None:
            store = open_complete_store(exp)
        exp.store = store
        try:
            return train(exp, checkpointer, guard, progress)
        finally:
            checkpointer.close()


def train(exp: Experiment, checkpointer, guard: PreemptionGuard, progress: bool = True
          ) -> dict[str, Any]:
    """Every task of the scenario, resumed from the newest checkpoint; returns the results."""
    from sdcil_jax.run_state import Saver
    from sdcil_jax.task import TaskRunner

    cfg = exp.config
    from sdcil_jax.tensorboard import Board

    saver = Saver(checkpointer, reporting.MetricsLogger(exp.workdir), guard,
                  SaveTimer(cfg.checkpoint.every_minutes, cfg.checkpoint.every_steps),
                  Board(exp.workdir, enabled=distributed.is_main()),
                  sync_every=cfg.checkpoint.sync_every_steps)
    runner = TaskRunner(exp, saver, progress and distributed.is_main())
    restored = saver.restore(runner.state_template, runner.mesh)
    first, resume = 0, None
    if restored is None:
        state = runner.initial_state()
    else:
        state, position, train_state = restored
        first = position.task + 1 if position.phase == "task_done" else position.task
        resume = None if position.phase == "task_done" else (position, train_state)
    runner.plan = plan_lib.training_plan(exp)
    if distributed.is_main() and first < exp.scenario.num_tasks:
        print(plan_lib.plan_line(runner.plan, first), flush=True)
    guard.deferred = True  # from now on a signal is handled after the current step
    try:
        for t in range(first, exp.scenario.num_tasks):
            state = runner.run_task(state, t, resume)
            resume = None
    finally:
        guard.deferred = False
        saver.board.close()
    results = reporting.summarise(exp, state.results, wall_time_s=saver.wall_time(),
                                  norm=(runner.mean.tolist(), runner.std.tolist()))
    if distributed.is_main():
        reporting.write_results(exp.workdir, results)
        reporting.print_table(results)
    return results


def open_checkpointer(exp: Experiment, restart: bool):
    """The run's checkpoints, refused if they were made with a config that changes results."""
    from sdcil_jax.checkpoint import Checkpointer

    extra = {"scenario.resolved_class_order": [int(c) for c in exp.scenario.class_order],
             "scenario.num_tasks_resolved": exp.scenario.num_tasks,
             "dataset.image_shape": list(exp.dataset.image_shape)}
    # The device and process counts change only the float rounding of the global reductions.
    soft = {"runtime.device_count": jax.device_count(),
            "runtime.process_count": jax.process_count()}
    ckpt = Checkpointer(os.path.join(exp.workdir, "checkpoints"), keep=exp.config.checkpoint.keep,
                        fingerprint_fields=config_fields(exp.config, extra=extra),
                        soft_fields=soft)
    if restart:
        moved = ckpt.restart()
        if moved and distributed.is_main():
            for name in ("results.json", "metrics.jsonl", "accuracy_per_task.png",
                         "accuracy_matrix.png", "tensorboard"):
                path = fileio.path(exp.workdir) / name
                if path.exists():
                    path.rename(fileio.path(moved) / name)
            print(f"--restart: previous checkpoints and results moved to {moved}", flush=True)
        distributed.barrier("sdcil-restart")
    else:
        ckpt.check_compatible()
    return ckpt
