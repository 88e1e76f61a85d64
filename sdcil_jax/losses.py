"""Loss functions for class-incremental learning (PODNet, iCaRL, LwF-style distillation).

Every loss is a pure function of ``jnp`` arrays that returns a float32 scalar, can be wrapped in
``jax.jit`` and has no Python control flow on array values. Inputs of any float dtype (for example
bfloat16 activations) are computed in float32.

Conventions used throughout:

* ``B`` is the batch size, ``C`` the number of classes, ``D`` a feature dimension and maps are NHWC
  ``(B, H, W, K)`` with ``K`` channels.
* ``live`` is an optional ``(C,)`` bool array of the classes that exist so far (a head allocated
  for every class of the protocol, :mod:`sdcil_jax.models.heads`): the other columns are excluded
  from every max and softmax sum (their logits become ``-inf`` after scaling), so the loss and its
  gradient equal those of a head with only the live columns.
* ``mask`` is an optional ``(B,)`` float array of per-sample weights (normally 0/1, e.g. to ignore
  padding rows of a fixed-size batch). Every batch reduction is the *masked mean*::

      masked_mean(l, mask) = sum_i mask_i * l_i / max(sum_i mask_i, 1)

  so an all-zero mask gives 0 (never NaN), and ``mask=None`` is the plain mean over the batch.
* Arguments that come from the frozen old model (teacher) are wrapped in ``jax.lax.stop_gradient``
  by the loss itself: no gradient ever flows into the old model through these functions.

Behaviour of the official PODNet code (``arthurdouillard/incremental_learning.pytorch``) that is
reproduced here, and deliberately so:

* ``inclearn/lib/losses/base.py::nca``: the margin is subtracted from *every* class score, not only
  the target's, and the row maximum used for stability is *not* detached (gradient flows through
  it). Because the target entry is then zeroed (not removed) in the denominator, the loss is not
  invariant to that shift, so both details change the value and the gradient. A consequence worth
  knowing: with the margin subtracted from every class and the row max subtracted afterwards, the
  margin cancels exactly, so in the official code (and here) the margin has no effect on the NCA
  loss at all.
* ``inclearn/lib/losses/distillation.py::pod`` with ``collapse_channels="spatial"``: squared maps,
  sum over width and sum over height, concatenated, L2-normalised per image (``F.normalize``,
  eps 1e-12), per-image L2 distance, mean over the batch, then mean over the maps.
* ``inclearn/lib/losses/base.py::embeddings_similarity``: ``F.cosine_embedding_loss`` with target
  1, whose cosine is ``<x, y> / sqrt((|x|^2 + 1e-12) (|y|^2 + 1e-12))``.
* ``inclearn/models/podnet.py``: factors ``lambda * sqrt(n / k)`` and gradients clamped element-wise
  to ``[-5, 5]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Epsilons of the PyTorch functions the official code calls.
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize default eps (clamp of the norm).
_COSINE_EPS = 1e-12  # EPSILON added to the squared magnitudes in torch's cosine_embedding_loss.


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _masked_mean(per_sample: Array, mask: Array | None) -> Array:
    """Masked mean over the batch: ``sum(mask * l) / max(sum(mask), 1)``; plain mean if no mask.

    Args:
      per_sample: ``(B,)`` float32 per-sample losses.
      mask: ``(B,)`` weights or ``None``.

    Returns:
      float32 scalar.
    """
    per_sample = per_sample.astype(jnp.float32)
    if mask is None:
        return jnp.mean(per_sample)
    mask = jnp.asarray(mask, jnp.float32)
    total = jnp.sum(mask * per_sample)
    return total / jnp.maximum(jnp.sum(mask), 1.0)


def _safe_norm(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """Euclidean norm ``sqrt(sum(x^2))`` whose gradient at ``x = 0`` is 0 instead of NaN.

    This matches PyTorch's ``norm`` backward, which returns 0 where the norm is 0. It matters for
    POD, whose distance is exactly 0 (and must have a finite gradient) on the first step of every
    task, when the new model still equals the old one.
    """
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _l2_normalize(x: Array) -> Array:
    """``x / max(||x||_2, 1e-12)`` along the last axis (``F.normalize(x, p=2, dim=1)`` for 2-D)."""
    return x / jnp.maximum(_safe_norm(x, axis=-1, keepdims=True), _NORMALIZE_EPS)


def _target_values(values: Array, labels: Array) -> Array:
    """``values[i, labels[i]]`` for each row: ``(B, C), (B,) -> (B,)``."""
    labels = jnp.asarray(labels, jnp.int32)
    return jnp.take_along_axis(values, labels[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------------------------
# Classification losses
# ----------------------------------------------------------------------------------------------


def _live_only(z: Array, live: Array | None) -> Array:
    """``z`` with the columns outside ``live`` (``(C,)`` bool) set to ``-inf`` (no gradient)."""
    return z if live is None else jnp.where(live[None, :], z, -jnp.inf)


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None,
                  live: Array | None = None) -> Array:
    """Softmax cross-entropy with integer labels.

    Formula, per sample ``i``::

        l_i = -log softmax(logits_i)[y_i] = logsumexp_c(logits_ic) - logits_{i, y_i}

    reduced with the masked mean over the batch.

    Args:
      logits: ``(B, C)`` float.
      labels: ``(B,)`` int, values in ``[0, C)``.
      mask: optional ``(B,)`` float sample weights.
      live: optional ``(C,)`` bool, the classes the softmax runs over (the others excluded).

    Returns:
      float32 scalar.
    """
    logits = _live_only(jnp.asarray(logits, jnp.float32), live)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    per_sample = -_target_values(log_probs, labels)
    return _masked_mean(per_sample, mask)


def nca(
    scores: Array,
    labels: Array,
    *,
    scale: float | Array,
    margin: float = 0.6,
    exclude_pos_denominator: bool = True,
    mask: Array | None = None,
    live: Array | None = None,
) -> Array:
    """PODNet's NCA classification loss, exactly as the official ``losses.nca`` computes it.

    With ``s`` the raw (unscaled) class scores and ``y`` the labels, per sample ``i``::

        z_ic  = scale * (s_ic - margin)                    # margin on EVERY class
        z_ic <- z_ic - max_c z_ic                          # row max, NOT detached
        z'_ic = 0 if c == y_i else z_ic                    # target entry zeroed, not removed
        l_i   = -( z_{i,y_i} - log sum_c exp(z'_ic) )      # exp(0) = 1 stays in the sum

    reduced with the masked mean over the batch. Unlike the textbook NCA (target removed from the
    denominator), the zeroed target still contributes ``exp(0) = 1`` to the sum, so
    ``l_i = -z_{i,y_i} + log(1 + sum_{c != y_i} exp(z_ic)) >= -z_{i,y_i} >= 0``; it equals the
    softmax cross-entropy when the target holds the row maximum, and is larger otherwise. Since
    the margin is subtracted from every class and the row max afterwards, the margin cancels and
    has no effect on the value (this is the official behaviour; it is kept for fidelity).

    With ``exclude_pos_denominator=False`` the loss is the plain softmax cross-entropy of ``z``
    (official fallback ``F.cross_entropy(z, y)``), also margin-independent.

    Args:
      scores: ``(B, C)`` float raw class scores (for the LSC classifier, ``2 cos - 2`` averages).
      labels: ``(B,)`` int.
      scale: scalar, Python float or (learned) array; multiplies the scores.
      margin: float subtracted from every class score before scaling.
      exclude_pos_denominator: static bool; ``True`` for the NCA form above, ``False`` for CE.
      mask: optional ``(B,)`` float sample weights.
      live: optional ``(C,)`` bool; classes outside it are excluded from the row max and the
        denominator (``z = -inf`` after scaling), as if the head had only the live classes.

    Returns:
      float32 scalar.
    """
    scores = jnp.asarray(scores, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    z = _live_only(scale * (scores - margin), live)
    if not exclude_pos_denominator:
        return cross_entropy(z, labels, mask)

    # The official code subtracts `similarities.max(1)[0]` without detaching it.
    z = z - jnp.max(z, axis=1, keepdims=True)
    onehot = jax.nn.one_hot(labels, z.shape[1], dtype=jnp.bool_)
    numerator = _target_values(z, labels)
    denominator = jnp.where(onehot, 0.0, z)
    per_sample = -(numerator - jax.nn.logsumexp(denominator, axis=1))
    return _masked_mean(per_sample, mask)


def bce(logits: Array, targets: Array, mask: Array | None = None) -> Array:
    """Sigmoid binary cross-entropy (iCaRL), mean over classes then masked mean over the batch.

    Per sample ``i`` with ``sigma`` the logistic function::

        l_i = (1 / C) * sum_c -[ t_ic log sigma(x_ic) + (1 - t_ic) log(1 - sigma(x_ic)) ]

    computed in the stable form ``max(x, 0) - x t + log(1 + exp(-|x|))``.

    Args:
      logits: ``(B, C)`` float.
      targets: ``(B, C)`` float in ``[0, 1]`` (one-hot labels and/or old-model probabilities).
      mask: optional ``(B,)`` float sample weights.

    Returns:
      float32 scalar.
    """
    x = jnp.asarray(logits, jnp.float32)
    t = jnp.asarray(targets, jnp.float32)
    elementwise = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return _masked_mean(jnp.mean(elementwise, axis=1), mask)


# ----------------------------------------------------------------------------------------------
# Distillation losses
# ----------------------------------------------------------------------------------------------


def kd(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float | Array,
    mask: Array | None = None,
) -> Array:
    """Temperature-scaled knowledge distillation (Hinton et al.), ``batchmean`` KL times ``T^2``.

    With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``, per sample ``i``::

        l_i = T^2 * KL(p_i || q_i) = T^2 * sum_c p_ic (log p_ic - log q_ic)

    reduced with the masked mean over the batch (the sum over classes is not divided by ``C``).
    This equals PyTorch's ``T**2 * F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean")``
    and differs from the soft-target cross-entropy only by the teacher entropy, a constant.
    The teacher logits are treated as constants (``stop_gradient``).

    Args:
      student_logits: ``(B, C)`` float.
      teacher_logits: ``(B, C)`` float.
      temperature: scalar ``T > 0``.
      mask: optional ``(B,)`` float sample weights.

    Returns:
      float32 scalar.
    """
    t = jnp.asarray(temperature, jnp.float32)
    student = jnp.asarray(student_logits, jnp.float32)
    teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    log_q = jax.nn.log_softmax(student / t, axis=-1)
    log_p = jax.nn.log_softmax(teacher / t, axis=-1)
    per_sample = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * t * t
    return _masked_mean(per_sample, mask)


def _pod_spatial_embedding(x: Array) -> Array:
    """POD-spatial embedding of squared NHWC maps: ``(B, H, W, K) -> (B, K*H + K*W)``.

    ``x`` must already be squared. The width-pooled part ``sum_w x[b, h, w, k]`` is laid out as
    ``(B, K, H)`` and the height-pooled part ``sum_h x[b, h, w, k]`` as ``(B, K, W)`` before
    flattening, which is exactly the element order of the official NCHW code
    (``a.sum(dim=3).view(b, -1)`` then ``a.sum(dim=2).view(b, -1)``, concatenated in that order).
    The order does not change the norms or distances; it only keeps the embedding identical.
    """
    batch = x.shape[0]
    width_pooled = jnp.transpose(jnp.sum(x, axis=2), (0, 2, 1)).reshape(batch, -1)  # (B, K*H)
    height_pooled = jnp.transpose(jnp.sum(x, axis=1), (0, 2, 1)).reshape(batch, -1)  # (B, K*W)
    return jnp.concatenate([width_pooled, height_pooled], axis=1)


def pod_spatial(
    old_maps: Sequence[Array],
    new_maps: Sequence[Array],
    mask: Array | None = None,
) -> Array:
    """POD-spatial distillation between lists of NHWC feature maps of the old and new models.

    For each pair ``(a, b)`` of maps of shape ``(B, H, W, K)`` (the same shape pairwise)::

        a2 = a ** 2, b2 = b ** 2                                  # element-wise
        e(x)_n = concat( vec_{k,h} sum_w x[n,h,w,k],              # (K*H,) width-pooled
                         vec_{k,w} sum_h x[n,h,w,k] )             # (K*W,) height-pooled
        u_n = e(a2)_n / max(||e(a2)_n||_2, 1e-12)                 # per-image L2 normalisation
        v_n = e(b2)_n / max(||e(b2)_n||_2, 1e-12)
        d_n = ||u_n - v_n||_2
        L_map = masked_mean_n(d_n)

    and the result is the mean of ``L_map`` over the maps. The flatten order (channel-major, as in
    the official NCHW code) is documented in :func:`_pod_spatial_embedding`. The distance uses a
    norm whose gradient is 0 (not NaN) when ``old == new``. ``old_maps`` are treated as constants.

    Args:
      old_maps: sequence of ``(B, H_m, W_m, K_m)`` arrays from the old (frozen) model.
      new_maps: sequence of arrays of the same shapes from the model being trained.
      mask: optional ``(B,)`` float sample weights.

    Returns:
      float32 scalar.
    """
    if len(old_maps) != len(new_maps):
        raise ValueError(f"pod_spatial got {len(old_maps)} old maps and {len(new_maps)} new maps.")
    if len(old_maps) == 0:
        raise ValueError("pod_spatial needs at least one pair of feature maps.")
    total = jnp.zeros((), jnp.float32)
    for old, new in zip(old_maps, new_maps, strict=True):
        if old.shape != new.shape or old.ndim != 4:
            raise ValueError(
                f"pod_spatial needs NHWC maps of equal shapes, got {old.shape} and {new.shape}."
            )
        a = jax.lax.stop_gradient(jnp.asarray(old, jnp.float32))
        b = jnp.asarray(new, jnp.float32)
        u = _l2_normalize(_pod_spatial_embedding(a * a))
        v = _l2_normalize(_pod_spatial_embedding(b * b))
        total = total + _masked_mean(_safe_norm(u - v, axis=-1), mask)
    return total / len(old_maps)


def pod_flat(old_feats: Array, new_feats: Array, mask: Array | None = None) -> Array:
    """POD-flat: cosine-embedding loss with target 1 between old and new flat features.

    Per sample ``i`` (as in PyTorch's ``cosine_embedding_loss``)::

        cos_i = <x_i, y_i> / sqrt((||x_i||^2 + 1e-12) * (||y_i||^2 + 1e-12))
        l_i   = 1 - cos_i

    with ``x = old_feats`` (constant, ``stop_gradient``) and ``y = new_feats``, reduced with the
    masked mean over the batch.

    Args:
      old_feats: ``(B, D)`` float, old model's pooled features.
      new_feats: ``(B, D)`` float, new model's pooled features.
      mask: optional ``(B,)`` float sample weights.

    Returns:
      float32 scalar.
    """
    x = jax.lax.stop_gradient(jnp.asarray(old_feats, jnp.float32))
    y = jnp.asarray(new_feats, jnp.float32)
    dot = jnp.sum(x * y, axis=-1)
    mag_x = jnp.sum(x * x, axis=-1) + _COSINE_EPS
    mag_y = jnp.sum(y * y, axis=-1) + _COSINE_EPS
    cos = dot / jnp.sqrt(mag_x * mag_y)
    return _masked_mean(1.0 - cos, mask)


# ----------------------------------------------------------------------------------------------
# Factors and gradient processing
# ----------------------------------------------------------------------------------------------


def distillation_factor(base_lambda: float, seen_classes: int, new_classes: int) -> float:
    """PODNet's adaptive distillation factor ``lambda * sqrt(n / k)``.

    Args:
      base_lambda: the base factor (``lambda_flat`` or ``lambda_spatial``).
      seen_classes: ``n``, the number of classes seen so far, including the task's new classes.
      new_classes: ``k``, the number of new classes in the current task (``> 0``, ``<= n``).

    Returns:
      Python float.
    """
    if new_classes <= 0:
        raise ValueError(f"distillation_factor needs new_classes > 0, got {new_classes}.")
    if seen_classes < new_classes:
        raise ValueError(
            f"seen_classes ({seen_classes}) must include the new classes ({new_classes})."
        )
    return float(base_lambda) * math.sqrt(seen_classes / new_classes)


def clip_gradients(grads: Any, limit: float = 5.0) -> Any:
    """Clamp every gradient element to ``[-limit, limit]`` (PODNet's per-parameter hook).

    ``g <- min(max(g, -limit), limit)`` applied leaf-wise over any pytree; the structure, shapes
    and dtypes are unchanged. This is element-wise clamping, not global-norm clipping.

    Args:
      grads: pytree of arrays.
      limit: positive bound.

    Returns:
      pytree of the same structure.
    """
    return jax.tree_util.tree_map(lambda g: jnp.clip(g, -limit, limit), grads)


__all__ = [
    "bce",
    "clip_gradients",
    "cross_entropy",
    "distillation_factor",
    "kd",
    "nca",
    "pod_flat",
    "pod_spatial",
]
