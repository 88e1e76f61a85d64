"""Tests of sdcil_jax.losses against independent float64 numpy references written with loops."""

from __future__ import annotations

import math
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdcil_jax import losses

RTOL = 1e-5
ATOL = 1e-6

BATCHES = (1, 3, 8)
BATCH_CLASSES = ((1, 5), (3, 17), (8, 2))  # every B in {1, 3, 8} and C in {2, 5, 17} once
MAP_SHAPES = ((8, 8, 4), (4, 4, 8), (2, 2, 16), (2, 2, 16))  # (H, W, K) per map

# The losses are jitted once per input shape here: op-by-op (eager) dispatch compiles every
# primitive separately and is several times slower on a loaded CPU. The functions are the same
# code either way; `test_every_loss_works_under_jit` also jits them with traced scale/temperature.
J = types.SimpleNamespace(
    cross_entropy=jax.jit(losses.cross_entropy),
    nca=jax.jit(losses.nca, static_argnames=("exclude_pos_denominator",)),
    bce=jax.jit(losses.bce),
    kd=jax.jit(losses.kd),
    pod_flat=jax.jit(losses.pod_flat),
    pod_spatial=jax.jit(losses.pod_spatial),
)


def jit_grad(fn):
    return jax.jit(jax.grad(fn))


# ----------------------------------------------------------------------------------------------
# float64 numpy references (loops, deliberately plain)
# ----------------------------------------------------------------------------------------------


def ref_masked_mean(per_sample, mask):
    if mask is None:
        return float(np.mean(per_sample))
    total = 0.0
    weight = 0.0
    for value, m in zip(per_sample, mask, strict=True):
        total += float(m) * float(value)
        weight += float(m)
    return total / max(weight, 1.0)


def ref_logsumexp(row):
    top = max(row)
    return top + math.log(sum(math.exp(v - top) for v in row))


def ref_cross_entropy(logits, labels, mask=None):
    logits = np.asarray(logits, np.float64)
    per = []
    for i in range(logits.shape[0]):
        row = list(logits[i])
        per.append(ref_logsumexp(row) - row[int(labels[i])])
    return ref_masked_mean(per, mask)


def ref_nca(scores, labels, scale, margin, exclude=True, mask=None):
    scores = np.asarray(scores, np.float64)
    per = []
    for i in range(scores.shape[0]):
        y = int(labels[i])
        z = [scale * (s - margin) for s in scores[i]]
        if not exclude:
            per.append(ref_logsumexp(z) - z[y])
            continue
        top = max(z)
        z = [v - top for v in z]
        denom = 0.0
        for c, v in enumerate(z):
            denom += math.exp(0.0) if c == y else math.exp(v)
        per.append(-(z[y] - math.log(denom)))
    return ref_masked_mean(per, mask)


def ref_bce(logits, targets, mask=None):
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(targets, np.float64)
    per = []
    for i in range(logits.shape[0]):
        acc = 0.0
        for c in range(logits.shape[1]):
            p = 1.0 / (1.0 + math.exp(-logits[i, c]))
            t = targets[i, c]
            acc += -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))
        per.append(acc / logits.shape[1])
    return ref_masked_mean(per, mask)


def ref_kd(student, teacher, temperature, mask=None):
    student = np.asarray(student, np.float64)
    teacher = np.asarray(teacher, np.float64)
    per = []
    for i in range(student.shape[0]):
        lq = [v / temperature for v in student[i]]
        lp = [v / temperature for v in teacher[i]]
        zq, zp = ref_logsumexp(lq), ref_logsumexp(lp)
        kl = 0.0
        for c in range(student.shape[1]):
            log_p, log_q = lp[c] - zp, lq[c] - zq
            kl += math.exp(log_p) * (log_p - log_q)
        per.append(temperature**2 * kl)
    return ref_masked_mean(per, mask)


def ref_pod_embedding(x):
    """One NHWC image (H, W, K), already squared -> channel-major [sum over W ; sum over H]."""
    h_size, w_size, k_size = x.shape
    width_pooled = []
    for k in range(k_size):
        for h in range(h_size):
            width_pooled.append(sum(x[h, w, k] for w in range(w_size)))
    height_pooled = []
    for k in range(k_size):
        for w in range(w_size):
            height_pooled.append(sum(x[h, w, k] for h in range(h_size)))
    return np.array(width_pooled + height_pooled, np.float64)


