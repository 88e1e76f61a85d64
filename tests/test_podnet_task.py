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
from sdcil_jax.config import load_config_file
from sdcil_jax.data import herding_select
from sdcil_jax.runner import prepare_experiment
from sdcil_jax.task_loop import TaskLoop

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


def _loop(tmp_path, **overrides):
    exp = prepare_experiment(_config(tmp_path, **overrides), str(tmp_path / "work"))
    return TaskLoop(exp, store=None, progress=False)


@pytest.mark.slow
def test_task_order_finetuning_and_memory_from_the_finetuned_network(tmp_path, monkeypatch):
    loop = _loop(tmp_path)
    events, snapshots, schedules = [], {}, []
    train_stage, update_memory, evaluate = loop._train_stage, loop._update_memory, loop._evaluate

    def spy_stage(method, stage, *args, **kwargs):
        before = jax.device_get({"params": loop.params, "stats": loop.batch_stats})
        train_stage(method, stage, *args, **kwargs)
        events.append(stage)
        snapshots[stage] = (before, jax.device_get({"params": loop.params,
                                                   "stats": loop.batch_stats}))

    def spy_memory(*args):
        update_memory(*args)
        events.append("herding")

    def spy_eval(*args):
        events.append("evaluate")
        return evaluate(*args)

    real_make = train_lib.make_optimizer

    def spy_make(lr, momentum, wd, steps, schedule="cosine_step", spe=1):
        schedules.append((lr, schedule))
        return real_make(lr, momentum, wd, steps, schedule, spe)

    means_calls = []
    real_means = ev.class_means

    def spy_means(feats, labels, n, flipped_features=None):
        means_calls.append((np.asarray(feats), flipped_features))
        return real_means(feats, labels, n, flipped_features)

    monkeypatch.setattr(loop, "_train_stage", spy_stage)
    monkeypatch.setattr(loop, "_update_memory", spy_memory)
    monkeypatch.setattr(loop, "_evaluate", spy_eval)
    monkeypatch.setattr(train_lib, "make_optimizer", spy_make)
    monkeypatch.setattr(ev, "class_means", spy_means)
    loop.run()

    assert events == ["train", "herding", "evaluate",  # task 0: no finetuning
                      "train", "herding", "finetune", "herding", "evaluate"]
    cfg = loop.cfg
    assert (cfg.method.finetune_lr, "constant") in schedules
    assert (cfg.train.lr, "cosine_epoch") in schedules
    # Balanced finetuning: the learned scale and the backbone weights stay, BN statistics and the
    # proxies (old and new) move.
    before, after = snapshots["finetune"]
    assert float(after["params"]["head"]["scale"]) == float(before["params"]["head"]["scale"])
    for a, b in zip(jax.tree.leaves(after["params"]["backbone"]),
                    jax.tree.leaves(before["params"]["backbone"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(after["stats"]),
                                                      jax.tree.leaves(before["stats"]), strict=True))
    moved = np.abs(after["params"]["head"]["proxies"] - before["params"]["head"]["proxies"]).max(1)
    k = cfg.method.proxies_per_class
    assert moved[: 2 * k].max() > 0 and moved[2 * k:].max() > 0  # old and new proxies
    # The memory kept is the herding of the new classes with the finetuned network.
    method = loop._method_for(1)
    eval_fn = loop._eval_fn(method)
    for c in (2, 3):
        idx_c = np.flatnonzero(loop.train_y == c)
        _, feats = loop._predict(eval_fn, loop.train_x[idx_c])
        np.testing.assert_array_equal(loop.memory[c], idx_c[herding_select(feats,
                                                                          cfg.memory.per_class)])
    # NME means include the flipped exemplars' features (not the plain ones twice).
    feats, flipped = means_calls[-1]
    assert flipped is not None and not np.allclose(np.asarray(flipped), feats)


def test_balanced_set_undersamples_a_large_synthetic_memory(tmp_path):
    """replace_memory with 500 synthetic images per old class: every class contributes
    memory.per_class images to the balanced finetuning set."""
    loop = _loop(tmp_path, memory__per_class=20)
    rng = np.random.default_rng(0)
    loop.memory = {c: 10_000 + 500 * c + np.arange(500) for c in range(4)}  # synthetic memories
    loop.memory.update({c: rng.choice(1000, size=20, replace=False) for c in (4, 5)})  # herded

    class Pool:
        synth_lo, synth_hi = 10_000, 12_000

    balanced = loop._balanced_indices(Pool(), t=2, end=6)
    owner = {int(i): c for c, idx in loop.memory.items() for i in idx}
    counts = np.bincount([owner[int(i)] for i in balanced], minlength=6)
    assert counts.tolist() == [20] * 6
    np.testing.assert_array_equal(balanced, loop._balanced_indices(Pool(), t=2, end=6))
    assert not np.array_equal(balanced, loop._balanced_indices(Pool(), t=3, end=6))
