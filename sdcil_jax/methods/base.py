"""The method interface: what a CIL method contributes to the generic trainer.

A method owns its classifier head (init, growth, apply), its loss on one mixed real+synthetic batch
(with per-sample classification and distillation masks), its choice of real training data per task and
its task hooks. The trainer (``sdcil_jax.runner``) and the step (``sdcil_jax.train``) know nothing else
about it, so adding a method is one file plus one registry entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """Static facts about the task being trained (compile-time constants of its step)."""

    task: int
    num_old: int  # classes seen before this task
    num_new: int  # classes introduced by this task

    @property
    def num_seen(self) -> int:
        return self.num_old + self.num_new


class Method:
    """Base class; subclasses set the flags and override the hooks they need."""

    name = "base"
    uses_memory = True  # keeps an exemplar memory of real (or synthetic) images
    needs_old_model = False  # the step receives the previous task's frozen model
    has_distillation = False  # synthetic.use_in=distillation/both only makes sense if True
    imprint = False  # grow_head receives the new classes' features (k-means imprinting)

    def __init__(self, config, info: TaskInfo):
        self.config = config
        self.info = info

    # ---- head -------------------------------------------------------------------------------------
    def init_head(self, key: jax.Array, feat_dim: int, num_classes: int) -> Any:
        raise NotImplementedError

    def grow_head(self, head: Any, key: jax.Array, num_new: int, new_class_feats=None) -> Any:
        raise NotImplementedError

    def head_apply(self, head: Any, feats: jax.Array) -> jax.Array:
        raise NotImplementedError

    # ---- data -------------------------------------------------------------------------------------
    def real_indices(self, new_idx: np.ndarray, memory_idx: np.ndarray,
                     seen_idx: np.ndarray) -> np.ndarray:
        """Indices into the task's pool that form the real stream (one epoch = one pass)."""
        return np.concatenate([new_idx, memory_idx]) if self.uses_memory else new_idx

    # ---- loss -------------------------------------------------------------------------------------
    def loss(self, params, out, old_out, labels, cls_mask, dist_mask):
        """Scalar loss and a dict of scalar metrics for one batch (pure, traced under jit)."""
        raise NotImplementedError

    def transform_grads(self, grads):
        """Hook to clip gradients before the optimizer (identity by default)."""
        return grads

    def transform_updates(self, updates):
        """Hook to freeze parameters after the optimizer (e.g. old proxies; identity by default)."""
        return updates

    # ---- balanced finetuning of the classifier (after the task's training) ------------------------
    def finetune_epochs(self) -> int:
        """Epochs of classifier-only finetuning on a class-balanced set (0 = none)."""
        return 0

    def finetune_loss(self, head, scores, labels, mask):
        raise NotImplementedError

    def finetune_update_mask(self, head_updates):
        """1 for head leaves that balanced finetuning may change, 0 for frozen ones (all 1 here)."""
        return jax.tree.map(lambda u: jax.numpy.ones((), u.dtype), head_updates)