def ref_pod_spatial(old_maps, new_maps, mask=None):
    layer_losses = []
    for old, new in zip(old_maps, new_maps, strict=True):
        old = np.asarray(old, np.float64)
        new = np.asarray(new, np.float64)
        per = []
        for n in range(old.shape[0]):
            u = ref_pod_embedding(old[n] ** 2)
            v = ref_pod_embedding(new[n] ** 2)
            u = u / max(math.sqrt(float(np.sum(u * u))), 1e-12)
            v = v / max(math.sqrt(float(np.sum(v * v))), 1e-12)
            per.append(math.sqrt(float(np.sum((u - v) ** 2))))
        layer_losses.append(ref_masked_mean(per, mask))
    return sum(layer_losses) / len(layer_losses)


def ref_pod_flat(old, new, mask=None):
    old = np.asarray(old, np.float64)
    new = np.asarray(new, np.float64)
    per = []
    for i in range(old.shape[0]):
        dot = sum(a * b for a, b in zip(old[i], new[i], strict=True))
        norm_old = math.sqrt(sum(a * a for a in old[i]))
        norm_new = math.sqrt(sum(b * b for b in new[i]))
        per.append(1.0 - dot / (norm_old * norm_new))
    return ref_masked_mean(per, mask)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def rng_for(*key):
    """A generator seeded by the key's text (``hash`` of strings varies between processes)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def f32(x):
    return np.asarray(x, np.float32)


def random_maps(rng, batch):
    old = [f32(rng.normal(size=(batch, *shape))) for shape in MAP_SHAPES]
    new = [f32(o + 0.5 * rng.normal(size=o.shape)) for o in old]
    return old, new


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    actual = np.asarray(actual)
    assert actual.shape == ()
    assert actual.dtype == np.float32
    np.testing.assert_allclose(float(actual), expected, rtol=rtol, atol=atol)


def half_mask(batch):
    return f32([1.0 if i % 2 == 0 else 0.0 for i in range(batch)])


# ----------------------------------------------------------------------------------------------
# Values against the references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "classes"), BATCH_CLASSES)
def test_cross_entropy_matches_reference(batch, classes):
    rng = rng_for("ce", batch, classes)
    logits = f32(3.0 * rng.normal(size=(batch, classes)))
    labels = rng.integers(0, classes, size=batch)
    assert_close(J.cross_entropy(logits, labels), ref_cross_entropy(logits, labels))
    mask = f32(rng.uniform(size=batch))
    assert_close(J.cross_entropy(logits, labels, mask), ref_cross_entropy(logits, labels, mask))


@pytest.mark.parametrize(("batch", "classes"), BATCH_CLASSES)
@pytest.mark.parametrize("exclude", [True, False])
def test_nca_matches_reference(batch, classes, exclude):
    rng = rng_for("nca", batch, classes, exclude)
    scores = f32(rng.uniform(-4.0, 0.0, size=(batch, classes)))  # LSC scores are 2cos - 2
    labels = rng.integers(0, classes, size=batch)
    scale = 3.7
    got = J.nca(scores, labels, scale=scale, margin=0.6, exclude_pos_denominator=exclude)
    assert_close(got, ref_nca(scores, labels, scale, 0.6, exclude))
    mask = f32(rng.uniform(size=batch))
    got = J.nca(scores, labels, scale=scale, margin=0.6, exclude_pos_denominator=exclude, mask=mask)
    assert_close(got, ref_nca(scores, labels, scale, 0.6, exclude, mask))


@pytest.mark.parametrize(("batch", "classes"), BATCH_CLASSES)
def test_bce_matches_reference(batch, classes):
    rng = rng_for("bce", batch, classes)
    logits = f32(3.0 * rng.normal(size=(batch, classes)))
    targets = f32(rng.uniform(size=(batch, classes)))
    targets[:, 0] = 1.0
    targets[:, -1] = 0.0
    assert_close(J.bce(logits, targets), ref_bce(logits, targets))
    mask = f32(rng.uniform(size=batch))
    assert_close(J.bce(logits, targets, mask), ref_bce(logits, targets, mask))


@pytest.mark.parametrize(("batch", "classes"), BATCH_CLASSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_matches_reference(batch, classes, temperature):
    rng = rng_for("kd", batch, classes, temperature)
    student = f32(2.0 * rng.normal(size=(batch, classes)))
    teacher = f32(2.0 * rng.normal(size=(batch, classes)))
    assert_close(J.kd(student, teacher, temperature), ref_kd(student, teacher, temperature))
    mask = f32(rng.uniform(size=batch))
    assert_close(
        J.kd(student, teacher, temperature, mask),
        ref_kd(student, teacher, temperature, mask),
    )


@pytest.mark.parametrize("batch", BATCHES)
def test_pod_spatial_matches_reference(batch):
    rng = rng_for("pod", batch)
    old, new = random_maps(rng, batch)
    assert_close(J.pod_spatial(old, new), ref_pod_spatial(old, new))
    mask = f32(rng.uniform(size=batch))
    assert_close(J.pod_spatial(old, new, mask), ref_pod_spatial(old, new, mask))
    if batch == 3:  # A single map: the mean over the maps is that map's term.
        assert_close(J.pod_spatial(old[:1], new[:1]), ref_pod_spatial(old[:1], new[:1]))


def test_pod_spatial_embedding_order_matches_nchw_official_layout():
    """The embedding equals the NCHW computation `[x.sum(3).view(b,-1), x.sum(2).view(b,-1)]`."""
    rng = rng_for("pod-order")
    x = f32(rng.normal(size=(2, 3, 5, 4)) ** 2)  # NHWC
    nchw = np.transpose(x.astype(np.float64), (0, 3, 1, 2))
    expected = np.concatenate(
        [nchw.sum(axis=3).reshape(2, -1), nchw.sum(axis=2).reshape(2, -1)], axis=1
    )
    got = np.asarray(losses._pod_spatial_embedding(jnp.asarray(x)))
    assert got.shape == (2, 4 * 3 + 4 * 5)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    for n in range(2):
        np.testing.assert_allclose(got[n], ref_pod_embedding(x[n]), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("batch", "dim"), [(1, 64), (3, 2), (8, 64)])
def test_pod_flat_matches_reference(batch, dim):
    rng = rng_for("flat", batch, dim)
    old = f32(rng.normal(size=(batch, dim)))
    new = f32(old + rng.normal(size=(batch, dim)))
    assert_close(J.pod_flat(old, new), ref_pod_flat(old, new))
    mask = f32(rng.uniform(size=batch))
    assert_close(J.pod_flat(old, new, mask), ref_pod_flat(old, new, mask))


# ----------------------------------------------------------------------------------------------
# NCA quirks of the official code
# ----------------------------------------------------------------------------------------------


def test_nca_zeroed_target_hand_example():
    # scale 1, margin 0, scores [1, 0], target 1 (not the max):
    # z = [1, 0] - max = [0, -1]; z' = [0, 0] (target zeroed) ->
    # loss = -(-1 - log(e^0 + e^0)) = 1 + log 2.
    scores = f32([[1.0, 0.0]])
    labels = np.array([1])
    nca_value = J.nca(scores, labels, scale=1.0, margin=0.0)
    assert_close(nca_value, 1.0 + math.log(2.0))
    # Plain softmax CE: -(0 - log(e^1 + e^0)) = log(1 + e).
    ce_value = J.nca(scores, labels, scale=1.0, margin=0.0, exclude_pos_denominator=False)
    assert_close(ce_value, math.log(1.0 + math.e))
    # The textbook NCA (target removed from the sum) would give -(-1 - log(e^0)) = 1.
    assert abs(float(nca_value) - 1.0) > 0.5
    assert abs(float(nca_value) - float(ce_value)) > 0.3

    # When the target holds the row max its zeroed entry is exp(0) anyway: NCA equals CE.
    labels0 = np.array([0])
    expected = math.log(1.0 + math.exp(-1.0))
    assert_close(J.nca(scores, labels0, scale=1.0, margin=0.0), expected)
    assert_close(
        J.nca(scores, labels0, scale=1.0, margin=0.0, exclude_pos_denominator=False),
        expected,
    )


def test_nca_scale_changes_value_by_hand():
    # scale 2: z = [2, 0] - 2 = [0, -2]; target 1 -> 2 + log 2.
    got = J.nca(f32([[1.0, 0.0]]), np.array([1]), scale=2.0, margin=0.0)
    assert_close(got, 2.0 + math.log(2.0))


def test_nca_margin_is_applied_to_every_class():
    """Margin on every class: it cancels with the row max, so the value ignores it entirely.

    A margin on the target only (the AM-softmax reading of the docstring) would change the value;
    the numpy reference of that variant is computed here to show the difference.
    """
    rng = rng_for("nca-margin")
    scores = f32(rng.uniform(-4.0, 0.0, size=(8, 5)))
    labels = rng.integers(0, 5, size=8)
    base = float(J.nca(scores, labels, scale=3.0, margin=0.0))
    for margin in (0.6, -1.3, 2.0):
        got = J.nca(scores, labels, scale=3.0, margin=margin)
        assert_close(got, base)
        assert_close(got, ref_nca(scores, labels, 3.0, margin))

    def target_only_margin(margin):
        shifted = scores.astype(np.float64).copy()
        for i, y in enumerate(labels):
            shifted[i, y] -= margin
        return ref_nca(shifted, labels, 3.0, 0.0)

    assert abs(target_only_margin(0.6) - base) > 1e-2


def test_nca_gradient_flows_through_row_max():
    """The official code does not detach the max; the gradient must match the full function.

    Because the loss depends on scores only through z - max(z), the gradient of every row sums to
    zero. A detached max would break that (the zeroed target makes the loss shift-dependent).
    """
    rng = rng_for("nca-grad")
    scores = f32(rng.uniform(-4.0, 0.0, size=(3, 5)))
    labels = np.array([0, 2, 4])
    # Make sure the target is not the max in every row so that the quirk is active.
    scores[np.arange(3), labels] = scores.min(axis=1) - 0.1
    scale = 2.5

    grad = np.asarray(
        jit_grad(lambda s: J.nca(s, labels, scale=scale, margin=0.6))(jnp.asarray(scores))
    )
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-6)

    eps = 1e-6
    numeric = np.zeros_like(scores, dtype=np.float64)
    base = scores.astype(np.float64)
    for i in range(3):
        for c in range(5):
            plus, minus = base.copy(), base.copy()
            plus[i, c] += eps
            minus[i, c] -= eps
            numeric[i, c] = (
                ref_nca(plus, labels, scale, 0.6) - ref_nca(minus, labels, scale, 0.6)
            ) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)

    # Gradient with respect to a learned scale is finite and matches finite differences too.
    gscale = float(
        jit_grad(lambda t: J.nca(jnp.asarray(scores), labels, scale=t, margin=0.6))(
            jnp.float32(scale)
        )
    )
    numeric_scale = (
        ref_nca(base, labels, scale + eps, 0.6) - ref_nca(base, labels, scale - eps, 0.6)
    ) / (2 * eps)
    np.testing.assert_allclose(gscale, numeric_scale, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def _all_losses_with_mask(batch, rng):
    """(name, fn(mask), fn_on_subset(index_array)) triples covering every masked loss."""
    classes = 5
    logits = f32(rng.normal(size=(batch, classes)))
    labels = rng.integers(0, classes, size=batch)
    teacher = f32(rng.normal(size=(batch, classes)))
    targets = f32(rng.uniform(size=(batch, classes)))
    feats_old = f32(rng.normal(size=(batch, 16)))
    feats_new = f32(rng.normal(size=(batch, 16)))
    maps_old, maps_new = random_maps(rng, batch)
    return [
        (
            "cross_entropy",
            lambda m: J.cross_entropy(logits, labels, m),
            lambda ix: J.cross_entropy(logits[ix], labels[ix]),
        ),
        (
            "nca",
            lambda m: J.nca(logits, labels, scale=2.0, mask=m),
            lambda ix: J.nca(logits[ix], labels[ix], scale=2.0),
        ),
        (
            "nca_ce",
            lambda m: J.nca(logits, labels, scale=2.0, exclude_pos_denominator=False, mask=m),
            lambda ix: J.nca(logits[ix], labels[ix], scale=2.0, exclude_pos_denominator=False),
        ),
        (
            "bce",
            lambda m: J.bce(logits, targets, m),
            lambda ix: J.bce(logits[ix], targets[ix]),
        ),
        (
            "kd",
            lambda m: J.kd(logits, teacher, 2.0, m),
            lambda ix: J.kd(logits[ix], teacher[ix], 2.0),
        ),
        (
            "pod_flat",
            lambda m: J.pod_flat(feats_old, feats_new, m),
            lambda ix: J.pod_flat(feats_old[ix], feats_new[ix]),
        ),
        (
            "pod_spatial",
            lambda m: J.pod_spatial(maps_old, maps_new, m),
            lambda ix: J.pod_spatial([o[ix] for o in maps_old], [n[ix] for n in maps_new]),
        ),
    ]


def test_half_mask_equals_loss_on_other_half():
    batch = 8
    mask = half_mask(batch)
    kept = np.nonzero(mask)[0]
    for name, masked, subset in _all_losses_with_mask(batch, rng_for("mask-half")):
        np.testing.assert_allclose(
            float(masked(mask)), float(subset(kept)), rtol=RTOL, atol=ATOL, err_msg=name
        )


def test_all_ones_mask_equals_no_mask():
    batch = 3
    ones = np.ones(batch, np.float32)
    for name, masked, _ in _all_losses_with_mask(batch, rng_for("mask-ones")):
        np.testing.assert_allclose(
            float(masked(ones)), float(masked(None)), rtol=RTOL, atol=ATOL, err_msg=name
        )


def test_all_zero_mask_gives_zero_and_finite_gradients():
    batch = 3
    zeros = np.zeros(batch, np.float32)
    rng = rng_for("mask-zero")
    for name, masked, _ in _all_losses_with_mask(batch, rng):
        value = masked(zeros)
        assert float(value) == 0.0, name
        assert np.asarray(value).dtype == np.float32, name

    logits = jnp.asarray(f32(rng.normal(size=(batch, 4))))
    labels = np.zeros(batch, np.int32)
    for fn in (
        lambda x: J.cross_entropy(x, labels, zeros),
        lambda x: J.nca(x, labels, scale=1.0, mask=zeros),
        lambda x: J.kd(x, x + 1.0, 2.0, zeros),
        lambda x: J.pod_flat(x + 1.0, x, zeros),
    ):
        grad = np.asarray(jit_grad(fn)(logits))
        assert np.all(grad == 0.0)


# ----------------------------------------------------------------------------------------------
# POD special cases and gradients
# ----------------------------------------------------------------------------------------------


def test_pod_losses_are_zero_when_old_equals_new_with_finite_gradients():
    """First step of a task: the new model equals the old one and POD distances are ~0.

    The L2 distance is not differentiable at 0. Under jit XLA may evaluate the old and new paths
    with different fusions, so the distance is ~1e-8 rather than exactly 0; either way the
    gradient must be finite. At exactly 0 the norm's gradient is 0 (PyTorch's convention).
    """
    rng = rng_for("pod-equal")
    maps, _ = random_maps(rng, 3)
    maps = [jnp.asarray(m) for m in maps]
    assert float(J.pod_spatial(maps, maps)) == pytest.approx(0.0, abs=1e-6)
    grad_fn = jax.jit(jax.grad(lambda old, new: losses.pod_spatial(old, new), argnums=1))
    for new in (maps, [m * (1.0 + 1e-6) + 1e-7 for m in maps]):
        for g in grad_fn(maps, new):
            assert np.all(np.isfinite(np.asarray(g)))

    # The distance at exactly zero: value 0 and gradient 0, not NaN.
    zero = jnp.zeros((3, 7), jnp.float32)
    assert np.all(np.asarray(losses._safe_norm(zero)) == 0.0)
    norm_grad = jax.jit(jax.grad(lambda x: jnp.sum(losses._safe_norm(x))))
    assert np.all(np.asarray(norm_grad(zero)) == 0.0)
    x = f32(rng.normal(size=(3, 7)))
    expected = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(norm_grad(jnp.asarray(x))), expected, rtol=1e-5, atol=ATOL
    )

    feats = jnp.asarray(f32(rng.normal(size=(3, 64))))
    assert float(J.pod_flat(feats, feats)) == pytest.approx(0.0, abs=1e-6)
    grad = np.asarray(jax.jit(jax.grad(losses.pod_flat, argnums=1))(feats, feats))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_pod_handles_all_zero_inputs():
    zero_maps = [jnp.zeros((2, *s), jnp.float32) for s in MAP_SHAPES]
    value = J.pod_spatial(zero_maps, zero_maps)
    assert float(value) == 0.0
    grads = jit_grad(lambda new: J.pod_spatial(zero_maps, new))(zero_maps)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    zero_feats = jnp.zeros((2, 8), jnp.float32)
    # cos = 0 / sqrt(eps^2) = 0 -> loss 1, as in torch's cosine_embedding_loss.
    assert float(J.pod_flat(zero_feats, zero_feats)) == pytest.approx(1.0)
    grad = jit_grad(lambda new: J.pod_flat(zero_feats, new))(zero_feats)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_pod_spatial_is_invariant_to_map_scale():
    """Per-image L2 normalisation makes each map's term invariant to a positive rescaling."""
    rng = rng_for("pod-scale")
    old, new = random_maps(rng, 3)
    scaled = [3.0 * n for n in new]
    np.testing.assert_allclose(
        float(J.pod_spatial(old, new)), float(J.pod_spatial(old, scaled)), rtol=1e-5
    )


