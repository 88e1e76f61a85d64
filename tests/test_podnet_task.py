"""PODNet's task around the step, as the official code: stage order, balanced finetuning, NME means.

Official order (``inclearn/models/podnet.py``): train -> herding of the new classes (for the balanced
set) -> balanced finetuning (train-mode BN, proxies only, constant lr) -> herding again and NME means
with the finetuned network -> copy of the old model.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from sdcil_jax import evaluate as ev
from sdcil_jax import train as train_lib
from sdcil_jax.checkpoint import SaveTimer
from sdcil_jax.config import load_config_file
from sdcil_jax.data import herding_select
from sdcil_jax.data import memory as memory_lib
from sdcil_jax.reporting import MetricsLogger
from sdcil_jax.run_state import Saver
from sdcil_jax.runner import prepare_experiment
from sdcil_jax.task import TaskRunner

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.py")


def _config(tmp_path, **overrides):
    c = load_config_file(QUICKSTART)
    c.dataset.data_dir = str(tmp_path / "tfds")
    c.train.epochs = 1
    c.method.finetune_epochs = 2
    c.scenario.max_tasks = 2
    c.synthetic.use_in = "none"
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def _runner(tmp_path, **overrides):
    exp = prepare_experiment(_config(tmp_path, **overrides), str(tmp_path / "work"))
    saver = Saver(None, MetricsLogger(exp.workdir), None, SaveTimer(0))
    return TaskRunner(exp, saver, progress=False)


@pytest.mark.slow
def test_task_order_finetuning_and_memory_from_the_finetuned_network(tmp_path, monkeypatch):
    runner = _runner(tmp_path)
    events, snapshots, schedules = [], {}, []
    stage, update_memory, evaluate = runner._stage, runner._update_memory, runner._evaluate

    def spy_stage(state, method, name, *args, **kwargs):
        after = stage(state, method, name, *args, **kwargs)
        events.append(name)
        snapshots[name] = jax.device_get(((state.params, state.batch_stats),
                                          (after.params, after.batch_stats)))
        return after

    def spy_memory(*args):
        events.append("herding")
        return update_memory(*args)

    def spy_eval(*args):
        events.append("evaluate")
        return evaluate(*args)

    real_schedule = train_lib.lr_schedule

    def spy_schedule(lr, schedule, steps, spe=1):
        schedules.append((lr, schedule))
        return real_schedule(lr, schedule, steps, spe)

    means_calls = []
    real_means = ev.class_means

    def spy_means(feats, labels, n, flipped_features=None):
        means_calls.append((np.asarray(feats), flipped_features))
        return real_means(feats, labels, n, flipped_features)

    monkeypatch.setattr(runner, "_stage", spy_stage)
    monkeypatch.setattr(runner, "_update_memory", spy_memory)
    monkeypatch.setattr(runner, "_evaluate", spy_eval)
    monkeypatch.setattr(train_lib, "lr_schedule", spy_schedule)
    monkeypatch.setattr(ev, "class_means", spy_means)
    state = runner.initial_state()
    for t in range(2):
        state = runner.run_task(state, t)

    assert events == ["train", "herding", "evaluate",  # task 0: no finetuning
                      "train", "herding", "finetune", "herding", "evaluate"]
    cfg = runner.exp.config
    assert (cfg.method.finetune_lr, "constant") in schedules
    assert (cfg.train.lr, "cosine_epoch") in schedules
    # Balanced finetuning: the learned scale and the backbone weights stay, BN statistics and the
    # proxies (old and new) move.
    (p0, s0), (p1, s1) = snapshots["finetune"]
    assert float(p1["head"]["scale"]) == float(p0["head"]["scale"])
    for a, b in zip(jax.tree.leaves(p1["backbone"]), jax.tree.leaves(p0["backbone"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0),
                                                      strict=True))
    moved = np.abs(p1["head"]["proxies"] - p0["head"]["proxies"]).max(1)
    k = cfg.method.proxies_per_class
    assert moved[: 2 * k].max() > 0 and moved[2 * k:4 * k].max() > 0  # old and new proxies
    assert moved[4 * k:].max() == 0  # classes not seen yet: dead rows, frozen
    # The memory kept is the herding of the new classes with the finetuned network.
    eval_fn = runner._eval_fn()
    pool = runner._pool()
    for c in (2, 3):
        idx_c = np.flatnonzero(runner.train_y == c)
        _, feats = runner._predict(eval_fn, state, pool, idx_c)
        np.testing.assert_array_equal(state.memory[c],
                                      idx_c[herding_select(feats, cfg.memory.per_class)])
    # NME means include the flipped exemplars' features (not the plain ones twice).
    feats, flipped = means_calls[-1]
    assert flipped is not None and not np.allclose(np.asarray(flipped), feats)


def test_balanced_set_undersamples_a_large_synthetic_memory():
    """replace_memory with 500 synthetic images per old class: every class contributes
    memory.per_class images to the balanced finetuning set."""
    rng = np.random.default_rng(0)
    memory = {c: 10_000 + 500 * c + np.arange(500) for c in range(4)}  # synthetic memories
    memory.update({c: rng.choice(1000, size=20, replace=False) for c in (4, 5)})  # herded, real
    balanced = memory_lib.balanced_indices(memory, 6, 20, seed=0, task=2)
    owner = {int(i): c for c, idx in memory.items() for i in idx}
    counts = np.bincount([owner[int(i)] for i in balanced], minlength=6)
    assert counts.tolist() == [20] * 6
    np.testing.assert_array_equal(balanced, memory_lib.balanced_indices(memory, 6, 20, 0, 2))
    assert not np.array_equal(balanced, memory_lib.balanced_indices(memory, 6, 20, 0, 3))
