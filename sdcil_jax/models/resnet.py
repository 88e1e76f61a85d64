"""Backbones returning PODNet's four "attention" maps and the pooled features.

Every backbone maps a float32 NHWC batch ``x_BxHxWx3`` (already normalised) to::

    {"maps": [m1, m2, m3, m4],        # NHWC outputs of stages 1..4, taken BEFORE any ReLU
     "features": (B, feature_dim),    # average pool of m4 (pre-ReLU, PODNet's ``raw_features``)
     "relu_features": (B, feature_dim)}  # average pool of relu(m4) (PODNet's ``features``)

PODNet feeds ``features`` (pre-ReLU) to the LSC, to POD-flat, to herding and to NME
(``classifier_no_act=True`` and ``extract_no_act=True`` in ``inclearn/models/podnet.py``);
``relu_features`` is there for methods that want the usual post-ReLU embedding.

Checked against the official PODNet code (arthurdouillard/incremental_learning.pytorch):

* ``inclearn/convnet/my_resnet.py`` (``resnet_rebuffi`` -> ``CifarResNet``, ``ResidualBlock``,
  ``Stage``): blocks never apply a ReLU after the addition; ``last_relu=True`` makes ``Stage`` apply
  a ReLU to each block output *after* recording it, so the maps stay pre-ReLU either way and only
  the input of the next block changes. Stage 4 (a single block) never gets a ReLU. The stage sizes
  are ``n``, ``1 + (n - 1)``, ``1 + (n - 2)`` and 1 blocks: 5/5/4/1 = 15 blocks for n=5, which is
  what makes it a 32-layer net (method.md: "one down-sampling block + 3 blocks at 64").
* ``inclearn/convnet/resnet.py`` (``ResNet``, ``BasicBlock``, ``resnet18``): the first block of each
  stage keeps the torchvision post-addition ReLU, the last block of each stage has none, and
  ``last_relu`` puts a ReLU between stages (``end_relu``); the maps are the raw stage outputs. That
  code uses a 3x3 stride-1 stem conv (then the 3x3/2 max-pool): :class:`ResNet18`'s default
  ``stem="podnet"``; ``stem="torchvision"`` gives the usual 7x7 stride-2 stem.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdcil_jax.models.batchnorm import BatchNorm

Array = Any

# torch's kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (k*k*C_out)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """Bias-free conv with torch-style symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        name=name,
    )


def _bn(train: bool, dtype: Any, name: str, zero_scale: bool = False) -> BatchNorm:
    """torch's BatchNorm2d (momentum 0.1, eps 1e-5, unbiased running variance; see batchnorm.py)."""
    return BatchNorm(
        use_running_average=not train,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        dtype=dtype,
        name=name,
    )


# ResNet-18 stems: name -> (kernel, stride) of the first conv (a 3x3/2 max-pool follows both).
STEMS = {"podnet": (3, 1), "torchvision": (7, 2)}


def _pool(x_BxHxWxC: Array) -> Array:
    """Global average pool, computed in float32: (B, H, W, C) -> (B, C)."""
    return jnp.mean(x_BxHxWxC.astype(jnp.float32), axis=(1, 2))


def _outputs(maps: list[Array]) -> dict[str, Any]:
    last = maps[-1]
    return {"maps": maps, "features": _pool(last), "relu_features": _pool(nn.relu(last))}


class CifarBlock(nn.Module):
    """Rebuffi residual block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, no ReLU after the addition.

    ``downsample=True``: the first conv has stride 2 and doubles the channels; the shortcut takes
    every second pixel and zero-pads the channels (no parameters). The second BN's scale starts at
    0, so a fresh block is the identity (or the strided/padded identity).

    Input (B, H, W, C); output (B, H, W, C), or (B, ceil(H/2), ceil(W/2), 2C) when down-sampling.
    """

    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Array | None = None) -> Array:
        in_ch = x.shape[-1]
        planes = 2 * in_ch if self.downsample else in_ch
        stride = 2 if self.downsample else 1
        y = _conv(planes, 3, stride, self.dtype, "conv_a")(x)
        y = nn.relu(_bn(train, self.dtype, "bn_a")(y, mask))
        y = _conv(planes, 3, 1, self.dtype, "conv_b")(y)
        y = _bn(train, self.dtype, "bn_b", zero_scale=True)(y, mask)
        if self.downsample:
            x = x[:, ::2, ::2, :]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, planes - in_ch)))
        return x + y


