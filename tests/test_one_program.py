"""One program per run: the padded head and the traced task arguments change nothing, and a run
compiles the same programs whatever its number of tasks.

* The step of task 1 with the head allocated for every class (dead rows, traced ``args``, the
  learning rate from traced schedule arguments) equals the step with a head of exactly the seen
  classes (constants, the optimizer's own schedule): loss, every live gradient, the parameters and
  BN statistics after the step; dead rows get no gradient and do not move.
* A 10-task run compiles no more XLA programs than a 3-task run (each in its own process, no
  persistent cache, every compilation counted through JAX's monitoring events).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdcil_jax import parallel
from sdcil_jax import train as train_lib
from sdcil_jax.config import base_config
from sdcil_jax.data.stream import DecodedBatches
from sdcil_jax.methods import TaskInfo, get_method
from sdcil_jax.models import build_backbone

ROOT = Path(__file__).resolve().parents[1]
TOTAL, K, B = 10, 3, 8  # classes allocated, proxies per class, batch
INFO = TaskInfo(task=1, num_old=2, num_new=2)
MEAN, STD = jnp.full((3,), 0.5), jnp.full((3,), 0.25)
RTOL, ATOL = 2e-5, 2e-6  # float32 rounding (summation order over the longer padded rows)


def _head_rows(name: str, head, n_classes: int):
    """The first ``n_classes`` classes of a head (the exact-size head of the same values)."""
    if name == "podnet":
        return {"proxies": np.asarray(head["proxies"])[:n_classes * K],
                "scale": np.asarray(head["scale"])}
    return {"w": np.asarray(head["w"])[:, :n_classes], "b": np.asarray(head["b"])[:n_classes]}


def _setup(name: str):
    cfg = base_config()
    cfg.model.name = "resnet_tiny"
    cfg.method.name = name
    cfg.method.proxies_per_class = K
    backbone = build_backbone(cfg.model)
    run_method = get_method(cfg)  # as a run builds it: every task's facts arrive as args
    exact_method = get_method(cfg, INFO)  # the task's facts as constants
    variables = backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
    rng = np.random.default_rng(0)
    old_head = run_method.pad_head(jax.device_get(run_method.init_head(jax.random.PRNGKey(1), 32,
                                                                       INFO.num_old)), TOTAL)
    feats = [rng.normal(size=(6, 32)), rng.normal(size=(6, 32))] if run_method.imprint else None
    padded = run_method.grow_head(old_head, jax.random.PRNGKey(2), INFO, feats)
    old_backbone = jax.tree.map(lambda p: p + 0.05 * jnp.sign(p), variables["params"])
    x = rng.integers(0, 256, size=(B, 16, 16, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 2, 3, 1, 2], np.int32)
    return dict(cfg=cfg, backbone=backbone, run=run_method, exact=exact_method,
                stats=variables["batch_stats"], backbone_params=variables["params"],
                padded=padded, exact_head=_head_rows(name, padded, INFO.num_seen),
                old_backbone=old_backbone, old_head=old_head, x=x, y=y)


def _old_vars(s, exact: bool, name: str):
    # The old model's head has every column in a run; the exact run's old head has the seen ones.
    head = _head_rows(name, s["old_head"], INFO.num_seen) if exact else s["old_head"]
    return {"params": {"backbone": s["old_backbone"], "head": head}, "batch_stats": s["stats"]}


def _grads(s, method, head, old_vars, args):
    """Gradients of the method's loss, jitted (as the step computes them)."""
    images = (jnp.asarray(s["x"], jnp.float32) / 255.0 - MEAN) / STD
    ones = jnp.ones((B,), jnp.float32)

    def loss(params):
        old_out, _ = train_lib.forward(s["backbone"], method.head_apply, old_vars["params"],
                                       old_vars["batch_stats"], images, train=False)
        out, _ = train_lib.forward(s["backbone"], method.head_apply, params, s["stats"], images,
                                   train=True)
        return method.loss(params, out, old_out, jnp.asarray(s["y"]), ones, ones, args)[0]

    params = {"backbone": s["backbone_params"], "head": head}
    return jax.jit(jax.value_and_grad(loss))(params)


