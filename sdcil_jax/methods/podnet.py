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
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdcil_jax import losses
from sdcil_jax.methods.base import Method
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

    def init_head(self, key, feat_dim, num_classes):
        return heads.lsc_init(key, feat_dim, num_classes, self.k)

    def grow_head(self, head, key, num_new, new_class_feats=None):
        if new_class_feats is None:
            fresh = heads.lsc_init(key, head["proxies"].shape[1], num_new, self.k)["proxies"]
        else:
            norm = float(np.mean(np.linalg.norm(np.asarray(head["proxies"]), axis=1)))
            fresh = jnp.asarray(heads.kmeans_imprint(new_class_feats, self.k,
                                                     seed=self.config.seed + self.info.task,
                                                     target_norm=norm))
        return heads.lsc_grow(head, fresh)

    def head_apply(self, head, feats):
        return heads.lsc_apply(head, feats, self.k)

    def classification_loss(self, head, scores, labels, mask):
        return losses.nca(scores, labels, scale=heads.lsc_scale(head),
                          margin=self.config.method.nca_margin, mask=mask)

    def loss(self, params, out, old_out, labels, cls_mask, dist_mask):
        cls = self.classification_loss(params["head"], out["logits"], labels, cls_mask)
        metrics = {"nca": cls}
        total = cls
        if old_out is not None and self.info.task > 0:
            seen, new = self.info.num_seen, self.info.num_new
            m = self.config.method
            flat = losses.pod_flat(old_out["features"], out["features"], dist_mask)
            spatial = losses.pod_spatial(old_out["maps"], out["maps"], dist_mask)
            total = (total + losses.distillation_factor(m.pod_flat, seen, new) * flat
                     + losses.distillation_factor(m.pod_spatial, seen, new) * spatial)
            metrics.update(pod_flat=flat, pod_spatial=spatial)
        acc = jnp.sum((jnp.argmax(out["logits"], -1) == labels) * cls_mask) / jnp.maximum(
            jnp.sum(cls_mask), 1.0)
        metrics["train_acc"] = acc
        return total, metrics

    def transform_grads(self, grads):
        if self.config.method.grad_clip > 0:
            grads = losses.clip_gradients(grads, self.config.method.grad_clip)
        return grads

    def transform_updates(self, updates):
        if self.info.num_old == 0:
            return updates
        mask = heads.frozen_mask_lsc(self.info.num_old, self.info.num_seen, self.k)
        return dict(updates, head=heads.mask_updates(updates["head"], mask))

    def finetune_epochs(self) -> int:
        return self.config.method.finetune_epochs if self.info.task > 0 else 0

    def finetune_loss(self, head, scores, labels, mask):
        return self.classification_loss(head, scores, labels, mask)

    def finetune_update_mask(self, head_updates):
        """Every proxy is finetuned; the learned scale is not (not in the official optimizer)."""
        return {"proxies": jnp.ones((), jnp.float32), "scale": jnp.zeros((), jnp.float32)}

    def real_indices(self, new_idx, memory_idx, seen_idx):
        return np.concatenate([new_idx, memory_idx])
