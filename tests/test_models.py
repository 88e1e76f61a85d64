"""Backbones (shapes, parameter counts, PODNet's ReLU placement) and classifier heads."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sdcil_jax.config import base_config
from sdcil_jax.errors import ConfigError
from sdcil_jax.methods import TaskInfo, get_method
from sdcil_jax.models import (
    ResNet18,
    build_backbone,
    feature_dim,
    kmeans_imprint,
    linear_apply,
    linear_init,
    linear_pad,
    linear_write,
    lsc_apply,
    lsc_init,
    lsc_pad,
    lsc_scale,
    lsc_write,
    mask_updates,
    resnet32,
    resnet_tiny,
    trainable_mask_linear,
    trainable_mask_lsc,
)


def _key(seed=0):
    # Threefry init of even the tiny net compiles for ~10 s on a loaded 2-core CPU; rbg takes ~1 s.
    return jax.random.key(seed, impl="rbg")


def _abstract(model, shape):
    """(variables, outputs) as ShapeDtypeStructs: no compilation, no compute."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(lambda k, x: model.init(k, x, False), jax.random.key(0), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, False), variables, x)
    return variables, out


def _n_params(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _conv(k, c_in, c_out):
    return k * k * c_in * c_out


def _bn(c):
    return 2 * c  # scale + bias; the running mean/var are batch_stats, not params


def _block(c_in, c_out):
    return _conv(3, c_in, c_out) + _conv(3, c_out, c_out) + 2 * _bn(c_out)


def test_resnet32_shapes_and_param_count():
    variables, out = _abstract(resnet32(), (2, 32, 32, 3))
    assert [m.shape for m in out["maps"]] == [
        (2, 32, 32, 16),
        (2, 16, 16, 32),
        (2, 8, 8, 64),
        (2, 8, 8, 64),
    ]
    assert out["features"].shape == (2, 64) and out["relu_features"].shape == (2, 64)
    # Stem, then 5 / 1+4 / 1+3 / 1 blocks (official my_resnet.py: n, n-1, n-2 extra blocks).
    expected = (
        _conv(3, 3, 16) + _bn(16)
        + 5 * _block(16, 16)
        + _block(16, 32) + 4 * _block(32, 32)
        + _block(32, 64) + 3 * _block(64, 64)
        + _block(64, 64)
    )  # fmt: skip
    assert expected == 463_504
    assert _n_params(variables["params"]) == expected
    # Down-sampling shortcut (stride + zero-pad) has no parameters.
    down = variables["params"]["stage2_block0"]
    assert set(down) == {"conv_a", "bn_a", "conv_b", "bn_b"}
    assert down["conv_a"]["kernel"].shape == (3, 3, 16, 32)


def test_resnet18_shapes_and_param_count():
    # Default: PODNet's official stem (inclearn/convnet/resnet.py): 3x3 stride-1 conv, BN, ReLU,
    # 3x3/2 max-pool; a 224 input is 112x112 after the max-pool (the first stage's map).
    variables, out = _abstract(ResNet18(), (2, 224, 224, 3))
    assert [m.shape for m in out["maps"]] == [
        (2, 112, 112, 64),
        (2, 56, 56, 128),
        (2, 28, 28, 256),
        (2, 14, 14, 512),
    ]
    assert out["features"].shape == (2, 512)
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 64)
    official = 11_176_512 - _conv(7, 3, 64) + _conv(3, 3, 64)
    assert _n_params(variables["params"]) == official
    # torchvision's 7x7/2 stem: spatial sizes /2 again.
    variables, out = _abstract(ResNet18(stem="torchvision"), (2, 64, 64, 3))
    assert [m.shape[1] for m in out["maps"]] == [16, 8, 4, 2]
    assert _n_params(variables["params"]) == 11_176_512  # torchvision resnet18 minus its fc
    with pytest.raises(ValueError, match="stem"):
        _abstract(ResNet18(stem="huge"), (1, 32, 32, 3))


def test_bfloat16_maps_float32_features():
    _, out = _abstract(resnet_tiny(dtype=jnp.bfloat16), (2, 16, 16, 3))
    assert all(m.dtype == jnp.bfloat16 for m in out["maps"])
    assert out["features"].dtype == jnp.float32


@pytest.fixture(scope="module")
def tiny():
    model = resnet_tiny()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 3)), jnp.float32)
    variables = jax.jit(lambda k, x: model.init(k, x, False))(_key(), x)
    return model, variables, x


