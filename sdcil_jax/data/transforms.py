"""Decoding and augmentation of ImageNet-size images on the host: pure functions of the image and an
explicit ``numpy.random.Generator``.

:mod:`sdcil_jax.data.host_pipeline` applies them in grain worker processes; they depend only on numpy
and PIL (which releases the GIL while it decodes and resizes). Any image a source returns is accepted: a uint8
array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), encoded bytes (JPEG, PNG, ...), a file path or a PIL
image (grayscale, palette, CMYK and alpha become RGB).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

# torchvision defaults (RandomResizedCrop) and the PODNet jitter (ColorJitter(brightness=63/255)).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BRIGHTNESS = 63.0 / 255.0
_CROP_ATTEMPTS = 10
_RESAMPLE = Image.Resampling.BILINEAR  # antialiased in PIL when downscaling (support grows)


def to_pil_rgb(value: Any) -> Image.Image:
    """An RGB PIL image from a uint8 array, encoded bytes, a path or a PIL image.

    Grayscale, palette, CMYK and alpha images are converted to RGB.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str | os.PathLike):
        image = Image.open(value)
    else:
        array = np.asarray(value)
        if array.dtype.kind in "SOV" and array.size == 1:  # 0-d bytes/object array from a source
            return to_pil_rgb(array.reshape(()).item())
        if array.dtype != np.uint8:
            raise TypeError(f"Image arrays must be uint8, got {array.dtype} {array.shape}.")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise ValueError(f"Cannot read an image of shape {array.shape}.")
        image = Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(top, left, crop_height, crop_width)``.

    Up to 10 attempts at an area fraction uniform in ``scale`` and a log-uniform aspect ratio in
    ``ratio``; if none fits, the largest centred crop whose aspect ratio is clamped to ``ratio``.
    Always inside the image and at least 1x1.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(
    value: Any,
    rng: np.random.Generator,
    *,
    image_size: int = 224,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip: bool = True,
    brightness: float = BRIGHTNESS,
) -> np.ndarray:
    """Random-resized crop to ``image_size``, horizontal flip, multiplicative brightness jitter.

    The brightness factor is uniform in ``[max(0, 1 - brightness), 1 + brightness]``
    (torchvision ColorJitter). The draws always happen in the same order (crop, flip, brightness),
    whatever is switched off. Returns (image_size, image_size, 3) uint8.
    """
    image = to_pil_rgb(value)
    width, height = image.size
    top, left, h, w = random_resized_crop_box(height, width, rng, scale, ratio)
    do_flip = rng.uniform() < 0.5
    factor = rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness)
    image = image.resize((image_size, image_size), _RESAMPLE, box=(left, top, left + w, top + h))
    if flip and do_flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if brightness > 0:
        # Blend with black, clipped to [0, 255]: what torchvision's ColorJitter does to PIL images
        # (ImageEnhance.Brightness); done in C without the GIL.
        image = Image.blend(Image.new("RGB", image.size), image, float(factor))
    return np.asarray(image)


def eval_transform(value: Any, *, image_size: int = 224, resize: int = 256) -> np.ndarray:
    """The test transform: resize the shorter side to ``resize`` (antialiased bilinear), then
    centre crop ``image_size``.

    Done as one PIL resize of the matching box of the original image. Returns
    (image_size, image_size, 3) uint8.
    """
    if resize < image_size:
        raise ValueError(f"test resize {resize} is smaller than the crop {image_size}.")
    image = to_pil_rgb(value)
    width, height = image.size
    # torchvision Resize(int): the shorter side becomes `resize`, the longer one is truncated.
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
    return np.asarray(image.resize((image_size, image_size), _RESAMPLE, box=box))
