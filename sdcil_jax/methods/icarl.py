"""iCaRL (Rebuffi et al., CVPR 2017): sigmoid BCE with distillation targets, herding, NME.

With o the old number of classes, n the seen classes, ``sigma`` the sigmoid and ``old`` the frozen
previous model's logits, per sample i the targets of the n sigmoid outputs are::

    columns >= o (new classes):  one-hot(y_i)                       weight cls_i
    columns <  o (old classes):  sigma(old_i)   if dist_i           (distillation)
                                 one-hot(y_i)   if cls_i, not dist_i (plain replay)

and the loss is the masked mean over the batch of the per-sample BCE summed over columns / n. For
real samples (cls = dist = 1) this is exactly iCaRL's loss; a synthetic sample in the
'distillation' arm only feeds the old columns, one in the 'classification' arm gets hard targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdcil_jax.methods.base import Method, masked_accuracy
from sdcil_jax.methods.cross_entropy import CrossEntropyMethod


def _bce_terms(logits, targets):
    """Element-wise sigmoid BCE: max(x, 0) - x t + log(1 + exp(-|x|))."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


class ICaRL(CrossEntropyMethod):
    name = "icarl"
    uses_memory = True
    needs_old_model = True
    has_distillation = True

    def loss(self, params, out, old_out, labels, cls_mask, dist_mask, args=None):
        """The head has a column for every class; only the ``n = num_seen`` live ones enter the
        sum (dead columns weigh 0), and ``o = num_old`` is traced."""
        args = self._args(args)
        logits = out["logits"]
        n_cols = logits.shape[1]
        n = args["num_seen"].astype(jnp.float32)
        o = args["num_old"]
        onehot = jax.nn.one_hot(labels, n_cols)
        col = jnp.arange(n_cols)[None, :]
        live = col < args["num_seen"]
        is_old_col = col < o
        targets = onehot
        weights = jnp.broadcast_to(cls_mask[:, None], logits.shape)
        if old_out is not None:
            old_t = jnp.where(is_old_col, jax.nn.sigmoid(old_out["logits"]), 0.0)
            use_kd = is_old_col & (dist_mask[:, None] > 0)
            targets = jnp.where(use_kd, old_t, onehot)
            old_w = jnp.maximum(dist_mask, cls_mask)[:, None]
            weights = jnp.where(is_old_col, old_w, cls_mask[:, None])
        terms = jnp.where(live, weights * _bce_terms(logits, targets), 0.0)
        per_sample = jnp.sum(terms, axis=1) / n
        denom = jnp.maximum(jnp.sum(jnp.maximum(cls_mask, dist_mask)), 1.0)
        loss = jnp.sum(per_sample) / denom
        return loss, {"bce": loss, "train_acc": masked_accuracy(logits, labels, cls_mask, args)}


__all__ = ["ICaRL", "Method"]
