"""Pure sampling functions: initial latents, the guided denoising loop, decoding to uint8 images.

One image is fully determined by (model, dtype, scheduler table, guidance, its text embedding, seed,
class id, image index) and the micro-batch it is computed in (see :mod:`sdcil_jax.generation.engine`):

- initial latent ``z_T = normal(fold_in(fold_in(PRNGKey(seed), class_id), index))``, float32;
- classifier-free guidance, both halves in one UNet call on 2B latents:
  ``out = u + g (c - u)`` with ``[u; c] = unet([z; z], t, [uncond; cond])``;
- the scheduler as a coefficient table (:mod:`sdcil_jax.generation.schedulers`) in ``lax.fori_loop``;
- VAE decode, optional luminance (``0.299 R + 0.587 G + 0.114 B``), antialiased Lanczos-3 resize to
  the dataset's size, ``round(255 clip(x, 0, 1))`` as uint8: all on the device, in the same program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdcil_jax.errors import GenerationError
from sdcil_jax.generation.schedulers import SolverTable

LUMA = (0.299, 0.587, 0.114)


def latents_for(base_key: jax.Array, class_ids_B: jax.Array, indices_B: jax.Array,
                shape: Sequence[int]) -> jax.Array:
    """Initial latents (B, *shape) float32 of images ``indices_B`` of classes ``class_ids_B``.

    ``base_key = PRNGKey(seed)``; image (c, i) draws ``normal(fold_in(fold_in(base_key, c), i))``.
    Traceable; equal to :func:`initial_latents` on the host.
    """
    def one(c, i):
        key = jax.random.fold_in(jax.random.fold_in(base_key, c), i)
        return jax.random.normal(key, tuple(shape), dtype=jnp.float32)

    return jax.vmap(one)(class_ids_B.astype(jnp.uint32), indices_B.astype(jnp.uint32))


@functools.partial(jax.jit, static_argnums=(3,))
def _initial_latents(base, class_ids, indices, shape):
    return latents_for(base, class_ids, indices, shape)


def initial_latents(seed: int, class_id: int, indices: Sequence[int], shape: tuple) -> np.ndarray:
    """Initial latents (len(indices), *shape) of images ``indices`` of ``class_id`` (host numpy)."""
    idx = np.asarray(indices, dtype=np.uint32)
    cls = np.full(idx.shape, int(class_id), np.uint32)
    return np.asarray(_initial_latents(jax.random.PRNGKey(int(seed)), cls, idx, tuple(shape)))


def denoise(predict: Callable[[jax.Array, jax.Array], jax.Array], table: SolverTable,
            z_BxCxhxw: jax.Array) -> jax.Array:
    """Run the sampler of ``table`` from ``z_T`` with ``predict(x, t) -> out`` (float32).

    Loop body (``lax.fori_loop`` over the table's S rows)::

        out = predict(x, t_i); d = p_i x + q_i out; hist = [d, hist[:-1]]
        base = base if keep_base_i else x; x = a_i base + sum_j c_ij hist_j
    """
    ts, keep = jnp.asarray(table.timesteps), jnp.asarray(table.keep_base)
    p, q, a, c = (jnp.asarray(v) for v in (table.p, table.q, table.a, table.c))
    x = z_BxCxhxw.astype(jnp.float32)
    hist = jnp.zeros((table.order,) + x.shape, jnp.float32)

    def body(i, state):
        x, base, hist = state
        out = predict(x, ts[i]).astype(jnp.float32)
        d = p[i] * x + q[i] * out
        hist = jnp.concatenate([d[None], hist[:-1]], axis=0)
        base = jnp.where(keep[i], base, x)
        x = a[i] * base + jnp.tensordot(c[i], hist, axes=1)
        return x, base, hist

    x, _, _ = jax.lax.fori_loop(0, table.num_evaluations, body, (x, x, hist))
    return x


def guided(predict_raw: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
           cond_BxLxD: jax.Array, uncond_LxD: jax.Array, guidance: float) -> Callable:
    """``predict(x, t) = u + g (c - u)`` with u, c from ONE model call on ``[x; x]``."""
    batch = cond_BxLxD.shape[0]
    uncond = jnp.broadcast_to(uncond_LxD.astype(cond_BxLxD.dtype), cond_BxLxD.shape)
    context = jnp.concatenate([uncond, cond_BxLxD], axis=0)
    scale = jnp.float32(guidance)

    def predict(x, t):
        out = predict_raw(jnp.concatenate([x, x], axis=0), t, context).astype(jnp.float32)
        u, c = out[:batch], out[batch:]
        return u + scale * (c - u)

    return predict


def postprocess(images_BxHxWx3: jax.Array, out_hw_c: Sequence[int]) -> jax.Array:
    """Float [0, 1] RGB (B, H0, W0, 3) -> uint8 (B, H, W, C); traceable.

    1 channel = luminance; the resize is Lanczos-3 with antialiasing (``jax.image.resize``), like
    PIL's LANCZOS; then ``round(255 clip(x, 0, 1))``.
    """
    height, width, channels = (int(v) for v in out_hw_c)
    x = images_BxHxWx3.astype(jnp.float32)
    if channels == 1:
        x = jnp.tensordot(x, jnp.asarray(LUMA, jnp.float32), axes=([-1], [0]))[..., None]
    elif channels != 3:
        raise GenerationError(
            f"Generated images can be stored with 1 or 3 channels, not {channels}; the dataset's "
            "image shape must end in 1 (grayscale) or 3 (RGB)."
        )
    if x.shape[1:3] != (height, width):
        x = jax.image.resize(x, (x.shape[0], height, width, channels), "lanczos3", antialias=True)
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=(1,))
def _postprocess(images, out_hw_c):
    return postprocess(images, out_hw_c)


def to_uint8(images: np.ndarray, out_hw_c: Sequence[int]) -> np.ndarray:
    """Host helper: :func:`postprocess` of a numpy batch (the engine does this on the devices)."""
    return np.asarray(_postprocess(jnp.asarray(images, jnp.float32), tuple(int(v) for v in out_hw_c)))


def sample_images(predict_raw: Callable, decode: Callable, table: SolverTable, guidance: float,
                  out_hw_c: Sequence[int], latent_shape: Sequence[int], params: dict,
                  base_key: jax.Array, cond_BxLxD: jax.Array, uncond_LxD: jax.Array,
                  class_ids_B: jax.Array, indices_B: jax.Array) -> jax.Array:
    """One micro-batch end to end: latents -> guided denoising -> decode -> uint8 (B, H, W, C).

    ``predict_raw(unet_params, x, t, context)`` and ``decode(vae_params, z)`` are the model's
    forward functions (:func:`~sdcil_jax.generation.pipeline.unet_predict`,
    :func:`~sdcil_jax.generation.pipeline.vae_decode` bound to their modules); ``params`` holds the
    ``unet`` and ``vae`` trees. Traceable (the engine runs it per device).
    """
    z = latents_for(base_key, class_ids_B, indices_B, latent_shape)
    predict = guided(functools.partial(predict_raw, params["unet"]), cond_BxLxD, uncond_LxD,
                     guidance)
    z0 = denoise(predict, table, z)
    return postprocess(decode(params["vae"], z0), out_hw_c)
