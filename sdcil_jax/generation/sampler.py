"""A pmapped text-to-image sampler whose every image is reproducible on its own.

Image ``index`` of class ``class_id`` starts from the latent
``normal(fold_in(fold_in(PRNGKey(seed), class_id), index))``, drawn before sharding and passed to
the pipeline, so its pixels do not depend on the number of devices, the batch size or which other
images share its batch. Parameters are replicated once per :class:`Sampler`, reused for all classes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdcil_jax.errors import GenerationError
from sdcil_jax.generation import pipeline as sd


def _per_device(pipe, steps, guidance_scale, resolution, params, ids, uncond, latents):
    return sd.generate_images(
        pipe, params, ids, uncond, latents, num_inference_steps=steps,
        guidance_scale=guidance_scale, resolution=resolution,
    )


@functools.cache
def _pmapped_generate(devices: tuple) -> Any:
    """One pmapped function per device set; its compilations are cached across samplers."""
    return jax.pmap(_per_device, static_broadcasted_argnums=(0, 1, 2, 3), devices=list(devices))


def replicate(tree: Any, devices: Sequence[Any]) -> Any:
    """Copy every leaf to each of ``devices`` with a leading device axis (the layout pmap expects).

    Same result as ``flax.jax_utils.replicate``, but stacks on the host: flax stacks each leaf with
    ``jnp.stack``, which compiles one XLA program per distinct leaf shape (about 10 s for the tiny
    pipeline on CPU).
    """
    mesh = jax.sharding.Mesh(np.array(list(devices)), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))

    def one(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)

    return jax.tree_util.tree_map(one, tree)


@functools.partial(jax.jit, static_argnums=(2,))
def _initial_latents(base: jax.Array, indices: jax.Array, shape: tuple):
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype=jnp.float32))(keys)


def initial_latents(seed: int, class_id: int, indices: Sequence[int], shape: tuple) -> np.ndarray:
    """Initial latents (len(indices), *shape) of images ``indices`` of ``class_id`` (host numpy)."""
    base = jax.random.fold_in(jax.random.PRNGKey(int(seed)), int(class_id))
    idx = np.asarray(indices, dtype=np.uint32)
    out = _initial_latents(base, idx, tuple(shape))
    return np.asarray(out)


def to_uint8(images: np.ndarray, out_hw_c: Sequence[int]) -> np.ndarray:
    """Float [0, 1] NHWC RGB images -> uint8 (n, H, W, C), antialiased resize, 1 C = luminance.

    The resize is Lanczos-3 with antialiasing (``jax.image.resize``), like PIL's LANCZOS.
    """
    height, width, channels = (int(v) for v in out_hw_c)
    x = jnp.asarray(images, dtype=jnp.float32)
    if channels == 1:
        x = jnp.tensordot(x, jnp.asarray([0.299, 0.587, 0.114], jnp.float32), axes=([-1], [0]))[
            ..., None
        ]
    elif channels != 3:
        raise GenerationError(
            f"Generated images can be stored with 1 or 3 channels, not {channels}; the dataset's "
            "image shape must end in 1 (grayscale) or 3 (RGB)."
        )
    if x.shape[1:3] != (height, width):
        x = jax.image.resize(x, (x.shape[0], height, width, channels), "lanczos3", antialias=True)
    return np.asarray(jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)).astype(np.uint8)


class Sampler:
    """Generates images of one class at a time, pmapped over ``devices`` (default: local devices).

    The global batch per pmapped call is ``gen_cfg.batch_per_device * len(devices)``; the last
    incomplete batch is padded by repeating its last image and the padding is dropped.
    """

    def __init__(
        self, pipe: Any, params: dict, gen_cfg: Any, seed: int, devices: Sequence[Any] | None = None
    ):
        self.pipe = pipe
        self.devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
        self.seed = int(seed)
        self.steps = int(gen_cfg.num_inference_steps)
        self.guidance = float(gen_cfg.guidance_scale)
        self.resolution = int(gen_cfg.resolution)
        self.per_device = int(gen_cfg.batch_per_device)
        self.batch_size = self.per_device * len(self.devices)
        self.latent_shape = sd.latent_shape(pipe, self.resolution)
        self.params = replicate(params, self.devices)
        self._fn = _pmapped_generate(self.devices)
        self._uncond = self._shard(sd.tokenize(pipe, [""] * self.batch_size))

    def _shard(self, x: np.ndarray) -> np.ndarray:
        return x.reshape((len(self.devices), self.per_device) + x.shape[1:])

    def generate_float(
        self, class_id: int, prompts_per_image: Sequence[str], indices: Sequence[int]
    ) -> np.ndarray:
        """Float32 images in [0, 1], (len(indices), R, R, 3) at ``generation.resolution``.

        ``prompts_per_image[j]`` is the prompt of image ``indices[j]``.
        """
        indices = [int(i) for i in indices]
        prompts = list(prompts_per_image)
        if len(prompts) != len(indices):
            raise ValueError(f"{len(prompts)} prompts for {len(indices)} image indices")
        chunks = []
        for start in range(0, len(indices), self.batch_size):
            idx = indices[start:start + self.batch_size]
            txt = prompts[start:start + self.batch_size]
            real = len(idx)
            pad = self.batch_size - real
            idx, txt = idx + idx[-1:] * pad, txt + txt[-1:] * pad
            ids = self._shard(sd.tokenize(self.pipe, txt))
            latents = self._shard(initial_latents(self.seed, class_id, idx, self.latent_shape))
            images = self._fn(
                self.pipe, self.steps, self.guidance, self.resolution, self.params, ids,
                self._uncond, latents,
            )
            images = np.asarray(images).reshape((self.batch_size,) + images.shape[2:])
            chunks.append(images[:real])
        if not chunks:
            return np.zeros((0, self.resolution, self.resolution, 3), np.float32)
        return np.concatenate(chunks).astype(np.float32)

    def generate(
        self,
        class_id: int,
        prompts_per_image: Sequence[str],
        indices: Sequence[int],
        out_hw_c: Sequence[int],
    ) -> np.ndarray:
        """uint8 images (len(indices), H, W, C) resized (antialiased) to ``out_hw_c``."""
        return to_uint8(self.generate_float(class_id, prompts_per_image, indices), out_hw_c)
