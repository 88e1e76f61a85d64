"""Methods trained with plain cross-entropy on a growing linear head: finetune, joint, replay.

* finetune: new-class data only, no memory (the lower bound);
* joint: every training image of every seen class (the upper bound);
* replay: new-class data + a fixed exemplar memory per old class.

With ``synthetic.use_in`` in (classification, both), synthetic images of old classes enter the same
cross-entropy through the second (synthetic) batch. None of these has a distillation loss.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdcil_jax import losses
from sdcil_jax.methods.base import Method
from sdcil_jax.models import heads


class CrossEntropyMethod(Method):
    """Cross-entropy over all seen classes: L = mean_i cls_mask_i * CE(logits_i, y_i)."""

    def init_head(self, key, feat_dim, num_classes):
        return heads.linear_init(key, feat_dim, num_classes)

    def grow_head(self, head, key, num_new, new_class_feats=None):
        return heads.linear_grow(head, key, num_new)

    def head_apply(self, head, feats):
        return heads.linear_apply(head, feats)

    def loss(self, params, out, old_out, labels, cls_mask, dist_mask):
        ce = losses.cross_entropy(out["logits"], labels, cls_mask)
        acc = jnp.sum((jnp.argmax(out["logits"], -1) == labels) * cls_mask) / jnp.maximum(
            jnp.sum(cls_mask), 1.0)
        return ce, {"ce": ce, "train_acc": acc}


class Finetune(CrossEntropyMethod):
    name = "finetune"
    uses_memory = False


class Joint(CrossEntropyMethod):
    name = "joint"
    uses_memory = False

    def real_indices(self, new_idx, memory_idx, seen_idx):
        return np.asarray(seen_idx)


class Replay(CrossEntropyMethod):
    name = "replay"
    uses_memory = True
