"""The method interface: what a CIL method contributes to the generic trainer.

A method owns its classifier head (init, in-place growth, apply), its loss on one mixed
real+synthetic batch (with per-sample classification and distillation masks), its choice of real
training data per task and its task hooks. The trainer (``sdcil_jax.task``) and the step
(``sdcil_jax.train``) know nothing else about it, so adding a method is one file plus one registry
entry.

Compile once per run: the head is allocated for every class of the protocol from the first task
(rows of classes not seen yet are *dead*: masked out of the losses, never updated), and what changes
from task to task reaches the compiled programs as data, the ``args`` pytree of
:meth:`Method.task_args` (int32 ``num_old`` and ``num_seen``, plus the method's own float32
factors), never as a Python constant. The host-side hooks (growth, finetuning epochs, data) take the
static :class:`TaskInfo`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """Facts about the task being trained, on the host (turned into traced ``args`` for the step)."""

    task: int
    num_old: int  # classes seen before this task
    num_new: int  # classes introduced by this task

    @property
    def num_seen(self) -> int:
        return self.num_old + self.num_new


def live_classes(num_classes: int, args) -> jax.Array:
    """``(C,)`` bool, True for the classes seen so far (``c < args['num_seen']``)."""
    return jnp.arange(num_classes) < args["num_seen"]


def masked_accuracy(logits, labels, cls_mask, args) -> jax.Array:
    """Training accuracy: argmax over the live classes, masked mean over the batch."""
    live = live_classes(logits.shape[1], args)
    pred = jnp.argmax(jnp.where(live[None, :], logits, -jnp.inf), -1)
    return jnp.sum((pred == labels) * cls_mask) / jnp.maximum(jnp.sum(cls_mask), 1.0)


class Method:
    """Base class; subclasses set the flags and override the hooks they need.

    ``info`` is optional: a run builds one method for all its tasks (``info=None``) and passes each
    task's ``args`` to the traced hooks; a method built for one task (tests, benchmarks) uses
    ``task_args(info)`` where a hook gets no ``args``.
    """

    name = "base"
    uses_memory = True  # keeps an exemplar memory of real (or synthetic) images
    needs_old_model = False  # the step receives the previous task's frozen model
    has_distillation = False  # synthetic.use_in=distillation/both only makes sense if True
    imprint = False  # grow_head receives the new classes' features (k-means imprinting)

    def __init__(self, config, info: TaskInfo | None = None):
        self.config = config
        self.info = info

    # ---- traced task arguments ---------------------------------------------------------------------
    def task_args(self, info: TaskInfo | None = None) -> dict[str, np.ndarray]:
        """The task's traced arguments: ``{'num_old': int32, 'num_seen': int32}`` (+ the method's)."""
        info = info or self.info
        if info is None:
            raise ValueError(f"{type(self).__name__} was built without a TaskInfo: pass the task's "
                             "args (method.task_args(info)) to the traced hooks.")
        return {"num_old": np.asarray(info.num_old, np.int32),
                "num_seen": np.asarray(info.num_seen, np.int32)}

    def _args(self, args):
        return self.task_args() if args is None else args

    # ---- head -------------------------------------------------------------------------------------
    def init_head(self, key: jax.Array, feat_dim: int, num_classes: int) -> Any:
        """A head for exactly ``num_classes`` classes."""
        raise NotImplementedError

    def pad_head(self, head: Any, num_classes: int) -> Any:
        """``head`` (numpy) with dead rows appended up to ``num_classes`` classes."""
        raise NotImplementedError

    def grow_head(self, head: Any, key: jax.Array, info: TaskInfo, new_class_feats=None) -> Any:
        """``head`` (allocated for every class) with the rows of ``info``'s new classes written in
        place (numpy; the same shape, so no program sees a new shape)."""
        raise NotImplementedError

    def head_apply(self, head: Any, feats: jax.Array) -> jax.Array:
        """Scores ``(B, C)`` of every allocated class (dead ones included; the losses mask them)."""
        raise NotImplementedError

    # ---- data -------------------------------------------------------------------------------------
    def real_indices(self, new_idx: np.ndarray, memory_idx: np.ndarray,
                     seen_idx: np.ndarray) -> np.ndarray:
        """Indices into the task's pool that form the real stream (one epoch = one pass)."""
        return np.concatenate([new_idx, memory_idx]) if self.uses_memory else new_idx

    # ---- loss -------------------------------------------------------------------------------------
    def loss(self, params, out, old_out, labels, cls_mask, dist_mask, args=None):
        """Scalar loss and a dict of scalar metrics for one batch (pure, traced under jit)."""
        raise NotImplementedError

    def transform_grads(self, grads):
        """Hook to clip gradients before the optimizer (identity by default)."""
        return grads

    def transform_updates(self, updates, args=None):
        """Hook to freeze parameters after the optimizer: at least the dead classes' rows."""
        raise NotImplementedError

    # ---- balanced finetuning of the classifier (after the task's training) ------------------------
    def finetune_epochs(self, info: TaskInfo | None = None) -> int:
        """Epochs of classifier-only finetuning on a class-balanced set (0 = none)."""
        return 0

    def finetune_loss(self, head, scores, labels, mask, args=None):
        raise NotImplementedError

    def finetune_update_mask(self, head_updates, args=None):
        """Per head leaf, 1 where balanced finetuning may change it, 0 where frozen."""
        raise NotImplementedError