def _set_bn_b_scale(params, value):
    """Copy of params with every block's second-BN scale set to ``value``."""
    params = jax.tree.map(lambda a: a, params)
    for block in params.values():
        if "bn_b" in block:
            block["bn_b"] = dict(block["bn_b"], scale=jnp.full_like(block["bn_b"]["scale"], value))
    return params


def test_init_zero_residual_and_kaiming(tiny):
    model, variables, x = tiny
    params = variables["params"]
    for name, block in params.items():
        if name.startswith("stage"):
            np.testing.assert_array_equal(block["bn_b"]["scale"], 0.0)
            np.testing.assert_array_equal(block["bn_a"]["scale"], 1.0)
    # Kaiming normal, fan_out: std sqrt(2 / (3 * 3 * C_out)).
    k = np.asarray(params["stage4_block0"]["conv_b"]["kernel"])
    assert abs(k.std() / np.sqrt(2 / (9 * 32)) - 1) < 0.05
    # Zero-scaled residual branches: every block is the (strided, zero-padded) identity.
    m1, m2, m3, m4 = (np.asarray(m) for m in model.apply(variables, x, False)["maps"])
    assert m1.min() >= 0  # = the stem's ReLU output
    np.testing.assert_allclose(m2[..., :8], m1[:, ::2, ::2], atol=1e-6)
    np.testing.assert_array_equal(m2[..., 8:], 0.0)
    np.testing.assert_allclose(m3[..., :16], m2[:, ::2, ::2], atol=1e-6)
    np.testing.assert_allclose(m4, m3, atol=1e-6)


def test_no_relu_after_addition_and_last_relu_switch(tiny):
    _, variables, x = tiny
    params = _set_bn_b_scale(variables["params"], 1.0)
    # Stage 2's only block becomes the identity again, so m2 exposes what stage 2 receives.
    params["stage2_block0"]["bn_b"]["scale"] = jnp.zeros_like(
        params["stage2_block0"]["bn_b"]["scale"]
    )
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    for last_relu in (False, True):
        out = resnet_tiny(last_relu=last_relu).apply(v, x, False)
        m1, m2 = np.asarray(out["maps"][0]), np.asarray(out["maps"][1])
        assert m1.min() < 0  # maps are pre-ReLU in both modes (official Stage records them first)
        fed = np.maximum(m1, 0) if last_relu else m1
        np.testing.assert_allclose(m2[..., :8], fed[:, ::2, ::2], atol=1e-5)
        m4 = np.asarray(out["maps"][3])
        np.testing.assert_allclose(out["features"], m4.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            out["relu_features"], np.maximum(m4, 0).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6
        )
        assert np.asarray(out["features"]).min() < 0