def _step(s, method, head, old_vars, exact: bool, finetune: bool):
    """One jitted train (or finetune) step: the exact head with the optimizer's own schedule and
    the method's constants, or the padded head with the run's traced args and learning rate."""
    lr, kind, total, spe = (0.05, "constant", 20, 4) if finetune else (0.1, "cosine_epoch", 640, 4)
    maker = DecodedBatches(B, 0, "both", parallel.make_mesh())
    make = train_lib.make_finetune_step if finetune else train_lib.make_train_step
    if exact:
        tx = train_lib.make_optimizer(lr, 0.9, 5e-4, total, kind, spe)
        step = make(s["backbone"], method, tx, maker, MEAN, STD)
        args = train_lib.step_args(method, maker)
    else:
        tx = train_lib.sgd_direction(0.9, 5e-4)
        step = make(s["backbone"], method, tx, maker, MEAN, STD, lr_kind=kind)
        args = train_lib.step_args(method, maker, train_lib.schedule_args(lr, total, spe), INFO)
    params = {"backbone": s["backbone_params"], "head": head}
    init = train_lib.init_head_state if finetune else train_lib.init_state
    state = init(params, s["stats"], tx)
    batch = {"real_image": jnp.asarray(s["x"]), "real_label": jnp.asarray(s["y"])}
    new_state, metrics = jax.jit(step)(state, None if finetune else old_vars, (), batch,
                                       jax.random.PRNGKey(3), args)
    return jax.device_get(new_state), jax.device_get(metrics)


def _close(got, want, what):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _split_head(name, head):
    """(live part, dead part) of a padded head's leaves."""
    live = _head_rows(name, head, INFO.num_seen)
    if name == "podnet":
        return live, np.asarray(head["proxies"])[INFO.num_seen * K:]
    return live, (np.asarray(head["w"])[:, INFO.num_seen:], np.asarray(head["b"])[INFO.num_seen:])


@pytest.mark.parametrize("name", ["podnet", "icarl", "replay"])
def test_padded_head_step_equals_exact_head_step(name):
    s = _setup(name)
    args = s["run"].task_args(INFO)
    # loss and gradients
    loss_p, g_p = _grads(s, s["run"], s["padded"], _old_vars(s, False, name), args)
    loss_e, g_e = _grads(s, s["exact"], s["exact_head"], _old_vars(s, True, name), None)
    np.testing.assert_allclose(loss_p, loss_e, rtol=RTOL)
    _close(g_p["backbone"], g_e["backbone"], "backbone gradient")
    live, dead = _split_head(name, g_p["head"])
    _close(live, g_e["head"], "live head gradient")  # the learned scale's included
    for leaf in jax.tree.leaves(dead):
        assert np.all(leaf == 0), "a class not seen yet got a gradient"
    # one training step
    st_p, m_p = _step(s, s["run"], s["padded"], _old_vars(s, False, name), exact=False,
                      finetune=False)
    st_e, m_e = _step(s, s["exact"], s["exact_head"], _old_vars(s, True, name), exact=True,
                      finetune=False)
    np.testing.assert_allclose(m_p["loss"], m_e["loss"], rtol=RTOL)
    np.testing.assert_allclose(m_p["train_acc"], m_e["train_acc"])
    _close(st_p.params["backbone"], st_e.params["backbone"], "backbone after the step")
    _close(st_p.batch_stats, st_e.batch_stats, "BN statistics after the step")
    live, dead = _split_head(name, st_p.params["head"])
    _close(live, st_e.params["head"], "live head after the step")
    _, dead_before = _split_head(name, s["padded"])
    for a, b in zip(jax.tree.leaves(dead), jax.tree.leaves(dead_before), strict=True):
        np.testing.assert_array_equal(a, b)  # no update, no weight decay on dead rows
    if name == "podnet":  # the old proxies stay, as in the exact step
        np.testing.assert_array_equal(st_p.params["head"]["proxies"][:INFO.num_old * K],
                                      s["padded"]["proxies"][:INFO.num_old * K])


