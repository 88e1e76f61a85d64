"""PODNet (Douillard et al., ECCV 2020) on the LSC classifier, faithful to its official code.

Loss of task t (n = classes seen, k = new classes; ``cls``/``dist`` the per-sample masks)::

    L = NCA(s, y; scale, margin) [cls]
        + lambda_flat    * sqrt(n / k) * POD-flat(old features, new features) [dist]     (t > 0)
        + lambda_spatial * sqrt(n / k) * POD-spatial(old maps, new maps) [dist]        (t > 0)

Gradients are clamped element-wise to [-grad_clip, grad_clip]; the old classes' proxies are frozen
(their optimizer updates are multiplied by 0); the new classes' proxies are imprinted by k-means on
the normalised features of their training images, the centres scaled to the mean norm of the existing
proxies; after training, the proxies (not the learned scale) are finetuned on a class-balanced set
(the memory, with the new classes under-sampled to the memory size) at a constant learning rate,
with batch norm in train mode (see ``sdcil_jax.train.finetune_update``).

The head holds the proxies of every class of the protocol; ``n``, the old/new boundary and the two
factors ``lambda * sqrt(n / k)`` are traced arguments (:meth:`PODNet.task_args`), and the classes
not seen yet are masked out of the NCA (row max and denominator) and frozen.
"""

from __future__ import annotations

import numpy as np

from sdcil_jax import losses
from sdcil_jax.methods.base import Method, TaskInfo, live_classes, masked_accuracy
from sdcil_jax.models import heads


class PODNet(Method):
    name = "podnet"
    uses_memory = True
    needs_old_model = True
    has_distillation = True
    imprint = True

    @property
    def k(self) -> int:
        return self.config.method.proxies_per_class

    def task_args(self, info: TaskInfo | None = None):
        """``num_old``, ``num_seen`` and the float32 factors ``pod_flat`` / ``pod_spatial`` =
        ``lambda * sqrt(n / k)`` (0 in the first task, which has no old model)."""
        info = info or self.info
        args = super().task_args(info)
        m = self.config.method
        for name, base in (("pod_flat", m.pod_flat), ("pod_spatial", m.pod_spatial)):
            factor = (losses.distillation_factor(base, info.num_seen, info.num_new)
                      if info.num_old else 0.0)
            args[name] = np.asarray(factor, np.float32)
        return args

    def init_head(self, key, feat_dim, num_classes):
        return heads.lsc_init(key, feat_dim, num_classes, self.k)

    def pad_head(self, head, num_classes):
        return heads.lsc_pad(head, num_classes, self.k)

    def grow_head(self, head, key, info, new_class_feats=None):
        if new_class_feats is None:
            fresh = heads.lsc_init(key, head["proxies"].shape[1], info.num_new, self.k)["proxies"]
        else:
            norm = heads.lsc_live_norm(head, info.num_old, self.k)
            fresh = heads.kmeans_imprint(new_class_feats, self.k, seed=self.config.seed + info.task,
                                         target_norm=norm)
        return heads.lsc_write(head, info.num_old * self.k, fresh)

    def head_apply(self, head, feats):
        return heads.lsc_apply(head, feats, self.k)

    def classification_loss(self, head, scores, labels, mask, args):
        return losses.nca(scores, labels, scale=heads.lsc_scale(head),
                          margin=self.config.method.nca_margin, mask=mask,
                          live=live_classes(scores.shape[1], args))

    def loss(self, params, out, old_out, labels, cls_mask, dist_mask, args=None):
        args = self._args(args)
        cls = self.classification_loss(params["head"], out["logits"], labels, cls_mask, args)
        metrics = {"nca": cls}
        total = cls
        if old_out is not None:
            flat = losses.pod_flat(old_out["features"], out["features"], dist_mask)
            spatial = losses.pod_spatial(old_out["maps"], out["maps"], dist_mask)
            total = total + args["pod_flat"] * flat + args["pod_spatial"] * spatial
            metrics.update(pod_flat=flat, pod_spatial=spatial)
        metrics["train_acc"] = masked_accuracy(out["logits"], labels, cls_mask, args)
        return total, metrics

    def transform_grads(self, grads):
        if self.config.method.grad_clip > 0:
            grads = losses.clip_gradients(grads, self.config.method.grad_clip)
        return grads

    def transform_updates(self, updates, args=None):
        """Only the new classes' proxies (and the learned scale) move: old and dead rows frozen."""
        args = self._args(args)
        n_total = updates["head"]["proxies"].shape[0] // self.k
        mask = heads.trainable_mask_lsc(n_total, args["num_old"], args["num_seen"], self.k)
        return dict(updates, head=heads.mask_updates(updates["head"], mask))

    def finetune_epochs(self, info=None) -> int:
        info = info or self.info
        return self.config.method.finetune_epochs if info.task > 0 else 0

    def finetune_loss(self, head, scores, labels, mask, args=None):
        return self.classification_loss(head, scores, labels, mask, self._args(args))

    def finetune_update_mask(self, head_updates, args=None):
        """Every live proxy is finetuned; the learned scale is not (not in the official optimizer)."""
        args = self._args(args)
        n_total = head_updates["proxies"].shape[0] // self.k
        return heads.trainable_mask_lsc(n_total, 0, args["num_seen"], self.k, scale=0.0)

    def real_indices(self, new_idx, memory_idx, seen_idx):
        return np.concatenate([new_idx, memory_idx])