def test_train_mode_updates_batch_stats(tiny):
    model, variables, x = tiny
    out, new_state = model.apply(variables, x, True, mutable=["batch_stats"])
    old = variables["batch_stats"]["stem_bn"]["mean"]
    new = new_state["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(old, new)
    assert out["features"].shape == (4, 32)


def _lsc_numpy(proxies, feats, k):
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    p = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
    n_classes = p.shape[0] // k
    scores = np.zeros((f.shape[0], n_classes))
    for b in range(f.shape[0]):
        for c in range(n_classes):
            sims = np.array([-np.sum((f[b] - p[c * k + j]) ** 2) for j in range(k)])
            w = np.exp(sims - sims.max())
            w /= w.sum()
            scores[b, c] = np.sum(w * sims)
    return scores


@pytest.mark.parametrize("n_classes,k,dim", [(1, 1, 4), (3, 10, 16), (7, 2, 5), (5, 4, 64)])
def test_lsc_matches_numpy(n_classes, k, dim):
    rng = np.random.default_rng(n_classes * 100 + k)
    params = lsc_init(_key(0), dim, n_classes, k)
    assert params["proxies"].shape == (n_classes * k, dim)
    assert lsc_scale(params).shape == () and float(lsc_scale(params)) == 1.0
    feats = rng.normal(size=(6, dim)).astype(np.float32) * 3.0
    # A feature on top of proxy 0 reaches the maximal similarity 0 for that proxy.
    feats[0] = 2.0 * np.asarray(params["proxies"][0])
    scores = np.asarray(lsc_apply(params, jnp.asarray(feats), k))
    expected = _lsc_numpy(np.asarray(params["proxies"], np.float64), feats.astype(np.float64), k)
    assert scores.shape == (6, n_classes)
    np.testing.assert_allclose(scores, expected, atol=2e-5)
    assert scores.min() >= -4.0 and scores.max() <= 0.0


def test_lsc_grad_and_frozen_mask():
    params = lsc_init(_key(0), 8, 4, 3)
    feats = jax.random.normal(_key(1), (5, 8))
    grads = jax.grad(lambda p: jnp.sum(lsc_scale(p) * lsc_apply(p, feats, 3)))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    # traced bounds: one jitted mask for any task
    mask_fn = jax.jit(lambda lo, hi: trainable_mask_lsc(4, lo, hi, 3))
    mask = mask_fn(3, 4)
    assert mask["proxies"].shape == (12, 1)
    masked = mask_updates(grads, mask)
    np.testing.assert_array_equal(masked["proxies"][:9], 0.0)
    np.testing.assert_array_equal(masked["proxies"][9:], grads["proxies"][9:])
    assert float(masked["scale"]) == float(grads["scale"])
    middle = mask_updates(grads, mask_fn(1, 3))  # old class 0 and dead class 3 frozen
    np.testing.assert_array_equal(middle["proxies"][:3], 0.0)
    np.testing.assert_array_equal(middle["proxies"][3:9], grads["proxies"][3:9])
    np.testing.assert_array_equal(middle["proxies"][9:], 0.0)
    assert mask_fn._cache_size() == 1


def test_mask_updates_drops_non_finite_frozen_rows():
    """A select, not a product: NaN * 0 would be NaN."""
    updates = {"proxies": jnp.asarray([[np.nan], [1.0]]), "scale": jnp.asarray(np.inf)}
    masked = mask_updates(updates, {"proxies": jnp.asarray([[0.0], [1.0]]), "scale": jnp.zeros(())})
    np.testing.assert_array_equal(masked["proxies"], [[0.0], [1.0]])
    assert float(masked["scale"]) == 0.0


def test_lsc_pad_and_write_keep_the_shape():
    params = lsc_init(_key(0), 8, 2, 3)
    padded = lsc_pad(params, 4, 3)
    assert padded["proxies"].shape == (12, 8)
    np.testing.assert_array_equal(padded["proxies"][:6], params["proxies"])
    # dead rows are not zero: their normalisation's gradient must stay finite
    dead_grad = jax.grad(lambda p: jnp.sum(lsc_apply(p, jnp.ones((1, 8)), 3)[:, :2]))(padded)
    assert bool(jnp.isfinite(dead_grad["proxies"]).all())
    new = np.ones((2 * 3, 8), np.float32)
    grown = lsc_write(padded, 6, new)
    assert grown["proxies"].shape == (12, 8)
    np.testing.assert_array_equal(grown["proxies"][:6], params["proxies"])
    np.testing.assert_array_equal(grown["proxies"][6:], new)
    assert float(grown["scale"]) == 1.0
    assert lsc_apply(grown, jnp.ones((1, 8)), 3).shape == (1, 4)


def test_linear_head_pad_write_and_mask():
    params = linear_init(_key(0), 16, 5)
    assert params["w"].shape == (16, 5) and params["b"].shape == (5,)
    np.testing.assert_array_equal(params["b"], 0.0)
    padded = linear_pad(params, 10)
    new = linear_init(_key(1), 16, 3)
    grown = linear_write(padded, 5, new)
    assert grown["w"].shape == (16, 10) and grown["b"].shape == (10,)
    np.testing.assert_array_equal(grown["w"][:, :5], params["w"])
    np.testing.assert_array_equal(grown["w"][:, 5:8], new["w"])
    np.testing.assert_array_equal(grown["w"][:, 8:], 0.0)
    feats = jax.random.normal(_key(2), (4, 16))
    np.testing.assert_allclose(
        linear_apply(grown, feats)[:, :5], linear_apply(params, feats), rtol=1e-5, atol=1e-6
    )
    mask = trainable_mask_linear(10, 5, 8)
    masked = mask_updates(jax.tree.map(jnp.ones_like, grown), mask)
    np.testing.assert_array_equal(masked["w"][:, :5], 0.0)
    np.testing.assert_array_equal(masked["w"][:, 5:8], 1.0)
    np.testing.assert_array_equal(masked["b"], [0] * 5 + [1] * 3 + [0] * 2)


def test_kmeans_imprint_finds_clusters():
    rng = np.random.default_rng(0)
    k, dim = 4, 16
    centres, feats = [], []
    for _ in range(3):
        c = rng.normal(size=(k, dim))
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        centres.append(c)
        # Scaled copies of each centre plus small noise: same directions after normalisation.
        pts = np.concatenate([c[j] * rng.uniform(0.5, 3.0, (25, 1)) for j in range(k)])
        feats.append(pts + 0.01 * rng.normal(size=pts.shape))
    proxies = kmeans_imprint(feats, k, seed=0)
    assert proxies.shape == (3 * k, dim) and proxies.dtype == np.float32
    # Centroids of normalised, tightly clustered features: norm close to 1 (not re-normalised).
    np.testing.assert_allclose(np.linalg.norm(proxies, axis=1), 1.0, rtol=1e-3)
    for c in range(3):
        unit = proxies[c * k : (c + 1) * k]
        cos = (unit / np.linalg.norm(unit, axis=1, keepdims=True)) @ centres[c].T
        assert cos.max(axis=0).min() > 0.99  # every true centre has its proxy
        assert cos.max(axis=1).min() > 0.99  # every proxy sits on a true centre


def test_kmeans_imprint_scales_centroids_to_the_existing_proxies_norm():
    """Official add_imprinted_classes: k-means centres of the normalised features (not normalised
    again) times the mean norm of the existing proxies."""
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(40, 6)) + 2.0]
    plain = kmeans_imprint(feats, 3, seed=0)
    scaled = kmeans_imprint(feats, 3, seed=0, target_norm=2.5)
    np.testing.assert_allclose(scaled, 2.5 * plain, rtol=1e-6)
    x = feats[0] / np.linalg.norm(feats[0], axis=1, keepdims=True)
    # Every centroid is a mean of unit vectors of its cluster: norm below 1 unless the cluster is
    # one direction.
    assert np.all(np.linalg.norm(plain, axis=1) < 1.0)
    assert np.linalg.norm(x.mean(0)) < 1.0


