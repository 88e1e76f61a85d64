"""``run(config, workdir, mode)``: the whole experiment, shared by the CLI and notebooks.

config -> dataset + scenario -> replay store (generation) -> for each task: train, evaluate,
update memory -> results.json, metrics.jsonl, plots, printed table.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdcil_jax import config as config_lib
from sdcil_jax import parallel, reporting
from sdcil_jax import train as train_lib
from sdcil_jax import trainer as tr
from sdcil_jax.data import Dataset, build_scenario, holdout_split, load_dataset
from sdcil_jax.errors import ConfigError, UserError
from sdcil_jax.methods import TaskInfo, get_method, method_class
from sdcil_jax.models import build_backbone

MODES = ("generate", "train", "all")


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

    @property
    def uses_synthetic(self) -> bool:
        c = self.config.synthetic
        return c.use_in != "none" or c.replace_memory

    def generated_classes(self) -> list[int]:
        """Dataset ids of every class that is 'old' in some task (all but the last task's)."""
        return [c for t in range(self.scenario.num_tasks - 1) for c in self.scenario.task_classes(t)]


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create workdir {workdir} ({exc.strerror}); choose a writable "
                        "--workdir.") from None
    if not os.access(workdir, os.W_OK):
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
            raise ConfigError(f"{key}={config[section][name]} must be a multiple of the {n_dev} "
                              "devices; change it.")
    check_workdir(workdir)
    dataset = load_dataset(config.dataset.name, config.dataset.data_dir)
    scenario = build_scenario(config, dataset.num_classes)
    if config.dataset.holdout_per_class > 0:
        train_idx, holdout_idx = holdout_split(dataset.train_labels, config.dataset.holdout_per_class,
                                               config.seed)
    else:
        train_idx = np.arange(len(dataset.train_labels))
        holdout_idx = np.zeros((0,), np.int64)
    store_dir = config.generation.store_dir or os.path.join(workdir, "replay_store")
    return Experiment(config, workdir, dataset, scenario, np.asarray(train_idx),
                      np.asarray(holdout_idx), store_dir)


def generate(exp: Experiment, progress: bool = True):
    """Fill the replay store for every class that becomes old (resumable)."""
    from sdcil_jax.generation import generate_replay_pool

    ds = exp.dataset
    holdout_labels = ds.train_labels[exp.holdout_idx]

    def real_images_fn(class_id: int) -> np.ndarray:
        return ds.train_images[exp.holdout_idx[holdout_labels == class_id]]

    return generate_replay_pool(
        exp.config.generation, seed=exp.config.seed, class_ids=exp.generated_classes(),
        class_names=ds.class_names, image_shape=ds.image_shape, store_dir=exp.store_dir,
        real_images_fn=real_images_fn, progress=progress,
        dataset_name=ds.name,
    )


def run(config, workdir: str, mode: str = "all", progress: bool = True) -> dict[str, Any]:
    """Run generation and/or training; returns the results dict also written to results.json."""
    if mode not in MODES:
        raise UserError(f"Unknown --mode {mode!r}; use one of {', '.join(MODES)}.")
    exp = prepare_experiment(config, workdir)
    store = None
    if exp.uses_synthetic and mode in ("generate", "all"):
        store = generate(exp, progress)
    if mode == "generate":
        return {"mode": "generate", "store_dir": exp.store_dir,
                "classes": exp.generated_classes()}
    if exp.uses_synthetic and store is None:
        from sdcil_jax.generation import open_complete_store

        store = open_complete_store(exp.store_dir, exp.generated_classes(),
                                    exp.config.generation.per_class)
    return train_all(exp, store, progress)


def _synthetic_for(exp: Experiment, store, old_classes: list[int], count: int):
    if store is None or not old_classes or count == 0:
        shape = (0,) + tuple(exp.dataset.image_shape)
        return np.zeros(shape, np.uint8), np.zeros((0,), np.int32)
    images, labels = [], []
    for c in old_classes:
        x = store.load(c, count)
        images.append(x)
        labels.append(np.full((len(x),), exp.scenario.relabel(np.asarray([c]))[0], np.int32))
    return np.concatenate(images), np.concatenate(labels)


