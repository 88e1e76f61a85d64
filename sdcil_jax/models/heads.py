"""Classifier heads as plain pytrees of arrays, allocated for every class of the protocol.

Two heads, each a set of pure functions (init / pad / write / apply / trainable mask):

* Linear: ``{"w": (D, C), "b": (C,)}``, ``logits = feats @ w + b``.
* LSC, PODNet's local similarity classifier (``CosineClassifier`` with ``proxy_per_class=K``,
  ``distance="neg_stable_cosine_distance"``, ``merging="softmax"`` in the official
  ``inclearn/lib/network/classifiers.py``): ``{"proxies": (C*K, D), "scale": ()}``; class ``c``
  owns proxy rows ``c*K .. c*K + K - 1``. The learned ``scale`` (PODNet's ``learned_scaling``
  post-processor, initial value 1.0) is not applied by :func:`lsc_apply`; the loss multiplies the
  raw scores by :func:`lsc_scale`.

A run allocates the head for all its classes in the first task (:func:`linear_pad`,
:func:`lsc_pad`) and writes each task's new classes into their rows in place (:func:`linear_write`,
:func:`lsc_write`), so the head's shape, and with it every compiled program, never changes. Rows of
classes not seen yet are *dead*: the losses mask them out and the trainable mask freezes them.

Frozen rows (old classes, dead classes) are set with a mask pytree (1 = trainable, 0 = frozen, same
structure as the params, broadcastable leaves) applied to the final optimizer *updates*
(:func:`mask_updates`), not only the gradients, so momentum and weight decay do not move frozen rows
either (PODNet gives the old proxies learning rate 0 via ``groupwise_factors.old_weights: 0``). The
masks take their class bounds as traced integers.
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


def linear_pad(params: Params, n_total: int) -> Params:
    """``params`` (C classes) with ``n_total - C`` dead columns of zeros appended (numpy).

    Returns:
      ``{"w": (D, n_total), "b": (n_total,)}`` float32 numpy arrays.
    """
    w, b = np.asarray(params["w"], np.float32), np.asarray(params["b"], np.float32)
    extra = n_total - w.shape[1]
    return {"w": np.pad(w, ((0, 0), (0, extra))), "b": np.pad(b, (0, extra))}


def linear_write(params: Params, start: int, new: Params) -> Params:
    """A copy of ``params`` with classes ``start .. start + n - 1`` replaced by ``new`` (numpy).

    Args:
      params: ``{"w": (D, C), "b": (C,)}`` allocated for every class.
      start: first class written.
      new: ``{"w": (D, n), "b": (n,)}`` (e.g. :func:`linear_init` of the new classes).
    """
    w, b = np.array(params["w"], np.float32), np.array(params["b"], np.float32)
    n = np.shape(new["b"])[0]
    w[:, start:start + n] = np.asarray(new["w"])
    b[start:start + n] = np.asarray(new["b"])
    return {"w": w, "b": b}


def linear_apply(params: Params, feats: Array) -> Array:
    """Logits ``feats @ w + b``: feats (B, D) -> (B, C)."""
    return feats @ params["w"] + params["b"]


def trainable_mask_linear(n_total: int, lo: Array, hi: Array) -> Params:
    """Mask training classes ``lo <= c < hi`` only: ``{"w": (1, C), "b": (C,)}``, 0 = frozen.

    ``lo``/``hi`` may be traced ints (e.g. ``0, num_seen`` for a plain cross-entropy task).
    """
    c = jnp.arange(n_total)
    m = ((c >= lo) & (c < hi)).astype(jnp.float32)
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


def lsc_pad(params: Params, n_total: int, proxies_per_class: int) -> Params:
    """``params`` with dead proxy rows appended up to ``n_total`` classes (numpy).

    The dead rows hold ``1/sqrt(D)`` (not zeros: the gradient of a zero row's L2 normalisation is
    NaN, and a NaN times a frozen mask is still NaN).

    Returns:
      ``{"proxies": (n_total * K, D), "scale": ()}`` float32 numpy arrays.
    """
    proxies = np.asarray(params["proxies"], np.float32)
    dim = proxies.shape[1]
    fill = np.full((n_total * proxies_per_class - proxies.shape[0], dim), 1.0 / np.sqrt(dim),
                   np.float32)
    return {"proxies": np.concatenate([proxies, fill]),
            "scale": np.asarray(params["scale"], np.float32)}


def lsc_write(params: Params, start_row: int, new_proxies: Array) -> Params:
    """A copy of ``params`` with proxy rows ``start_row ..`` replaced by ``new_proxies`` (n, D);
    the other rows and the scale unchanged (numpy)."""
    proxies = np.array(params["proxies"], np.float32)
    new = np.asarray(new_proxies, np.float32)
    proxies[start_row:start_row + len(new)] = new
    return {"proxies": proxies, "scale": np.asarray(params["scale"], np.float32)}


def lsc_live_norm(params: Params, n_classes: int, proxies_per_class: int) -> float:
    """Mean L2 norm of the proxies of the first ``n_classes`` classes (the live rows)."""
    live = np.asarray(params["proxies"])[:n_classes * proxies_per_class]
    return float(np.mean(np.linalg.norm(live, axis=1)))


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


def trainable_mask_lsc(n_total: int, lo: Array, hi: Array, proxies_per_class: int,
                       scale: float = 1.0) -> Params:
    """Mask training the proxies of classes ``lo <= c < hi`` only: ``{"proxies": (C*K, 1),
    "scale": ()}`` (0 = frozen); ``scale`` is the learned scale's entry. ``lo``/``hi`` may be
    traced ints (PODNet's training: ``num_old, num_seen``; its finetuning: ``0, num_seen``)."""
    rows = jnp.arange(n_total * proxies_per_class)
    m = ((rows >= lo * proxies_per_class) & (rows < hi * proxies_per_class)).astype(jnp.float32)
    return {"proxies": m[:, None], "scale": jnp.asarray(scale, jnp.float32)}


def mask_updates(updates: Params, mask: Params) -> Params:
    """``updates`` where ``mask`` is nonzero, else 0, leaf by leaf (broadcasting), e.g. on
    ``optimizer.update``'s output (a select, so a non-finite update of a frozen row is dropped)."""
    return jax.tree.map(lambda u, m: jnp.where(m != 0, u, jnp.zeros((), u.dtype)), updates, mask)


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
