"""The jitted data-parallel train step: 4 devices == 1 device on the same global batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdcil_jax import parallel
from sdcil_jax import train as train_lib
from sdcil_jax.config import base_config
from sdcil_jax.data.pool import TaskPool
from sdcil_jax.data.sources import ArraySource
from sdcil_jax.data.stream import DeviceStream
from sdcil_jax.methods import TaskInfo, get_method
from sdcil_jax.models import build_backbone


def _setup(synth_batch):
    cfg = base_config()
    cfg.model.name = "resnet_tiny"
    cfg.method.name = "replay"
    backbone = build_backbone(cfg.model)
    method = get_method(cfg, TaskInfo(task=1, num_old=2, num_new=2))
    rng = np.random.default_rng(0)
    pool_x = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    pool_y = rng.integers(0, 4, size=(40,)).astype(np.int32)
    variables = backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
    params = {"backbone": variables["params"],
              "head": method.init_head(jax.random.PRNGKey(1), 32, 4)}
    tx = train_lib.make_optimizer(0.1, 0.9, 5e-4, 10)
    mean, std = jnp.full((3,), 0.5), jnp.full((3,), 0.25)
    state0 = train_lib.init_state(params, variables["batch_stats"], tx)
    pool = TaskPool(pool_y, 20, 40, ArraySource(pool_x, pool_y), pool_x)
    return backbone, method, tx, mean, std, state0, pool


def _run(devices, synth_batch, steps=2):
    backbone, method, tx, mean, std, state0, pool = _setup(synth_batch)
    mesh = parallel.make_mesh(devices)
    stream = DeviceStream(pool, np.arange(8 * steps), batch_size=8, synth_batch=synth_batch,
                          use_in="classification", seed=0, task=1, mesh=mesh,
                          augment=dict(crop_padding=2, flip=True, brightness=0.2))
    step = jax.jit(train_lib.make_train_step(backbone, method, tx, stream, mean, std),
                   donate_argnums=(0,))
    state = parallel.put_replicated(state0, mesh)
    metrics = None
    for _, _, batch in stream.batches(0, 0, 1):
        state, metrics = step(state, None, stream.pool, batch, jax.random.PRNGKey(3),
                              train_lib.step_args(method, stream))
    return parallel.fetch(state), parallel.fetch(metrics), step


@pytest.mark.parametrize("synth_batch", [0, 8])
def test_four_devices_equal_one_device(synth_batch):
    assert jax.device_count() == 4
    s1, m1, _ = _run(jax.devices()[:1], synth_batch)
    s4, m4, _ = _run(jax.devices(), synth_batch)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5, atol=1e-6)
    leaves1 = jax.tree_util.tree_leaves((s1.params, s1.batch_stats))
    leaves4 = jax.tree_util.tree_leaves((s4.params, s4.batch_stats))
    assert len(leaves1) == len(leaves4)
    for a, b in zip(leaves1, leaves4, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_step_changes_params_and_compiles_once():
    state, metrics, step = _run(jax.devices(), 8, steps=3)
    assert np.isfinite(metrics["loss"])
    assert int(state.step) == 3
    assert step._cache_size() == 1  # same shapes every step: one compilation


def test_bfloat16_step_loss_close_to_float32():
    """model.dtype=bfloat16: convolutions in bf16, float32 parameters, BN statistics and losses.
    Stated tolerance: the PODNet step's loss within 2% (relative) of the float32 step's."""
    from sdcil_jax.config import base_config as config_fn

    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config_fn()
        cfg.model.name, cfg.model.dtype = "resnet_tiny", dtype
        cfg.method.name = "podnet"
        cfg.method.proxies_per_class = 3
        backbone = build_backbone(cfg.model)
        old_m = get_method(cfg, TaskInfo(task=0, num_old=0, num_new=2))
        method = get_method(cfg, TaskInfo(task=1, num_old=2, num_new=2))
        variables = backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
        head = method.pad_head(old_m.init_head(jax.random.PRNGKey(1), 32, 2), 4)
        old = {"params": {"backbone": variables["params"], "head": head},
               "batch_stats": variables["batch_stats"]}
        head = method.grow_head(head, jax.random.PRNGKey(2), method.info, None)
        params = {"backbone": variables["params"], "head": head}
        tx = train_lib.make_optimizer(0.1, 0.9, 5e-4, 10)
        state = train_lib.init_state(params, variables["batch_stats"], tx)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 4, size=16), jnp.int32)
        ones = jnp.ones((16,), jnp.float32)
        step = functools.partial(train_lib.update, backbone, method, tx)
        new_state, metrics = jax.jit(step)(state, old, x, y, ones, ones)
        assert jax.tree.leaves(new_state.params)[0].dtype == jnp.float32
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(new_state.batch_stats))
        losses[dtype] = float(metrics["loss"])
    assert np.isfinite(losses["bfloat16"])
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.02 * abs(losses["float32"]), losses
