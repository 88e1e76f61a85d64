"""Backbone registry: ``model_cfg.name`` -> a flax module (see :mod:`sdcil_jax.models.resnet`).

``model_cfg`` keys read: ``name`` (required), ``width`` (``resnet_digits`` only, default 16),
``last_relu`` (default False), ``stem`` (``resnet18`` only: ``"podnet"``, the official 3x3/1 stem,
default; or ``"torchvision"``), ``dtype`` (computation dtype name, default ``"float32"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdcil_jax.errors import ConfigError
from sdcil_jax.models.resnet import ResNet18, resnet32, resnet_digits, resnet_tiny


def _common(cfg: Any) -> dict[str, Any]:
    return dict(
        last_relu=bool(cfg.get("last_relu", False)),
        dtype=jnp.dtype(cfg.get("dtype", "float32")),
    )


BACKBONES: dict[str, Callable[[Any], nn.Module]] = {
    # PODNet's CIFAR ResNet-32: 32x32 inputs, 64-d features.
    "resnet32": lambda cfg: resnet32(**_common(cfg)),
    # ResNet-18 for ImageNet: 512-d features.
    "resnet18": lambda cfg: ResNet18(
        width=64, stem=str(cfg.get("stem", "podnet")), **_common(cfg)
    ),
    # Smallest net with the same structure (4 blocks, 32-d features): for tests.
    "resnet_tiny": lambda cfg: resnet_tiny(**_common(cfg)),
    # 8x8 digit images: maps 8x8, 4x4, 2x2, 2x2; 4*width-d features.
    "resnet_digits": lambda cfg: resnet_digits(width=int(cfg.get("width", 16)), **_common(cfg)),
}


def build_backbone(model_cfg: Any) -> nn.Module:
    """Returns the (unbound) backbone module named by ``model_cfg.name``.

    Args:
      model_cfg: a ConfigDict (or dict) with at least ``name``; see the module docstring.

    Returns:
      A flax module; ``module.apply(variables, x_BxHxWx3, train)`` returns
      ``{"maps": [4 NHWC arrays], "features": (B, D), "relu_features": (B, D)}``.

    Raises:
      ConfigError: unknown name.
    """
    name = model_cfg.get("name")
    if name not in BACKBONES:
        raise ConfigError(f"Unknown model.name {name!r}; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[name](model_cfg)


def feature_dim(model_cfg: Any) -> int:
    """Dimension D of ``features`` of the backbone named by ``model_cfg.name``."""
    return build_backbone(model_cfg).feature_dim