def test_old_model_inputs_receive_no_gradient():
    rng = rng_for("stop-grad")
    old, new = random_maps(rng, 2)
    g_old = jit_grad(lambda o: J.pod_spatial(o, new))([jnp.asarray(o) for o in old])
    assert all(np.all(np.asarray(g) == 0.0) for g in g_old)
    feats = jnp.asarray(f32(rng.normal(size=(2, 8))))
    other = jnp.asarray(f32(rng.normal(size=(2, 8))))
    assert np.all(np.asarray(jit_grad(lambda o: J.pod_flat(o, other))(feats)) == 0.0)
    assert np.all(np.asarray(jit_grad(lambda t: J.kd(other, t, 2.0))(feats)) == 0.0)


@pytest.mark.parametrize("batch", [8])
def test_gradients_are_finite(batch):
    rng = rng_for("grads", batch)
    logits = jnp.asarray(f32(rng.normal(size=(batch, 17))))
    labels = rng.integers(0, 17, size=batch)
    teacher = jnp.asarray(f32(rng.normal(size=(batch, 17))))
    targets = jnp.asarray(f32(rng.uniform(size=(batch, 17))))
    old_maps, new_maps = random_maps(rng, batch)
    fns = {
        "cross_entropy": (lambda x: J.cross_entropy(x, labels), logits),
        "nca": (lambda x: J.nca(x, labels, scale=10.0), logits),
        "nca_ce": (
            lambda x: J.nca(x, labels, scale=10.0, exclude_pos_denominator=False),
            logits,
        ),
        "bce": (lambda x: J.bce(x, targets), logits),
        "kd": (lambda x: J.kd(x, teacher, 2.0), logits),
        "pod_flat": (lambda x: J.pod_flat(teacher, x), logits),
        "pod_spatial": (lambda x: J.pod_spatial(old_maps, x), new_maps),
    }
    for name, (fn, arg) in fns.items():
        grads = jax.tree_util.tree_leaves(jit_grad(fn)(arg))
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g))), name
        assert any(np.any(np.asarray(g) != 0.0) for g in grads), name