def test_padded_head_finetuning_step_equals_exact_head_step():
    s = _setup("podnet")
    st_p, m_p = _step(s, s["run"], s["padded"], None, exact=False, finetune=True)
    st_e, m_e = _step(s, s["exact"], s["exact_head"], None, exact=True, finetune=True)
    np.testing.assert_allclose(m_p["loss"], m_e["loss"], rtol=RTOL)
    live, dead = _split_head("podnet", st_p.params["head"])
    _close(live, st_e.params["head"], "live proxies after finetuning")
    np.testing.assert_array_equal(dead, np.asarray(s["padded"]["proxies"])[INFO.num_seen * K:])
    assert float(st_p.params["head"]["scale"]) == float(s["padded"]["scale"])
    _close(st_p.batch_stats, st_e.batch_stats, "BN statistics after finetuning")


@pytest.mark.parametrize("kind", ["cosine_step", "cosine_epoch"])
def test_traced_schedule_equals_the_optimizer_schedule(kind):
    """The step's learning rate from traced (lr, total, steps per epoch) equals the schedule the
    optimizer would build from constants (optax's cosine decay for cosine_step), for stages of
    several lengths through ONE compiled function."""
    traced = jax.jit(lambda a, t: train_lib.schedule_value(kind, a["lr"], a["total"], a["spe"], t))
    for total, spe in ((40, 4), (77, 7), (1600, 10)):
        want = (optax.cosine_decay_schedule(0.1, total) if kind == "cosine_step"
                else train_lib.lr_schedule(0.1, kind, total, spe))
        args = train_lib.schedule_args(0.1, total, spe)
        for t in (0, 1, spe, spe + 1, total // 2, total - 1, total + 3):
            np.testing.assert_allclose(traced(args, jnp.int32(t)), want(t), rtol=1e-6, atol=1e-9)
    assert traced._cache_size() == 1


_COUNT = """
import json, sys
import jax, jax.monitoring
import sdcil_jax
from sdcil_jax.config import load_config_file
count = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: count.append(1)
    if event == "/jax/core/compile/backend_compile_duration" else None)
c = load_config_file(sys.argv[1])
c.dataset.data_dir = sys.argv[2]
c.train.epochs, c.method.finetune_epochs = 1, 1
c.scenario.initial_increment, c.scenario.increment = 1, 1
c.scenario.max_tasks = int(sys.argv[4])
c.generation.backend = "real_holdout"
c.generation.per_class = c.synthetic.per_class = c.dataset.holdout_per_class = 4
c.generation.preview_per_class = 0
c.memory.per_class = 3
if sys.argv[5] == "host":  # decode and augment on the host (grain), as for ImageNet
    c.dataset.pipeline, c.dataset.workers = "host", 0
    c.dataset.image_size = c.dataset.test_resize = 8
r = sdcil_jax.run(c, sys.argv[3], progress=False)
print("RESULT", json.dumps({"compilations": len(count), "tasks": len(r["per_task"]),
                            "compile": [r_["time_s"].get("train_compile") for r_ in r["per_task"]]}))
"""


def _compilations(tmp_path, tasks: int, pipeline: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(TFDS_DATA_DIR=str(tmp_path / "tfds"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT, str(ROOT / "configs" / "quickstart.py"),
         str(tmp_path / "tfds"), str(tmp_path / f"work{tasks}"), str(tasks), pipeline],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["device", "host"])
def test_ten_tasks_compile_no_more_programs_than_three(tmp_path, pipeline):
    """Digits, one class per task (4 fake CPU devices, PODNet with synthetic replay in both losses),
    on the device pipeline and on the host (grain) pipeline: a 10-task run compiles no more XLA
    programs than a 3-task run (the per-task programs of the code before made it 96 vs 50)."""
    three = _compilations(tmp_path, 3, pipeline)
    ten = _compilations(tmp_path, 10, pipeline)
    assert (three["tasks"], ten["tasks"]) == (3, 10)
    assert ten["compilations"] <= three["compilations"], (three, ten)
