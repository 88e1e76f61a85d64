"""PODNet / iCaRL steps: compile once per task, frozen old proxies, clamped gradients, POD terms."""

import jax
import jax.numpy as jnp
import numpy as np

from sdcil_jax import loop, parallel
from sdcil_jax import train as train_lib
from sdcil_jax.config import base_config
from sdcil_jax.data.pool import TaskPool
from sdcil_jax.data.sources import ArraySource
from sdcil_jax.data.stream import DeviceStream
from sdcil_jax.methods import TaskInfo, get_method
from sdcil_jax.models import build_backbone


def _podnet_setup(method_name="podnet"):
    cfg = base_config()
    cfg.model.name = "resnet_tiny"
    cfg.method.name = method_name
    cfg.method.proxies_per_class = 3
    backbone = build_backbone(cfg.model)
    old_method = get_method(cfg, TaskInfo(task=0, num_old=0, num_new=2))
    method = get_method(cfg, TaskInfo(task=1, num_old=2, num_new=2))
    variables = backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
    head0 = method.pad_head(old_method.init_head(jax.random.PRNGKey(1), 32, 2), 4)
    old_vars = {"params": {"backbone": variables["params"], "head": head0},
                "batch_stats": variables["batch_stats"]}
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(6, 32)), rng.normal(size=(6, 32))]
    head = method.grow_head(head0, jax.random.PRNGKey(2), method.info,
                            feats if method.imprint else None)
    params = {"backbone": variables["params"], "head": head}
    pool_x = rng.integers(0, 256, size=(48, 8, 8, 3), dtype=np.uint8)
    pool_y = rng.integers(0, 4, size=(48,)).astype(np.int32)
    return cfg, backbone, method, old_vars, params, variables["batch_stats"], pool_x, pool_y


def _epoch(method_name, synth_batch=8):
    cfg, backbone, method, old_vars, params, stats, pool_x, pool_y = _podnet_setup(method_name)
    mesh = parallel.make_mesh()
    tx = train_lib.make_optimizer(0.1, 0.9, 5e-4, 20)
    pool = TaskPool(pool_y, 32, 48, ArraySource(pool_x, pool_y), pool_x)
    stream = DeviceStream(pool, np.arange(32), batch_size=8, synth_batch=synth_batch, use_in="both",
                          seed=0, task=1, mesh=mesh,
                          augment=dict(crop_padding=1, flip=True, brightness=0.1))
    step = jax.jit(train_lib.make_train_step(backbone, method, tx, stream, jnp.full((3,), 0.5),
                                             jnp.full((3,), 0.25)), donate_argnums=(0,))
    state = parallel.put_replicated(train_lib.init_state(params, stats, tx), mesh)
    logs = []
    state = loop.run_epochs(step_fn=step, state=state,
                            old_vars=parallel.put_replicated(old_vars, mesh), stream=stream,
                            task_key=jax.random.PRNGKey(5),
                            args=train_lib.step_args(method, stream), epochs=2, task=1, desc="t",
                            log_fn=lambda e, m: logs.append(m), progress=False)
    return params, parallel.fetch(state), step, logs


def test_podnet_task_compiles_once_and_freezes_old_proxies():
    params0, state, step, logs = _epoch("podnet")
    assert step._cache_size() == 1  # 8 steps over 2 epochs, one compilation
    assert int(state.step) == 8
    assert {"nca", "pod_flat", "pod_spatial", "loss"} <= set(logs[0])
    k = 3
    old_rows = np.asarray(params0["head"]["proxies"][: 2 * k])
    np.testing.assert_array_equal(state.params["head"]["proxies"][: 2 * k], old_rows)
    assert not np.allclose(state.params["head"]["proxies"][2 * k:],
                           np.asarray(params0["head"]["proxies"][2 * k:]))
    assert np.isfinite(logs[-1]["loss"])


def test_icarl_task_compiles_once():
    _, state, step, logs = _epoch("icarl")
    assert step._cache_size() == 1
    assert np.isfinite(logs[-1]["loss"])


def test_podnet_distillation_zero_when_model_unchanged_and_grad_clamped():
    cfg, backbone, method, old_vars, params, stats, pool_x, pool_y = _podnet_setup()
    x = jnp.asarray(pool_x[:8], jnp.float32) / 255.0
    out, _ = train_lib.forward(backbone, method.head_apply, params, stats, x, train=False)
    old_out, _ = train_lib.forward(backbone, method.head_apply, old_vars["params"], stats, x,
                                   train=False)
    ones = jnp.ones((8,))
    _, metrics = method.loss(params, out, old_out, jnp.asarray(pool_y[:8]), ones, ones)
    assert float(metrics["pod_flat"]) < 1e-5 and float(metrics["pod_spatial"]) < 1e-3
    clipped = method.transform_grads({"a": jnp.array([-9.0, 0.5, 7.0])})
    np.testing.assert_allclose(clipped["a"], [-5.0, 0.5, 5.0])


def test_icarl_loss_matches_numpy_reference():
    cfg, backbone, method, *_ = _podnet_setup("icarl")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    # the old model's head has every column too; only the old classes' (0, 1) are read
    old_logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 3, 2, 1, 3])
    cls = np.array([1, 1, 0, 1, 1], np.float32)
    dist = np.array([1, 1, 1, 0, 1], np.float32)
    loss, _ = method.loss(None, {"logits": jnp.asarray(logits)}, {"logits": jnp.asarray(old_logits)},
                          jnp.asarray(labels), jnp.asarray(cls), jnp.asarray(dist))
    sig = lambda v: 1 / (1 + np.exp(-v.astype(np.float64)))  # noqa: E731
    total, count = 0.0, 0
    for i in range(5):
        if max(cls[i], dist[i]) == 0:
            continue
        count += 1
        row = 0.0
        for c in range(4):
            onehot = float(labels[i] == c)
            if c < 2 and dist[i]:
                t, w = sig(old_logits[i, c]), 1.0
            elif c < 2:
                t, w = onehot, cls[i]
            else:
                t, w = onehot, cls[i]
            p = sig(logits[i, c])
            row += w * -(t * np.log(p) + (1 - t) * np.log(1 - p))
        total += row / 4
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
