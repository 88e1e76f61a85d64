"""``generation.attention``: how the UNet's and the VAE's attention layers are computed.

Kinds (:data:`KINDS`):

- ``standard``: diffusers' own Flax code: the full score matrix ``softmax(q k^T * s)`` of shape
  (B, heads, T, S) is materialised per layer (about 1.05 GiB per SD v1.4 image at 512 px).
- ``memory_efficient``: diffusers' chunked attention (the UNet's ``use_memory_efficient_attention``
  flag; the VAE keeps its standard attention): less memory, slower, other pixels.
- ``fused``: every ``FlaxAttention`` (UNet self- and cross-attention) and ``FlaxAttentionBlock`` (VAE
  mid-block) call is replaced, through flax's public method interception
  (:func:`flax.linen.intercept_methods`), by the same maths on the module's own parameters computed
  with :func:`jax.nn.dot_product_attention`: ``out = proj_attn(softmax(q k^T * s) v)`` with
  ``q, k, v = query(x), key(ctx), value(ctx)`` of shape (B, T|S, heads, d) and ``s = 1 / sqrt(d)``.
  On a GPU in bfloat16/float16 it asks for cuDNN's flash attention (``implementation='cudnn'``;
  shapes cuDNN refuses, e.g. the VAE's single 512-wide head on pre-Hopper GPUs, fall back to XLA's
  implementation at trace time); elsewhere XLA's implementation (``implementation='xla'``): einsum,
  softmax, einsum as ``standard`` but with float32 logits and softmax whatever the input dtype.
  TPU: XLA's implementation too. JAX's Pallas TPU flash-attention kernel wants sequence lengths in
  multiples of its 128 blocks and is not used: SD's 77-token cross-attention keys and 40/80/160-wide
  heads need padding that has not been measured on a TPU (none was lent).
- ``auto`` (default): ``fused`` on GPU, where it reaches cuDNN's flash kernel (the score matrix is
  never stored); ``standard`` on TPU and CPU, where ``fused`` is XLA's implementation, which keeps the
  logits in float32 and so needs *more* memory than diffusers' bfloat16 scores: XLA's buffer
  assignment for SD v1.4 at 512 px, one image per device, bfloat16 (``benchmarks/generation.py
  --memory-sd14 1 --attention standard,fused``, CPU compile) gives 6.46 GiB of temporaries with
  ``fused`` against 4.58 GiB with ``standard``. Its TPU speed is not measured (no TPU lent).

The weights stay diffusers' Flax weights: ``fused`` reads the same ``query``/``key``/``value``/
``proj_attn`` Dense parameters (``to_q``, ``to_k``, ``to_v``, ``to_out_0`` in the UNet).

Pixels (measured on CPU, 2 PNDM steps, tests/test_attention.py): in float32,
``fused`` and ``standard`` agree to float32 rounding (UNet outputs: max |diff| 1.9e-6 on the tiny
model, 2.2e-5 of outputs up to 1.8 on a small SD v1.4-shaped UNet, where a batch of 1 vs 2 alone
moves them by 3.3e-6; stored uint8 images: 0 and 1 level). In bfloat16 they do *not* agree within one
level: 5 (tiny) and 9 (SD v1.4-shaped) levels at most, about half the values off by one or more,
because diffusers' standard attention rounds the logits ``q k^T`` to bfloat16 before a bfloat16
softmax, while :func:`jax.nn.dot_product_attention` (like cuDNN's flash kernel) keeps logits and
softmax in float32. Neither is the worse one: against the float32 images, bfloat16 ``standard`` is
off by at most 4 / 6 levels (mean 0.60 / 0.75), ``fused`` by 4 / 5 (mean 0.60 / 0.74). That is
beyond what the store's determinism promise allows (byte for byte for a given set of fields; one
level only between CPU process layouts), so a resolved ``fused`` is recorded in the store's
fingerprint (field ``attention``, present only for ``fused``, so stores filled with ``standard``
keep their fingerprint); ``memory_efficient`` keeps its ``memory_efficient_attention`` field.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

KINDS = ("auto", "standard", "memory_efficient", "fused")

# Trace-time count of attention layers computed by the fused path, by model part ('unet', 'vae'):
# tests read it to check that ``fused`` really runs (pixels alone could not tell).
FUSED_TRACES: collections.Counter = collections.Counter()


def resolve(kind: str, platform: str | None = None) -> str:
    """The kind actually run for ``generation.attention=kind`` on ``platform`` (default: JAX's
    default backend): ``auto`` -> ``fused`` on 'gpu', ``standard`` elsewhere (module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"generation.attention={kind!r} is not one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    platform = platform or jax.default_backend()
    return "fused" if platform in ("gpu", "cuda", "rocm") else "standard"


def _implementation(dtype: Any) -> str:
    """'cudnn' on a GPU for bfloat16/float16 inputs, else 'xla'."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def fused_attention(q_BxTxNxD: jax.Array, k_BxSxNxD: jax.Array, v_BxSxNxD: jax.Array,
                    scale: float) -> jax.Array:
    """``softmax(q k^T * scale) v`` per head, (B, T, N, D), with :func:`jax.nn.dot_product_attention`.

    cuDNN is asked for where :func:`_implementation` says so; a shape it refuses at trace time (head
    dim over its limit or not a multiple of 8) falls back to the XLA implementation.
    """
    impl = _implementation(q_BxTxNxD.dtype)
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q_BxTxNxD, k_BxSxNxD, v_BxSxNxD, scale=scale,
                                                implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(q_BxTxNxD, k_BxSxNxD, v_BxSxNxD, scale=scale,
                                        implementation="xla")


def _unet_attention(m: Any, hidden_states: jax.Array, context: jax.Array | None = None,
                    deterministic: bool = True) -> jax.Array:
    """diffusers' ``FlaxAttention.__call__`` maths: x (B, T, C), context (B, S, C') -> (B, T, C)."""
    context = hidden_states if context is None else context
    b = hidden_states.shape[0]
    q = m.query(hidden_states).reshape(b, -1, m.heads, m.dim_head)
    k = m.key(context).reshape(b, -1, m.heads, m.dim_head)
    v = m.value(context).reshape(b, -1, m.heads, m.dim_head)
    out = fused_attention(q, k, v, m.dim_head ** -0.5).reshape(b, -1, m.heads * m.dim_head)
    FUSED_TRACES["unet"] += 1
    return m.dropout_layer(m.proj_attn(out), deterministic=deterministic)


def _vae_attention(m: Any, hidden_states: jax.Array) -> jax.Array:
    """diffusers' ``FlaxAttentionBlock.__call__`` maths: x (B, H, W, C) ->
    ``x + proj_attn(attention(group_norm(x)))`` with ``C / num_heads``-wide heads."""
    b, h, w, c = hidden_states.shape
    heads = c // m.num_head_channels if m.num_head_channels is not None else 1
    x = m.group_norm(hidden_states).reshape(b, h * w, c)
    q, k, v = (f(x).reshape(b, h * w, heads, c // heads) for f in (m.query, m.key, m.value))
    out = fused_attention(q, k, v, 1.0 / math.sqrt(c / heads)).reshape(b, h * w, c)
    FUSED_TRACES["vae"] += 1
    return m.proj_attn(out).reshape(b, h, w, c) + hidden_states


def _interceptor(next_fun, args, kwargs, context):
    """Routes ``__call__`` of diffusers' attention modules to the fused maths; the rest untouched."""
    from diffusers.models.attention_flax import FlaxAttention
    from diffusers.models.vae_flax import FlaxAttentionBlock

    if context.method_name == "__call__":
        if isinstance(context.module, FlaxAttention):
            return _unet_attention(context.module, *args, **kwargs)
        if isinstance(context.module, FlaxAttentionBlock):
            return _vae_attention(context.module, *args, **kwargs)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def attention_scope(kind: str) -> Iterator[None]:
    """While active (at trace time), diffusers' attention layers run as ``kind`` says: ``fused``
    intercepts them; ``standard`` and ``memory_efficient`` (a flag of the UNet module) change
    nothing here."""
    if kind == "fused":
        import flax.linen as nn

        with nn.intercept_methods(_interceptor):
            yield
    else:
        yield
