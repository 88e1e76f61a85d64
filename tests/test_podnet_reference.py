"""One PODNet training step against the official PyTorch code (fixture in tests/data/podnet_reference).

The fixture (``podnet_step.npz``, with its README and generator) was computed by the official PODNet
code (arthurdouillard/incremental_learning.pytorch @ c09fc54): old and new ResNet-32 + LSC nets of
task 1 of CIFAR100 B50, one batch, the new net's train-mode outputs, the losses, every gradient, the
parameters after one official SGD step and the BatchNorm running statistics after the forward. The
official weights are mapped into the Flax model here and every stored quantity is recomputed through
the project's public functions: ``train.forward``, the method's ``loss``, ``train.update`` (the
optimisation step the training step runs) and the balanced-finetuning update.

Tolerances are the fixture README's (float32 on CPU).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdcil_jax import train as train_lib
from sdcil_jax.config import base_config
from sdcil_jax.methods import TaskInfo, get_method
from sdcil_jax.models import build_backbone, lsc_similarities

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "podnet_reference", "podnet_step.npz")
OLD_CLASSES, NEW_CLASSES, K = 50, 10, 10
STAGES = {1: 5, 2: 5, 3: 4}  # blocks per stage of the rebuffi ResNet-32 (stage 4: one block)


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _blocks():
    """(official prefix, flax block name) of every residual block."""
    out = [(f"convnet.stage_{s}.blocks.{i}", f"stage{s}_block{i}")
           for s, n in STAGES.items() for i in range(n)]
    return out + [("convnet.stage_4", "stage4_block0")]


def _layers():
    """(official conv, official bn, flax conv, flax bn) of every conv + BN pair."""
    pairs = [("convnet.conv_1_3x3", "convnet.bn_1", "stem_conv", "stem_bn")]
    for official, flax_name in _blocks():
        for part in ("a", "b"):
            pairs.append((f"{official}.conv_{part}", f"{official}.bn_{part}",
                          f"{flax_name}/conv_{part}", f"{flax_name}/bn_{part}"))
    return pairs


def _set(tree, path, value):
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = jnp.asarray(value)


def _get(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return np.asarray(tree)


def to_flax(ref, prefix):
    """The official state dict under ``prefix`` ('old/', 'new/', 'after_step/', 'grad/') as
    (params, batch_stats) of the Flax model (conv kernels OIHW -> HWIO)."""
    params, stats = {"backbone": {}, "head": {}}, {}
    stat_names = () if prefix == "grad/" else (("running_mean", "mean"), ("running_var", "var"))
    for conv, bn, fconv, fbn in _layers():
        _set(params["backbone"], f"{fconv}/kernel", ref[f"{prefix}{conv}.weight"].transpose(2, 3, 1, 0))
        _set(params["backbone"], f"{fbn}/scale", ref[f"{prefix}{bn}.weight"])
        _set(params["backbone"], f"{fbn}/bias", ref[f"{prefix}{bn}.bias"])
        for official, flax_name in stat_names:
            _set(stats, f"{fbn}/{flax_name}", ref[f"{prefix}{bn}.{official}"])
    proxies = [ref[f"{prefix}classifier._weights.0"]]
    if f"{prefix}classifier._weights.1" in ref:
        proxies.append(ref[f"{prefix}classifier._weights.1"])
    params["head"] = {"proxies": jnp.asarray(np.concatenate(proxies)),
                      "scale": jnp.asarray(ref[f"{prefix}post_processor.factor"])}
    return params, stats


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _config():
    c = base_config()
    c.method.name = "podnet"
    c.method.pod_flat, c.method.pod_spatial = 1.0, 3.0
    c.method.nca_margin, c.method.proxies_per_class, c.method.grad_clip = 0.6, K, 5.0
    c.model.name = "resnet32"
    return c


@pytest.fixture(scope="module")
def setup(ref):
    c = _config()
    backbone = build_backbone(c.model)
    method = get_method(c, TaskInfo(task=1, num_old=OLD_CLASSES, num_new=NEW_CLASSES))
    new_params, new_stats = to_flax(ref, "new/")
    old_params, old_stats = to_flax(ref, "old/")
    x, y = _nhwc(ref["x"]), jnp.asarray(ref["y"])
    return dict(c=c, backbone=backbone, method=method, new=(new_params, new_stats),
                old={"params": old_params, "batch_stats": old_stats}, x=x, y=y)


def _forward(s, params, stats, train):
    return train_lib.forward(s["backbone"], s["method"].head_apply, params, stats, s["x"], train)


def test_forward_matches_official(ref, setup):
    params, stats = setup["new"]
    out, _ = _forward(setup, params, stats, train=True)
    np.testing.assert_allclose(out["features"], ref["new_train/raw_features"], atol=1e-5)
    for i, m in enumerate(out["maps"]):
        np.testing.assert_allclose(np.asarray(m).transpose(0, 3, 1, 2), ref[f"new_train/att{i}"],
                                   atol=1e-4)
    np.testing.assert_allclose(out["logits"], ref["new_train/logits"], atol=1e-5)
    np.testing.assert_allclose(lsc_similarities(params["head"], out["features"]),
                               ref["new_train/raw_logits"], atol=1e-5)
    np.testing.assert_allclose(params["head"]["scale"] * out["logits"],
                               ref["new_train/scaled_logits"], atol=1e-5)
    old_out, _ = _forward(setup, setup["old"]["params"], setup["old"]["batch_stats"], train=False)
    np.testing.assert_allclose(old_out["features"], ref["old_eval/raw_features"], atol=1e-5)


def _loss_fn(setup):
    stats = setup["new"][1]
    old_out, _ = _forward(setup, setup["old"]["params"], setup["old"]["batch_stats"], train=False)
    ones = jnp.ones(setup["y"].shape, jnp.float32)

    def loss_fn(params):
        out, _ = _forward(setup, params, stats, train=True)
        return setup["method"].loss(params, out, old_out, setup["y"], ones, ones)

    return loss_fn


def test_losses_match_official(ref, setup):
    total, metrics = _loss_fn(setup)(setup["new"][0])
    for name in ("nca", "pod_flat", "pod_spatial"):
        np.testing.assert_allclose(metrics[name], ref[f"loss/{name}"], rtol=1e-5)
    np.testing.assert_allclose(total, ref["loss/total"], rtol=1e-5)
    factor = math.sqrt((OLD_CLASSES + NEW_CLASSES) / NEW_CLASSES)
    np.testing.assert_allclose(ref["settings/factor_pod_flat"], 1.0 * factor, rtol=1e-6)
    np.testing.assert_allclose(ref["settings/factor_pod_spatial"], 3.0 * factor, rtol=1e-6)


def _compare_tree(got, want, what):
    got_flat = jax.tree_util.tree_leaves_with_path(got)
    want_flat = dict(jax.tree_util.tree_leaves_with_path(want))
    assert len(got_flat) == len(want_flat)
    for path, leaf in got_flat:
        yield jax.tree_util.keystr(path), np.asarray(leaf), np.asarray(want_flat[path]), what


def test_gradients_match_official(ref, setup):
    grads = jax.grad(lambda p: _loss_fn(setup)(p)[0])(setup["new"][0])
    want, _ = to_flax(ref, "grad/")
    for name, g, w, _ in _compare_tree(grads, want, "grad"):
        assert np.max(np.abs(g - w)) <= 5e-5 * np.max(np.abs(w)) + 1e-12, name


def _batch_stats_ok(stats, ref):
    for _, bn, _, fbn in _layers():
        np.testing.assert_allclose(_get(stats, f"{fbn}/mean"), ref[f"after_step/{bn}.running_mean"],
                                   atol=1e-6, err_msg=bn)
        np.testing.assert_allclose(_get(stats, f"{fbn}/var"), ref[f"after_step/{bn}.running_var"],
                                   rtol=1e-5, atol=1e-6, err_msg=bn)


def test_one_training_step_matches_official(ref, setup):
    """train.update with PODNet's optimizer: params after the SGD step and BN running statistics."""
    params, stats = setup["new"]
    steps_per_epoch = 40
    tx = train_lib.make_optimizer(0.1, 0.9, 5e-4, 160 * steps_per_epoch, "cosine_epoch",
                                  steps_per_epoch)
    state = train_lib.init_state(params, stats, tx)
    ones = jnp.ones(setup["y"].shape, jnp.float32)
    new_state, metrics = train_lib.update(setup["backbone"], setup["method"], tx, state,
                                          setup["old"], setup["x"], setup["y"], ones, ones)
    np.testing.assert_allclose(metrics["loss"], ref["loss/total"], rtol=1e-5)
    want_params, _ = to_flax(ref, "after_step/")
    for name, got, want, _ in _compare_tree(new_state.params, want_params, "param"):
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)
    old_rows = OLD_CLASSES * K
    np.testing.assert_array_equal(np.asarray(new_state.params["head"]["proxies"])[:old_rows],
                                  ref["new/classifier._weights.0"])
    _batch_stats_ok(new_state.batch_stats, ref)