def test_nca_is_stable_for_large_scale():
    scores = f32([[-4.0, 0.0, -2.0], [0.0, -4.0, -0.5]])
    labels = np.array([0, 2])
    value = J.nca(scores, labels, scale=1e4, margin=0.6)
    assert np.isfinite(float(value))
    assert_close(value, ref_nca(scores, labels, 1e4, 0.6), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# jit, factor, clipping, bfloat16 inputs
# ----------------------------------------------------------------------------------------------


def test_every_loss_works_under_jit():
    rng = rng_for("jit")
    batch, classes = 3, 5
    logits = f32(rng.normal(size=(batch, classes)))
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    teacher = f32(rng.normal(size=(batch, classes)))
    targets = f32(rng.uniform(size=(batch, classes)))
    mask = half_mask(batch)
    feats_old = f32(rng.normal(size=(batch, 16)))
    feats_new = f32(rng.normal(size=(batch, 16)))
    maps_old, maps_new = random_maps(rng, batch)
    scale, temperature = jnp.float32(4.0), jnp.float32(2.0)

    # Each loss, called through jax.jit with array arguments, against its float64 reference.
    cases = {
        "cross_entropy": (
            losses.cross_entropy,
            (logits, labels, mask),
            ref_cross_entropy(logits, labels, mask),
        ),
        "nca": (
            lambda s, y, t, m: losses.nca(s, y, scale=t, margin=0.6, mask=m),
            (logits, labels, scale, mask),
            ref_nca(logits, labels, 4.0, 0.6, True, mask),
        ),
        "nca_ce": (
            lambda s, y, t: losses.nca(s, y, scale=t, exclude_pos_denominator=False),
            (logits, labels, scale),
            ref_nca(logits, labels, 4.0, 0.6, False),
        ),
        "bce": (losses.bce, (logits, targets, mask), ref_bce(logits, targets, mask)),
        "kd": (
            losses.kd,
            (logits, teacher, temperature, mask),
            ref_kd(logits, teacher, 2.0, mask),
        ),
        "pod_flat": (
            losses.pod_flat,
            (feats_old, feats_new, mask),
            ref_pod_flat(feats_old, feats_new, mask),
        ),
        "pod_spatial": (
            losses.pod_spatial,
            (maps_old, maps_new, mask),
            ref_pod_spatial(maps_old, maps_new, mask),
        ),
    }
    for name, (fn, args, expected) in cases.items():
        got = jax.jit(fn)(*args)
        assert np.asarray(got).shape == (), name
        np.testing.assert_allclose(float(got), expected, rtol=RTOL, atol=ATOL, err_msg=name)

    # nca straight through jit with its keyword options static and a traced learned scale.
    nca_jit = jax.jit(losses.nca, static_argnames=("margin", "exclude_pos_denominator"))
    for exclude in (True, False):
        np.testing.assert_allclose(
            float(nca_jit(logits, labels, scale=scale, exclude_pos_denominator=exclude)),
            ref_nca(logits, labels, 4.0, 0.6, exclude),
            rtol=RTOL,
            atol=ATOL,
        )
    clipped = jax.jit(losses.clip_gradients)({"w": jnp.array([-9.0, 9.0, 1.0])})
    np.testing.assert_array_equal(np.asarray(clipped["w"]), f32([-5.0, 5.0, 1.0]))


def test_bfloat16_inputs_give_float32_scalars():
    rng = rng_for("bf16")
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.bfloat16)
    labels = np.array([0, 1, 2, 3])
    maps = [jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.bfloat16)]
    for value in (
        J.cross_entropy(logits, labels),
        J.nca(logits, labels, scale=2.0),
        J.bce(logits, jax.nn.sigmoid(logits)),
        J.kd(logits, logits, 2.0),
        J.pod_flat(logits, logits),
        J.pod_spatial(maps, maps),
    ):
        assert value.dtype == jnp.float32
        assert np.isfinite(float(value))


