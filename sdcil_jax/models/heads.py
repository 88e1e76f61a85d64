"""Classifier heads as plain pytrees of arrays, so they can grow between tasks.

Two heads, each a set of pure functions (init / grow / apply / frozen mask):

* Linear: ``{"w": (D, C), "b": (C,)}``, ``logits = feats @ w + b``.
* LSC, PODNet's local similarity classifier (``CosineClassifier`` with ``proxy_per_class=K``,
  ``distance="neg_stable_cosine_distance"``, ``merging="softmax"`` in the official
  ``inclearn/lib/network/classifiers.py``): ``{"proxies": (C*K, D), "scale": ()}``; class ``c``
  owns proxy rows ``c*K .. c*K + K - 1``. The learned ``scale`` (PODNet's ``learned_scaling``
  post-processor, initial value 1.0) is not applied by :func:`lsc_apply`; the loss multiplies the
  raw scores by :func:`lsc_scale`.

Old classes are frozen with a mask pytree (1 = trainable, 0 = frozen, same structure as the
params, broadcastable leaves). Multiply the final optimizer *updates* by it (:func:`mask_updates`),
not only the gradients, so momentum and weight decay do not move frozen rows either (PODNet gives
the old proxies learning rate 0 via ``groupwise_factors.old_weights: 0``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Params = dict[str, Any]

_EPS = 1e-12  # torch.nn.functional.normalize's eps


def _l2n(x: Array, axis: int = -1) -> Array:
    """L2-normalise along ``axis`` like ``F.normalize``: ``x / max(||x||, eps)``."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _EPS)


def _normal(key: Array, n_rows: int, dim: int) -> Array:
    """(n_rows, dim) N(0, 1/dim): torch ``kaiming_normal_(nonlinearity='linear')`` on that shape."""
    return jax.random.normal(key, (n_rows, dim), jnp.float32) / np.sqrt(dim)


# ----------------------------------------------------------------------------- linear


def linear_init(key: Array, feat_dim: int, n_classes: int) -> Params:
    """Linear head for ``n_classes`` classes.

    ``w`` ~ N(0, 1/D) (untruncated LeCun normal = torch kaiming_normal 'linear', as PODNet's
    ``Classifier.add_classes``), ``b`` = 0.

    Returns:
      ``{"w": (D, C), "b": (C,)}`` float32.
    """
    return {"w": _normal(key, n_classes, feat_dim).T, "b": jnp.zeros((n_classes,), jnp.float32)}


def linear_grow(params: Params, key: Array, n_new: int) -> Params:
    """Appends ``n_new`` freshly initialised classes; the old columns are unchanged.

    Returns:
      ``{"w": (D, C + n_new), "b": (C + n_new,)}``.
    """
    new = linear_init(key, params["w"].shape[0], n_new)
    return {
        "w": jnp.concatenate([params["w"], new["w"]], axis=1),
        "b": jnp.concatenate([params["b"], new["b"]], axis=0),
    }


def linear_apply(params: Params, feats: Array) -> Array:
    """Logits ``feats @ w + b``: feats (B, D) -> (B, C)."""
    return feats @ params["w"] + params["b"]


def frozen_mask_linear(n_old_classes: int, n_total: int) -> Params:
    """Mask freezing the first ``n_old_classes``: ``{"w": (1, C), "b": (C,)}``, 0 = frozen."""
    m = (jnp.arange(n_total) >= n_old_classes).astype(jnp.float32)
    return {"w": m[None, :], "b": m}


# ----------------------------------------------------------------------------- LSC


def lsc_init(key: Array, feat_dim: int, n_classes: int, proxies_per_class: int) -> Params:
    """LSC with random proxies ~ N(0, 1/D) (PODNet's ``add_classes``, used for the first task).

    Returns:
      ``{"proxies": (n_classes * K, D), "scale": ()}`` float32, scale = 1.0.
    """
    return {
        "proxies": _normal(key, n_classes * proxies_per_class, feat_dim),
        "scale": jnp.asarray(1.0, jnp.float32),
    }


def lsc_grow(params: Params, new_proxies: Array) -> Params:
    """Appends ``new_proxies`` (n_new * K, D) after the old rows; old rows and scale unchanged."""
    return {
        "proxies": jnp.concatenate(
            [params["proxies"], jnp.asarray(new_proxies, params["proxies"].dtype)], axis=0
        ),
        "scale": params["scale"],
    }


