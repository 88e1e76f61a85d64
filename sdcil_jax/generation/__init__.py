"""Synthetic replay data: a Stable Diffusion (or stand-in) generator and the on-disk replay store.

Public API (imported lazily, so ``import sdcil_jax.generation.backends`` stays cheap):

- :func:`generate_replay_pool`: fill a store with ``generation.per_class`` images of given classes
  (resumable; backends in :data:`BACKENDS`: ``sd``, ``tiny_sd``, ``real_holdout``).
- :class:`ReplayStore`: read shards at training time, whole
  (``ReplayStore(dir).open().load(class_id, n)``) or on demand (``store.reader(classes, start, n)``,
  a picklable :class:`StoreReader`).
- :func:`load_model`, :class:`Engine`: the generator itself (diffusers specifics live in
  :mod:`sdcil_jax.generation.pipeline` only; the sampling maths in ``sampler`` and ``schedulers``).
- :func:`class_prompts`: the prompts of a class.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BACKENDS": "backends",
    "ClassJob": "engine",
    "Engine": "engine",
    "ReplayStore": "store",
    "SCHEDULERS": "schedulers",
    "SDModel": "pipeline",
    "StoreReader": "shards",
    "class_prompts": "prompts",
    "fingerprint_fields": "pool",
    "fingerprint_of": "store",
    "generate_replay_pool": "pool",
    "initial_latents": "sampler",
    "load_model": "pipeline",
    "plan_shards": "pool",
    "prompts_for_indices": "prompts",
    "readable_name": "prompts",
    "sample_images": "sampler",
    "save_tiny_pipeline": "tiny",
    "solver_table": "schedulers",
    "to_uint8": "sampler",
    "write_preview": "pool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
