"""The Stable Diffusion model object and its pure forward functions (diffusers' Flax modules).

:class:`SDModel` holds the components (CLIP tokenizer and text encoder, UNet, VAE, noise schedule)
and their parameters; :func:`unet_predict`, :func:`vae_decode` and the text encoding are what the
sampler calls. With :mod:`sdcil_jax.generation.pipeline` (loading) and
:mod:`sdcil_jax.generation.tiny` (the offline model), the only code that knows about ``diffusers``
and ``transformers``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdcil_jax.errors import GenerationError
from sdcil_jax.generation.attention import attention_scope

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}

_DEPRECATION_TEXT = "Flax classes are deprecated"


class _FlaxDeprecationFilter(logging.Filter):
    """Drops diffusers' "Flax classes are deprecated" record and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _DEPRECATION_TEXT not in record.getMessage()


_FILTER = _FlaxDeprecationFilter()


def _silence_flax_deprecation() -> None:
    """Attach the targeted filter to every diffusers logger and its handlers (idempotent).

    diffusers logs the message on each Flax class construction through per-module loggers that
    propagate to the ``diffusers`` logger's handler; filtering the handlers and the loggers covers
    both the default set-up and a user who enabled propagation to the root logger.
    """
    warnings.filterwarnings("ignore", message=f".*{_DEPRECATION_TEXT}.*")
    manager = logging.Logger.manager
    names = [n for n in list(manager.loggerDict) if n == "diffusers" or n.startswith("diffusers.")]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def _diffusers():
    """Import the diffusers Flax classes with the deprecation message silenced."""
    import diffusers.utils.logging  # noqa: F401  (configures the diffusers root logger)

    _silence_flax_deprecation()
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxPNDMScheduler,
        FlaxStableDiffusionPipeline,
        FlaxUNet2DConditionModel,
    )

    _silence_flax_deprecation()
    return (
        FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel, FlaxAutoencoderKL, FlaxPNDMScheduler
    )


@dataclasses.dataclass
class SDModel:
    """The components of a latent diffusion model and pure functions over their parameters.

    Attributes:
      tokenizer: a ``transformers.CLIPTokenizer``.
      text_encoder: a ``transformers.FlaxCLIPTextModel`` (called with explicit ``params``).
      unet: a ``diffusers.FlaxUNet2DConditionModel`` (a Flax linen module).
      vae: a ``diffusers.FlaxAutoencoderKL`` (a Flax linen module).
      scheduler_config: the model's noise schedule (``scheduler_config.json`` as a dict).
      params: ``{"text_encoder", "unet", "vae"}``: host (numpy) trees, floating leaves in ``dtype``.
      dtype: the compute and parameter dtype.
      attention: the resolved ``generation.attention`` kind (``standard``, ``memory_efficient``
        or ``fused``; see :mod:`sdcil_jax.generation.attention`); ``memory_efficient`` is also set
        on ``unet`` as diffusers' flag.
    """

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict
    params: dict
    dtype: Any
    attention: str = "standard"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """Shape of one image's latent, channels first, for a square ``resolution`` image."""
        factor = self.vae_scale_factor
        if resolution % factor:
            raise GenerationError(
                f"generation.resolution={resolution} is not a multiple of the VAE down-sampling "
                f"factor {factor}; pick a multiple of {factor}."
            )
        return (int(self.unet.config.in_channels), resolution // factor, resolution // factor)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids (len(prompts), L) int32, padded to the tokenizer's max length and truncated."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="np",
        ).input_ids
        return np.asarray(ids, dtype=np.int32)

    def encode_text(self, text_params: Any, ids_NxL: jax.Array) -> jax.Array:
        """CLIP last hidden states (N, L, D) of token ids (N, L) (jitted once per encoder)."""
        return _encode_text(self.text_encoder, text_params, ids_NxL)

    def predict(self, unet_params: Any, x_BxCxhxw: jax.Array, t: jax.Array,
                context_BxLxD: jax.Array) -> jax.Array:
        """See :func:`unet_predict`."""
        return unet_predict(self.unet, unet_params, x_BxCxhxw, t, context_BxLxD, self.attention)

    def decode(self, vae_params: Any, latents_BxCxhxw: jax.Array) -> jax.Array:
        """See :func:`vae_decode`."""
        return vae_decode(self.vae, vae_params, latents_BxCxhxw, self.attention)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_text(text_encoder: Any, text_params: Any, ids_NxL: jax.Array) -> jax.Array:
    return text_encoder(ids_NxL, params=text_params)[0]


def unet_predict(unet: Any, unet_params: Any, x_BxCxhxw: jax.Array, t: jax.Array,
                 context_BxLxD: jax.Array, attention: str = "standard") -> jax.Array:
    """UNet output (B, C, h, w) at timestep ``t`` (scalar int) for text states; traceable.

    ``attention``: the resolved kind (see :mod:`sdcil_jax.generation.attention`)."""
    timesteps = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x_BxCxhxw.shape[0],))
    with attention_scope(attention):
        return unet.apply({"params": unet_params}, x_BxCxhxw, timesteps,
                          encoder_hidden_states=context_BxLxD).sample


def vae_decode(vae: Any, vae_params: Any, latents_BxCxhxw: jax.Array,
               attention: str = "standard") -> jax.Array:
    """Images (B, H, W, 3) float32 in [0, 1]: ``clip(vae.decode(z / scaling) / 2 + 1/2, 0, 1)``."""
    z = latents_BxCxhxw / vae.config.scaling_factor
    with attention_scope(attention):
        images = vae.apply({"params": vae_params}, z, method=vae.decode).sample
    images = jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)
    return jnp.transpose(images, (0, 2, 3, 1))


def _cast(tree: Any, dtype: Any) -> Any:
    """Host copy of ``tree`` with floating leaves in ``dtype`` (integer leaves unchanged)."""
    def one(x):
        x = np.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree_util.tree_map(one, tree)
