"""Decoding and augmentation of single images on the host (transitional: re-exports)."""

from sdcil_jax.data.host_pipeline import (  # noqa: F401
    eval_transform,
    random_resized_crop_box,
    to_pil_rgb,
    train_transform,
)
