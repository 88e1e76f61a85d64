"""Batch normalisation with PyTorch's semantics (``torch.nn.BatchNorm2d``), used by every backbone.

Flax's ``nn.BatchNorm`` updates the running variance with the *biased* batch variance; torch (and
hence the official PODNet code) uses the *unbiased* one. For channels-last input ``x`` with
``n = prod(x.shape[:-1])`` values per channel (batch x H x W), in training mode::

    mu = mean(x),  v = mean((x - mu)^2)                        (biased, used to normalise)
    y = (x - mu) / sqrt(v + eps) * scale + bias
    running_mean <- (1 - momentum) * running_mean + momentum * mu
    running_var  <- (1 - momentum) * running_var  + momentum * v * n / (n - 1)

and in inference mode ``y = (x - running_mean) / sqrt(running_var + eps) * scale + bias``.

With a row ``mask`` (``(B,)``, 1 for the rows that count: the real samples of an epoch's padded
last batch) the statistics are those of the masked rows alone, as torch computes them on the short
batch: ``n = sum(mask) * H * W``, ``mu = sum_rows(mask x) / n``, ``v = sum_rows(mask (x - mu)^2) / n``;
every row, padded ones included, is normalised with them. Defaults
are torch's: ``momentum = 0.1`` (torch's convention, i.e. flax momentum 0.9), ``eps = 1e-5``.

Under ``jax.jit`` with the batch sharded over a mesh, the means are over the *global* batch (XLA
inserts the cross-device reductions), as torch computes them on one device. Statistics are always
computed in float32, whatever the computation ``dtype`` (mixed precision).

The variables keep flax's names (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """torch-compatible batch normalisation over the last (channel) axis (see the module docstring).

    Attributes:
      use_running_average: inference mode (running statistics, nothing updated).
      momentum: torch's momentum (weight of the new batch statistic).
      epsilon: added to the variance.
      dtype: dtype of the output (statistics and parameters stay float32).
      scale_init: initialiser of ``scale`` (ones; zeros for the last BN of a residual branch).
    """

    use_running_average: bool
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Callable[..., jax.Array] = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            if mask is None:
                n = 1
                for size in x.shape[:-1]:
                    n *= size
                mean = jnp.mean(xf, axis=axes)
                var = jnp.mean(jnp.square(xf - mean), axis=axes)
                correction = n / max(n - 1, 1)
            else:
                w = jnp.asarray(mask, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
                per_row = 1
                for size in x.shape[1:-1]:
                    per_row *= size
                n = jnp.sum(w) * per_row
                mean = jnp.sum(xf * w, axis=axes) / n
                var = jnp.sum(jnp.square(xf - mean) * w, axis=axes) / n
                correction = n / jnp.maximum(n - 1, 1)
            if not self.is_initializing():
                unbiased = var * correction
                m = self.momentum
                running_mean.value = (1.0 - m) * running_mean.value + m * mean
                running_var.value = (1.0 - m) * running_var.value + m * unbiased
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        y = (x.astype(jnp.float32) - mean) * mul + bias
        return y.astype(self.dtype)
