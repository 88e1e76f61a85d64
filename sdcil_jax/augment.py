"""On-device augmentation of uint8 image batches, inside the jitted step.

All functions take NHWC batches and an explicit PRNG key; each image gets its own key
(``fold_in(key, position)``), so augmentation of an image does not depend on how the batch is sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _crop_one(image: jax.Array, key: jax.Array, pad: int) -> jax.Array:
    height, width, _ = image.shape
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    ky, kx = jax.random.split(key)
    oy = jax.random.randint(ky, (), 0, 2 * pad + 1)
    ox = jax.random.randint(kx, (), 0, 2 * pad + 1)
    return jax.lax.dynamic_slice(padded, (oy, ox, 0), (height, width, image.shape[2]))


def augment(
    images: jax.Array,
    key: jax.Array,
    *,
    crop_padding: int,
    flip: bool,
    brightness: float,
) -> jax.Array:
    """Random crop with zero padding, horizontal flip and multiplicative brightness jitter.

    Args:
      images: (B, H, W, C) float images in [0, 1].
      key: PRNG key for the batch.
      crop_padding: pixels of zero padding before a random crop back to (H, W); 0 disables.
      flip: flip each image horizontally with probability 1/2.
      brightness: multiply each image by a factor uniform in [max(0, 1 - brightness),
        1 + brightness], then clip to [0, 1] (torchvision's ColorJitter(brightness=b), as PODNet;
        torchvision rounds to uint8 after it, this does not).
    Returns:
      (B, H, W, C) float images.
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    if crop_padding > 0:
        images = jax.vmap(lambda im, k: _crop_one(im, jax.random.fold_in(k, 0), crop_padding))(
            images, keys
        )
    if flip:
        coins = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 1)))(keys)
        images = jnp.where(coins[:, None, None, None], images[:, :, ::-1, :], images)
    if brightness > 0:
        factors = jax.vmap(
            lambda k: jax.random.uniform(jax.random.fold_in(k, 2), (), minval=max(0.0, 1.0 - brightness),
                                         maxval=1.0 + brightness)
        )(keys)
        images = jnp.clip(images * factors[:, None, None, None], 0.0, 1.0)
    return images