def lsc_scale(params: Params) -> Array:
    """The learned scale factor (shape ()), multiplied into the scores by the loss."""
    return params["scale"]


def lsc_similarities(params: Params, feats: Array) -> Array:
    """Per-proxy similarity ``-||f/|f| - p/|p|||^2`` (= 2 cos - 2, in [-4, 0]).

    Computed like PODNet's ``stable_cosine_distance``: ``|f|^2 + |p|^2 - 2 f.p`` clamped at 0.

    Args:
      params: LSC params, proxies (C*K, D).
      feats: (B, D).

    Returns:
      (B, C*K) float32.
    """
    f = _l2n(jnp.asarray(feats, jnp.float32))
    p = _l2n(jnp.asarray(params["proxies"], jnp.float32))
    sq = jnp.sum(f * f, -1, keepdims=True) + jnp.sum(p * p, -1)[None, :] - 2.0 * (f @ p.T)
    return -jnp.maximum(sq, 0.0)


def lsc_apply(params: Params, feats: Array, proxies_per_class: int) -> Array:
    """Raw LSC class scores (unscaled).

    ``s_c = sum_k softmax_k(sim_{c,k}) * sim_{c,k}`` with ``sim`` from :func:`lsc_similarities`
    (PODNet's ``merging="softmax"``, gamma = 1).

    Args:
      params: LSC params, proxies (C*K, D).
      feats: (B, D) features (any norm; normalised here).
      proxies_per_class: K.

    Returns:
      (B, C) float32 scores in [-4, 0].
    """
    sim = lsc_similarities(params, feats)
    sim_BxCxK = sim.reshape(sim.shape[0], -1, proxies_per_class)
    att = jax.nn.softmax(sim_BxCxK, axis=-1)
    return jnp.sum(att * sim_BxCxK, axis=-1)


def frozen_mask_lsc(n_old_classes: int, n_total: int, proxies_per_class: int) -> Params:
    """Mask freezing the old classes' proxies: ``{"proxies": (n_total*K, 1), "scale": ()}``.

    Rows of the first ``n_old_classes`` classes are 0, the new ones 1; the scale stays trainable.
    """
    rows = jnp.arange(n_total * proxies_per_class)
    m = (rows >= n_old_classes * proxies_per_class).astype(jnp.float32)[:, None]
    return {"proxies": m, "scale": jnp.asarray(1.0, jnp.float32)}


def mask_updates(updates: Params, mask: Params) -> Params:
    """``updates * mask`` leaf by leaf (broadcasting), e.g. on ``optimizer.update``'s output."""
    return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask)


def kmeans_imprint(
    features_by_class: Sequence[Array], proxies_per_class: int, seed: int, n_init: int = 10,
    target_norm: float = 1.0,
) -> np.ndarray:
    """Imprinted proxies for new classes, as PODNet's ``add_imprinted_classes`` (kmeans variant).

    For each class, the features are L2-normalised and clustered with k = K (sklearn ``KMeans``,
    ``random_state=seed``); the centroids (not re-normalised) are multiplied by ``target_norm``, the
    mean L2 norm of the classifier's existing proxies. A class with fewer than K samples gets its
    normalised samples repeated cyclically (times ``target_norm``) as proxies.

    Args:
      features_by_class: per new class, an (N_c, D) array of features from the current model.
      proxies_per_class: K.
      seed: k-means random state.
      n_init: k-means restarts.
      target_norm: scale of the centroids (mean norm of the existing proxies).

    Returns:
      (n_classes * K, D) float32 numpy array, class c in rows ``c*K .. c*K + K - 1``.

    Raises:
      ValueError: a class without features (the task loop checks this earlier, with a message).
    """
    from sklearn.cluster import KMeans  # imported here: sklearn takes seconds to import

    k = proxies_per_class
    out = []
    for feats in features_by_class:
        x = np.asarray(feats, np.float64)
        if x.shape[0] == 0:
            raise ValueError("kmeans_imprint got a class with no features.")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
        if x.shape[0] < k:
            centers = x[np.arange(k) % x.shape[0]]
        else:
            with warnings.catch_warnings():
                # Fewer distinct points than K: duplicated centroids are acceptable.
                warnings.simplefilter("ignore")
                km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
            centers = km.cluster_centers_
        out.append((centers * float(target_norm)).astype(np.float32))
    return np.concatenate(out, axis=0)
