"""Backbones (ResNet-32 / ResNet-18 with PODNet's attention maps) and growable classifier heads."""

from sdcil_jax.models.heads import (
    frozen_mask_linear,
    frozen_mask_lsc,
    kmeans_imprint,
    linear_apply,
    linear_grow,
    linear_init,
    lsc_apply,
    lsc_grow,
    lsc_init,
    lsc_scale,
    lsc_similarities,
    mask_updates,
)
from sdcil_jax.models.registry import BACKBONES, build_backbone, feature_dim
from sdcil_jax.models.resnet import (
    BasicBlock,
    CifarBlock,
    CifarResNet,
    ResNet18,
    resnet32,
    resnet_digits,
    resnet_tiny,
)

__all__ = [
    "BACKBONES",
    "BasicBlock",
    "CifarBlock",
    "CifarResNet",
    "ResNet18",
    "build_backbone",
    "feature_dim",
    "frozen_mask_linear",
    "frozen_mask_lsc",
    "kmeans_imprint",
    "linear_apply",
    "linear_grow",
    "linear_init",
    "lsc_apply",
    "lsc_grow",
    "lsc_init",
    "lsc_scale",
    "lsc_similarities",
    "mask_updates",
    "resnet32",
    "resnet_digits",
    "resnet_tiny",
]