class CifarResNet(nn.Module):
    """PODNet's CIFAR "rebuffi" ResNet (ResNet-32 for ``n=5, width=16``).

    Stem 3x3 conv(width)+BN+ReLU; stage 1: ``n`` blocks at ``width``; stage 2: a down-sampling block
    + ``n-1`` blocks at ``2*width``; stage 3: a down-sampling block + ``max(n-2, 0)`` blocks at
    ``4*width``; stage 4: one block at ``4*width``.

    Attributes:
      n: blocks per stage (see above).
      width: channels of the stem and stage 1.
      last_relu: apply a ReLU to each stage-1..3 block output before the next block (the recorded
        maps stay pre-ReLU, as in the official code). False = PODNet default.
      dtype: computation dtype (parameters stay float32).

    ``__call__(x (B, H, W, 3), train, mask=None)`` (``mask``: (B,) rows that enter the batch
    statistics, see batchnorm.py) returns ``maps`` = [(B,H,W,w), (B,H/2,W/2,2w),
    (B,H/4,W/4,4w), (B,H/4,W/4,4w)] and ``features``/``relu_features`` (B, 4w).
    """

    n: int
    width: int = 16
    last_relu: bool = False
    dtype: Any = jnp.float32

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Array | None = None) -> dict[str, Any]:
        x = _conv(self.width, 3, 1, self.dtype, "stem_conv")(x)
        x = nn.relu(_bn(train, self.dtype, "stem_bn")(x, mask))
        # (first block down-samples?, number of blocks) per stage 1..3.
        stages = [(False, self.n), (True, self.n), (True, 1 + max(self.n - 2, 0))]
        maps = []
        for s, (down, n_blocks) in enumerate(stages, start=1):
            for i in range(n_blocks):
                block = CifarBlock(
                    downsample=down and i == 0,
                    dtype=self.dtype,
                    name=f"stage{s}_block{i}",
                )
                y = block(x, train, mask)
                x = nn.relu(y) if self.last_relu else y
            maps.append(y)
        y = CifarBlock(dtype=self.dtype, name="stage4_block0")(x, train, mask)
        maps.append(y)
        return _outputs(maps)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + shortcut, optional ReLU after the sum.

    ``projection=True``: the shortcut is conv1x1(stride)+BN. The second BN's scale starts at 0
    (``zero_init_residual=True`` in PODNet's ``resnet.py``).

    Input (B, H, W, C_in); output (B, H/stride, W/stride, planes).
    """

    planes: int
    stride: int = 1
    projection: bool = False
    relu_out: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Array | None = None) -> Array:
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(_bn(train, self.dtype, "bn1")(y, mask))
        y = _conv(self.planes, 3, 1, self.dtype, "conv2")(y)
        y = _bn(train, self.dtype, "bn2", zero_scale=True)(y, mask)
        if self.projection:
            x = _conv(self.planes, 1, self.stride, self.dtype, "proj_conv")(x)
            x = _bn(train, self.dtype, "proj_bn")(x, mask)
        y = x + y
        return nn.relu(y) if self.relu_out else y


class ResNet18(nn.Module):
    """ResNet-18 backbone for ImageNet (4 stages of 2 BasicBlocks at w, 2w, 4w, 8w; w = 64).

    Stem ``"podnet"`` (default; PODNet's ``inclearn/convnet/resnet.py``): 3x3 stride-1 conv + BN +
    ReLU + 3x3/2 max-pool, so a 224 input gives 112x112 after the max-pool. Stem
    ``"torchvision"``: 7x7 stride-2 conv + BN + ReLU + 3x3/2 max-pool (56x56 after it).
    Down-sampling stages 2-4 use projection shortcuts. Within a stage, the first block has the
    post-addition ReLU and the last has none, so each map is the raw stage output; ``last_relu``
    adds a ReLU between stages (PODNet: False).

    ``__call__(x (B, H, W, 3), train)`` returns ``maps`` = [(B,H/2,W/2,w), (B,H/4,W/4,2w),
    (B,H/8,W/8,4w), (B,H/16,W/16,8w)] with the podnet stem (each /4 more with the torchvision
    stem) and ``features``/``relu_features`` (B, 8w).
    """

    width: int = 64
    last_relu: bool = False
    stem: str = "podnet"
    dtype: Any = jnp.float32

    @property
    def feature_dim(self) -> int:
        return 8 * self.width

    @nn.compact
    def __call__(self, x: Array, train: bool, mask: Array | None = None) -> dict[str, Any]:
        if self.stem not in STEMS:
            raise ValueError(f"Unknown ResNet-18 stem {self.stem!r}; use one of {sorted(STEMS)}.")
        k, s = STEMS[self.stem]
        x = _conv(self.width, k, s, self.dtype, "stem_conv")(x)
        x = nn.relu(_bn(train, self.dtype, "stem_bn")(x, mask))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        maps = []
        for st in range(4):
            planes = self.width * 2**st
            stride = 1 if st == 0 else 2
            for i in range(2):
                x = BasicBlock(
                    planes,
                    stride=stride if i == 0 else 1,
                    projection=i == 0 and (stride != 1 or x.shape[-1] != planes),
                    relu_out=i == 0,
                    dtype=self.dtype,
                    name=f"stage{st + 1}_block{i}",
                )(x, train, mask)
            maps.append(x)
            if self.last_relu and st < 3:
                x = nn.relu(x)
        return _outputs(maps)


def resnet32(**kwargs: Any) -> CifarResNet:
    """PODNet's CIFAR ResNet-32 (``n=5, width=16``; 64-d features); kwargs go to CifarResNet."""
    return CifarResNet(n=5, width=16, **kwargs)


def resnet_tiny(**kwargs: Any) -> CifarResNet:
    """Smallest net with the same structure (4 blocks, width 8, 32-d features), for tests."""
    return CifarResNet(n=1, width=8, **kwargs)


def resnet_digits(width: int = 16, **kwargs: Any) -> CifarResNet:
    """4-block CIFAR-style net for 8x8 digits (maps 8x8, 4x4, 2x2, 2x2; 4*width-d features)."""
    return CifarResNet(n=1, width=width, **kwargs)
