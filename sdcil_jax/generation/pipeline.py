"""The Stable Diffusion backend: loading a pipeline and the per-device generation function.

This is the only module that knows about ``diffusers`` and ``transformers``. Everything else in
:mod:`sdcil_jax.generation` treats the pipeline as an opaque object and calls the functions below
(:func:`tokenize`, :func:`latent_shape`, :func:`generate_images`), so replacing the SD
implementation (an own jit+sharding sampler, another Flax SD port) means rewriting this file only.

Backends:

- ``sd``: ``FlaxStableDiffusionPipeline.from_pretrained`` from a hub id or a local folder.
- ``tiny_sd``: a small randomly initialised pipeline built in code. Its images are noise; it exists
  to test the machinery offline and on CPU.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdcil_jax.errors import GenerationError

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}

_DEPRECATION_TEXT = "Flax classes are deprecated"
_TINY_SEED = 0
_MAX_TOKENS = 77


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
        FlaxDDIMScheduler,
        FlaxStableDiffusionPipeline,
        FlaxUNet2DConditionModel,
    )

    _silence_flax_deprecation()
    return (
        FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel, FlaxAutoencoderKL, FlaxDDIMScheduler
    )


def load_pipeline(gen_cfg: Any) -> tuple[Any, dict]:
    """Load the generator named by ``gen_cfg.backend`` and return ``(pipe, params)``.

    ``params`` is the pipeline's parameter dict (unreplicated, including the scheduler state).
    Raises :class:`GenerationError` for missing folders, unreachable hubs and unusable weights.
    """
    dtype_name = str(gen_cfg.dtype)
    if dtype_name not in DTYPES:
        raise GenerationError(
            f"generation.dtype={dtype_name!r} is not supported; use one of {', '.join(DTYPES)}."
        )
    if gen_cfg.backend == "tiny_sd":
        return _tiny_pipeline(dtype_name)
    if gen_cfg.backend == "sd":
        return _load_sd(str(gen_cfg.model), str(gen_cfg.revision or ""), DTYPES[dtype_name])
    raise GenerationError(
        f"generation.backend={gen_cfg.backend!r} has no diffusion pipeline; use 'sd' or 'tiny_sd' "
        "(real_holdout copies real images and loads no model)."
    )


# --------------------------------------------------------------------------------------------
# sd: pretrained pipeline from a local folder or the hub


def _looks_local(model: str) -> bool:
    """A folder path rather than a hub id ('owner/name')."""
    expanded = os.path.expanduser(model)
    if model.startswith(("/", ".", "~")) or os.path.exists(expanded) or "\\" in model:
        return True
    if model.count("/") > 1:
        return True
    parent = os.path.dirname(expanded)
    return bool(parent) and os.path.isdir(parent)  # a local path whose last part is missing


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _unreachable(model: str, revision: str, why: str) -> GenerationError:
    rev = f" --revision {revision}" if revision else ""
    return GenerationError(
        f"Stable Diffusion weights {model!r} could not be loaded: {why}; download them once "
        f"with network access (huggingface-cli download {model}{rev}) or set generation.model to "
        "a local pipeline folder."
    )


def _hub_preflight(model: str, revision: str) -> None:
    """Fail fast (no 20 s of retries) when a hub id cannot possibly be loaded."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        cached = huggingface_hub.try_to_load_from_cache(
            model, "model_index.json", revision=revision or None
        )
    except (hf_errors.HFValidationError, ValueError):
        raise GenerationError(
            f"generation.model={model!r} is neither an existing local folder nor a valid hub id; "
            "fix the path or use a hub id like CompVis/stable-diffusion-v1-4."
        ) from None
    if isinstance(cached, str):
        return  # in the local HF cache: from_pretrained resolves it (offline too)
    if _hub_offline():
        raise _unreachable(
            model, revision, "the Hugging Face hub is offline (HF_HUB_OFFLINE) and the weights are "
            "not in the local HF cache"
        )
    try:
        huggingface_hub.model_info(model, revision=revision or None, timeout=10)
    except hf_errors.GatedRepoError:
        raise GenerationError(
            f"Hub model {model!r} is gated; accept its license on huggingface.co and log in with "
            "`huggingface-cli login`, or set generation.model to a local pipeline folder."
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise GenerationError(
            f"Hub model {model!r} does not exist (or is private); fix generation.model, e.g. "
            "CompVis/stable-diffusion-v1-4."
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise GenerationError(
            f"Hub model {model!r} has no revision {revision!r}; fix generation.revision (Flax "
            "weights of SD v1.4 are on revision 'flax')."
        ) from None
    except Exception as exc:  # connection errors, timeouts, proxies: all mean "not reachable"
        raise _unreachable(
            model, revision, f"the Hugging Face hub could not be reached ({type(exc).__name__}) "
            "and the weights are not in the local HF cache"
        ) from None


def _load_sd(model: str, revision: str, dtype: Any) -> tuple[Any, dict]:
    pipeline_cls = _diffusers()[0]
    local = _looks_local(model)
    kwargs: dict[str, Any] = {}
    if local:
        path = os.path.expanduser(model)
        if not os.path.isdir(path):
            raise GenerationError(
                f"Local model folder {model} does not exist; set generation.model to a pipeline "
                "folder (written by save_pretrained, with model_index.json) or to a hub id."
            )
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise GenerationError(
                f"Local model folder {model} has no model_index.json; point generation.model to "
                "the folder that save_pretrained or huggingface-cli download wrote."
            )
    else:
        path = model
        _hub_preflight(model, revision)
        if revision:
            kwargs["revision"] = revision
    try:
        pipe, params = pipeline_cls.from_pretrained(
            path, dtype=dtype, safety_checker=None, feature_extractor=None, **kwargs
        )
    except GenerationError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise GenerationError(
                f"Local model folder {model} could not be loaded as a Flax Stable Diffusion "
                f"pipeline ({reason}); check that it holds Flax weights saved with save_pretrained."
            ) from None
        why = f"loading from the hub or the HF cache failed ({reason})"
        raise _unreachable(model, revision, why) from None
    finally:
        _silence_flax_deprecation()
    return pipe, dict(params)


# --------------------------------------------------------------------------------------------
# tiny_sd: a small random pipeline built in code


def _tiny_tokenizer():
    """A character-level CLIPTokenizer from a vocab written to a temporary folder."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    with tempfile.TemporaryDirectory(prefix="sdcil_tiny_tok_") as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(tokens)}, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=_MAX_TOKENS)


def _random_params(shapes: Any, seed: int) -> dict:
    """Deterministic random parameters for a tree of ShapeDtypeStructs (numpy, no XLA compile).

    Initialising the tiny UNet/VAE through JAX costs about a minute of XLA compilation on CPU; the
    shapes come from ``jax.eval_shape`` instead and the values from a fixed numpy seed: norm
    scales 1, biases 0, embeddings N(0, 0.02), kernels N(0, 1/fan_in).
    """
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    rng = np.random.default_rng(seed)
    flat = flatten_dict(unfreeze(shapes))
    out = {}
    for path in sorted(flat):
        spec = flat[path]
        if path[-1] == "scale":
            value = np.ones(spec.shape)
        elif path[-1] == "bias":
            value = np.zeros(spec.shape)
        elif path[-1] == "embedding":
            value = rng.normal(0.0, 0.02, spec.shape)
        else:
            fan_in = int(np.prod(spec.shape[:-1])) or 1
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), spec.shape)
        out[path] = jnp.asarray(value, dtype=spec.dtype)
    return unflatten_dict(out)


@functools.lru_cache(maxsize=4)
def _tiny_pipeline(dtype_name: str) -> tuple[Any, dict]:
    """Build the tiny pipeline once per dtype; parameters come from a fixed seed (deterministic)."""
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    pipeline_cls, unet_cls, vae_cls, scheduler_cls = _diffusers()
    dtype = DTYPES[dtype_name]
    tokenizer = _tiny_tokenizer()
    unet = unet_cls(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
        out_channels=4, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), dtype=dtype,
    )
    vae = vae_cls(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, dtype=dtype,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=_MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = FlaxCLIPTextModel(text_config, seed=_TINY_SEED, dtype=dtype, _do_init=False)
    scheduler = scheduler_cls(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False,
    )
    pipe = pipeline_cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, dtype=dtype,
    )
    key = jax.random.PRNGKey(_TINY_SEED)
    shapes = {
        "unet": jax.eval_shape(unet.init_weights, key),
        "vae": jax.eval_shape(vae.init_weights, key),
        "text_encoder": jax.eval_shape(
            lambda k: text_encoder.init_weights(k, (1, _MAX_TOKENS)), key
        ),
    }
    params = {
        name: _random_params(tree, _TINY_SEED + i) for i, (name, tree) in enumerate(shapes.items())
    }
    params["scheduler"] = scheduler.create_state()
    _silence_flax_deprecation()
    return pipe, params


def save_tiny_pipeline(path: str, dtype: str = "float32") -> str:
    """Write the tiny pipeline with ``save_pretrained`` to ``path``; the ``sd`` backend loads it."""
    pipe, params = _tiny_pipeline(dtype)
    pipe.save_pretrained(path, params=params)
    return path


# --------------------------------------------------------------------------------------------
# what the sampler calls (all diffusers specifics stay here)


def tokenize(pipe: Any, prompts: Sequence[str]) -> np.ndarray:
    """Token ids (len(prompts), max_length) int32, padded to max_length and truncated."""
    ids = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
        truncation=True, return_tensors="np",
    ).input_ids
    return np.asarray(ids, dtype=np.int32)


def latent_shape(pipe: Any, resolution: int) -> tuple[int, int, int]:
    """Shape of one image's initial latent, channels first, for a square ``resolution`` image."""
    factor = pipe.vae_scale_factor
    if resolution % factor:
        raise GenerationError(
            f"generation.resolution={resolution} is not a multiple of the VAE down-sampling factor "
            f"{factor}; pick a multiple of {factor}."
        )
    return (int(pipe.unet.config.in_channels), resolution // factor, resolution // factor)


def generate_images(
    pipe: Any,
    params: dict,
    prompt_ids: jax.Array,
    uncond_ids: jax.Array,
    latents: jax.Array,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
) -> jax.Array:
    """Denoise ``latents`` (b, C, h, w) conditioned on ``prompt_ids`` and decode to images.

    Traceable per-device function (the sampler pmaps it). Returns float32 images in [0, 1], NHWC.
    """
    images = pipe._generate(
        prompt_ids, params, jax.random.PRNGKey(0), num_inference_steps, resolution, resolution,
        float(guidance_scale), latents, uncond_ids,
    )
    return images.astype(jnp.float32)
