"""The generator backends by name: what each one is and what it needs (no heavy imports).

:mod:`sdcil_jax.config` derives ``generation.backend``'s valid values from :data:`BACKENDS`, so this
module must stay cheap to import (standard library only).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backend:
    """A replay generator.

    Attributes:
      name: the value of ``generation.backend``.
      diffusion: samples images with a Stable Diffusion model (the sampler settings apply).
      pretrained: its weights come from ``generation.model`` / ``generation.revision``.
      real_images: copies held-out real images (needs ``dataset.holdout_per_class``).
      summary: one line for documentation and error messages.
    """

    name: str
    diffusion: bool
    pretrained: bool
    real_images: bool
    summary: str


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("sd", diffusion=True, pretrained=True, real_images=False,
                summary="pretrained Stable Diffusion (Flax weights) from a hub id or a local folder"),
        Backend("tiny_sd", diffusion=True, pretrained=False, real_images=False,
                summary="a tiny random Stable Diffusion built in code (offline tests and smoke runs)"),
        Backend("real_holdout", diffusion=False, pretrained=False, real_images=True,
                summary="held-out real training images (the perfect-generator upper bound)"),
    )
}


def diffusion_backends() -> tuple[str, ...]:
    """Names of the backends that sample with a diffusion model."""
    return tuple(name for name, b in BACKENDS.items() if b.diffusion)
