"""Methods trained with plain cross-entropy on a growing linear head: finetune, joint, replay.

* finetune: new-class data only, no memory (the lower bound);
* joint: every training image of every seen class (the upper bound);
* replay: new-class data + a fixed exemplar memory per old class.

With ``synthetic.use_in`` in (classification, both), synthetic images of old classes enter the same
cross-entropy through the second (synthetic) batch. None of these has a distillation loss.
"""

from __future__ import annotations

import numpy as np

from sdcil_jax import losses
from sdcil_jax.methods.base import Method, live_classes, masked_accuracy
from sdcil_jax.models import heads


class CrossEntropyMethod(Method):
    """Cross-entropy over the seen classes: L = mean_i cls_mask_i * CE(logits_i, y_i), the softmax
    over the live columns of a linear head allocated for every class (the dead ones frozen)."""

    def init_head(self, key, feat_dim, num_classes):
        return heads.linear_init(key, feat_dim, num_classes)

    def pad_head(self, head, num_classes):
        return heads.linear_pad(head, num_classes)

    def grow_head(self, head, key, info, new_class_feats=None):
        fresh = heads.linear_init(key, np.shape(head["w"])[0], info.num_new)
        return heads.linear_write(head, info.num_old, fresh)

    def head_apply(self, head, feats):
        return heads.linear_apply(head, feats)

    def loss(self, params, out, old_out, labels, cls_mask, dist_mask, args=None):
        args = self._args(args)
        logits = out["logits"]
        ce = losses.cross_entropy(logits, labels, cls_mask, live=live_classes(logits.shape[1], args))
        return ce, {"ce": ce, "train_acc": masked_accuracy(logits, labels, cls_mask, args)}

    def transform_updates(self, updates, args=None):
        """Every seen class trains; the dead columns are frozen."""
        args = self._args(args)
        mask = heads.trainable_mask_linear(updates["head"]["b"].shape[0], 0, args["num_seen"])
        return dict(updates, head=heads.mask_updates(updates["head"], mask))

    def finetune_update_mask(self, head_updates, args=None):
        """Every seen class's column (none of these methods finetunes by default)."""
        args = self._args(args)
        return heads.trainable_mask_linear(head_updates["b"].shape[0], 0, args["num_seen"])


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