def test_distillation_factor():
    assert losses.distillation_factor(3.0, 60, 10) == pytest.approx(3.0 * math.sqrt(6.0))
    assert losses.distillation_factor(1.0, 51, 1) == pytest.approx(math.sqrt(51.0))
    assert losses.distillation_factor(8.0, 10, 10) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        losses.distillation_factor(1.0, 10, 0)
    with pytest.raises(ValueError):
        losses.distillation_factor(1.0, 5, 10)


def test_clip_gradients_clamps_elementwise():
    grads = {
        "dense": {"kernel": jnp.array([[-7.0, 0.5], [5.0, 12.0]]), "bias": jnp.array([-5.0, 4.9])},
        "scale": jnp.float32(-100.0),
        "list": [jnp.array([1e-3, -1e-3])],
    }
    clipped = losses.clip_gradients(grads)
    assert jax.tree_util.tree_structure(clipped) == jax.tree_util.tree_structure(grads)
    np.testing.assert_array_equal(np.asarray(clipped["dense"]["kernel"]), [[-5.0, 0.5], [5.0, 5.0]])
    np.testing.assert_array_equal(np.asarray(clipped["dense"]["bias"]), f32([-5.0, 4.9]))
    assert float(clipped["scale"]) == -5.0
    np.testing.assert_array_equal(np.asarray(clipped["list"][0]), f32([1e-3, -1e-3]))
    small = losses.clip_gradients({"a": jnp.array([-3.0, 0.2, 3.0])}, limit=1.0)
    np.testing.assert_array_equal(np.asarray(small["a"]), f32([-1.0, 0.2, 1.0]))


def test_pod_spatial_rejects_bad_inputs():
    a = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError):
        losses.pod_spatial([a], [])
    with pytest.raises(ValueError):
        losses.pod_spatial([], [])
    with pytest.raises(ValueError):
        losses.pod_spatial([a], [jnp.zeros((2, 4, 4, 2))])
