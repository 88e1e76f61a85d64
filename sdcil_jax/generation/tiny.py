"""``tiny_sd``: a small randomly initialised Stable Diffusion built in code, with SD v1's schedule.

Its images are noise; it exists to test the machinery offline and on CPU. Its UNet (2 levels, 32/64
channels, cross-attention 32), VAE (2 levels, 4 latent channels) and 2-layer CLIP text encoder are
diffusers'/transformers' own Flax modules, with parameters drawn from a fixed numpy seed, and a
character-level tokenizer written at run time. :func:`save_tiny_pipeline` writes it as a diffusers
``save_pretrained`` folder that the ``sd`` backend loads like any pretrained model.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

from sdcil_jax.generation.model import DTYPES, SDModel, _cast, _diffusers, _silence_flax_deprecation
from sdcil_jax.generation.schedulers import SD_V1_SCHEDULE

_TINY_SEED = 0
_MAX_TOKENS = 77


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
    """Deterministic random float32 parameters for a tree of ShapeDtypeStructs (numpy, no compile).

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
        out[path] = value.astype(spec.dtype)
    return unflatten_dict(out)


@functools.lru_cache(maxsize=1)
def _tiny_float32() -> tuple[Any, Any, Any, Any, dict]:
    """Modules (float32) and float32 parameters of the tiny model, built once per process."""
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    _, unet_cls, vae_cls, _ = _diffusers()
    tokenizer = _tiny_tokenizer()
    unet = unet_cls(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
        out_channels=4, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = vae_cls(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=_MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = FlaxCLIPTextModel(text_config, seed=_TINY_SEED, _do_init=False)
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
    _silence_flax_deprecation()
    return tokenizer, text_encoder, unet, vae, params


@functools.lru_cache(maxsize=4)
def tiny_model(dtype_name: str) -> SDModel:
    """The tiny model computing in ``dtype_name`` (parameters cast from the float32 ones)."""
    from transformers import FlaxCLIPTextModel

    tokenizer, text_encoder, unet, vae, params = _tiny_float32()
    dtype = DTYPES[dtype_name]
    text_encoder = FlaxCLIPTextModel(text_encoder.config, seed=_TINY_SEED, dtype=dtype,
                                     _do_init=False)
    return SDModel(tokenizer, text_encoder, unet.clone(dtype=dtype), vae.clone(dtype=dtype),
                   dict(SD_V1_SCHEDULE), _cast(params, dtype), dtype)


@functools.lru_cache(maxsize=2)
def tiny_sd14_model(dtype_name: str) -> SDModel:
    """SD v1.4's block structure at small width, random weights (attention tests, CPU benchmarks).

    UNet: diffusers' default (SD v1.4) blocks: three CrossAttnDownBlock2D and a DownBlock2D, a
    cross-attention mid block, an UpBlock2D and three CrossAttnUpBlock2D, 2 layers per block, 8
    heads, but ``block_out_channels=(32, 32, 64, 64)`` (SD: 320, 640, 1280, 1280) and 32-d
    cross-attention (the tiny text encoder's width). VAE: SD's four levels (so 8x down-sampling) with
    2 layers per block at ``(32, 32, 64, 64)`` channels (SD: 128, 256, 512, 512). The tokenizer and
    text encoder are the tiny model's.
    """
    _, unet_cls, vae_cls, _ = _diffusers()
    tokenizer, _, _, _, tiny_params = _tiny_float32()
    channels = (32, 32, 64, 64)
    unet = unet_cls(block_out_channels=channels, layers_per_block=2, sample_size=8,
                    cross_attention_dim=32, attention_head_dim=8)
    vae = vae_cls(block_out_channels=channels, latent_channels=4, layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    key = jax.random.PRNGKey(_TINY_SEED)
    params = {"unet": _random_params(jax.eval_shape(unet.init_weights, key), _TINY_SEED + 10),
              "vae": _random_params(jax.eval_shape(vae.init_weights, key), _TINY_SEED + 11),
              "text_encoder": tiny_params["text_encoder"]}
    _silence_flax_deprecation()
    small = tiny_model(dtype_name)
    dtype = DTYPES[dtype_name]
    return SDModel(tokenizer, small.text_encoder, unet.clone(dtype=dtype), vae.clone(dtype=dtype),
                   dict(SD_V1_SCHEDULE), _cast(params, dtype), dtype)


def save_tiny_pipeline(path: str) -> str:
    """Write the tiny model (float32) with diffusers' ``save_pretrained``; ``sd`` loads the folder."""
    pipeline_cls, _, _, scheduler_cls = _diffusers()
    tokenizer, text_encoder, unet, vae, params = _tiny_float32()
    scheduler = scheduler_cls(**{k: v for k, v in SD_V1_SCHEDULE.items() if k != "clip_sample"})
    pipe = pipeline_cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None,
    )
    pipe.save_pretrained(path, params={**params, "scheduler": scheduler.create_state()})
    _silence_flax_deprecation()
    return path
