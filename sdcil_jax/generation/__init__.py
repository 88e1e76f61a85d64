"""Synthetic replay data: a Stable Diffusion (or stand-in) generator and the on-disk replay store.

Public API:

- :func:`generate_replay_pool`: fill a store with ``generation.per_class`` images of given classes
  (resumable; backends ``sd``, ``tiny_sd``, ``real_holdout``).
- :class:`ReplayStore`: read shards at training time
  (``ReplayStore(dir).open().load(class_id, n)``).
- :func:`load_pipeline`, :class:`Sampler`: the generator itself (diffusers specifics live in
  :mod:`sdcil_jax.generation.pipeline` only).
- :func:`class_prompts`: the prompts of a class.
"""

from sdcil_jax.generation.pipeline import load_pipeline, save_tiny_pipeline
from sdcil_jax.generation.pool import fingerprint_fields, generate_replay_pool, write_preview
from sdcil_jax.generation.prompts import class_prompts, prompts_for_indices, readable_name
from sdcil_jax.generation.sampler import Sampler, initial_latents, to_uint8
from sdcil_jax.generation.store import ReplayStore, fingerprint_of

__all__ = [
    "ReplayStore",
    "Sampler",
    "class_prompts",
    "fingerprint_fields",
    "fingerprint_of",
    "generate_replay_pool",
    "initial_latents",
    "load_pipeline",
    "prompts_for_indices",
    "readable_name",
    "save_tiny_pipeline",
    "to_uint8",
    "write_preview",
]
