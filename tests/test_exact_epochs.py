"""Exact epochs, as the official ``DataLoader`` runs them: every image once per epoch, and the last
partial batch padded to the static batch size with its padding masked out of everything.

* A step on ``n < B`` real samples padded to ``B`` (plus a synthetic batch, unaffected) equals the
  step on the ``n`` samples alone: loss, every gradient, the parameters after the step and the
  BatchNorm running mean and (unbiased) variance, for the training and the finetuning step, on 1
  and 4 devices (the padding lands on whichever shard; the statistics are global).
* One epoch of the device stream and of the host (grain) stream yields every index exactly once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdcil_jax import parallel
from sdcil_jax import train as train_lib
from sdcil_jax.config import base_config
from sdcil_jax.data.pool import TaskPool
from sdcil_jax.data.sources import ArraySource
from sdcil_jax.data.stream import DecodedBatches, DeviceStream, HostStream, epoch_batches
from sdcil_jax.methods import TaskInfo, get_method
from sdcil_jax.models import build_backbone

INFO = TaskInfo(task=1, num_old=2, num_new=2)
N, B, S = 5, 8, 4  # real samples, static real batch, synthetic batch
MEAN, STD = jnp.full((3,), 0.5), jnp.full((3,), 0.25)
RTOL, ATOL = 2e-5, 2e-6  # float32 rounding (the padded batch sums over more rows)


@pytest.fixture(scope="module")
def setup():
    cfg = base_config()
    cfg.model.name = "resnet_tiny"
    cfg.method.name = "podnet"
    cfg.method.proxies_per_class = 3
    backbone = build_backbone(cfg.model)
    method = get_method(cfg)
    variables = backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
    head = method.pad_head(jax.device_get(method.init_head(jax.random.PRNGKey(1), 32, 4)), 6)
    # non-trivial running statistics, so the momentum update is visible
    stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
    params = {"backbone": variables["params"], "head": head}
    old = {"params": {"backbone": jax.tree.map(lambda p: p * 1.05, variables["params"]),
                      "head": head}, "batch_stats": variables["batch_stats"]}
    rng = np.random.default_rng(0)
    real_x = rng.integers(0, 256, size=(N, 16, 16, 3), dtype=np.uint8)
    real_y = np.array([0, 2, 3, 1, 2], np.int32)
    synth_x = rng.integers(0, 256, size=(S, 16, 16, 3), dtype=np.uint8)
    synth_y = np.array([0, 1, 1, 0], np.int32)
    return dict(backbone=backbone, method=method, params=params, stats=stats, old=old,
                real=(real_x, real_y), synth=(synth_x, synth_y))


def _batch(s, padded: bool, synth: bool):
    real_x, real_y = s["real"]
    batch = {"real_image": real_x, "real_label": real_y}
    if padded:  # padding rows hold garbage that must not matter
        junk = np.random.default_rng(9).integers(0, 256, size=(B - N, 16, 16, 3), dtype=np.uint8)
        batch = {"real_image": np.concatenate([real_x, junk]),
                 "real_label": np.concatenate([real_y, np.full(B - N, 3, np.int32)]),
                 "real_valid": (np.arange(B) < N)}
    if synth:
        batch.update(synth_image=s["synth"][0], synth_label=s["synth"][1])
    return batch


def _run(s, *, padded: bool, finetune: bool, devices):
    """(metrics, state after one jitted step, gradients of the same loss) on ``devices``."""
    mesh = parallel.make_mesh(devices)
    synth = 0 if finetune else S
    maker = DecodedBatches(B if padded else N, synth, "both", mesh)
    tx = train_lib.sgd_direction(0.9, 5e-4)
    make = train_lib.make_finetune_step if finetune else train_lib.make_train_step
    kind = "constant" if finetune else "cosine_epoch"
    step = make(s["backbone"], s["method"], tx, maker, MEAN, STD, lr_kind=kind)
    args = train_lib.step_args(s["method"], maker, train_lib.schedule_args(0.1, 400, 10), INFO)
    init = train_lib.init_head_state if finetune else train_lib.init_state
    state = init(s["params"], s["stats"], tx)
    batch = _batch(s, padded, synth > 0)
    sharding = parallel.batch_sharded(mesh)
    batch = {k: parallel.put_global(v, sharding) for k, v in batch.items()}
    state = parallel.put_replicated(state, mesh)
    old = None if finetune else parallel.put_replicated(s["old"], mesh)

    def grads(params):
        b = maker.materialise((), batch, None, None, args["stream"])
        images = (b["image"] - MEAN) / STD
        method = s["method"]

        def loss(p):
            out, _ = train_lib.forward(s["backbone"], method.head_apply, p, s["stats"], images,
                                       train=True, valid=b["valid"])
            if finetune:
                feats = jax.lax.stop_gradient(out["features"])
                return method.finetune_loss(p["head"], method.head_apply(p["head"], feats),
                                            b["label"], b["valid"], args["method"])
            old_out, _ = train_lib.forward(s["backbone"], method.head_apply, old["params"],
                                           old["batch_stats"], images, train=False)
            return method.loss(p, out, old_out, b["label"], b["cls_mask"], b["dist_mask"],
                               args["method"])[0]

        return jax.grad(loss)(params)

    g = jax.device_get(jax.jit(grads)(parallel.put_replicated(s["params"], mesh)))
    new_state, metrics = jax.jit(step)(state, old, (), batch, jax.random.PRNGKey(3), args)
    return jax.device_get(metrics), jax.device_get(new_state), g


def _close(got, want, what):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def short_batch(setup):
    """The reference: the step on the N real rows alone (one device), per stage."""
    return {finetune: _run(setup, padded=False, finetune=finetune, devices=jax.devices()[:1])
            for finetune in (False, True)}


@pytest.mark.parametrize("finetune", [False, True], ids=["train", "finetune"])
@pytest.mark.parametrize("n_devices", [1, 4])
def test_padded_last_batch_step_equals_the_short_batch_step(setup, short_batch, finetune,
                                                            n_devices):
    want_m, want_state, want_g = short_batch[finetune]
    got_m, got_state, got_g = _run(setup, padded=True, finetune=finetune,
                                   devices=jax.devices()[:n_devices])
    np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=RTOL)
    if not finetune:
        np.testing.assert_allclose(got_m["train_acc"], want_m["train_acc"], rtol=RTOL)
    _close(got_g, want_g, "gradient")
    _close(got_state.params, want_state.params, "parameter after the step")
    _close(got_state.batch_stats, want_state.batch_stats, "BN running statistic")
    # the padding changed something if it were not masked: a full batch of the same rows differs
    assert not np.allclose(jax.tree.leaves(want_state.batch_stats)[0],
                           jax.tree.leaves(setup["stats"])[0])


def test_batchnorm_masked_statistics_are_the_short_batch_statistics():
    """Masked rows out of the mean and the unbiased variance, as torch computes them on n rows."""
    from sdcil_jax.models.batchnorm import BatchNorm

    x = np.random.default_rng(0).normal(size=(6, 3, 3, 4)).astype(np.float32) * 2 + 1
    bn = BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.PRNGKey(0), x)
    mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
    y, new = bn.apply(variables, x, mask, mutable=["batch_stats"])
    real = x[mask > 0]
    mean, var = real.mean((0, 1, 2)), real.var((0, 1, 2))
    np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * real.var((0, 1, 2), ddof=1),
                               rtol=1e-5)
    np.testing.assert_allclose(y[mask > 0], (real - mean) / np.sqrt(var + 1e-5), rtol=1e-4,
                               atol=1e-5)


def test_epoch_batches_cover_every_index_once():
    indices = np.arange(100, 123)  # 23 images, batch 8: 3 steps, the last with 7 real rows
    order, valid = epoch_batches(indices, 8, np.random.default_rng(0))
    assert order.shape == valid.shape == (3, 8)
    assert valid.sum() == 23 and valid[:2].all() and valid[2].sum() == 7
    np.testing.assert_array_equal(np.sort(order[valid > 0]), indices)
    assert np.isin(order, indices).all()  # padding rows gather a real image (masked)


def _pool(n: int):
    images = np.zeros((n, 8, 8, 3), np.uint8)
    labels = np.arange(n, dtype=np.int32)  # the label names the image
    return TaskPool(labels, n, n, ArraySource(images, labels), images)


def test_device_stream_epoch_sees_every_image_once():
    pool, indices = _pool(40), np.arange(3, 33)  # 30 images, batch 8 (4 devices): 4 steps
    mesh = parallel.make_mesh()
    stream = DeviceStream(pool, indices, batch_size=8, synth_batch=0, use_in="none", seed=0,
                          task=1, mesh=mesh, augment=dict(crop_padding=0, flip=False, brightness=0))
    assert stream.steps_per_epoch == 4
    seen = []
    for _, _, batch in stream.batches(0, 0, 1):
        idx, valid = np.asarray(batch["index"]), np.asarray(batch["valid"])
        seen.extend(idx[valid > 0].tolist())
        b = stream.materialise(stream.pool, batch, jax.random.PRNGKey(0), None, stream.step_args())
        np.testing.assert_array_equal(np.asarray(b["cls_mask"]), valid)
    assert sorted(seen) == indices.tolist()


def test_host_stream_epoch_sees_every_image_once():
    pool, indices = _pool(40), np.arange(3, 33)
    mesh = parallel.make_mesh()
    stream = HostStream(pool, indices, batch_size=8, synth_batch=0, use_in="none", seed=0,
                        mesh=mesh, pipeline=dict(image_size=8, test_resize=8, workers=0,
                                                 prefetch=1, flip=False, brightness=0.0))
    assert stream.steps_per_epoch == 4  # ceil(30 / 8): the last partial batch is kept
    seen = []
    try:
        for _, _, batch in stream.batches(0, 0, 1):
            valid = np.asarray(batch["real_valid"])
            seen.extend(np.asarray(batch["real_label"])[valid].tolist())
    finally:
        stream.close()
    assert sorted(seen) == indices.tolist()