def train_all(exp: Experiment, store, progress: bool = True) -> dict[str, Any]:
    cfg = exp.config
    ds, sc = exp.dataset, exp.scenario
    mesh = parallel.make_mesh()
    clock = tr.timer()
    logger = reporting.MetricsLogger(exp.workdir)
    train_x = ds.train_images[exp.train_idx]
    train_y = sc.relabel(ds.train_labels[exp.train_idx]).astype(np.int32)
    test_y_all = sc.relabel(ds.test_labels).astype(np.int32)
    mean = jnp.asarray(train_x.reshape(-1, train_x.shape[-1]).mean(0) / 255.0, jnp.float32)
    std = jnp.asarray(train_x.reshape(-1, train_x.shape[-1]).std(0) / 255.0 + 1e-6, jnp.float32)

    backbone = build_backbone(cfg.model)
    base_key = jax.random.PRNGKey(cfg.seed)
    dummy = jnp.zeros((1,) + tuple(ds.image_shape), jnp.float32)
    variables = backbone.init(jax.random.fold_in(base_key, 1_000_003), dummy, train=False)
    params = {"backbone": variables["params"], "head": None}
    batch_stats = variables["batch_stats"]
    memory: dict[int, np.ndarray] = {}  # incremental class -> pool indices of its exemplars
    old_vars = None
    per_task: list[dict[str, Any]] = []
    acc_matrix: list[list[float]] = []
    nme_matrix: list[list[float]] = []
    synth_bs = cfg.synthetic.batch_size or cfg.train.batch_size

    for t in range(sc.num_tasks):
        task_clock = tr.timer()
        start, end = sc.task_range(t)
        info = TaskInfo(task=t, num_old=start, num_new=end - start)
        method = get_method(cfg, info)
        task_key = jax.random.fold_in(base_key, t)
        old_classes = [c for k in range(t) for c in sc.task_classes(k)]
        synth_x, synth_y = _synthetic_for(exp, store, old_classes, cfg.synthetic.per_class)
        pool = tr.TaskPool(np.concatenate([train_x, synth_x]), np.concatenate([train_y, synth_y]),
                           len(train_x), len(train_x) + len(synth_x))
        new_idx = np.flatnonzero((train_y >= start) & (train_y < end))
        seen_idx = np.flatnonzero((train_y >= 0) & (train_y < end))
        if cfg.synthetic.replace_memory:
            memory = {int(c): pool.synth_lo + np.flatnonzero(synth_y == c) for c in range(start)}
        mem_idx = (np.concatenate([memory[c] for c in sorted(memory)]) if memory
                   else np.zeros((0,), np.int64))
        real_idx = method.real_indices(new_idx, mem_idx, seen_idx)

        head_key = jax.random.fold_in(task_key, 7)
        if params["head"] is None:
            params["head"] = method.init_head(head_key, sc_feat_dim(backbone, variables, dummy),
                                              end - start)
        else:
            params["head"] = method.grow_head(params["head"], head_key, end - start)

        use_synth = cfg.synthetic.use_in != "none" and len(synth_x) > 0
        step_cfg = train_lib.StepConfig(
            real_batch=cfg.train.batch_size, synth_batch=synth_bs if use_synth else 0,
            synth_in_cls=cfg.synthetic.use_in in ("classification", "both"),
            synth_in_dist=cfg.synthetic.use_in in ("distillation", "both"),
            crop_padding=cfg.train.crop_padding, flip=cfg.train.flip,
            brightness=cfg.train.brightness)
        steps_per_epoch = max(1, -(-len(real_idx) // cfg.train.batch_size))
        tx = train_lib.make_optimizer(cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay,
                                      cfg.train.epochs * steps_per_epoch)
        state = parallel.put_replicated(train_lib.init_state(params, batch_stats, tx), mesh)
        step_fn = jax.jit(train_lib.make_train_step(backbone, method, tx, step_cfg, mean, std,
                                                    parallel.batch_sharded(mesh)),
                          donate_argnums=(0,))
        pool_dev = (parallel.put_replicated(pool.images, mesh),
                    parallel.put_replicated(pool.labels, mesh))

        def log_epoch(epoch, means, t=t):
            logger.log({"event": "epoch", "task": t, "epoch": epoch, **means})

        state = tr.run_epochs(
            step_fn=step_fn, state=state, old_vars=old_vars, pool_dev=pool_dev,
            real_indices=real_idx, epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
            synth_bounds=(pool.synth_lo, pool.synth_hi), task_key=task_key, mesh=mesh,
            seed=cfg.seed, task=t, desc=f"task {t + 1}/{sc.num_tasks}", log_fn=log_epoch,
            progress=progress)
        host_state = tr.state_on_host(state)
        params, batch_stats = host_state.params, host_state.batch_stats
        eval_fn = jax.jit(train_lib.make_eval_fn(backbone, method.head_apply, mean, std))
        predict = lambda images: tr.predict(eval_fn, params, batch_stats, images,  # noqa: E731
                                            cfg.train.eval_batch_size, mesh)

        # Memory update (fixed memory per class) for the new classes.
        if method.uses_memory and not cfg.synthetic.replace_memory and cfg.memory.per_class > 0:
            for c in range(start, end):
                idx_c = np.flatnonzero(train_y == c)
                _, feats_c = predict(train_x[idx_c])
                pick = tr.select_memory(feats_c, cfg.memory.per_class, cfg.memory.selection,
                                        cfg.seed * 1000 + c)
                memory[c] = idx_c[pick]
        memory_means = None
        if method.uses_memory and memory:
            mem_all = np.concatenate([memory[c] for c in sorted(memory)])
            _, mem_feats = predict(pool.images[mem_all])
            from sdcil_jax.evaluate import class_means

            memory_means = class_means(mem_feats, pool.labels[mem_all], end)

        test_sel = (test_y_all >= 0) & (test_y_all < end)
        logits, feats = predict(ds.test_images[test_sel])
        bounds = [sc.task_range(k) for k in range(t + 1)]
        result = tr.evaluate_task(logits=logits, feats=feats, labels=test_y_all[test_sel],
                                  num_seen=end, task_bounds=bounds, num_old=start,
                                  memory_means=memory_means)
        result.update(task=t, num_classes=end, new_classes=sc.task_classes(t),
                      train_images=int(len(real_idx)), synthetic_images=int(len(synth_x)),
                      train_time_s=round(task_clock(), 2))
        per_task.append(result)
        acc_matrix.append(result["task_accuracies"])
        if result["nme_task_accuracies"] is not None:
            nme_matrix.append(result["nme_task_accuracies"])
        logger.log({"event": "task", **result})
        reporting.print_task_line(result, sc.num_tasks)
        if method.needs_old_model:
            old_vars = parallel.put_replicated({"params": params, "batch_stats": batch_stats}, mesh)

    results = reporting.summarise(exp, per_task, acc_matrix, nme_matrix, wall_time_s=clock(),
                                  norm=(np.asarray(mean).tolist(), np.asarray(std).tolist()))
    reporting.write_results(exp.workdir, results)
    reporting.print_table(results)
    return results


def sc_feat_dim(backbone, variables, dummy) -> int:
    out = backbone.apply(variables, dummy, train=False)
    return int(out["features"].shape[-1])