def test_batchnorm_running_variance_is_unbiased(ref, setup):
    """Without torch's n/(n-1) factor the running variance would miss by up to 4e-3."""
    params, stats = setup["new"]
    _, new_stats = _forward(setup, params, stats, train=True)
    _batch_stats_ok(new_stats, ref)


def test_balanced_finetuning_step_from_official_gradients(ref, setup):
    """PODNet's finetuning (tuning: classifier) on this batch: every proxy takes an SGD step with the
    official proxy gradients (the POD terms do not depend on the proxies, so the total loss's proxy
    gradient is the NCA's), the learned scale and the backbone stay, BN statistics update as in the
    official train-mode forward, and the learning rate stays constant."""
    params, stats = setup["new"]
    lr = 0.05
    tx = train_lib.make_optimizer(lr, 0.9, 5e-4, 20, "constant")
    state = train_lib.init_head_state(params, stats, tx)
    new_state, _ = train_lib.finetune_update(setup["backbone"], setup["method"], tx, state,
                                             setup["x"], setup["y"])
    g = np.concatenate([ref["grad/classifier._weights.0"], ref["grad/classifier._weights.1"]])
    p = np.asarray(params["head"]["proxies"])
    want = p - lr * (np.clip(g, -5, 5) + 5e-4 * p)
    np.testing.assert_allclose(new_state.params["head"]["proxies"], want, atol=1e-6)
    assert float(new_state.params["head"]["scale"]) == float(params["head"]["scale"])
    for (_, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(new_state.params["backbone"]),
                              jax.tree_util.tree_leaves_with_path(params["backbone"]), strict=True):
        np.testing.assert_array_equal(a, b)
    _batch_stats_ok(new_state.batch_stats, ref)


def test_cosine_epoch_schedule_is_torch_closed_form():
    """CosineAnnealingLR(T_max=E) stepped with scheduler.step(epoch) after every epoch."""
    lr, epochs, spe = 0.1, 160, 7
    schedule = train_lib.lr_schedule(lr, "cosine_epoch", epochs * spe, spe)

    def torch_lr(epoch):  # lr used during `epoch`
        last = epoch - 1
        return lr if last < 0 else 0.5 * lr * (1 + math.cos(math.pi * last / epochs))

    for epoch in (0, 1, 2, 3, 80, 159):
        for within in (0, spe - 1):
            np.testing.assert_allclose(float(schedule(epoch * spe + within)), torch_lr(epoch),
                                       rtol=1e-6, atol=1e-8)
    assert float(schedule(spe)) == pytest.approx(lr)  # epochs 0 and 1 both use the base lr