def test_kmeans_imprint_fewer_samples_than_proxies():
    feats = [np.array([[3.0, 0.0], [0.0, -2.0]]), np.eye(2) + 1.0]
    proxies = kmeans_imprint(feats, 3, seed=0, target_norm=2.0)
    np.testing.assert_allclose(proxies[:3], [[2, 0], [0, -2], [2, 0]], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(proxies, axis=1), 2.0, rtol=1e-6)


def test_podnet_imprints_at_the_mean_proxy_norm():
    cfg = base_config()
    cfg.method.name = "podnet"
    cfg.method.proxies_per_class = 2
    info = TaskInfo(task=1, num_old=2, num_new=1)
    method = get_method(cfg)
    head = {"proxies": np.repeat([[3.0, 0.0], [0.0, 5.0]], 2, axis=0), "scale": np.asarray(1.0)}
    head = method.pad_head(head, 5)  # classes 3 and 4 not seen yet: their rows do not count
    feats = [np.random.default_rng(0).normal(size=(10, 2))]
    grown = method.grow_head(head, jax.random.PRNGKey(0), info, feats)
    assert grown["proxies"].shape == (10, 2)
    new = np.asarray(grown["proxies"][4:6])
    want = kmeans_imprint(feats, 2, seed=cfg.seed + 1, target_norm=4.0)
    np.testing.assert_allclose(new, want, rtol=1e-6)
    np.testing.assert_array_equal(grown["proxies"][6:], head["proxies"][6:])


def test_build_backbone_registry():
    dims = {"resnet32": 64, "resnet18": 512, "resnet_tiny": 32, "resnet_digits": 32}
    for name, dim in dims.items():
        cfg = ml_collections.ConfigDict({"name": name, "width": 8})
        assert feature_dim(cfg) == dim
        assert build_backbone(cfg).last_relu is False
    cfg = ml_collections.ConfigDict({"name": "resnet32", "width": 16, "last_relu": True})
    assert build_backbone(cfg).last_relu is True
    with pytest.raises(ConfigError, match="resnet32"):
        build_backbone(ml_collections.ConfigDict({"name": "vgg", "width": 16}))
